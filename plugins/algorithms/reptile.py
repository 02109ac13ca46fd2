"""Reptile (Nichol, Achiam and Schulman, 2018: "On First-Order Meta-Learning Algorithms").

For every task, ``inner_steps`` steps of an inner optimiser (SGD, or Adam with beta1 = 0 as in
the reference code) adapt the fast parameters from the current initialisation ``theta`` to
``phi``; the meta-update moves the initialisation toward the tasks' mean solution:

    theta <- theta + eps * (mean_tasks(phi) - theta)

It is written as one outer loss, the surrogate ``0.5 * ||theta - stopgrad(mean(phi))||^2``,
whose gradient is ``theta - mean(phi)``: an outer ``SGD(lr=eps)`` step is exactly the update
above, and DDP averaging, gradient clipping and Lightning's optimiser loop work unchanged.
Anneal ``eps`` linearly with ``model.lr_scheduler`` (``LinearLR``), as the paper does.

Parameters outside the fast set (not adapted per task) receive the first-order gradient of
the query loss at the adapted parameters. With ``fast_parameters: ["*"]`` every parameter is
adapted and the algorithm is the paper's Reptile exactly (fine for small embedding tables).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.func import vmap

from metarec import (
    SGD,
    Adam,
    EpisodeBatch,
    FunctionalModel,
    InnerOptimizer,
    MetaAlgorithm,
    NonNegativeInt,
    PositiveFloat,
)


class Reptile(MetaAlgorithm):
    """Reptile.

    Args:
        inner_steps: inner optimiser steps per task.
        inner_lr: inner step size.
        inner_optimizer: ``sgd`` or ``adam``.
        adam_betas: betas of the inner Adam (reference code: ``(0, 0.999)``).
        fast_parameters: patterns overriding the backbone's fast parameters (``["*"]``: all).
    """

    def __init__(self, inner_steps: NonNegativeInt = 5, inner_lr: PositiveFloat = 0.01,
                 inner_optimizer: Literal["sgd", "adam"] = "sgd",
                 adam_betas: tuple[float, float] = (0.0, 0.999),
                 fast_parameters: Sequence[str] | None = None) -> None:
        super().__init__(inner_steps, inner_lr, fast_parameters)
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"inner_optimizer must be 'sgd' or 'adam', got {inner_optimizer!r}")
        self.optimizer_name = inner_optimizer
        self.adam_betas = tuple(adam_betas)

    def inner_optimizer(self) -> InnerOptimizer:
        if self.optimizer_name == "adam":
            return Adam(self.inner_lr, betas=self.adam_betas)
        return SGD(self.inner_lr)

    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fast, slow = model.split()
        start = {k: v.detach() for k, v in fast.items()}
        frozen_slow = {k: v.detach() for k, v in slow.items()}
        adapted = vmap(lambda task: self.adapt(model, start, frozen_slow, task, first_order=True),
                       randomness="different")(batch.support)
        adapted = {k: v.detach() for k, v in adapted.items()}
        target = {k: v.mean(0) for k, v in adapted.items()}
        surrogate = sum(0.5 * ((fast[k] - target[k]) ** 2).sum() for k in fast)
        logs = {"reptile_step_norm": torch.sqrt(sum(((fast[k] - target[k]) ** 2).sum()
                                                    for k in fast)).detach()}
        if not slow:
            return surrogate, logs
        # Shared (slow) parameters: first-order gradient of the query loss after adaptation.
        query = vmap(lambda f, q: model.loss(f, slow, q), randomness="different")(adapted,
                                                                                  batch.query)
        logs["query_loss"] = query.mean().detach()
        return surrogate + query.mean(), logs
