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
