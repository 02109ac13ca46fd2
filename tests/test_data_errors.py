"""Bad data files (issue 15): each is a DataError naming the file (and row and field where
there is one), never a pandas / numpy exception or a silent loss; through ``metarec fit`` it
is one line on stderr and exit status 2."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metarec import DataError, read_frame
from metarec.cli import MetarecCLI, main  # noqa: F401 - Lightning's log handlers bind stderr now
from metarec.data import FilterReport
from metarec_plugins.datasets import movielens
from metarec_plugins.datasets.interactions import InteractionsDataset
from metarec_plugins.datasets.movielens import MovieLens100K

LOG = "user,item,rating,timestamp\n1,10,5,100\n1,20,3,101\n2,10,4,102\n2,30,2,103\n"


@pytest.fixture(autouse=True)
def _fresh_reports(monkeypatch):
    monkeypatch.setattr(FilterReport, "_printed", set())


def _log(tmp_path: Path, text: str = LOG, name: str = "log.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["log.csv", "log.tsv", "log.parquet", "ratings.dat"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(DataError) as info:
        InteractionsDataset(str(path)).load()
    assert info.value.source == str(path) and "file is empty (0 bytes)" in str(info.value)


def test_blank_and_header_only_files(tmp_path):
    blank = _log(tmp_path, "\n\n", "blank.csv")
    with pytest.raises(DataError, match="holds no data") as info:
        read_frame(blank)
    assert info.value.source == str(blank)
    header = _log(tmp_path, "user,item,rating,timestamp\n", "header.csv")
    with pytest.raises(DataError, match="no data rows") as info:
        InteractionsDataset(str(header)).load()
    assert info.value.source == str(header)


def test_empty_feature_file(tmp_path):
    items = tmp_path / "items.csv"
    items.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as info:
        InteractionsDataset(str(_log(tmp_path)), item_features={
            "path": str(items), "id_col": "item", "categorical": ["kind"]}).load()
    assert info.value.source == str(items)


def test_a_directory_as_the_data_path(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(DataError) as info:
        InteractionsDataset(str(folder)).load()
    assert info.value.source == str(folder) and "is a directory" in str(info.value)


@pytest.mark.parametrize("column", ["user", "item"])
def test_null_id_in_parquet(tmp_path, column):
    frame = pd.DataFrame({"user": ["a", "b", "c", "d"], "item": ["x", "y", "x", "y"],
                          "rating": [1, 2, 3, 4], "timestamp": [1, 2, 3, 4]})
    frame[column] = frame[column].astype(object)
    frame.loc[2, column] = None
    path = tmp_path / "log.parquet"
    frame.to_parquet(path, index=False)
    with pytest.raises(DataError) as info:
        InteractionsDataset(str(path)).load()
    err = info.value
    assert (err.source, err.line, err.field) == (str(path), 3, column)
    assert "null id" in str(err)


def test_null_numeric_id_in_parquet(tmp_path):
    # An integer column with a null is stored as floats: the null is still named.
    frame = pd.DataFrame({"user": [1.0, np.nan, 2.0], "item": [1, 2, 3], "rating": [1, 2, 3],
                          "timestamp": [1, 2, 3]})
    path = tmp_path / "log.parquet"
    frame.to_parquet(path, index=False)
    with pytest.raises(DataError) as info:
        InteractionsDataset(str(path)).load()
    assert (info.value.line, info.value.field) == (2, "user")


def test_feature_ids_that_match_none_are_an_error(tmp_path):
    items = tmp_path / "items.csv"
    items.write_text("item,kind\n10.0,a\n20.0,b\n30.0,c\n")  # float-formatted: "10.0" vs "10"
    with pytest.raises(DataError) as info:
        InteractionsDataset(str(_log(tmp_path)), item_features={
            "path": str(items), "id_col": "item", "categorical": ["kind"]}).load()
    message = str(info.value)
    assert info.value.source == str(items) and info.value.field == "item"
    assert "none of the 3 item ids of the log has a row here" in message
    assert "float-formatted ('10.0' vs '10')" in message


def test_feature_ids_that_match_few_warn_with_the_count(tmp_path):
    users = tmp_path / "users.csv"
    users.write_text("user,country\n1,fr\n7,de\n8,de\n")
    log = _log(tmp_path, LOG + "3,10,1,104\n4,10,1,105\n")  # users 1, 2, 3, 4: one described
    with pytest.warns(UserWarning, match=r"only 1 of the 4 users of the log \(25%\) have a "
                                         r"row here; the other 3 get the <missing> category"):
        table = InteractionsDataset(str(log), user_features={
            "path": str(users), "id_col": "user", "categorical": ["country"]}).load()
    assert table.user_features[0].values.tolist() == [2, 0, 0, 0]  # fr; the rest <missing>
    with warnings.catch_warnings():  # half or more: no warning
        warnings.simplefilter("error")
        InteractionsDataset(str(_log(tmp_path)), user_features={
            "path": str(users), "id_col": "user", "categorical": ["country"]}).load()


@pytest.mark.parametrize("value", ["1e30", "-1e30", "9223372036854775808"])
def test_timestamp_that_overflows_int64(tmp_path, value):
    path = _log(tmp_path, LOG.replace("2,10,4,102", f"2,10,4,{value}"))
    with pytest.raises(DataError) as info:
        InteractionsDataset(str(path)).load()
    err = info.value
    assert (err.source, err.line, err.field) == (str(path), 4, "timestamp")
    assert "fits a 64-bit integer" in str(err) and value in str(err)


def test_timestamp_overflow_in_parquet(tmp_path):
    frame = pd.DataFrame({"user": [1, 2], "item": [1, 2], "rating": [1, 2],
                          "timestamp": [1.0, 1e30]})
    path = tmp_path / "log.parquet"
    frame.to_parquet(path, index=False)
    with pytest.raises(DataError, match="fits a 64-bit integer") as info:
        InteractionsDataset(str(path)).load()
    assert (info.value.line, info.value.field) == (2, "timestamp")


def test_large_int64_timestamps_are_exact(tmp_path):
    big = 2**62 + 1  # not representable as a float64
    path = _log(tmp_path, LOG.replace("2,10,4,102", f"2,10,4,{big}"))
    assert InteractionsDataset(str(path)).load().timestamps[2] == big


# --------------------------------------------------------------------------------------------
# A truncated MovieLens-100K


def _ml100k() -> Path | None:
    for base in (os.environ.get("METAREC_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data"):
        if base and movielens.find_root(str(base)):
            return movielens.find_root(str(base))
    return None


@pytest.fixture
def truncated(tmp_path) -> Path:
    source = _ml100k()
    if source is None:
        pytest.skip("MovieLens-100K files not found (set $METAREC_DATA)")
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    for name in movielens.FILES:
        shutil.copyfile(source / name, folder / name)
    lines = (folder / "u.data").read_bytes().splitlines(keepends=True)
    (folder / "u.data").write_bytes(b"".join(lines[:-10]))  # as if a copy stopped early
    return folder


def test_truncated_movielens_100k(truncated):
    with pytest.raises(DataError) as info:
        MovieLens100K(root=str(truncated), download=False).load()
    err = info.value
    assert err.source == str(truncated / "u.data")
    assert "99,990 rows where MovieLens-100K's u.data has 100,000" in str(err)
    assert "verify: false" in str(err)
    table = MovieLens100K(root=str(truncated), download=False, verify=False).load()
    assert len(table) == 99_990


# --------------------------------------------------------------------------------------------
# Through the CLI: one line, exit status 2

RECIPE = """
seed_everything: 0
trainer: {max_epochs: 1, accelerator: cpu, devices: 1, logger: false,
          enable_progress_bar: false, enable_model_summary: false}
model:
  backbone: mf
  backbone_args: {embedding_dim: 4, user_features: false, use_user_table: false}
  algorithm: maml
data:
  dataset: interactions
  dataset_args: {path: PATH}
  tasks: {min_interactions: 3, max_interactions: 100, query_size: 1}
"""


def _empty(folder: Path) -> str:
    (folder / "log.csv").write_bytes(b"")
    return "log.csv"


def _directory(folder: Path) -> str:
    (folder / "data").mkdir()
    return "data"


def _overflow(folder: Path) -> str:
    (folder / "log.csv").write_text(LOG.replace("102", "1e30"))
    return "log.csv"


@pytest.mark.parametrize("make,message", [(_empty, "log.csv: file is empty (0 bytes)"),
                                          (_directory, "data: is a directory"),
                                          (_overflow, "log.csv:4, field 'timestamp'")])
def test_fit_reports_one_line_and_exit_2(in_tmp, capsys, make, message):
    (in_tmp / "recipe.yaml").write_text(RECIPE.replace("PATH", make(in_tmp)))
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", "recipe.yaml"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after Lightning's "Seed set to 0"
    assert last.startswith("metarec fit: error: ") and message in last, err
