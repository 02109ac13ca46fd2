"""Results tables in docs/*.md, rendered from the files the benchmarks wrote.

A generated table sits between two HTML comments, each on a line of its own; everything between
them is rewritten:

    <!-- table: simulate-online -->
    | policy | ... |
    <!-- /table -->

``TABLES`` maps each table name to ``(result file, render)``: the file is relative to the
repository root (``.json`` is parsed with ``json``, ``.csv`` into a list of row dicts of strings)
and ``render(data) -> str`` returns the markdown. ``render`` is a callable or a
``"module:function"`` string naming a function in a script of ``benchmarks/``, imported only
when a block of that name is rendered. A benchmark plugs its table in with one entry here:

    "cold-start": ("benchmarks/results/cold_start.json", "cold_start:markdown"),

(``def markdown(result: dict) -> str`` in ``benchmarks/cold_start.py``), or, in code that runs
in-process, with ``@register("cold-start", "benchmarks/results/cold_start.json")`` on the render
function. Then put the two comments where the table goes in a doc and run

    python benchmarks/docs_tables.py --write     # or: make docs-tables
    python benchmarks/docs_tables.py --check     # exit 1 and list blocks that are stale

``tests/test_docs_tables.py`` runs the check: a committed table that differs from what its file
renders fails the tests. It renders only committed files and runs no benchmark.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOCS = REPO / "docs"
Render = Callable[[object], str]

TABLES: dict[str, tuple[str, str | Render]] = {
    "ml100k-adapted": ("benchmarks/results/ml100k_results.json", "ml100k_results:adapted_table"),
    "ml100k-recbole": ("benchmarks/results/ml100k_results.json", "ml100k_results:recbole_table"),
    "ml100k-step0": ("benchmarks/results/ml100k_results.json", "ml100k_results:step0_table"),
    "ml100k-backbones": ("benchmarks/results/ml100k_backbones.json", "ml100k_results:backbones_tables"),
    "backbone-scale": ("benchmarks/results/backbone_scale.json", "backbone_scale:markdown"),
    "meta-train-throughput": ("benchmarks/results/meta_train_throughput.json",
                              "meta_train_throughput:markdown"),
    "adaptation-latency": ("benchmarks/results/adaptation_latency.json", "adaptation_latency:markdown"),
    "ddp-scaling": ("benchmarks/results/ddp_scaling.json", "ddp_scaling:markdown"),
    "cold-start": ("benchmarks/results/cold_start.json", "cold_start:markdown"),
    "few-shot": ("benchmarks/results/fewshot.json", "cold_start:markdown"),
    "literature": ("benchmarks/results/literature.json", "cold_start:markdown"),
    "bucketing": ("benchmarks/results/bucketing.json", "cold_start:markdown"),
    "items": ("benchmarks/results/items.json", "item_cold_start:markdown"),
    "scenarios": ("benchmarks/results/scenarios.json", "item_cold_start:markdown"),
    "fomelu-epoch": ("benchmarks/results/fomelu_epoch.json", "fomelu_epoch:markdown"),
    "performance-targets": ("benchmarks/results/performance_targets.json",
                            "performance_targets:markdown"),
}

# Each comment on a line of its own (so prose can quote them inline); blocks do not nest.
OPEN, CLOSE = re.compile(r"^<!-- table: ", re.M), re.compile(r"^<!-- /table -->$", re.M)
BLOCK = re.compile(r"^<!-- table: (?P<name>[\w.-]+) -->\n(?:(?!<!-- table: ).)*?^<!-- /table -->$",
                   re.DOTALL | re.MULTILINE)


def register(name: str, source: str) -> Callable[[Render], Render]:
    """Decorator: ``render`` renders table ``name`` from ``source`` (relative to the repo root)."""
    def wrap(render: Render) -> Render:
        TABLES[name] = (source, render)
        return render
    return wrap


class TableError(Exception):
    """An unknown table name, a missing result file, a render function that does not import, or
    an unclosed block."""


def load(path: Path) -> object:
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    return json.loads(path.read_text())


def render(name: str, root: Path = REPO) -> str:
    """The markdown of table ``name`` from its result file under ``root``."""
    if name not in TABLES:
        raise TableError(f"unknown table {name!r} (known: {', '.join(sorted(TABLES))})")
    source, fn = TABLES[name]
    path = root / source
    if not path.is_file():
        raise TableError(f"table {name!r}: result file {source} is missing")
    if isinstance(fn, str):
        module, _, attr = fn.partition(":")
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))  # the scripts import each other by bare name
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise TableError(f"table {name!r}: cannot import its render function {fn!r}: {exc}") from exc
    return fn(load(path)).strip()


def block(name: str, markdown: str) -> str:
    return f"<!-- table: {name} -->\n\n{markdown}\n\n<!-- /table -->"


def update(text: str, root: Path = REPO) -> tuple[str, list[str], list[str]]:
    """``text`` with every block re-rendered, the names of stale blocks, and errors (the blocks
    with errors are left as they are)."""
    stale, errors = [], []
    matched = len(BLOCK.findall(text))
    if matched != len(OPEN.findall(text)) or matched != len(CLOSE.findall(text)):
        errors.append("a <!-- table: NAME --> comment without its <!-- /table --> (or the reverse)")

    def replace(match: re.Match) -> str:
        name = match["name"]
        try:
            new = block(name, render(name, root))
        except TableError as exc:
            errors.append(str(exc))
            return match[0]
        if new != match[0]:
            stale.append(name)
        return new

    return BLOCK.sub(replace, text), stale, errors


def run(docs: Path = DOCS, root: Path = REPO, write: bool = False) -> list[str]:
    """Check (or rewrite) the blocks of ``docs/*.md``; the problems found, one line each."""
    problems = []
    for path in sorted(docs.glob("*.md")):
        text = path.read_text()
        new, stale, errors = update(text, root)
        where = path.relative_to(root) if path.is_relative_to(root) else path
        problems += [f"{where}: {e}" for e in errors]
        if write and new != text:
            path.write_text(new)
            print(f"wrote {where} ({', '.join(stale)})")
        elif not write:
            problems += [f"{where}: table {n!r} differs from what {TABLES[n][0]} renders" for n in stale]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite every block from its file")
    mode.add_argument("--check", action="store_true", help="exit 1 when a block is stale")
    parser.add_argument("--docs", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    problems = run(args.docs.resolve(), REPO, write=args.write)
    for line in problems:
        print(line, file=sys.stderr)
    if problems and args.check:
        print("run `python benchmarks/docs_tables.py --write` (make docs-tables)", file=sys.stderr)
    return 1 if problems else 0


# Results without a benchmark script of their own.

def _bold_best(values: list[float], cells: list[str], lower: bool) -> list[str]:
    best = min(values) if lower else max(values)
    return [f"**{c}**" if v == best else c for v, c in zip(values, cells)]


@register("simulate-online", "benchmarks/results/simulate-online/summary.csv")
def simulate_summary(rows: list[dict]) -> str:
    """`metarec simulate` summary.csv: one row per policy, the best of each column in bold."""
    cols = {"hr": (False, "HR@10"), "ndcg": (False, "nDCG@10"), "mae": (True, "next-rating MAE")}
    cells = {c: _bold_best([round(float(r[c]), 3) for r in rows],
                           [f"{float(r[c]):.3f}" for r in rows], lower) for c, (lower, _) in cols.items()}
    lines = ["| policy | user-turns | " + " | ".join(h for _, h in cols.values()) + " |",
             "|---" * (len(cols) + 2) + "|"]
    for i, r in enumerate(rows):
        lines.append(f"| {r['policy']} | {int(r['user_turns']):,} | "
                     + " | ".join(cells[c][i] for c in cols) + " |")
    return "\n".join(lines)


SIMULATE_OBSERVED = (3, 7, 12, 22, 32, 49)  # rows of curves.csv shown in the doc


@register("simulate-online-curves", "benchmarks/results/simulate-online/curves.csv")
def simulate_curves(rows: list[dict]) -> str:
    """`metarec simulate` curves.csv: per-turn HR@10 / MAE of every policy at a few turns."""
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    at = {(r["policy"], int(r["observed"])): r for r in rows}
    lines = ["| observed | users | " + " | ".join(policies) + " |", "|---" * (len(policies) + 2) + "|"]
    for n in SIMULATE_OBSERVED:
        if (policies[0], n) in at:
            lines.append(f"| {n} | {at[policies[0], n]['users']} | " + " | ".join(
                f"{float(at[p, n]['hr']):.3f} / {float(at[p, n]['mae']):.2f}" for p in policies) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
