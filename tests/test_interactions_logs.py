"""The interactions plugin on real-world logs: label transforms for counts and clicks, the
separator inferred for .dat (``::``) and tab files, count filters and their printed report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from metarec import DataError, TaskConfig, build_tasks
from metarec.data import FilterReport
from metarec.registry import validate_args
from metarec_plugins.datasets.interactions import InteractionsDataset, infer_sep, parse_transform

COUNTS = "user,item,plays,ts\na,x,0,1\na,y,3,2\nb,x,10,3\nb,z,1,4\nc,y,250,5\n"


@pytest.fixture(autouse=True)
def _fresh_reports(monkeypatch):
    monkeypatch.setattr(FilterReport, "_printed", set())


def _counts(tmp_path, **kwargs):
    path = tmp_path / "plays.csv"
    path.write_text(COUNTS)
    args = dict(label_col="plays", timestamp_col="ts", rating_range=None)
    return InteractionsDataset(str(path), **{**args, **kwargs}).load()


def test_log1p(tmp_path):
    t = _counts(tmp_path, label_transform="log1p")
    assert np.allclose(t.labels, np.log1p([0, 3, 10, 1, 250]))
    assert t.feedback == "explicit" and t.rating_range is None
    scaled = _counts(tmp_path, label_transform="log1p", rating_range=[0, 1000])
    assert scaled.rating_range == pytest.approx((0.0, np.log1p(1000)))


def test_log1p_of_a_negative_label_names_its_line(tmp_path):
    path = tmp_path / "plays.csv"
    path.write_text(COUNTS.replace("b,z,1,4", "b,z,-2,4"))
    with pytest.raises(DataError) as info:
        InteractionsDataset(str(path), label_col="plays", timestamp_col="ts", rating_range=None,
                            label_transform="log1p").load()
    assert (info.value.line, info.value.field) == (5, "plays")
    assert "log1p needs labels >= 0, found -2" in str(info.value)


def test_binarize_makes_implicit_feedback_with_observed_negatives(tmp_path):
    t = _counts(tmp_path, label_transform={"binarize": 3})
    assert t.labels.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert t.feedback == "implicit" and t.rating_range is None
    # The 0 labels are observed negatives: task building keeps them, draws negatives for the
    # positives only.
    splits = build_tasks(t, TaskConfig(min_interactions=2, max_interactions=5, query_size=1,
                                       split=(1.0, 0.0, 0.0)))
    assert splits.feedback == "implicit"


def test_clip_and_a_list_of_steps(tmp_path):
    t = _counts(tmp_path, label_transform={"clip": [1, 5]})
    assert t.labels.tolist() == [1.0, 3.0, 5.0, 1.0, 5.0] and t.rating_range == (1.0, 5.0)
    t = _counts(tmp_path, label_transform=[{"clip": [0, 100]}, "log1p"])
    assert np.allclose(t.labels, np.log1p([0, 3, 10, 1, 100]))
    assert t.rating_range == pytest.approx((0.0, np.log1p(100)))


@pytest.mark.parametrize("spec,message", [
    ("sqrt", "expected 'log1p'"),
    ({"clip": [5, 1]}, "lo <= hi"),
    ({"clip": 3}, "clip needs"),
    ({"binarize": None}, "binarize needs a threshold"),
    ({"binarize": 1, "clip": [0, 1]}, "expected 'log1p'"),
    ([{"binarize": 1}, "log1p"], "binarize must be the last step"),
])
def test_bad_transform(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_transform(spec)


def test_transform_needs_a_label_column():
    with pytest.raises(ValueError, match="needs a label_col"):
        InteractionsDataset("x.csv", label_col=None, label_transform="log1p")


def test_transform_spellings_pass_recipe_validation():
    for spec in ("log1p", {"binarize": 1}, {"clip": [0, 5]}, [{"clip": [0, 5]}, "log1p"]):
        validate_args("datasets", "interactions", {"path": "x.csv", "label_transform": spec,
                                                   "min_user_interactions": 2})


@pytest.mark.parametrize("name,text,sep", [
    ("ratings.dat", "1::10::5::100\n2::10::3::101\n", "::"),
    ("log.txt", "user\titem\n1\t2\n", "\t"),
    ("log.csv", "user\titem\n1\t2\n", "\t"),  # a tab file named .csv
    ("log.tsv", "user,item\n", "\t"),  # .tsv is tab whatever its first line says
    ("log.csv", "user,item\n1,2\n", ","),
    ("log.csv", "user;item\n1;2\n", ";"),
    ("log.csv", "\n\nuser|item\n", "|"),
])
def test_separator_is_inferred(tmp_path, name, text, sep):
    path = tmp_path / name
    path.write_text(text)
    assert infer_sep(path) == sep
    assert infer_sep(path, ",") == ","  # given: used as is


def test_headerless_dat_file_with_names(tmp_path):
    path = tmp_path / "ratings.dat"
    path.write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    t = InteractionsDataset(str(path), names=["user", "item", "rating", "timestamp"]).load()
    assert (len(t), t.num_users, t.num_items) == (3, 2, 2)
    assert t.item_keys.tolist() == ["1193", "661"] and t.timestamps[0] == 978300760


def test_headerless_feature_file(tmp_path):
    log = tmp_path / "ratings.dat"
    log.write_text("1::10::5::1\n2::20::3::2\n")
    movies = tmp_path / "movies.dat"
    movies.write_text("10::Drama|War\n20::Comedy\n")
    t = InteractionsDataset(str(log), names=["user", "item", "rating", "timestamp"],
                            item_features={"path": str(movies), "id_col": "item",
                                           "names": ["item", "genres"],
                                           "multihot": {"genres": "|"}}).load()
    assert t.item_features[0].values.tolist() == [[0, 1, 1], [1, 0, 0]]  # Comedy Drama War


LOG = ("user,item,rating,timestamp\n"
       "a,x,5,1\na,y,4,2\na,z,3,3\nb,x,2,4\nb,y,1,5\nc,x,3,6\nd,w,4,7\nd,x,5,8\n")


def test_count_filters_and_their_report(tmp_path, capsys):
    path = tmp_path / "log.csv"
    path.write_text(LOG)
    t = InteractionsDataset(str(path), min_item_interactions=2, min_user_interactions=2).load()
    # Items z and w have one interaction each; then users c (x only) and d (x after w
    # went) have one.
    assert t.item_keys.tolist() == ["x", "y"] and t.user_keys.tolist() == ["a", "b"]
    assert (len(t), t.num_users, t.num_items) == (4, 2, 2)
    assert t.users.tolist() == [0, 0, 1, 1] and t.items.tolist() == [0, 1, 0, 1]
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: 4 users, 4 items, 8 rows",
        "  min_item_interactions=2: dropped 0 users, 2 items, 2 rows; kept 4, 2, 6",
        "  min_user_interactions=2: dropped 2 users, 0 items, 2 rows; kept 2, 2, 4",
    ]
    InteractionsDataset(str(path), min_item_interactions=2, min_user_interactions=2).load()
    assert capsys.readouterr().err == ""  # printed once


def test_report_without_filters_and_with_duplicates(tmp_path, capsys):
    path = tmp_path / "log.csv"
    path.write_text(LOG)
    InteractionsDataset(str(path)).load()
    assert capsys.readouterr().err == f"{path}: 4 users, 4 items, 8 rows (no filter)\n"
    path.write_text(LOG + "a,x,1,9\n")
    t = InteractionsDataset(str(path), duplicates="keep_last").load()
    assert len(t) == 8
    assert "duplicates=keep_last: dropped 0 users, 0 items, 1 rows; kept 4, 4, 8" in \
        capsys.readouterr().err


def test_report_is_printed_on_the_first_rank_only(tmp_path, capsys, monkeypatch):
    path = tmp_path / "log.csv"
    path.write_text(LOG)
    monkeypatch.setenv("RANK", "1")
    InteractionsDataset(str(path)).load()
    assert capsys.readouterr().err == ""


def test_filters_that_leave_nothing(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(LOG)
    with pytest.raises(DataError, match="no interaction left after the filter rules"):
        InteractionsDataset(str(path), min_user_interactions=10).load()


def test_features_follow_the_filtered_ids(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(LOG)
    items = tmp_path / "items.csv"
    pd.DataFrame({"item": ["w", "x", "y", "z"], "kind": ["p", "q", "r", "s"]}).to_csv(
        items, index=False)
    t = InteractionsDataset(str(path), min_item_interactions=2, item_features={
        "path": str(items), "id_col": "item", "categorical": ["kind"]}).load()
    assert t.item_keys.tolist() == ["x", "y"]
    assert t.item_features[0].values.tolist() == [2, 3]  # q, r (0 = <missing>, p = 1)
