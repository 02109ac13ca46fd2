"""The meta-algorithm interface: a batch of tasks in, one scalar outer loss out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import vmap

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

    def task_start(self, model: FunctionalModel, fast: Params, slow: Params,
                   support: FeatureBatch) -> Params:
        """One task's step 0: where its adaptation starts (vmap it across tasks).

        The task-conditioned start: an algorithm whose start depends on the task (MAMO's
        memory-personalised initialisation) overrides it; a backbone that encodes the support
        set into its fast state (TaNP's amortised task code) defines ``task_start(support)``,
        which this default calls (:meth:`FunctionalModel.task_start`); otherwise it is
        ``fast``, the shared meta-learned start. Everything that adapts a task (:meth:`adapt`,
        the policies, :class:`metarec.Adapter`) starts here, so step 0 of evaluation is this
        start and gradient steps, if any, follow from it. It must be a pure function of its
        arguments (it runs under ``vmap`` and inside the outer loss, which differentiates it).
        """
        return model.task_start(fast, slow, support)

    def task_starts(self, model: FunctionalModel, fast: Params, slow: Params,
                    support: FeatureBatch) -> Params:
        """:meth:`task_start` of every task of a batch (leading task dim on the result)."""
        tasks = support["mask"].shape[0]
        if not self.conditions_start(model):  # the shared start: broadcast views, no copy
            return {k: v.expand(tasks, *v.shape) for k, v in fast.items()}
        return vmap(lambda task: self.task_start(model, fast, slow, task),
                    randomness="different")(support)

    def conditions_start(self, model: FunctionalModel) -> bool:
        """Whether :meth:`task_start` depends on the task (else it returns ``fast``)."""
        return (type(self).task_start is not MetaAlgorithm.task_start
                or model.conditions_start)

    def adapt(self, model: FunctionalModel, fast: Params, slow: Params, support: FeatureBatch, *,
              steps: int | None = None, optimizer: InnerOptimizer | None = None,
              first_order: bool = False, trajectory: bool = False,
              from_start: bool = True, support_losses: bool = False) -> Any:
        """This algorithm's inner loop on one task (vmap it across tasks), from the task's
        start (:meth:`task_start` of ``fast``); ``from_start=False`` continues from ``fast``
        as given (e.g. a user's already-adapted parameters). ``support_losses``: also every
        iterate's support loss (:meth:`FunctionalModel.adapt`)."""
        if from_start:
            fast = self.task_start(model, fast, slow, support)
        return model.adapt(fast, slow, support, self.inner_steps if steps is None else steps,
                           optimizer or self.inner_optimizer(),
                           objective=self.inner_objective(model, fast, slow),
                           first_order=first_order, trajectory=trajectory,
                           support_losses=support_losses)

    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar meta-training loss of ``batch`` and extra values to log."""
        raise NotImplementedError
