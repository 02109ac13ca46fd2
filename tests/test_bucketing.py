"""Length-bucketed meta-training batches (``data.bucket_by_length``): every task once per epoch,
deterministic, shardable and resumable, less padding, and the same meta-gradient per batch."""

from __future__ import annotations

import pytest
import torch
from test_maml_gradient import _reference_meta_grad

from conftest import synthetic_setup
from metarec import FunctionalModel, select_parameters
from metarec.data import EpisodeCollator
from metarec.datamodule import EpisodeDataModule, _EpochSampler
from metarec_plugins.algorithms.maml import MAML
from metarec_plugins.backbones.melu import MeLU

SIZES = torch.randint(1, 60, (103,), generator=torch.Generator().manual_seed(0))


def _epoch(sampler: _EpochSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def _batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_task_exactly_once_per_epoch(shuffle):
    sampler = _EpochSampler(len(SIZES), 1, 0, shuffle, seed=7, sizes=SIZES, batch_size=8)
    orders = [_epoch(sampler, e) for e in range(4)]
    for order in orders:
        assert sorted(order) == list(range(len(SIZES)))
    if shuffle:
        assert len({tuple(o) for o in orders}) == 4  # a new order every epoch
    again = _EpochSampler(len(SIZES), 1, 0, shuffle, seed=7, sizes=SIZES, batch_size=8)
    assert _epoch(again, 2) == orders[2]  # a pure function of (seed, epoch)
    if shuffle:
        other = _EpochSampler(len(SIZES), 1, 0, shuffle, seed=8, sizes=SIZES, batch_size=8)
        assert _epoch(other, 2) != orders[2]


def test_batches_group_similar_sizes_and_pad_less():
    plain = _EpochSampler(len(SIZES), 1, 0, True, seed=1, batch_size=8)
    bucketed = _EpochSampler(len(SIZES), 1, 0, True, seed=1, sizes=SIZES, batch_size=8)

    def padding(order):  # padded slots of the full batches (each padded to its longest task)
        return sum(int(SIZES[b].max()) * len(b) - int(SIZES[b].sum())
                   for b in _batches(order, 8) if len(b) == 8)
    order = _epoch(bucketed, 0)
    assert padding(order) < 0.3 * padding(_epoch(plain, 0))
    # Full batches hold tasks of one size range; they come in shuffled order, not sorted.
    maxima = [int(SIZES[b].max()) for b in _batches(order, 8) if len(b) == 8]
    assert maxima != sorted(maxima)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_shards_cover_each_task_at_most_once_and_share_size_groups(world):
    shards = [_epoch(_EpochSampler(len(SIZES), world, r, True, seed=3, sizes=SIZES,
                                   batch_size=4), 1) for r in range(world)]
    seen = [i for s in shards for i in s]
    assert len(seen) == len(set(seen)) == len(SIZES) - len(SIZES) % world
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    # Step j of every rank comes from one global batch of world * 4 consecutive sorted tasks.
    for step in range(len(shards[0]) // 4 - 1):
        sizes = torch.cat([SIZES[s[4 * step:4 * step + 4]] for s in shards])
        spread = int(sizes.max() - sizes.min())
        assert spread <= int(SIZES.max() - SIZES.min()) // 2


def test_resume_skips_exactly_the_batches_already_trained():
    sampler = _EpochSampler(len(SIZES), 1, 0, True, seed=5, sizes=SIZES, batch_size=8)
    full = _epoch(sampler, 3)
    sampler.set_epoch(3)
    sampler.start = 16
    assert list(sampler) == full[16:]


def test_episodic_sizes_are_the_drawn_ones():
    from metarec.data.episodes import EpisodicCollator

    table, splits = synthetic_setup()
    tasks = splits["train"]
    for support, resample in (((2, 9), False), (None, True), ((3, 5), True)):
        collate = EpisodicCollator(tasks, table, support, resample, seed=4)
        for epoch in (0, 3):
            batch = collate([(t, epoch) for t in range(len(tasks))])
            assert torch.equal(collate.support_sizes(epoch), batch.support["mask"].sum(1))


def _train_users(dm: EpisodeDataModule, epoch: int) -> list[list[int]]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [b.users.tolist() for b in loader]


@pytest.mark.parametrize("train_support", [None, (1, 6)])
def test_datamodule_epoch_sees_every_task_once(monkeypatch, train_support):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    args = dict(dataset_args={"num_users": 90, "num_items": 70}, batch_size=8,
                train_support=train_support)
    dm = EpisodeDataModule(bucket_by_length=True, **args)
    plain = EpisodeDataModule(**args)
    tasks = dm.splits.train
    for epoch in (0, 1):
        users = [u for b in _train_users(dm, epoch) for u in b]
        assert sorted(users) == sorted(tasks.users.tolist())
    assert _train_users(dm, 1) == _train_users(dm, 1)
    # Less padding than the same epoch unbucketed.
    def padded(module):
        loader = module.train_dataloader()
        loader.sampler.set_epoch(0)
        return sum(b.support["mask"].numel() for b in loader)
    assert padded(dm) < padded(plain)


def test_bucketed_batch_meta_gradient_equals_per_task_reference():
    table, splits = synthetic_setup()
    tasks = splits["train"]
    sizes = tasks.support_mask.sum(1)
    sampler = _EpochSampler(len(tasks), 1, 0, True, seed=0, sizes=sizes, batch_size=5)
    indices = _batches(_epoch(sampler, 0), 5)[1]
    batch = EpisodeCollator(tasks, table)(indices)
    for side in (batch.support, batch.query):
        for key, value in side.items():
            if value.is_floating_point():
                side[key] = value.double()
    torch.manual_seed(0)
    backbone = MeLU(table.schema, embedding_dim=4, hidden=(8, 6)).double()
    model = FunctionalModel(backbone, select_parameters(backbone,
                                                        backbone.default_fast_parameters()),
                            "explicit")
    loss, _ = MAML(inner_steps=3, inner_lr=0.1).outer_loss(model, batch)
    ours = torch.autograd.grad(loss, list(backbone.parameters()), allow_unused=True)
    ref_loss, ref = _reference_meta_grad(backbone, batch, 3, 0.1, first_order=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-7, atol=1e-9)
    for (name, _), a, b in zip(backbone.named_parameters(), ours, ref):
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b, rtol=1e-5,
                                   atol=1e-8, msg=name)
