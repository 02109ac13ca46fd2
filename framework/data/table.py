"""The columnar interaction table every dataset plugin produces."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np

from metarec.data.errors import DataError
from metarec.schema import DataSchema, FeatureSpec, Feedback


@dataclass
class Feature:
    """Values of one feature for every user (or item), indexed by the contiguous id."""

    spec: FeatureSpec
    values: np.ndarray  # (num_entities,) int64 codes, or (num_entities, cardinality) 0/1 float32
    # Optional: the raw value of each code of a categorical feature (``vocabulary[code]``), e.g.
    # a release year, for rules on raw values (``data.scenario``'s new items).
    vocabulary: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        spec = self.spec
        if spec.kind == "categorical":
            self.values = np.asarray(self.values, dtype=np.int64)
            if self.values.ndim != 1:
                raise DataError("categorical feature values must be one-dimensional", field=spec.key)
            if len(self.values) and (self.values.min() < 0 or self.values.max() >= spec.cardinality):
                raise DataError(f"codes must lie in [0, {spec.cardinality})", field=spec.key)
        else:
            self.values = np.asarray(self.values, dtype=np.float32)
            if self.values.ndim != 2 or self.values.shape[1] != spec.cardinality:
                raise DataError(f"multi-hot values must have shape (n, {spec.cardinality})",
                                field=spec.key)


@dataclass
class InteractionTable:
    """Interactions with contiguous integer ids, plus user and item feature tables.

    ``users[i]`` rated (or clicked) ``items[i]`` with ``labels[i]`` at ``timestamps[i]``.
    ``user_keys`` / ``item_keys`` map contiguous ids back to the source's raw ids.
    """

    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    timestamps: np.ndarray
    num_users: int
    num_items: int
    user_features: list[Feature] = field(default_factory=list)
    item_features: list[Feature] = field(default_factory=list)
    feedback: Feedback = "explicit"
    rating_range: tuple[float, float] | None = (1.0, 5.0)
    user_keys: np.ndarray | None = None
    item_keys: np.ndarray | None = None
    source: str = "<table>"

    def __post_init__(self) -> None:
        self.users = _integer_ids(self.users, "users", self.num_users, self.source)
        self.items = _integer_ids(self.items, "items", self.num_items, self.source)
        self.labels = np.asarray(self.labels, dtype=np.float32)
        self.timestamps = np.asarray(self.timestamps, dtype=np.int64)
        n = len(self.users)
        for name in ("items", "labels", "timestamps"):
            if len(getattr(self, name)) != n:
                raise DataError(f"column {name!r} has {len(getattr(self, name))} rows, users has {n}",
                                source=self.source)
        if not np.isfinite(self.labels).all():
            row = int(np.flatnonzero(~np.isfinite(self.labels))[0])
            raise DataError(f"label is not finite at row {row}", source=self.source, field="label")
        for feats, owner, count in ((self.user_features, "user", self.num_users),
                                    (self.item_features, "item", self.num_items)):
            for f in feats:
                if f.spec.owner != owner or len(f.values) != count:
                    raise DataError(f"expected {count} rows of {owner} features, got {len(f.values)}",
                                    source=self.source, field=f.spec.key)

    def __len__(self) -> int:
        return len(self.users)

    @property
    def schema(self) -> DataSchema:
        specs = tuple(f.spec for f in self.user_features + self.item_features)
        return DataSchema(self.num_users, self.num_items, specs, self.feedback, self.rating_range)


def _integer_ids(values: object, name: str, bound: int, source: str) -> np.ndarray:
    """``values`` as int64 contiguous ids in ``[0, bound)``; else a :class:`DataError` naming
    the column, the first bad row and its value (never a silent truncation of ``1.5`` to 1)."""
    raw = np.asarray(values)
    if raw.ndim != 1:
        raise DataError(f"ids must be a one-dimensional column, got shape {raw.shape}",
                        source=source, field=name)
    if raw.dtype.kind in "iu":
        ids = raw.astype(np.int64)
    else:
        if raw.dtype.kind == "f":
            numeric = raw.astype(np.float64)
        else:  # strings, objects, bools: each value must be a number (a bool is not an id)
            numeric = np.array([_as_float(v) for v in raw.tolist()], dtype=np.float64)
        bad = ~np.isfinite(numeric) | (numeric != np.round(numeric))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"id {raw.tolist()[row]!r} at row {row} is not an integer "
                            f"({int(bad.sum())} such row(s)); ids must be integers in "
                            f"[0, {bound})", source=source, field=name)
        ids = numeric.astype(np.int64)
    bad = (ids < 0) | (ids >= bound)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        why = "negative" if ids[row] < 0 else f"not below num_{name} = {bound}"
        raise DataError(f"id {int(ids[row])} at row {row} is {why} ({int(bad.sum())} such "
                        f"row(s)); ids must lie in [0, {bound})", source=source, field=name)
    return ids


def _as_float(value: object) -> float:
    if isinstance(value, bool):
        return float("nan")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return float("nan")


def encode_ids(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map raw ids to contiguous codes. Returns ``(codes, keys)`` with ``keys[codes] == raw``."""
    keys, codes = np.unique(np.asarray(raw), return_inverse=True)
    return codes.astype(np.int64), keys


class FilterReport:
    """What a dataset's filter rules dropped, printed once when the table is loaded.

    Built on the raw rows (``users[i]``, ``items[i]``: any ids); each :meth:`apply` adds a
    rule's row mask and records the users, items and rows it dropped and kept. :meth:`print`
    writes a few lines to stderr, once per process for the same report, on the first rank::

        ratings.csv: 50 users, 30 items, 1,000 rows
          min_item_interactions=5: dropped 0 users, 10 items, 120 rows; kept 50, 20, 880
    """

    _printed: set[str] = set()

    def __init__(self, source: str, users: np.ndarray, items: np.ndarray) -> None:
        self.source, self.users, self.items = source, np.asarray(users), np.asarray(items)
        self.keep = np.ones(len(self.users), dtype=bool)
        self.lines: list[str] = []

    def counts(self, mask: np.ndarray | None = None) -> tuple[int, int, int]:
        """(users, items, rows) among the rows of ``mask`` (default: those kept so far)."""
        mask = self.keep if mask is None else mask
        return (len(np.unique(self.users[mask])), len(np.unique(self.items[mask])),
                int(mask.sum()))

    def apply(self, rule: str, mask: np.ndarray) -> np.ndarray:
        """Keep only the rows where ``mask`` holds too; returns the combined mask."""
        before = self.counts()
        self.keep = self.keep & np.asarray(mask, dtype=bool)
        after = self.counts()
        users, items, rows = (b - a for b, a in zip(before, after, strict=True))
        self.lines.append(f"{rule}: dropped {users:,} users, {items:,} items, {rows:,} rows; "
                          f"kept {after[0]:,}, {after[1]:,}, {after[2]:,}")
        return self.keep

    def note(self, line: str) -> None:
        """A line of its own (e.g. rows a parser skipped before the table existed)."""
        self.lines.append(line)

    def text(self) -> str:
        users, items, rows = self.counts(np.ones(len(self.users), dtype=bool))
        head = f"{self.source}: {users:,} users, {items:,} items, {rows:,} rows"
        return "\n".join([head + ("" if self.lines else " (no filter)"),
                          *(f"  {line}" for line in self.lines)])

    def print(self) -> None:
        """Write :meth:`text` to stderr unless this process already did (or is not rank 0)."""
        text = self.text()
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        if text in FilterReport._printed or rank not in ("", "0"):
            return
        FilterReport._printed.add(text)
        print(text, file=sys.stderr, flush=True)
