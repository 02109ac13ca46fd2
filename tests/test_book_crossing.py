"""Book-Crossing plugin on fixture files in the dump's exact format (``;``, ``"``-quoted with
``\\"`` escapes, ISO-8859-1, NULL ages), written into tmp_path: explicit / implicit feedback,
features, the filter report, malformed rows (file, line, field), zip and folder lookup."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from metarec import DataError, build
from metarec.data import FilterReport
from metarec_plugins.datasets import book_crossing
from metarec_plugins.datasets.book_crossing import BookCrossing

RATINGS = '''"User-ID";"ISBN";"Book-Rating"
"2";"0195153448";"0"
"7";"034545104X";"5"
"7";"0195153448";"8"
"8";"0002005018";"0"
"8";"034545104x";"9"
"9";"0002005018";"6"
"9";"9999999999";"7"
"11";"0195153448";"3"
"12";"0002005018";"10"
"99";"0195153448";"4"
"7";"034545104x";"6"
'''
USERS = '''"User-ID";"Location";"Age"
"2";"stockton, california, usa";"18"
"7";"münchen, bayern, germany";NULL
"8";"timmins, ontario, canada";"0"
"9";"porto, porto, portugal";"34"
"11";"nyc, new york, usa";"244"
"12";"köln, nrw, germany";"61"
'''
BOOKS = '''"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";"Image-URL-S";"Image-URL-M";"Image-URL-L"
"0195153448";"Classical Mythology";"Mark P. O. Morford";"2002";"Oxford University Press";"s";"m";"l"
"0002005018";"Clara Callan";"Richard Bruce Wright";"2001";"HarperFlamingo Canada";"s";"m";"l"
"034545104X";"The \\"Lovely\\" Bones: A Novel";"Alice Sebold";"0";"Little, Brown";"s";"m";"l"
"0060973129";"Decision in Normandy";"Carlo D'Este";"1991";"Oxford University Press";"s";"m";"l"
'''


def _write(folder: Path, ratings: str = RATINGS, users: str = USERS, books: str = BOOKS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in zip(book_crossing.FILES, (ratings, users, books), strict=True):
        (folder / name).write_bytes(text.encode("latin-1"))
    return folder


@pytest.fixture
def bx(tmp_path) -> Path:
    return _write(tmp_path / "BX-CSV-Dump")


def _load(root: Path, **kwargs):
    return BookCrossing(root=str(root), min_count=1, **kwargs).load()


def _feature(table, key):
    (found,) = [f for f in table.user_features + table.item_features if f.spec.key == key]
    return found


def _rows(t):
    return sorted(zip(t.user_keys[t.users].tolist(), t.item_keys[t.items].tolist(),
                      t.labels.tolist(), strict=True))


def test_explicit_keeps_ratings_1_to_10_of_known_users_and_books(bx):
    t = _load(bx)
    assert t.feedback == "explicit" and t.rating_range == (1.0, 10.0)
    # Rating-0 rows dropped; ISBN 9999999999 is not in BX-Books.csv; user 99 not in
    # BX-Users.csv; 034545104x is 034545104X, so user 7's last rating of it (6) is kept.
    assert _rows(t) == [(7, "0195153448", 8.0), (7, "034545104X", 6.0),
                        (8, "034545104X", 9.0), (9, "0002005018", 6.0),
                        (11, "0195153448", 3.0), (12, "0002005018", 10.0)]
    assert t.user_keys.tolist() == [7, 8, 9, 11, 12]
    assert t.item_keys.tolist() == ["0002005018", "0195153448", "034545104X"]
    # No timestamps in the dump: file order.
    assert (np.diff(t.timestamps) > 0).all()


def test_implicit_keeps_every_row_as_a_positive(bx):
    t = _load(bx, feedback="implicit")
    assert t.feedback == "implicit" and t.rating_range is None
    assert set(t.labels.tolist()) == {1.0}
    assert len(t) == 8  # 11 rows less the unknown ISBN, the unknown user and the repeat
    assert t.user_keys.tolist() == [2, 7, 8, 9, 11, 12]


def test_user_features_age_buckets_with_null_and_country(bx):
    t = _load(bx, feedback="implicit")  # users 2, 7, 8, 9, 11, 12
    age = _feature(t, "user.age")
    assert age.spec.cardinality == len(book_crossing.AGE_EDGES) + 2
    # 18 -> 18-24 (2); NULL, 0 and 244 -> unknown (0); 34 -> 25-34 (3); 61 -> 55-64 (6).
    assert age.values.tolist() == [2, 0, 0, 3, 0, 6]
    country = _feature(t, "user.country")
    # germany (2 users) first, then by name: canada, portugal, usa (2 users) -> by count.
    assert country.spec.cardinality == 5
    codes = dict(zip(t.user_keys.tolist(), country.values.tolist(), strict=True))
    assert codes[7] == codes[12] and codes[2] == codes[11] and codes[7] != codes[2]
    assert len(set(codes.values())) == 4 and 0 not in codes.values()


def test_item_features_year_author_publisher(bx):
    t = _load(bx)  # items 0002005018, 0195153448, 034545104X
    year = _feature(t, "item.year")
    assert year.values[2] == 0  # year "0": unknown
    assert year.values[0] != year.values[1] and min(year.values[:2]) > 0
    author = _feature(t, "item.author")
    assert len(set(author.values.tolist())) == 3 and author.spec.cardinality == 4
    publisher = _feature(t, "item.publisher")
    assert publisher.values.min() > 0  # "Little, Brown" keeps its comma inside quotes


def test_rare_values_share_code_0(bx):
    t = BookCrossing(root=str(bx), feedback="implicit", min_count=2).load()
    codes = dict(zip(t.user_keys.tolist(), _feature(t, "user.country").values.tolist(),
                     strict=True))
    assert codes[8] == codes[9] == 0  # canada, portugal: one user each
    assert codes[7] > 0 and codes[2] > 0
    capped = BookCrossing(root=str(bx), feedback="implicit", min_count=1, max_vocab=1).load()
    assert _feature(capped, "user.country").spec.cardinality == 2


def test_filter_report_is_printed_once(bx, capsys, monkeypatch):
    monkeypatch.setattr(FilterReport, "_printed", set())
    _load(bx)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines == [
        f"{bx}: 7 users, 4 items, 11 rows",
        "  feedback=explicit (ratings 1-10): dropped 1 users, 0 items, 2 rows; kept 6, 4, 9",
        "  ISBN not in BX-Books.csv: dropped 0 users, 1 items, 1 rows; kept 6, 3, 8",
        "  User-ID not in BX-Users.csv: dropped 1 users, 0 items, 1 rows; kept 5, 3, 7",
        "  repeated (User-ID, ISBN): all but the last: dropped 0 users, 0 items, 1 rows; "
        "kept 5, 3, 6",
    ]
    _load(bx)
    assert capsys.readouterr().err == ""  # the same report is not printed twice


def test_registered_as_book_crossing(bx):
    assert isinstance(build("datasets", "book-crossing", {"root": str(bx)}), BookCrossing)


def _replace_line(text: str, lineno: int, line: str) -> str:
    lines = text.splitlines()
    lines[lineno - 1] = line
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("file,lineno,line,field,needle", [
    ("BX-Book-Ratings.csv", 3, '"7";"034545104X";"11"', "Book-Rating", "in [0, 10]"),
    ("BX-Book-Ratings.csv", 3, '"7";"034545104X";"ten"', "Book-Rating", "'ten'"),
    ("BX-Book-Ratings.csv", 3, '"x7";"034545104X";"5"', "User-ID", "'x7'"),
    ("BX-Book-Ratings.csv", 3, '"7";"";"5"', "ISBN", "empty id"),
    ("BX-Book-Ratings.csv", 3, '"7";"034545104X";"5";"1"', None, "expected 3 fields, found 4"),
    ("BX-Book-Ratings.csv", 3, '"7";"034545104X"', None, "expected 3 fields, found 2"),
    ("BX-Users.csv", 3, '"7";"münchen, bayern, germany";"abc"', "Age", "'abc'"),
    ("BX-Users.csv", 3, '"2";"münchen, bayern, germany";NULL', "User-ID", "listed twice"),
    ("BX-Books.csv", 3, '"0002005018";"Clara Callan";"Richard Bruce Wright";"2001"', None,
     "expected 8 fields, found 4"),
])
def test_malformed_rows_name_file_line_field(tmp_path, file, lineno, line, field, needle):
    texts = dict(zip(("ratings", "users", "books"), (RATINGS, USERS, BOOKS), strict=True))
    key = ("ratings", "users", "books")[book_crossing.FILES.index(file)]
    texts[key] = _replace_line(texts[key], lineno, line)
    folder = _write(tmp_path / "bx", **texts)
    with pytest.raises(DataError) as info:
        _load(folder)
    err = info.value
    assert (err.source, err.line, err.field) == (str(folder / file), lineno, field)
    assert f"{folder / file}:{lineno}" in str(err) and needle in str(err)
    if "fields" in needle:
        assert "bad_rows: skip" in str(err)


def test_bad_rows_skip_leaves_them_out_and_reports_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(FilterReport, "_printed", set())
    # The dump's known fault: a title ending in \" swallows the author (7 fields, not 8).
    broken = ('"0002005018";"Clara Callan\\";"Richard Bruce Wright";"2001";'
              '"HarperFlamingo Canada";"s";"m";"l"')
    folder = _write(tmp_path / "bx", books=_replace_line(BOOKS, 3, broken))
    with pytest.raises(DataError, match="expected 8 fields, found 7"):
        _load(folder)
    t = _load(folder, bad_rows="skip")
    assert "0002005018" not in t.item_keys.tolist()  # its ratings are dropped with it
    err = capsys.readouterr().err
    assert "bad_rows=skip: BX-Books.csv: skipped 1 malformed row(s), lines 3" in err


def test_zip_as_root_or_in_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("METAREC_DATA", raising=False)
    archive = tmp_path / "downloads" / book_crossing.ZIP
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, text in zip(book_crossing.FILES, (RATINGS, USERS, BOOKS), strict=True):
            zf.writestr(name, text.encode("latin-1"))
    cache = tmp_path / "home" / ".cache" / "metarec" / "book-crossing"
    assert book_crossing.locate(str(archive)) == cache
    assert len(_load(archive)) == 6
    # A folder holding the zip (here via METAREC_DATA) is unpacked into the cache too.
    monkeypatch.setenv("METAREC_DATA", str(archive.parent))
    assert len(BookCrossing(min_count=1).load()) == 6
    assert sorted(p.name for p in cache.iterdir()) == sorted([".source", *book_crossing.FILES])


def test_not_found_says_there_is_no_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("METAREC_DATA", str(tmp_path / "data"))
    with pytest.raises(DataError) as info:
        BookCrossing(root=str(tmp_path / "mine")).load()
    message = str(info.value)
    assert "offline" in message and "nothing is downloaded" in message
    for where in (tmp_path / "mine", tmp_path / "data" / "book-crossing",
                  tmp_path / "home" / ".cache" / "metarec" / "book-crossing"):
        assert str(where) in message


def test_not_a_zip(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    bad = tmp_path / "BX-CSV-Dump.zip"
    bad.write_text("not a zip")
    with pytest.raises(DataError, match="not a readable zip") as info:
        BookCrossing(root=str(bad)).load()
    assert info.value.source == str(bad)
