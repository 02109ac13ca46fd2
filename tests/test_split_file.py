"""Split files: a run's split exported and read back (data.split_file) reproduces it exactly."""

from __future__ import annotations

import json

import pytest
import torch
from test_evaluation_contract import QUIET, RECIPE, _write_ratings

from metarec.cli import MetarecCLI, main


@pytest.fixture
def recipe(in_tmp):
    _write_ratings(in_tmp / "ratings.csv", "mixed")
    (in_tmp / "recipe.yaml").write_text(RECIPE)
    return "recipe.yaml"


def _cli(*args):
    return MetarecCLI(args=["--config", "recipe.yaml", *QUIET, *args], run=False)


def test_an_exported_split_is_reproduced_exactly(recipe, in_tmp, capsys):
    main(["export-split", "--out", "split.json", "--config", recipe, "--data.seed", "4"])
    assert "wrote split.json" in capsys.readouterr().out
    data = json.loads((in_tmp / "split.json").read_text())
    assert data["format"] == "metarec-split" and set(data["users"]) == {"train", "val", "test"}
    original = _cli("--data.seed", "4").datamodule
    imported = _cli("--data.seed", "0", "--data.split_file", "split.json").datamodule
    for name in ("train", "val", "test"):
        a, b = original.splits[name], imported.splits[name]
        assert torch.equal(a.users, b.users), name
        assert torch.equal(a.query_items, b.query_items) and torch.equal(a.query_mask, b.query_mask)
        assert torch.equal(a.support_mask.sum(1), b.support_mask.sum(1))
    # raw ids in the file: strings and the int-like strings of the mixed-id CSV
    assert {type(u) for u in data["users"]["test"]} == {str}


def test_a_checkpoints_split_can_be_exported(recipe, in_tmp):
    cli = MetarecCLI(args=["fit", "--config", recipe, "--data.seed", "2", "--trainer.max_epochs",
                           "1", "--trainer.limit_train_batches", "1", *QUIET])
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    main(["export-split", "--out", "ckpt-split.json", "--ckpt_path", ckpt])
    data = json.loads((in_tmp / "ckpt-split.json").read_text())
    keys = cli.datamodule.table.user_keys
    assert data["users"]["test"] == [keys[u] for u in cli.datamodule.splits.test.users.tolist()]


@pytest.mark.parametrize("tamper, message", [
    (lambda d: d["users"]["test"].append("nobody"), "user 'nobody' is not in the data"),
    (lambda d: d["users"]["val"].append(d["users"]["test"][0]), "is in two splits"),
    (lambda d: d["queries"][0][1].append("m-unknown"), "has no interaction with item 'm-unknown'"),
    (lambda d: d["queries"].pop(0), "have no query"),
    (lambda d: d.update(format="other"), "not a metarec split file"),
])
def test_a_file_that_disagrees_with_the_data_is_a_clear_error(recipe, in_tmp, capsys, tamper,
                                                             message):
    main(["export-split", "--out", "split.json", "--config", recipe])
    data = json.loads((in_tmp / "split.json").read_text())
    tamper(data)
    (in_tmp / "bad.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", recipe, "--data.split_file", "bad.json", *QUIET])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and message in err and "Traceback" not in err
