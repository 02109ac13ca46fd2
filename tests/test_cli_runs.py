"""Quiet, readable runs: a quickstart fit prints no warning; one run, one folder (CSV,
checkpoints, config and the W&B run share its name), resumed in place; the adaptation curves
appended per validation and drawn; ``metarec test`` prints the before/after summary;
``metarec predict`` writes each test user's top-k; ``--print_config`` shows plugin defaults."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

QUICK = str(REPO / "recipes" / "quickstart.yaml")
TINY = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
        "--data.dataset_args", "{num_users: 300, num_items: 120, seed: 0}"]
COMMAND = str(Path(sys.executable).parent / "metarec")


def _metarec(where: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    environment.pop("METAREC_VERBOSE", None)
    return subprocess.run([COMMAND, *args], cwd=where, capture_output=True, text=True,
                          timeout=600, env=environment)


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if "warn" in line.lower() or "deprecat" in line.lower() or "Tip:" in line]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    where = tmp_path_factory.mktemp("run")
    done = _metarec(where, "fit", "--config", QUICK, *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    (folder,) = [p for p in (where / "runs").iterdir() if p.is_dir()]
    return where, folder, done


def test_a_quickstart_fit_prints_no_warning(fitted):
    _, _, done = fitted
    assert _warnings(done.stderr) == [], done.stderr
    assert "before and after adaptation" in done.stdout


def test_verbose_restores_the_warnings(tmp_path):
    done = _metarec(tmp_path, "--verbose", "fit", "--config", QUICK, "--trainer.max_steps", "1",
                    "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
                    "--trainer.enable_checkpointing", "false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _warnings(done.stderr), done.stderr


def test_one_run_one_folder(fitted):
    _, folder, done = fitted
    name = folder.name
    assert name.split("-")[2] == "quickstart"
    assert {"metrics.csv", "config.yaml", "checkpoints", "wandb", "val_adaptation_curve.csv"} \
        <= {p.name for p in folder.iterdir()}
    assert list((folder / "wandb").glob(f"offline-run-*-{name}/run-{name}.wandb"))
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert f"{folder.name}/checkpoints/best-" in done.stdout  # the printed best checkpoint
    # the saved config carries the resolved plugin arguments, defaults included
    recipe = yaml.safe_load((folder / "config.yaml").read_text())
    assert recipe["model"]["algorithm_args"]["inner_lr"] == 0.05
    assert recipe["model"]["algorithm_args"]["first_order"] is False
    assert recipe["model"]["policy_args"] == {"steps": None, "lr": None}


def test_curves_are_appended_per_validation_and_drawn(fitted):
    _, folder, _ = fitted
    rows = list(csv.DictReader(open(folder / "val_adaptation_curve.csv")))
    assert list(rows[0])[:3] == ["epoch", "global_step", "step"]
    assert [(r["epoch"], r["step"]) for r in rows] == \
        [(e, s) for e in ("0", "1") for s in ("0", "1", "2", "3")]
    pytest.importorskip("matplotlib")
    assert (folder / "adaptation_curves.png").stat().st_size > 1000


def test_a_resumed_fit_continues_the_same_run(fitted):
    where, folder, _ = fitted
    before = list(csv.DictReader(open(folder / "metrics.csv")))
    done = _metarec(where, "fit", "--config", QUICK, *TINY[:-2], "--trainer.max_epochs", "3",
                    "--data.dataset_args", "{num_users: 300, num_items: 120, seed: 0}",
                    "--ckpt_path", str(folder / "checkpoints" / "last.ckpt"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in (where / "runs").iterdir() if p.is_dir()] == [folder.name]
    after = list(csv.DictReader(open(folder / "metrics.csv")))
    assert len(after) > len(before)  # appended to, not replaced
    assert [r for r in after[:len(before)]] == before or \
        [r["step"] for r in after[:len(before)]] == [r["step"] for r in before]
    epochs = [r["epoch"] for r in csv.DictReader(open(folder / "val_adaptation_curve.csv"))]
    assert sorted(set(epochs)) == ["0", "1", "2"]
    runs = list((folder / "wandb").glob(f"offline-run-*-{folder.name}"))
    assert len(runs) == 2  # the same W&B run id, resumed ("wandb sync" joins them)


def test_test_prints_the_summary_and_predict_writes_top_k(fitted):
    where, folder, _ = fitted
    ckpt = str(folder / "checkpoints" / "last.ckpt")
    done = _metarec(where, "test", "--ckpt_path", ckpt)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test (new users): before and after adaptation" in done.stdout
    assert "Test metric" not in done.stdout  # not Lightning's table
    assert _warnings(done.stderr) == [], done.stderr
    out = where / "top.jsonl"
    done = _metarec(where, "predict", "--ckpt_path", ckpt, "--predictions.path", str(out),
                    "--predictions.k", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines and all(len(x["items"]) == 4 and len(x["scores"]) == 4 for x in lines)
    assert len({x["user"] for x in lines}) == len(lines)
    assert all(x["scores"] == sorted(x["scores"], reverse=True) for x in lines)
    assert f"wrote the top-4 of {len(lines)} users to {out}" in done.stdout


def test_print_config_shows_plugin_defaults(in_tmp, capsys):
    from metarec.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", QUICK, "--model.policy", "proximal", "--print_config"])
    assert exit_.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["algorithm_args"]["inner_lr"] == 0.05  # the recipe's
    assert config["model"]["algorithm_args"]["first_order"] is False  # the default
    assert set(config["model"]["policy_args"]) >= {"steps", "alpha"}
    assert config["data"]["dataset_args"]["num_clusters"] == 4
    assert list(in_tmp.iterdir()) == []


def test_simulate_takes_overrides_and_prints_its_config(in_tmp, capsys):
    from metarec.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "--config", str(REPO / "recipes" / "movielens-100k" /
                                          "simulate-online.yaml"), "--users", "3",
              "--print_config"])
    assert exit_.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["users"] == 3 and config["k"] == 10 and len(config["policies"]) == 5


def test_a_failed_ddp_rank_says_that_nothing_was_saved(tmp_path, capsys):
    """A checkpoint needs every rank (their RNG states are gathered into it): when one rank
    fails, none can be written, and the interrupt callback says so instead of hanging."""
    from types import SimpleNamespace

    from metarec.callbacks import InterruptCheckpoint

    saved = []
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), global_step=7, current_epoch=0,
                              world_size=2, global_rank=1, is_global_zero=False,
                              checkpoint_callback=SimpleNamespace(last_model_path=""),
                              save_checkpoint=saved.append)
    callback = InterruptCheckpoint(dirpath=str(tmp_path))
    callback.on_exception(trainer, None, RuntimeError("Connection closed by peer"))
    err = capsys.readouterr().err
    assert saved == []
    assert "rank 1: RuntimeError at step 7 under DDP; no interrupt checkpoint was saved" in err
    assert "No checkpoint of this run was saved yet" in err
    # Ctrl-C reaches every rank: then the checkpoint is written (collectively)
    callback.on_exception(trainer, None, KeyboardInterrupt())
    assert saved == [callback.ckpt_path]
