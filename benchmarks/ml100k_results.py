"""MovieLens-100K user cold-start results: algorithms x seeds, test users after adaptation.

Protocol (docs/results.md, ../shared/design/PROTOCOLS.md): users with 13-100 ratings, one task
per user, users split 8:1:1 by the seed, query = 10 random ratings per user, support = the
rest. Each (algorithm, seed) meta-trains from its recipe ``recipes/movielens-100k/{backbone}-
{algorithm}.yaml`` with ``seed_everything = data.seed = seed`` (a different split per seed),
then evaluates the test users with the recipe's adaptation policy under two relevance rules:
``threshold`` (rating >= 4 relevant) and ``recbole`` (top-5 true-rated query items, the
RecBole-MetaRec rule). A ``random`` row scores random rankings of the same test tasks.

    python benchmarks/ml100k_results.py                       # 3 algorithms x 3 seeds
    python benchmarks/ml100k_results.py --quick               # 1 seed, 2 epochs (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[1]
METRICS = ("mae", "rmse", "ndcg@5", "precision@5", "recall@5", "hitrate@5", "mrr@5")
QUIET = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.callbacks", "[]", "--trainer.check_val_every_n_epoch", "1000"]


class EpochTimer(pl.Callback):
    """Wall-clock seconds of each training epoch (validation excluded)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def _test(cli, relevance: str) -> dict[str, float]:
    from metarec.metrics import MetricsConfig

    model = cli.model
    model.metrics_config = MetricsConfig(top_k=[5], relevance=relevance)
    model.test_metrics.clear()  # rebuilt on first use with the new relevance rule
    out = cli.trainer.test(model, datamodule=cli.datamodule, verbose=False)[0]
    return {k: float(v) for k, v in out.items()}


def _random_baseline(cli, relevance: str, seed: int) -> dict[str, float]:
    """Metrics of random scores on the same test tasks (the chance level of each metric)."""
    from metarec.data import EpisodeCollator
    from metarec.metrics import AdaptationMetrics, MetricsConfig

    dm = cli.datamodule
    tasks = dm.splits["test"]
    batch = EpisodeCollator(tasks, dm.table)(list(range(len(tasks))))
    config = MetricsConfig(top_k=[5], relevance=relevance)
    metrics = AdaptationMetrics(0, "explicit", config, dm.table.rating_range)
    gen = torch.Generator().manual_seed(seed)
    total = {}
    for _ in range(20):  # average over 20 random rankings
        scores = torch.rand(batch.query["label"].shape, generator=gen) * 4 + 1
        ones = torch.ones(len(batch))
        metrics.update(0, scores, batch.query, batch.users, ones, ones)
        for k, v in metrics.compute("test").items():
            total[k] = total.get(k, 0.0) + float(v) / 20
        metrics.reset()
    return total


def run_one(backbone: str, algorithm: str, seed: int, epochs: int | None,
            extra: list[str]) -> dict:
    from metarec.cli import MetarecCLI

    recipe = REPO / "recipes" / "movielens-100k" / f"{backbone}-{algorithm}.yaml"
    args = ["--config", str(recipe), *QUIET, "--seed_everything", str(seed),
            "--data.seed", str(seed), *extra]
    if epochs is not None:
        args += ["--trainer.max_epochs", str(epochs)]
    if algorithm == "distill":
        # Recipe interpolations resolve when the YAML is read, before --data.seed applies: name
        # the teacher of this split explicitly, so it never saw this split's test users.
        args += ["--model.algorithm_args.teacher_checkpoint",
                 f"runs/teachers/{backbone}-large-ml100k-split{seed}.ckpt",
                 "--model.algorithm_args.teacher_overrides",
                 json.dumps(["--data.seed", str(seed), "--seed_everything", str(seed)])]
    cli = MetarecCLI(args=args, run=False)
    timer = EpochTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    row = {"backbone": backbone, "algorithm": algorithm, "seed": seed,
           "epochs": cli.trainer.current_epoch, "tasks_test": len(cli.datamodule.splits["test"]),
           "sec_per_epoch": statistics.median(timer.seconds),
           "command": "metarec fit --config " + str(recipe.relative_to(REPO)) +
                      f" --seed_everything {seed} --data.seed {seed}" + "".join(f" {a}" for a in extra)}
    for relevance in ("threshold", "recbole"):
        out = _test(cli, relevance)
        row[relevance] = {m: out[f"test/{m}"] for m in METRICS}
        row[relevance + "_step0"] = {m: out[f"test/step0/{m}"] for m in METRICS}
        rnd = _random_baseline(cli, relevance, seed)
        row[relevance + "_random"] = {m: rnd[f"test/{m}"] for m in METRICS if m not in ("mae", "rmse")}
    return row


def summarise(rows: list[dict]) -> dict:
    """Mean and standard deviation over seeds for each (backbone, algorithm)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["backbone"], row["algorithm"]), []).append(row)
    summary = {}
    for (backbone, algorithm), group in groups.items():
        entry = {"seeds": [r["seed"] for r in group],
                 "sec_per_epoch": statistics.mean(r["sec_per_epoch"] for r in group)}
        for part in ("threshold", "recbole", "threshold_step0", "recbole_step0",
                     "threshold_random", "recbole_random"):
            entry[part] = {}
            for m in group[0][part]:
                values = [r[part][m] for r in group]
                entry[part][m] = {"mean": statistics.mean(values),
                                  "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        summary[f"{backbone}/{algorithm}"] = entry
    return summary


def markdown(summary: dict) -> str:
    def cell(x):
        return f"{x['mean']:.4f} ± {x['std']:.4f}"

    lines = []
    for rule, title in (("threshold", "relevance: rating >= 4 (metarec default)"),
                        ("recbole", "relevance: top-5 true-rated query items (RecBole-MetaRec rule)")):
        lines += [f"**{title}**", "",
                  "| backbone/algorithm | " + " | ".join(METRICS) + " | s/epoch |",
                  "|---" * (len(METRICS) + 2) + "|"]
        for name, entry in summary.items():
            lines.append(f"| {name} | " + " | ".join(cell(entry[rule][m]) for m in METRICS)
                         + f" | {entry['sec_per_epoch']:.2f} |")
        for name, entry in summary.items():
            lines.append(f"| {name}, before adaptation (step 0) | " +
                         " | ".join(cell(entry[rule + '_step0'][m]) for m in METRICS) + " | |")
        rnd = next(iter(summary.values()))[rule + "_random"]
        lines.append("| random ranking (chance) | – | – | " +
                     " | ".join(cell(rnd[m]) for m in METRICS[2:]) + " | |")
        lines.append("")
    return "\n".join(lines)


def compact(summary: dict, part: str, columns: dict[str, str], seconds: bool = True,
            chance: bool = True, bold: bool = True) -> str:
    """One ``part`` of the summary (``threshold``, ``recbole_step0``, ...) to 3 decimals, one row
    per algorithm (``columns``: header -> metric), with ``bold`` the best of each column in bold
    (when rows differ), a chance row from ``{rule}_random``; `` ± std`` omitted where it is 0."""
    def cell(x):
        return f"{x['mean']:.3f}" + (f" ± {x['std']:.3f}" if round(x["std"], 3) else "")

    names = list(summary)
    if len({name.split("/")[0] for name in names}) == 1:  # one backbone: rows by algorithm
        names = [name.split("/", 1)[-1] for name in names]
    body = {name: [] for name in names}
    for metric in columns.values():
        entries = [entry[part][metric] for entry in summary.values()]
        means = [round(e["mean"], 3) for e in entries]
        best = min(means) if metric in ("mae", "rmse") else max(means)
        for name, e, mean in zip(names, entries, means):
            strong = bold and mean == best and len(set(means)) > 1
            body[name].append(f"**{cell(e)}**" if strong else cell(e))
    heads = ["algorithm", *columns] + (["s/epoch"] if seconds else [])
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for (name, cells), entry in zip(body.items(), summary.values()):
        lines.append(f"| {name} | " + " | ".join(cells)
                     + (f" | {entry['sec_per_epoch']:.2f} |" if seconds else " |"))
    if chance:
        rnd = next(iter(summary.values()))[part.split("_")[0] + "_random"]
        lines.append("| random ranking (chance) | " + " | ".join(
            cell(rnd[m]) if m in rnd else "–" for m in columns.values()) + (" | |" if seconds else " |"))
    return "\n".join(lines)


# Renderers of the tables in docs/results.md (benchmarks/docs_tables.py), from the written JSON.

def adapted_table(result: dict) -> str:
    return compact(result["summary"], "threshold", {
        "MAE": "mae", "RMSE": "rmse", "nDCG@5": "ndcg@5", "Precision@5": "precision@5",
        "Recall@5": "recall@5", "MRR@5": "mrr@5"})


def recbole_table(result: dict) -> str:
    return compact(result["summary"], "recbole", {
        "Precision@5 = Recall@5": "precision@5", "HitRate@5": "hitrate@5", "nDCG@5": "ndcg@5",
        "MRR@5": "mrr@5"}, seconds=False)


def step0_table(result: dict) -> str:
    return compact(result["summary"], "threshold_step0", {
        "MAE": "mae", "nDCG@5": "ndcg@5", "Precision@5": "precision@5", "MRR@5": "mrr@5"},
        seconds=False, chance=False, bold=False)


def backbones_tables(result: dict) -> str:
    return markdown(result["summary"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="melu")
    parser.add_argument("--algorithms", default="maml,fomaml,pretrain")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipes' max_epochs")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "ml100k_results.json"))
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="merge the runs of these JSON files (from parallel invocations)")
    parser.add_argument("extra", nargs="*", help="extra CLI overrides, after --")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    epochs = 2 if args.quick else args.epochs
    rows = []
    if args.merge:
        rows = [r for path in args.merge for r in json.loads(Path(path).read_text())["runs"]]
    for backbone in args.backbones.split(",") if not args.merge else []:
        for algorithm in args.algorithms.split(","):
            for seed in seeds:
                start = time.perf_counter()
                rows.append(run_one(backbone, algorithm, seed, epochs, args.extra))
                print(f"{backbone}/{algorithm} seed {seed}: {time.perf_counter() - start:.0f}s "
                      f"{json.dumps(rows[-1]['threshold'])}", file=sys.stderr, flush=True)
    summary = summarise(rows)
    table = markdown(summary)
    print(table)
    result = {"protocol": "ml-100k user cold-start: users 13-100 ratings, split 8:1:1 by user "
                          "(seeded), query 10 random, support the rest; test users after adaptation",
              "torch_threads": torch.get_num_threads(), "summary": summary, "runs": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
