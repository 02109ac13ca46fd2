"""Validated reading of delimited and Parquet files: errors name the file, line and field."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from metarec.data.errors import DataError

_FIELDS_RE = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def read_frame(path: str | Path, *, sep: str = ",", names: Sequence[str] | None = None,
               header: bool = True, encoding: str = "utf-8") -> pd.DataFrame:
    """Read a CSV/TSV/Parquet file as strings (Parquet keeps its dtypes).

    Every column is read as text so that a malformed value is reported by
    :func:`numeric_column` with its line instead of silently becoming NaN.
    A row with the wrong number of fields is a :class:`DataError` naming its line.
    The frame's ``attrs['line']`` holds the 1-based file line of every row.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", source=str(path))
    if path.suffix in (".parquet", ".pq"):
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001 - corrupt file or missing engine
            raise DataError(f"cannot read Parquet: {err}", source=str(path)) from None
        frame.attrs["line"] = np.arange(len(frame)) + 1  # row numbers for Parquet
        frame.attrs["source"] = str(path)
        return frame
    try:
        frame = pd.read_csv(path, sep=sep, names=list(names) if names else None,
                            header=0 if header else None, dtype=str, encoding=encoding,
                            keep_default_na=False, skip_blank_lines=True,
                            engine="c" if len(sep) == 1 else "python",
                            quoting=csv.QUOTE_MINIMAL if sep != "|" else csv.QUOTE_NONE)
    except pd.errors.ParserError as err:
        match = _FIELDS_RE.search(str(err))
        if match:
            want, line, got = (int(g) for g in match.groups())
            raise DataError(f"expected {want} fields, found {got}", source=str(path),
                            line=line) from None
        raise DataError(f"cannot parse: {err}", source=str(path)) from None
    except UnicodeDecodeError as err:
        raise DataError(f"not valid {encoding} text ({err.reason})", source=str(path)) from None
    frame.attrs["line"] = _file_lines(path, len(frame), header, encoding)
    frame.attrs["source"] = str(path)
    if not isinstance(frame.index, pd.RangeIndex):
        # pandas silently turns the surplus leading fields of a first data row that is longer
        # than the header (or ``names``) into an index, shifting every column by one.
        want = len(frame.columns)
        raise DataError(f"expected {want} fields, found {want + frame.index.nlevels}",
                        source=str(path), line=int(frame.attrs["line"][0]))
    return frame


def _file_lines(path: Path, rows: int, header: bool, encoding: str) -> np.ndarray:
    """1-based file line of each parsed row, accounting for skipped blank lines."""
    with open(path, encoding=encoding, errors="replace") as handle:
        nonblank = [i + 1 for i, line in enumerate(handle) if line.strip()]
    lines = np.asarray(nonblank[1:] if header else nonblank, dtype=np.int64)
    return lines[:rows] if len(lines) >= rows else np.arange(rows) + 1 + int(header)


def require_columns(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    """Raise a :class:`DataError` naming the file and any missing columns."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"missing column(s) {missing}; found {list(frame.columns)}",
                        source=frame.attrs.get("source"))


def numeric_column(frame: pd.DataFrame, column: str, *, integer: bool = False,
                   minimum: float | None = None, maximum: float | None = None) -> np.ndarray:
    """Parse one column as numbers; the first bad value raises an error naming file, line, field."""
    raw = frame[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if integer:
        bad |= np.isfinite(values) & (values != np.round(values))
    if minimum is not None:
        bad |= values < minimum
    if maximum is not None:
        bad |= values > maximum
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        what = "an integer" if integer else "a finite number"
        bounds = ""
        if minimum is not None or maximum is not None:
            bounds = f" in [{minimum if minimum is not None else '-inf'}, " \
                     f"{maximum if maximum is not None else 'inf'}]"
        raise DataError(f"expected {what}{bounds}, found {raw.iloc[row]!r} "
                        f"({int(bad.sum())} bad value(s) in this column)",
                        source=frame.attrs.get("source"),
                        line=int(frame.attrs["line"][row]), field=column)
    return values.astype(np.int64) if integer else values
