"""Small callbacks that the CLI adds by default."""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
from rich.console import Console
from rich.table import Table


class MetricsSummary(pl.Callback):
    """Prints the last validation metrics (after adaptation, and at step 0) when fit ends."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        names = sorted({k.split("/")[-1] for k in metrics if k.startswith("val/")})
        if not names:
            return
        last = pl_module.policy.max_steps if hasattr(pl_module, "policy") else None
        table = Table(title="validation (new users): before and after adaptation")
        table.add_column("metric")
        table.add_column("step 0 (meta-learned start)", justify="right")
        table.add_column(f"after adaptation (step {last})", justify="right")
        for name in names:
            before = metrics.get(f"val/step0/{name}")
            after = metrics.get(f"val/{name}")
            if after is None:
                continue
            table.add_row(name, f"{float(before):.4f}" if before is not None else "",
                          f"{float(after):.4f}")
        Console().print(table)
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if getattr(checkpoint, "monitor", None) \
            else ""
        if best:  # what `metarec test --ckpt_path` should be given
            score = checkpoint.best_model_score
            print(f"best checkpoint ({checkpoint.monitor} = "
                  f"{float(score):.4f}): {best}" if score is not None else f"best checkpoint: {best}",
                  flush=True)


def parameter_counts(pl_module: pl.LightningModule) -> dict[str, float]:
    """Total, trainable and fast (adapted per task) parameter counts of a MetaLearner."""
    total = sum(p.numel() for p in pl_module.parameters())
    trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
    counts: dict[str, float] = {"total": total, "trainable": trainable}
    functional = getattr(pl_module, "functional", None)
    if functional is not None:
        fast = sum(p.numel() for p in functional.split()[0].values())
        backbone = sum(p.numel() for p in functional.backbone.parameters())
        counts.update(backbone=backbone, fast=fast, fast_fraction=fast / max(backbone, 1))
    return counts


class ParameterCount(pl.Callback):
    """Logs the parameter counts when fit starts: total, trainable, backbone, fast (what the
    inner loop adapts per task) and the fast fraction of the backbone, as every logger's
    ``parameters`` hyperparameters and as one console line. Fast adaptation of a large model
    only pays when the fast part is small; this makes the split visible in every run."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = parameter_counts(pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams({"parameters": counts})
        if trainer.is_global_zero and "fast" in counts:
            print(f"metarec parameters: backbone {counts['backbone']:,}, fast {counts['fast']:,} "
                  f"({100 * counts['fast_fraction']:.3f}% of the backbone), total {counts['total']:,}",
                  flush=True)


class InterruptCheckpoint(pl.Callback):
    """Saves a checkpoint when fit stops on an exception (Ctrl-C included), and says how to
    resume from it.

    Unlike Lightning's ``OnExceptionCheckpoint``, its presence does not make every later
    ``fit`` without ``--ckpt_path`` resume silently from the newest ``last``/exception
    checkpoint it finds (Lightning does that for any ``OnExceptionCheckpoint``): a new run
    starts from scratch unless ``--ckpt_path`` says otherwise.

    Args:
        dirpath: folder of the checkpoint (created when needed).
        filename: its name, without the ``.ckpt`` extension.
    """

    def __init__(self, dirpath: str = "runs/interrupted", filename: str = "on_exception") -> None:
        if not filename:
            raise ValueError("InterruptCheckpoint: filename cannot be empty")
        self.dirpath, self.filename = dirpath, filename

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.dirpath, f"{self.filename}.ckpt")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if trainer.state.fn != "fit" or (trainer.global_step == 0 and trainer.current_epoch == 0):
            return  # nothing trained yet: nothing worth keeping
        trainer.save_checkpoint(self.ckpt_path)
        if trainer.is_global_zero:
            print(f"\nmetarec: {type(exception).__name__} at step {trainer.global_step}; "
                  f"checkpoint saved to {self.ckpt_path}. Resume with the same recipe and "
                  f"overrides plus --ckpt_path {self.ckpt_path}", file=sys.stderr, flush=True)
