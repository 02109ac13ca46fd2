"""Resume: a fit interrupted mid-epoch and resumed with ``--ckpt_path`` ends exactly where the
uninterrupted fit ends (parameters, metrics, and the batches trained on), on CPU with a fixed
seed. The model has dropout and the task order is shuffled, so the data-loader position and the
RNG state both have to be restored: resuming without either must give different parameters."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from conftest import REPO
from metarec import datamodule
from metarec.cli import MetarecCLI

# 2 epochs of 6 batches (~96 training tasks, 16 a batch); interrupted at step 8 (epoch 1,
# batch 2), after one end-of-epoch validation. The transformer's dropout draws from the
# global torch RNG, inside the vmapped inner loop (randomness="different") too.
STEPS, INTERRUPT = 12, 8
BASE = ["--config", str(REPO / "recipes" / "quickstart.yaml"), "--trainer.max_epochs", "2",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--model.backbone", "transformer",
        "--model.backbone_args", "{dim: 8, layers: 1, heads: 2, dropout: 0.3, scorer_hidden: [16]}",
        "--model.algorithm_args", "{inner_steps: 1, inner_lr: 0.05}",
        "--data.history_length", "5", "--data.batch_size", "16",
        # episodic support draws (a fresh support subset per task and epoch) resume exactly too
        "--data.train_support", "[3, 12]",
        "--data.dataset_args", "{num_users: 120, num_items: 60, seed: 0}",
        "--trainer.callbacks+", "helpers.interrupt.RecordBatches"]
SMALL = {"num_users": 60, "num_items": 80, "seed": 0}
INTERRUPT_AT = ("--trainer.callbacks+",
                f"{{class_path: helpers.interrupt.InterruptAt, init_args: {{step: {INTERRUPT}}}}}")


def _fit(where: Path, *extra: str) -> MetarecCLI:
    """A fresh CLI fit in its own folder (``runs/`` relative to it)."""
    where.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(where)
    try:
        return MetarecCLI(args=["fit", *BASE, *extra])
    finally:
        os.chdir(cwd)


def _recorded(cli: MetarecCLI) -> list:
    (recorder,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "RecordBatches"]
    return recorder.batches


def _params(cli: MetarecCLI) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(root, uninterrupted fit, its parameters, its batches, {checkpoint kind: (path, step)})."""
    root = tmp_path_factory.mktemp("resume")
    full = _fit(root / "full")
    assert full.trainer.global_step == STEPS and full.trainer.num_training_batches == 6
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl-C
        _fit(root / "interrupted", *INTERRUPT_AT)
    # The interrupted run left its exception checkpoint (mid-epoch 1) and, from the default
    # ModelCheckpoint, an end-of-epoch-0 one (after validation; Lightning then does not call
    # the loader's load_state_dict, only the datamodule's).
    mid = root / "interrupted" / "runs" / "interrupted" / "on_exception.ckpt"
    (end,) = (root / "interrupted").rglob("best-0-6.ckpt")  # the recipe keeps the best epoch
    assert torch.load(mid, weights_only=True)["global_step"] == INTERRUPT
    return root, full, _params(full), _recorded(full), {"mid-epoch": (mid, INTERRUPT),
                                                        "end-of-epoch": (end, 6)}


def _resume(runs, name: str, kind: str = "mid-epoch") -> MetarecCLI:
    root, *_, checkpoints = runs
    return _fit(root / name, "--ckpt_path", str(checkpoints[kind][0]))


@pytest.mark.parametrize("kind", ["mid-epoch", "end-of-epoch"])
def test_resumed_fit_equals_the_uninterrupted_one(runs, kind):
    _, full, params, batches, checkpoints = runs
    resumed = _resume(runs, f"resumed-{kind}", kind)
    assert resumed.trainer.global_step == STEPS
    # Exactly the batches the uninterrupted run trained on after the checkpoint, in order.
    assert _recorded(resumed) == batches[checkpoints[kind][1]:]
    after = _params(resumed)
    assert after.keys() == params.keys()
    for name, value in params.items():
        assert torch.equal(after[name], value), name  # bit-identical, no tolerance
    metrics, expected = resumed.trainer.callback_metrics, full.trainer.callback_metrics
    assert metrics.keys() == expected.keys() and "val/loss" in metrics
    for name, value in expected.items():
        assert float(metrics[name]) == float(value), name


@pytest.mark.parametrize("without", ["loader_position", "rng_state"])
def test_resume_without_loader_position_or_rng_state_differs(runs, monkeypatch, without):
    """The check above is sensitive to each piece of state: drop one and parameters differ."""
    _, _, params, batches, _ = runs
    if without == "loader_position":
        # Restart the epoch from its first batch (what Lightning does with a plain DataLoader).
        load = datamodule.ResumableLoader.load_state_dict
        monkeypatch.setattr(datamodule.ResumableLoader, "load_state_dict",
                            lambda self, state: load(self, {**state, "batches": 0}))
    else:
        monkeypatch.setattr(datamodule.EpisodeDataModule, "load_state_dict",
                            lambda self, state: None)
    resumed = _resume(runs, f"resumed-without-{without}")
    assert (_recorded(resumed)[:4] == batches[INTERRUPT:]) == (without == "rng_state")
    after = _params(resumed)
    assert not all(torch.equal(after[name], value) for name, value in params.items())


def test_checkpoint_carries_the_recipe_to_rebuild_model_and_split(runs, tmp_path):
    """``checkpoint["metarec_recipe"]`` rebuilds the model (strict load) and the task split."""
    _, full, *_, checkpoints = runs
    # weights_only: Lightning's default loading reads everything metarec adds.
    checkpoint = torch.load(checkpoints["mid-epoch"][0], weights_only=True)
    recipe = checkpoint["metarec_recipe"]
    assert recipe["data"]["batch_size"] == 16 and recipe["model"]["backbone"] == "transformer"
    assert "ckpt_path" not in recipe and "config" not in recipe
    assert checkpoint["datamodule_hyper_parameters"]["history_length"] == 5
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    rebuilt = MetarecCLI(args=["--config", str(path)], run=False)
    rebuilt.model.load_state_dict(checkpoint["state_dict"])  # strict: same architecture
    for split in ("train", "val", "test"):
        assert torch.equal(rebuilt.datamodule.splits[split].users,
                           full.datamodule.splits[split].users)
        assert torch.equal(rebuilt.datamodule.splits[split].query_items,
                           full.datamodule.splits[split].query_items)


def _order(loader, epoch: int) -> list[int]:
    loader.sampler.set_epoch(epoch)
    return [u for batch in loader for u in batch.users.tolist()]


def test_training_order_is_a_function_of_seeds_and_epoch(monkeypatch):
    """Not of the global RNG; every rank shards the same permutation; shuffle off: fixed."""
    from metarec.datamodule import EpisodeDataModule, _EpochSampler

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    dm = EpisodeDataModule(dataset_args=SMALL,
                           batch_size=4)
    loader = dm.train_dataloader()
    torch.manual_seed(1)
    first = _order(loader, 0)
    torch.manual_seed(2)
    assert _order(loader, 0) == first and _order(loader, 1) != first
    assert sorted(first) == sorted(dm.splits["train"].users.tolist())
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")  # another training seed, another order
    assert _order(dm.train_dataloader(), 0) != first
    fixed = EpisodeDataModule(dataset_args=SMALL,
                              shuffle=False)
    assert _order(fixed.train_dataloader(), 3) == fixed.splits["train"].users.tolist()
    for n in (len(dm.splits["train"]), 7):  # even and odd task counts
        single = list(_EpochSampler(n, 1, 0, True, 7))
        shards = [list(_EpochSampler(n, 2, r, True, 7)) for r in (0, 1)]
        kept = single[:2 * (n // 2)]  # the last n mod 2 positions sit out this epoch
        assert shards == [kept[0::2], kept[1::2]]
    # Fixed order over 2 ranks: a different task sits out each epoch, none twice in one.
    left_out = []
    for epoch in range(3):
        shards = []
        for r in (0, 1):
            sampler = _EpochSampler(7, 2, r, False, 0)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        seen = shards[0] + shards[1]
        assert len(seen) == len(set(seen)) == 6
        left_out.append(set(range(7)) - set(seen))
    assert left_out == [{6}, {0}, {1}]


def test_a_new_fit_in_the_same_folder_starts_from_scratch(tmp_path, capsys):
    """The interrupt checkpoint is not a resume-by-default: after an interrupted run, a fit
    without --ckpt_path in the same folder trains from step 0 (with Lightning's
    OnExceptionCheckpoint among the callbacks it would resume from the newest checkpoint)."""
    with pytest.raises(SystemExit):
        _fit(tmp_path, *INTERRUPT_AT)
    ckpt = tmp_path / "runs" / "interrupted" / "on_exception.ckpt"
    assert ckpt.exists()
    assert f"--ckpt_path {Path('runs/interrupted/on_exception.ckpt')}" in capsys.readouterr().err
    again = _fit(tmp_path)
    batches = _recorded(again)
    assert len(batches) == STEPS and batches[0][:2] == (0, 0)
    assert again.trainer.global_step == STEPS


class _InterruptInsideStep(pl.Callback):
    """Ctrl-C in the middle of training step ``step`` (after its forward and backward, before
    the optimiser step), so the exception checkpoint is taken inside the step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_from_inside_a_step_retrains_that_batch(runs, monkeypatch):
    """An exception checkpoint taken inside step 8: the resumed run trains batch 8 again, from
    the RNG state it had when the batch was handed out, and ends exactly as the uninterrupted
    run (the loader counts batches whose step has run, not batches handed out)."""
    import helpers.interrupt as helper_module

    root, full, params, batches, _ = runs
    monkeypatch.setattr(helper_module, "InsideStep", _InterruptInsideStep, raising=False)
    with pytest.raises(SystemExit):
        _fit(root / "inside", "--trainer.callbacks+",
             f"{{class_path: helpers.interrupt.InsideStep, init_args: {{step: {INTERRUPT}}}}}")
    ckpt = root / "inside" / "runs" / "interrupted" / "on_exception.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == INTERRUPT
    resumed = _fit(root / "inside-resumed", "--ckpt_path", str(ckpt))
    assert _recorded(resumed) == batches[INTERRUPT:]
    assert resumed.trainer.global_step == STEPS
    for name, value in _params(resumed).items():
        assert torch.equal(value, params[name]), name


def test_fewer_training_tasks_than_ranks_is_an_error(monkeypatch):
    """Each rank needs a task (the tail is left out, so 1 task on 2 ranks would train nothing)."""
    from metarec.datamodule import EpisodeDataModule

    dm = EpisodeDataModule(dataset_args=SMALL)
    n = len(dm.splits["train"])
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: n + 1)
    with pytest.raises(ValueError, match=f"{n} meta-training task.*{n + 1} ranks"):
        dm.train_dataloader()
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: n)
    assert len(list(dm.train_dataloader().sampler)) == 1
