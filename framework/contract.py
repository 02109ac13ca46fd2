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

import dataclasses
import hashlib
import json
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarec.data.errors import DataError
from metarec.data.table import InteractionTable
from metarec.data.tasks import SPLITS, SplitAssignment, TaskSet, TaskSplits

# The datamodule arguments that define which users and queries a model was trained and is
# evaluated on. The others (batch sizes, workers, eval_support, shuffle) may change freely.
CONTRACT_KEYS = ("dataset", "dataset_args", "tasks", "seed", "folds", "fold", "history_length",
                 "split_file")


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


def trained_on(ckpt: dict[str, Any], splits: TaskSplits,
               user_keys: Sequence[Hashable] | None, split: str) -> int | None:
    """How many of this run's ``split`` users the checkpoint ``ckpt`` (a loaded checkpoint, or
    its ``metarec_split``/``metarec_data`` entries) meta-trained on; None when it carries no
    split record (written before checkpoints carried one)."""
    record = ckpt.get("metarec_split")
    if record is None:
        return None
    saved_keys = (ckpt.get("metarec_data") or {}).get("user_keys")
    if getattr(splits, "task_by", "user") == "item":
        # Tasks per item: the split holds item ids, which the callers' user keys do not name;
        # compare contiguous item ids.
        saved_keys = user_keys = None
    return overlap(record, saved_keys, splits, user_keys, split)


def plain(value: Any) -> Any:
    """Settings as plain data (dataclasses as dicts, tuples as lists), e.g. a checkpoint's
    hyperparameters, for comparing with a parsed recipe or passing on a command line."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def same_split(record: dict[str, Any], splits: TaskSplits, split: str) -> bool:
    """Whether this run's ``split`` has exactly the checkpoint's tasks (users and queries)."""
    return record["fingerprint"].get(split) == fingerprint(splits[split])


# -- split files: a split written by one run (or another library, or a paper) and read back --
SPLIT_FORMAT = "metarec-split"


def _raw_ids(keys: Sequence[Hashable] | None, ids: Any) -> list[Any]:
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if keys is None:
        return values
    return [k.item() if hasattr(k, "item") else k for k in (keys[i] for i in values)]


def write_split_file(path: str | Path, splits: TaskSplits, table: InteractionTable) -> Path:
    """Write ``splits`` as a JSON split file, in raw ids: the users of each split and every
    task's query items. :func:`read_split_file` (``data.split_file``) reads it back, so another
    run (or library) can evaluate exactly these users on exactly these queries."""
    out: dict[str, Any] = {"format": SPLIT_FORMAT, "version": 1, "source": table.source,
                           "users": {}, "queries": []}
    for name in SPLITS:
        tasks = splits[name]
        out["users"][name] = _raw_ids(table.user_keys, tasks.users)
        for t, user in enumerate(tasks.users.tolist()):
            items = tasks.query_items[t][tasks.query_mask[t]]
            out["queries"].append([_raw_ids(table.user_keys, [user])[0],
                                   _raw_ids(table.item_keys, items)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out) + "\n")
    return path


def read_split_file(path: str | Path, table: InteractionTable) -> SplitAssignment:
    """A split file (see :func:`write_split_file`) as contiguous ids of ``table``; a
    :class:`DataError` naming the file and the user or item when the file and the data disagree
    (an unknown user or item, a user in two splits, a query item the user never rated, a user
    without a query)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("split file not found", source=str(path))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"not JSON: {err}", source=str(path), line=err.lineno) from None
    if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT:
        raise DataError(f"not a metarec split file (format {SPLIT_FORMAT!r} expected)",
                        source=str(path))
    lookup = lambda keys, n: ({k.item() if hasattr(k, "item") else k: i  # noqa: E731
                               for i, k in enumerate(keys)} if keys is not None else None)
    users, items = lookup(table.user_keys, table.num_users), lookup(table.item_keys, table.num_items)

    def user_id(raw: Any, field: str) -> int:
        found = users.get(raw) if users is not None else (
            raw if isinstance(raw, int) and 0 <= raw < table.num_users else None)
        if found is None:
            raise DataError(f"user {raw!r} is not in the data", source=str(path), field=field)
        return found

    split_of_user = np.full(table.num_users, -1, dtype=np.int64)
    for index, name in enumerate(SPLITS):
        for raw in (data.get("users") or {}).get(name, []):
            u = user_id(raw, f"users.{name}")
            if split_of_user[u] >= 0:
                raise DataError(f"user {raw!r} is in two splits ({SPLITS[split_of_user[u]]} and "
                                f"{name})", source=str(path), field=f"users.{name}")
            split_of_user[u] = index
    rated = set((table.users * table.num_items + table.items).tolist())
    pairs, queried = [], set()
    for n, entry in enumerate(data.get("queries") or []):
        raw_user, raw_items = entry
        u = user_id(raw_user, f"queries[{n}]")
        for raw in raw_items:
            i = items.get(raw) if items is not None else (
                raw if isinstance(raw, int) and 0 <= raw < table.num_items else None)
            if i is None or u * table.num_items + i not in rated:
                raise DataError(f"user {raw_user!r} has no interaction with item {raw!r} in the "
                                "data", source=str(path), field=f"queries[{n}]")
            pairs.append((u, i))
        queried.add(u)
    missing = [u for u in np.flatnonzero(split_of_user >= 0).tolist() if u not in queried]
    if missing:
        raw = _raw_ids(table.user_keys, missing[:3])
        raise DataError(f"{len(missing)} user(s) of the split have no query (e.g. {raw})",
                        source=str(path), field="queries")
    return SplitAssignment(split_of_user, np.asarray(pairs, dtype=np.int64).reshape(-1, 2))
