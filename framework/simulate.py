"""``metarec simulate --config SIM.yaml``: replay held-out users' feedback through policies.

The settings below are the command's arguments: a YAML file (``--config``), command-line
overrides (``--users 10 --k 5``) and ``--print_config``, as for every metarec command.

For every held-out (test-split) user, all of the user's interactions in their task (support
and query, as built by the data split) are ordered by timestamp. The first ``warmup`` are
revealed and adapted on (:meth:`metarec.Adapter.adapt`); then at each turn ``t`` (``t``
interactions observed so far):

1. the session recommends the top ``k`` of the user's candidate set minus the items already
   revealed (candidates: every item the user rated plus ``negatives`` other items sampled
   uniformly, seeded by ``seed`` and the user);
2. HR@k is 1 if a shown item is *relevant and not yet revealed*; nDCG@k is the DCG of the
   shown list against that set of relevant future items, divided by the ideal DCG of
   ``min(k, #relevant future)`` hits. Relevant: ``label >= relevant_rating`` (default 4) for
   explicit ratings, ``label >= 0.5`` for implicit feedback. Turns with no relevant future
   item do not count towards HR/nDCG (NaN for that user and turn);
3. the next interaction's score is predicted before it is revealed: MAE is
   ``|predicted rating - rating|`` (implicit: ``|sigmoid(logit) - label|``);
4. the next interaction (the true feedback) is revealed: ``session.update([event])`` (online
   policies apply their incremental update; others adapt again from the meta-learned start on
   every revealed event, see :class:`metarec.UserSession`).

Nothing is revealed before its turn: the session only ever receives events ``0..t-1`` when it
recommends and predicts at turn ``t`` (tests/test_simulate.py checks it with a spy).

Config (YAML; every key is also an option, e.g. ``--turns 20``)::

    checkpoint: runs/model.ckpt        # a `metarec fit` checkpoint; or, to train one first:
    fit_recipe: recipes/quickstart.yaml
    fit_overrides: ["--trainer.max_steps", "100"]
    data: {...}                        # EpisodeDataModule arguments (as a recipe's `data:`);
                                       # default: the checkpoint's own (its split)
    policies:                          # each adapts from the same checkpoint's start
      - {name: frozen}
      - {name: finetune, args: {steps: 5}}
      - {name: online, args: {buffer_size: 20}}
      - {name: online, label: online-explore, epsilon: 0.1}   # epsilon-greedy top-k slots
    users: 100                         # first N test users (default: all)
    k: 10
    negatives: 100                     # sampled unrated items added to each candidate set
    warmup: 3                          # interactions revealed before the first recommendation
    turns: null                        # cap on turns per user (default: all)
    relevant_rating: 4
    seed: 0
    output: runs/simulate              # curves.csv and summary.csv (and curves.png if
                                       # matplotlib is importable; it is not a dependency)
    wandb: {project: metarec}          # optional: log the curves with metarec.loggers.WandbLogger
                                       # (offline without a W&B account; save_dir: output)

Outputs: ``curves.csv`` (long format: policy, observed, users, hr, ndcg, mae and the
cumulative means cum_hr, cum_ndcg, cum_mae over all turns up to ``observed``, each user-turn
weighted alike), ``summary.csv`` (per policy: user-turns, mean hr, ndcg, mae over all turns)
and ``curves.png`` (HR, nDCG and MAE per turn; when matplotlib is installed).
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import numpy as np

__all__ = ["add_simulate_arguments", "load_config", "replay_user", "simulate",
           "simulate_command", "user_streams"]

KEYS = {"checkpoint", "fit_recipe", "fit_overrides", "data", "policies", "users", "k",
        "negatives", "warmup", "turns", "relevant_rating", "seed", "output", "wandb"}
DEFAULTS: dict[str, Any] = {"users": None, "k": 10, "negatives": 100, "warmup": 3,
                            "turns": None, "relevant_rating": 4.0, "seed": 0,
                            "output": "runs/simulate", "fit_overrides": [], "wandb": None}
COLUMNS = ["policy", "observed", "users", "hr", "ndcg", "mae", "cum_hr", "cum_ndcg", "cum_mae"]


def load_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The validated config (defaults filled in) of a YAML file or a dict."""
    from metarec import registry

    if isinstance(source, dict):
        raw, where = dict(source), "simulate config"
    else:
        where = str(source)
        raw = yaml.safe_load(Path(source).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(KEYS)}")
    config = {**DEFAULTS, **raw}
    if ("checkpoint" in config) == ("fit_recipe" in config):
        raise ValueError(f"{where}: give exactly one of checkpoint or fit_recipe")
    policies = config.get("policies")
    if not isinstance(policies, list) or not policies:
        raise ValueError(f"{where}: policies must be a non-empty list of {{name, args}}")
    known = {info.alias for info in registry.available("policies")}
    parsed = []
    for i, p in enumerate(policies):
        if isinstance(p, str):
            p = {"name": p}
        if not isinstance(p, dict) or "name" not in p or \
                set(p) - {"name", "args", "label", "epsilon"}:
            raise ValueError(f"{where}: policies[{i}] must be {{name, args[, label, epsilon]}}, "
                             f"got {p!r}")
        epsilon = p.get("epsilon", 0.0)
        if not isinstance(epsilon, (int, float)) or not 0 <= epsilon <= 1:
            raise ValueError(f"{where}: policies[{i}]: epsilon must be in [0, 1], got {epsilon!r}")
        if p["name"] not in known and "." not in str(p["name"]):
            raise ValueError(f"{where}: policies[{i}]: unknown policy {p['name']!r}; "
                             f"available: {sorted(known)}")
        parsed.append({"name": p["name"], "args": dict(p.get("args") or {}),
                       "label": str(p.get("label", p["name"])), "epsilon": float(epsilon)})
    labels = [p["label"] for p in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{where}: policy labels must be unique (add label:), got {labels}")
    config["policies"] = parsed
    for key, low in (("k", 1), ("negatives", 0), ("warmup", 0), ("seed", 0)):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{where}: {key} must be an int >= {low}, got {value!r}")
    if config["wandb"] is not None and not isinstance(config["wandb"], dict):
        raise ValueError(f"{where}: wandb must be a mapping of WandbLogger arguments or null")
    for key in ("users", "turns"):
        value = config[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: {key} must be an int >= 1 or null, got {value!r}")
    return config


def user_streams(tasks: Any, users: int | None = None) -> list[tuple[int, np.ndarray]]:
    """``[(user, events)]`` of a split's tasks: ``events`` is ``(n, 3)`` float64 rows
    ``(item, label, time)`` of the task's support and query interactions, oldest first
    (stable: ties keep support-then-query order)."""
    import numpy as np
    import torch

    out = []
    count = len(tasks) if users is None else min(users, len(tasks))
    for t in range(count):
        parts = []
        for side in ("support", "query"):
            m = getattr(tasks, f"{side}_mask")[t].bool()
            parts.append(torch.stack([getattr(tasks, f"{side}_items")[t][m].double(),
                                      getattr(tasks, f"{side}_labels")[t][m].double(),
                                      getattr(tasks, f"{side}_times")[t][m].double()], 1))
        events = torch.cat(parts).numpy()
        order = np.argsort(events[:, 2], kind="stable")
        out.append((int(tasks.users[t]), events[order]))
    return out


def _ndcg(shown: Sequence[int], relevant: set[int], k: int) -> float:
    dcg = sum(1.0 / math.log2(r + 2) for r, item in enumerate(shown) if item in relevant)
    ideal = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(relevant))))
    return dcg / ideal


def replay_user(adapter: Any, user: int, events: np.ndarray, candidates: np.ndarray, *,
                k: int, warmup: int, turns: int | None, relevant: float,
                explicit: bool, seed: int,
                epsilon: float = 0.0) -> list[tuple[int, float, float, float]]:
    """Replay one user; ``[(observed, hr, ndcg, mae)]`` per turn (see the module doc)."""
    import numpy as np
    import torch

    items = events[:, 0].astype(np.int64)
    good = events[:, 1] >= (relevant if explicit else 0.5)
    n = len(events)
    warm = min(warmup, n - 1)
    if warm < 0:
        return []
    session = adapter.adapt([(int(items[i]), float(events[i, 1]), int(events[i, 2]))
                             for i in range(warm)], user=user, seed=seed)
    out = []
    last = n if turns is None else min(n, warm + turns)
    cands = torch.as_tensor(candidates, dtype=torch.long)
    explore = torch.Generator().manual_seed(seed * 1_000_003 + user)  # epsilon-greedy draws
    for t in range(warm, last):
        future = {int(i) for i in items[t:][good[t:]]}
        shown = session.recommend(k, candidates=cands, epsilon=epsilon,
                                  generator=explore).items.tolist()
        if future:
            hr = float(any(i in future for i in shown))
            ndcg = _ndcg(shown, future, k)
        else:
            hr = ndcg = float("nan")
        score = float(session.scores([int(items[t])])[0])
        predicted = score if explicit else 1.0 / (1.0 + math.exp(-score))
        mae = abs(predicted - float(events[t, 1]))
        out.append((t, hr, ndcg, mae))
        session.update([(int(items[t]), float(events[t, 1]), int(events[t, 2]))])
    return out


def _candidates(events: np.ndarray, num_items: int, negatives: int, seed: int,
                user: int) -> np.ndarray:
    import numpy as np

    rated = np.unique(events[:, 0].astype(np.int64))
    rng = np.random.default_rng([seed, user])
    others = np.setdiff1d(np.arange(num_items), rated)
    sampled = rng.choice(others, size=min(negatives, len(others)), replace=False)
    return np.concatenate([rated, np.sort(sampled)])


def _curves(label: str, results: list[list[tuple[int, float, float, float]]]) -> list[dict]:
    import numpy as np

    by_turn: dict[int, list[tuple[float, float, float]]] = {}
    for user in results:
        for t, hr, ndcg, mae in user:
            by_turn.setdefault(t, []).append((hr, ndcg, mae))
    rows, seen = [], np.zeros((0, 3))
    for t in sorted(by_turn):
        values = np.array(by_turn[t], dtype=np.float64)
        seen = np.concatenate([seen, values])
        mean = [float(np.nanmean(values[:, j])) if np.isfinite(values[:, j]).any()
                else float("nan") for j in range(3)]
        cum = [float(np.nanmean(seen[:, j])) if np.isfinite(seen[:, j]).any()
               else float("nan") for j in range(3)]
        rows.append({"policy": label, "observed": t, "users": len(values),
                     "hr": mean[0], "ndcg": mean[1], "mae": mean[2],
                     "cum_hr": cum[0], "cum_ndcg": cum[1], "cum_mae": cum[2]})
    return rows


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _datamodule(config: dict[str, Any], checkpoint: str | Path) -> Any:
    """The test split to replay: the checkpoint's own (its data contract), or ``data:``."""
    from metarec.checkpoint import datamodule_from_checkpoint

    return datamodule_from_checkpoint(checkpoint, config.get("data"), where="simulate")


def simulate(config: str | Path | dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """Run the simulation; returns ``{"curves": rows, "summary": rows, "output": dir}``.
    ``progress``: a progress bar per policy on stderr (and the fit's, with ``fit_recipe``)."""
    import numpy as np

    from metarec.adapter import Adapter
    from metarec.checkpoint import train_recipe

    config = load_config(config)
    output = Path(config["output"])
    output.mkdir(parents=True, exist_ok=True)
    checkpoint = config.get("checkpoint")
    if checkpoint is None:
        if progress:
            print(f"metarec simulate: fitting {config['fit_recipe']} first "
                  f"(checkpoint: {output / 'model.ckpt'})", file=sys.stderr, flush=True)
        checkpoint = train_recipe(config["fit_recipe"], output / "model.ckpt",
                                  [str(x) for x in config["fit_overrides"]],
                                  progress_bar=progress)
    datamodule = _datamodule(config, checkpoint)
    tasks = datamodule.splits.test
    streams = user_streams(tasks, config["users"])
    explicit = datamodule.splits.feedback == "explicit"
    curves, summary = [], []
    bar = _progress(progress)
    for p in config["policies"]:
        adapter = Adapter.from_checkpoint(checkpoint, policy=p["name"], policy_args=p["args"])
        if adapter.num_items != datamodule.table.num_items:
            raise ValueError(f"the checkpoint's model has {adapter.num_items} items, the data "
                             f"{datamodule.table.num_items}: data: is not the fit's")
        results = []
        task = bar.add_task(f"{p['label']:>14}", total=len(streams)) if bar else None
        for user, events in streams:
            cands = _candidates(events, adapter.num_items, config["negatives"], config["seed"], user)
            results.append(replay_user(adapter, user, events, cands, k=config["k"],
                                       warmup=config["warmup"], turns=config["turns"],
                                       relevant=float(config["relevant_rating"]),
                                       explicit=explicit, seed=config["seed"],
                                       epsilon=p["epsilon"]))
            if bar:
                bar.advance(task)
        rows = _curves(p["label"], results)
        curves.extend(rows)
        flat = np.array([r[1:] for user in results for r in user], dtype=np.float64).reshape(-1, 3)
        summary.append({"policy": p["label"], "user_turns": len(flat),
                        **{m: float(np.nanmean(flat[:, j])) if np.isfinite(flat[:, j]).any()
                           else float("nan") for j, m in enumerate(("hr", "ndcg", "mae"))}})
    if bar:
        bar.stop()
    _write_csv(output / "curves.csv", curves, COLUMNS)
    _write_csv(output / "summary.csv", summary, ["policy", "user_turns", "hr", "ndcg", "mae"])
    plotted = _plot(output / "curves.png", curves, config["k"])
    if config["wandb"] is not None:
        _log_wandb(config["wandb"], output, curves, summary)
    return {"curves": curves, "summary": summary, "output": output, "plot": plotted}


def _log_wandb(args: dict[str, Any], output: Path, curves: list[dict],
               summary: list[dict]) -> None:
    """Per-turn curves as ``simulate/<policy>/<metric>`` against ``simulate/observed``."""
    from metarec.loggers import WandbLogger

    logger = WandbLogger(**{"save_dir": str(output), **args})
    experiment = logger.experiment
    if hasattr(experiment, "define_metric"):
        experiment.define_metric("simulate/observed")
        experiment.define_metric("simulate/*", step_metric="simulate/observed")
    for row in curves:
        experiment.log({"simulate/observed": row["observed"],
                        **{f"simulate/{row['policy']}/{m}": row[m] for m in COLUMNS[2:]}})
    for row in summary:
        for m in ("hr", "ndcg", "mae"):
            experiment.summary[f"simulate/{row['policy']}/total_{m}"] = row[m]
    logger.finalize("success")
    if hasattr(experiment, "finish"):
        experiment.finish()


def _plot(path: Path, curves: list[dict], k: int) -> bool:
    """curves.png when matplotlib is importable (not a dependency); False otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, metric, title in zip(axes, ("hr", "ndcg", "mae"), (f"HR@{k}", f"nDCG@{k}", "MAE")):
        for label in dict.fromkeys(r["policy"] for r in curves):
            rows = [r for r in curves if r["policy"] == label]
            ax.plot([r["observed"] for r in rows], [r[metric] for r in rows], label=label)
        ax.set_xlabel("observed interactions")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _progress(enabled: bool) -> Any:
    """A started rich progress display on stderr (users replayed per policy), or None."""
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   "users", TimeElapsedColumn(), console=Console(file=sys.stderr))
    bar.start()
    return bar


def add_simulate_arguments(parser: Any) -> None:
    """The ``metarec simulate`` options: the config keys of the module doc, typed."""
    from metarec.ranges import NonNegativeInt, PositiveInt

    parser.add_argument("--checkpoint", type=str | None, default=None,
                        help="a metarec fit checkpoint (or give fit_recipe)")
    parser.add_argument("--fit_recipe", type=str | None, default=None,
                        help="a recipe to fit first (its checkpoint: OUTPUT/model.ckpt)")
    parser.add_argument("--fit_overrides", type=list[str], default=[],
                        help="command-line overrides for the fit_recipe fit")
    parser.add_argument("--data", type=dict | None, default=None,
                        help="EpisodeDataModule arguments (default: the checkpoint's own)")
    parser.add_argument("--policies", type=list[dict[str, Any] | str] | None, default=None,
                        help="[{name, args, label, epsilon}], each adapted from the checkpoint")
    parser.add_argument("--users", type=PositiveInt | None, default=None,
                        help="the first N test users (null: all)")
    parser.add_argument("--k", type=PositiveInt, default=10, help="recommendations per turn")
    parser.add_argument("--negatives", type=NonNegativeInt, default=100,
                        help="sampled unrated items added to each candidate set")
    parser.add_argument("--warmup", type=NonNegativeInt, default=3,
                        help="interactions revealed before the first recommendation")
    parser.add_argument("--turns", type=PositiveInt | None, default=None,
                        help="cap on turns per user (null: all)")
    parser.add_argument("--relevant_rating", type=float, default=4.0)
    parser.add_argument("--seed", type=NonNegativeInt, default=0)
    parser.add_argument("--output", type=str, default="runs/simulate",
                        help="folder of curves.csv, summary.csv and curves.png")
    parser.add_argument("--wandb", type=dict | None, default=None,
                        help="log the curves with metarec.loggers.WandbLogger(**wandb)")
    parser.add_argument("--progress", type=bool, default=True,
                        help="progress bars on stderr")


def simulate_command(config: Any) -> None:
    """``metarec simulate --config SIM.yaml [--output DIR] [overrides]``: ``config`` is the
    parsed namespace (or an argument list, parsed here)."""
    if isinstance(config, (list, tuple)):
        from metarec.cli import EXTRA_COMMANDS, new_parser

        parser = new_parser(prog="metarec simulate", description=EXTRA_COMMANDS["simulate"])
        add_simulate_arguments(parser)
        config = parser.parse_args(list(config))
    settings = dict(config.as_dict() if hasattr(config, "as_dict") else config)
    settings.pop("config", None)
    progress = bool(settings.pop("progress", True))
    for key in ("checkpoint", "fit_recipe"):
        if settings.get(key) is None:
            settings.pop(key, None)
    result = simulate(settings, progress=progress)
    for row in result["summary"]:
        print(f"{row['policy']:>14}  user-turns {row['user_turns']:>6}  hr {row['hr']:.4f}  "
              f"ndcg {row['ndcg']:.4f}  mae {row['mae']:.4f}")
    out = result["output"]
    print(f"wrote {out / 'curves.csv'}, {out / 'summary.csv'}"
          + (f" and {out / 'curves.png'}" if result["plot"]
             else " (no curves.png: matplotlib is not installed)"))
