"""The meta-algorithm interface: a batch of tasks in, one scalar outer loss out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metarec.data.episodes import EpisodeBatch, FeatureBatch
from metarec.functional import SGD, FunctionalModel, InnerOptimizer, Objective, Params
from metarec.ranges import NonNegativeInt, PositiveFloat


class MetaAlgorithm(nn.Module):
    """Turns an :class:`EpisodeBatch` into one outer loss (computed inside ``training_step``).

    One loss per step keeps Lightning's automatic optimisation, gradient clipping, AMP and
    DDP gradient averaging working with no special cases. An algorithm is an ``nn.Module``
    so that any meta-parameters it learns (e.g. inner learning rates) are optimised and
    checkpointed with the backbone.

    It also defines its inner loop: the optimiser (:meth:`inner_optimizer`), the inner objective
    (:meth:`inner_objective`) and the number of steps, run by :meth:`adapt`. Adaptation policies
    reuse them, so evaluation adapts exactly the way meta-training did.

    Args:
        inner_steps: gradient steps on the support set per task.
        inner_lr: inner-loop step size.
        fast_parameters: ``fnmatch`` patterns overriding the backbone's fast/slow partition.
    """

    def __init__(self, inner_steps: NonNegativeInt = 5, inner_lr: PositiveFloat = 0.01,
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

    def on_train_epoch_start(self, epoch: int, max_epochs: int | None) -> None:
        """Called by the Lightning module before each meta-training epoch (``epoch`` counts
        from 0, restored on resume), for schedules over epochs such as MAML++'s annealed
        multi-step loss weights. Default: nothing."""

    def select_fast(self, backbone: nn.Module) -> list[str]:
        """Patterns of the parameters this algorithm adapts per task."""
        return self.fast_parameters or backbone.default_fast_parameters()

    def inner_optimizer(self) -> InnerOptimizer:
        """The inner-loop optimiser (plain SGD at ``inner_lr`` unless an algorithm learns more).

        Called at every use, so learned rates are read fresh.
        """
        return SGD(self.inner_lr)

    def inner_objective(self, model: FunctionalModel, start: Params,
                        slow: Params) -> Objective | None:
        """The inner loss of a task adapted from ``start``; None means the plain support loss."""
        return None

    def adapt(self, model: FunctionalModel, fast: Params, slow: Params, support: FeatureBatch, *,
              steps: int | None = None, optimizer: InnerOptimizer | None = None,
              first_order: bool = False, trajectory: bool = False) -> Params | list[Params]:
        """This algorithm's inner loop on one task (vmap it across tasks)."""
        return model.adapt(fast, slow, support, self.inner_steps if steps is None else steps,
                           optimizer or self.inner_optimizer(),
                           objective=self.inner_objective(model, fast, slow),
                           first_order=first_order, trajectory=trajectory)

    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar meta-training loss of ``batch`` and extra values to log."""
        raise NotImplementedError
