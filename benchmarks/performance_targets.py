"""Issue 14's performance targets against what the benchmarks measured, in one table.

Reads the result files the benchmarks wrote (nothing is timed here) and writes
``benchmarks/results/performance_targets.json``: per target, the measured value, the file and
key it comes from, and whether it is met. docs/results.md renders it (``performance-targets``).

    python benchmarks/meta_train_throughput.py --compile --l2l-python <l2l venv>/bin/python
    python benchmarks/adaptation_latency.py
    python benchmarks/backbone_scale.py --steps 5 --warmup 2 --target
    python benchmarks/fomelu_epoch.py
    python benchmarks/performance_targets.py          # then: python benchmarks/docs_tables.py --write
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_JSON = RESULTS / "performance_targets.json"
# The 259M-parameter recipe's seconds per meta-step when issue 14 was filed (docs/results.md).
LARGE_BEFORE_S = 9.3


def _load(name: str) -> dict[str, Any]:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else {}


def _row(target: str, measured: float | None, goal: float, higher: bool, unit: str,
         source: str, note: str = "") -> dict[str, Any]:
    met = None if measured is None else (measured >= goal if higher else measured <= goal)
    return {"target": target, "measured": measured, "goal": goal,
            "goal_text": f"{'>=' if higher else '<='} {goal:g}{unit}", "unit": unit, "met": met,
            "source": source, "note": note}


def _latency(result: dict, backbone: str, mode: str, steps: int) -> dict[str, Any]:
    rows = (result.get(backbone) or {}).get("results") or []
    return next((r for r in rows if r.get("mode") == mode and r.get("steps") == steps), {})


def collect() -> dict[str, Any]:
    """Every target with its measured value (None where its benchmark has not run)."""
    mtt = _load("meta_train_throughput.json")
    lat = _load("adaptation_latency.json")
    scale = _load("backbone_scale.json")
    fomelu = _load("fomelu_epoch.json")
    eff = mtt.get("useful_flop_efficiency_by_path") or {}
    best = max(eff, key=eff.get) if eff else None
    loop, l2l = mtt.get("loop_tasks_per_s"), mtt.get("l2l_tasks_per_s")
    rates = {p: mtt.get(f"{p}_tasks_per_s") for p in ("vmap", "vmap_bucketed", "vmap_compiled")}
    best_rate = max((v for v in rates.values() if v), default=None)
    rows = [
        _row("meta-training useful-FLOP efficiency (best path)",
             eff.get(best) if best else None, 0.5, True, "",
             "meta_train_throughput.json: useful_flop_efficiency_by_path", f"path: {best}"),
        _row("vmapped MAML / per-task loop (best path)",
             best_rate / loop if best_rate and loop else None, 10, True, "x",
             "meta_train_throughput.json: *_tasks_per_s"),
        _row("vmapped MAML / learn2learn (best path)",
             best_rate / l2l if best_rate and l2l else None, 10, True, "x",
             "meta_train_throughput.json: *_tasks_per_s"),
    ]
    for mode, goal in (("eager", 2.0), ("compiled", 1.0)):
        r = _latency(lat, "melu", mode, 5)
        rows.append(_row(f"melu, 5 steps, one user, p50 ({mode})", r.get("single_p50_ms"),
                         goal, False, " ms", "adaptation_latency.json: melu.results"))
    batched = max((r.get("batched_users_per_s") or 0 for r in (lat.get("melu") or {}).get(
        "results", []) if r.get("steps") == 5), default=None) or None
    rows.append(_row("melu, 5 steps, batched users/s (best mode)", batched, 5000, True,
                     " users/s", "adaptation_latency.json: melu.results"))
    rec = _latency(lat, "transformer", "eager", 5).get("recommend_p50_ms")
    rows.append(_row("transformer recommend over 1,682 items, p50", rec, 5.0, False, " ms",
                     "adaptation_latency.json: transformer.results"))
    by_name = {r.get("config") or r.get("size") or r.get("name"): r
               for r in scale.get("rows", []) if isinstance(r, dict)}
    for name, attention in (("large", "the recipe: causal attention"),
                            ("large-target", "target attention, the recipe before")):
        r = by_name.get(name) or {}
        step = r.get("step_s")
        rows.append(_row(f"259M transformer, s per meta-step ({attention})",
                         step, LARGE_BEFORE_S / 2, False, " s",
                         "backbone_scale.json: rows",
                         f"{LARGE_BEFORE_S} s when the issue was filed; peak RSS "
                         f"{r.get('peak_rss_gb') or float('nan'):.2f} GB"))
    default = (fomelu.get("variants") or {}).get("default") or {}
    rows.append({"target": "FOMeLU (RecBole-MetaRec's configuration) s/epoch, ml-100k",
                 "measured": default.get("sec_per_epoch"), "goal": None,
                 "goal_text": "report (no outside run here)", "unit": " s", "met": None,
                 "source": "fomelu_epoch.json: variants.default", "note": ""})
    machine = mtt.get("machine"), mtt.get("cpu_count"), mtt.get("torch")
    return {"benchmark": "performance_targets", "machine": machine, "rows": rows}


def markdown(result: dict) -> str:
    machine, cores, torch = result["machine"]
    lines = [f"Issue 14's targets; measured on {machine}, {cores} cores, torch {torch}.", "",
             "| target | measured | goal | met | note |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        m = r["measured"]
        value = ("–" if m is None else f"{m:,.0f}{r['unit']}" if abs(m) >= 1000
                 else f"{m:.3g}{r['unit']}")
        met = {True: "yes", False: "**no**", None: "–"}[r["met"]]
        lines.append(f"| {r['target']} | {value} | {r['goal_text']} | {met} | {r['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    args = ap.parse_args(argv)
    result = collect()
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
