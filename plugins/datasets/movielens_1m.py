"""MovieLens-1M (GroupLens): 1,000,209 ratings (1-5 stars) by 6,040 users of 3,706 movies.

Files ``ratings.dat``, ``users.dat`` and ``movies.dat``, fields separated by ``::``
(``movies.dat`` is latin-1). Features as MovieLens-100K's: users' age bucket (the release's
own seven groups), gender, occupation (21 codes) and zip-code prefix; movies' 18 genres
(multi-hot) and release year (from the title, ``"Toy Story (1995)"``; ``unknown`` without
one). The items are the movies with at least one rating (3,706 of the 3,883 in movies.dat).

Lookup order as for MovieLens-100K: ``root`` (or its ``ml-1m/``), ``$METAREC_DATA`` (its
``ml-1m/``, or itself), ``~/.cache/metarec/ml-1m``, else the official zip is downloaded,
checked against the MD5 GroupLens publishes (and ``sha256`` when given) and extracted into
the cache. Local files are checked against the release's row counts (``verify: false``
reads a partial copy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from metarec import DataError, InteractionTable, numeric_column
from metarec_plugins.datasets import _files
from metarec_plugins.datasets.movielens import (
    MovieLensBase,
    index_ids,
    item_features,
    user_features,
)

URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
MD5 = "c4d9eecfca2ab87c1945afe126590906"  # published by GroupLens (ml-1m.zip.md5)
FILES = ("ratings.dat", "users.dat", "movies.dat")
ROWS = {"ratings.dat": 1_000_209, "users.dat": 6040, "movies.dat": 3883}
AGES = (1, 18, 25, 35, 45, 50, 56)  # the release's age codes: group lower bounds
GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
          "Thriller", "War", "Western")
_YEAR = r"\((\d{4})\)\s*$"


class MovieLens1M(MovieLensBase):
    """MovieLens-1M ratings with user and movie side information.

    Args:
        root: folder with ``ratings.dat``, ``users.dat``, ``movies.dat`` (or its parent).
        download: download the official zip when no local copy is found.
        sha256: optional SHA-256 the downloaded zip must also match.
        verify: check the row counts (1,000,209 ratings, 6,040 users, 3,883 movies);
            ``false`` reads a partial or edited copy.
    """

    title, name, files = "MovieLens-1M", "ml-1m", FILES

    def _download(self, dest: Path, sha256: str | None) -> Path:
        return _files.download(URL, dest, FILES, MD5, self.title, sha256)

    def _read(self, folder: Path) -> InteractionTable:
        data = self._frame(folder / "ratings.dat", ROWS["ratings.dat"], sep="::", quotechar=None,
                           names=["user", "item", "rating", "timestamp"])
        users_raw = self._frame(folder / "users.dat", ROWS["users.dat"], sep="::",
                                quotechar=None, encoding="latin-1",
                                names=["user", "gender", "age", "occupation", "zip"])
        movies = self._frame(folder / "movies.dat", ROWS["movies.dat"], sep="::",
                             quotechar=None, encoding="latin-1", names=["item", "title", "genres"])
        u = numeric_column(data, "user", integer=True, minimum=1)
        i = numeric_column(data, "item", integer=True, minimum=1)
        rating = numeric_column(data, "rating", integer=True, minimum=1, maximum=5)
        ts = numeric_column(data, "timestamp", integer=True, minimum=0)
        user_ids = numeric_column(users_raw, "user", integer=True, minimum=1)
        movie_ids = numeric_column(movies, "item", integer=True, minimum=1)
        users, user_keys = index_ids(data, "user", u, users_raw, user_ids)
        _, movie_keys = index_ids(data, "item", i, movies, movie_ids)
        # Items: the rated movies only, in id order.
        item_keys = np.unique(i)
        items = np.searchsorted(item_keys, i).astype(np.int64)
        urow = np.argsort(user_ids)  # users.dat row of each contiguous user id
        mrow = np.argsort(movie_ids)[np.searchsorted(movie_keys, item_keys)]
        age = numeric_column(users_raw, "age", integer=True)
        bad = ~np.isin(age, AGES)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"age code {age[row]} is not one of {list(AGES)}",
                            source=users_raw.attrs["source"],
                            line=int(users_raw.attrs["line"][row]), field="age")
        occupation = numeric_column(users_raw, "occupation", integer=True, minimum=0, maximum=20)
        year = movies["title"].str.extract(_YEAR)[0].fillna("unknown").to_numpy()
        return InteractionTable(
            users=users, items=items, labels=rating, timestamps=ts,
            num_users=len(user_keys), num_items=len(item_keys),
            user_features=user_features(age[urow], users_raw["gender"].to_numpy()[urow],
                                        occupation[urow], users_raw["zip"].to_numpy()[urow]),
            item_features=item_features(_genres(movies)[mrow], year[mrow]),
            feedback="explicit", rating_range=(1.0, 5.0), user_keys=user_keys,
            item_keys=item_keys, source=str(folder),
        )


def _genres(movies) -> np.ndarray:
    """(movies, 18) multi-hot genres of movies.dat's rows; an unknown genre names its line."""
    index = {g: j for j, g in enumerate(GENRES)}
    hot = np.zeros((len(movies), len(GENRES)), dtype=np.float32)
    for row, text in enumerate(movies["genres"].tolist()):
        for token in text.split("|"):
            if token not in index:
                raise DataError(f"unknown genre {token!r}; expected one of {', '.join(GENRES)}",
                                source=movies.attrs["source"],
                                line=int(movies.attrs["line"][row]), field="genres")
            hot[row, index[token]] = 1.0
    return hot
