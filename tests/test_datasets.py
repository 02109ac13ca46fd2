"""Dataset plugins: synthetic generator, MovieLens-100K (local, malformed, download), interactions."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metarec import DataError, InteractionTable
from metarec_plugins.datasets import movielens
from metarec_plugins.datasets.interactions import InteractionsDataset
from metarec_plugins.datasets.movielens import MovieLens100K
from metarec_plugins.datasets.synthetic import SyntheticDataset

REPO = Path(__file__).resolve().parents[1]


def _ml100k_dir() -> Path | None:
    for base in (os.environ.get("METAREC_DATA"), REPO.parent / "shared" / "data"):
        if not base:
            continue
        for folder in (Path(base) / "ml-100k", Path(base)):
            if all((folder / f).is_file() for f in movielens.FILES):
                return folder
    return None


@pytest.fixture(scope="module")
def ml_dir() -> Path:
    folder = _ml100k_dir()
    if folder is None:
        pytest.skip("MovieLens-100K files not found: set $METAREC_DATA to a folder holding "
                    "ml-100k/ (u.data, u.item, u.user) or put it in ../shared/data")
    return folder


@pytest.fixture(scope="module")
def ml_table(ml_dir) -> InteractionTable:
    return MovieLens100K(root=str(ml_dir), download=False).load()


def _feature(table: InteractionTable, key: str):
    found = [f for f in table.user_features + table.item_features if f.spec.key == key]
    assert len(found) == 1, f"feature {key} missing or duplicated"
    return found[0]


def _row(table: InteractionTable, raw_user, raw_item) -> int:
    rows = np.flatnonzero((table.user_keys[table.users] == raw_user)
                          & (table.item_keys[table.items] == raw_item))
    assert len(rows) == 1, f"expected one row for ({raw_user}, {raw_item}), found {len(rows)}"
    return int(rows[0])


# --------------------------------------------------------------------------------------------
# synthetic


def _same(a: InteractionTable, b: InteractionTable) -> bool:
    arrays = ("users", "items", "labels", "timestamps")
    if any(not np.array_equal(getattr(a, n), getattr(b, n)) for n in arrays):
        return False
    return all(np.array_equal(fa.values, fb.values)
               for fa, fb in zip(a.user_features + a.item_features,
                                 b.user_features + b.item_features, strict=True))


def test_synthetic_is_deterministic_in_seed():
    kwargs = dict(num_users=80, num_items=50, min_interactions=5, max_interactions=20)
    a = SyntheticDataset(**kwargs, seed=3).load()
    b = SyntheticDataset(**kwargs, seed=3).load()
    c = SyntheticDataset(**kwargs, seed=4).load()
    assert _same(a, b)
    assert not _same(a, c)
    # Different seeds differ in the ratings themselves, not only in a few features.
    assert not (len(a) == len(c) and np.array_equal(a.labels, c.labels))


@pytest.mark.parametrize("n_users,n_items,lo,hi", [(50, 30, 3, 7), (120, 60, 15, 40), (10, 20, 20, 20)])
def test_synthetic_sizes_and_interaction_counts(n_users, n_items, lo, hi):
    table = SyntheticDataset(num_users=n_users, num_items=n_items, min_interactions=lo,
                             max_interactions=hi, seed=1).load()
    assert (table.num_users, table.num_items) == (n_users, n_items)
    counts = np.bincount(table.users, minlength=n_users)
    assert counts.min() >= lo and counts.max() <= hi
    assert counts.sum() == len(table)
    if hi - lo >= 4:  # uniform over the range: both halves of it occur
        assert counts.min() < (lo + hi) / 2 < counts.max()
    # No user rates an item twice; every item id is in range.
    pairs = table.users * n_items + table.items
    assert len(np.unique(pairs)) == len(table)
    assert table.items.min() >= 0 and table.items.max() < n_items
    # Ratings are whole stars in 1-5 and timestamps are strictly increasing.
    assert set(np.unique(table.labels)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert (np.diff(table.timestamps) > 0).all()
    assert table.feedback == "explicit" and table.rating_range == (1.0, 5.0)


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_interactions"):
        SyntheticDataset(num_items=10, min_interactions=5, max_interactions=11)
    with pytest.raises(ValueError, match="min_interactions"):
        SyntheticDataset(min_interactions=8, max_interactions=7)
    with pytest.raises(ValueError, match="feature_informativeness"):
        SyntheticDataset(feature_informativeness=1.5)


def test_synthetic_features_are_valid():
    table = SyntheticDataset(num_users=200, num_items=90, num_clusters=5, seed=2,
                             min_interactions=5, max_interactions=20).load()
    keys = {f.spec.key: f for f in table.user_features + table.item_features}
    assert set(keys) == {"user.segment", "user.region", "item.category", "item.style", "item.tags"}
    assert keys["user.segment"].spec.cardinality == 5
    for f in keys.values():
        owner_count = table.num_users if f.spec.owner == "user" else table.num_items
        assert len(f.values) == owner_count
        if f.spec.kind == "categorical":
            assert f.values.min() >= 0 and f.values.max() < f.spec.cardinality
            assert len(np.unique(f.values)) > 1
        else:
            assert f.values.shape == (owner_count, f.spec.cardinality)
            assert set(np.unique(f.values)) <= {0.0, 1.0}
            assert (f.values.sum(1) >= 1).all(), "every item carries at least one tag"
    schema = table.schema
    assert schema.num_users == 200 and schema.num_items == 90
    assert [s.key for s in schema.of("item")] == ["item.category", "item.style", "item.tags"]


def _mean_sq_disagreement(table: InteractionTable) -> np.ndarray:
    """(U, U) mean squared rating difference over co-rated items (and co-rated counts)."""
    r = np.zeros((table.num_users, table.num_items))
    m = np.zeros_like(r)
    r[table.users, table.items] = table.labels
    m[table.users, table.items] = 1.0
    sq = r ** 2
    total = sq @ m.T + m @ sq.T - 2 * r @ r.T
    common = m @ m.T
    return total / np.maximum(common, 1), common


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_users_of_a_cluster_agree(seed):
    kwargs = dict(num_users=300, num_items=100, min_interactions=30, max_interactions=60,
                  seed=seed)
    # With feature_informativeness=1 the segment feature *is* the latent cluster; the RNG stream
    # is consumed identically whatever the informativeness, so the ratings are the same.
    revealed = SyntheticDataset(**kwargs, feature_informativeness=1.0).load()
    default = SyntheticDataset(**kwargs).load()
    assert np.array_equal(revealed.labels, default.labels), \
        "ratings must not depend on feature_informativeness (test relies on it)"
    cluster = revealed.user_features[0].values

    msd, common = _mean_sq_disagreement(revealed)
    iu = np.triu_indices(revealed.num_users, 1)
    ok = common[iu] >= 5

    def gap(labels):
        same = (labels[:, None] == labels[None, :])[iu]
        return msd[iu][ok & same].mean(), msd[iu][ok & ~same].mean()

    same, diff = gap(cluster)
    assert same < 0.7 * diff, f"same-cluster disagreement {same:.3f} vs other {diff:.3f}"
    # Control: a random relabelling of users shows no such gap.
    same_p, diff_p = gap(np.random.default_rng(seed).permutation(cluster))
    assert 0.9 < same_p / diff_p < 1.1

    # Default informativeness 0.25: segment == cluster for 25% + 75%/4 of users.
    seg = default.user_features[0].values
    assert abs((seg == cluster).mean() - (0.25 + 0.75 / 4)) < 0.09
    assert (seg == cluster).mean() < 0.7


def _eta_squared(y: np.ndarray, groups: np.ndarray) -> float:
    """Share of the variance of ``y`` explained by group means."""
    means = np.bincount(groups, y) / np.maximum(np.bincount(groups), 1)
    return float(((means[groups] - y.mean()) ** 2).sum() / ((y - y.mean()) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_ratings_depend_on_item_features(seed):
    table = SyntheticDataset(num_users=300, num_items=100, seed=seed,
                             feature_informativeness=1.0).load()
    y = table.labels.astype(np.float64)
    assert y.std() > 0.5 and len(np.unique(y)) >= 4
    category = table.item_features[0].values[table.items]
    shuffle = np.random.default_rng(seed).permutation

    observed = _eta_squared(y, category)
    assert observed > 0.05 and observed > 20 * _eta_squared(y, shuffle(category))
    # Beyond a per-category bias, how a user rates a category depends on the user's taste
    # cluster: the item features determine the item's latent factors.
    residual = y - (np.bincount(category, y) / np.bincount(category))[category]
    cluster = table.user_features[0].values[table.users]
    cell = cluster * table.item_features[0].spec.cardinality + category
    interaction = _eta_squared(residual, cell)
    assert interaction > 0.15 and interaction > 20 * _eta_squared(residual, shuffle(cell))


# --------------------------------------------------------------------------------------------
# MovieLens-100K: the real files


def test_movielens_counts_and_cardinalities(ml_table):
    t = ml_table
    assert len(t) == 100_000
    assert (t.num_users, t.num_items) == (943, 1682)
    assert len(np.unique(t.users)) == 943 and len(np.unique(t.items)) == 1682
    assert np.array_equal(t.user_keys, np.arange(1, 944))
    assert np.array_equal(t.item_keys, np.arange(1, 1683))
    card = {f.spec.key: (f.spec.kind, f.spec.cardinality) for f in t.user_features + t.item_features}
    assert card["item.genre"] == ("multihot", 19)
    assert card["user.age"] == ("categorical", len(movielens.AGE_EDGES) + 1)
    assert card["user.occupation"] == ("categorical", 21)
    assert card["user.gender"] == ("categorical", 2)
    # Every age bucket occurs, and occupation codes cover all 21 occupations.
    assert len(np.unique(_feature(t, "user.age").values)) == 7
    assert len(np.unique(_feature(t, "user.occupation").values)) == 21
    assert np.unique(t.labels).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert t.feedback == "explicit" and t.rating_range == (1.0, 5.0)
    # Every user in MovieLens-100K has at least 20 ratings.
    assert np.bincount(t.users).min() == 20


def test_movielens_known_rows(ml_table):
    t = ml_table
    first = _row(t, 196, 242)  # u.data line 1: 196 242 3 881250949
    assert t.labels[first] == 3.0 and t.timestamps[first] == 881250949
    last = _row(t, 12, 203)  # u.data last line: 12 203 3 879959583
    assert t.labels[last] == 3.0 and t.timestamps[last] == 879959583
    assert t.labels[_row(t, 186, 302)] == 3.0 and t.timestamps[_row(t, 186, 302)] == 891717742


def test_movielens_user_and_item_features(ml_dir, ml_table):
    t = ml_table
    occupations = sorted((ml_dir / "u.occupation").read_text(encoding="latin-1").split())
    assert len(occupations) == 21

    def user(raw):
        return int(np.flatnonzero(t.user_keys == raw)[0])

    # u.user: "1|24|M|technician|85711" (after the leading blank line), "2|53|F|other|94043".
    u1, u2 = user(1), user(2)
    age, gender = _feature(t, "user.age").values, _feature(t, "user.gender").values
    occ, zips = _feature(t, "user.occupation").values, _feature(t, "user.zip").values
    assert age[u1] == 1 and age[u2] == 5  # 18-24 and 50-55
    assert gender[u1] != gender[u2]
    assert gender[u1] == 1 and gender[u2] == 0  # codes of sorted ["F", "M"]
    assert occ[u1] == occupations.index("technician") and occ[u2] == occupations.index("other")
    assert zips[u1] == 8 and zips[u2] == 9
    # Ages on a bucket edge open the next bucket: 17 -> <18, 18 -> 18-24, 25 -> 25-34, 57 -> 56+.
    assert [age[user(raw)] for raw in (67, 52, 22, 7)] == [0, 1, 2, 6]
    # Last user: "943|22|M|student|77841".
    u943 = user(943)
    assert age[u943] == 1 and occ[u943] == occupations.index("student") and zips[u943] == 7

    genre = _feature(t, "item.genre").values
    genres = [line.split("|")[0] for line in
              (ml_dir / "u.genre").read_text(encoding="latin-1").splitlines() if line.strip()]
    toy_story = int(np.flatnonzero(t.item_keys == 1)[0])  # Animation|Children's|Comedy
    assert sorted(genres[g] for g in np.flatnonzero(genre[toy_story])) == \
        sorted(["Animation", "Children's", "Comedy"])
    year = _feature(t, "item.year").values
    # Codes follow the release year read straight from u.item: same year <=> same code,
    # and codes are ordered by year.
    release = {}
    for line in (ml_dir / "u.item").read_text(encoding="latin-1").splitlines():
        fields = line.split("|")
        release[int(fields[0])] = fields[2][-4:] if fields[2][-4:].isdigit() else "unknown"
    text = np.array([release[int(k)] for k in t.item_keys])
    assert len(np.unique(year)) == len(np.unique(text)) == _feature(t, "item.year").spec.cardinality
    for code in np.unique(year):
        assert len(np.unique(text[year == code])) == 1
    known = text != "unknown"
    order = np.argsort(year[known], kind="stable")
    assert (np.diff(text[known][order].astype(int)) >= 0).all()
    assert text[0] == "1995" and year[0] == year[1] == year[2] == year[3]
    # Item 267 has no release date: its year is the "unknown" category (sorts last).
    unknown = int(np.flatnonzero(t.item_keys == 267)[0])
    assert year[unknown] == _feature(t, "item.year").spec.cardinality - 1
    assert (year == year[unknown]).sum() == 1


def test_movielens_blank_line_in_u_user(ml_dir, tmp_path):
    lines = (ml_dir / "u.user").read_text(encoding="latin-1").splitlines()
    assert lines[0].strip() == "", "the shared copy of u.user is expected to start blank"
    folder = _copy_ml(ml_dir, tmp_path)
    # A bad age on file line 5 (user 4, counting the leading blank line) is reported at line 5.
    _edit_line(folder / "u.user", 5, "4|abc|M|technician|43537")
    with pytest.raises(DataError) as info:
        MovieLens100K(root=str(folder), download=False).load()
    err = info.value
    assert (err.source, err.line, err.field) == (str(folder / "u.user"), 5, "age")
    assert f"{folder / 'u.user'}:5" in str(err) and "'abc'" in str(err)


def test_movielens_root_may_be_the_parent(ml_dir, tmp_path, monkeypatch):
    folder = _copy_ml(ml_dir, tmp_path)
    monkeypatch.delenv("METAREC_DATA", raising=False)
    assert movielens.find_root(str(folder.parent)) == folder
    monkeypatch.setenv("METAREC_DATA", str(folder.parent))
    assert movielens.find_root(None) == folder


# --------------------------------------------------------------------------------------------
# MovieLens-100K: malformed copies


def _copy_ml(ml_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    for name in movielens.FILES:
        shutil.copyfile(ml_dir / name, folder / name)
    return folder


def _edit_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[lineno - 1] = text.encode("latin-1")
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("file,lineno,text,field,needle", [
    ("u.data", 7, "22\t377\tx\t878887116", "rating", "'x'"),
    ("u.data", 7, "22\t377\t6\t878887116", "rating", "'6'"),
    ("u.data", 7, "22\t377\t0\t878887116", "rating", "in [1, 5]"),
    ("u.data", 7, "22\t377\t1\t878887116\t9", None, "expected 4 fields, found 5"),
    ("u.data", 1, "196\t242\t3\t881250949\t9", None, "expected 4 fields, found 5"),
    ("u.data", 7, "22\t377\t1", None, "expected 4 fields, found 3"),
    ("u.data", 7, "22\t377\t1\t", "timestamp", "expected an integer"),
    ("u.data", 99999, "22\t377\t1\t-5", "timestamp", "'-5'"),
    ("u.data", 7, "999\t377\t1\t878887116", "user", "user id 999 is not listed in u.user"),
    ("u.data", 7, "22\t1683\t1\t878887116", "item", "item id 1683 is not listed in u.item"),
    ("u.data", 7, "22.5\t377\t1\t878887116", "user", "expected an integer"),
    ("u.item", 3, "3|Four Rooms (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|2|0|0|0|0|0|0|0|0|1|0",
     "g8", "'2'"),
    ("u.item", 4, "4|Get Shorty (1995)|01-Jan-1995||http://x|0|1", None,
     "expected 24 fields, found 7"),
    ("u.user", 10, "9|29|M|student|01002|extra", None, "expected 5 fields, found 6"),
])
def test_movielens_malformed_file_names_file_line_field(ml_dir, tmp_path, file, lineno, text,
                                                         field, needle):
    folder = _copy_ml(ml_dir, tmp_path)
    _edit_line(folder / file, lineno, text)
    with pytest.raises(DataError) as info:
        MovieLens100K(root=str(folder), download=False).load()
    err, message = info.value, str(info.value)
    assert err.source == str(folder / file)
    assert err.line == lineno
    assert err.field == field
    assert f"{folder / file}:{lineno}" in message
    if field:
        assert f"field {field!r}" in message
    assert needle in message


def test_movielens_missing_files_without_download(tmp_path, monkeypatch):
    monkeypatch.delenv("METAREC_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(DataError, match="not found"):
        MovieLens100K(root=str(tmp_path / "nowhere"), download=False).load()


# --------------------------------------------------------------------------------------------
# MovieLens-100K: download (network monkeypatched)

_TINY = {
    "u.data": "1\t1\t5\t100\n2\t1\t3\t101\n2\t2\t4\t102\n3\t2\t1\t103\n",
    "u.user": "1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n",
    "u.item": "".join(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|" + "|".join(
        "1" if g == i else "0" for g in range(19)) + "\n" for i in (1, 2)),
}


def _fake_zip(tmp_path: Path) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in _TINY.items():
            zf.writestr(f"ml-100k/{name}", text)
        zf.writestr("ml-100k/README", "fake")
    path = tmp_path / "served.zip"
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def fake_server(tmp_path, monkeypatch):
    """Serve a fake ml-100k.zip through a monkeypatched urlretrieve; records the calls."""
    served = _fake_zip(tmp_path)
    calls = []

    def urlretrieve(url, filename):
        calls.append(url)
        shutil.copyfile(served, filename)
        return str(filename), None

    monkeypatch.setattr(urllib.request, "urlretrieve", urlretrieve)
    return served, calls


def test_download_checksum_mismatch_leaves_nothing(tmp_path, fake_server, monkeypatch):
    served, calls = fake_server
    monkeypatch.setattr(movielens, "MD5", "0" * 32)
    parent = tmp_path / "cache"
    dest = parent / "ml-100k"
    with pytest.raises(DataError, match="checksum mismatch") as info:
        movielens.download(dest)
    assert calls == [movielens.URL]
    assert hashlib.md5(served.read_bytes()).hexdigest() in str(info.value)
    assert not dest.exists()
    assert list(parent.iterdir()) == [], "no temporary file or folder may be left behind"


def test_download_mismatch_keeps_an_existing_copy(tmp_path, fake_server, monkeypatch):
    monkeypatch.setattr(movielens, "MD5", "0" * 32)
    dest = tmp_path / "cache" / "ml-100k"
    dest.mkdir(parents=True)
    (dest / "u.data").write_text("old")
    with pytest.raises(DataError):
        movielens.download(dest)
    assert (dest / "u.data").read_text() == "old"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ml-100k"]


def test_download_sha256_mismatch(tmp_path, fake_server, monkeypatch):
    served, _ = fake_server
    monkeypatch.setattr(movielens, "MD5", hashlib.md5(served.read_bytes()).hexdigest())
    dest = tmp_path / "cache" / "ml-100k"
    with pytest.raises(DataError, match="SHA-256"):
        movielens.download(dest, sha256="f" * 64)
    assert list(dest.parent.iterdir()) == []


def test_download_matching_checksum_extracts(tmp_path, fake_server, monkeypatch):
    served, calls = fake_server
    blob = served.read_bytes()
    monkeypatch.setattr(movielens, "MD5", hashlib.md5(blob).hexdigest())
    dest = tmp_path / "cache" / "ml-100k"
    dest.mkdir(parents=True)
    (dest / "stale").write_text("replaced")
    out = movielens.download(dest, sha256=hashlib.sha256(blob).hexdigest().upper())
    assert out == dest
    for name, text in _TINY.items():
        assert (dest / name).read_text() == text
    assert not (dest / "stale").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ml-100k"]


def test_load_downloads_into_the_cache(tmp_path, fake_server, monkeypatch):
    served, calls = fake_server
    monkeypatch.setattr(movielens, "MD5", hashlib.md5(served.read_bytes()).hexdigest())
    monkeypatch.delenv("METAREC_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    table = MovieLens100K(root=None, download=True, verify=False).load()
    assert calls == [movielens.URL]
    assert (tmp_path / "home" / ".cache" / "metarec" / "ml-100k" / "u.data").is_file()
    assert (len(table), table.num_users, table.num_items) == (4, 3, 2)
    assert table.labels[_row(table, 3, 2)] == 1.0
    # Second load finds the cache and does not download again.
    MovieLens100K(root=None, download=True, verify=False).load()
    assert len(calls) == 1


def test_download_network_failure(tmp_path, monkeypatch):
    def fail(url, filename):
        raise OSError("no route to host")

    monkeypatch.setattr(urllib.request, "urlretrieve", fail)
    dest = tmp_path / "cache" / "ml-100k"
    with pytest.raises(DataError, match="download failed.*no route to host"):
        movielens.download(dest)
    assert list(dest.parent.iterdir()) == []


# --------------------------------------------------------------------------------------------
# interactions plugin

_LOG = pd.DataFrame({
    "uid": ["alice", "bob", "alice", "carol", "bob", "alice"],
    "mid": ["m1", "m2", "m3", "m1", "m1", "m2"],
    "stars": [5, 3, 4, 1, 2, 4.5],
    "when": [100, 105, 110, 120, 130, 140],
})


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False, sep="\t" if path.suffix == ".tsv" else ",")
    return path


def _dataset(path: Path, **kwargs) -> InteractionsDataset:
    args = dict(user_col="uid", item_col="mid", label_col="stars", timestamp_col="when")
    args.update(kwargs)
    return InteractionsDataset(str(path), **args)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_interactions_column_mapping(tmp_path, suffix):
    path = _write(_LOG, tmp_path / f"log{suffix}")
    table = _dataset(path).load()
    assert (len(table), table.num_users, table.num_items) == (6, 3, 3)
    assert table.user_keys.tolist() == ["alice", "bob", "carol"]
    assert table.item_keys.tolist() == ["m1", "m2", "m3"]
    got = list(zip(table.user_keys[table.users], table.item_keys[table.items],
                   table.labels.tolist(), table.timestamps.tolist(), strict=True))
    want = list(zip(_LOG.uid, _LOG.mid, map(float, _LOG.stars), _LOG.when, strict=True))
    assert got == want
    assert table.feedback == "explicit" and table.rating_range == (1.0, 5.0)
    assert table.source == str(path)


def test_interactions_csv_and_parquet_agree(tmp_path):
    a = _dataset(_write(_LOG, tmp_path / "log.csv")).load()
    b = _dataset(_write(_LOG, tmp_path / "log.parquet")).load()
    assert _same(a, b)


def test_interactions_implicit_without_timestamps(tmp_path):
    path = _write(_LOG[["uid", "mid"]], tmp_path / "clicks.csv")
    table = _dataset(path, label_col=None, timestamp_col=None, rating_range=None).load()
    assert table.feedback == "implicit" and table.rating_range is None
    assert table.labels.tolist() == [1.0] * 6
    assert table.timestamps.tolist() == list(range(6))  # row order is time order
    # rating_range is ignored (not applied) in implicit mode.
    table = _dataset(path, label_col=None, timestamp_col=None).load()
    assert table.rating_range is None and table.feedback == "implicit"


def test_interactions_feature_files(tmp_path):
    log = _write(_LOG, tmp_path / "log.csv")
    users = _write(pd.DataFrame({"user_id": ["carol", "alice", "dave"],
                                 "country": ["fr", "de", "fr"]}), tmp_path / "users.csv")
    items = pd.DataFrame({"movie": ["m2", "m1", "m9"],
                          "lang": ["en", "fr", "en"],
                          "genres": ["Drama|Comedy", "Action", ""]})
    items_path = _write(items, tmp_path / "items.parquet")
    table = _dataset(log, user_features={"path": str(users), "id_col": "user_id",
                                         "categorical": ["country"]},
                     item_features={"path": str(items_path), "id_col": "movie",
                                    "categorical": ["lang"], "multihot": {"genres": "|"}}).load()
    country = _feature(table, "user.country")
    assert country.spec.cardinality == 3  # <missing>, de, fr
    # alice -> de (code 1), bob is absent -> <missing> (0), carol -> fr (2)
    assert country.values.tolist() == [1, 0, 2]
    lang = _feature(table, "item.lang")
    assert lang.spec.cardinality == 3  # <missing>, en, fr
    assert lang.values.tolist() == [2, 1, 0]  # m1 fr, m2 en, m3 absent
    genres = _feature(table, "item.genres")
    assert genres.spec.kind == "multihot" and genres.spec.cardinality == 3  # Action Comedy Drama
    assert genres.values.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    assert table.schema.features == tuple(f.spec for f in table.user_features + table.item_features)


def test_interactions_numeric_ids_match_between_files(tmp_path):
    log = _write(pd.DataFrame({"user": [10, 2, 10], "item": [7, 7, 8], "rating": [1, 2, 3],
                               "timestamp": [1, 2, 3]}), tmp_path / "log.parquet")
    items = _write(pd.DataFrame({"item": [8, 7], "kind": ["b", "a"]}), tmp_path / "items.csv")
    table = InteractionsDataset(str(log), item_features={
        "path": str(items), "id_col": "item", "categorical": ["kind"]}).load()
    assert table.item_keys.tolist() == ["7", "8"]
    assert _feature(table, "item.kind").values.tolist() == [1, 2]


def test_interactions_missing_column(tmp_path):
    path = _write(_LOG.drop(columns="stars"), tmp_path / "log.csv")
    with pytest.raises(DataError) as info:
        _dataset(path).load()
    assert str(path) in str(info.value) and "'stars'" in str(info.value)
    assert info.value.source == str(path)


def test_interactions_missing_feature_column(tmp_path):
    log = _write(_LOG, tmp_path / "log.csv")
    users = _write(pd.DataFrame({"user_id": ["alice"], "country": ["de"]}), tmp_path / "u.csv")
    with pytest.raises(DataError) as info:
        _dataset(log, user_features={"path": str(users), "id_col": "user_id",
                                     "categorical": ["age"]}).load()
    assert str(users) in str(info.value) and "'age'" in str(info.value)


def test_interactions_bad_label_names_line(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("uid,mid,stars,when\n"
                    "alice,m1,5,100\n"
                    "\n"
                    "bob,m2,3,105\n"
                    "alice,m3,four,110\n")
    with pytest.raises(DataError) as info:
        _dataset(path).load()
    err = info.value
    assert (err.source, err.line, err.field) == (str(path), 5, "stars")
    assert f"{path}:5" in str(err) and "'four'" in str(err)


def test_interactions_bad_label_parquet_names_row(tmp_path):
    frame = _LOG.astype({"stars": str})
    frame.loc[3, "stars"] = "n/a"
    path = _write(frame, tmp_path / "log.parquet")
    with pytest.raises(DataError) as info:
        _dataset(path).load()
    assert (info.value.line, info.value.field) == (4, "stars")


def test_interactions_rating_out_of_range(tmp_path):
    path = _write(_LOG, tmp_path / "log.csv")
    with pytest.raises(DataError) as info:
        _dataset(path, rating_range=(1, 4)).load()
    err = info.value
    assert (err.line, err.field) == (2, "stars")  # the 5-star rating on the first data row
    assert "in [1, 4]" in str(err) and "'5.0'" in str(err) and "2 bad value(s)" in str(err)
    # Without a declared scale any finite label is accepted.
    assert _dataset(path, rating_range=None).load().labels.max() == 5.0


def test_interactions_wrong_field_count(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("uid,mid,stars,when\nalice,m1,5,100\nbob,m2,3,105,extra\n")
    with pytest.raises(DataError) as info:
        _dataset(path).load()
    assert info.value.line == 3 and "expected 4 fields, found 5" in str(info.value)
    # A long *first* row must not silently become an index that shifts every column.
    path.write_text("uid,mid,stars,when\nalice,m1,5,100,\nbob,m2,3,105\n")
    with pytest.raises(DataError) as info:
        _dataset(path).load()
    assert info.value.line == 2 and "expected 4 fields, found 5" in str(info.value)


def test_interactions_empty_id(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("uid,mid,stars,when\nalice,m1,5,100\nbob,,3,105\n")
    with pytest.raises(DataError) as info:
        _dataset(path).load()
    assert (info.value.line, info.value.field) == (3, "mid")


def test_interactions_duplicate_feature_id(tmp_path):
    log = _write(_LOG, tmp_path / "log.csv")
    items = tmp_path / "items.csv"
    items.write_text("movie,lang\nm1,en\nm2,fr\nm3,de\nm2,en\n")
    with pytest.raises(DataError) as info:
        _dataset(log, item_features={"path": str(items), "id_col": "movie",
                                     "categorical": ["lang"]}).load()
    err = info.value
    assert (err.source, err.line, err.field) == (str(items), 5, "movie")
    assert "duplicate item id 'm2'" in str(err)


def test_interactions_bad_feature_spec():
    with pytest.raises(ValueError, match="id_col"):
        InteractionsDataset("x.csv", user_features={"path": "u.csv"})
    with pytest.raises(ValueError, match="colour"):
        InteractionsDataset("x.csv", user_features={"path": "u.csv", "id_col": "u", "colour": 1})


def test_interactions_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as info:
        InteractionsDataset(str(tmp_path / "absent.csv")).load()
    assert str(tmp_path / "absent.csv") in str(info.value)


def test_interactions_repeated_pairs_error_keep_last_and_mean(tmp_path):
    from metarec import DataError
    from metarec_plugins.datasets.interactions import InteractionsDataset

    path = tmp_path / "log.csv"
    path.write_text("user,item,rating,timestamp\na,x,1,10\na,y,4,11\na,x,5,12\nb,x,2,13\n")
    with pytest.raises(DataError) as err:
        InteractionsDataset(str(path)).load()
    assert "log.csv:4" in str(err.value) and "already at line 2" in str(err.value)
    last = InteractionsDataset(str(path), duplicates="keep_last").load()
    assert len(last) == 3
    got = {(last.user_keys[u], last.item_keys[i]): float(r)
           for u, i, r in zip(last.users, last.items, last.labels)}
    assert got == {("a", "x"): 5.0, ("a", "y"): 4.0, ("b", "x"): 2.0}
    mean = InteractionsDataset(str(path), duplicates="mean").load()
    got = {(mean.user_keys[u], mean.item_keys[i]): float(r)
           for u, i, r in zip(mean.users, mean.items, mean.labels)}
    assert got == {("a", "x"): 3.0, ("a", "y"): 4.0, ("b", "x"): 2.0}
