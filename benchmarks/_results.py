"""Shared by the benchmark scripts: how a result JSON under benchmarks/results/ is written."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def write_json(out: Path, result: dict, mode: str, omit: Iterable[str] = ()) -> None:
    """This run at the top level; the latest run of each mode (quick, full) under runs_by_mode
    (without the keys in ``omit``, e.g. bulky per-repeat lists)."""
    runs: dict = {}
    if out.is_file():
        try:
            runs = json.loads(out.read_text()).get("runs_by_mode", {})
        except (json.JSONDecodeError, AttributeError):
            runs = {}
    skip = set(omit)
    runs[mode] = {k: v for k, v in result.items() if k not in skip}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "mode": mode, "runs_by_mode": runs}, indent=2) + "\n")
    print(f"wrote {out}")
