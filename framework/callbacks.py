"""Small callbacks that the CLI adds by default."""

from __future__ import annotations

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
