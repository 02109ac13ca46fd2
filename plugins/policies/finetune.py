"""k-step fine-tuning: the standard adaptation of a new user (or item) from its support set."""

from __future__ import annotations

from torch.func import vmap

from metarec import SGD, AdaptationPolicy, FeatureBatch, FunctionalModel, MetaAlgorithm, Params


class FineTune(AdaptationPolicy):
    """``steps`` steps of the algorithm's inner loop on each new task's support set.

    Args:
        steps: number of steps; default: the algorithm's ``inner_steps``.
        lr: step size of plain SGD; default: the algorithm's own inner optimiser (its
            ``inner_lr``, or what it learned, e.g. per-step or per-element rates), so evaluation
            adapts exactly as meta-training did. The inner objective is always the algorithm's.
    """

    def __init__(self, steps: int | None = None, lr: float | None = None) -> None:
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

    def adapt(self, model: FunctionalModel, fast: Params, slow: Params,
              support: FeatureBatch) -> list[Params]:
        algorithm = self.algorithm
        if algorithm is None:
            raise RuntimeError("FineTune.adapt called before bind(algorithm)")
        optimizer = SGD(self.lr) if self.lr is not None else algorithm.inner_optimizer()
        return vmap(lambda task: algorithm.adapt(model, fast, slow, task, steps=self.max_steps,
                                                 optimizer=optimizer, first_order=True,
                                                 trajectory=True),
                    randomness="different")(support)
