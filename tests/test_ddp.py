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


def _evaluate(out, subcommand: str, devices: int, num_users: int, *extra: str):
    """``metarec validate|test`` with the CSV logger; returns (metrics, csv log folder)."""
    import csv

    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    args = [sys.executable, "-m", "metarec", subcommand, *BASE[:2],
            "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
            "--trainer.logger", "{class_path: lightning.pytorch.loggers.CSVLogger, "
                                "init_args: {save_dir: runs, name: csv}}",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
            "--data.dataset_args", f"{{num_users: {num_users}, num_items: 120, seed: 0}}",
            "--data.eval_batch_size", "7", *extra]
    if devices > 1:
        args += ["--trainer.strategy", "ddp"]
    result = subprocess.run(args, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = out / "runs" / "csv" / "version_0"
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    return {k: float(v) for row in rows for k, v in row.items() if v}, folder


@pytest.mark.slow
@pytest.mark.parametrize("num_users, tasks", [(300, 30), (290, 29)])
def test_ddp_validation_counts_every_task_once(tmp_path, num_users, tasks):
    """Validation metrics under 2 ranks equal one process's: no task repeated or dropped, also
    when the task count is odd (29 tasks: rank 0 gets 15, rank 1 14, in 3 and 2 batches)."""
    from metarec.data.tasks import TaskConfig, build_tasks
    from metarec_plugins.datasets.synthetic import SyntheticDataset

    table = SyntheticDataset(num_users=num_users, num_items=120, seed=0).load()
    split = build_tasks(table, TaskConfig(min_interactions=15, max_interactions=60), 0)
    assert len(split["val"]) == tasks
    one, _ = _evaluate(tmp_path / "one", "validate", 1, num_users)
    two, _ = _evaluate(tmp_path / "two", "validate", 2, num_users)
    for key in ("val/loss", "val/mae", "val/ndcg@5", "val/step0/rmse", "val/adapt_ratio",
                "val/precision@5", "val/mrr@5"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_ddp_test_table_holds_every_test_user_once(tmp_path):
    """The per-user test table gathers every rank's rows (29 test users over 2 ranks), at every
    support cap of a K-shot sweep, and the capped metrics equal one process's."""
    import csv

    sweep = ("--data.eval_support", "[1, null]")
    one, folder1 = _evaluate(tmp_path / "one", "test", 1, 290, *sweep)
    two, folder2 = _evaluate(tmp_path / "two", "test", 2, 290, *sweep)

    def last(path, k):  # the rows after adaptation (the last step) at cap k
        rows = [r for r in csv.DictReader(open(path)) if r["k"] == k]
        final = max(r["step"] for r in rows)
        return [r for r in rows if r["step"] == final]

    for k in ("1", "all"):
        rows1, rows2 = last(folder1 / "test_users.csv", k), last(folder2 / "test_users.csv", k)
        assert len(rows1) == 29 and sorted(r["user"] for r in rows2) == sorted(r["user"] for r in rows1)
        by_user = {r["user"]: r for r in rows1}
        for row in rows2:
            assert float(row["loss"]) == pytest.approx(float(by_user[row["user"]]["loss"]), rel=1e-5)
            assert row["support_size"] == by_user[row["user"]]["support_size"]
        for key in (f"test/k{k}/loss", f"test/k{k}/mae", f"test/k{k}/ndcg@5", f"test/k{k}/user_mae"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), key


@pytest.mark.slow
def test_ddp_resume_equals_the_uninterrupted_run(tmp_path):
    """2 ranks, dropout and shuffling on: a fit interrupted mid-epoch (Ctrl-C on both ranks at
    step 5) and resumed with --ckpt_path ends with the parameters of the uninterrupted fit.
    Each rank's RNG state is saved and restored (ranks draw different dropout masks)."""
    base = ["--config", str(REPO / "recipes" / "quickstart.yaml"), "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "2",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0",
            "--model.backbone", "transformer",
            "--model.backbone_args", "{dim: 8, layers: 1, heads: 2, dropout: 0.3}",
            "--model.algorithm_args", "{inner_steps: 1, inner_lr: 0.05}",
            "--data.history_length", "4", "--data.batch_size", "8",
            "--data.dataset_args", "{num_users: 80, num_items: 60, seed: 0}"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}

    def fit(where, *extra):
        where.mkdir()
        callbacks = [f"{{class_path: helpers.ddp.SaveParameters, init_args: {{dirpath: {where}}}}}"]
        args = [sys.executable, "-m", "metarec", "fit", *base, *extra]
        for callback in callbacks:
            args += ["--trainer.callbacks+", callback]
        return subprocess.run(args, cwd=where, env=env, capture_output=True, text=True,
                              timeout=600)

    full = fit(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    fit(tmp_path / "cut", "--trainer.callbacks+",
        "{class_path: helpers.interrupt.InterruptAt, init_args: {step: 5}}")
    ckpt = tmp_path / "cut" / "runs" / "interrupted" / "on_exception.ckpt"
    assert ckpt.exists()
    assert torch.load(ckpt, weights_only=False)["global_step"] == 5
    resumed = fit(tmp_path / "resumed", "--ckpt_path", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "full" / "rank0.pt")
    for rank in (0, 1):
        b = torch.load(tmp_path / "resumed" / f"rank{rank}.pt")
        assert _max_diff(a, b) == 0.0, rank
