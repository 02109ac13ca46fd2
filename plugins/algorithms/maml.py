"""MAML (Finn et al., ICML 2017: "Model-Agnostic Meta-Learning for Fast Adaptation").

For every task of a batch, ``inner_steps`` gradient steps on the support loss adapt the fast
parameters from the shared initialisation; the outer loss is the mean query loss of the
adapted parameters. Differentiating it through the inner steps gives the (second-order)
meta-gradient; ``first_order=True`` drops the second-order terms (FOMAML).

The inner loop is a pure function of a parameter dict (``torch.func.grad``), vmapped across
the tasks of the batch (:meth:`metarec.FunctionalModel.adapt_tasks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import vmap

from metarec import (
    SGD,
    EpisodeBatch,
    FunctionalModel,
    InnerOptimizer,
    MetaAlgorithm,
    NonNegativeInt,
    PositiveFloat,
)


class MAML(MetaAlgorithm):
    """Model-Agnostic Meta-Learning.

    Args:
        inner_steps: inner gradient steps per task (training and default adaptation).
        inner_lr: inner step size.
        first_order: ignore second-order terms of the meta-gradient.
        learn_inner_lr: learn one inner step size per inner step (initialised at ``inner_lr``),
            as in MAML++ ("per-step learning rates").
        fast_parameters: patterns overriding the backbone's fast parameters.
    """

    def __init__(self, inner_steps: NonNegativeInt = 5, inner_lr: PositiveFloat = 0.01,
                 first_order: bool = False,
                 learn_inner_lr: bool = False,
                 fast_parameters: Sequence[str] | None = None) -> None:
        super().__init__(inner_steps, inner_lr, fast_parameters)
        self.first_order = first_order
        self.step_lrs = (nn.Parameter(torch.full((max(inner_steps, 1),), float(inner_lr)))
                         if learn_inner_lr else None)

    def inner_optimizer(self) -> InnerOptimizer:
        return SGD(self.step_lrs if self.step_lrs is not None else self.inner_lr)

    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fast, slow = model.split()

        def query_loss(support, query):
            adapted = self.adapt(model, fast, slow, support, first_order=self.first_order)
            return model.loss(adapted, slow, query)

        losses = vmap(query_loss, randomness="different")(batch.support, batch.query)
        return losses.mean(), {}
