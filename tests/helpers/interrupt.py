"""A callback that presses Ctrl-C (raises KeyboardInterrupt) after a given training step."""

from __future__ import annotations

import lightning.pytorch as pl


class InterruptAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise KeyboardInterrupt


class RecordBatches(pl.Callback):
    """Records, for every training step, the epoch, the batch index, the batch's users and its
    support items (which episodic sampling draws afresh each epoch)."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        support = batch.support["item_id"].masked_fill(~batch.support["mask"], -1)
        self.batches.append((trainer.current_epoch, batch_idx, batch.users.tolist(),
                             support.tolist()))
