"""Small callbacks that the CLI adds by default."""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from rich.console import Console
from rich.table import Table

from metarec.tracking import plot_adaptation_curves

_STAGE_TITLES = {"val": "validation (new users)", "test": "test (new users)"}


def summary_rows(metrics: dict[str, Any], stage: str) -> list[tuple[str, str, float | None, float]]:
    """``(cap, metric, step 0, after adaptation)`` rows of the logged ``{stage}/...`` metrics;
    ``cap`` is ``""`` for the plain evaluation, ``"k5"`` for a ``data.eval_support`` cap."""
    pattern = re.compile(rf"^{stage}/(?:(k[^/]+)/)?([^/]+)$")
    rows = []
    for key in sorted(metrics):
        found = pattern.match(key)
        if not found or found.group(2).startswith("step"):
            continue
        cap, name = found.group(1) or "", found.group(2)
        prefix = f"{stage}/{cap}/" if cap else f"{stage}/"
        before = metrics.get(f"{prefix}step0/{name}")
        rows.append((cap, name, None if before is None else float(before),
                     float(metrics[key])))
    return rows


def print_summary(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
    """The before/after-adaptation table of ``stage`` (``val`` or ``test``)."""
    rows = summary_rows(trainer.callback_metrics, stage)
    if not rows:
        return
    last = pl_module.policy.max_steps if hasattr(pl_module, "policy") else None
    table = Table(title=f"{_STAGE_TITLES.get(stage, stage)}: before and after adaptation")
    caps = any(cap for cap, *_ in rows)
    if caps:
        table.add_column("support")
    table.add_column("metric")
    table.add_column("step 0 (meta-learned start)", justify="right")
    table.add_column(f"after adaptation (step {last})", justify="right")
    for cap, name, before, after in rows:
        cells = [f"{before:.4f}" if before is not None else "", f"{after:.4f}"]
        table.add_row(*([cap[1:] if cap else "all"] if caps else []), name, *cells)
    Console().print(table)


class MetricsSummary(pl.Callback):
    """Prints the before/after-adaptation table (step 0 and after adaptation, per metric)
    when fit ends (validation users), after ``metarec test`` (test users) and ``metarec
    validate``, and the best checkpoint's path after fit; and draws the adaptation curves
    (``adaptation_curves.png`` in the CSV log folder: query loss and nDCG against the
    adaptation step, for the first and last validation of the fit, and the test) when
    matplotlib is installed."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        print_summary(trainer, pl_module, "val")
        plot_adaptation_curves(trainer)
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if getattr(checkpoint, "monitor", None) \
            else ""
        if best:  # what `metarec test --ckpt_path` should be given
            score = checkpoint.best_model_score
            print(f"best checkpoint ({checkpoint.monitor} = "
                  f"{float(score):.4f}): {best}" if score is not None else f"best checkpoint: {best}",
                  flush=True)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            print_summary(trainer, pl_module, "test")
            plot_adaptation_curves(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and trainer.state.fn == "validate":
            print_summary(trainer, pl_module, "val")


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
        if trainer.world_size > 1 and not isinstance(exception, KeyboardInterrupt):
            # A rank failed: a checkpoint needs every rank (the RNG states of each are gathered
            # into it) and the failed one is gone, so none can be written.
            last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
            print(f"\nmetarec: rank {trainer.global_rank}: {type(exception).__name__} at step "
                  f"{trainer.global_step} under DDP; no interrupt checkpoint was saved (one "
                  "needs every rank). " + (f"The last saved checkpoint is {last}." if last else
                                           "No checkpoint of this run was saved yet."),
                  file=sys.stderr, flush=True)
            return
        try:
            trainer.save_checkpoint(self.ckpt_path)
        except Exception as err:  # noqa: BLE001 - say so, and let the original error surface
            print(f"\nmetarec: {type(exception).__name__} at step {trainer.global_step}; the "
                  f"interrupt checkpoint could not be saved ({type(err).__name__}: {err}): "
                  "nothing was saved", file=sys.stderr, flush=True)
            return
        if trainer.is_global_zero:
            print(f"\nmetarec: {type(exception).__name__} at step {trainer.global_step}; "
                  f"checkpoint saved to {self.ckpt_path}. Resume with the same recipe and "
                  f"overrides plus --ckpt_path {self.ckpt_path}", file=sys.stderr, flush=True)


class PredictionWriter(BasePredictionWriter):
    """``metarec predict``: each test user's top-``k`` items after adaptation, one JSON object
    per line (``{"user": id, "items": [ids], "scores": [floats]}``, raw ids, best first; with
    ``data.eval_support``, one line per user and support cap, with ``"k"``), the format of
    ``metarec adapt``. The user is adapted on its support set by :class:`metarec.Adapter`,
    the deployment path (the model's policy, from the meta-learned start), and the items it
    has interacted with are left out unless ``include_seen``. With tasks per item
    (``task_by: item``) each test item gets its top users instead (``{"item": id, "users":
    [ids], "scores": [floats]}``). Under DDP each rank writes ``<path>.rank<r>``.

    Args:
        path: the JSON Lines file.
        k: recommendations per user.
        include_seen: also recommend the items of the user's support set.
    """

    def __init__(self, path: str = "runs/predictions.jsonl", k: int = 10,
                 include_seen: bool = False) -> None:
        super().__init__(write_interval="batch")
        if k < 1:
            raise ValueError(f"PredictionWriter: k must be >= 1, got {k}")
        self.path, self.k, self.include_seen = str(path), int(k), bool(include_seen)
        self._adapter: Any = None
        self._file: Any = None
        self.written = 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch

        from metarec.adapter import Adapter

        table = trainer.datamodule.table
        features = lambda fs: {f.spec.key: torch.from_numpy(f.values) for f in fs}  # noqa: E731
        keys = lambda k: None if k is None else k.tolist()  # noqa: E731
        self._adapter = Adapter(pl_module, item_features=features(table.item_features),
                                user_features=features(table.user_features),
                                user_keys=keys(table.user_keys), item_keys=keys(table.item_keys),
                                history_length=getattr(trainer.datamodule, "history_length",
                                                       None))
        path = self.path if trainer.world_size == 1 else f"{self.path}.rank{trainer.global_rank}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "w")
        self._path, self.written = path, 0

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           prediction: Any, batch_indices: Any, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        import torch

        variants = batch.items() if isinstance(batch, dict) else [(None, batch)]
        adapter = self._adapter
        # Tasks per user rank items; tasks per item (task_by: item) rank users.
        side, other = adapter.task_by, adapter.other
        with torch.enable_grad():
            for label, tasks in variants:
                support = tasks.support
                entities = tasks.users.tolist()  # the task entities: users or items
                events = []
                for t in range(len(entities)):
                    m = support["mask"][t].bool()
                    ids, labels = support[f"{other}_id"][t][m], support["label"][t][m].float()
                    times = support["time"][t][m] if "time" in support else None
                    if times is not None:  # oldest first, as the adapter replays events
                        order = torch.argsort(times, stable=True)
                        ids, labels, times = ids[order], labels[order], times[order]
                    events.append((ids, labels, times))
                sessions = adapter._adapt(entities, events, None, None)
                for entity, session in zip(entities, sessions):
                    rec = session.recommend(self.k, exclude_seen=not self.include_seen)
                    row = {side: _plain(adapter.codecs[side].decode_one(entity))}
                    if label is not None:
                        row["k"] = label[1:] if label else "all"
                    row[f"{other}s"] = [_plain(i) for i in adapter.codecs[other].decode(rec.ids)]
                    row["scores"] = [float(x) for x in rec.scores]
                    self._file.write(json.dumps(row) + "\n")
                    self.written += 1

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            print(f"metarec predict: wrote the top-{self.k} of {self.written} "
                  f"{self._adapter.task_by}s to "
                  f"{self._path}", flush=True)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
