"""The proximal term shared by the algorithm and the policy.

Adding ``lam / 2 * ||phi - theta_0||^2`` to a task's inner objective pulls its adapted
parameters ``phi`` toward the starting point ``theta_0`` (the meta-learned initialisation), as
in iMAML's proximal inner problem (Rajeswaran et al., NeurIPS 2019). Objectives are pure
functions ``(fast, support) -> loss`` (:data:`metarec.Objective`), which metarec's inner loop
differentiates with ``torch.func.grad`` and vmaps across the tasks of a batch.
"""

from __future__ import annotations

import torch

from metarec import FeatureBatch, FunctionalModel, Objective, Params


def squared_distance(a: Params, b: Params) -> torch.Tensor:
    """``sum_k ||a[k] - b[k]||^2`` over the keys of ``a``."""
    return sum(((a[k] - b[k]) ** 2).sum() for k in a)


def check_stable(lr: float, lam: float) -> None:
    """Gradient descent on the proximal term alone diverges unless ``lr * lam < 2``."""
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if lr * lam >= 2:
        raise ValueError(f"inner step size {lr} times lam {lam} must be < 2, otherwise the "
                         f"proximal inner loop diverges; lower lam or the step size")


def support_loss(model: FunctionalModel, slow: Params) -> Objective:
    """The plain support loss: metarec's inner objective when an algorithm defines none."""
    return lambda fast, support: model.loss(fast, slow, support)


def with_proximal(objective: Objective, anchor: Params, lam: float) -> Objective:
    """``objective`` plus ``lam / 2 * ||phi - anchor||^2``.

    ``anchor`` is closed over: ``torch.func.grad`` differentiates the objective with respect
    to ``phi`` only, so the anchor is a constant for the inner gradient, yet it stays in the
    outer autograd graph (during meta-training it is the live initialisation).
    """
    def proximal_objective(fast: Params, support: FeatureBatch) -> torch.Tensor:
        return objective(fast, support) + 0.5 * lam * squared_distance(fast, anchor)

    return proximal_objective
