"""EpisodeDataModule: dataset plugin -> interaction table -> per-user tasks -> episode batches."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, DistributedSampler

from metarec import registry
from metarec.data.episodes import EpisodeCollator, EpisodicCollator, SupportSweepCollator
from metarec.data.errors import ConfigError
from metarec.data.table import InteractionTable
from metarec.data.tasks import (
    ScenarioConfig,
    TaskConfig,
    TaskSplits,
    build_scenario_tasks,
    build_tasks,
)
from metarec.ranges import PositiveInt
from metarec.schema import DataSchema

# The datamodule's hyperparameters (in checkpoints) may hold a TaskConfig: let
# torch.load(weights_only=True), Lightning's default, read it.
torch.serialization.add_safe_globals([TaskConfig, ScenarioConfig])

# The stages of ``data.warmup`` (item cold-start papers: cold, then warm-up a, b, c).
WARMUP_STAGES = ("cold", "warm_a", "warm_b", "warm_c")


class _TaskIndices:
    """A map-style dataset of task indices (so Lightning can shard it with a sampler)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, numpy, python) as plain tensors and tuples, so
    that a checkpoint holding them still loads with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = (torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized() else [])
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _world() -> tuple[int, int]:
    """(world size, rank): (1, 0) outside ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class _EpochSampler(DistributedSampler):
    """The meta-training order: a pure function of (seed, epoch), sharded by rank.

    Every rank draws the same order (``shuffle``: a permutation from ``seed + epoch``, never
    from the global RNG, as ``DistributedSampler`` draws it; otherwise ``0..n-1``, rotated by
    ``epoch * (n mod W)``) and takes its shard ``r, r + W, ...`` (``W = 1`` in a single
    process). The last ``n mod W`` positions of the order are left out, so that no task is seen
    twice in an epoch and every rank runs the same number of steps; the rotation makes a
    different tail sit out each epoch when the order is fixed. ``start`` skips that many of
    this rank's indices in the next pass only (set when resuming mid-epoch). ``sizes`` (a
    tensor of task sizes, or a function of the epoch giving them) turns on length bucketing:
    see :meth:`_bucketed`."""

    def __init__(self, n: int, num_replicas: int, rank: int, shuffle: bool, seed: int,
                 with_epoch: bool = False,
                 sizes: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
                 batch_size: int = 1) -> None:
        super().__init__(_TaskIndices(n), num_replicas=num_replicas, rank=rank,
                         shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0
        self.with_epoch = with_epoch  # yield (task, epoch) keys, for per-epoch episode draws
        if isinstance(sizes, torch.Tensor) and len(sizes) != n:
            raise ValueError(f"bucketing needs one size per task: {len(sizes)} for {n} tasks")
        self.sizes, self.batch_size = sizes, batch_size

    def order(self) -> torch.Tensor:
        """This epoch's order of all tasks (before sharding)."""
        n = len(self.dataset)
        generator = None
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n).roll(-(self.epoch * (n % self.num_replicas)) % max(n, 1))
        return order if self.sizes is None else self._bucketed(order, generator)

    def _bucketed(self, order: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``order`` regrouped by task size (``data.bucket_by_length``).

        The last ``n mod (W * batch_size)`` tasks of ``order`` (random when shuffling) form the
        epoch's last, short step; the others are sorted by size (stable: ties keep their random
        order) and cut into global batches of ``W * batch_size`` consecutive tasks, whose order
        is shuffled. Rank ``r`` takes positions ``r, r + W, ...``, so each of its batches is
        ``batch_size`` tasks of one global batch: tasks of similar sizes, padded to little more
        than their own length. Still a permutation: every task once per epoch.
        """
        step = self.num_replicas * self.batch_size
        full = len(order) - len(order) % step
        head, tail = order[:full], order[full:]
        sizes = self.sizes(self.epoch) if callable(self.sizes) else self.sizes
        head = head[torch.sort(sizes[head], stable=True).indices]
        chunks = head.reshape(-1, step) if full else head.reshape(0, step)
        if generator is not None:
            chunks = chunks[torch.randperm(len(chunks), generator=generator)]
        return torch.cat([chunks.reshape(-1), tail])

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        shard = order[:self.total_size][self.rank:self.total_size:self.num_replicas].tolist()
        start, self.start = self.start, 0
        if self.with_epoch:
            return iter([(i, self.epoch) for i in shard[start:]])
        return iter(shard[start:])


class ResumableLoader(DataLoader):
    """The meta-training DataLoader: stateful, so that a run resumed from a mid-epoch
    checkpoint continues with exactly the next batch.

    Lightning saves ``state_dict()`` (the epoch and the batches already trained on in it) with
    the fit loop's state in every checkpoint taken during fit, and hands it back through
    ``load_state_dict()`` when ``fit(ckpt_path=...)`` resumes mid-epoch; the next pass then
    skips the batches already trained on. A batch counts once its training step has run
    (``progress``, set by the datamodule, reads Lightning's processed-batch count): a checkpoint
    taken by an exception in the middle of a step (Ctrl-C in the backward pass, say) makes the
    resumed run train that batch again, from the RNG state it had when the batch was handed
    out (:meth:`rng_for_checkpoint`). ``rng_state``, when set (by
    :meth:`EpisodeDataModule.load_state_dict`), is restored as the next pass yields its first
    batch: right before the next training step, as in the uninterrupted run. The loader draws
    nothing from the global RNG itself: its order comes from :class:`_EpochSampler`, its
    workers' base seed from its own generator.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch: int | None = None
        self._yielded = 0
        self._resume: dict[str, int] | None = None
        self.rng_state: dict[str, Any] | None = None
        self.progress: Callable[[], int] | None = None
        self._rng_at_yield: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing happens before the first batch is asked for, which is after
        # Lightning's set_epoch (Lightning creates the first iterator before it).
        sampler = self.sampler
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == sampler.epoch else 0
        sampler.start = skip * self.batch_size
        self._epoch, self._yielded = sampler.epoch, skip
        if self.generator is not None:
            self.generator.manual_seed(sampler.seed + sampler.epoch)
        for batch in super().__iter__():
            if self.rng_state is not None:
                _set_rng_state(self.rng_state)
                self.rng_state = None
            self._rng_at_yield = _rng_state()
            self._yielded += 1
            yield batch

    def _in_step(self) -> bool:
        """Whether the last batch handed out has not finished its training step."""
        return self.progress is not None and self.progress() < self._yielded

    def rng_for_checkpoint(self) -> dict[str, Any]:
        """The RNG states to save now: the current ones between steps; inside a step (an
        exception checkpoint), those of the moment its batch was handed out."""
        if self._in_step() and self._rng_at_yield is not None:
            return self._rng_at_yield
        return _rng_state()

    def state_dict(self) -> dict[str, int]:
        epoch = self.sampler.epoch if self._epoch is None else self._epoch
        return {"epoch": epoch, "batches": self._yielded - int(self._in_step())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
        # Until Lightning calls set_epoch (and should the first pass start before it).
        self.sampler.set_epoch(self._resume["epoch"])


class EpisodeDataModule(pl.LightningDataModule):
    """Loads a dataset plugin and serves batches of per-user tasks.

    Args:
        dataset: dataset plugin alias (``synthetic``, ``movielens-100k``, ``interactions``) or
            class path.
        dataset_args: arguments of the dataset plugin.
        tasks: how tasks are cut (filtering, query size and strategy, split, feedback mode).
        batch_size: tasks per meta-training batch.
        eval_batch_size: tasks per validation/test batch.
        num_workers: DataLoader workers.
        seed: seed of the user split, query draw and negative sampling (independent of the
            training seed, so several training seeds can share one split).
        shuffle: shuffle the meta-training tasks every epoch, in an order fixed by ``seed``, the
            training seed and the epoch (see :meth:`order_seed`); off: a fixed task order, e.g.
            to compare a multi-process run with a single-process one batch for batch.
        history_length: when set, every support and query slot carries the user's history
            (the latest ``history_length`` support interactions strictly before the slot; see
            :mod:`metarec.data.episodes`), as sequential backbones such as ``transformer`` need.
            Off by default (batches then carry no history keys).
        folds, fold: user-level folds: with ``folds`` F, fold ``fold`` of the eligible users
            (dealt in an order fixed by ``seed``) is the test split and the validation users come
            from the other folds; over ``fold = 0..F-1`` every eligible user is tested once.
            Off (``null``): ``tasks.split`` fractions.
        eval_support: support caps for evaluation (validation and test), e.g. ``[1, 5, null]``:
            every evaluation task is scored at each cap K (its first K support interactions in
            a fixed random order, so caps are nested; ``null`` = all of them), on the same
            users and the same query items. Metrics are then keyed ``{split}/k{K}/...``
            (``kall`` for null). Meta-training episodes are unaffected. Off by default.
        train_support: ``[k_min, k_max]``: episodic meta-training: every episode draws a fresh
            support set of ``k ~ U{k_min..k_max}`` interactions from the task's non-query pool,
            a new draw each epoch, a pure function of ``seed``, the epoch and the task (so a
            resumed run draws the same). Off: each task's whole support, every epoch.
        resample_query: also redraw each episode's query (``tasks.query_size`` interactions
            from the task's whole pool, the support from the rest). Evaluation tasks keep
            their fixed queries either way.
        bucket_by_length: length-bucketed meta-training batches: each epoch, the tasks are
            sorted by support size (ties in random order) and cut into batches, and the batches
            are shuffled, so a batch is padded only to about its own tasks' length instead of to
            the longest of a random draw. Every task is still seen exactly once per epoch, in an
            order fixed by the seed and the epoch (resume and DDP as without it; under DDP each
            step's tasks across ranks are one size group); with ``train_support`` the sizes are
            those of the epoch's episodes. The meta-gradient of a batch is unchanged (padding is
            masked); what changes is which tasks share a batch. Off by default.
        multihot_bags: multi-hot features as bags of category ids (``(..., L)`` int64, -1
            padding; see :mod:`metarec.data.episodes`) instead of dense 0/1 vectors, for every
            split; the built-in backbones gather them sparsely, with the same values. Off by
            default (a third-party backbone may expect the dense form).
        split_file: read the users of each split and every task's query items from this file
            (written by ``metarec export-split``, or by another library in the same JSON
            format: :func:`metarec.contract.write_split_file`), instead of drawing them; the
            support is every other interaction. A file that disagrees with the data is an error
            naming the user or item.
        warmup: ``k``: the item cold-start warm-up evaluation (MetaEmb, MWUF, CVAR): every
            validation/test task is scored at four stages on the same query, ``cold`` (no
            support: side information only), ``warm_a``, ``warm_b``, ``warm_c`` (its first
            ``k``, ``2k``, ``3k`` interactions in time order as support); metrics are keyed
            ``{split}/{stage}/...``. Needs ``tasks.query_strategy: chronological`` with
            ``tasks.support_size >= 3k`` (the query then follows every stage). Replaces
            ``eval_support``. Off by default.
        scenario: MeLU's four partitions (:class:`metarec.data.tasks.ScenarioConfig`):
            meta-train on existing users x existing items, validate and test on the partition
            ``scenario.name`` names. Off by default.
    """

    def __init__(self, dataset: str = "synthetic", dataset_args: dict[str, Any] | None = None,
                 tasks: TaskConfig | None = None, batch_size: int = 32,
                 eval_batch_size: int = 256, num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, history_length: int | None = None,
                 folds: int | None = None, fold: int = 0,
                 eval_support: list[PositiveInt | None] | None = None,
                 train_support: tuple[PositiveInt, PositiveInt] | None = None,
                 resample_query: bool = False, split_file: str | None = None,
                 bucket_by_length: bool = False, multihot_bags: bool = False,
                 warmup: PositiveInt | None = None,
                 scenario: ScenarioConfig | None = None) -> None:
        super().__init__()
        # Stored in checkpoints (``datamodule_hyper_parameters``); the loggers get the recipe.
        self.save_hyperparameters(logger=False)
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1")
        if history_length is not None and history_length < 1:
            raise ValueError(f"data.history_length must be >= 1 or null, got {history_length}")
        if folds is not None and not (folds >= 2 and 0 <= fold < folds):
            raise ValueError(f"data.folds must be >= 2 and data.fold in [0, folds), got "
                             f"folds={folds}, fold={fold}")
        if eval_support is not None:
            bad = [k for k in eval_support if k is not None and (isinstance(k, bool) or k < 1)]
            if not eval_support or bad or len(set(eval_support)) != len(eval_support):
                raise ValueError("data.eval_support must be a non-empty list of distinct caps "
                                 f"(ints >= 1, or null for all support), got {eval_support}")
        if train_support is not None:
            lo, hi = (int(k) for k in train_support)
            if not 1 <= lo <= hi:
                raise ValueError(f"data.train_support must be [k_min, k_max] with 1 <= k_min <= "
                                 f"k_max, got {list(train_support)}")
            train_support = (lo, hi)
        self.train_support, self.resample_query = train_support, bool(resample_query)
        self.split_file = split_file
        self.bucket_by_length, self.multihot_bags = bool(bucket_by_length), bool(multihot_bags)
        self.folds, self.fold = folds, fold
        self.eval_support = None if eval_support is None else [
            None if k is None else int(k) for k in eval_support]
        self.history_length = history_length
        # The shared history layout (see _shared_history); None: as the trainer's backbone asks.
        self.shared_history: bool | None = None
        self.dataset_name = dataset
        self.dataset_args = dict(dataset_args or {})
        self.task_config = tasks or TaskConfig()
        self.warmup = None if warmup is None else int(warmup)
        self.scenario = scenario
        if self.warmup is not None:
            cfg = self.task_config
            if self.warmup < 1 or eval_support is not None:
                raise ConfigError(f"data.warmup must be >= 1 (got {warmup}) and replaces "
                                  "data.eval_support (set only one)")
            if cfg.query_strategy != "chronological" or cfg.support_size < 3 * self.warmup:
                raise ConfigError(f"data.warmup: {self.warmup} scores each task after its first "
                                  f"{self.warmup}, {2 * self.warmup} and {3 * self.warmup} "
                                  "interactions in time order: set tasks.query_strategy: "
                                  f"chronological and tasks.support_size >= {3 * self.warmup}")
        if scenario is not None and (split_file is not None or folds is not None):
            raise ConfigError("data.scenario makes its own split: it cannot be combined with "
                              "data.split_file or data.folds")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed, self.shuffle = num_workers, seed, shuffle
        self._table: InteractionTable | None = None
        self._splits: TaskSplits | None = None
        self._rng_state: dict[str, Any] | None = None

    @property
    def table(self) -> InteractionTable:
        if self._table is None:
            plugin = registry.build("datasets", self.dataset_name, self.dataset_args)
            self._table = plugin.load()
        return self._table

    @property
    def splits(self) -> TaskSplits:
        if self._splits is None:
            assignment = None
            if self.split_file is not None:
                from metarec.contract import read_split_file

                assignment = read_split_file(self.split_file, self.table)
            if self.scenario is not None:
                self._splits = build_scenario_tasks(self.table, self.task_config, self.scenario,
                                                    self.seed)
            else:
                self._splits = build_tasks(self.table, self.task_config, self.seed,
                                           folds=self.folds, fold=self.fold,
                                           assignment=assignment)
        return self._splits

    def use_scenario(self, name: str) -> None:
        """Switch to another of MeLU's scenarios on the same data and seed (its tasks are
        rebuilt on next use): e.g. one trained model tested on every scenario's test set."""
        if self.scenario is None:
            raise ConfigError("use_scenario needs data.scenario to be set")
        self.scenario = dataclasses.replace(self.scenario, name=name)
        self._splits = None

    @property
    def schema(self) -> DataSchema:
        """The data schema the backbone is built from (feedback mode as the tasks define it)."""
        base = self.table.schema
        return DataSchema(base.num_users, base.num_items, base.features, self.splits.feedback,
                          base.rating_range if self.splits.feedback == "explicit" else None,
                          task_by=self.task_config.task_by)

    def setup(self, stage: str | None = None) -> None:
        self.splits  # noqa: B018 - build once, before the loaders are requested

    def order_seed(self) -> int:
        """Seed of the meta-training order: ``data.seed`` mixed with the training seed
        (``seed_everything``, read from ``PL_GLOBAL_SEED``; 0 if unseeded), so that several
        training seeds sharing one split still see the tasks in different orders."""
        training_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        state = np.random.SeedSequence([self.seed, training_seed]).generate_state(1)
        return int(state[0])

    def _loader(self, split: str) -> DataLoader:
        tasks = self.splits[split]
        episodic = split == "train" and (self.train_support is not None or self.resample_query)
        bags = self.multihot_bags
        shared = self._shared_history()
        if split != "train" and self.warmup is not None:
            k = self.warmup
            collate = SupportSweepCollator(tasks, self.table, [0, k, 2 * k, 3 * k],
                                           self.history_length, bags, labels=list(WARMUP_STAGES),
                                           shared_history=shared)
        elif split != "train" and self.eval_support is not None:
            collate = SupportSweepCollator(tasks, self.table, self.eval_support,
                                           self.history_length, bags, shared_history=shared)
        elif episodic:
            collate = EpisodicCollator(tasks, self.table, self.train_support,
                                       self.resample_query, self.order_seed(),
                                       self.history_length, bags, shared)
        else:
            collate = EpisodeCollator(tasks, self.table, self.history_length, bags, shared)
        # Loaders own their generator: creating an iterator draws its workers' base seed, which
        # would otherwise come from (and advance) the global torch RNG.
        common = dict(num_workers=self.num_workers, collate_fn=collate,
                      persistent_workers=self.num_workers > 0,
                      generator=torch.Generator().manual_seed(self.seed))
        world, rank = _world()
        if split != "train":
            # Fixed order. Under DDP, every task exactly once: rank r evaluates tasks r, r + W, ...
            # and ranks may run one batch more or fewer (metric states are gathered once, at
            # epoch end). Lightning's own DistributedSampler would pad the last shard with
            # repeated tasks, counting them twice. Fewer tasks than ranks: Lightning's (padded).
            sampler = None
            if world > 1 and len(tasks) >= world:
                sampler = UnrepeatedDistributedSampler(_TaskIndices(len(tasks)),
                                                       num_replicas=world, rank=rank,
                                                       shuffle=False)
            return DataLoader(_TaskIndices(len(tasks)), batch_size=self.eval_batch_size,
                              sampler=sampler, shuffle=False, **common)
        # Training tasks are sharded by metarec itself so that `shuffle: false` really is a
        # fixed order (Lightning's injected sampler would shuffle): rank r gets tasks r, r + W...
        # With W ranks, up to W - 1 tasks of the (shuffled) order are left out of an epoch so
        # that every rank runs the same number of steps; none is seen twice.
        if len(tasks) < world:
            raise ValueError(f"data: {len(tasks)} meta-training task(s) cannot be shared by {world} "
                             "ranks (each rank needs at least one); use more users or fewer ranks")
        sizes = None
        if self.bucket_by_length:
            sizes = collate.support_sizes if episodic else tasks.support_mask.sum(1)
        sampler = _EpochSampler(len(tasks), world, rank, self.shuffle, self.order_seed(),
                                with_epoch=episodic, sizes=sizes, batch_size=self.batch_size)
        return ResumableLoader(_TaskIndices(len(tasks)), sampler=sampler,
                               batch_size=self.batch_size, **common)

    def _shared_history(self) -> bool:
        """Whether the trainer's backbone asks for the shared history layout (one sequence
        per task and each slot's place in it, ``shared_history = True``, e.g. the transformer
        with ``attention: causal``) instead of per-slot histories (see metarec.data.episodes)."""
        if self.history_length is None:
            return False
        if self.shared_history is not None:  # set by hand (no trainer: benchmarks, scripts)
            return self.shared_history
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        return bool(getattr(getattr(module, "backbone", None), "shared_history", False))

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train")
        loader.rng_state, self._rng_state = self._rng_state, None
        trainer = self.trainer
        if trainer is not None:  # batches whose training step has run, in the current epoch
            loader.progress = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the global RNG states (torch CPU and CUDA, numpy, python),
        which dropout and randomised inner loops draw from: those of this moment, or, for a
        checkpoint taken inside a training step, those of the start of that step."""
        loader = getattr(self, "_train_loader", None)
        rng = loader.rng_for_checkpoint() if loader is not None else _rng_state()
        world, _ = _world()
        if world == 1:
            return {"rng": rng}
        # Under DDP the ranks' RNG states differ (each draws for its own tasks) and only rank
        # 0 writes the checkpoint: gather every rank's (every rank saves a checkpoint at the
        # same point, so all of them are here).
        states: list[Any] = [None] * world
        torch.distributed.all_gather_object(states, rng)
        return {"rng": rng, "rng_by_rank": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """On ``fit(ckpt_path=...)``: the saved RNG states (this rank's, under DDP) are restored
        when the next training batch is drawn (see :class:`ResumableLoader`), so that what
        runs between loading and training (a sanity check, say) draws nothing that the
        uninterrupted run did not."""
        world, rank = _world()
        by_rank = state.get("rng_by_rank")
        if by_rank is not None and len(by_rank) == world:
            self._rng_state = by_rank[rank]
        else:  # saved by a single process, or by a different number of ranks
            self._rng_state = state.get("rng")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
