"""The report of a cold-start study (benchmarks/cold_start.py): per-user rows -> summary
(means with confidence intervals, paired differences against each method's baseline, chance)
-> markdown tables with a footer saying how they were measured.

``summarise(result)`` and ``markdown(result)`` take the study JSON as loaded;
``benchmarks/docs_tables.py`` renders ``markdown`` into docs/results.md. Statistics come from
benchmarks/_stats.py (numpy only: rendering needs no torch).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import _stats

# "recbole:" columns: the same runs under RecBole-MetaRec's relevance rule (the query's top-5
# true-rated items are relevant), present when the runner tested them.
TABLE_METRICS = {"explicit": ("mae", "rmse", "ndcg@5", "recbole:precision@5", "recbole:ndcg@5"),
                 "implicit": ("auc", "ndcg@5")}
LOWER_IS_BETTER = {"mae", "rmse", "loss", "user_mae", "user_rmse"}
METRIC_TITLES = {"mae": "MAE", "rmse": "RMSE", "auc": "AUC", "loss": "query loss"}


# -- statistics --------------------------------------------------------------------------
def protocol(result: dict) -> str:
    """One sentence: data, users, folds, query and support rules."""
    runs = result["runs"]
    config = result["config"]
    if not runs:
        return ""
    run = runs[0]
    t = run.get("tasks", {})
    users = run.get("users", {})
    ks = ", ".join(config["k"])
    return (f"{run.get('dataset', '?')} user cold start: {users.get('eligible', '?')} users with "
            f"{t.get('min_interactions', '?')}-{t.get('max_interactions', '?')} interactions, "
            f"{config['folds']}-fold user cross-validation (every user a test user once per "
            f"seed; validation users from the training folds), query = {t.get('query_size', '?')} "
            f"{t.get('query_strategy', '?')} interactions per user, support capped at K "
            f"(nested random subsets; K in {ks}), best epoch by "
            f"{run.get('monitor') or 'none (final weights)'}")


def _index(result: dict, metrics: Sequence[str]) -> dict[tuple, dict[tuple, float]]:
    """One pass over every run's rows: ``{(method, K, stage, metric): {(seed, fold, user):
    value}}``, stage ``"final"`` (the run's last adaptation step) or ``"0"`` (NaN: undefined)."""
    out: dict[tuple, dict[tuple, float]] = {}
    for run in result["runs"]:
        rows, last = run["rows"], run["max_step"]
        present = [m for m in metrics if m in rows]
        for i, (user, k, step) in enumerate(zip(rows["user"], rows["k"], rows["step"])):
            stages = [st for st, target in (("final", last), ("0", 0)) if step == target]
            for stage in stages:
                for metric in present:
                    v = rows[metric][i]
                    out.setdefault((run["method"], k, stage, metric), {})[
                        (run["seed"], run["fold"], user)] = math.nan if v is None else float(v)
    return out


def _by_user(values: dict[tuple, float]) -> dict[Any, float]:
    """Average over seeds per user (NaN where a user has no defined value)."""
    acc: dict[Any, list[float]] = {}
    for (_, _, user), v in values.items():
        acc.setdefault(user, []).append(v)
    out = {}
    for user, vs in acc.items():
        finite = [v for v in vs if math.isfinite(v)]
        out[user] = statistics.fmean(finite) if finite else math.nan
    return out


def _paired(a: dict[tuple, float], b: dict[tuple, float]) -> tuple[list[float], list[float]]:
    """Inner join on (seed, fold, user); per user, both averaged over the seeds where both are
    defined (a user with none gives NaN: skipped)."""
    acc: dict[Any, list[tuple[float, float]]] = {}
    for key in a.keys() & b.keys():
        acc.setdefault(key[2], [])
        if math.isfinite(a[key]) and math.isfinite(b[key]):
            acc[key[2]].append((a[key], b[key]))
    users = sorted(acc, key=str)
    xs = [statistics.fmean(p[0] for p in acc[u]) if acc[u] else math.nan for u in users]
    ys = [statistics.fmean(p[1] for p in acc[u]) if acc[u] else math.nan for u in users]
    return xs, ys


def _chance_by_user(result: dict, metric: str) -> dict[Any, float]:
    values = {}
    for c in result.get("chance", []):
        rows = c["rows"]
        if metric in rows:
            for user, v in zip(rows["user"], rows[metric]):
                values[(c["seed"], c["fold"], user)] = math.nan if v is None else float(v)
    return _by_user(values)


def table_metrics(result: dict) -> list[str]:
    feedback = next((r.get("feedback") for r in result["runs"]), "explicit") or "explicit"
    columns = {c for run in result["runs"] for c in run["rows"]}
    return [m for m in TABLE_METRICS.get(feedback, TABLE_METRICS["explicit"]) if m in columns]


def summarise(result: dict, metrics: Sequence[str] | None = None, ci: str = "t",
              level: float = _stats.LEVEL, n_resamples: int = _stats.RESAMPLES,
              seed: int = 0) -> dict:
    """Per (method, K): users, diverged users, and per metric the mean and CI after adaptation
    (``final``) and before (``step0``), and the paired difference against the baseline
    (``vs_baseline``); per metric the chance level."""
    config = result["config"]
    baseline = config["baseline"]
    metrics = list(metrics) if metrics is not None else table_metrics(result)
    methods = list(dict.fromkeys(r["method"] for r in result["runs"]))
    ks = config["k"]
    out: dict[str, Any] = {
        "metrics": metrics, "k": ks, "baseline": baseline, "methods": {}, "chance": {},
        "stats": {"ci": ci, "level": level, "n_resamples": n_resamples, "seed": seed,
                  **_stats.describe(ci, level, n_resamples)},
        "seeds": sorted({r["seed"] for r in result["runs"]}),
        "folds": sorted({r["fold"] for r in result["runs"]}),
    }
    index = _index(result, metrics)
    baselines = config.get("baselines") or {}
    for method in methods:
        runs = [r for r in result["runs"] if r["method"] == method]
        against = baselines.get(method, baseline)
        entry: dict[str, Any] = {"runs": len(runs), "max_step": sorted({r["max_step"] for r in runs}),
                                 "tested_best": sum(r["tested"] == "best" for r in runs),
                                 "fit_seconds": round(sum(r["fit_seconds"] for r in runs), 1),
                                 "sec_per_epoch": _median([r.get("sec_per_epoch") for r in runs]),
                                 "best_epochs": [r.get("best_epoch") for r in runs],
                                 "baseline": against if against != method else None,
                                 "k": {}}
        for k in ks:
            cell: dict[str, Any] = {}
            diverged = users = 0
            for run in runs:
                rows = run["rows"]
                for kk, s, d in zip(rows["k"], rows["step"], rows.get("diverged", [False] * len(rows["k"]))):
                    if kk == k and s == run["max_step"]:
                        users += 1
                        diverged += bool(d)
            cell["rows"], cell["diverged"] = users, diverged
            for metric in metrics:
                final = index.get((method, k, "final", metric), {})
                step0 = index.get((method, k, "0", metric), {})
                m = {"final": _stats.mean_ci(list(_by_user(final).values()), level, ci,
                                             n_resamples, seed),
                     "step0": _stats.mean_ci(list(_by_user(step0).values()), level, ci,
                                             n_resamples, seed)}
                if method != against:
                    base = index.get((against, k, "final", metric), {})
                    xs, ys = _paired(final, base)
                    m["vs_baseline"] = _stats.paired_difference(xs, ys, level, n_resamples, seed)
                cell[metric] = m
            cell["users"] = max((cell[m]["final"]["n"] + cell[m]["final"]["n_skipped"]
                                 for m in metrics), default=0)
            entry["k"][k] = cell
        out["methods"][method] = entry
    for metric in metrics:
        values = list(_chance_by_user(result, metric).values())
        if values:
            out["chance"][metric] = _stats.mean_ci(values, level, ci, n_resamples, seed)
    ratings = [c.get("mean_rating") for c in result.get("chance", []) if c.get("mean_rating")]
    out["chance_mean_rating"] = round(statistics.fmean(ratings), 4) if ratings else None
    return out


def _median(values: Iterable[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return round(statistics.median(vs), 4) if vs else None


# -- markdown ----------------------------------------------------------------------------
def _num(x: float | None, signed: bool = False, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _ci_cell(c: dict | None) -> str:
    if not c or c.get("mean") is None:
        return "–"
    if c.get("lo") is None:
        return _num(c["mean"])
    return f"{_num(c['mean'])} [{_num(c['lo'])}, {_num(c['hi'])}]"


def _p(p: float | None) -> str:
    if p is None:
        return "p=–"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _diff_cell(d: dict | None) -> str:
    if not d or d.get("mean") is None:
        return "–"
    ci = (f" [{_num(d['lo'], True)}, {_num(d['hi'], True)}]" if d.get("lo") is not None else "")
    return f"{_num(d['mean'], True)}{ci} {_p(d.get('p'))}"


def _title(metric: str) -> str:
    rule, _, name = metric.rpartition(":")
    title = METRIC_TITLES.get(name, name.replace("ndcg", "nDCG").replace("precision", "Precision"))
    if rule == "recbole":
        return f"{title}, RecBole-MetaRec rule (top-5 true-rated query items relevant)"
    return title


def markdown(result: dict) -> str:
    """The tables of a study JSON (``summary`` as stored, else computed): one per metric, rows
    methods, columns K; then a footer naming protocol, users, folds, seeds, statistics and the
    command. ``benchmarks/docs_tables.py`` renders it as the ``cold-start`` table."""
    summary = result.get("summary") or summarise(result)
    ks, baseline = summary["k"], summary["baseline"]
    methods = list(summary["methods"])
    order = [baseline] + [m for m in methods if m != baseline] if baseline in methods else methods
    header = "| method | " + " | ".join(f"K={k}" for k in ks) + " |"
    rule = "|---|" + "---:|" * len(ks)
    lines: list[str] = []
    mean_rating = summary.get("chance_mean_rating")
    for metric in summary["metrics"]:
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        lines += [f"**{_title(metric)}** per user, mean over test users [95% CI] ({better} is "
                  "better; after adaptation unless marked step 0)", "", header, rule]
        for name in order:
            entry = summary["methods"][name]
            label = f"{name} (baseline)" if name == baseline else name
            lines.append(f"| {label} | " + " | ".join(
                _ci_cell(entry["k"].get(k, {}).get(metric, {}).get("final")) for k in ks) + " |")
        for name in order:
            entry = summary["methods"][name]
            against = entry.get("baseline", baseline if name != baseline else None)
            if against is None or against not in summary["methods"]:
                continue
            lines.append(f"| {name} − {against} | " + " | ".join(
                _diff_cell(entry["k"].get(k, {}).get(metric, {}).get("vs_baseline"))
                for k in ks) + " |")
        for name in order:
            entry = summary["methods"][name]
            lines.append(f"| {name}, step 0 (before adaptation) | " + " | ".join(
                _ci_cell(entry["k"].get(k, {}).get(metric, {}).get("step0")) for k in ks) + " |")
        chance = summary.get("chance", {}).get(metric)
        if chance is not None:
            what = (f"mean training rating{f' ({mean_rating:.2f})' if mean_rating else ''}"
                    if metric in ("mae", "rmse") else "random scores")
            lines.append(f"| chance: {what} (any K) | " + " | ".join(_ci_cell(chance) for _ in ks)
                         + " |")
        lines.append("")
    lines += _footer(result, summary)
    return "\n".join(lines).rstrip() + "\n"


def _footer(result: dict, summary: dict) -> list[str]:
    stats, baseline = summary["stats"], summary["baseline"]
    methods = summary["methods"]
    n_users = sorted({c["users"] for e in methods.values() for c in e["k"].values()})
    seeds, folds = summary["seeds"], result["config"]["folds"]
    skipped = []
    for metric in summary["metrics"]:
        n = max((c[metric]["final"]["n_skipped"] for e in methods.values()
                 for c in e["k"].values() if metric in c), default=0)
        if n:
            skipped.append(f"{_title(metric)}: up to {n} user{'s' if n != 1 else ''} without a "
                           "defined value (e.g. no relevant query item) skipped")
    diverged = [f"{name} K={k}: {c['diverged']} of {c['rows']}"
                for name, e in methods.items() for k, c in e["k"].items() if c["diverged"]]
    steps = sorted({s for e in methods.values() for s in e["max_step"]})
    training = []
    for name, e in methods.items():
        best = [b for b in e.get("best_epochs", []) if b is not None]
        fit = e.get("fit_seconds")
        training.append(f"{name} {e['runs']} runs, {_num(e['sec_per_epoch'], digits=2)} s/epoch, "
                        + (f"{fit / max(e['runs'], 1):.0f} s/fit, " if fit is not None else "")
                        + "best epoch (0-based) median "
                        f"{statistics.median(best) if best else '–'}"
                        + (f", final weights in {e['runs'] - e['tested_best']} runs"
                           if e["tested_best"] < e["runs"] else ""))
    runs_note = "" if result.get("complete") else " **Incomplete study: not every run is in.**"
    lines = [
        f"Protocol: {result.get('protocol') or protocol(result)}.{runs_note}",
        f"Users: {'/'.join(str(n) for n in n_users)} test users per cell ({folds} user folds x "
        f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}); "
        "each user's values averaged over seeds)"
        + (f"; {'; '.join(skipped)}" if skipped else "") + ".",
        f"Cells: mean over users [{stats['ci']}]; step 0 = the meta-learned (or pretrained) start, "
        f"before adaptation; after adaptation = step {'/'.join(map(str, steps))}. Chance: random "
        "scores (uniform, mean of 20 seeded draws) for ranking metrics, the mean training rating "
        "predicted for every query rating for MAE/RMSE, on the same test users.",
        f"Differences: method − {baseline} (baseline) on the same users (paired on seed, fold, "
        f"user and K, then averaged over seeds per user) [{stats['difference']}]; p: "
        f"{stats['test']}.",
        "Diverged users (caught by the divergence guard at the final step): "
        + ("; ".join(diverged) if diverged else "none") + ". Training (the best validation "
        "epoch is tested): " + "; ".join(training) + ".",
    ]
    if result.get("command"):
        lines.append(f"Command: `{result['command']}`")
    return [f"- {line}" for line in lines]
