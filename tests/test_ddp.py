"""DDP on 2 CPU ranks (gloo), launched as subprocesses: gradients really are synchronised.

After N steps both ranks hold identical parameters, equal to a single-process run over the same
global task batches (each global batch = the union of the ranks' batches, tasks in a fixed
order). Deliberately broken synchronisation (a DDP communication hook that skips the
all-reduce) must make the check fail.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

STEPS = 3
BASE = ["--config", str(REPO / "recipes" / "quickstart.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.max_steps", str(STEPS), "--trainer.max_epochs", "1",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.limit_val_batches", "0", "--data.shuffle", "false",
        "--data.dataset_args", "{num_users: 300, num_items: 120, seed: 0}"]


def _fit(out, devices: int, batch_size: int, algorithm: str, extra=()):
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}
    args = [sys.executable, "-m", "metarec", "fit", *BASE, "--trainer.devices", str(devices),
            "--data.batch_size", str(batch_size), "--model.algorithm", algorithm,
            "--trainer.callbacks", f"[{{class_path: helpers.ddp.SaveParameters, "
                                   f"init_args: {{dirpath: {out}}}}}]", *extra]
    if devices > 1 and "--trainer.strategy" not in extra:
        args += ["--trainer.strategy", "ddp"]
    result = subprocess.run(args, cwd=out.parent, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(devices)]


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, extra", [
    ("maml", ()), ("fomaml", ()),
    ("reptile", ("--model.optimizer", "{class_path: torch.optim.SGD, init_args: {lr: 0.5}}")),
])
def test_two_ranks_equal_one_process_over_the_same_global_batches(tmp_path, algorithm, extra):
    rank0, rank1 = _fit(tmp_path / "ddp", 2, 8, algorithm, extra)
    (single,) = _fit(tmp_path / "single", 1, 16, algorithm, extra)
    start = torch.load(tmp_path / "single" / "start0.pt")
    assert _max_diff(rank0, rank1) == 0.0  # DDP keeps replicas bit-identical
    assert _max_diff(rank0, single) < 1e-5
    assert _max_diff(single, start) > 1e-4  # the runs did train


@pytest.mark.slow
def test_unsynchronised_gradients_are_caught(tmp_path):
    broken = ("--trainer.strategy", "{class_path: helpers.ddp.UnsyncedDDP}")
    rank0, rank1 = _fit(tmp_path / "ddp", 2, 8, "maml", broken)
    (single,) = _fit(tmp_path / "single", 1, 16, "maml")
    assert _max_diff(rank0, rank1) > 1e-4  # the replicas drifted apart
    assert _max_diff(rank0, single) > 1e-4


@pytest.mark.slow
def test_ddp_validation_counts_every_task_once(tmp_path):
    """Validation metrics under 2 ranks equal one process's (no task repeated or dropped)."""
    import csv

    def val(devices):
        out = tmp_path / f"val{devices}"
        out.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        args = [sys.executable, "-m", "metarec", "validate", *BASE[:2],
                "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
                "--trainer.logger", "{class_path: lightning.pytorch.loggers.CSVLogger, "
                                    "init_args: {save_dir: runs, name: csv}}",
                "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
                # 300 users: 30 validation tasks, split evenly (an uneven count is padded by
                # Lightning's DistributedSampler with repeated tasks: see docs/scaling.md)
                "--data.dataset_args", "{num_users: 300, num_items: 120, seed: 0}",
                "--data.eval_batch_size", "7"]
        if devices > 1:
            args += ["--trainer.strategy", "ddp"]
        result = subprocess.run(args, cwd=out, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = list(csv.DictReader(open(out / "runs" / "csv" / "version_0" / "metrics.csv")))
        return {k: float(v) for row in rows for k, v in row.items() if v}

    one, two = val(1), val(2)
    for key in ("val/loss", "val/mae", "val/ndcg@5", "val/step0/rmse", "val/adapt_ratio"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
