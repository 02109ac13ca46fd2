"""Loggers: W&B (offline unless an account is configured) beside a readable CSV log."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


def wandb_account_configured() -> bool:
    """True when an API key is in the environment or in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger, offline by default when no W&B account is configured.

    ``offline=None`` (the default) picks offline mode unless ``WANDB_MODE`` says otherwise or
    an account is configured; offline runs write ``wandb/offline-run-*/run-*.wandb`` under
    ``save_dir`` and can be uploaded later with ``wandb sync``.
    """

    def __init__(self, *args: Any, offline: bool | None = None, **kwargs: Any) -> None:
        if offline is None:
            mode = os.environ.get("WANDB_MODE", "")
            offline = mode in ("offline", "dryrun", "disabled") or (
                mode != "online" and not wandb_account_configured())
        if os.environ.get("WANDB_MODE") == "disabled":
            kwargs.setdefault("mode", "disabled")  # no run files at all
        kwargs.setdefault("project", "metarec")
        super().__init__(*args, offline=offline, **kwargs)
