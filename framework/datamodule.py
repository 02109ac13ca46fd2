"""EpisodeDataModule: dataset plugin -> interaction table -> per-user tasks -> episode batches."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from metarec import registry
from metarec.data.episodes import EpisodeCollator
from metarec.data.table import InteractionTable
from metarec.data.tasks import TaskConfig, TaskSplits, build_tasks
from metarec.schema import DataSchema


class _TaskIndices:
    """A map-style dataset of task indices (so Lightning can shard it with a sampler)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


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
        shuffle: shuffle the meta-training tasks every epoch (off: a fixed task order, e.g. to
            compare a multi-process run with a single-process one batch for batch).
        history_length: when set, every support and query slot carries the user's history
            (the latest ``history_length`` support interactions strictly before the slot; see
            :mod:`metarec.data.episodes`), as sequential backbones such as ``transformer`` need.
            Off by default (batches then carry no history keys).
    """

    def __init__(self, dataset: str = "synthetic", dataset_args: dict[str, Any] | None = None,
                 tasks: TaskConfig | None = None, batch_size: int = 32,
                 eval_batch_size: int = 256, num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, history_length: int | None = None) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1")
        if history_length is not None and history_length < 1:
            raise ValueError(f"data.history_length must be >= 1 or null, got {history_length}")
        self.history_length = history_length
        self.dataset_name = dataset
        self.dataset_args = dict(dataset_args or {})
        self.task_config = tasks or TaskConfig()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed, self.shuffle = num_workers, seed, shuffle
        self._table: InteractionTable | None = None
        self._splits: TaskSplits | None = None

    @property
    def table(self) -> InteractionTable:
        if self._table is None:
            plugin = registry.build("datasets", self.dataset_name, self.dataset_args)
            self._table = plugin.load()
        return self._table

    @property
    def splits(self) -> TaskSplits:
        if self._splits is None:
            self._splits = build_tasks(self.table, self.task_config, self.seed)
        return self._splits

    @property
    def schema(self) -> DataSchema:
        """The data schema the backbone is built from (feedback mode as the tasks define it)."""
        base = self.table.schema
        return DataSchema(base.num_users, base.num_items, base.features, self.splits.feedback,
                          base.rating_range if self.splits.feedback == "explicit" else None)

    def setup(self, stage: str | None = None) -> None:
        self.splits  # noqa: B018 - build once, before the loaders are requested

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        tasks = self.splits[split]
        indices = _TaskIndices(len(tasks))
        sampler = None
        if split == "train" and torch.distributed.is_available() \
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Shard training tasks ourselves so that `shuffle: false` really is a fixed order
            # (Lightning's injected sampler would shuffle); rank r gets tasks r, r + W, ...
            # Evaluation keeps Lightning's DistributedSampler (see docs/scaling.md on its padding).
            sampler = DistributedSampler(indices, shuffle=shuffle, seed=self.seed)
            shuffle = False
        collate = EpisodeCollator(tasks, self.table, self.history_length)
        return DataLoader(indices, sampler=sampler,
                          batch_size=self.batch_size if split == "train" else self.eval_batch_size,
                          shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=collate,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
