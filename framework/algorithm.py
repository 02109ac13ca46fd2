"""The meta-algorithm interface: a batch of tasks in, one scalar outer loss out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metarec.data.episodes import EpisodeBatch
from metarec.functional import FunctionalModel, Params


class MetaAlgorithm(nn.Module):
    """Turns an :class:`EpisodeBatch` into one outer loss (computed inside ``training_step``).

    One loss per step keeps Lightning's automatic optimisation, gradient clipping, AMP and
    DDP gradient averaging working with no special cases. An algorithm is an ``nn.Module``
    so that any meta-parameters it learns (e.g. inner learning rates) are optimised and
    checkpointed with the backbone.

    It also defines the *inner update rule* (:meth:`inner_update`) and its default number of
    steps; adaptation policies reuse them, so evaluation adapts the way training did.

    Args:
        inner_steps: gradient steps on the support set per task.
        inner_lr: inner-loop step size.
        fast_parameters: ``fnmatch`` patterns overriding the backbone's fast/slow partition.
    """

    def __init__(self, inner_steps: int = 5, inner_lr: float = 0.01,
                 fast_parameters: Sequence[str] | None = None) -> None:
        super().__init__()
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        self.inner_steps = int(inner_steps)
        self.inner_lr = float(inner_lr)
        self.fast_parameters = list(fast_parameters) if fast_parameters else None

    def bind(self, model: FunctionalModel) -> None:
        """Called once the backbone and its fast parameters are known (create meta-params here)."""

    def inner_update(self, fast: Params, grads: Params, step: int) -> Params:
        """One inner-loop step: ``theta - inner_lr * grad`` unless an algorithm learns more."""
        return {k: fast[k] - self.inner_lr * grads[k] for k in fast}

    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar meta-training loss of ``batch`` and extra values to log."""
        raise NotImplementedError
