"""Episodic meta-training: a fresh support subset (and optionally query) per task and epoch."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO, synthetic_setup
from metarec.data.episodes import EpisodicCollator, episode_uniforms
from metarec.datamodule import EpisodeDataModule


def _pool(tasks, t):
    s = set(tasks.support_items[t][tasks.support_mask[t]].tolist())
    q = set(tasks.query_items[t][tasks.query_mask[t]].tolist())
    return s, q


def _episode(collate, tasks, epoch):
    return collate([(t, epoch) for t in range(len(tasks))])


def test_draws_are_fresh_per_epoch_and_fixed_per_seed_and_epoch():
    table, splits = synthetic_setup()
    tasks = splits["train"]
    collate = EpisodicCollator(tasks, table, (2, 6), False, seed=11)
    first, again = _episode(collate, tasks, 0), _episode(collate, tasks, 0)
    later = _episode(collate, tasks, 1)
    assert torch.equal(first.support["item_id"], again.support["item_id"])
    assert not torch.equal(first.support["item_id"][:, :2], later.support["item_id"][:, :2])
    other_seed = _episode(EpisodicCollator(tasks, table, (2, 6), False, seed=12), tasks, 0)
    assert not torch.equal(first.support["item_id"][:, :2], other_seed.support["item_id"][:, :2])
    sizes = first.support["mask"].sum(1)
    assert int(sizes.min()) >= 2 and int(sizes.max()) <= 6 and len(set(sizes.tolist())) > 1
    for t in range(len(tasks)):
        support, query = _pool(tasks, t)
        drawn = set(first.support["item_id"][t][first.support["mask"][t]].tolist())
        assert drawn <= support  # from the non-query pool only
        assert torch.equal(first.query["item_id"][t], tasks.query_items[t][:first.query["item_id"].shape[1]])
        times = first.support["time"][t][first.support["mask"][t]]
        assert bool((times[1:] >= times[:-1]).all())  # oldest first, for histories
    # A task's draw does not depend on the batch it lands in.
    alone = collate([(5, 0)])
    n = int(alone.support["mask"][0].sum())
    assert torch.equal(alone.support["item_id"][0, :n], first.support["item_id"][5, :n])
    # Over epochs every support interaction gets drawn: nothing is thrown away.
    seen = set()
    for epoch in range(60):
        batch = collate([(0, epoch)])
        seen |= set(batch.support["item_id"][0][batch.support["mask"][0]].tolist())
    assert seen == _pool(tasks, 0)[0]


def test_resampled_queries_come_from_the_whole_pool():
    table, splits = synthetic_setup()
    tasks = splits["train"]
    collate = EpisodicCollator(tasks, table, None, True, seed=0)
    batch = _episode(collate, tasks, 3)
    fixed = tasks.query_items
    moved = 0
    for t in range(len(tasks)):
        support, query = _pool(tasks, t)
        q = set(batch.query["item_id"][t][batch.query["mask"][t]].tolist())
        s = set(batch.support["item_id"][t][batch.support["mask"][t]].tolist())
        assert len(q) == len(query) and not (q & s) and q | s == support | query
        moved += q != set(fixed[t][tasks.query_mask[t]].tolist())
    assert moved > len(tasks) // 2


def test_uniforms_are_a_function_of_their_counters():
    u = episode_uniforms(3, torch.tensor([0, 0, 1]), torch.tensor([4, 5, 4]), 8, stream=1)
    assert u.shape == (3, 8) and bool(((u >= 0) & (u < 1)).all())
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    again = episode_uniforms(3, torch.tensor([1]), torch.tensor([4]), 8, stream=1)
    assert torch.equal(again[0], u[2])


def test_datamodule_option_is_validated_and_training_only(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    with pytest.raises(ValueError, match="train_support"):
        EpisodeDataModule(dataset_args={"num_users": 60, "num_items": 80}, train_support=(5, 2))
    dm = EpisodeDataModule(dataset_args={"num_users": 60, "num_items": 80}, batch_size=4,
                           train_support=(1, 3))
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    batch = next(iter(loader))
    assert int(batch.support["mask"].sum(1).max()) <= 3
    val = next(iter(dm.val_dataloader()))  # evaluation keeps every task's whole support
    assert int(val.support["mask"].sum(1).max()) > 3


def test_acceptance_command_fast_dev_run(in_tmp, ml100k, monkeypatch):
    from metarec.cli import MetarecCLI

    monkeypatch.setenv("METAREC_DATA", str(ml100k.parent))
    cli = MetarecCLI(args=["fit", "--config", str(REPO / "recipes/movielens-100k/mf-maml.yaml"),
                           "--data.train_support", "[1, 5]", "--trainer.fast_dev_run", "1",
                           "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    assert cli.datamodule.train_support == (1, 5)
    assert "train/loss" in cli.trainer.callback_metrics
