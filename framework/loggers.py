"""Loggers: W&B (offline unless an account is configured) beside a readable CSV log."""

from __future__ import annotations

import csv
import netrc
import os
from typing import Any, Literal

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter as _ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


def wandb_account_configured() -> bool:
    """True when an API key is in the environment or in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def resolve_offline(offline: bool | None) -> bool:
    """``offline=None``: offline unless ``WANDB_MODE=online`` or an account is configured
    (``WANDB_MODE=offline|dryrun|disabled`` always means offline)."""
    if offline is not None:
        return offline
    mode = os.environ.get("WANDB_MODE", "")
    return mode in ("offline", "dryrun", "disabled") or (
        mode != "online" and not wandb_account_configured())


def resolve_log_model(offline: bool,
                      log_model: bool | Literal["all"] | None) -> bool | Literal["all"]:
    """``log_model=None``: checkpoints become model artifacts when online, not when offline."""
    return (not offline) if log_model is None else log_model


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger, offline by default when no W&B account is configured, logging
    checkpoints as W&B model artifacts when online.

    ``offline=None`` (the default) picks offline mode unless ``WANDB_MODE`` says otherwise or
    an account is configured; offline runs write ``wandb/offline-run-*/run-*.wandb`` under
    ``save_dir`` (made absolute) and can be uploaded later with ``wandb sync``.

    ``log_model`` is Lightning's (``True``: the ModelCheckpoint files at the end of a
    successful fit; ``"all"``: every checkpoint as it is saved; ``False``: none), with
    ``None`` (the default) meaning ``True`` online and ``False`` offline. Lightning refuses
    ``log_model`` with ``offline=True``; this class accepts it, because W&B does log artifacts
    offline: the run file gets an artifact record (type ``model``, the checkpoint as
    ``model.ckpt``) and the checkpoint is copied into W&B's staging folder
    (``$WANDB_DATA_DIR/artifacts/staging``, by default ``~/.local/share/wandb``), and
    ``wandb sync`` uploads it later. It is off by default offline because that copy lives
    outside ``save_dir`` (a run folder synced from another machine loses its artifacts) and
    grows with every checkpoint of runs that may never be synced.
    """

    def __init__(self, *args: Any, offline: bool | None = None,
                 log_model: bool | Literal["all"] | None = None, **kwargs: Any) -> None:
        offline = resolve_offline(offline)
        # Absolute: W&B's service process (shared by every run of this process) resolves a
        # relative folder against its own working directory, so after a chdir a second
        # in-process run would write no run file.
        kwargs["save_dir"] = os.path.abspath(os.fspath(kwargs.get("save_dir") or "."))
        if kwargs.get("dir") is not None:
            kwargs["dir"] = os.path.abspath(os.fspath(kwargs["dir"]))
        if os.environ.get("WANDB_MODE") == "disabled":
            kwargs.setdefault("mode", "disabled")  # no run files at all
        # (a CLI passes project=None explicitly: setdefault would keep it)
        kwargs["project"] = (kwargs.get("project") or os.environ.get("WANDB_PROJECT")
                             or "metarec")
        # Lightning raises on offline + log_model: pass False, then set the resolved value.
        super().__init__(*args, offline=offline, log_model=False, **kwargs)
        self._log_model = resolve_log_model(offline, log_model)
        if self._wandb_init.get("anonymous") is None:  # W&B warns that the setting is gone
            self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self) -> Any:
        # W&B looks for a git repository from its folder and warns when it does not exist yet.
        if self._experiment is None and self._save_dir:
            os.makedirs(self._save_dir, exist_ok=True)
        return super().experiment


class _AppendingWriter(_ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued (a resumed
    run appends to its own log) instead of deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                header = next(csv.reader(handle), [])
            self.metrics_keys = sorted(set(header))


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger (``{save_dir}/{name}/{version}/metrics.csv``); when that folder
    already holds a ``metrics.csv`` (a resumed run), the new rows are appended to it instead of
    replacing it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
