"""Proximal fine-tuning: adapt a new task with the same proximal inner objective as L2-MAML.

Evaluation should adapt the way meta-training did. metarec's built-in ``finetune`` reuses an
algorithm's inner *update rule* but minimises the plain support loss, so it would drop the
proximal term; this policy keeps it.
"""

from __future__ import annotations

from torch.func import vmap

from metarec import (
    AdaptationPolicy,
    FeatureBatch,
    FunctionalModel,
    MetaAlgorithm,
    Params,
    sgd_update,
)
from metarec_example.proximal import check_stable, proximal_adapt


class ProximalFineTune(AdaptationPolicy):
    """``steps`` gradient steps on ``support_loss + lam / 2 * ||phi - theta_0||^2``.

    Args:
        steps: number of steps; default: the algorithm's ``inner_steps``.
        lr: plain-SGD step size; default: the algorithm's own inner update rule.
        lam: proximal strength; default: the algorithm's ``lam`` if it has one, else 0 (which
            makes this policy plain fine-tuning).
    """

    def __init__(self, steps: int | None = None, lr: float | None = None,
                 lam: float | None = None) -> None:
        if steps is not None and steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if lr is not None and lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if lr is not None and lam is not None:
            check_stable(lr, lam)
        elif lam is not None and lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.steps, self.lr, self.lam = steps, lr, lam
        self.max_steps = steps or 0
        self._update = sgd_update(lr) if lr is not None else None

    def bind(self, algorithm: MetaAlgorithm) -> None:
        if self.steps is None:
            self.max_steps = algorithm.inner_steps
        if self.lr is None:
            self._update = algorithm.inner_update
        if self.lam is None:
            self.lam = float(getattr(algorithm, "lam", 0.0))
        check_stable(self.lr if self.lr is not None else algorithm.inner_lr, self.lam)

    def adapt(self, model: FunctionalModel, fast: Params, slow: Params,
              support: FeatureBatch) -> list[Params]:
        if self._update is None or self.lam is None:
            raise RuntimeError("ProximalFineTune.adapt called before bind(algorithm)")

        def one_task(task_support: FeatureBatch) -> list[Params]:
            return proximal_adapt(model, fast, slow, task_support, self.max_steps, self._update,
                                  self.lam, first_order=True, trajectory=True)

        # Iterates 0..max_steps, each a dict of fast parameters with a leading task dim.
        return vmap(one_task, randomness="different")(support)
