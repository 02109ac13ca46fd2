"""k-step fine-tuning: the standard adaptation of a new user (or item) from its support set."""

from __future__ import annotations

import torch

from metarec import (
    SGD,
    AdaptationPolicy,
    FeatureBatch,
    FunctionalModel,
    InnerOptimizer,
    MetaAlgorithm,
    NonNegativeInt,
    Params,
    PositiveFloat,
    vmap_tasks,
)


class FineTune(AdaptationPolicy):
    """``steps`` steps of the algorithm's inner loop on each new task's support set.

    Args:
        steps: number of steps; default: the algorithm's ``inner_steps``.
        lr: step size of plain SGD; default: the algorithm's own inner optimiser (its
            ``inner_lr``, or what it learned, e.g. per-step or per-element rates), so evaluation
            adapts exactly as meta-training did. The inner objective is always the algorithm's.
    """

    def __init__(self, steps: NonNegativeInt | None = None,
                 lr: PositiveFloat | None = None) -> None:
        if steps is not None and steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if lr is not None and lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.steps, self.lr = steps, lr
        self.max_steps = steps or 0
        self.algorithm: MetaAlgorithm | None = None

    def bind(self, algorithm: MetaAlgorithm) -> None:
        self.algorithm = algorithm
        if self.steps is None:
            self.max_steps = algorithm.inner_steps

    def optimizer(self) -> InnerOptimizer:
        """The inner optimiser of each step: ``SGD(lr)`` if ``lr`` is set, else the algorithm's."""
        if self.algorithm is None:
            raise RuntimeError(f"{type(self).__name__} used before bind(algorithm)")
        return SGD(self.lr) if self.lr is not None else self.algorithm.inner_optimizer()

    def adapt(self, model: FunctionalModel, fast: Params, slow: Params,
              support: FeatureBatch) -> list[Params]:
        return self.adapt_with_losses(model, fast, slow, support)[0]

    def adapt_with_losses(self, model: FunctionalModel, fast: Params, slow: Params,
                          support: FeatureBatch) -> tuple[list[Params], torch.Tensor]:
        algorithm, optimizer = self.algorithm, self.optimizer()
        # The algorithm's inner loop (its objective) with this optimiser; iterates 0..max_steps
        # and their support losses, (B, max_steps + 1) -> (max_steps + 1, B).
        iterates, losses = vmap_tasks(lambda task: algorithm.adapt(
            model, fast, slow, task, steps=self.max_steps, optimizer=optimizer,
            first_order=True, trajectory=True, support_losses=True))(support)
        return iterates, losses.t()
