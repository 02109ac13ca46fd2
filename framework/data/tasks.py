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
    """How tasks are cut from the interaction table (one task per user, or per item).

    Defaults follow MeLU and RecBole-MetaRec: users with 13-100 interactions, 10 query
    interactions drawn at random once per user, support = the rest, users split 8:1:1.

    ``task_by: item`` makes one task per item instead (the item cold-start protocol): every
    rule below then applies to items (the count filter counts an item's interactions, the split
    divides items, so test items are never seen in meta-training) and a task's slots hold the
    users who interacted with the item. ``query_strategy: chronological`` (the item protocol's
    cut, usable for users too) takes each task's interactions in time order (ties by row): the
    first ``support_size`` are the support and the next ``query_size`` the query; the support
    order (:meth:`TaskSet.capped`) is then the time order, so a cap of ``k`` keeps the task's
    first ``k`` interactions: the warm-up stages of ``data.warmup``.
    """

    min_interactions: PositiveInt = 13
    max_interactions: PositiveInt = 100
    query_size: PositiveInt = 10
    query_strategy: Literal["random", "latest", "chronological"] = "random"
    max_support: PositiveInt | None = None
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    feedback: Literal["explicit", "implicit"] | None = None
    positive_threshold: float | None = None
    negatives_per_positive: NonNegativeInt = 1
    task_by: Literal["user", "item"] = "user"
    support_size: PositiveInt | None = None

    def __post_init__(self) -> None:
        # The CLI builds this from jsonargparse, which passes the restricted annotations on as
        # int subclasses (PositiveInt(10)): store plain ints.
        for name in ("min_interactions", "max_interactions", "query_size", "max_support",
                     "negatives_per_positive", "support_size"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and type(value) is not int:
                setattr(self, name, int(value))
        if self.query_size < 1:
            raise ValueError(f"tasks.query_size must be >= 1, got {self.query_size}")
        if self.task_by not in ("user", "item"):
            raise ValueError(f"tasks.task_by must be 'user' or 'item', got {self.task_by!r}")
        chronological = self.query_strategy == "chronological"
        if chronological != (self.support_size is not None):
            raise ValueError("tasks.support_size is the support of query_strategy: chronological, "
                             "and chronological needs it (got query_strategy="
                             f"{self.query_strategy!r}, support_size={self.support_size!r})")
        if chronological:
            if self.support_size < 1:
                raise ValueError(f"tasks.support_size must be >= 1, got {self.support_size}")
            if self.min_interactions <= self.support_size:
                raise ValueError(f"tasks.min_interactions ({self.min_interactions}) must exceed "
                                 f"tasks.support_size ({self.support_size}) so every query is "
                                 "non-empty")
            if self.max_support is not None:
                raise ValueError("tasks.max_support cannot be combined with query_strategy: "
                                 "chronological (support_size is the support)")
        elif self.min_interactions <= self.query_size:
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
        if self.query_strategy not in ("random", "latest", "chronological"):
            raise ValueError("tasks.query_strategy must be 'random', 'latest' or 'chronological', "
                             f"got {self.query_strategy!r}")
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
    # "user": one task per user (``users`` are the task users, ``*_items`` their items);
    # "item": one task per item (``users`` holds the task *items*, ``*_items`` the users who
    # interacted with them). The collator puts each id under its own key.
    task_by: str = "user"

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
                       take(self.support_order), self.task_by)


@dataclass
class TaskSplits:
    """The three splits plus a record of what filtering dropped."""

    train: TaskSet
    val: TaskSet
    test: TaskSet
    feedback: str
    stats: dict[str, int]
    task_by: str = "user"

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

    With ``config.task_by == "item"`` the same rules run on the transposed table (items as task
    keys, users in the slots; sampled negatives are then users who never interacted with the
    item); the returned sets are marked ``task_by="item"``.
    """
    by_item = config.task_by == "item"
    if by_item:
        if assignment is not None:
            raise ConfigError("data.split_file lists users and their queries: it cannot be "
                              "combined with data.tasks.task_by: item")
        table = transposed(table)
    chronological = config.query_strategy == "chronological"
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
        who, what = ("item", "user") if by_item else ("user", "item")
        raise DataError(f"{who} {table.users[row]} interacted with {what} {table.items[row]} more than "
                        f"once (row {row}): a repeated pair could fall in both support and query; "
                        "deduplicate first (the interactions dataset's `duplicates:` option)",
                        source=table.source)
    users, times = table.users[rows], table.timestamps[rows]
    # Rank each user's interactions: by a random key, or latest first.
    if chronological:  # oldest first: support, then query
        key = times.astype(np.float64)
    else:
        key = rng.random(len(rows)) if config.query_strategy == "random" else -times.astype(np.float64)
    ordered = np.lexsort((np.arange(len(rows)), key, users))
    rank = _rank_within_groups(users[ordered])
    role = np.empty(len(rows), dtype=np.int64)  # 0 query, 1 support, 2 dropped by the support cap
    if chronological:
        is_query = (rank >= config.support_size) & (rank < config.support_size + config.query_size)
    elif assignment is None:
        is_query = rank < config.query_size
    else:
        query_keys = assignment.query_pairs[:, 0] * table.num_items + assignment.query_pairs[:, 1]
        is_query = np.isin(pairs[ordered], query_keys)
    role_sorted = np.where(is_query, 0, 1)
    if chronological:  # after the support and the query: not part of the task
        role_sorted[(~is_query) & (rank >= config.support_size)] = 2
    if config.max_support is not None:
        role_sorted[(~is_query) & (rank - config.query_size >= config.max_support)] = 2
    role[ordered] = role_sorted

    # A fixed random order of each user's support interactions (for capped evaluation).
    support_rank = np.full(len(rows), np.iinfo(np.int64).max, dtype=np.int64)
    if chronological:  # the time order itself: a cap of k keeps the first k interactions
        in_support = role_sorted == 1
        support_rank[ordered[in_support]] = rank[in_support]
    else:
        support = np.flatnonzero(role == 1)
        by_key = support[np.lexsort((order_rng.random(len(support)), users[support]))]
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
        splits[name].task_by = config.task_by
    return TaskSplits(**splits, feedback=feedback, stats=stats, task_by=config.task_by)


def transposed(table: InteractionTable) -> InteractionTable:
    """``table`` with users and items swapped (no feature tables): what :func:`build_tasks`
    cuts one task per item from."""
    return InteractionTable(users=table.items, items=table.users, labels=table.labels,
                            timestamps=table.timestamps, num_users=table.num_items,
                            num_items=table.num_users, feedback=table.feedback,
                            rating_range=table.rating_range, source=table.source)


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


SCENARIOS = ("warm", "new_user", "new_item", "new_user_new_item")


@dataclass
class ScenarioConfig:
    """MeLU's four evaluation partitions (``data.scenario``; Lee et al., KDD 2019, Sec. 4.1).

    Users (those passing the ``tasks`` count filter over the whole file) are *new* with
    probability ``new_user_fraction`` (a seeded random subset), *existing* otherwise; items are
    *new* when the raw value of their ``item_feature`` (its vocabulary, e.g. the release year)
    is a number ``>= new_from``, *existing* otherwise (unknown years included). Meta-training is
    the same in every scenario: existing users on existing items. ``name`` picks what validation
    and test score: ``warm`` (existing users, existing items: each existing user's held-out
    query), ``new_user`` (new users, existing items), ``new_item`` (existing users, new items)
    or ``new_user_new_item``. See :func:`build_scenario_tasks`.
    """

    name: Literal["warm", "new_user", "new_item", "new_user_new_item"] = "warm"
    new_user_fraction: float = 0.2
    item_feature: str = "year"
    new_from: float = 1997

    def __post_init__(self) -> None:
        if self.name not in SCENARIOS:
            raise ValueError(f"data.scenario.name must be one of {', '.join(SCENARIOS)}, "
                             f"got {self.name!r}")
        if not 0.0 < float(self.new_user_fraction) < 1.0:
            raise ValueError("data.scenario.new_user_fraction must lie in (0, 1), got "
                             f"{self.new_user_fraction}")
        self.new_user_fraction = float(self.new_user_fraction)
        self.new_from = float(self.new_from)


def new_items_of(table: InteractionTable, scenario: ScenarioConfig) -> np.ndarray:
    """``(num_items,)`` bool: the items ``scenario`` calls new (raw feature value >= new_from)."""
    feature = next((f for f in table.item_features if f.spec.name == scenario.item_feature), None)
    if feature is None or feature.spec.kind != "categorical" or feature.vocabulary is None:
        names = [f.spec.name for f in table.item_features if f.vocabulary is not None]
        raise ConfigError(f"data.scenario.item_feature={scenario.item_feature!r}: needs a "
                          "categorical item feature with raw values (a vocabulary); this data "
                          f"has {names or 'none'}")
    raw = np.array([_number(v) for v in feature.vocabulary], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        new_code = raw >= scenario.new_from  # NaN (unknown) compares False: existing
    return new_code[feature.values]


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("nan")


def scenario_partition(table: InteractionTable, config: TaskConfig, scenario: ScenarioConfig,
                       seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(eligible, new_user, new_item)`` bool arrays over users, users and items."""
    counts = np.bincount(table.users, minlength=table.num_users)
    eligible = (counts >= config.min_interactions) & (counts <= config.max_interactions)
    rng = np.random.default_rng([seed, 2])
    candidates = np.flatnonzero(eligible)
    n_new = int(round(scenario.new_user_fraction * len(candidates)))
    new_user = np.zeros(table.num_users, dtype=bool)
    new_user[rng.permutation(candidates)[:n_new]] = True
    return eligible, new_user, new_items_of(table, scenario)


def build_scenario_tasks(table: InteractionTable, config: TaskConfig, scenario: ScenarioConfig,
                         seed: int = 0) -> TaskSplits:
    """Per-user tasks for one of MeLU's four partitions (:class:`ScenarioConfig`).

    - Users passing the count filter are split existing / new (:func:`scenario_partition`);
      items existing / new.
    - Every existing user with more than ``2 * query_size`` existing-item interactions holds out
      ``query_size`` random ones (the warm query, never trained on). **train**: existing users,
      pool = their other existing-item interactions; query = ``query_size`` random ones of the
      pool, support = the rest. The same in every scenario, so one trained model can be tested
      on all four.
    - **val / test**: the scenario's users (existing ones, i.e. meta-training users, for warm
      and new_item; new ones otherwise) are
      split between val and test in the ratio ``split[1] : split[2]``; a task's pool is the
      user's interactions with the scenario's items. warm: query = the held-out warm query,
      support = the rest of the pool (the user's training interactions); otherwise query =
      ``query_size`` random ones of the pool, support = the rest.
    - A task needs more than ``query_size`` interactions in its pool (else it is left out).

    In warm and new_item, val and test users *are* meta-training users (that is what an
    existing user is); what they are scored on (held-out or new-item interactions) was never
    trained on. Deterministic in ``seed`` (its own numpy streams).
    """
    if config.task_by != "user" or config.query_strategy != "random" or config.max_support:
        raise ConfigError("data.scenario cuts MeLU's per-user tasks: it needs tasks.task_by: user, "
                          "query_strategy: random and no max_support")
    feedback = config.feedback or table.feedback
    if feedback == "implicit" and config.negatives_per_positive > 0:
        raise ConfigError("data.scenario is MeLU's rating protocol: with implicit feedback set "
                          "tasks.negatives_per_positive: 0")
    eligible, new_user, new_item = scenario_partition(table, config, scenario, seed)
    rng = np.random.default_rng([seed, 3])
    existing_user = eligible & ~new_user
    q = config.query_size
    rows = np.arange(len(table))
    in_existing = existing_user[table.users] & ~new_item[table.items]
    # The warm query of every existing user: q random existing-item interactions.
    warm = np.zeros(len(table), dtype=bool)
    sel = rows[in_existing]
    rank = _random_rank(table.users[sel], rng)
    counts = np.bincount(table.users[sel], minlength=table.num_users)
    warm[sel[(rank < q) & (counts[table.users[sel]] > 2 * q)]] = True  # the rest keeps > q

    def tasks_from(mask: np.ndarray, users_split: np.ndarray, query: np.ndarray) -> TaskSplits:
        """build_tasks on the rows of ``mask`` with the given user splits and query rows."""
        sub = InteractionTable(users=table.users[mask], items=table.items[mask],
                               labels=table.labels[mask], timestamps=table.timestamps[mask],
                               num_users=table.num_users, num_items=table.num_items,
                               feedback=table.feedback, rating_range=table.rating_range,
                               source=table.source)
        pairs = np.stack([table.users[query & mask], table.items[query & mask]], 1)
        return build_tasks(sub, config, seed, assignment=SplitAssignment(users_split, pairs))

    def random_query(mask: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The users of ``users`` with more than q rows in ``mask``, and q random rows each."""
        sel = rows[mask & users[table.users]]
        counts = np.bincount(table.users[sel], minlength=table.num_users)
        rank = _random_rank(table.users[sel], rng)
        query = np.zeros(len(table), dtype=bool)
        query[sel[rank < q]] = True
        return users & (counts > q), query

    train_rows = in_existing & ~warm
    train_users, train_query = random_query(train_rows, existing_user)
    train = tasks_from(train_rows, np.where(train_users, 0, -1), train_query).train

    cold_users = scenario.name in ("new_user", "new_user_new_item")
    cold_items = scenario.name in ("new_item", "new_user_new_item")
    # An existing user is one meta-trained on (a task of the train split).
    group = new_user if cold_users else train_users
    eval_rows = group[table.users] & (new_item[table.items] if cold_items
                                      else ~new_item[table.items])
    if scenario.name == "warm":
        counts = np.bincount(table.users[eval_rows], minlength=table.num_users)
        has_warm = np.bincount(table.users[warm], minlength=table.num_users) > 0
        eval_users, eval_query = group & has_warm & (counts > q), warm
    else:
        eval_users, eval_query = random_query(eval_rows, group)
    # Divide the scenario's users between val and test (ratio split[1] : split[2]).
    candidates = rng.permutation(np.flatnonzero(eval_users))
    held = config.split[1] + config.split[2]
    n_val = int(round(config.split[1] / held * len(candidates))) if held > 0 else 0
    split_of_user = np.full(table.num_users, -1, dtype=np.int64)
    split_of_user[candidates[:n_val]] = 1
    split_of_user[candidates[n_val:]] = 2
    if not (split_of_user >= 0).any() or not len(train):
        raise DataError(f"data.scenario {scenario.name!r}: no task left (meta-training tasks: "
                        f"{len(train)}, evaluation users: {len(candidates)})", source=table.source)
    evaluation = tasks_from(eval_rows, split_of_user, eval_query)
    stats = {"users": int(eligible.sum()), "existing_users": int(existing_user.sum()),
             "new_users": int(new_user.sum()), "new_items": int(new_item.sum()),
             "existing_items": int((~new_item).sum()), "tasks": len(train) + len(candidates)}
    return TaskSplits(train=train, val=evaluation.val, test=evaluation.test,
                      feedback=evaluation.feedback, stats=stats)


def _random_rank(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each element's position in a random order within its group (same order as ``groups``)."""
    ordered = np.lexsort((rng.random(len(groups)), groups))
    rank = np.empty(len(groups), dtype=np.int64)
    rank[ordered] = _rank_within_groups(groups[ordered])
    return rank
