"""``metarec adapt``: adapt the users of an interactions file, print their top-k; with a
checkpoint of tasks per item (``data.tasks.task_by: item``), adapt its items and print each
item's top-k users."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from metarec.adapter import Adapter

__all__ = ["adapt_command", "read_interactions"]


def read_interactions(path: str | Path, adapter: Adapter) -> dict[int, tuple[torch.Tensor, ...]]:
    """Events per task entity of a CSV/Parquet file with columns ``user, item, label[,
    timestamp]`` (any column order; the same file format for both sides).

    Ids are raw ids when the checkpoint stores keys (as in the training data), else contiguous
    ids. The rows are grouped by the checkpoint's task entity (``adapter.task_by``): returns
    ``{contiguous user: (items, labels, times or None)}``, or with tasks per item
    ``{contiguous item: (users, labels, times or None)}``, in order of first appearance, each
    one's events in timestamp order (file order without timestamps). A bad value raises a
    :class:`DataError` naming the file, line and field.
    """
    from metarec.data import DataError, numeric_column, read_frame, require_columns

    frame = read_frame(path)
    require_columns(frame, ["user", "item", "label"])
    source, lines = frame.attrs.get("source"), frame.attrs["line"]

    def ids(field: str, keys: list[Hashable] | None, count: int) -> np.ndarray:
        if keys is None:
            return numeric_column(frame, field, integer=True, minimum=0, maximum=count - 1)
        if all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in keys):
            raw: Sequence[Hashable] = numeric_column(frame, field, integer=True).tolist()
        else:
            raw = frame[field].astype(str).tolist()
            keys = [str(k) for k in keys]
        index = {k: i for i, k in enumerate(keys)}
        out = np.empty(len(raw), dtype=np.int64)
        for row, key in enumerate(raw):
            code = index.get(key)
            if code is None:
                raise DataError(f"unknown {field} id {key!r}: not among the checkpoint's "
                                f"{count} {field}s", source=source, line=int(lines[row]),
                                field=field)
            out[row] = code
        return out

    found = {"user": ids("user", adapter.user_keys, adapter.num_users),
             "item": ids("item", adapter.item_keys, adapter.num_items)}
    # `users`: the task entity of each row (users, or items with tasks per item); `items`: the
    # other side (what the entity's events are about).
    users, items = found[adapter.task_by], found[adapter.other]
    schema = adapter.schema
    low, high = ((0.0, 1.0) if schema.feedback == "implicit" else
                 (schema.rating_range or (None, None)))
    labels = numeric_column(frame, "label", minimum=low, maximum=high)
    times = numeric_column(frame, "timestamp", integer=True) if "timestamp" in frame else None
    # Grouped by task entity; within one by timestamp (file order on ties, or without timestamps).
    order = np.lexsort((np.arange(len(users)),) + (() if times is None else (times,)) + (users,))
    first = {}
    for u in users.tolist():
        first.setdefault(u, len(first))
    grouped: dict[int, tuple[torch.Tensor, ...]] = {}
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    for rows in np.split(order, bounds) if len(order) else []:
        user = int(users[rows[0]])
        grouped[user] = (torch.as_tensor(items[rows], device=adapter.device),
                         torch.as_tensor(labels[rows], dtype=torch.float32, device=adapter.device),
                         None if times is None else torch.as_tensor(times[rows],
                                                                    device=adapter.device))
    return {u: grouped[u] for u in sorted(grouped, key=first.__getitem__)}


def adapt_command(argv: Any, stream: Any = None) -> None:
    """``metarec adapt``: adapt the users of an interactions file and print their top-k as JSON
    Lines (one object per user: ``{"user": id, "items": [ids], "scores": [floats]}``); with a
    checkpoint of tasks per item, adapt the file's items and print each one's top-k users
    (``{"item": id, "users": [ids], "scores": [floats]}``).

    ``argv``: the command's parsed arguments (:func:`metarec.cli.add_adapt_arguments`), or an
    argument list (``["--ckpt_path", CKPT, "--interactions", FILE]``) parsed here."""
    import json
    import sys

    from metarec.cli import EXTRA_COMMANDS, add_adapt_arguments, new_parser
    from metarec.data import DataError
    from metarec.registry import PluginError

    if isinstance(argv, (list, tuple)):
        parser = new_parser(prog="metarec adapt", description=EXTRA_COMMANDS["adapt"])
        add_adapt_arguments(parser)
        argv = parser.parse_args(list(argv))
    args = argv
    stream = stream or sys.stdout
    from metarec.adapter import Adapter

    try:
        adapter = Adapter.from_checkpoint(args.ckpt_path, policy=args.policy,
                                          policy_args=args.policy_args, device=args.device)
        events = read_interactions(args.interactions, adapter)
        side, other = adapter.task_by, adapter.other
        task_ids, other_ids = adapter.codecs[side], adapter.codecs[other]
        entities = list(events)
        for lo in range(0, len(entities), args.batch_users):
            chunk = entities[lo:lo + args.batch_users]
            sessions = adapter._adapt(chunk, [events[e] for e in chunk], None, args.seed)
            for entity, session in zip(chunk, sessions):
                rec = session.recommend(args.k, exclude_seen=not args.include_seen)
                stream.write(json.dumps({side: _plain(task_ids.decode_one(entity)),
                                         f"{other}s": [_plain(i) for i in other_ids.decode(rec.ids)],
                                         "scores": [float(x) for x in rec.scores]}) + "\n")
    except (DataError, PluginError, ValueError, KeyError, FileNotFoundError) as err:
        text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"metarec adapt: error: {text}".replace("\n", "\n  "), file=sys.stderr)
        raise SystemExit(2) from None


def _plain(value: Any) -> Any:
    """A raw id as JSON writes it (NumPy scalars as Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value
