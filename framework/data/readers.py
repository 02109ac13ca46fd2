"""Validated reading of delimited and Parquet files: errors name the file, line and field."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from metarec.data.errors import DataError

_FIELDS_RE = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
_UNIT = "\x1f"  # stands in for a multi-character separator, so the fast C parser can be used
_INT64 = 2.0 ** 63
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


def read_frame(path: str | Path, *, sep: str = ",", names: Sequence[str] | None = None,
               header: bool = True, encoding: str = "utf-8", quotechar: str | None = '"',
               escapechar: str | None = None, bad_lines: str = "error") -> pd.DataFrame:
    """Read a CSV/TSV/Parquet file as strings (Parquet keeps its dtypes).

    Every column is read as text so that a malformed value is reported by
    :func:`numeric_column` with its line instead of silently becoming NaN.
    A row with the wrong number of fields is a :class:`DataError` naming its line; so are a
    missing, empty (0-byte) or unreadable file and a directory given in place of a file.
    ``sep`` may be several characters (``"::"``, MovieLens-1M). ``quotechar=None`` reads
    quotes as ordinary characters (the default for ``sep="|"``).
    ``bad_lines="skip"`` leaves rows with the wrong number of fields out instead (for dumps
    known to hold a few); their lines are in ``attrs['skipped']``.
    The frame's ``attrs['line']`` holds the 1-based file line of every row.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError("is a directory; give the path of a data file (.csv, .tsv, .dat or "
                        ".parquet) inside it", source=str(path))
    if not path.exists():
        raise DataError("file not found", source=str(path))
    if path.stat().st_size == 0:
        raise DataError("file is empty (0 bytes)", source=str(path))
    if path.suffix in (".parquet", ".pq"):
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001 - corrupt file or missing engine
            raise DataError(f"cannot read Parquet: {err}", source=str(path)) from None
        frame.attrs["line"] = np.arange(len(frame)) + 1  # row numbers for Parquet
        frame.attrs["source"] = str(path)
        return frame
    if sep == "|":
        quotechar = None
    source: str | Path | io.StringIO = path
    if len(sep) > 1:
        text = _read_text(path, encoding)
        if _UNIT in text:
            raise DataError(f"contains the control character \\x1f; cannot split on {sep!r}",
                            source=str(path))
        source = io.StringIO(text.replace(sep, _UNIT))
    if bad_lines == "skip":
        return _read_skipping(path, source, sep if len(sep) == 1 else _UNIT, names, header,
                              encoding, quotechar, escapechar)
    if bad_lines != "error":
        raise ValueError(f"bad_lines must be 'error' or 'skip', got {bad_lines!r}")
    try:
        frame = pd.read_csv(source, sep=sep if len(sep) == 1 else _UNIT,
                            names=list(names) if names else None,
                            header=0 if header else None, dtype=str, encoding=encoding,
                            keep_default_na=False, skip_blank_lines=True, engine="c",
                            quoting=csv.QUOTE_MINIMAL if quotechar else csv.QUOTE_NONE,
                            quotechar=quotechar or '"', escapechar=escapechar)
    except pd.errors.ParserError as err:
        match = _FIELDS_RE.search(str(err))
        if match:
            want, line, got = (int(g) for g in match.groups())
            raise DataError(f"expected {want} fields, found {got}", source=str(path),
                            line=line) from None
        raise DataError(f"cannot parse: {err}", source=str(path)) from None
    except pd.errors.EmptyDataError:
        raise DataError("file holds no data (only blank lines)", source=str(path)) from None
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
    _check_short_rows(frame, path, sep, encoding, quotechar, escapechar)
    return frame


def _check_short_rows(frame: pd.DataFrame, path: Path, sep: str, encoding: str,
                      quotechar: str | None, escapechar: str | None) -> None:
    """A row with too few fields: pandas pads it with empty strings, so only rows whose last
    field is empty are suspects; each suspect's line is split again to count its fields."""
    if frame.shape[1] < 2 or not len(frame):
        return
    suspects = np.flatnonzero((frame.iloc[:, -1].astype(str) == "").to_numpy())
    if not len(suspects):
        return
    wanted = {int(frame.attrs["line"][r]) for r in suspects}
    with open(path, encoding=encoding, errors="replace", newline="") as handle:
        for number, text in enumerate(handle, start=1):
            if number not in wanted:
                continue
            text = text.rstrip("\r\n")
            if quotechar is None:
                found = text.count(sep) + 1
            else:
                found = len(next(csv.reader([text], delimiter=sep, quotechar=quotechar,
                                            escapechar=escapechar), [""]))
            if found < frame.shape[1]:
                raise DataError(f"expected {frame.shape[1]} fields, found {found}",
                                source=str(path), line=number)


def _read_skipping(path: Path, source: Path | io.StringIO, sep: str, names: Sequence[str] | None,
                   header: bool, encoding: str, quotechar: str | None,
                   escapechar: str | None) -> pd.DataFrame:
    """``read_frame(bad_lines="skip")``: the csv module, keeping rows of the right width."""
    columns = list(names) if names else None
    rows, lines, skipped = [], [], []
    skip_header = header or columns is None  # without header or names: the first row's width
    try:
        with (source if isinstance(source, io.StringIO)
              else open(source, encoding=encoding, newline="")) as handle:
            reader = csv.reader(handle, delimiter=sep, quotechar=quotechar or '"',
                                escapechar=escapechar,
                                quoting=csv.QUOTE_MINIMAL if quotechar else csv.QUOTE_NONE)
            start = 1
            for record in reader:
                line, start = start, reader.line_num + 1
                if not any(f.strip() for f in record):
                    continue  # a blank line
                if skip_header:
                    columns, skip_header = columns or (record if header else None), False
                    if columns is None:  # no header: the first row is data and sets the width
                        columns = list(range(len(record)))
                        rows.append(record)
                        lines.append(line)
                elif len(record) == len(columns):
                    rows.append(record)
                    lines.append(line)
                else:
                    skipped.append(line)
    except UnicodeDecodeError as err:
        raise DataError(f"not valid {encoding} text ({err.reason})", source=str(path)) from None
    except csv.Error as err:
        raise DataError(f"cannot parse: {err}", source=str(path)) from None
    frame = pd.DataFrame(rows, columns=columns, dtype=str)
    frame.attrs.update(line=np.asarray(lines, dtype=np.int64), source=str(path), skipped=skipped)
    return frame


def _read_text(path: Path, encoding: str) -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise DataError(f"not valid {encoding} text ({err.reason})", source=str(path)) from None


def _file_lines(path: Path, rows: int, header: bool, encoding: str) -> np.ndarray:
    """1-based file line of each parsed row, accounting for skipped blank lines."""
    ascii_lines = not any(n in encoding for n in ("16", "32"))  # "\n" is the byte 10
    data = path.read_bytes().rstrip() if ascii_lines else b""
    if ascii_lines and not _BLANK_LINE.search(b"\n" + data):
        # No blank line before the last row (the usual case): rows follow lines.
        return np.arange(rows, dtype=np.int64) + 1 + int(header)
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


def require_rows(frame: pd.DataFrame, expected: int, what: str) -> None:
    """Raise a :class:`DataError` naming the file unless it has exactly ``expected`` rows.

    For published data sets of known size: a truncated download or copy is caught here
    instead of silently training on part of the data. ``what`` names the release.
    """
    if len(frame) != expected:
        raise DataError(f"{len(frame):,} rows where {what} has {expected:,}: the file is "
                        "truncated or not the published release (set verify: false to read "
                        "it anyway)", source=frame.attrs.get("source"))


def id_column(frame: pd.DataFrame, column: str) -> np.ndarray:
    """One id column as strings; a null (Parquet) or empty id raises a :class:`DataError`
    naming the file, row and column. Integral floats stay as written (``"1.0"``)."""
    raw = frame[column]
    bad = raw.isna().to_numpy() | (raw.astype(str).str.strip() == "").to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        what = "null" if raw.isna().iloc[row] else "empty"
        raise DataError(f"{what} id ({int(bad.sum())} such row(s))",
                        source=frame.attrs.get("source"),
                        line=int(frame.attrs["line"][row]), field=column)
    return raw.astype(str).to_numpy()


def numeric_column(frame: pd.DataFrame, column: str, *, integer: bool = False,
                   minimum: float | None = None, maximum: float | None = None,
                   int64: bool = False) -> np.ndarray:
    """Parse one column as numbers; the first bad value raises an error naming file, line, field.

    ``integer``: every value must be a whole number; the result is int64. ``int64``: the
    result is int64 (fractions truncated), e.g. timestamps. Either way a value that does not
    fit a 64-bit integer (``1e30``) is an error, never a silent overflow.
    """
    raw = frame[column]
    values, exact = _parse_numbers(raw, integer or int64)
    bad = ~np.isfinite(values)
    if integer:
        bad |= np.isfinite(values) & (values != np.round(values))
    if minimum is not None:
        bad |= values < minimum
    if maximum is not None:
        bad |= values > maximum
    overflow = (values >= _INT64) | (values < -_INT64)
    if exact is not None or not (integer or int64):
        overflow[:] = False
    if bad.any() or overflow.any():
        row = int(np.flatnonzero(bad | overflow)[0])
        what = "an integer" if integer else "a finite number"
        bounds = ""
        if minimum is not None or maximum is not None:
            bounds = f" in [{minimum if minimum is not None else '-inf'}, " \
                     f"{maximum if maximum is not None else 'inf'}]"
        if overflow[row] and not bad[row]:
            what, bounds = "a number that fits a 64-bit integer", ""
        raise DataError(f"expected {what}{bounds}, found {raw.iloc[row]!r} "
                        f"({int((bad | overflow).sum())} bad value(s) in this column)",
                        source=frame.attrs.get("source"),
                        line=int(frame.attrs["line"][row]), field=column)
    if exact is not None and (integer or int64):
        return exact
    return values.astype(np.int64) if integer or int64 else values


def _parse_numbers(raw: pd.Series, want_int: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``(float64 values, NaN where not a number; int64 values when exact, else None)``.

    Whole columns are cast first (fast); only a column holding a bad value goes through
    ``pd.to_numeric``, which finds it. Integers are kept exactly (beyond 2**53) when they can.
    """
    if raw.dtype.kind in "iu" and raw.dtype != np.uint64:
        return raw.to_numpy(dtype=np.float64), raw.to_numpy(dtype=np.int64)
    if raw.dtype.kind not in "fiub":  # text
        try:
            if want_int:
                ints = raw.astype(np.int64).to_numpy()
                return ints.astype(np.float64), ints
        except (ValueError, TypeError, OverflowError):
            pass
        try:
            return raw.astype(np.float64).to_numpy(), None
        except (ValueError, TypeError, OverflowError):
            pass
    parsed = pd.to_numeric(raw, errors="coerce")
    values = parsed.to_numpy(dtype=np.float64, na_value=np.nan)
    exact = parsed.dtype.kind in "iu" and parsed.dtype != np.uint64
    return values, parsed.to_numpy(dtype=np.int64) if exact else None
