"""Seconds per training epoch of RecBole-MetaRec-style FOMeLU on MovieLens-100K (issue 14).

The configuration RecBole-MetaRec's MeLU runs with: first-order MAML, **one** local step, the
MeLU backbone (embedding 32 per feature, decision layers 64-64, one output), batches of 32
users, users with 13-100 ratings, query 10 (``recipes/movielens-100k/melu-fomaml.yaml`` with
``inner_steps: 1``). Variants, side by side in one process: the default layout; multi-hot
genres as bags of ids (``data.multihot_bags``); length-bucketed batches
(``data.bucket_by_length``: less padding); both. Training time only (validation off); the
first epoch (warm-up: allocator, first-touch) is reported apart; the median of the others is
the figure.

    python benchmarks/fomelu_epoch.py                 # 4 epochs per variant
    python benchmarks/fomelu_epoch.py --quick --json /tmp/fomelu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _results import write_json  # noqa: E402
from cold_start import QUIET, _quiet, prepare_run  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "fomelu_epoch.json"
RECIPE = REPO / "recipes" / "movielens-100k" / "melu-fomaml.yaml"
FOMELU = ["--model.algorithm_args", "{inner_steps: 1, inner_lr: 0.05}",
          "--model.backbone_args", "{embedding_dim: 32, hidden: [64, 64]}",
          "--data.batch_size", "32", "--trainer.limit_val_batches", "0",
          "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "false"]
VARIANTS = {"default": [], "multihot bags": ["--data.multihot_bags", "true"],
            "length buckets": ["--data.bucket_by_length", "true"],
            "bags + buckets": ["--data.multihot_bags", "true", "--data.bucket_by_length", "true"]}


def time_variant(extra: list[str], epochs: int, root: str) -> dict:
    """Fit ``epochs`` epochs; per-epoch training seconds and the work done."""
    with _quiet():
        cli, timer = prepare_run(str(RECIPE), [*QUIET, *FOMELU, *extra,
                                               "--trainer.max_epochs", str(epochs)], root)
        trainer = cli.trainer
        trainer.fit(cli.model, datamodule=cli.datamodule)
    splits = cli.datamodule.splits
    rest = timer.seconds[1:] or timer.seconds
    return {"sec_per_epoch": round(statistics.median(rest), 4),
            "first_epoch_sec": round(timer.seconds[0], 4),
            "epochs_timed": len(rest), "train_users": len(splits.train),
            "steps_per_epoch": trainer.num_training_batches,
            "input_width": 32 * len(cli.datamodule.schema.features)}


def markdown(result: dict) -> str:
    rows = result["variants"]
    base = rows["default"]["sec_per_epoch"]
    lines = [f"FOMeLU (1 first-order step, embedding 32, MLP 64-64-1, batch 32), ml-100k, "
             f"{rows['default']['train_users']} training users, "
             f"{rows['default']['steps_per_epoch']} steps per epoch; {result['machine']}, "
             f"{result['torch_threads']} torch threads; median of {rows['default']['epochs_timed']}"
             " epochs after the first.", "",
             "| variant | s/epoch | first epoch (s) | vs default |", "|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['sec_per_epoch']:.3f} | {row['first_epoch_sec']:.3f} | "
                     f"{base / row['sec_per_epoch']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 epochs per variant")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per variant (default 4)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    import tempfile

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = args.epochs or (2 if args.quick else 4)
    variants = {}
    for name, extra in VARIANTS.items():
        with tempfile.TemporaryDirectory(prefix="metarec-fomelu-") as root:
            start = time.perf_counter()
            variants[name] = time_variant(extra, epochs, root)
        print(f"{name}: {variants[name]['sec_per_epoch']:.3f} s/epoch "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    result = {"benchmark": "fomelu_epoch", "command": "python benchmarks/fomelu_epoch.py "
              + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "load_average_1m": round(os.getloadavg()[0], 2), "variants": variants}
    print(markdown(result))
    write_json(Path(args.json), result, "quick" if args.quick else "full")
    return 0


if __name__ == "__main__":
    sys.exit(main())
