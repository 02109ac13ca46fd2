"""Proximal fine-tuning: every step also pulls the parameters back toward the meta-learned start.

``theta <- theta - lr * grad - alpha * (theta - theta_0)``, the policy-update formula of the
book's fast-adaptation loop, with ``theta_0`` the start of adaptation (the meta-learned
initialisation). The pull is applied to the update, not added to the loss: it is written as an
:class:`~metarec.InnerOptimizer` wrapped around the algorithm's own inner optimiser, so the
algorithm's learned step sizes (per-step, per-element) and inner objective are kept, and with
``alpha = 0`` the extra term is skipped entirely: the policy is then ``finetune``, bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

from metarec import InnerOptimizer, NonNegativeInt, Params, PositiveFloat, UnitFraction
from metarec_plugins.policies.finetune import FineTune


class ProximalStep(InnerOptimizer):
    """``base``'s update followed by ``- alpha * (theta - theta_0)``.

    ``theta_0`` is the point :meth:`init` is called with (the start of the task's adaptation);
    it is kept in the optimiser state with ``base``'s own state, so one object serves every
    task under ``vmap``. With plain SGD at ``lr`` one step is
    ``theta - lr * grad(theta) - alpha * (theta - theta_0)``; with another base optimiser the
    gradient term is that optimiser's update (e.g. Adam's, or per-element Meta-SGD rates).
    ``alpha == 0`` returns ``base``'s update unchanged (no arithmetic added).
    """

    def __init__(self, base: InnerOptimizer, alpha: float) -> None:
        self.base, self.alpha = base, float(alpha)

    def init(self, fast: Params) -> Any:
        return dict(fast), self.base.init(fast)

    def step(self, fast: Params, grads: Params, state: Any, step: int) -> tuple[Params, Any]:
        start, inner = state
        new, inner = self.base.step(fast, grads, inner, step)
        if self.alpha != 0.0:
            new = {k: new[k] - self.alpha * (fast[k] - start[k]) for k in new}
        return new, (start, inner)


class Proximal(FineTune):
    """``steps`` steps of the algorithm's inner loop, each pulled back toward the start by
    ``alpha * (theta - theta_0)``.

    Args:
        steps: number of steps; default: the algorithm's ``inner_steps``.
        lr: step size of plain SGD; default: the algorithm's own inner optimiser (its
            ``inner_lr``, or the rates it learned), as ``finetune``.
        alpha: strength of the pull toward the start, ``0 <= alpha < 1``. ``0`` is exactly
            ``finetune``; each step shrinks the displacement from the start by ``1 - alpha``
            before the gradient step is added, so the displacement never exceeds
            ``lr * max|grad| / alpha`` however many steps are taken.
    """

    def __init__(self, steps: NonNegativeInt | None = None, lr: PositiveFloat | None = None,
                 alpha: UnitFraction = 0.1) -> None:
        super().__init__(steps, lr)
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0 <= alpha < 1):
            raise ValueError(f"alpha must be in [0, 1) (0 = finetune; alpha >= 1 would pull onto "
                             f"or past the start every step), got {alpha!r}")
        self.alpha = float(alpha)

    def optimizer(self) -> InnerOptimizer:
        """The fine-tuning optimiser with the pull toward the start wrapped around it."""
        return ProximalStep(super().optimizer(), self.alpha)
