"""Checkpoints as W&B model artifacts: on by default online, off offline, and (explicitly on)
recorded in an offline run file for ``wandb sync``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import wandb

from conftest import REPO
from metarec.cli import MetarecCLI
from metarec.loggers import WandbLogger, resolve_log_model
from wandb_records import read_records

QUICK = ["--config", str(REPO / "recipes" / "quickstart.yaml"), "--trainer.max_epochs", "1",
         "--data.dataset_args.num_users", "200"]


def test_resolve_log_model():
    assert resolve_log_model(offline=False, log_model=None) is True
    assert resolve_log_model(offline=True, log_model=None) is False
    for explicit in (True, False, "all"):
        assert resolve_log_model(offline=True, log_model=explicit) == explicit
        assert resolve_log_model(offline=False, log_model=explicit) == explicit


def _no_network(*args, **kwargs):
    raise AssertionError("the test must not start a W&B run (online would connect)")


@pytest.mark.parametrize("mode, expected", [("online", True), ("offline", False)])
def test_cli_default_logger_logs_models_only_online(in_tmp, monkeypatch, mode, expected):
    """The CLI's default WandbLogger, built (never started: ``wandb.init`` would connect)."""
    monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # fake: no run is started
    monkeypatch.setattr(wandb, "init", _no_network)
    cli = MetarecCLI(args=QUICK, run=False)
    (logger,) = [lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger)]
    assert logger._offline is (mode == "offline")
    assert logger._log_model is expected
    assert logger._experiment is None


def test_explicit_log_model_overrides_default(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "init", _no_network)
    assert WandbLogger(save_dir="runs", log_model=False)._log_model is False
    assert WandbLogger(save_dir="runs", log_model="all")._log_model == "all"
    monkeypatch.setenv("WANDB_MODE", "offline")
    # Lightning itself raises on offline + log_model; ours accepts it (see below).
    assert WandbLogger(save_dir="runs", log_model=True)._log_model is True


def test_offline_run_records_checkpoint_artifact(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DATA_DIR", str(in_tmp / "wandb-data"))  # staging copies land here
    logger = json.dumps([{"class_path": "metarec.loggers.WandbLogger",
                          "init_args": {"save_dir": "runs", "log_model": True}}])
    cli = MetarecCLI(args=["fit", *QUICK, "--trainer.logger", logger,
                           "--trainer.enable_progress_bar", "false"])
    (ckpt_cb,) = [c for c in cli.trainer.checkpoint_callbacks
                  if type(c).__name__ == "ModelCheckpoint"]
    saved = {Path(ckpt_cb.best_model_path).resolve(), Path(ckpt_cb.last_model_path).resolve()}
    assert all(p.is_file() for p in saved)
    # One run, one folder: runs/<run>/checkpoints beside runs/<run>/wandb (W&B run id <run>).
    folder = Path(ckpt_cb.dirpath).resolve().parent
    assert folder.parent == (in_tmp / "runs").resolve() and Path(ckpt_cb.dirpath).name == "checkpoints"
    wandb.finish()  # flush the run file (a CLI process does this at exit)
    (run_file,) = (folder / "wandb").glob(f"offline-run-*/run-{folder.name}.wandb")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        records = list(read_records(run_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.2)
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"
                 and r.artifact.type == "model"]  # (W&B tables are "run_table" artifacts)
    assert artifacts
    run_id = run_file.stem.removeprefix("run-")
    assert {a.name for a in artifacts} == {f"model-{run_id}"}
    assert {a.project for a in artifacts} == {"metarec"}
    # One artifact version per checkpoint file (best and last), each holding it as model.ckpt,
    # staged under $WANDB_DATA_DIR with the checkpoint's bytes for `wandb sync` to upload.
    originals = set()
    for artifact in artifacts:
        (entry,) = artifact.manifest.contents
        assert entry.path == "model.ckpt"
        staged = Path(entry.local_path)
        assert staged.is_relative_to(in_tmp / "wandb-data" / "artifacts" / "staging")
        metadata = json.loads(artifact.metadata)
        original = next(p for p in saved if p.name == metadata["original_filename"])
        assert staged.read_bytes() == original.read_bytes()
        originals.add(original)
    assert originals == saved
