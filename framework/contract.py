"""The data contract of a trained model: the data, the tasks and the user split it was fit on.

A split is part of a trained model. Evaluating a checkpoint under another ``data.seed`` (or
another fold, or other task rules) scores users the model trained on, and nothing notices
unless the checkpoint carries its split. ``metarec fit`` therefore stores, beside the
datamodule's hyperparameters (Lightning's ``datamodule_hyper_parameters``), a record of the
split (:func:`split_record`): the users of each split and a fingerprint of each split's tasks
(users, query items and labels). ``validate``/``test``/``predict`` from a checkpoint reuse the
checkpoint's data settings by default (see :mod:`metarec.cli`) and stop, naming how many users
overlap, when the users they would evaluate were meta-training users of the checkpoint
(:func:`overlap`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from metarec.data.tasks import SPLITS, TaskSet, TaskSplits

# The datamodule arguments that define which users and queries a model was trained and is
# evaluated on. The others (batch sizes, workers, eval_support, shuffle) may change freely.
CONTRACT_KEYS = ("dataset", "dataset_args", "tasks", "seed", "folds", "fold", "history_length")


def fingerprint(tasks: TaskSet) -> str:
    """A short hash of a split's tasks: its users and their query items and labels."""
    digest = hashlib.sha256()
    for tensor in (tasks.users, tasks.query_items, tasks.query_labels, tasks.query_mask):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def split_record(splits: TaskSplits) -> dict[str, Any]:
    """What a checkpoint stores about its split: per split, the (contiguous) user ids and the
    fingerprint. Plain tensors and strings, so ``torch.load(weights_only=True)`` reads it."""
    return {"users": {name: splits[name].users.clone() for name in SPLITS},
            "fingerprint": {name: fingerprint(splits[name]) for name in SPLITS}}


def _raw(ids: torch.Tensor, keys: Sequence[Hashable] | None) -> set[Hashable]:
    """Raw user ids (when the table has raw keys), else the contiguous ids."""
    values = ids.tolist()
    return set(values) if keys is None else {keys[i] for i in values}


def overlap(record: dict[str, Any], saved_keys: Sequence[Hashable] | None, splits: TaskSplits,
            current_keys: Sequence[Hashable] | None, split: str) -> int:
    """How many users of this run's ``split`` were meta-training users of the checkpoint.

    Compared by raw user id when both sides have raw ids (so a re-encoded table still
    compares right), else by contiguous id."""
    both = saved_keys is not None and current_keys is not None
    trained = _raw(record["users"]["train"], saved_keys if both else None)
    evaluated = _raw(splits[split].users, list(current_keys) if both else None)
    return len(trained & evaluated)


def same_split(record: dict[str, Any], splits: TaskSplits, split: str) -> bool:
    """Whether this run's ``split`` has exactly the checkpoint's tasks (users and queries)."""
    return record["fingerprint"].get(split) == fingerprint(splits[split])
