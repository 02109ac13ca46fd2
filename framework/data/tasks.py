"""Turn an interaction table into per-user tasks: filter, split by user, support/query, negatives.

Everything is built once, vectorised with numpy, into padded ``(tasks, slots)`` arrays; batches
are later gathered from them by tensor indexing (see :mod:`metarec.data.episodes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from metarec.data.errors import ConfigError, DataError
from metarec.data.table import InteractionTable
from metarec.ranges import NonNegativeInt, PositiveInt

SPLITS = ("train", "val", "test")


@dataclass
class TaskConfig:
    """How tasks are cut from the interaction table (one task per user).

    Defaults follow MeLU and RecBole-MetaRec: users with 13-100 interactions, 10 query
    interactions drawn at random once per user, support = the rest, users split 8:1:1.
    """

    min_interactions: PositiveInt = 13
    max_interactions: PositiveInt = 100
    query_size: PositiveInt = 10
    query_strategy: Literal["random", "latest"] = "random"
    max_support: PositiveInt | None = None
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    feedback: Literal["explicit", "implicit"] | None = None
    positive_threshold: float | None = None
    negatives_per_positive: NonNegativeInt = 1

    def __post_init__(self) -> None:
        # The CLI builds this from jsonargparse, which passes the restricted annotations on as
        # int subclasses (PositiveInt(10)): store plain ints.
        for name in ("min_interactions", "max_interactions", "query_size", "max_support",
                     "negatives_per_positive"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and type(value) is not int:
                setattr(self, name, int(value))
        if self.query_size < 1:
            raise ValueError(f"tasks.query_size must be >= 1, got {self.query_size}")
        if self.min_interactions <= self.query_size:
            raise ValueError(f"tasks.min_interactions ({self.min_interactions}) must exceed "
                             f"tasks.query_size ({self.query_size}) so every support set is non-empty")
        if self.max_interactions < self.min_interactions:
            raise ValueError("tasks.max_interactions must be >= tasks.min_interactions")
        if self.max_support is not None and self.max_support < 1:
            raise ValueError(f"tasks.max_support must be >= 1 or null, got {self.max_support}")
        split = tuple(float(s) for s in self.split)
        if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
            raise ValueError(f"tasks.split must be three non-negative fractions summing to 1, got {split}")
        self.split = split
        if self.query_strategy not in ("random", "latest"):
            raise ValueError(f"tasks.query_strategy must be 'random' or 'latest', got {self.query_strategy!r}")
        if self.negatives_per_positive < 0:
            raise ValueError("tasks.negatives_per_positive must be >= 0")


@dataclass
class TaskSet:
    """The tasks of one split as padded arrays: ``support_*`` and ``query_*`` are ``(T, slots)``."""

    users: torch.Tensor
    support_items: torch.Tensor
    support_labels: torch.Tensor
    support_times: torch.Tensor
    support_mask: torch.Tensor
    query_items: torch.Tensor
    query_labels: torch.Tensor
    query_times: torch.Tensor
    query_mask: torch.Tensor
    # Position of each support slot in a fixed random order of the task's support interactions
    # (0 = first drawn; sampled negatives share the rank of the interaction they were drawn
    # for; padding: a large value). ``capped(k)`` keeps ranks < k: nested subsets.
    support_order: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.users)

    def capped(self, k: int | None) -> TaskSet:
        """These tasks with each support set cut to its first ``k`` interactions in the fixed
        random order (``None``: unchanged). Nested: the support at ``k`` contains the one at
        any smaller ``k``. Queries are untouched, and the kept slots stay oldest first."""
        if k is None:
            return self
        if self.support_order is None:
            raise ValueError("these tasks carry no support order (built by build_tasks)")
        keep = self.support_mask & (self.support_order < k)
        # Kept slots first, in their (chronological) slot order; then trim the padding.
        position = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        width = max(int(keep.sum(1).max()) if len(keep) else 0, 1)
        index = position[:, :width]
        take = lambda x: x.gather(1, index)  # noqa: E731
        return TaskSet(self.users, take(self.support_items), take(self.support_labels),
                       take(self.support_times), take(keep), self.query_items,
                       self.query_labels, self.query_times, self.query_mask,
                       take(self.support_order))


@dataclass
class TaskSplits:
    """The three splits plus a record of what filtering dropped."""

    train: TaskSet
    val: TaskSet
    test: TaskSet
    feedback: str
    stats: dict[str, int]

    def __getitem__(self, split: str) -> TaskSet:
        return getattr(self, split)


@dataclass
class SplitAssignment:
    """A split given from outside (``data.split_file``): each user's split (``-1`` = not a
    task; 0 train, 1 val, 2 test) and the (user, item) pairs of the queries, contiguous ids."""

    split_of_user: np.ndarray
    query_pairs: np.ndarray  # (n, 2) int64


def build_tasks(table: InteractionTable, config: TaskConfig, seed: int = 0,
                folds: int | None = None, fold: int = 0,
                assignment: SplitAssignment | None = None) -> TaskSplits:
    """Cut ``table`` into per-user tasks split 8:1:1 (by default) by user.

    With ``folds`` F, the eligible users are dealt (in a random order fixed by ``seed``) into F
    folds of near-equal size: fold ``fold`` is the test split, and the validation users are drawn
    from the other folds in the proportion ``split[1] : split[0]``. Over ``fold = 0..F-1`` every
    eligible user is a test user exactly once.

    With ``assignment`` (a split read from a file), its users and queries are used as they are:
    no interaction-count filter, no random user split or query draw (``folds`` and
    ``tasks.max_support`` cannot be combined with it); support = every other interaction.

    Deterministic in ``seed``: the user split, random query draw, support cap, support order and
    negative samples depend on nothing else.
    """
    if assignment is not None and (folds is not None or config.max_support is not None):
        raise ConfigError("data.split_file fixes the users and queries: it cannot be combined "
                         "with data.folds or data.tasks.max_support")
    if folds is not None and not (folds >= 2 and 0 <= fold < folds):
        raise ValueError(f"data.folds must be >= 2 and data.fold in [0, folds), got folds={folds}, "
                         f"fold={fold}")
    rng = np.random.default_rng(seed)
    # The support order comes from its own stream, so that the draws above (split, query,
    # negatives) are the same as before it existed.
    order_rng = np.random.default_rng([seed, 1])
    counts = np.bincount(table.users, minlength=table.num_users)
    active = counts > 0
    keep = active & (counts >= config.min_interactions) & (counts <= config.max_interactions)
    if assignment is not None:
        keep = assignment.split_of_user >= 0
    stats = {
        "users": int(active.sum()),
        "dropped_below_min": int((active & (counts < config.min_interactions)).sum()),
        "dropped_above_max": int((counts > config.max_interactions).sum()),
        "tasks": int(keep.sum()),
    }
    if not keep.any():
        raise DataError(
            f"no task left after filtering: of {stats['users']} users, "
            f"{stats['dropped_below_min']} have fewer than min_interactions={config.min_interactions} and "
            f"{stats['dropped_above_max']} more than max_interactions={config.max_interactions}",
            source=table.source)

    feedback = config.feedback or table.feedback
    if feedback == "explicit" and table.feedback == "implicit":
        raise DataError("tasks.feedback is explicit but this table has no ratings (implicit "
                        "feedback: every label is 1); use feedback: implicit", source=table.source)
    labels = table.labels
    if feedback == "implicit" and table.feedback == "explicit":
        threshold = config.positive_threshold
        labels = (labels >= threshold).astype(np.float32) if threshold is not None \
            else np.ones_like(labels)

    # Split users (not interactions): test users are never seen in meta-training.
    eligible = np.flatnonzero(keep)
    order = rng.permutation(eligible)
    split_of_user = np.full(table.num_users, -1, dtype=np.int64)
    if assignment is not None:
        split_of_user = assignment.split_of_user.astype(np.int64)
    elif folds is None:
        n_train = int(round(config.split[0] * len(order)))
        n_val = int(round(config.split[1] * len(order)))
        split_of_user[order[:n_train]] = 0
        split_of_user[order[n_train:n_train + n_val]] = 1
        split_of_user[order[n_train + n_val:]] = 2
    else:
        if len(order) < folds:
            raise DataError(f"data.folds={folds} needs at least {folds} eligible users, "
                            f"found {len(order)}", source=table.source)
        parts = np.array_split(order, folds)
        rest = np.concatenate([p for i, p in enumerate(parts) if i != fold])
        train_val = config.split[0] + config.split[1]
        n_val = int(round(config.split[1] / train_val * len(rest))) if train_val > 0 else 0
        split_of_user[rest[n_val:]] = 0
        split_of_user[rest[:n_val]] = 1
        split_of_user[parts[fold]] = 2

    rows = np.flatnonzero(keep[table.users])
    pairs = table.users[rows] * table.num_items + table.items[rows]
    if len(np.unique(pairs)) != len(pairs):
        _, first, counts = np.unique(pairs, return_index=True, return_counts=True)
        row = int(rows[first[np.flatnonzero(counts > 1)[0]]])
        raise DataError(f"user {table.users[row]} interacted with item {table.items[row]} more than "
                        f"once (row {row}): a repeated pair could fall in both support and query; "
                        "deduplicate first (the interactions dataset's `duplicates:` option)",
                        source=table.source)
    users, times = table.users[rows], table.timestamps[rows]
    # Rank each user's interactions: by a random key, or latest first.
    key = rng.random(len(rows)) if config.query_strategy == "random" else -times.astype(np.float64)
    ordered = np.lexsort((np.arange(len(rows)), key, users))
    rank = _rank_within_groups(users[ordered])
    role = np.empty(len(rows), dtype=np.int64)  # 0 query, 1 support, 2 dropped by the support cap
    if assignment is None:
        is_query = rank < config.query_size
    else:
        query_keys = assignment.query_pairs[:, 0] * table.num_items + assignment.query_pairs[:, 1]
        is_query = np.isin(pairs[ordered], query_keys)
    role_sorted = np.where(is_query, 0, 1)
    if config.max_support is not None:
        role_sorted[(~is_query) & (rank - config.query_size >= config.max_support)] = 2
    role[ordered] = role_sorted

    # A fixed random order of each user's support interactions (for capped evaluation).
    support = np.flatnonzero(role == 1)
    by_key = support[np.lexsort((order_rng.random(len(support)), users[support]))]
    support_rank = np.full(len(rows), np.iinfo(np.int64).max, dtype=np.int64)
    support_rank[by_key] = _rank_within_groups(users[by_key])
    entries = {
        "user": users, "item": table.items[rows], "label": labels[rows], "time": times,
        "role": role, "order": support_rank,
    }
    if feedback == "implicit" and config.negatives_per_positive > 0:
        entries = _add_negatives(entries, table, config.negatives_per_positive, rng)

    splits = {}
    for index, name in enumerate(SPLITS):
        split_users = np.sort(np.flatnonzero(split_of_user == index))
        splits[name] = _pad_split(entries, split_users)
    return TaskSplits(**splits, feedback=feedback, stats=stats)


def _rank_within_groups(sorted_groups: np.ndarray) -> np.ndarray:
    """Position of each element inside its run of equal values (input sorted by group)."""
    if len(sorted_groups) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    lengths = np.diff(np.r_[starts, len(sorted_groups)])
    return np.arange(len(sorted_groups)) - np.repeat(starts, lengths)


def _add_negatives(entries: dict[str, np.ndarray], table: InteractionTable, per_positive: int,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Append ``per_positive`` sampled negatives (label 0) for every kept positive, in its role.

    Negatives are items the user never interacted with anywhere in the table, distinct within
    a user; each inherits the timestamp of the interaction it was drawn for. Interactions
    already labelled 0 (below ``positive_threshold``) get no sampled negatives.
    """
    source = np.flatnonzero((entries["role"] < 2) & (entries["label"] > 0))
    source = np.repeat(source, per_positive)
    user = entries["user"][source]
    seen = np.unique(table.users * table.num_items + table.items)
    need = np.ones(len(source), dtype=bool)
    items = np.zeros(len(source), dtype=np.int64)
    for _ in range(100):
        items[need] = rng.integers(0, table.num_items, int(need.sum()))
        keys = user * table.num_items + items
        collide = np.isin(keys, seen)
        # Duplicates within a user: keep the first occurrence only.
        _, first = np.unique(keys, return_index=True)
        dup = np.ones(len(keys), dtype=bool)
        dup[first] = False
        need = collide | dup
        if not need.any():
            break
    else:
        raise DataError("could not sample enough negatives: some users have interacted with "
                        "almost every item; lower tasks.negatives_per_positive", source=table.source)
    negatives = {
        "user": user, "item": items, "label": np.zeros(len(source), dtype=np.float32),
        "time": entries["time"][source], "role": entries["role"][source],
        "order": entries["order"][source],
    }
    return {k: np.concatenate([entries[k], negatives[k]]) for k in entries}


def _pad_split(entries: dict[str, np.ndarray], split_users: np.ndarray) -> TaskSet:
    """Scatter the entries of ``split_users`` into padded (tasks, slots) arrays, oldest first."""
    task_of_user = np.full(int(entries["user"].max()) + 1 if len(entries["user"]) else 1, -1)
    task_of_user[split_users] = np.arange(len(split_users))
    task = task_of_user[entries["user"]]
    out: dict[str, torch.Tensor] = {"users": torch.as_tensor(split_users, dtype=torch.long)}
    for role, prefix in ((1, "support"), (0, "query")):
        sel = np.flatnonzero((task >= 0) & (entries["role"] == role))
        # Order each task's slots chronologically (stable on ties).
        sel = sel[np.lexsort((sel, entries["time"][sel], task[sel]))]
        t = task[sel]
        slot = _rank_within_groups(t)
        width = int(slot.max()) + 1 if len(slot) else 1
        shape = (len(split_users), width)
        items = np.zeros(shape, dtype=np.int64)
        labels = np.zeros(shape, dtype=np.float32)
        times = np.zeros(shape, dtype=np.int64)
        mask = np.zeros(shape, dtype=bool)
        order = np.full(shape, np.iinfo(np.int64).max, dtype=np.int64)
        order[t, slot] = entries["order"][sel]
        items[t, slot] = entries["item"][sel]
        labels[t, slot] = entries["label"][sel]
        times[t, slot] = entries["time"][sel]
        mask[t, slot] = True
        out[f"{prefix}_items"] = torch.from_numpy(items)
        out[f"{prefix}_labels"] = torch.from_numpy(labels)
        out[f"{prefix}_times"] = torch.from_numpy(times)
        out[f"{prefix}_mask"] = torch.from_numpy(mask)
        if role == 1:
            out["support_order"] = torch.from_numpy(order)
    return TaskSet(**out)
