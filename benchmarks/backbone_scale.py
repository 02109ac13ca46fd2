"""Transformer backbone at three sizes up to the 100M+ scale recipe: parameters, fast
parameters, peak memory and seconds per meta-training step, on CPU.

Every configuration is ``recipes/scale/transformer-large.yaml`` (MAML, 2 inner steps, 32
tasks per meta-batch, histories of 20, synthetic data) with the size overrides below; the
largest is the recipe itself (1M items, width 256, 4 layers: ~259M parameters). Each runs in
its own process, so that its peak resident memory (``ru_maxrss``: data, model, optimiser
state, activations) is its own. A meta-step is what Lightning's automatic optimisation runs:
``MetaLearner.training_step`` (the vmapped inner loop and the outer loss), ``backward``, the
optimiser step and ``zero_grad``; timed with ``time.perf_counter`` after ``--warmup`` steps,
median over ``--steps`` steps, with the forward / backward / optimiser split.

Rows ``large-dense`` vs ``large``: the same model with the item table's gradient dense and
``torch.optim.Adam``, against the recipe's sparse gradient and ``metarec.optim.LazyAdam``.
Sizes run one after the other (each needs its own process for its peak memory): compare rows
of one run of this script, on an otherwise idle machine.

The recipe uses ``attention: causal`` (SASRec-style: each task's support events encoded once
as one causal sequence, every slot reading its state). ``--target`` adds, beside each size, a
row ``<size>-target``: the same model with BST-style target attention (every slot's history
encoded on its own, the candidate attending to it), the recipe's layout before issue 14.

    .venv/bin/python benchmarks/backbone_scale.py --quick     # 1 measured step each
    .venv/bin/python benchmarks/backbone_scale.py             # 3 measured steps each
    .venv/bin/python benchmarks/backbone_scale.py --quick --sizes small --target \
        --json /tmp/scale.json                                # causal vs target attention
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
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECIPE = REPO / "recipes" / "scale" / "transformer-large.yaml"
DEFAULT_JSON = HERE / "results" / "backbone_scale.json"
QUIET = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.callbacks", "[]"]

DENSE = ["--model.backbone_args.sparse_item_gradients", "false",
         "--model.optimizer.class_path", "torch.optim.Adam"]
SIZES: dict[str, list[str]] = {
    "small": ["--data.dataset_args.num_items", "100000", "--model.backbone_args.dim", "64",
              "--model.backbone_args.layers", "2", "--model.backbone_args.heads", "2",
              "--model.backbone_args.ffn", "256", "--model.backbone_args.scorer_hidden", "[64]"],
    "medium": ["--data.dataset_args.num_items", "300000", "--model.backbone_args.dim", "128",
               "--model.backbone_args.layers", "4", "--model.backbone_args.heads", "4",
               "--model.backbone_args.ffn", "512", "--model.backbone_args.scorer_hidden", "[128]"],
    "large": [],
    "large-dense": DENSE,
}
TARGET = ["--model.backbone_args.attention", "target"]


def overrides_of(size: str) -> list[str]:
    """A size's overrides; ``<size>-target``: with target attention instead of the recipe's
    causal attention."""
    if size.endswith("-target") and size[:-len("-target")] in SIZES:
        return SIZES[size[:-len("-target")]] + TARGET
    return SIZES[size]


def measure(overrides: list[str], steps: int, warmup: int) -> dict:
    """One configuration, in this process: counts, step times, peak memory."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    from metarec.callbacks import parameter_counts
    from metarec.cli import MetarecCLI

    start = time.perf_counter()
    cli = MetarecCLI(args=["--config", str(RECIPE), *QUIET, *overrides], run=False)
    datamodule, model = cli.datamodule, cli.model
    datamodule.setup("fit")
    # No trainer here: give the data module the history layout the backbone asks for.
    datamodule.shared_history = bool(getattr(model.backbone, "shared_history", False))
    setup_s = time.perf_counter() - start
    optimizer = model.configure_optimizers()
    batches = iter(datamodule.train_dataloader())
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}
    for i in range(warmup + steps):
        batch = next(batches)
        t0 = time.perf_counter()
        loss = model.training_step(batch, i)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= warmup:
            for key, value in (("forward", t1 - t0), ("backward", t2 - t1),
                               ("optimizer", t3 - t2), ("step", t3 - t0)):
                times[key].append(value)
    counts = parameter_counts(model)
    return {**{k: counts[k] for k in ("backbone", "fast", "fast_fraction")},
            "tasks_per_step": len(batch), "setup_s": setup_s,
            **{f"{k}_s": statistics.median(v) for k, v in times.items()},
            "step_s_all": times["step"], "final_loss": float(loss),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def markdown(result: dict) -> str:
    """The table of docs/results.md (benchmarks/docs_tables.py renders it from the JSON)."""
    lines = ["| size | backbone params | fast params | fast % | peak RSS (GB) | s / meta-step "
             "| forward | backward | optimiser |", "|---" * 9 + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['size']} | {r['backbone']:,} | {r['fast']:,} | {100 * r['fast_fraction']:.3f} "
                     f"| {r['peak_rss_gb']:.2f} | {r['step_s']:.2f} | {r['forward_s']:.2f} "
                     f"| {r['backward_s']:.2f} | {r['optimizer_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 measured step per size")
    parser.add_argument("--steps", type=int, default=3, help="measured meta-steps per size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset")
    parser.add_argument("--target", action="store_true",
                        help="also run each size with attention: target (rows <size>-target)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = 1 if args.quick else args.steps
    if args.worker is not None:  # child process: one size, result as JSON on the last line
        print(json.dumps(measure(overrides_of(args.worker), steps, args.warmup)))
        return
    rows = []
    sizes = args.sizes.split(",")
    if args.target:
        sizes = [s for size in sizes for s in (size, f"{size}-target")]
    for size in sizes:
        if size not in SIZES and not (size.endswith("-target")
                                      and size[:-len("-target")] in SIZES):
            parser.error(f"unknown size {size!r}; sizes are {list(SIZES)}")
        out = subprocess.run([sys.executable, __file__, "--worker", size, "--steps", str(steps),
                              "--warmup", str(args.warmup)] + (["--quick"] if args.quick else []),
                             capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            raise SystemExit(f"size {size!r} failed:\n{out.stderr[-4000:]}")
        rows.append({"size": size, "overrides": overrides_of(size),
                     **json.loads(out.stdout.strip().splitlines()[-1])})
        r = rows[-1]
        print(f"{size}: {r['backbone'] / 1e6:.1f}M params, {r['step_s']:.2f} s/step, "
              f"{r['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
    result = {"benchmark": "backbone_scale", "recipe": str(RECIPE.relative_to(REPO)),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version()},
              "steps": steps, "warmup": args.warmup, "quick": args.quick, "rows": rows}
    print(markdown(result))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
