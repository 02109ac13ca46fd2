"""A callback that saves each rank's parameters, and a DDP hook that breaks gradient sync."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy


class SaveParameters(pl.Callback):
    """Writes ``{dirpath}/rank{r}.pt`` with the module's parameters when training ends."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(pl_module, f"start{trainer.global_rank}.pt")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(pl_module, f"rank{trainer.global_rank}.pt")

    def _save(self, pl_module: pl.LightningModule, name: str) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.named_parameters()}
        torch.save(state, self.dirpath / name)


def no_allreduce(state, bucket):
    """A DDP communication hook that skips the all-reduce: each rank keeps its own gradients.

    Plugged in deliberately (``DDPStrategy(ddp_comm_hook=...)``) to show that the DDP test
    notices when gradients are not synchronised.
    """
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


class UnsyncedDDP(DDPStrategy):
    """DDP whose gradient all-reduce is replaced by :func:`no_allreduce` (Lightning registers
    communication hooks on CUDA only, so this registers it on any device)."""

    def _register_ddp_hooks(self) -> None:
        self.model.register_comm_hook(None, no_allreduce)
