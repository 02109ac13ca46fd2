"""Adaptation latency of a new user, from a checkpoint, on CPU: metarec.Adapter end to end.

What is timed (``time.perf_counter`` around one public call, nothing cached between calls):

- ``single``: ``adapter.adapt(events, user=u)`` for one test user: the events (a list of
  ``(item, label, timestamp)`` tuples, the user's support set of the test split) are validated,
  sorted by time, turned into a padded support batch with the user's and items' features,
  adapted by the policy (``finetune`` with ``steps`` steps of the checkpoint algorithm's inner
  loop, vmapped over a batch of one) and wrapped in a ``UserSession``. p50/p95 over
  ``repeats`` passes over all test users.
- ``recommend``: ``session.recommend(10)``, top-10 of every item not seen (p50).
- ``batched``: ``adapter.adapt({user: events, ...})`` for ``--users`` users at once (every user
  id of the data up to that number, each given a test user's support set in turn): one
  vmapped policy call, then one session per user; users per second = users / median time.
- ``online update``: ``session.update([event])`` of a session of the ``online`` policy (one
  event, one step on its replay buffer of 20), p50.

Modes: ``eager`` (``Adapter(compile=False)``, the default) and ``compiled``
(``Adapter(compile=True)``: the policy runs through ``torch.compile``, one graph per padded
shape; the time to compile the shapes used is reported as ``compile_s`` and is not in the
latencies). Before timing, compiled adaptations are compared with eager ones (max abs diff).

The checkpoint comes from ``--ckpt``, or is made by ``metarec fit`` on ``--recipe`` (default:
``recipes/movielens-100k/melu-maml.yaml`` when MovieLens-100K is found, else the quick-start
recipe) for ``--train-steps`` meta-training steps: latency depends on shapes, not on how well
the weights are trained. Backbones: melu only. A ``transformer`` backbone (in progress at the
time of writing) reads per-slot user histories (``history.*`` inputs) that the Adapter does not
build yet; the JSON says whether one is registered.

    .venv/bin/python benchmarks/adaptation_latency.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from metarec import Adapter, available, train_recipe
from metarec.cli import MetarecCLI

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_JSON = HERE / "results" / "adaptation_latency.json"
ML100K = REPO / "recipes" / "movielens-100k" / "melu-maml.yaml"
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
TRANSFORMER_NOTE = ("a 'transformer' backbone is registered but not benchmarked: it reads per-slot "
                    "history inputs (history.*) that metarec.Adapter does not build yet")
QUIET = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.callbacks", "[]"]


def ml100k_available() -> bool:
    from metarec_plugins.datasets.movielens import find_root

    shared = REPO.parent / "shared" / "data"
    if not os.environ.get("METAREC_DATA") and (shared / "ml-100k" / "u.data").is_file():
        os.environ["METAREC_DATA"] = str(shared)
    return find_root(None) is not None


def test_streams(recipe: Path) -> dict[int, list[tuple[int, float, int]]]:
    """The test split's support sets, ``{user: [(item, label, timestamp)]}`` (oldest first)."""
    cli = MetarecCLI(args=["--config", str(recipe), *QUIET], run=False)
    tasks = cli.datamodule.splits.test
    streams = {}
    for t in range(len(tasks)):
        n = int(tasks.support_mask[t].sum())
        streams[int(tasks.users[t])] = list(zip(tasks.support_items[t, :n].tolist(),
                                                tasks.support_labels[t, :n].tolist(),
                                                tasks.support_times[t, :n].tolist()))
    return streams


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def time_single(adapter: Adapter, streams: dict, repeats: int) -> tuple[list[float], list]:
    users, times, sessions = list(streams), [], []
    for u in users[:10]:  # warm-up
        adapter.adapt(streams[u], user=u)
    for _ in range(repeats):
        for u in users:
            start = time.perf_counter()
            session = adapter.adapt(streams[u], user=u)
            times.append(time.perf_counter() - start)
        sessions.append(session)
    return times, sessions


def time_batched(adapter: Adapter, batch: dict, repeats: int) -> float:
    adapter.adapt(batch)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        adapter.adapt(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="adaptation_latency_"))
    recipe = Path(args.recipe) if args.recipe else (ML100K if ml100k_available() else QUICKSTART)
    if args.recipe is None and recipe == ML100K:
        os.environ.setdefault("METAREC_DATA", str(REPO.parent / "shared" / "data"))
    ckpt = Path(args.ckpt) if args.ckpt else workdir / "model.ckpt"
    train_s = None
    if not args.ckpt:
        start = time.perf_counter()
        cwd = os.getcwd()
        os.chdir(workdir)
        try:
            train_recipe(recipe, ckpt, ["--trainer.max_steps", str(args.train_steps),
                                        "--trainer.limit_val_batches", "0"])
        finally:
            os.chdir(cwd)
        train_s = time.perf_counter() - start
    streams = test_streams(recipe)
    sizes = sorted(len(e) for e in streams.values())
    probe = Adapter.from_checkpoint(ckpt)
    n_batch = min(args.users, probe.num_users)
    pool = list(streams.values())
    batch = {u: pool[u % len(pool)] for u in range(n_batch)}
    registered = {i.alias for i in available("backbones")}
    hp = probe.model.hparams
    result = {
        "benchmark": "adaptation_latency",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average_start": os.getloadavg()},
        "checkpoint": {"path": str(ckpt) if args.ckpt else None, "recipe": str(recipe.relative_to(REPO))
                       if recipe.is_relative_to(REPO) else str(recipe),
                       "meta_train_steps": None if args.ckpt else args.train_steps,
                       "train_s": train_s, "backbone": hp["backbone"],
                       "backbone_args": hp["backbone_args"], "algorithm": hp["algorithm"],
                       "algorithm_args": hp["algorithm_args"], "num_users": probe.num_users,
                       "num_items": probe.num_items,
                       "fast_parameters": sum(v.numel() for v in probe.start.values())},
        "test_users": len(streams),
        "support_events": {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]},
        "batched_users": n_batch,
        "backbones": ["melu"],
        "transformer": (TRANSFORMER_NOTE if "transformer" in registered else
                        "no 'transformer' backbone is registered: melu only"),
        "results": [],
    }
    if args.ckpt is None and hp["backbone"] != "melu":
        raise SystemExit(f"the recipe's backbone is {hp['backbone']}, expected melu")
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    for steps in args.steps:
        eager = None
        for mode in modes:
            adapter = Adapter.from_checkpoint(ckpt, policy="finetune",
                                              policy_args={"steps": steps},
                                              compile=mode == "compiled")
            row: dict = {"backbone": "melu", "policy": "finetune", "steps": steps, "mode": mode}
            if mode == "compiled":  # compile every shape used, and check against eager
                start = time.perf_counter()
                for u in list(streams)[:]:
                    adapter.adapt(streams[u], user=u)
                adapter.adapt(batch)
                row["compile_s"] = round(time.perf_counter() - start, 1)
                u0 = next(iter(streams))
                row["max_abs_diff_vs_eager"] = max_diff(
                    adapter.adapt(streams[u0], user=u0).fast, eager.adapt(streams[u0], user=u0).fast)
            else:
                eager = adapter
            times, sessions = time_single(adapter, streams, args.repeats)
            row["single_p50_ms"] = round(1e3 * percentile(times, 0.5), 3)
            row["single_p95_ms"] = round(1e3 * percentile(times, 0.95), 3)
            row["single_samples"] = len(times)
            rec = []
            for s in sessions * 20:
                start = time.perf_counter()
                s.recommend(10)
                rec.append(time.perf_counter() - start)
            row["recommend_p50_ms"] = round(1e3 * percentile(rec, 0.5), 3)
            seconds = time_batched(adapter, batch, args.batch_repeats)
            row["batched_s"] = round(seconds, 4)
            row["batched_users_per_s"] = round(n_batch / seconds, 1)
            result["results"].append(row)
            print(json.dumps(row), flush=True)
    # One online update (one event, one step on a replay buffer of 20).
    online = Adapter.from_checkpoint(ckpt, policy="online",
                                     policy_args={"buffer_size": 20, "events_per_update": 1})
    user, events = next(iter(streams.items()))
    session = online.adapt(events, user=user)
    times = []
    for i in range(50 + 20 * args.repeats):
        event = [((i * 37) % online.num_items, float(1 + i % 5))]
        start = time.perf_counter()
        session.update(event)
        times.append(time.perf_counter() - start)
    times = times[50:]
    result["online_update"] = {"p50_ms": round(1e3 * percentile(times, 0.5), 3),
                               "p95_ms": round(1e3 * percentile(times, 0.95), 3),
                               "buffer_size": 20, "samples": len(times)}
    print(json.dumps({"online_update": result["online_update"]}), flush=True)
    goal = {}
    for row in result["results"]:
        if row["steps"] == 5:
            goal[row["mode"]] = {"single_p50_under_5ms": row["single_p50_ms"] < 5.0,
                                 "batched_over_1000_users_per_s": row["batched_users_per_s"] > 1000}
    result["goal_melu_5_steps"] = goal
    result["machine"]["load_average_end"] = os.getloadavg()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="5 steps only, fewer repeats (about 2 minutes with compile)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    parser.add_argument("--ckpt", default=None, help="checkpoint (default: train one)")
    parser.add_argument("--recipe", default=None, help="recipe to train the checkpoint with")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--steps", default=None, help="comma-separated steps (1,5,10)")
    parser.add_argument("--users", type=int, default=1024, help="users per batched call")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--no-compile", action="store_true", help="eager mode only")
    args = parser.parse_args(argv)
    args.steps = [int(s) for s in (args.steps or ("5" if args.quick else "1,5,10")).split(",")]
    args.repeats = 2 if args.quick else 10
    args.batch_repeats = 3 if args.quick else 7
    result = run(args)
    result["quick"] = args.quick
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
