"""DDP scaling: meta-training tasks/s with 1 and N ranks side by side, the same global batch.

For each algorithm (maml, fomaml, reptile; ``--quick``: maml only) and each device count
(``--devices 1,2``), ``python -m metarec fit`` runs the recipe (default
``recipes/movielens-100k/melu-maml.yaml`` when MovieLens-100K is found, else
``recipes/quickstart.yaml``, synthetic) with ``--trainer.accelerator cpu --trainer.devices N``
(``--trainer.strategy ddp`` when N > 1; Lightning launches the other ranks as subprocesses,
gloo on CPU, as tests/test_ddp.py does).

- Same global task batch: per-rank ``data.batch_size`` = global / N (2 ranks at 16 = 1 rank at
  32); ``data.shuffle false``, so the global batches are the same tasks in every configuration
  (rank r takes tasks r, r + N, ...) and the final losses must agree (a sanity check).
- Same cores: torch threads per rank = ``--cores`` // N (``OMP_NUM_THREADS`` /
  ``MKL_NUM_THREADS``; each rank's ``torch.get_num_threads()`` is recorded), so on 2 cores it
  is 1 rank x 2 threads against 2 ranks x 1 thread. On CPU a reference row of 1 rank x 1
  thread is added (``--no-single-thread-row``: not): it tells whether the second core helps
  more as a thread or as a rank. Speedups are relative to the first row (1 rank, all cores).
- Timed: whole training steps (data loading, forward, backward, DDP all-reduce, optimiser step)
  from ``on_train_batch_start`` of step ``--warmup`` (after a barrier) to ``on_train_batch_end``
  of the last step (after a barrier), read on rank 0. Tasks counted are the tasks the ranks
  actually processed (all-reduced), so partial end-of-epoch batches count as what they are.
- No logging, checkpointing, progress bar, validation (``--trainer.logger false``,
  ``--trainer.enable_checkpointing false``, ``--trainer.limit_val_batches 0``,
  ``WANDB_MODE=disabled``). The recipe's optimiser is kept for every algorithm.
- ``--repeats`` runs of each configuration, interleaved (1, N, ..., then reversed); the median
  is reported.

Sanity: each row's final train loss (mean of the last 10 steps, over ranks) and how many
leading steps' losses equal the first row's to 1e-5 ("same loss"). With SGD they all do; with
Adam they drift after some steps (rounding differences in near-zero gradient coordinates
become full-size Adam steps), see docs/results.md.

GPU machines: ``--accelerator gpu --devices 1,2,4,8`` (the global batch must divide by each).
Arguments after ``--`` go to every ``metarec fit`` (``-- --model.optimizer ...``).

    .venv/bin/python benchmarks/ddp_scaling.py --quick
    .venv/bin/python benchmarks/ddp_scaling.py              # writes benchmarks/results/ddp_scaling.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from _results import write_json  # benchmarks/_results.py (scripts run from here)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_JSON = HERE / "results" / "ddp_scaling.json"
ML100K_RECIPE = REPO / "recipes" / "movielens-100k" / "melu-maml.yaml"
QUICK_RECIPE = REPO / "recipes" / "quickstart.yaml"


class StepTimer(pl.Callback):
    """Times training steps ``warmup + 1 ..`` to the end; every rank writes ``rank{r}.json``."""

    def __init__(self, out: str, warmup: int = 3) -> None:
        self.out, self.warmup = Path(out), warmup
        self.t0: float | None = None
        self.t1: float | None = None
        self.tasks = 0
        self.losses: list[float] = []  # timed steps
        self.all_losses: list[float] = []  # every step, this rank's

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.t0 is None and trainer.global_step == self.warmup:
            trainer.strategy.barrier()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        self.all_losses.append(loss)
        if self.t0 is None:
            return
        self.tasks += len(batch)
        self.losses.append(loss)
        if trainer.global_step >= trainer.max_steps:
            trainer.strategy.barrier()
            self.t1 = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(f"StepTimer: timing incomplete (warmup {self.warmup}, "
                               f"global_step {trainer.global_step}, max_steps {trainer.max_steps})")
        reduce = trainer.strategy.reduce
        device = pl_module.device
        tasks = reduce(torch.tensor(float(self.tasks), device=device), reduce_op="sum")
        last = self.losses[-min(10, len(self.losses)):]
        # each rank's loss is the mean over its tasks; the global batch's is the ranks' mean
        final = reduce(torch.tensor(statistics.fmean(last), device=device), reduce_op="mean")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "rank": trainer.global_rank, "world_size": trainer.world_size,
            "threads": torch.get_num_threads(), "seconds": self.t1 - self.t0,
            "steps": len(self.losses), "tasks": float(tasks),
            "final_train_loss": float(final), "last_step_loss": self.losses[-1],
            "step_losses": self.all_losses,
        }))


class CpuShare:
    """Share of all CPU capacity used by processes other than our runs (Linux; else None)."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            cpu = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except (OSError, ValueError):
            return None
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return sum(cpu[:8]), sum(cpu[:8]) - cpu[3] - cpu[4], \
            (usage.ru_utime + usage.ru_stime) * self.tick

    def others(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        total, busy, ours = (e - s for e, s in zip(end, self.start))
        return max(0.0, (busy - ours) / total)


def run_one(recipe: Path, algorithm: str, devices: int, threads: int,
            args: argparse.Namespace, workdir: Path) -> dict:
    out = workdir / f"{algorithm}-{devices}x{threads}-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "metarec", "fit", "--config", str(recipe),
           "--trainer.accelerator", args.accelerator, "--trainer.devices", str(devices),
           "--trainer.max_steps", str(args.warmup + args.steps), "--trainer.max_epochs", "-1",
           "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
           "--data.shuffle", "false", "--data.batch_size", str(args.global_batch // devices),
           "--model.algorithm", algorithm,
           "--trainer.callbacks", f"[{{class_path: ddp_scaling.StepTimer, init_args: "
                                  f"{{out: '{out}', warmup: {args.warmup}}}}}]"]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    cmd += list(getattr(args, "overrides", []))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{algorithm} on {devices} device(s) failed ({proc.returncode}):\n"
                           + proc.stderr[-4000:])
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]
    r0 = ranks[0]
    return {"seconds": r0["seconds"], "steps": r0["steps"], "tasks": r0["tasks"],
            "tasks_per_s": r0["tasks"] / r0["seconds"], "s_per_step": r0["seconds"] / r0["steps"],
            "final_train_loss": r0["final_train_loss"],
            # the global batch's loss per step (the ranks' means; equal shards but at an
            # epoch's uneven last batch, where this is approximate)
            "step_losses": [statistics.fmean(x) for x in zip(*(r["step_losses"] for r in ranks))],
            "threads_per_rank": [r["threads"] for r in ranks], "process_wall_s": wall}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps, maml only")
    ap.add_argument("--recipe", default=None, help="default: ml-100k melu-maml, else quickstart")
    ap.add_argument("--algorithms", default=None,
                    help="comma-separated (default maml,fomaml,reptile; quick: maml)")
    ap.add_argument("--accelerator", default="cpu", help="cpu (gloo) or gpu (nccl)")
    ap.add_argument("--devices", default="1,2", help="comma-separated rank counts to compare")
    ap.add_argument("--cores", type=int, default=None,
                    help="CPU cores shared by the ranks: threads per rank = cores // ranks "
                         "(default: os.cpu_count())")
    ap.add_argument("--no-single-thread-row", dest="single_thread_row", action="store_false",
                    help="CPU: skip the reference row of 1 rank x 1 thread (shows whether "
                         "threads or ranks use the cores better)")
    ap.add_argument("--global-batch", type=int, default=32, help="tasks per global step")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2 / 5)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 / 100)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per config (default 1 / 2)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per fit process")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    ap.add_argument("overrides", nargs="*",
                    help="more `metarec fit` arguments, after --: -- --model.optimizer ...")
    args = ap.parse_args(argv)
    args.cores = args.cores or os.cpu_count() or 1
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.steps = args.steps or (10 if args.quick else 100)
    args.repeats = args.repeats or (1 if args.quick else 2)
    algorithms = (args.algorithms or ("maml" if args.quick else "maml,fomaml,reptile")).split(",")
    devices = [int(d) for d in args.devices.split(",")]
    if any(args.global_batch % d for d in devices):
        ap.error(f"--global-batch {args.global_batch} must divide by every --devices {devices}")

    data_root = REPO.parent / "shared" / "data"
    if "METAREC_DATA" not in os.environ and (data_root / "ml-100k" / "u.data").is_file():
        os.environ["METAREC_DATA"] = str(data_root)
    if args.recipe:
        recipe = Path(args.recipe)
    elif (Path(os.environ.get("METAREC_DATA", "/nonexistent")) / "ml-100k" / "u.data").is_file():
        recipe = ML100K_RECIPE
    else:
        recipe = QUICK_RECIPE

    start = time.perf_counter()
    share = CpuShare()
    # (ranks, torch threads per rank): the cores split between the ranks
    configs = [(d, max(1, args.cores // d)) for d in devices]
    if args.accelerator == "cpu" and args.single_thread_row and (1, 1) not in configs:
        configs.append((1, 1))
    runs: dict[str, dict[tuple, list[dict]]] = {a: {c: [] for c in configs} for a in algorithms}
    with tempfile.TemporaryDirectory(prefix="metarec-ddp-") as tmp:
        for algorithm in algorithms:
            for r in range(args.repeats):
                for c in (configs if r % 2 == 0 else configs[::-1]):
                    res = run_one(recipe, algorithm, *c, args, Path(tmp))
                    runs[algorithm][c].append(res)
                    print(f"  {algorithm} {c[0]} rank(s) x {c[1]} thread(s): "
                          f"{res['tasks_per_s']:.1f} tasks/s, loss {res['final_train_loss']:.4f}",
                          file=sys.stderr)
    others = share.others()

    rows = []
    for algorithm in algorithms:
        base, base_runs = None, None
        for d, threads in configs:
            rs = runs[algorithm][(d, threads)]
            row = {"algorithm": algorithm, "ranks": d,
                   "per_rank_batch": args.global_batch // d, "threads_per_rank": threads,
                   "tasks_per_s": statistics.median(x["tasks_per_s"] for x in rs),
                   "s_per_step": statistics.median(x["s_per_step"] for x in rs),
                   "final_train_loss": rs[0]["final_train_loss"],
                   "tasks_per_s_runs": [x["tasks_per_s"] for x in rs],
                   "threads_per_rank_seen": rs[0]["threads_per_rank"],
                   "process_wall_s": [x["process_wall_s"] for x in rs]}
            if any(t != threads for t in row["threads_per_rank_seen"]):
                print(f"[warn] {algorithm} {d} rank(s): torch used "
                      f"{row['threads_per_rank_seen']} threads, not {threads}", file=sys.stderr)
            if base is None:
                base, base_runs = row, rs
            row["speedup"] = row["tasks_per_s"] / base["tasks_per_s"]
            row["loss_rel_diff_vs_1"] = (abs(row["final_train_loss"] - base["final_train_loss"])
                                         / abs(base["final_train_loss"]))
            # leading steps whose loss equals the first row's to 1e-5 (relative): with SGD every
            # step matches; Adam amplifies rounding differences after a few steps
            match = 0
            for x, y in zip(rs[0]["step_losses"], base_runs[0]["step_losses"]):
                if abs(x - y) > 1e-5 * abs(y):
                    break
                match += 1
            row["leading_steps_loss_match"] = match
            row["steps_total"] = len(rs[0]["step_losses"])
            rows.append(row)

    result = {
        "rows": rows, "quick": args.quick, "recipe": str(recipe.relative_to(REPO)),
        "algorithms": algorithms, "accelerator": args.accelerator, "devices": devices,
        "configs_ranks_x_threads": configs,
        "cores": args.cores, "global_batch": args.global_batch, "warmup_steps": args.warmup,
        "timed_steps": args.steps, "repeats": args.repeats, "overrides": args.overrides,
        "timed": "whole training steps after warm-up (data, forward, backward, all-reduce, "
                 "optimiser), rank 0 after a barrier; tasks/s = tasks processed by all ranks / s",
        "final_train_loss": "mean of the last 10 timed steps' losses, averaged over ranks",
        "other_processes_cpu_share": others, "wall_seconds": time.perf_counter() - start,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "lightning": pl.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                      else sys.argv[1:])]),
    }

    print(f"\nDDP scaling: {result['recipe']}, global batch {args.global_batch} tasks, "
          f"{args.accelerator}, {args.cores} cores; {args.steps} timed steps after "
          f"{args.warmup} warm-up, median of {args.repeats}")
    print(f"{'algorithm':<10}{'ranks x threads':>16}{'batch/rank':>11}{'tasks/s':>10}"
          f"{'s/step':>9}{'speedup':>9}{'final loss':>12}{'same loss':>11}")
    for row in rows:
        print(f"{row['algorithm']:<10}{str(row['ranks']) + ' x ' + str(row['threads_per_rank']):>16}"
              f"{row['per_rank_batch']:>11}{row['tasks_per_s']:>10.1f}{row['s_per_step']:>9.3f}"
              f"{row['speedup']:>9.2f}{row['final_train_loss']:>12.4f}"
              f"{str(row['leading_steps_loss_match']) + '/' + str(row['steps_total']):>11}")
    print("same loss: leading steps whose loss equals the first row's to 1e-5 (relative)")
    print(f"wall time {result['wall_seconds']:.0f} s" + (
        "" if others is None else f"; other processes used {100 * others:.0f}% of the CPUs"))
    if args.json:
        write_json(Path(args.json), result, "quick" if args.quick else "full")
    return result



def markdown(result: dict) -> str:
    """The table of docs/results.md from the JSON, the multi-rank speedups in bold
    (benchmarks/docs_tables.py renders it)."""
    base = result["configs_ranks_x_threads"][0]
    lines = [f"| algorithm | ranks x threads | tasks/rank/step | tasks/s | s/step | vs {base[0]} x {base[1]} "
             f"| final train loss | steps with the {base[0]} x {base[1]} loss |", "|---" * 8 + "|"]
    for r in result["rows"]:
        speedup = f"{r['speedup']:.2f}"
        lines.append(f"| {r['algorithm']} | {r['ranks']} x {r['threads_per_rank']} | {r['per_rank_batch']} "
                     f"| {r['tasks_per_s']:.1f} | {r['s_per_step']:.3f} "
                     f"| {f'**{speedup}**' if r['ranks'] > 1 else speedup} | {r['final_train_loss']:.4f} "
                     f"| {r['leading_steps_loss_match']}/{r['steps_total']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
