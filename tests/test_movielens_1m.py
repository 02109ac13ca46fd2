"""MovieLens-1M plugin on small fixture files in the release's exact format (``::`` fields,
latin-1 titles), written into tmp_path: parsing, features, row-count verification, malformed
rows (file, line, field), lookup order and download (network monkeypatched)."""

from __future__ import annotations

import hashlib
import io
import shutil
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from metarec import DataError, build
from metarec_plugins.datasets import movielens_1m
from metarec_plugins.datasets.movielens_1m import MovieLens1M

RATINGS = """1::1::5::978300760
1::73::3::978302109
2::1::4::978298413
2::2::2::978299026
2::1922::5::978299100
3::73::1::978297867
4::5::4::978294008
5::2::3::978244177
"""
USERS = """1::F::1::10::48067
2::M::56::16::70072
3::M::25::15::55117
4::M::45::7::02460
5::F::18::20::98107-2117
"""
MOVIES = """1::Toy Story (1995)::Animation|Children's|Comedy
2::Jumanji (1995)::Adventure|Children's|Fantasy
73::Misérables, Les (1995)::Drama|Musical
1922::"Great Performances" Cats (1998)::Musical
5::Untitled Film Without A Year::Comedy
9::Ça ne se refuse pas (1998)::Drama
"""


def _write(folder: Path, ratings: str = RATINGS, users: str = USERS,
           movies: str = MOVIES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_bytes(ratings.encode("latin-1"))
    (folder / "users.dat").write_bytes(users.encode("latin-1"))
    (folder / "movies.dat").write_bytes(movies.encode("latin-1"))
    return folder


@pytest.fixture
def ml1m(tmp_path) -> Path:
    return _write(tmp_path / "ml-1m")


def _load(folder: Path, **kwargs):
    return MovieLens1M(root=str(folder), download=False, verify=False, **kwargs).load()


def _feature(table, key):
    (found,) = [f for f in table.user_features + table.item_features if f.spec.key == key]
    return found


def test_reads_ratings_users_and_rated_movies(ml1m):
    t = _load(ml1m)
    assert (len(t), t.num_users, t.num_items) == (8, 5, 5)
    assert t.user_keys.tolist() == [1, 2, 3, 4, 5]
    # Movie 9 is in movies.dat but never rated: not an item.
    assert t.item_keys.tolist() == [1, 2, 5, 73, 1922]
    rows = list(zip(t.user_keys[t.users].tolist(), t.item_keys[t.items].tolist(),
                    t.labels.tolist(), t.timestamps.tolist(), strict=True))
    assert rows[0] == (1, 1, 5.0, 978300760) and rows[-1] == (5, 2, 3.0, 978244177)
    assert t.feedback == "explicit" and t.rating_range == (1.0, 5.0)
    assert t.source == str(ml1m)


def test_user_features(ml1m):
    t = _load(ml1m)
    # Age codes 1, 56, 25, 45, 18 -> the seven groups, as for MovieLens-100K.
    assert _feature(t, "user.age").values.tolist() == [0, 6, 2, 4, 1]
    assert _feature(t, "user.age").spec.cardinality == 7
    assert _feature(t, "user.gender").values.tolist() == [0, 1, 1, 1, 0]  # F < M
    # Occupation codes 10, 16, 15, 7, 20, encoded in numeric (not text) order.
    assert _feature(t, "user.occupation").values.tolist() == [1, 3, 2, 0, 4]
    assert _feature(t, "user.zip").values.tolist() == [4, 7, 5, 0, 9]


def test_item_features_genres_and_year(ml1m):
    t = _load(ml1m)
    genre = _feature(t, "item.genre")
    assert genre.spec.cardinality == 18
    names = movielens_1m.GENRES

    def genres_of(raw):
        row = genre.values[int(np.flatnonzero(t.item_keys == raw)[0])]
        return sorted(names[g] for g in np.flatnonzero(row))

    assert genres_of(1) == ["Animation", "Children's", "Comedy"]
    assert genres_of(73) == ["Drama", "Musical"]  # latin-1 title "Misérables, Les (1995)"
    assert genres_of(1922) == ["Musical"]  # a title that starts with a quote
    year = _feature(t, "item.year")
    # Items 1, 2, 5, 73, 1922: 1995, 1995, unknown (sorts last), 1995, 1998.
    assert year.values.tolist() == [0, 0, 2, 0, 1] and year.spec.cardinality == 3


def test_registered_as_movielens_1m(ml1m):
    plugin = build("datasets", "movielens-1m", {"root": str(ml1m), "download": False,
                                                "verify": False})
    assert isinstance(plugin, MovieLens1M) and len(plugin.load()) == 8


def test_verify_checks_the_release_row_counts(ml1m, monkeypatch):
    with pytest.raises(DataError) as info:
        MovieLens1M(root=str(ml1m), download=False).load()
    err = info.value
    assert err.source == str(ml1m / "ratings.dat")
    assert "8 rows where MovieLens-1M's ratings.dat has 1,000,209" in str(err)
    assert "verify: false" in str(err)
    # With counts that match, every file passes; one short file is named.
    monkeypatch.setattr(movielens_1m, "ROWS", {"ratings.dat": 8, "users.dat": 5, "movies.dat": 6})
    assert len(MovieLens1M(root=str(ml1m), download=False).load()) == 8
    (ml1m / "movies.dat").write_bytes(MOVIES.rsplit("\n", 2)[0].encode("latin-1") + b"\n")
    with pytest.raises(DataError, match="5 rows where MovieLens-1M's movies.dat has 6") as info:
        MovieLens1M(root=str(ml1m), download=False).load()
    assert info.value.source == str(ml1m / "movies.dat")


def _replace_line(text: str, lineno: int, line: str) -> str:
    lines = text.splitlines()
    lines[lineno - 1] = line
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("file,lineno,line,field,needle", [
    ("ratings.dat", 3, "2::1::x::978298413", "rating", "'x'"),
    ("ratings.dat", 3, "2::1::6::978298413", "rating", "in [1, 5]"),
    ("ratings.dat", 3, "2::1::4.5::978298413", "rating", "expected an integer"),
    ("ratings.dat", 3, "2::1::4::978298413::7", None, "expected 4 fields, found 5"),
    ("ratings.dat", 3, "2::1::4::1e30", "timestamp", "fits a 64-bit integer"),
    ("ratings.dat", 3, "9::1::4::978298413", "user", "user id 9 is not listed in users.dat"),
    ("ratings.dat", 3, "2::9999::4::978298413", "item", "item id 9999 is not listed in movies.dat"),
    ("users.dat", 2, "2::M::57::16::70072", "age", "age code 57 is not one of"),
    ("users.dat", 2, "2::M::56::21::70072", "occupation", "in [0, 20]"),
    ("users.dat", 2, "1::M::56::16::70072", "user", "user id 1 is listed twice"),
    ("movies.dat", 3, "73::Misérables, Les (1995)::Drama|Musicals", "genres",
     "unknown genre 'Musicals'"),
    ("movies.dat", 3, "73::Misérables, Les (1995)", None, "expected 3 fields, found 2"),
])
def test_malformed_rows_name_file_line_field(tmp_path, file, lineno, line, field, needle):
    texts = {"ratings": RATINGS, "users": USERS, "movies": MOVIES}
    key = file.split(".")[0]
    texts[key] = _replace_line(texts[key], lineno, line)
    folder = _write(tmp_path / "ml-1m", **texts)
    with pytest.raises(DataError) as info:
        _load(folder)
    err = info.value
    assert (err.source, err.line, err.field) == (str(folder / file), lineno, field)
    assert f"{folder / file}:{lineno}" in str(err) and needle in str(err)


def test_undecodable_ratings_file_is_named(tmp_path):
    # ratings.dat is ASCII (read as UTF-8): a stray latin-1 byte is reported with the file.
    folder = _write(tmp_path / "ml-1m")
    (folder / "ratings.dat").write_bytes(RATINGS.encode() + b"6::1::4::97\xe9\n")
    with pytest.raises(DataError, match="not valid utf-8") as info:
        _load(folder)
    assert info.value.source == str(folder / "ratings.dat")


def test_empty_file_is_named(ml1m):
    (ml1m / "users.dat").write_bytes(b"")
    with pytest.raises(DataError, match="empty") as info:
        _load(ml1m)
    assert info.value.source == str(ml1m / "users.dat")


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("METAREC_DATA", raising=False)
    root = _write(tmp_path / "root" / "ml-1m")
    env = _write(tmp_path / "env" / "ml-1m")
    cache = _write(tmp_path / "home" / ".cache" / "metarec" / "ml-1m")
    plugin = MovieLens1M(download=False, verify=False)
    assert plugin._find(str(root)) == root
    assert plugin._find(str(root.parent)) == root  # the parent of ml-1m/
    monkeypatch.setenv("METAREC_DATA", str(env.parent))
    assert plugin._find(None) == env
    monkeypatch.setenv("METAREC_DATA", str(env))  # a folder holding the files itself
    assert plugin._find(None) == env
    monkeypatch.setenv("METAREC_DATA", str(tmp_path / "nowhere"))
    assert plugin._find(None) == cache
    shutil.rmtree(cache)
    with pytest.raises(DataError) as info:
        plugin.load()
    message = str(info.value)
    assert "MovieLens-1M files (ratings.dat, users.dat, movies.dat) not found" in message
    assert str(cache) in message and str(tmp_path / "nowhere" / "ml-1m") in message


def _zip(tmp_path: Path) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", RATINGS.encode("latin-1"))
        zf.writestr("ml-1m/users.dat", USERS.encode("latin-1"))
        zf.writestr("ml-1m/movies.dat", MOVIES.encode("latin-1"))
        zf.writestr("ml-1m/README", "fake")
    path = tmp_path / "served.zip"
    path.write_bytes(buffer.getvalue())
    return path


def test_download_into_the_cache(tmp_path, monkeypatch):
    served = _zip(tmp_path)
    calls = []

    def urlretrieve(url, filename):
        calls.append(url)
        shutil.copyfile(served, filename)
        return str(filename), None

    monkeypatch.setattr(urllib.request, "urlretrieve", urlretrieve)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("METAREC_DATA", raising=False)
    # The published MD5 does not match the fake zip: nothing is extracted.
    assert movielens_1m.MD5 == "c4d9eecfca2ab87c1945afe126590906"
    with pytest.raises(DataError, match="checksum mismatch"):
        MovieLens1M(verify=False).load()
    cache = tmp_path / "home" / ".cache" / "metarec"
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(movielens_1m, "MD5", hashlib.md5(served.read_bytes()).hexdigest())
    table = MovieLens1M(verify=False).load()
    assert calls == [movielens_1m.URL] * 2
    assert sorted(p.name for p in (cache / "ml-1m").iterdir()) == sorted(movielens_1m.FILES)
    assert len(table) == 8
    MovieLens1M(verify=False).load()  # found in the cache: no second download
    assert len(calls) == 2
