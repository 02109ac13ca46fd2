"""A generic interaction log from CSV/TSV or Parquet, with optional user and item feature files.

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
with no row in its feature file gets the reserved category 0 (``<missing>``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metarec import (
    DataError,
    Dataset,
    Feature,
    FeatureSpec,
    InteractionTable,
    encode_ids,
    numeric_column,
    read_frame,
    require_columns,
)

MISSING = "<missing>"


def _sep_for(path: Path, sep: str | None) -> str:
    return sep if sep is not None else ("\t" if path.suffix in (".tsv", ".tab") else ",")


class InteractionsDataset(Dataset):
    """Interactions from a delimited or Parquet file (see module docstring for the options).

    Args:
        path: the interaction file (``.csv``, ``.tsv``, ``.parquet``).
        user_col, item_col, label_col, timestamp_col: column names.
        sep: field separator (default: tab for .tsv, else comma).
        rating_range: the declared rating scale; labels outside it are errors. ``null`` for
            labels that are not ratings.
        user_features, item_features: ``{path, id_col, categorical: [...], multihot: {...}, sep}``.
    """

    def __init__(self, path: str, user_col: str = "user", item_col: str = "item",
                 label_col: str | None = "rating", timestamp_col: str | None = "timestamp",
                 sep: str | None = None, rating_range: tuple[float, float] | None = (1.0, 5.0),
                 user_features: dict[str, Any] | None = None,
                 item_features: dict[str, Any] | None = None,
                 duplicates: str = "error") -> None:
        if duplicates not in ("error", "keep_last", "mean"):
            raise ValueError(f"duplicates must be 'error', 'keep_last' or 'mean', got {duplicates!r}")
        self.duplicates = duplicates
        self.path = Path(path)
        self.user_col, self.item_col = user_col, item_col
        self.label_col, self.timestamp_col = label_col, timestamp_col
        self.sep = sep
        self.rating_range = tuple(rating_range) if rating_range is not None else None
        self.feature_files = {"user": user_features, "item": item_features}
        for owner, spec in self.feature_files.items():
            if spec is not None:
                unknown = set(spec) - {"path", "id_col", "categorical", "multihot", "sep"}
                if unknown or "path" not in spec or "id_col" not in spec:
                    raise ValueError(f"{owner}_features needs path and id_col (and optionally "
                                     f"categorical, multihot, sep); unknown keys {sorted(unknown)}")

    def load(self) -> InteractionTable:
        frame = read_frame(self.path, sep=_sep_for(self.path, self.sep))
        cols = [self.user_col, self.item_col] + [c for c in (self.label_col, self.timestamp_col) if c]
        require_columns(frame, cols)
        for col in (self.user_col, self.item_col):
            empty = frame[col].astype(str).str.strip() == ""
            if empty.any():
                row = int(np.flatnonzero(empty.to_numpy())[0])
                raise DataError("empty id", source=str(self.path),
                                line=int(frame.attrs["line"][row]), field=col)
        users, user_keys = encode_ids(frame[self.user_col].astype(str).to_numpy())
        items, item_keys = encode_ids(frame[self.item_col].astype(str).to_numpy())
        if self.label_col:
            lo, hi = self.rating_range if self.rating_range else (None, None)
            labels = numeric_column(frame, self.label_col, minimum=lo, maximum=hi)
            feedback = "explicit"
        else:
            labels = np.ones(len(frame), dtype=np.float32)
            feedback = "implicit"
        timestamps = (numeric_column(frame, self.timestamp_col) if self.timestamp_col
                      else np.arange(len(frame))).astype(np.int64)
        users, items, labels, timestamps = self._deduplicate(frame, users, items, labels,
                                                             timestamps)
        return InteractionTable(
            users=users, items=items, labels=labels, timestamps=timestamps,
            num_users=len(user_keys), num_items=len(item_keys),
            user_features=self._features("user", user_keys),
            item_features=self._features("item", item_keys),
            feedback=feedback, rating_range=self.rating_range if feedback == "explicit" else None,
            user_keys=user_keys, item_keys=item_keys, source=str(self.path))

    def _deduplicate(self, frame, users, items, labels, timestamps):
        """Apply the ``duplicates`` policy to repeated (user, item) pairs.

        ``error`` names the first repeated row; ``keep_last`` keeps the latest row (by
        timestamp, then file order); ``mean`` keeps one row with the mean label and the latest
        timestamp. A repeated pair must never reach task building: it could fall in both a
        task's support and its query.
        """
        pair = users * (int(items.max()) + 1 if len(items) else 1) + items
        order = np.lexsort((np.arange(len(pair)), timestamps, pair))
        last = np.r_[pair[order][1:] != pair[order][:-1], True]
        if last.all():
            return users, items, labels, timestamps
        if self.duplicates == "error":
            first = int(np.flatnonzero(~last)[0])
            earlier, row = int(order[first]), int(order[first + 1])
            lines = frame.attrs["line"]
            raise DataError(f"repeated (user, item) pair: user {frame[self.user_col].iloc[row]!r} "
                            f"and item {frame[self.item_col].iloc[row]!r} already at line "
                            f"{int(lines[earlier])}; set duplicates: keep_last or mean",
                            source=str(self.path), line=int(lines[row]))
        keep = order[last]
        if self.duplicates == "mean":
            group = np.cumsum(np.r_[True, last[:-1]]) - 1  # pair index of each sorted row
            sums = np.bincount(group, weights=labels[order])
            labels = labels.astype(np.float64).copy()
            labels[keep] = sums / np.bincount(group)
        keep = np.sort(keep)
        return users[keep], items[keep], labels[keep], timestamps[keep]

    def _features(self, owner: str, keys: np.ndarray) -> list[Feature]:
        spec = self.feature_files[owner]
        if not spec:
            return []
        path = Path(spec["path"])
        frame = read_frame(path, sep=_sep_for(path, spec.get("sep")))
        categorical = list(spec.get("categorical") or [])
        multihot = dict(spec.get("multihot") or {})
        require_columns(frame, [spec["id_col"], *categorical, *multihot])
        ids = frame[spec["id_col"]].astype(str)
        dup = ids.duplicated().to_numpy()
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            raise DataError(f"duplicate {owner} id {ids.iloc[row]!r}", source=str(path),
                            line=int(frame.attrs["line"][row]), field=spec["id_col"])
        # Row of each entity (by contiguous id) in the feature file, -1 when absent.
        position = pd.Index(ids.to_numpy()).get_indexer(keys.astype(str))
        present = position >= 0
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
