"""A generic interaction log from CSV/TSV/.dat or Parquet, with optional user and item feature files.

Example recipe section::

    data:
      dataset: interactions
      dataset_args:
        path: data/ratings.csv
        user_col: user_id
        item_col: movie_id
        label_col: rating          # null: every row is a positive (implicit feedback)
        timestamp_col: ts          # null: row order is time order
        rating_range: [1, 5]
        item_features:
          path: data/movies.csv
          id_col: movie_id
          categorical: [language]
          multihot: {genres: "|"}   # column -> separator of its tokens

Raw ids may be any strings or numbers; they are mapped to contiguous ids. A user or item
with no row in its feature file gets the reserved category 0 (``<missing>``); a feature file
that matches none of the log's ids is an error, one that matches fewer than half a warning.

Counts and clicks: ``label_transform`` (``log1p``, ``{binarize: t}``, ``{clip: [lo, hi]}``,
or a list of them applied in order), ``min_user_interactions`` / ``min_item_interactions``.
What the filter rules dropped is printed once when the log is loaded.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metarec import (
    DataError,
    Dataset,
    Feature,
    FeatureSpec,
    FilterReport,
    InteractionTable,
    PositiveInt,
    encode_ids,
    id_column,
    numeric_column,
    read_frame,
    require_columns,
)

MISSING = "<missing>"
SEPARATORS = ("::", "\t", ",", ";", "|")  # tried in this order when sep is not given
FEATURE_KEYS = {"path", "id_col", "categorical", "multihot", "sep", "names"}
LabelTransform = str | dict[str, Any] | list[str | dict[str, Any]] | None


def infer_sep(path: Path, sep: str | None = None) -> str:
    """``sep`` if given; tab for .tsv/.tab; else the first of :data:`SEPARATORS` found in the
    file's first non-blank line (``::`` for MovieLens-style .dat files); else a comma."""
    if sep is not None:
        return sep
    if path.suffix in (".tsv", ".tab"):
        return "\t"
    if path.suffix in (".parquet", ".pq") or not path.is_file():
        return ","
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = next((line for line in handle if line.strip()), "")
    return next((s for s in SEPARATORS if s in first), ",")


def parse_transform(spec: LabelTransform) -> list[tuple[str, Any]]:
    """``label_transform`` as a list of ``(name, argument)`` steps; a bad one is a ValueError."""
    steps = []
    for step in ([] if spec is None else spec if isinstance(spec, list) else [spec]):
        if step == "log1p":
            steps.append(("log1p", None))
            continue
        if not isinstance(step, dict) or len(step) != 1 or \
                next(iter(step)) not in ("binarize", "clip", "log1p"):
            raise ValueError(f"label_transform: expected 'log1p', {{binarize: threshold}} or "
                             f"{{clip: [lo, hi]}} (or a list of them), got {step!r}")
        name, arg = next(iter(step.items()))
        if name == "clip" and not (isinstance(arg, list | tuple) and len(arg) == 2
                                   and float(arg[0]) <= float(arg[1])):
            raise ValueError(f"label_transform: clip needs [lo, hi] with lo <= hi, got {arg!r}")
        if name == "binarize" and isinstance(arg, bool | list | dict | None):
            raise ValueError(f"label_transform: binarize needs a threshold, got {arg!r}")
        steps.append((name, None if name == "log1p" else
                      (float(arg[0]), float(arg[1])) if name == "clip" else float(arg)))
    if any(name == "binarize" for name, _ in steps[:-1]):
        raise ValueError("label_transform: binarize must be the last step")
    return steps


class InteractionsDataset(Dataset):
    """Interactions from a delimited or Parquet file (see module docstring for the options).

    Args:
        path: the interaction file (``.csv``, ``.tsv``, ``.dat``, ``.parquet``).
        user_col, item_col, label_col, timestamp_col: column names.
        sep: field separator (default: tab for .tsv, else inferred from the first line:
            ``::``, tab, comma, ``;`` or ``|``).
        names: column names of a file without a header row (e.g. MovieLens' ratings.dat).
        rating_range: the declared rating scale; labels outside it are errors. ``null`` for
            labels that are not ratings (counts, clicks).
        user_features, item_features: ``{path, id_col, categorical: [...], multihot: {...},
            sep, names}``.
        duplicates: a repeated (user, item) pair is an ``error``, or ``keep_last`` / ``mean``.
        label_transform: ``log1p``, ``{binarize: threshold}`` (label 1 at or above the
            threshold, else 0: implicit feedback), ``{clip: [lo, hi]}``, or a list of them.
        min_user_interactions, min_item_interactions: drop items, then users, with fewer
            interactions (one pass, after the duplicates rule).
    """

    def __init__(self, path: str, user_col: str = "user", item_col: str = "item",
                 label_col: str | None = "rating", timestamp_col: str | None = "timestamp",
                 sep: str | None = None, rating_range: tuple[float, float] | None = (1.0, 5.0),
                 user_features: dict[str, Any] | None = None,
                 item_features: dict[str, Any] | None = None,
                 duplicates: str = "error", names: list[str] | None = None,
                 label_transform: LabelTransform = None,
                 min_user_interactions: PositiveInt = 1,
                 min_item_interactions: PositiveInt = 1) -> None:
        if duplicates not in ("error", "keep_last", "mean"):
            raise ValueError(f"duplicates must be 'error', 'keep_last' or 'mean', got {duplicates!r}")
        self.duplicates = duplicates
        self.path = Path(path)
        self.user_col, self.item_col = user_col, item_col
        self.label_col, self.timestamp_col = label_col, timestamp_col
        self.sep, self.names = sep, list(names) if names else None
        self.rating_range = tuple(rating_range) if rating_range is not None else None
        self.transform = parse_transform(label_transform)
        if self.transform and not label_col:
            raise ValueError("label_transform needs a label_col (without one every label is 1)")
        self.min_counts = {"item": int(min_item_interactions), "user": int(min_user_interactions)}
        if min(self.min_counts.values()) < 1:
            raise ValueError("min_user_interactions and min_item_interactions must be >= 1")
        self.feature_files = {"user": user_features, "item": item_features}
        for owner, spec in self.feature_files.items():
            if spec is not None:
                unknown = set(spec) - FEATURE_KEYS
                if unknown or "path" not in spec or "id_col" not in spec:
                    raise ValueError(f"{owner}_features needs path and id_col (and optionally "
                                     f"categorical, multihot, sep, names); unknown keys "
                                     f"{sorted(unknown)}")

    def load(self) -> InteractionTable:
        frame = _read(self.path, self.sep, self.names)
        cols = [self.user_col, self.item_col] + [c for c in (self.label_col, self.timestamp_col) if c]
        require_columns(frame, cols)
        users, user_keys = encode_ids(id_column(frame, self.user_col))
        items, item_keys = encode_ids(id_column(frame, self.item_col))
        if self.label_col:
            lo, hi = self.rating_range if self.rating_range else (None, None)
            labels = numeric_column(frame, self.label_col, minimum=lo, maximum=hi)
        else:
            labels = np.ones(len(frame), dtype=np.float32)
        timestamps = (numeric_column(frame, self.timestamp_col, int64=True)
                      if self.timestamp_col else np.arange(len(frame), dtype=np.int64))
        report = FilterReport(str(self.path), users, items)
        keep, labels = self._deduplicate(frame, users, items, labels, timestamps)
        if not keep.all():
            report.apply(f"duplicates={self.duplicates}", keep)
        labels, feedback, rating_range = self._transform(frame, labels)
        for owner, ids in (("item", items), ("user", users)):
            if self.min_counts[owner] > 1:
                counts = np.bincount(ids[report.keep], minlength=int(ids.max()) + 1)
                report.apply(f"min_{owner}_interactions={self.min_counts[owner]}",
                             counts[ids] >= self.min_counts[owner])
        report.print()
        keep = report.keep
        if not keep.any():
            raise DataError("no interaction left after the filter rules (see the report "
                            "above)", source=str(self.path))
        kept_users, users = np.unique(users[keep], return_inverse=True)
        kept_items, items = np.unique(items[keep], return_inverse=True)
        user_keys, item_keys = user_keys[kept_users], item_keys[kept_items]
        return InteractionTable(
            users=users.ravel(), items=items.ravel(), labels=labels[keep],
            timestamps=timestamps[keep], num_users=len(user_keys), num_items=len(item_keys),
            user_features=self._features("user", user_keys),
            item_features=self._features("item", item_keys),
            feedback=feedback, rating_range=rating_range,
            user_keys=user_keys, item_keys=item_keys, source=str(self.path))

    def _transform(self, frame: pd.DataFrame, labels: np.ndarray):
        """Apply ``label_transform``: returns ``(labels, feedback, rating_range)``."""
        if not self.label_col:
            return labels, "implicit", None
        labels = labels.astype(np.float64)
        feedback, scale = "explicit", self.rating_range
        for name, arg in self.transform:
            if name == "log1p":
                bad = labels < 0
                if bad.any():
                    row = int(np.flatnonzero(bad)[0])
                    raise DataError(f"label_transform log1p needs labels >= 0, found "
                                    f"{labels[row]:g}", source=frame.attrs["source"],
                                    line=int(frame.attrs["line"][row]), field=self.label_col)
                labels = np.log1p(labels)
                scale = None if scale is None else (float(np.log1p(scale[0])),
                                                    float(np.log1p(scale[1])))
            elif name == "clip":
                labels = np.clip(labels, *arg)
                scale = arg
            else:  # binarize
                labels = (labels >= arg).astype(np.float64)
                feedback, scale = "implicit", None
        return labels, feedback, scale

    def _deduplicate(self, frame, users, items, labels, timestamps):
        """Apply the ``duplicates`` policy to repeated (user, item) pairs: returns the rows
        to keep and the labels (``mean`` averages a pair's labels into its kept row).

        ``error`` names the first repeated row; ``keep_last`` keeps the latest row (by
        timestamp, then file order); ``mean`` keeps one row with the mean label and the latest
        timestamp. A repeated pair must never reach task building: it could fall in both a
        task's support and its query.
        """
        keep = np.ones(len(users), dtype=bool)
        pair = users * (int(items.max()) + 1 if len(items) else 1) + items
        order = np.lexsort((np.arange(len(pair)), timestamps, pair))
        last = np.r_[pair[order][1:] != pair[order][:-1], True]
        if last.all():
            return keep, labels
        if self.duplicates == "error":
            first = int(np.flatnonzero(~last)[0])
            earlier, row = int(order[first]), int(order[first + 1])
            lines = frame.attrs["line"]
            raise DataError(f"repeated (user, item) pair: user {frame[self.user_col].iloc[row]!r} "
                            f"and item {frame[self.item_col].iloc[row]!r} already at line "
                            f"{int(lines[earlier])}; set duplicates: keep_last or mean",
                            source=str(self.path), line=int(lines[row]))
        rows = order[last]
        if self.duplicates == "mean":
            group = np.cumsum(np.r_[True, last[:-1]]) - 1  # pair index of each sorted row
            sums = np.bincount(group, weights=labels[order])
            labels = labels.astype(np.float64).copy()
            labels[rows] = sums / np.bincount(group)
        keep[:] = False
        keep[rows] = True
        return keep, labels

    def _features(self, owner: str, keys: np.ndarray) -> list[Feature]:
        spec = self.feature_files[owner]
        if not spec:
            return []
        path = Path(spec["path"])
        frame = _read(path, spec.get("sep"), spec.get("names"))
        categorical = list(spec.get("categorical") or [])
        multihot = dict(spec.get("multihot") or {})
        require_columns(frame, [spec["id_col"], *categorical, *multihot])
        ids = pd.Series(id_column(frame, spec["id_col"]))
        dup = ids.duplicated().to_numpy()
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            raise DataError(f"duplicate {owner} id {ids.iloc[row]!r}", source=str(path),
                            line=int(frame.attrs["line"][row]), field=spec["id_col"])
        # Row of each entity (by contiguous id) in the feature file, -1 when absent.
        position = pd.Index(ids.to_numpy()).get_indexer(keys.astype(str))
        present = position >= 0
        _check_coverage(owner, path, spec["id_col"], ids.to_numpy(), keys.astype(str), present)
        out = []
        for col in categorical:
            values = frame[col].astype(str).to_numpy()
            vocab = np.unique(values)
            codes = np.zeros(len(keys), dtype=np.int64)  # 0 = <missing>
            codes[present] = np.searchsorted(vocab, values[position[present]]) + 1
            out.append(Feature(FeatureSpec(col, owner, "categorical", len(vocab) + 1), codes))
        for col, sep in multihot.items():
            tokens = frame[col].astype(str).str.split(sep)
            vocab = sorted({t for row in tokens for t in row if t})
            index = {t: j for j, t in enumerate(vocab)}
            hot = np.zeros((len(frame), max(len(vocab), 1)), dtype=np.float32)
            rows = np.repeat(np.arange(len(frame)), tokens.str.len().to_numpy())
            flat = [index.get(t, -1) for row in tokens for t in row]
            keep = np.asarray(flat) >= 0
            hot[rows[keep], np.asarray(flat)[keep]] = 1.0
            values = np.zeros((len(keys), hot.shape[1]), dtype=np.float32)
            values[present] = hot[position[present]]
            out.append(Feature(FeatureSpec(col, owner, "multihot", hot.shape[1]), values))
        return out


def _read(path: Path, sep: str | None, names: list[str] | None) -> pd.DataFrame:
    """The file as strings; a header-only file is an error (there is nothing to learn from)."""
    frame = read_frame(path, sep=infer_sep(path, sep), names=names, header=not names)
    if not len(frame):
        raise DataError("no data rows (only a header)", source=str(path))
    return frame


_FLOAT_ID = re.compile(r"^-?\d+\.0+$")


def _check_coverage(owner: str, path: Path, id_col: str, ids: np.ndarray, keys: np.ndarray,
                    present: np.ndarray) -> None:
    """A feature file must describe the log's entities: none matched is an error (with the
    usual cause, ``1.0`` vs ``1``, spelled out), fewer than half a warning."""
    matched, total = int(present.sum()), len(keys)
    ids, keys = [str(i) for i in ids[:100]], [str(k) for k in keys[:100]]
    if matched == 0:
        hint = ""
        if any(map(_FLOAT_ID.match, ids)) and not any(map(_FLOAT_ID.match, keys)):
            hint = (f"; its ids look float-formatted ({ids[0]!r} vs {keys[0]!r}): write "
                    f"{id_col} as integers")
        raise DataError(f"none of the {total:,} {owner} ids of the log has a row here (log ids "
                        f"e.g. {', '.join(map(repr, keys[:3]))}; {id_col} e.g. "
                        f"{', '.join(map(repr, ids[:3]))}){hint}", source=str(path), field=id_col)
    if matched < 0.5 * total:
        warnings.warn(f"{path}: only {matched:,} of the {total:,} {owner}s of the log "
                      f"({matched / total:.0%}) have a row here; the other {total - matched:,} "
                      f"get the {MISSING} category", stacklevel=3)
