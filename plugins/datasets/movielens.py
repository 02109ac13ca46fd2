"""MovieLens-100K (GroupLens): 100,000 ratings (1-5 stars) by 943 users of 1,682 movies.

Features: users' age bucket (the MovieLens-1M buckets), gender, occupation and zip-code
prefix (first digit, or ``other`` for non-US codes); movies' 19 genres (multi-hot) and
release year (categorical, ``unknown`` when missing).

Where the files come from, in order: the ``root`` argument; ``$METAREC_DATA`` (a folder that
holds the files or an ``ml-100k/`` folder); the cache ``~/.cache/metarec/ml-100k``; else the
official zip is downloaded, checked against the MD5 that GroupLens publishes for it
(and against ``sha256`` when one is given), and extracted into the cache. Local files are
checked against the release's row counts (``verify: false`` reads a partial copy).

The pieces shared with MovieLens-1M (lookup, download, id checks, features) live here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from metarec import (
    DataError,
    Dataset,
    Feature,
    FeatureSpec,
    InteractionTable,
    encode_ids,
    numeric_column,
    read_frame,
    require_rows,
)
from metarec_plugins.datasets import _files

URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
MD5 = "0e33842e24a9c977be4e0107933c0723"  # published by GroupLens (ml-100k.zip.md5)
FILES = ("u.data", "u.item", "u.user")
ROWS = {"u.data": 100_000, "u.user": 943, "u.item": 1682}
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M age groups
GENRES = 19


def find_root(root: str | os.PathLike | None) -> Path | None:
    """The first folder holding the MovieLens-100K files, or None."""
    return _files.find_folder(_files.candidates(root, "ml-100k"), FILES)


def download(dest: Path, sha256: str | None = None) -> Path:
    """Download and verify the official zip, then extract it into ``dest`` (atomically)."""
    return _files.download(URL, dest, FILES, MD5, "MovieLens-100K", sha256)


class MovieLensBase(Dataset):
    """Lookup, download and verification shared by the MovieLens releases.

    Args:
        root: folder with the release's files (or its parent).
        download: download the official zip when no local copy is found.
        sha256: optional SHA-256 the downloaded zip must also match.
        verify: check every file's row count against the release (``false`` for a
            partial or edited copy).
    """

    title, name, files = "MovieLens-100K", "ml-100k", FILES

    def __init__(self, root: str | None = None, download: bool = True,
                 sha256: str | None = None, verify: bool = True) -> None:
        self.root, self.allow_download, self.sha256 = root, download, sha256
        self.verify = verify

    def load(self) -> InteractionTable:
        folder = self._find(self.root)
        if folder is None:
            if not self.allow_download:
                raise DataError(f"{self.title} files ({', '.join(self.files)}) not found in "
                                f"{_where(self.root, self.name)}; set root: or METAREC_DATA",
                                source=str(self.root or "$METAREC_DATA"))
            folder = self._download(_files.cache_dir(self.name), self.sha256)
        return self._read(folder)

    def _find(self, root: str | None) -> Path | None:
        return _files.find_folder(_files.candidates(root, self.name), self.files)

    def _download(self, dest: Path, sha256: str | None) -> Path:  # pragma: no cover
        raise NotImplementedError

    def _read(self, folder: Path) -> InteractionTable:  # pragma: no cover
        raise NotImplementedError

    def _frame(self, path: Path, rows: int, **kwargs) -> pd.DataFrame:
        """``read_frame`` plus, unless ``verify`` is off, the release's row count."""
        frame = read_frame(path, header=False, **kwargs)
        if self.verify:
            require_rows(frame, rows, f"{self.title}'s {path.name}")
        return frame


def _where(root: str | None, name: str) -> str:
    return ", ".join(str(p) for p in _files.candidates(root, name))


def index_ids(ratings: pd.DataFrame, column: str, raw: np.ndarray, listing: pd.DataFrame,
              listed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous ids of the ratings' ``raw`` ids, each of which must be one of ``listed``
    (the ids of the file ``listing``, each once); returns ``(codes, keys)``."""
    name = Path(listing.attrs["source"]).name
    _, first = np.unique(listed, return_index=True)
    if len(first) < len(listed):
        row = int(np.setdiff1d(np.arange(len(listed)), first)[0])
        raise DataError(f"{column} id {listed[row]} is listed twice", source=listing.attrs["source"],
                        line=int(listing.attrs["line"][row]), field=column)
    unknown = ~np.isin(raw, listed)
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise DataError(f"{column} id {raw[row]} is not listed in {name}",
                        source=ratings.attrs["source"], line=int(ratings.attrs["line"][row]),
                        field=column)
    keys = np.unique(listed)
    return np.searchsorted(keys, raw).astype(np.int64), keys


def user_features(age: np.ndarray, gender: np.ndarray, occupation: np.ndarray,
                  zips: np.ndarray) -> list[Feature]:
    """Age bucket, gender, occupation and zip prefix; each input in contiguous-id order."""
    bucket = np.searchsorted(AGE_EDGES, age, side="right")
    gender, _ = encode_ids(gender)
    occupation, _ = encode_ids(occupation)
    prefix = np.array([int(z[0]) if z[:1].isdigit() else 10 for z in zips.astype(str)],
                      dtype=np.int64)
    return [
        Feature(FeatureSpec("age", "user", "categorical", len(AGE_EDGES) + 1), bucket),
        Feature(FeatureSpec("gender", "user", "categorical", int(gender.max()) + 1), gender),
        Feature(FeatureSpec("occupation", "user", "categorical", int(occupation.max()) + 1),
                occupation),
        Feature(FeatureSpec("zip", "user", "categorical", 11), prefix),
    ]


def item_features(genres: np.ndarray, year: np.ndarray) -> list[Feature]:
    """Multi-hot genres and release year (``"unknown"`` where not four digits, sorting last);
    inputs in contiguous-id order."""
    year = year.astype(str)
    codes, keys = encode_ids(np.where(np.char.isdigit(year) & (np.char.str_len(year) == 4),
                                      year, "unknown"))
    return [
        Feature(FeatureSpec("genre", "item", "multihot", genres.shape[1]),
                genres.astype(np.float32)),
        Feature(FeatureSpec("year", "item", "categorical", int(codes.max()) + 1), codes,
                vocabulary=tuple(str(k) for k in keys)),
    ]


class MovieLens100K(MovieLensBase):
    """MovieLens-100K ratings with user and movie side information.

    Args:
        root: folder with ``u.data``, ``u.item``, ``u.user`` (or its parent).
        download: download the official zip when no local copy is found.
        sha256: optional SHA-256 the downloaded zip must also match.
        verify: check the row counts (100,000 ratings, 943 users, 1,682 movies); ``false``
            reads a partial or edited copy.
    """

    def _find(self, root: str | None) -> Path | None:
        return find_root(root)

    def _download(self, dest: Path, sha256: str | None) -> Path:
        return download(dest, sha256)

    def _read(self, folder: Path) -> InteractionTable:
        data = self._frame(folder / "u.data", ROWS["u.data"], sep="\t",
                           names=["user", "item", "rating", "timestamp"])
        users_raw = self._frame(folder / "u.user", ROWS["u.user"], sep="|", encoding="latin-1",
                                names=["user", "age", "gender", "occupation", "zip"])
        items_raw = self._frame(folder / "u.item", ROWS["u.item"], sep="|", encoding="latin-1",
                                names=["item", "title", "release", "video", "url",
                                       *[f"g{i}" for i in range(GENRES)]])
        user_ids = numeric_column(users_raw, "user", integer=True, minimum=1)
        item_ids = numeric_column(items_raw, "item", integer=True, minimum=1)
        u = numeric_column(data, "user", integer=True, minimum=1)
        i = numeric_column(data, "item", integer=True, minimum=1)
        rating = numeric_column(data, "rating", minimum=1, maximum=5)
        ts = numeric_column(data, "timestamp", integer=True, minimum=0)
        users, user_keys = index_ids(data, "user", u, users_raw, user_ids)
        items, item_keys = index_ids(data, "item", i, items_raw, item_ids)
        uorder = np.argsort(user_ids)  # file rows in contiguous-id order
        iorder = np.argsort(item_ids)
        genres = np.stack([numeric_column(items_raw, f"g{g}", integer=True, minimum=0, maximum=1)
                           for g in range(GENRES)], axis=1)[iorder]
        return InteractionTable(
            users=users, items=items, labels=rating, timestamps=ts,
            num_users=len(user_keys), num_items=len(item_keys),
            user_features=user_features(
                numeric_column(users_raw, "age", integer=True, minimum=0)[uorder],
                users_raw["gender"].to_numpy()[uorder],
                users_raw["occupation"].to_numpy()[uorder], users_raw["zip"].to_numpy()[uorder]),
            item_features=item_features(genres, items_raw["release"].str[-4:].to_numpy()[iorder]),
            feedback="explicit", rating_range=(1.0, 5.0), user_keys=user_keys,
            item_keys=item_keys, source=str(folder),
        )
