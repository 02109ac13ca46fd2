"""A small logging helper for curves and tables, so plugins never call wandb directly.

Each call goes to every logger of the trainer that can show it: W&B gets a ``wandb.Table``
(and, for curves, a line chart over it); the CSV logger gets a CSV file in its log folder (a
table is rewritten at each call; a curve is appended to, each row with the ``epoch`` and
``global_step`` it was logged at); other loggers are skipped. Only the global-zero process
writes. :func:`plot_adaptation_curves` draws the adaptation curves of the CSV log as a PNG.
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
    _log_table(trainer, key, columns, rows, append=False)


def _log_table(trainer: pl.Trainer, key: str, columns: Sequence[str],
               rows: Sequence[Sequence[Any]], append: bool) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows],
                             step=trainer.global_step)
        elif isinstance(logger, CSVLogger):
            path = csv_path(logger.log_dir, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            stamp = [trainer.current_epoch, trainer.global_step]
            if append:
                same = path.is_file() and _header(path) == ["epoch", "global_step", *columns]
                with open(path, "a" if same else "w", newline="") as handle:
                    writer = csv.writer(handle)
                    if not same:
                        writer.writerow(["epoch", "global_step", *columns])
                    writer.writerows([*stamp, *row] for row in rows)
                continue
            with open(path, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(columns)
                writer.writerows(rows)


def csv_path(log_dir: str | Path, key: str) -> Path:
    """Where the CSV logger's copy of table or curve ``key`` goes."""
    return Path(log_dir) / f"{key.replace('/', '_')}.csv"


def _header(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        return next(csv.reader(handle), [])


def log_curve(trainer: pl.Trainer, key: str, x_name: str, x: Sequence[float],
              series: dict[str, Sequence[float]]) -> None:
    """Log curves sharing one x axis (e.g. metrics against adaptation step): a table of the
    points (in the CSV log, appended to at every call, with the epoch and global step), plus a
    W&B line chart per series."""
    if not trainer.is_global_zero:
        return
    columns = [x_name, *series]
    rows = [[x[i], *(float(values[i]) for values in series.values())] for i in range(len(x))]
    _log_table(trainer, key, columns, rows, append=True)
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            table = wandb.Table(columns=columns, data=rows)
            charts = {f"{key}/{name}": wandb.plot.line(table, x_name, name, title=f"{key}: {name}")
                      for name in series}
            logger.experiment.log({**charts, "trainer/global_step": trainer.global_step})


def plot_adaptation_curves(trainer: pl.Trainer, filename: str = "adaptation_curves.png"
                           ) -> Path | None:
    """Draw the adaptation curves of the CSV log (``val_adaptation_curve.csv``: the first and
    the last validation of the run; ``test_adaptation_curve.csv``: the last test) as one PNG
    in the CSV log folder: each metric against the adaptation step. None (and nothing written)
    without a CSV logger, without curves, or without matplotlib (an optional dependency)."""
    from lightning.pytorch.loggers import CSVLogger

    if not trainer.is_global_zero:
        return None
    logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    if logger is None:
        return None
    folder = Path(logger.log_dir)
    curves: dict[str, list[dict[str, str]]] = {}
    for stage in ("val", "test"):
        path = csv_path(folder, f"{stage}/adaptation_curve")
        if path.is_file():
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle))
            if rows:
                curves[stage] = rows
    if not curves:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    first = next(iter(curves.values()))[0]
    metrics = [c for c in first if c not in ("epoch", "global_step", "step")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    for stage, rows in curves.items():
        stamps = list(dict.fromkeys((r.get("epoch", ""), r.get("global_step", "")) for r in rows))
        shown = [stamps[-1]] if stage == "test" or len(stamps) == 1 else [stamps[0], stamps[-1]]
        for n, stamp in enumerate(shown):
            part = [r for r in rows if (r.get("epoch", ""), r.get("global_step", "")) == stamp]
            label = f"{stage}, epoch {stamp[0]}" if stamp[0] != "" else stage
            style = {"linestyle": "--", "alpha": 0.6} if n == 0 and len(shown) > 1 else {}
            for ax, metric in zip(axes[0], metrics):
                ax.plot([int(float(r["step"])) for r in part], [float(r[metric]) for r in part],
                        marker="o", label=label, **style)
    from matplotlib.ticker import MaxNLocator

    for ax, metric in zip(axes[0], metrics):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("adaptation step (0: meta-learned start)")
        ax.set_title(f"query {metric}")
    axes[0][0].legend()
    fig.tight_layout()
    out = folder / filename
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
