"""Book-Crossing (Ziegler et al., 2005): the ``BX-CSV-Dump`` of 1,149,780 ratings of books.

Three files, ``;``-separated, quoted with ``"`` (``\\"`` inside a field), ISO-8859-1:
``BX-Book-Ratings.csv`` (User-ID, ISBN, Book-Rating: 0 = implicit, 1-10 explicit),
``BX-Users.csv`` (User-ID, Location, Age, possibly ``NULL``) and ``BX-Books.csv`` (ISBN,
title, author, year, publisher, image URLs).

``feedback: explicit`` keeps the 1-10 ratings (labels are the ratings); ``implicit`` keeps
every row as a positive (label 1). Ratings of books missing from BX-Books.csv or of users
missing from BX-Users.csv are dropped (the dump has many), as is all but the last of a
repeated (user, ISBN) pair; ISBNs are compared upper-cased. A report of what each rule
dropped is printed when the table is loaded.

Features: users' age bucket (``unknown`` for NULL or an age outside 5-100) and country (the
last part of Location); books' year of publication (``unknown`` when not a year in
1800-2005: the dump has 0 and typos), author and publisher. Country, author, publisher and
year are categorical ids over the values held by at least ``min_count`` users (books), the
``max_vocab`` most frequent; code 0 is missing or rare.

The original site is offline: nothing is downloaded. The dump is read from ``root`` (a folder
holding the three files or ``BX-CSV-Dump.zip``, or the zip itself), then ``$METAREC_DATA``
(its ``book-crossing/`` or ``BX-CSV-Dump/``, or itself), then ``~/.cache/metarec/book-crossing``
(where a zip is unpacked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from metarec import (
    DataError,
    Dataset,
    Feature,
    FeatureSpec,
    FilterReport,
    InteractionTable,
    PositiveInt,
    id_column,
    numeric_column,
    read_frame,
    require_columns,
)
from metarec_plugins.datasets import _files

FILES = ("BX-Book-Ratings.csv", "BX-Users.csv", "BX-Books.csv")
ZIP = "BX-CSV-Dump.zip"
NAME = "book-crossing"
AGE_EDGES = (18, 25, 35, 45, 55, 65)
AGE_RANGE = (5, 100)
YEAR_RANGE = (1800, 2005)


def locate(root: str | None) -> Path:
    """The folder holding the dump: found, or unpacked from a zip into the cache."""
    if root and Path(root).is_file():
        return _unpacked(Path(root))
    folders = _files.candidates(root, NAME, aliases=("BX-CSV-Dump",))
    for folder in folders:
        if _files.find_folder([folder], FILES):
            return folder
        if (folder / ZIP).is_file():
            return _unpacked(folder / ZIP)
    raise DataError(f"Book-Crossing files ({', '.join(FILES)}) or {ZIP} not found; looked in "
                    f"{', '.join(map(str, folders))}. The original site is offline, so nothing "
                    "is downloaded: set root: (or METAREC_DATA) to a folder or zip holding the "
                    "BX-CSV-Dump", source=str(root or "$METAREC_DATA"))


def _unpacked(archive: Path) -> Path:
    """``archive`` unpacked into the cache, reused while the same zip is given."""
    dest = _files.cache_dir(NAME)
    stat = archive.stat()
    stamp = f"{archive.resolve()} {stat.st_size} {stat.st_mtime_ns}"
    marker = dest / ".source"
    if not (marker.is_file() and marker.read_text() == stamp
            and _files.find_folder([dest], FILES)):
        _files.unpack(archive, dest, FILES)
        marker.write_text(stamp)
    return dest


class BookCrossing(Dataset):
    """Book-Crossing ratings with user and book side information (see the module docstring).

    Args:
        root: a folder holding the dump's three CSV files or ``BX-CSV-Dump.zip``, or the zip.
        feedback: ``explicit`` (ratings 1-10 only) or ``implicit`` (every row a positive).
        min_count: a country, author, publisher or year held by fewer users (books) is coded
            as rare (0).
        max_vocab: at most this many values of each of those features get their own code.
        bad_rows: ``error`` (a row with the wrong number of fields names its line) or
            ``skip`` (leave such rows out; the published BX-Books.csv has a few).
    """

    def __init__(self, root: str | None = None,
                 feedback: Literal["explicit", "implicit"] = "explicit",
                 min_count: PositiveInt = 5, max_vocab: PositiveInt = 1000,
                 bad_rows: Literal["error", "skip"] = "error") -> None:
        if feedback not in ("explicit", "implicit"):
            raise ValueError(f"feedback must be 'explicit' or 'implicit', got {feedback!r}")
        if bad_rows not in ("error", "skip"):
            raise ValueError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
        self.root, self.feedback, self.bad_rows = root, feedback, bad_rows
        self.min_count, self.max_vocab = int(min_count), int(max_vocab)

    def _read(self, path: Path, columns: list[str]) -> pd.DataFrame:
        try:
            frame = read_frame(path, sep=";", encoding="latin-1", escapechar="\\",
                               bad_lines=self.bad_rows)
        except DataError as err:
            if "fields" not in err.reason:
                raise
            raise DataError(f"{err.reason}; set bad_rows: skip to leave such rows out",
                            source=err.source, line=err.line) from None
        require_columns(frame, columns)
        return frame

    def load(self) -> InteractionTable:
        folder = locate(self.root)
        ratings = self._read(folder / FILES[0], ["User-ID", "ISBN", "Book-Rating"])
        users = self._read(folder / FILES[1], ["User-ID", "Location", "Age"])
        books = self._read(folder / FILES[2], ["ISBN", "Book-Author", "Year-Of-Publication",
                                               "Publisher"])
        user = numeric_column(ratings, "User-ID", integer=True, minimum=1)
        isbn = _isbns(ratings)
        rating = numeric_column(ratings, "Book-Rating", integer=True, minimum=0, maximum=10)
        user_ids = numeric_column(users, "User-ID", integer=True, minimum=1)
        _no_repeats(users, "User-ID", user_ids)
        book_ids = _isbns(books)
        _no_repeats(books, "ISBN", book_ids)

        item_code = np.unique(isbn, return_inverse=True)[1].ravel()
        report = FilterReport(str(folder), user, item_code)
        for frame in (ratings, users, books):
            if frame.attrs.get("skipped"):
                lines = frame.attrs["skipped"]
                report.note(f"bad_rows=skip: {Path(frame.attrs['source']).name}: skipped "
                            f"{len(lines):,} malformed row(s), lines "
                            f"{', '.join(map(str, lines[:5]))}{', ...' if len(lines) > 5 else ''}")
        if self.feedback == "explicit":
            report.apply("feedback=explicit (ratings 1-10)", rating > 0)
        report.apply(f"ISBN not in {FILES[2]}", np.isin(isbn, book_ids))
        keep = report.apply(f"User-ID not in {FILES[1]}", np.isin(user, user_ids))
        user_code = np.unique(user, return_inverse=True)[1].ravel()
        pair = user_code * (int(item_code.max(initial=0)) + 1) + item_code
        rows = np.flatnonzero(keep)
        latest = np.unique(pair[rows][::-1], return_index=True)[1]  # last of each pair
        last = np.zeros(len(pair), dtype=bool)
        last[rows[len(rows) - 1 - latest]] = True
        keep = report.apply("repeated (User-ID, ISBN): all but the last", last)
        report.print()

        user_keys, users_of = np.unique(user[keep], return_inverse=True)
        item_keys, items_of = np.unique(isbn[keep], return_inverse=True)
        explicit = self.feedback == "explicit"
        return InteractionTable(
            users=users_of, items=items_of,
            labels=rating[keep] if explicit else np.ones(len(users_of)),
            timestamps=np.flatnonzero(keep),  # no times in the dump: file order
            num_users=len(user_keys), num_items=len(item_keys),
            user_features=self._user_features(users, _rows_of(user_ids, user_keys)),
            item_features=self._item_features(books, _rows_of(book_ids, item_keys)),
            feedback=self.feedback, rating_range=(1.0, 10.0) if explicit else None,
            user_keys=user_keys, item_keys=item_keys, source=str(folder))

    def _user_features(self, users: pd.DataFrame, rows: np.ndarray) -> list[Feature]:
        raw = users["Age"].str.strip()
        null = raw.isin(["NULL", ""]).to_numpy()
        age = numeric_column(users.assign(Age=raw.where(~null, "-1")), "Age")
        known = ~null & (age >= AGE_RANGE[0]) & (age <= AGE_RANGE[1])
        bucket = np.where(known, np.searchsorted(AGE_EDGES, age, side="right") + 1, 0)
        country = users["Location"].str.rsplit(",", n=1).str[-1].str.strip().str.lower()
        country = country.where(~country.isin(["", "n/a"]), "")
        return [Feature(FeatureSpec("age", "user", "categorical", len(AGE_EDGES) + 2),
                        bucket[rows]),
                self._vocab("country", "user", country.to_numpy()[rows])]

    def _item_features(self, books: pd.DataFrame, rows: np.ndarray) -> list[Feature]:
        year = pd.to_numeric(books["Year-Of-Publication"], errors="coerce").to_numpy()
        valid = (year >= YEAR_RANGE[0]) & (year <= YEAR_RANGE[1])
        year_text = np.where(valid, np.nan_to_num(year).astype(np.int64).astype(str), "")
        return [self._vocab("year", "item", year_text[rows]),
                self._vocab("author", "item", books["Book-Author"].str.strip().to_numpy()[rows]),
                self._vocab("publisher", "item",
                            books["Publisher"].str.strip().to_numpy()[rows])]

    def _vocab(self, name: str, owner: str, values: np.ndarray) -> Feature:
        """Codes 1..V for the values (``""`` = missing) held at least ``min_count`` times,
        the ``max_vocab`` most frequent (ties by value); 0 for missing or rare."""
        keys, codes, counts = np.unique(values.astype(str), return_inverse=True,
                                        return_counts=True)
        counts[keys == ""] = 0
        order = np.lexsort((keys, -counts))  # most frequent first, ties by value
        order = order[counts[order] >= self.min_count][:self.max_vocab]
        code_of = np.zeros(len(keys), dtype=np.int64)
        code_of[order] = np.arange(1, len(order) + 1)
        return Feature(FeatureSpec(name, owner, "categorical", len(order) + 1),
                       code_of[codes.ravel()])


def _no_repeats(frame: pd.DataFrame, column: str, ids: np.ndarray) -> None:
    """A file listing users (books) must list each once: a repeat names its line."""
    _, first = np.unique(ids, return_index=True)
    if len(first) < len(ids):
        row = int(np.setdiff1d(np.arange(len(ids)), first)[0])
        raise DataError(f"{column} {ids[row]} is listed twice", source=frame.attrs["source"],
                        line=int(frame.attrs["line"][row]), field=column)


def _isbns(frame: pd.DataFrame) -> np.ndarray:
    """The ISBN column, stripped and upper-cased (``034545104x`` is ``034545104X``)."""
    id_column(frame, "ISBN")  # no empty ISBN
    return frame["ISBN"].astype(str).str.strip().str.upper().to_numpy().astype(str)


def _rows_of(ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The row of each of ``keys`` in ``ids`` (every key is there)."""
    order = np.argsort(ids, kind="stable")
    return order[np.searchsorted(ids, keys, sorter=order)]
