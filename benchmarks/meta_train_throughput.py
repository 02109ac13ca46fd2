"""Meta-training throughput: metarec's vmapped second-order MAML vs a per-task Python loop.

What is timed, per batch of tasks (default 32 tasks, MeLU backbone, 5 inner SGD steps,
second order): the forward pass of the outer loss and its ``backward()``, i.e. one
meta-gradient. No optimiser step, no data loading (batches are collated up front).

- ``vmap``: ``MAML(inner_steps, inner_lr).outer_loss(model, batch)`` then ``.backward()``,
  with ``model = FunctionalModel(melu, select_parameters(melu, melu.default_fast_parameters()),
  "explicit")``: the inner loop is ``torch.func.grad`` vmapped across the tasks of the batch.
- ``loop``: the same math, one task at a time: for each task, ``inner_steps`` steps of
  ``torch.autograd.grad(create_graph=True)`` of the support loss (``FunctionalModel.loss``,
  i.e. ``torch.func.functional_call`` without vmap), the query loss of the adapted
  parameters, accumulated into the mean over tasks, then ``backward()``. Each task is cut to
  its own support/query length (no padding), as a per-task loop naturally would.
- ``l2l`` (with ``--l2l-python``): learn2learn's ``MAML(head, lr, first_order=False)``,
  ``clone()`` + ``adapt()`` per task, run by ``benchmarks/_l2l_worker.py`` in a subprocess with
  that interpreter, on the same (unpadded) tasks and the same initial weights.

Before timing, the meta-gradients of all paths on batch 0 are compared (``allclose``), so the
benchmark compares the same math. The paths are timed side by side, interleaved (the order
rotates every repeat; the learn2learn worker waits on a pipe while the others run), and the
medians over repeats are reported.

- ``vmap_bucketed``: the same tasks regrouped by support size (sorted, then cut into batches
  of ``--tasks-per-batch``: what ``data.bucket_by_length`` does to an epoch), so each batch is
  padded only to its own longest task. Same code as ``vmap``; only the batching differs.
- ``vmap_bucketed_bags``: the bucketed batches with multi-hot features (genres) as bags of
  category ids gathered sparsely (``data.multihot_bags``) instead of dense 0/1 vectors.
- ``vmap_compiled`` (with ``--compile``): the bucketed batches through ``torch.compile`` of the
  outer loss (forward and backward; eager stays the reference), each batch padded up to a
  multiple of ``--compile-pad`` so that few graphs are compiled. Compile time (the first call
  of each shape) is reported apart from the steady state.

Measured against the machine's limit, in the same process: the FLOPs of one pass
(``torch.utils.flop_counter.FlopCounterMode``, which counts matrix products: mm, bmm, addmm),
*padded* (what the vmapped batches compute) and *useful* (the same outer loss and backward run
on every task alone, trimmed to its own support and query: no padding), and the float32 matmul
peak (the best of several 2048x2048 products, timed at the start and the end of the run).
``useful_flop_efficiency`` = useful FLOPs per second / peak, per path.

Data: MovieLens-100K (``MovieLens100K``) when ``../shared/data/ml-100k`` or ``$METAREC_DATA``
holds it, else a synthetic table with ml-100k shapes (943 users, 1682 items, the same feature
cardinalities, support sets up to 90, query sets of 10).

    .venv/bin/python benchmarks/meta_train_throughput.py --quick --json /tmp/mtt.json \\
        [--compile] [--l2l-python ~/.cache/metarec/l2l-venv/bin/python]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _results import write_json  # benchmarks/_results.py (scripts run from here)
from torch.utils.flop_counter import FlopCounterMode

from metarec import DataError, Feature, FeatureSpec, InteractionTable, TaskConfig, build_tasks
from metarec.data.episodes import EpisodeBatch, EpisodeCollator
from metarec.functional import FunctionalModel, select_parameters
from metarec_plugins.algorithms.maml import MAML
from metarec_plugins.backbones.melu import MeLU
from metarec_plugins.datasets.movielens import MovieLens100K, find_root

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "_l2l_worker.py"
DEFAULT_JSON = HERE / "results" / "meta_train_throughput.json"


# ----------------------------------------------------------------------------- data


def synthetic_ml100k(seed: int = 0) -> InteractionTable:
    """Random ratings with MovieLens-100K's shapes and feature cardinalities."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 943, 1682
    # Enough users inside the default 13..100 filter; some above it, as in ml-100k.
    counts = np.where(rng.random(n_users) < 0.6, rng.integers(20, 101, n_users),
                      rng.integers(101, 300, n_users))
    users = np.repeat(np.arange(n_users), counts)
    items = np.concatenate([rng.choice(n_items, c, replace=False) for c in counts])
    ratings = rng.integers(1, 6, len(users)).astype(np.float32)
    times = 880_000_000 + np.arange(len(users)) * 10
    genres = (rng.random((n_items, 19)) < 0.1).astype(np.float32)
    genres[np.arange(n_items), rng.integers(0, 19, n_items)] = 1.0
    return InteractionTable(
        users=users, items=items, labels=ratings, timestamps=times,
        num_users=n_users, num_items=n_items,
        user_features=[
            Feature(FeatureSpec("age", "user", "categorical", 7), rng.integers(0, 7, n_users)),
            Feature(FeatureSpec("gender", "user", "categorical", 2), rng.integers(0, 2, n_users)),
            Feature(FeatureSpec("occupation", "user", "categorical", 21),
                    rng.integers(0, 21, n_users)),
            Feature(FeatureSpec("zip", "user", "categorical", 11), rng.integers(0, 11, n_users)),
        ],
        item_features=[
            Feature(FeatureSpec("genre", "item", "multihot", 19), genres),
            Feature(FeatureSpec("year", "item", "categorical", 72), rng.integers(0, 72, n_items)),
        ],
        feedback="explicit", rating_range=(1.0, 5.0), source="synthetic-ml100k-shapes")


def load_table(force_synthetic: bool) -> tuple[InteractionTable, str]:
    if not force_synthetic:
        shared = REPO.parent / "shared" / "data" / "ml-100k"
        root = shared if shared.is_dir() else None
        if root is not None or os.environ.get("METAREC_DATA"):
            if find_root(root) is not None:
                try:
                    table = MovieLens100K(root=str(root) if root else None, download=False).load()
                    return table, f"movielens-100k ({table.source})"
                except DataError as err:
                    print(f"[warn] MovieLens-100K unreadable ({err}); using synthetic data",
                          file=sys.stderr)
    return synthetic_ml100k(), "synthetic (ml-100k shapes)"


def make_batches(table: InteractionTable, n_batches: int, tasks_per_batch: int,
                 seed: int, bucketed: bool = False, bags: bool = False) -> list[EpisodeBatch]:
    """``n_batches`` batches of distinct training tasks (wrapping around if there are few).

    ``bucketed``: the same tasks, sorted by support size and cut into batches in that order
    (each batch then padded only to its own longest support), batches in random order.
    ``bags``: multi-hot features as bags of category ids (``data.multihot_bags``)."""
    tasks = build_tasks(table, TaskConfig(), seed=0).train
    collate = EpisodeCollator(tasks, table, bags=bags)
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(tasks), generator=g)
                       for _ in range(-(-n_batches * tasks_per_batch // len(tasks)))])
    order = order[:n_batches * tasks_per_batch]
    if bucketed:
        sizes = tasks.support_mask[order].sum(1)
        order = order[torch.sort(sizes, stable=True).indices]
    chunks = [order[i * tasks_per_batch:(i + 1) * tasks_per_batch] for i in range(n_batches)]
    if bucketed:
        chunks = [chunks[i] for i in torch.randperm(n_batches, generator=g).tolist()]
    return [collate(c) for c in chunks]


def pad_batch(batch: EpisodeBatch, multiple: int) -> EpisodeBatch:
    """``batch`` with support and query padded (mask False) up to a multiple of ``multiple``
    slots, so that batches of nearby widths share one compiled graph."""
    def side(s: dict) -> dict:
        n = s["mask"].shape[1]
        extra = -n % multiple
        if not extra:
            return s
        return {k: torch.cat([v, v.new_zeros((v.shape[0], extra, *v.shape[2:]))], 1)
                for k, v in s.items()}
    return EpisodeBatch(users=batch.users, support=side(batch.support), query=side(batch.query))


def per_task(batch: EpisodeBatch) -> list[tuple[dict, dict]]:
    """A padded batch as a list of (support, query) feature dicts, each cut to its real entries."""
    out = []
    for b in range(len(batch)):
        sides = []
        for side in (batch.support, batch.query):
            keep = side["mask"][b]
            sides.append({k: v[b][keep].contiguous() for k, v in side.items()})
        out.append(tuple(sides))
    return out


# ----------------------------------------------------------------------------- paths


def vmap_meta_gradient(model: FunctionalModel, algo: MAML, batch: EpisodeBatch) -> torch.Tensor:
    model.backbone.zero_grad(set_to_none=True)
    loss, _ = algo.outer_loss(model, batch)
    loss.backward()
    return loss


def loop_meta_gradient(model: FunctionalModel, tasks: list[tuple[dict, dict]], steps: int,
                       lr: float) -> torch.Tensor:
    model.backbone.zero_grad(set_to_none=True)
    fast, slow = model.split()
    names = list(fast)
    outer = 0.0
    for support, query in tasks:
        f = fast
        for _ in range(steps):
            inner = model.loss(f, slow, support)
            grads = torch.autograd.grad(inner, [f[n] for n in names], create_graph=True)
            f = {n: f[n] - lr * g for n, g in zip(names, grads)}
        outer = outer + model.loss(f, slow, query)
    loss = outer / len(tasks)
    loss.backward()
    return loss


def compiled_meta_gradient(model: FunctionalModel, algo: MAML):
    """The outer loss through ``torch.compile`` (one graph per padded shape); ``backward()``
    runs the compiled backward. Eager (:func:`vmap_meta_gradient`) is the reference."""
    def outer(support: dict, query: dict) -> torch.Tensor:
        return algo.outer_loss(model, EpisodeBatch(users=torch.empty(0), support=support,
                                                   query=query))[0]
    compiled = torch.compile(outer, dynamic=False)

    def run(batch: EpisodeBatch) -> torch.Tensor:
        model.backbone.zero_grad(set_to_none=True)
        loss = compiled(batch.support, batch.query)
        loss.backward()
        return loss
    return run


def flops_of(fn, *args) -> int:
    """Matrix-product FLOPs of ``fn(*args)`` (forward and backward), by torch's counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args)
    return int(counter.get_total_flops())


def single_tasks(batch: EpisodeBatch) -> list[EpisodeBatch]:
    """Every task of ``batch`` alone (a batch of one), cut to its own support and query."""
    out = []
    for b in range(len(batch)):
        sides = []
        for side in (batch.support, batch.query):
            n = int(side["mask"][b].sum())
            assert bool(side["mask"][b, :n].all()), "padding must sit at the end of a row"
            sides.append({k: v[b:b + 1, :n] for k, v in side.items()})
        out.append(EpisodeBatch(users=batch.users[b:b + 1], support=sides[0], query=sides[1]))
    return out


def useful_flops(model: FunctionalModel, algo: MAML, batches: list[EpisodeBatch]) -> int:
    """The FLOPs of the outer loss and its backward with no padding at all: each task run
    alone on its own support and query (the same math as the vmapped batch, task by task)."""
    return sum(flops_of(vmap_meta_gradient, model, algo, task)
               for batch in batches for task in single_tasks(batch))


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` float32 ``size x size`` matrix products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def grads_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float,
            atol: float, what: str) -> dict:
    assert a.keys() == b.keys(), f"{what}: parameter names differ: {sorted(a)} vs {sorted(b)}"
    worst = {n: float((a[n] - b[n]).abs().max()) for n in a}
    rel = max(float((a[n] - b[n]).norm() / a[n].norm().clamp_min(1e-12)) for n in a)
    bad = [n for n in a if not torch.allclose(a[n], b[n], rtol=rtol, atol=atol)]
    assert not bad, (f"{what}: meta-gradients differ (rtol={rtol}, atol={atol}) for {bad}; "
                     f"max abs diff {max(worst.values()):.3g}")
    return {"allclose": True, "rtol": rtol, "atol": atol,
            "max_abs_diff": max(worst.values()), "max_rel_norm_diff": rel}


class L2LWorker:
    """The learn2learn worker process (``_l2l_worker.py --serve``)."""

    def __init__(self, python: str, payload: Path, grad_out: Path, threads: int,
                 warmup: int, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [python, str(WORKER), str(payload), "--serve", "--threads", str(threads),
             "--grad-out", str(grad_out), "--warmup", str(warmup)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"})

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"learn2learn worker exited ({self.proc.returncode}):\n"
                               + self.log.read_text()[-4000:])
        return json.loads(line)

    def ready(self) -> dict:
        return self._read()

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()


class CpuShare:
    """CPU time other processes used while we timed: the benchmark assumes an idle machine.

    Reads system-wide busy time from ``/proc/stat`` and subtracts this process's and the
    learn2learn worker's own CPU time (Linux only; elsewhere it reports nothing).
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            cpu = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            total, idle = sum(cpu[:8]), cpu[3] + cpu[4]
            ours = 0.0
            for pid in self.pids:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ours += float(fields[11]) + float(fields[12])  # utime, stime
            return total, total - idle, ours
        except (OSError, ValueError, IndexError):
            return None

    def others(self) -> float | None:
        """Share of all CPU capacity used by other processes since construction (0..1)."""
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        total, busy, ours = (e - s for e, s in zip(end, self.start))
        return max(0.0, (busy - ours) / total)


# ----------------------------------------------------------------------------- main


def markdown(result: dict) -> str:
    """The table of docs/results.md from the JSON: tasks/s of the latest quick and full runs
    (benchmarks/docs_tables.py renders it)."""
    runs = result["runs_by_mode"]
    quick, full = runs.get("quick", {}), runs["full"]
    labels = {"vmap": "metarec: `torch.func` inner loop, vmapped over tasks",
              "loop": "per-task Python loop, `torch.autograd.grad` (each task trimmed to its own length)",
              "l2l": f"learn2learn {full.get('learn2learn')} `MAML` clone/adapt loop "
                     f"(torch {str(full.get('l2l_torch')).split('+')[0]}, own venv)"}
    lines = [f"| path | tasks/s (`--quick`) | tasks/s (full: {full['batches_per_pass']} batches x "
             f"{full['repeats']} repeats) | vs loop |", "|---|---|---|---|"]
    for path, label in labels.items():
        rate = full.get(f"{path}_tasks_per_s")
        if rate is None:
            continue
        ratio = f"{rate / full['loop_tasks_per_s']:.1f}x"
        quick_rate = quick.get(f"{path}_tasks_per_s")
        lines.append(f"| {label} | {'–' if quick_rate is None else f'{quick_rate:.0f}'} | {rate:.0f} | "
                     + (f"**{ratio}**" if path == "vmap" else ratio) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    ap.add_argument("--batches", type=int, default=None,
                    help="distinct batches per timed pass (default 2 quick, 10 full)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved timed passes per path (default 5 quick, 11 full)")
    ap.add_argument("--tasks-per-batch", type=int, default=32)
    ap.add_argument("--inner-steps", type=int, default=5)
    ap.add_argument("--inner-lr", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's default, one per core)")
    ap.add_argument("--synthetic", action="store_true", help="ignore MovieLens-100K if present")
    ap.add_argument("--l2l-python", default=None,
                    help="a python interpreter with learn2learn: also time learn2learn's MAML")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile of the outer loss on the bucketed batches")
    ap.add_argument("--compile-pad", type=int, default=16,
                    help="compiled batches are padded to a multiple of this many slots")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # On SIGTERM, unwind normally so that the worker is stopped and the temp files removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    n_batches = args.batches or (2 if args.quick else 10)
    repeats = args.repeats or (5 if args.quick else 11)
    start = time.perf_counter()

    default_threads = torch.get_num_threads()
    threads = args.threads or default_threads
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    peak_start = matmul_peak()

    table, source = load_table(args.synthetic)
    batches = make_batches(table, n_batches, args.tasks_per_batch, args.seed)
    bucketed = make_batches(table, n_batches, args.tasks_per_batch, args.seed, bucketed=True)
    bucketed_bags = make_batches(table, n_batches, args.tasks_per_batch, args.seed,
                                 bucketed=True, bags=True)
    loop_batches = [per_task(b) for b in batches]
    backbone = MeLU(table.schema)
    model = FunctionalModel(backbone, select_parameters(backbone,
                                                        backbone.default_fast_parameters()),
                            "explicit")
    algo = MAML(inner_steps=args.inner_steps, inner_lr=args.inner_lr)
    steps, lr = args.inner_steps, args.inner_lr
    n_tasks = sum(len(b) for b in batches)
    assert sorted(torch.cat([b.users for b in bucketed]).tolist()) == \
        sorted(torch.cat([b.users for b in batches]).tolist()), "bucketing changed the tasks"

    # FLOPs of one pass (forward + backward of every batch's outer loss).
    flops = {"padded": sum(flops_of(vmap_meta_gradient, model, algo, b) for b in batches),
             "padded_bucketed": sum(flops_of(vmap_meta_gradient, model, algo, b)
                                    for b in bucketed),
             "useful": useful_flops(model, algo, batches)}

    worker = None
    tmp = tempfile.TemporaryDirectory(prefix="metarec-bench-")
    l2l_info: dict = {}
    if args.l2l_python:
        payload = Path(tmp.name) / "payload.pt"
        torch.save({
            "config": {"specs": [{"key": s.key, "kind": s.kind, "cardinality": s.cardinality}
                                 for s in backbone.specs],
                       "embedding_dim": backbone.decision[0].in_features // len(backbone.specs),
                       "hidden": [m.out_features for m in backbone.decision
                                  if isinstance(m, torch.nn.Linear)],
                       "inner_lr": lr, "inner_steps": steps},
            "state_dict": {k: v.detach().clone() for k, v in backbone.state_dict().items()},
            "batches": loop_batches,
        }, payload)
        # Started now so that its (slow) imports overlap our untimed warm-up.
        worker = L2LWorker(args.l2l_python, payload, Path(tmp.name) / "l2l_grads.pt", threads,
                           warmup=1, log=Path(tmp.name) / "l2l_worker.log")

    compile_info: dict = {}
    try:
        # Same math: meta-gradients of batch 0 must agree across paths.
        vmap_meta_gradient(model, algo, batches[0])
        g_vmap = grads_of(backbone)
        loop_meta_gradient(model, loop_batches[0], steps, lr)
        g_loop = grads_of(backbone)
        checks = {"loop_vs_vmap": compare(g_vmap, g_loop, 1e-4, 1e-6, "loop vs vmap")}
        # A bucketed batch against the per-task reference on the same tasks.
        vmap_meta_gradient(model, algo, bucketed[0])
        g_bucket = grads_of(backbone)
        loop_meta_gradient(model, per_task(bucketed[0]), steps, lr)
        checks["loop_vs_vmap_bucketed"] = compare(grads_of(backbone), g_bucket, 1e-4, 1e-6,
                                                  "loop vs bucketed vmap")
        vmap_meta_gradient(model, algo, bucketed_bags[0])
        checks["bags_vs_dense_bucketed"] = compare(g_bucket, grads_of(backbone), 1e-5, 1e-7,
                                                   "multi-hot bags vs dense")
        paths = {}
        if args.compile:
            compiled_batches = [pad_batch(b, args.compile_pad) for b in bucketed]
            run_compiled = compiled_meta_gradient(model, algo)
            widths = sorted({int(b.support["mask"].shape[1]) for b in compiled_batches})
            t0 = time.perf_counter()
            try:
                for b in compiled_batches:  # compiles every shape once
                    run_compiled(b)
                compile_info["compile_s"] = time.perf_counter() - t0
                compile_info["graphs"] = len({(b.support["mask"].shape[1],
                                               b.query["mask"].shape[1])
                                              for b in compiled_batches})
                compile_info["support_widths"] = widths
                run_compiled(compiled_batches[0])
                checks["compiled_vs_eager_bucketed"] = compare(
                    g_bucket, grads_of(backbone), 1e-4, 1e-6, "compiled vs eager")

                def time_compiled() -> float:
                    t0 = time.perf_counter()
                    for b in compiled_batches:
                        run_compiled(b)
                    return time.perf_counter() - t0
                paths["vmap_compiled"] = time_compiled
            except Exception as err:  # noqa: BLE001 - report it, keep the eager numbers
                compile_info["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:400]}"
                print(f"[warn] torch.compile failed: {compile_info['error']}", file=sys.stderr)
        # Warm-up (first vmap/grad calls are slow: lazy init of torch.func, allocator).
        for b, bb, bg, tb in zip(batches, bucketed, bucketed_bags, loop_batches):
            vmap_meta_gradient(model, algo, b)
            vmap_meta_gradient(model, algo, bb)
            vmap_meta_gradient(model, algo, bg)
            loop_meta_gradient(model, tb, steps, lr)
        if worker is not None:
            l2l_info = worker.ready()
            g_l2l = torch.load(Path(tmp.name) / "l2l_grads.pt", weights_only=True)
            checks["l2l_vs_vmap"] = compare(g_vmap, g_l2l, 1e-4, 1e-6, "learn2learn vs vmap")

        def timer(fn, items):
            def run() -> float:
                t0 = time.perf_counter()
                for item in items:
                    fn(item)
                return time.perf_counter() - t0
            return run

        paths = {"vmap": timer(lambda b: vmap_meta_gradient(model, algo, b), batches),
                 "vmap_bucketed": timer(lambda b: vmap_meta_gradient(model, algo, b), bucketed),
                 "vmap_bucketed_bags": timer(lambda b: vmap_meta_gradient(model, algo, b),
                                             bucketed_bags),
                 "loop": timer(lambda tb: loop_meta_gradient(model, tb, steps, lr),
                               loop_batches),
                 **paths}
        if worker is not None:
            paths["l2l"] = lambda: worker.run()["seconds"]
        names = list(paths)
        seconds: dict[str, list[float]] = {n: [] for n in names}
        share = CpuShare([os.getpid()] + ([worker.proc.pid] if worker is not None else []))
        for r in range(repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
                gc.collect()
                seconds[n].append(paths[n]())
        others_share = share.others()
    finally:
        if worker is not None:
            worker.close()
        tmp.cleanup()
    peak_end = matmul_peak()
    peak = max(peak_start, peak_end)

    rate = {n: [n_tasks / s for s in seconds[n]] for n in names}
    med = {n: statistics.median(rate[n]) for n in names}
    pass_s = {n: statistics.median(seconds[n]) for n in names}
    computed = {"vmap": flops["padded"], "vmap_bucketed": flops["padded_bucketed"],
                "vmap_bucketed_bags": flops["padded_bucketed"],
                "vmap_compiled": flops["padded_bucketed"]}  # compiled: before its extra padding
    efficiency = {n: flops["useful"] / pass_s[n] / peak for n in names if n != "l2l"}
    if "l2l" in names:
        efficiency["l2l"] = flops["useful"] / pass_s["l2l"] / peak
    paired = [v / lo for v, lo in zip(rate["vmap"], rate["loop"])]
    best = max((n for n in names if n.startswith("vmap")), key=lambda n: med[n])
    result = {
        "vmap_tasks_per_s": med["vmap"],
        "vmap_bucketed_tasks_per_s": med["vmap_bucketed"],
        "vmap_bucketed_bags_tasks_per_s": med["vmap_bucketed_bags"],
        "vmap_compiled_tasks_per_s": med.get("vmap_compiled"),
        "loop_tasks_per_s": med["loop"],
        "l2l_tasks_per_s": med.get("l2l"),
        "useful_flop_efficiency": efficiency["vmap"],
        "useful_flop_efficiency_by_path": efficiency,
        "padded_gflop_per_batch": flops["padded"] / n_batches / 1e9,
        "padded_gflop_per_batch_bucketed": flops["padded_bucketed"] / n_batches / 1e9,
        "useful_gflop_per_batch": flops["useful"] / n_batches / 1e9,
        "useful_fraction": flops["useful"] / flops["padded"],
        "useful_fraction_bucketed": flops["useful"] / flops["padded_bucketed"],
        "achieved_gflops_by_path": {n: computed.get(n, flops["useful"]) / pass_s[n] / 1e9
                                    for n in names},
        "useful_gflops_by_path": {n: flops["useful"] / pass_s[n] / 1e9 for n in names},
        "matmul_peak_gflops": peak / 1e9,
        "matmul_peak_gflops_start_end": [peak_start / 1e9, peak_end / 1e9],
        "flops_counted": "torch.utils.flop_counter (matrix products: mm, bmm, addmm); "
                         "elementwise work is not counted",
        "best_metarec_path": best,
        "speedup_vmap_over_loop": med["vmap"] / med["loop"],
        "speedup_vmap_over_loop_paired_median": statistics.median(paired),
        "speedup_best_over_loop": med[best] / med["loop"],
        "speedup_bucketed_over_vmap": med["vmap_bucketed"] / med["vmap"],
        "speedup_bags_over_dense_bucketed": med["vmap_bucketed_bags"] / med["vmap_bucketed"],
        "speedup_vmap_over_l2l": med["vmap"] / med["l2l"] if "l2l" in med else None,
        "speedup_best_over_l2l": med[best] / med["l2l"] if "l2l" in med else None,
        "speedup_l2l_over_loop": med["l2l"] / med["loop"] if "l2l" in med else None,
        "compile": compile_info or None,
        "seconds_per_batch_median": {n: pass_s[n] / n_batches for n in names},
        **{  # the configuration
            "quick": args.quick, "data": source, "backbone": "melu (embedding_dim 32, "
            "hidden 64-64; fast: decision.*, output.*)", "algorithm": "MAML second order",
            "tasks_per_batch": args.tasks_per_batch, "inner_steps": steps, "inner_lr": lr,
            "batches_per_pass": n_batches, "repeats": repeats, "tasks_per_pass": n_tasks,
            "support_width_per_batch": [int(b.support["mask"].shape[1]) for b in batches],
            "support_width_per_batch_bucketed": [int(b.support["mask"].shape[1])
                                                 for b in bucketed],
            "support_sizes_mean": float(torch.cat([b.support["mask"].sum(1) for b in batches])
                                        .float().mean()),
            "query_width_per_batch": [int(b.query["mask"].shape[1]) for b in batches],
            "loop_tasks": "each task cut to its own support/query length (no padding)",
            "l2l_adapts": "head (decision + output layers) via l2l.algorithms.MAML; "
                          "embeddings computed once per task outside the clone",
            "timed": "outer-loss forward + backward (one meta-gradient) per batch",
            "threads": threads, "default_threads": default_threads,
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "l2l_torch": l2l_info.get("torch"), "learn2learn": l2l_info.get("learn2learn"),
            "l2l_threads": l2l_info.get("threads"),
            "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                          else sys.argv[1:])]),
        },
        "tasks_per_s_runs": rate,
        "gradient_checks": checks,
    }
    result["wall_seconds"] = time.perf_counter() - start
    result["other_processes_cpu_share"] = others_share

    # Table.
    print(f"\nmeta-training throughput: MeLU, {args.tasks_per_batch} tasks/batch, {steps} inner "
          f"steps, second-order MAML; {source}; {threads} threads")
    print(f"{n_batches} batches x {repeats} interleaved repeats; support widths "
          f"{result['support_width_per_batch']} (bucketed "
          f"{result['support_width_per_batch_bucketed']})")
    print(f"GFLOP per batch: padded {result['padded_gflop_per_batch']:.2f}, bucketed "
          f"{result['padded_gflop_per_batch_bucketed']:.2f}, useful "
          f"{result['useful_gflop_per_batch']:.2f}; float32 matmul peak "
          f"{result['matmul_peak_gflops']:.0f} GFLOP/s")
    print(f"{'path':<34}{'tasks/s (median)':>18}{'min':>10}{'max':>10}{'x loop':>9}"
          f"{'useful eff.':>12}")
    labels = {"vmap": "metarec vmapped MAML", "vmap_bucketed": "  + bucketed by length",
              "vmap_bucketed_bags": "  + bucketed + multi-hot bags",
              "vmap_compiled": "  + bucketed + torch.compile",
              "loop": "per-task loop (autograd.grad)",
              "l2l": f"learn2learn MAML (torch {l2l_info.get('torch')})"}
    for n in names:
        print(f"{labels[n]:<34}{med[n]:>18.1f}{min(rate[n]):>10.1f}{max(rate[n]):>10.1f}"
              f"{med[n] / med['loop']:>9.2f}{efficiency[n]:>12.3f}")
    if "l2l" in med:
        print(f"vmap / learn2learn: {result['speedup_vmap_over_l2l']:.2f}x; best metarec path "
              f"/ learn2learn: {result['speedup_best_over_l2l']:.2f}x")
    if compile_info:
        print("compile: " + json.dumps(compile_info))
    print("meta-gradient checks: " + ", ".join(
        f"{k} max|diff| {v['max_abs_diff']:.2g}" for k, v in checks.items()))
    print(f"wall time {result['wall_seconds']:.1f} s" + (
        "" if others_share is None else
        f"; other processes used {100 * others_share:.0f}% of the CPUs while timing"))
    if others_share is not None and others_share > 0.1:
        print("[warn] other processes were busy: timings are inflated and noisy (the per-task "
              "loop's most: its many tiny multi-threaded ops stall when a core is taken); "
              "rerun on an idle machine", file=sys.stderr)

    if args.json:
        write_json(Path(args.json), result, "quick" if args.quick else "full",
                   omit=("tasks_per_s_runs",))
    return result


if __name__ == "__main__":
    main()
