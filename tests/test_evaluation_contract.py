"""Evaluation from a checkpoint through the CLI: the split travels with the checkpoint, the
command line overrides the checkpoint's evaluation settings, k-shot sweeps, string user ids."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from metarec.cli import MetarecCLI

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
         "--trainer.enable_model_summary", "false"]


def _write_ratings(path: Path, ids: str) -> None:
    """150 users x 15-40 ratings; user ids strings, ints, or a mix of both."""
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "movie_id", "rating", "ts"])
        for u in range(150):
            user = {"str": f"u{u:03d}", "int": str(1000 + u),
                    "mixed": f"u{u:03d}" if u % 3 else str(1000 + u)}[ids]
            for t, item in enumerate(rng.choice(80, size=rng.integers(15, 40), replace=False)):
                writer.writerow([user, f"m{item}", int(rng.integers(1, 6)), t])


RECIPE = """
seed_everything: 0
trainer: {max_epochs: 2, accelerator: cpu, devices: 1, log_every_n_steps: 1}
model:
  backbone: mf
  backbone_args: {embedding_dim: 8, user_features: false, use_user_table: false}
  algorithm: maml
  algorithm_args: {inner_steps: 3, inner_lr: 0.1}
data:
  dataset: interactions
  dataset_args: {path: ratings.csv, user_col: user_id, item_col: movie_id, label_col: rating,
                 timestamp_col: ts, rating_range: [1, 5]}
  tasks: {min_interactions: 13, max_interactions: 100, query_size: 10}
  seed: 0
checkpoint: {monitor: val/mae, mode: min}
"""


@pytest.fixture(scope="module")
def fitted_once(tmp_path_factory):
    """A recipe on a mixed-id interactions CSV, fit once with --data.seed 1:
    (folder, recipe, best checkpoint, the fit's datamodule)."""
    where = tmp_path_factory.mktemp("contract")
    _write_ratings(where / "ratings.csv", "mixed")
    (where / "recipe.yaml").write_text(RECIPE)
    cwd = os.getcwd()
    os.chdir(where)  # the recipe's data path is relative, as a user's would be
    try:
        cli = MetarecCLI(args=["fit", "--config", "recipe.yaml", "--data.seed", "1",
                               "--trainer.limit_train_batches", "2", *QUIET])
    finally:
        os.chdir(cwd)
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    if not best.is_absolute():
        best = where / best
    assert best.name.startswith("best-") and best.is_file()
    assert (best.parent / "last.ckpt").is_file()
    return where, "recipe.yaml", best, cli.datamodule


@pytest.fixture
def fitted(fitted_once, monkeypatch):
    """(recipe, best checkpoint, datamodule), run from the fit's folder."""
    where, *rest = fitted_once
    monkeypatch.chdir(where)
    return tuple(rest)


def _test(recipe, ckpt, *extra):
    return MetarecCLI(args=["test", "--config", recipe, "--ckpt_path", str(ckpt), *QUIET, *extra])


def test_fit_prints_the_best_checkpoint(in_tmp, capsys):
    _write_ratings(in_tmp / "ratings.csv", "str")
    (in_tmp / "recipe.yaml").write_text(RECIPE)
    cli = MetarecCLI(args=["fit", "--config", "recipe.yaml", "--trainer.max_epochs", "1",
                           "--trainer.limit_train_batches", "1", *QUIET])
    best = cli.trainer.checkpoint_callback.best_model_path
    out = capsys.readouterr().out
    assert best.endswith(".ckpt") and "best checkpoint (val/mae = " in out
    assert f"): {best}" in out


def test_the_recipe_alone_tests_the_checkpoints_split(fitted, capsys):
    recipe, ckpt, fit_dm = fitted
    cli = _test(recipe, ckpt)
    assert cli.datamodule.seed == 1  # the checkpoint's, not the recipe's 0
    assert torch.equal(cli.datamodule.splits["test"].users, fit_dm.splits["test"].users)
    assert "data.seed = 1 from the checkpoint" in capsys.readouterr().err
    rows = cli.model.user_results
    keys = fit_dm.table.user_keys
    tested = {keys[int(u)] for u in fit_dm.splits["test"].users}
    assert {r["user"] for r in rows} == tested
    assert {type(r["user"]) for r in rows} == {str}


def test_the_checkpoint_alone_is_enough(fitted):
    """`metarec test --ckpt_path CKPT` with no recipe: model, data and split from the checkpoint
    (the getting-started command)."""
    _, ckpt, fit_dm = fitted
    cli = MetarecCLI(args=["test", "--ckpt_path", str(ckpt), *QUIET])
    assert cli.datamodule.seed == 1 and cli.model.hparams.backbone == "mf"
    assert torch.equal(cli.datamodule.splits["test"].users, fit_dm.splits["test"].users)
    assert "test/mae" in cli.trainer.callback_metrics


def test_forcing_another_split_is_an_overlap_error(fitted, capsys):
    recipe, ckpt, _ = fitted
    with pytest.raises(SystemExit) as stop:
        _test(recipe, ckpt, "--data.seed", "0")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "test users were meta-training users of the checkpoint" in err
    assert "Traceback" not in err
    cli = _test(recipe, ckpt, "--data.seed", "0", "--allow_train_users", "true")
    assert "test/mae" in cli.trainer.callback_metrics


def test_command_line_policy_args_win_over_the_checkpoint(fitted):
    recipe, ckpt, _ = fitted
    metrics = _test(recipe, ckpt, "--model.policy_args", "{steps: 1}").trainer.callback_metrics
    assert "test/step1/mae" in metrics and "test/step2/mae" not in metrics
    metrics = _test(recipe, ckpt).trainer.callback_metrics  # the checkpoint's 3 inner steps
    assert "test/step3/mae" in metrics


def test_an_architecture_override_is_a_clear_error(fitted, capsys):
    recipe, ckpt, _ = fitted
    with pytest.raises(SystemExit) as stop:
        _test(recipe, ckpt, "--model.backbone_args", "{embedding_dim: 4}")
    assert stop.value.code == 2
    assert "--model.backbone_args" in capsys.readouterr().err


def test_k_shot_sweep_reports_every_cap_on_the_same_users(fitted):
    recipe, ckpt, _ = fitted
    cli = _test(recipe, ckpt, "--data.eval_support", "[1, 5, null]")
    metrics = cli.trainer.callback_metrics
    for key in ("test/k1/mae", "test/k5/mae", "test/kall/mae", "test/k1/step0/mae",
                "test/k5/user_mae", "test/kall/diverged_users"):
        assert key in metrics, key
    assert "test/mae" not in metrics
    rows = cli.model.user_results
    users = {k: {r["user"] for r in rows if r["k"] == k} for k in ("1", "5", "all")}
    assert users["1"] == users["5"] == users["all"]
    sizes = {k: {r["user"]: r["support_size"] for r in rows if r["k"] == k} for k in users}
    assert all(s == 1 for s in sizes["1"].values())
    assert all(min(5, sizes["all"][u]) == s for u, s in sizes["5"].items())
    # Uncapped support is the same as no sweep: identical per-user numbers.
    plain = {(r["user"], r["step"]): r["mae"] for r in _test(recipe, ckpt).model.user_results}
    swept = {(r["user"], r["step"]): r["mae"] for r in rows if r["k"] == "all"}
    assert swept == pytest.approx(plain)


def test_int_user_ids_in_the_per_user_table(in_tmp):
    """Integer ids in the CSV come back as the file's ids (the interactions data set keeps raw
    ids as read: strings); the mixed-id fixture covers both kinds in one file."""
    _write_ratings(in_tmp / "ratings.csv", "int")
    (in_tmp / "recipe.yaml").write_text(RECIPE)
    cli = MetarecCLI(args=["fit", "--config", "recipe.yaml", "--trainer.max_epochs", "1",
                           "--trainer.limit_train_batches", "1", *QUIET])
    cli = _test("recipe.yaml", cli.trainer.checkpoint_callback.best_model_path)
    users = {r["user"] for r in cli.model.user_results}
    assert users and all(str(u).isdigit() and 1000 <= int(u) < 1150 for u in users)
    assert users == {cli.datamodule.table.user_keys[u]
                     for u in cli.datamodule.splits.test.users.tolist()}


@pytest.mark.parametrize("ids", ["str"])
def test_metarec_test_from_a_checkpoint_on_an_interactions_csv(in_tmp, ids):
    """The acceptance command in a subprocess: exits 0 and writes the per-user table."""
    _write_ratings(in_tmp / "ratings.csv", ids)
    (in_tmp / "recipe.yaml").write_text(RECIPE)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "metarec", *a], cwd=in_tmp,  # noqa: E731
                                    env=env, capture_output=True, text=True, timeout=300)
    fit = run("fit", "--config", "recipe.yaml", "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false")
    assert fit.returncode == 0, fit.stderr[-2000:]
    ckpt = next((in_tmp / "runs").rglob("last.ckpt"))
    test = run("test", "--config", "recipe.yaml", "--ckpt_path", str(ckpt),
               "--trainer.enable_progress_bar", "false")
    assert test.returncode == 0, test.stderr[-2000:]
    table = next((in_tmp / "runs").rglob("test_users.csv"))  # the test's own run folder
    assert "-recipe-test-" in table.parent.name
    rows = list(csv.DictReader(open(table)))
    assert rows and all(r["user"].startswith("u") == (ids == "str") for r in rows)
    assert "test (new users): before and after adaptation" in test.stdout  # metarec's summary
    assert "│ mae " in test.stdout


def test_checkpoints_load_without_unpickling(fitted):
    """metarec.load_checkpoint reads with weights_only=True (no code runs from the file)."""
    from metarec import load_checkpoint

    _, ckpt, fit_dm = fitted
    loaded = load_checkpoint(ckpt)
    record = loaded["metarec_split"]
    assert torch.equal(record["users"]["test"], fit_dm.splits["test"].users)
    assert set(record["fingerprint"]) == {"train", "val", "test"}
