"""A callback that presses Ctrl-C (raises KeyboardInterrupt) after a given training step."""

from __future__ import annotations

import lightning.pytorch as pl


class InterruptAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise KeyboardInterrupt
