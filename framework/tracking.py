"""A small logging helper for curves and tables, so plugins never call wandb directly.

Each call goes to every logger of the trainer that can show it: W&B gets a ``wandb.Table``
(and, for curves, a line chart over it); the CSV logger gets a CSV file in its log folder;
other loggers are skipped. Only the global-zero process writes.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: `import metarec` does not load Lightning
    import lightning.pytorch as pl


def log_table(trainer: pl.Trainer, key: str, columns: Sequence[str],
              rows: Sequence[Sequence[Any]]) -> None:
    """Log a table (e.g. per-user test results) to W&B and as ``{csv log dir}/{key}.csv``."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows],
                             step=trainer.global_step)
        elif isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / f"{key.replace('/', '_')}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(columns)
                writer.writerows(rows)


def log_curve(trainer: pl.Trainer, key: str, x_name: str, x: Sequence[float],
              series: dict[str, Sequence[float]]) -> None:
    """Log curves sharing one x axis (e.g. metrics against adaptation step): a table of the
    points, plus a W&B line chart per series."""
    if not trainer.is_global_zero:
        return
    columns = [x_name, *series]
    rows = [[x[i], *(float(values[i]) for values in series.values())] for i in range(len(x))]
    log_table(trainer, key, columns, rows)
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            table = wandb.Table(columns=columns, data=rows)
            charts = {f"{key}/{name}": wandb.plot.line(table, x_name, name, title=f"{key}: {name}")
                      for name in series}
            logger.experiment.log({**charts, "trainer/global_step": trainer.global_step})
