"""Item cold start (warm-up stages) and MeLU's four scenarios: methods x seeds, one JSON.

Two kinds of study, named by the study file's ``kind``:

- ``warmup``: the item cold-start protocol of MetaEmb / MWUF / CVAR (recipes with
  ``data.tasks.task_by: item`` and ``data.warmup``). Run ``(method, seed)`` fits the recipe with
  ``--seed_everything s --data.seed s`` (the item split depends on the seed), keeps the epoch of
  the recipe's ``checkpoint:`` monitor (validation items only), and tests the test items at
  every stage: cold (no interaction: side information only), warm_a, warm_b, warm_c (after the
  item's first k, 2k, 3k interactions), all scored on the same later interactions. The stage's
  AUC is pooled over every (item, user) test pair, as the papers report it; F1 at the recipe's
  threshold.
- ``scenarios``: MeLU's partitions (Lee et al., KDD 2019). One fit per (method, seed), its epoch
  chosen on the ``fit_scenario``'s validation users (default ``new_user``: new users on existing
  items, the usual user cold-start validation); the same weights are then tested on every
  scenario's test set (meta-training is the same in all four: existing users x existing items).
  Per-user MAE and graded nDCG@3 (gain 2^rating - 1).

Per-task (per item / per user) rows of step 0 and the final step go to the JSON too, so that
differences can be paired. The JSON is written (atomically) after every run; an interrupted
study resumes where it stopped.

    python benchmarks/item_cold_start.py --study benchmarks/studies/ml100k_items.yaml \\
        --json benchmarks/results/items.json
    python benchmarks/item_cold_start.py --study ... --quick      # smoke test: 1 epoch, 1 seed
    python benchmarks/item_cold_start.py --json ... --summarise   # the tables only

Statistics: a cell is the mean over seeds with a 95% t-interval (seeds are the replicates: a
seed draws the split, the initialisation and the order); a difference is method - baseline per
seed (the same items / users), with its t-interval over seeds, and, beside it, the paired
bootstrap CI and Wilcoxon p over (seed, task) of the per-task metric (per-item AUC, per-user
MAE / nDCG@3). The chance row: AUC 0.5 and the F1 of a coin flip (precision = the test
positive rate, recall 0.5); MAE of predicting every rating with the training mean.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _stats  # noqa: E402
from cold_start import (  # noqa: E402
    QUIET,
    Method,
    StudyMismatch,
    _best_epoch,
    _clean,
    _quiet,
    _recipe_path,
    chance_rows,
    columnar,
    prepare_run,
    write_atomic,
)

STAGES = ("cold", "warm_a", "warm_b", "warm_c")
SCENARIOS = ("warm", "new_user", "new_item", "new_user_new_item")
# What each kind reports: (pooled test metric, per-task column of the rows, higher is better).
METRICS = {"warmup": [("auc", "auc", True), ("f1", None, True)],
           "scenarios": [("user_mae", "mae", False), ("ndcg@3", "ndcg@3", True)]}


def load_study(path: str | Path) -> dict[str, Any]:
    """``{description, kind, baseline, seeds, overrides, fit_scenario, methods: [Method]}``."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    known = {"description", "kind", "baseline", "seeds", "overrides", "fit_scenario", "methods"}
    if set(data) - known:
        raise ValueError(f"{path}: unknown keys {sorted(set(data) - known)}")
    if data.get("kind") not in METRICS:
        raise ValueError(f"{path}: kind must be one of {', '.join(METRICS)}")
    methods = []
    for i, entry in enumerate(data.get("methods") or []):
        if not isinstance(entry, dict) or "recipe" not in entry:
            raise ValueError(f"{path}: methods[{i}] needs at least a recipe")
        methods.append(Method(str(entry.get("name") or Path(entry["recipe"]).stem),
                              _recipe_path(entry["recipe"]),
                              [str(o) for o in entry.get("overrides") or []]))
    names = [m.name for m in methods]
    if not methods or len(set(names)) != len(names):
        raise ValueError(f"{path}: methods must be given, with unique names")
    if data.get("baseline") not in names:
        raise ValueError(f"{path}: baseline {data.get('baseline')!r} is none of the methods")
    seeds = data.get("seeds", [0])
    return {"description": data.get("description"), "kind": data["kind"],
            "baseline": data["baseline"], "seeds": [seeds] if isinstance(seeds, int) else seeds,
            "overrides": [str(o) for o in data.get("overrides") or []],
            "fit_scenario": data.get("fit_scenario", "new_user"), "methods": methods}


# -- one run -----------------------------------------------------------------------------
def _test_metrics(trainer: Any, prefix: str) -> dict[str, float]:
    """The test metrics Lightning logged (``test/...``), as floats, prefix stripped."""
    return {k[len(prefix):]: _clean(float(v)) for k, v in trainer.callback_metrics.items()
            if k.startswith(prefix)}


def _chance(cli: Any, seed: int) -> dict[str, Any]:
    """The chance row on this run's test tasks. Implicit: the pooled AUC of random scores
    (0.5) and a coin flip's F1 (precision = the test positive rate, recall 0.5). Explicit
    (cold_start.chance_rows): per-user MAE of the training mean rating, ranking metrics of
    uniform random scores (mean of 20 seeded draws)."""
    dm = cli.datamodule
    if dm.splits.feedback == "implicit":
        test = dm.splits["test"]
        p = float(test.query_labels[test.query_mask].double().mean())
        return {"positive_rate": _clean(p), "auc": 0.5, "f1": _clean(2 * p * 0.5 / (p + 0.5))}
    chance = chance_rows(cli, seed)
    out = {"mean_rating": chance["mean_rating"]}
    for name, values in chance["rows"].items():
        values = [v for v in values if v is not None]
        if name != "user" and values:
            out["user_mae" if name == "mae" else name] = _clean(statistics.fmean(values))
    return out


def run_one(method: Method, seed: int, *, kind: str, extra: Sequence[str] = (),
            quick: bool = False, fit_scenario: str = "new_user") -> dict:
    """Fit ``method`` with seed ``seed``, test its best epoch: the run record."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    recipe = method.recipe if Path(method.recipe).is_absolute() else str(REPO / method.recipe)
    args = [*QUIET, "--seed_everything", str(seed), "--data.seed", str(seed),
            *method.overrides, *extra]
    if kind == "scenarios":
        args += ["--data.scenario.name", fit_scenario]
    if quick:
        args += ["--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1"]
    root = tempfile.mkdtemp(prefix="metarec-items-")
    start = time.perf_counter()
    try:
        with _quiet():
            cli, timer = prepare_run(recipe, args, root)
            trainer, model, dm = cli.trainer, cli.model, cli.datamodule
            checkpoint = trainer.checkpoint_callback
            fit_start = time.perf_counter()
            trainer.fit(model, datamodule=dm)
            fit_seconds = time.perf_counter() - fit_start
            best = getattr(checkpoint, "best_model_path", "") if checkpoint else ""
            ckpt = "best" if best and os.path.isfile(best) else None
            names = SCENARIOS if kind == "scenarios" else (None,)
            tests = {}
            for name in names:
                if name is not None:  # the same weights, another scenario's test set
                    dm.use_scenario(name)
                model.test_metrics.clear()
                trainer.test(model, datamodule=dm, ckpt_path=ckpt, verbose=False)
                rows = model.user_results
                max_step = max(int(r["step"]) for r in rows)
                splits = dm.splits
                tests[name or "test"] = {
                    "metrics": _test_metrics(trainer, "test/"),
                    "max_step": max_step, "chance": _chance(cli, seed),
                    "tasks": {"train": len(splits.train), "val": len(splits.val),
                              "test": len(splits.test)},
                    "rows": columnar([{k: v for k, v in r.items() if k != "loss"}
                                      for r in rows], {0, max_step})}
            best_epoch = _best_epoch(best) if ckpt else None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"method": method.name, "recipe": method.recipe, "overrides": list(method.overrides),
            "seed": seed, "command": "metarec fit " + shlex.join(["--config", method.recipe,
                                                                   *args]),
            "fit_seconds": round(fit_seconds, 3), "run_seconds": round(time.perf_counter() - start, 3),
            "sec_per_epoch": round(statistics.median(timer.seconds), 4) if timer.seconds else None,
            "epochs": trainer.current_epoch, "tested": ckpt or "final",
            "best_epoch": best_epoch,
            "monitor": getattr(checkpoint, "monitor", None),
            "best_score": _clean(checkpoint.best_model_score) if ckpt else None,
            "torch_threads": torch.get_num_threads(), "tests": tests}


# -- the study ---------------------------------------------------------------------------
def run_study(study: dict[str, Any], json_path: Path, *, extra: Sequence[str] = (),
              quick: bool = False, fresh: bool = False, command: str = "") -> dict:
    """Run every (seed, method) not yet in ``json_path``; write the JSON after each run."""
    config = {"kind": study["kind"], "baseline": study["baseline"], "seeds": study["seeds"],
              "extra": [*study["overrides"], *extra], "quick": quick,
              "fit_scenario": study["fit_scenario"],
              "methods": {m.name: m.spec() for m in study["methods"]}}
    result: dict[str, Any] = {"description": study["description"], "config": config,
                              "command": command, "complete": False, "runs": []}
    if json_path.is_file() and not fresh:
        old = json.loads(json_path.read_text())
        for key in ("kind", "extra", "quick", "fit_scenario"):
            if old["config"].get(key) != config[key]:
                raise StudyMismatch(f"{key} = {config[key]!r} here but "
                                    f"{old['config'].get(key)!r} in {json_path}; --fresh?")
        for name, spec in config["methods"].items():
            if old["config"]["methods"].get(name, spec) != spec:
                raise StudyMismatch(f"method {name!r} changed since {json_path}: rename it")
        result["runs"] = old["runs"]
        config["methods"] = {**old["config"]["methods"], **config["methods"]}
        config["seeds"] = sorted(set(old["config"]["seeds"]) | set(config["seeds"]))
    seeds = study["seeds"][:1] if quick else study["seeds"]
    done = {(r["method"], r["seed"]) for r in result["runs"]}
    todo = [(m, s) for s in seeds for m in study["methods"] if (m.name, s) not in done]
    for i, (method, seed) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {method.name} seed {seed}", file=sys.stderr, flush=True)
        run = run_one(method, seed, kind=study["kind"], extra=config["extra"], quick=quick,
                      fit_scenario=study["fit_scenario"])
        result["runs"].append(run)
        result["summary"] = summarise(result)
        write_atomic(json_path, result)
        print(f"    {run['run_seconds']:.0f} s", file=sys.stderr, flush=True)
    result["complete"] = all((m, s) in {(r["method"], r["seed"]) for r in result["runs"]}
                             for m in config["methods"] for s in seeds)
    result["summary"] = summarise(result)
    write_atomic(json_path, result)
    return result


def _final_rows(test: dict, column: str, stage: str | None) -> dict[Any, float]:
    """``{task: value}`` of one per-task column at the final step (one stage's rows)."""
    rows, out = test["rows"], {}
    for i, task in enumerate(rows["user"]):
        if int(rows["step"][i]) != test["max_step"]:
            continue
        if stage is not None and rows["k"][i] != stage:
            continue
        value = rows.get(column, [None] * len(rows["user"]))[i]
        if value is not None:
            out[task] = value
    return out


def _cells(result: dict) -> list[tuple[str, str | None, str, str, str | None, bool]]:
    """(test set, stage, pooled key, label, per-task column, higher better) of the tables."""
    kind = result["config"]["kind"]
    out = []
    if kind == "warmup":
        for stage in STAGES:
            for metric, column, higher in METRICS[kind]:
                out.append(("test", stage, f"{stage}/{metric}", f"{stage} {metric.upper()}",
                            column, higher))
    else:
        for name in SCENARIOS:
            for metric, column, higher in METRICS[kind]:
                out.append((name, None, metric, f"{name} {metric}", column, higher))
    return out


def summarise(result: dict) -> dict[str, Any]:
    """Per method and cell: mean over seeds with its t-CI; difference with the baseline per
    seed (t-CI over seeds) and paired over (seed, task) (bootstrap CI, Wilcoxon p)."""
    config, runs = result["config"], result["runs"]
    baseline = config["baseline"]
    by = {(r["method"], r["seed"]): r for r in runs}
    out: dict[str, Any] = {}
    for name in config["methods"]:
        seeds = sorted(s for (m, s) in by if m == name)
        if not seeds:
            continue
        entry: dict[str, Any] = {"seeds": seeds}
        for test, stage, key, label, column, _higher in _cells(result):
            values = [by[(name, s)]["tests"][test]["metrics"].get(key) for s in seeds]
            values = [v for v in values if v is not None]
            cell = _stats.mean_ci(values)
            paired = [s for s in seeds if (baseline, s) in by]
            if name != baseline and paired:
                diffs = [by[(name, s)]["tests"][test]["metrics"][key]
                         - by[(baseline, s)]["tests"][test]["metrics"][key] for s in paired]
                cell["diff"] = _stats.mean_ci(diffs)
                if column is not None:
                    ours, base = [], []
                    for s in paired:
                        a = _final_rows(by[(name, s)]["tests"][test], column, stage)
                        b = _final_rows(by[(baseline, s)]["tests"][test], column, stage)
                        common = sorted(set(a) & set(b), key=str)
                        ours += [a[t] for t in common]
                        base += [b[t] for t in common]
                    if ours:
                        cell["per_task"] = _stats.paired_difference(ours, base)
            entry[label] = cell
        out[name] = entry
    chance: dict[str, list[float]] = {}
    for r in runs:
        if r["method"] != baseline:
            continue
        for test, _stage, key, label, _column, _higher in _cells(result):
            metric = key.split("/")[-1]
            value = r["tests"][test]["chance"].get(metric)
            if value is not None:
                chance.setdefault(label, []).append(value)
    out["chance"] = {label: {"mean": statistics.fmean(v)} for label, v in chance.items()}
    return out


def _fmt(cell: dict | None, digits: int = 3) -> str:
    if not cell or cell.get("mean") is None:
        return "–"
    text = f"{cell['mean']:.{digits}f}"
    if cell.get("lo") is not None:
        text += f" ± {(cell['hi'] - cell['lo']) / 2:.{digits}f}"
    return text


def markdown(result: dict) -> str:
    """The study's tables: one row per method; each stage / scenario a column; then the
    differences with the baseline."""
    summary = summarise(result)  # from the runs (the stored summary may predate an edit)
    config = result["config"]
    labels = [c[3] for c in _cells(result)]
    methods = [m for m in config["methods"] if m in summary]
    seeds = sorted({s for m in methods for s in summary[m]["seeds"]})
    lines = [f"{'Items' if config['kind'] == 'warmup' else 'Users'}: test sets of "
             f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}); mean ± 95% t-CI half-width "
             "over seeds." + ("" if result.get("complete") else " **Partial: study running.**"),
             "", "| method | " + " | ".join(labels) + " |",
             "|---" * (len(labels) + 1) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_fmt(summary[m].get(lbl)) for lbl in labels) + " |")
    lines.append("| chance | " + " | ".join(_fmt(summary["chance"].get(lbl)) for lbl in labels)
                 + " |")
    base = config["baseline"]
    lines += ["", f"Difference with `{base}` (per seed, mean ± t-CI half-width over seeds; "
              "[paired bootstrap 95% CI over (seed, task) of the per-task metric, Wilcoxon p]):",
              "", "| method | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for m in methods:
        if m == base:
            continue
        cells = []
        for lbl in labels:
            cell = summary[m].get(lbl, {})
            text = _fmt(cell.get("diff"))
            per = cell.get("per_task")
            if per and per.get("lo") is not None:
                text += f" [{per['lo']:+.3f}, {per['hi']:+.3f}; p={per['p']:.2g}]"
            cells.append(text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", help="study file (YAML): kind, baseline, seeds, methods")
    parser.add_argument("--json", required=True, help="result file (resumed when present)")
    parser.add_argument("--quick", action="store_true", help="1 epoch, the first seed")
    parser.add_argument("--fresh", action="store_true", help="start the JSON over")
    parser.add_argument("--summarise", action="store_true", help="print the tables only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args, extra = parser.parse_known_args(argv)
    extra = [e for e in extra if e != "--"]
    path = Path(args.json)
    if args.summarise:
        print(markdown(json.loads(path.read_text())))
        return 0
    if not args.study:
        parser.error("--study is required (or --summarise)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    study = load_study(args.study)
    command = "python benchmarks/item_cold_start.py " + shlex.join(
        [a for a in (argv if argv is not None else sys.argv[1:])])
    try:
        result = run_study(study, path, extra=extra, quick=args.quick, fresh=args.fresh,
                           command=command)
    except StudyMismatch as err:
        print(f"item_cold_start: {err}", file=sys.stderr)
        return 2
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
