"""k-step fine-tuning: the standard adaptation of a new user (or item) from its support set."""

from __future__ import annotations

from metarec import (
    AdaptationPolicy,
    FeatureBatch,
    FunctionalModel,
    MetaAlgorithm,
    Params,
    sgd_update,
)


class FineTune(AdaptationPolicy):
    """``steps`` gradient steps on the support loss.

    Args:
        steps: number of steps; default: the algorithm's ``inner_steps``.
        lr: step size of plain SGD; default: the algorithm's own inner update rule (its
            ``inner_lr``, or what it learned, e.g. per-step rates), so evaluation adapts
            exactly as meta-training did.
    """

    def __init__(self, steps: int | None = None, lr: float | None = None) -> None:
        if steps is not None and steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if lr is not None and lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.steps, self.lr = steps, lr
        self.max_steps = steps or 0
        self._update = sgd_update(lr) if lr is not None else None

    def bind(self, algorithm: MetaAlgorithm) -> None:
        if self.steps is None:
            self.max_steps = algorithm.inner_steps
        if self.lr is None:
            self._update = algorithm.inner_update

    def adapt(self, model: FunctionalModel, fast: Params, slow: Params,
              support: FeatureBatch) -> list[Params]:
        if self._update is None:
            raise RuntimeError("FineTune.adapt called before bind(algorithm)")
        return model.adapt_tasks(fast, slow, support, self.max_steps, self._update,
                                 first_order=True, trajectory=True)
