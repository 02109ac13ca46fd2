"""Where the files of a published data set are found, and how a zip of them is fetched.

Shared by the MovieLens and Book-Crossing plugins: the lookup order is the ``root``
argument (the folder itself, or its ``<name>/``), ``$METAREC_DATA`` (its ``<name>/``, or
itself), then the cache ``~/.cache/metarec/<name>``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

from metarec import DataError


def cache_dir(name: str) -> Path:
    """``~/.cache/metarec/<name>``: where downloaded or unpacked copies are kept."""
    return Path.home() / ".cache" / "metarec" / name


def candidates(root: str | os.PathLike | None, name: str,
               aliases: Sequence[str] = ()) -> list[Path]:
    """The folders to look in, in order (see the module docstring). ``aliases`` are other
    names of the data set's folder (e.g. the name its zip unpacks to)."""
    names = (name, *aliases)
    found: list[Path] = []
    if root:
        found += [Path(root), *(Path(root) / n for n in names)]
    if os.environ.get("METAREC_DATA"):
        env = Path(os.environ["METAREC_DATA"])
        found += [*(env / n for n in names), env]
    found.append(cache_dir(name))
    return found


def find_folder(folders: Sequence[Path], files: Sequence[str]) -> Path | None:
    """The first of ``folders`` that holds every one of ``files``, or None."""
    return next((f for f in folders if all((f / n).is_file() for n in files)), None)


def unpack(archive: Path, dest: Path, files: Sequence[str]) -> Path:
    """Extract ``files`` from ``archive`` (at its top level or in one folder of it) into
    ``dest``, atomically: ``dest`` is replaced only once every file is extracted."""
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as err:
        raise DataError(f"not a readable zip file ({err})", source=str(archive)) from None
    with zf:
        members = {Path(m).name: m for m in zf.namelist() if Path(m).name in files}
        missing = [f for f in files if f not in members]
        if missing:
            raise DataError(f"the zip holds no {', '.join(missing)}", source=str(archive))
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            staged = Path(tmp) / dest.name
            staged.mkdir()
            for name, member in members.items():
                with zf.open(member) as src, open(staged / name, "wb") as out:
                    shutil.copyfileobj(src, out)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.move(str(staged), dest)
    return dest


def download(url: str, dest: Path, files: Sequence[str], md5: str, what: str,
             sha256: str | None = None) -> Path:
    """Download the zip at ``url``, check it against ``md5`` (and ``sha256`` when given), and
    extract ``files`` into ``dest``. Nothing is left behind when any step fails."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = Path(tmp) / Path(url).name
        try:
            urllib.request.urlretrieve(url, archive)
        except OSError as err:
            raise DataError(f"{what} not found locally and download failed ({err}); set root: "
                            f"in the recipe or METAREC_DATA to a folder with {', '.join(files)}",
                            source=url) from None
        blob = archive.read_bytes()
        if hashlib.md5(blob).hexdigest() != md5:
            raise DataError(f"checksum mismatch: MD5 {hashlib.md5(blob).hexdigest()} != {md5}",
                            source=url)
        if sha256 and hashlib.sha256(blob).hexdigest() != sha256.lower():
            raise DataError(f"checksum mismatch: SHA-256 {hashlib.sha256(blob).hexdigest()} "
                            f"!= {sha256}", source=url)
        return unpack(archive, dest, files)
