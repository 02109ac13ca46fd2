"""MovieLens-100K (GroupLens): 100,000 ratings (1-5 stars) by 943 users of 1,682 movies.

Features: users' age bucket (the MovieLens-1M buckets), gender, occupation and zip-code
prefix (first digit, or ``other`` for non-US codes); movies' 19 genres (multi-hot) and
release year (categorical, ``unknown`` when missing).

Where the files come from, in order: the ``root`` argument; ``$METAREC_DATA`` (a folder that
holds the files or an ``ml-100k/`` folder); the cache ``~/.cache/metarec/ml-100k``; else the
official zip is downloaded, checked against the MD5 that GroupLens publishes for it
(and against ``sha256`` when one is given), and extracted into the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from metarec import (
    DataError,
    Dataset,
    Feature,
    FeatureSpec,
    InteractionTable,
    encode_ids,
    numeric_column,
    read_frame,
)

URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
MD5 = "0e33842e24a9c977be4e0107933c0723"  # published by GroupLens (ml-100k.zip.md5)
FILES = ("u.data", "u.item", "u.user")
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M age groups
GENRES = 19


def _has_files(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES)


def find_root(root: str | os.PathLike | None) -> Path | None:
    """The first folder holding the MovieLens-100K files, or None."""
    candidates = []
    if root:
        candidates += [Path(root), Path(root) / "ml-100k"]
    if os.environ.get("METAREC_DATA"):
        env = Path(os.environ["METAREC_DATA"])
        candidates += [env / "ml-100k", env]
    candidates.append(Path.home() / ".cache" / "metarec" / "ml-100k")
    return next((c for c in candidates if _has_files(c)), None)


def download(dest: Path, sha256: str | None = None) -> Path:
    """Download and verify the official zip, then extract it into ``dest`` (atomically)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = Path(tmp) / "ml-100k.zip"
        try:
            urllib.request.urlretrieve(URL, archive)
        except OSError as err:
            raise DataError(f"MovieLens-100K not found locally and download failed ({err}); "
                            "set root: in the recipe or METAREC_DATA to a folder with "
                            "u.data, u.item, u.user", source=URL) from None
        blob = archive.read_bytes()
        if hashlib.md5(blob).hexdigest() != MD5:
            raise DataError(f"checksum mismatch: MD5 {hashlib.md5(blob).hexdigest()} != {MD5}",
                            source=URL)
        if sha256 and hashlib.sha256(blob).hexdigest() != sha256.lower():
            raise DataError(f"checksum mismatch: SHA-256 {hashlib.sha256(blob).hexdigest()} "
                            f"!= {sha256}", source=URL)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(Path(tmp) / "ml-100k"), dest)
    return dest


class MovieLens100K(Dataset):
    """MovieLens-100K ratings with user and movie side information.

    Args:
        root: folder with ``u.data``, ``u.item``, ``u.user`` (or its parent).
        download: download the official zip when no local copy is found.
        sha256: optional SHA-256 the downloaded zip must also match.
    """

    def __init__(self, root: str | None = None, download: bool = True,
                 sha256: str | None = None) -> None:
        self.root, self.allow_download, self.sha256 = root, download, sha256

    def load(self) -> InteractionTable:
        folder = find_root(self.root)
        if folder is None:
            if not self.allow_download:
                raise DataError("MovieLens-100K files (u.data, u.item, u.user) not found; set "
                                "root: or METAREC_DATA", source=str(self.root or "$METAREC_DATA"))
            folder = download(Path.home() / ".cache" / "metarec" / "ml-100k", self.sha256)
        return self._read(folder)

    def _read(self, folder: Path) -> InteractionTable:
        data = read_frame(folder / "u.data", sep="\t", header=False,
                          names=["user", "item", "rating", "timestamp"])
        users_raw = read_frame(folder / "u.user", sep="|", header=False, encoding="latin-1",
                               names=["user", "age", "gender", "occupation", "zip"])
        items_raw = read_frame(folder / "u.item", sep="|", header=False, encoding="latin-1",
                               names=["item", "title", "release", "video", "url",
                                      *[f"g{i}" for i in range(GENRES)]])
        user_ids = numeric_column(users_raw, "user", integer=True, minimum=1)
        item_ids = numeric_column(items_raw, "item", integer=True, minimum=1)
        u = numeric_column(data, "user", integer=True, minimum=1)
        i = numeric_column(data, "item", integer=True, minimum=1)
        rating = numeric_column(data, "rating", minimum=1, maximum=5)
        ts = numeric_column(data, "timestamp", integer=True, minimum=0)
        for ids, known, name, src in ((u, user_ids, "user", "u.user"), (i, item_ids, "item", "u.item")):
            unknown = ~np.isin(ids, known)
            if unknown.any():
                row = int(np.flatnonzero(unknown)[0])
                raise DataError(f"{name} id {ids[row]} is not listed in {src}",
                                source=data.attrs["source"], line=int(data.attrs["line"][row]),
                                field=name)
        user_codes, user_keys = encode_ids(user_ids)
        item_codes, item_keys = encode_ids(item_ids)
        users = user_codes[np.searchsorted(user_keys, u)]
        items = item_codes[np.searchsorted(item_keys, i)]
        # User features, in contiguous-id order.
        uorder = np.argsort(user_codes)
        age = numeric_column(users_raw, "age", integer=True, minimum=0)[uorder]
        age_bucket = np.searchsorted(AGE_EDGES, age, side="right")
        gender, _ = encode_ids(users_raw["gender"].to_numpy()[uorder])
        occupation, _ = encode_ids(users_raw["occupation"].to_numpy()[uorder])
        zips = users_raw["zip"].to_numpy()[uorder]
        zip_prefix = np.array([int(z[0]) if z[:1].isdigit() else 10 for z in zips])
        # Item features.
        iorder = np.argsort(item_codes)
        genres = np.stack([numeric_column(items_raw, f"g{g}", integer=True, minimum=0, maximum=1)
                           for g in range(GENRES)], axis=1)[iorder].astype(np.float32)
        year_text = items_raw["release"].str[-4:].to_numpy()[iorder]
        year, _ = encode_ids(np.where(np.char.isdigit(year_text.astype(str)), year_text, "unknown"))
        return InteractionTable(
            users=users, items=items, labels=rating, timestamps=ts,
            num_users=len(user_keys), num_items=len(item_keys),
            user_features=[
                Feature(FeatureSpec("age", "user", "categorical", len(AGE_EDGES) + 1), age_bucket),
                Feature(FeatureSpec("gender", "user", "categorical", int(gender.max()) + 1), gender),
                Feature(FeatureSpec("occupation", "user", "categorical", int(occupation.max()) + 1),
                        occupation),
                Feature(FeatureSpec("zip", "user", "categorical", 11), zip_prefix),
            ],
            item_features=[
                Feature(FeatureSpec("genre", "item", "multihot", GENRES), genres),
                Feature(FeatureSpec("year", "item", "categorical", int(year.max()) + 1), year),
            ],
            feedback="explicit", rating_range=(1.0, 5.0), user_keys=user_keys,
            item_keys=item_keys, source=str(folder),
        )
