"""The proximal inner loop shared by the algorithm and the policy.

The inner objective of one task is ``support_loss(phi) + lam / 2 * ||phi - theta_0||^2``: the
support loss plus an L2 pull toward the starting point ``theta_0`` (the meta-learned
initialisation), as in iMAML's proximal inner problem (Rajeswaran et al., NeurIPS 2019).
Unlike iMAML we do not use the implicit gradient: ``steps`` plain gradient steps on this
objective are unrolled and differentiated through, exactly as MAML does.

Everything is a pure function of parameter dicts (``torch.func.grad``), so it runs unchanged
under ``torch.func.vmap`` across the tasks of a batch.
"""

from __future__ import annotations

import torch
from torch.func import grad

from metarec import FeatureBatch, FunctionalModel, Params


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


def proximal_adapt(model: FunctionalModel, fast: Params, slow: Params, support: FeatureBatch,
                   steps: int, update, lam: float, *, first_order: bool = False,
                   trajectory: bool = False) -> Params | list[Params]:
    """Run ``steps`` updates on one task's proximal inner objective, anchored at ``fast``.

    Args:
        model: the functional view of the backbone.
        fast, slow: the starting fast parameters (``theta_0``, also the anchor) and the
            shared ones.
        support: one task's support set (no task dimension; vmap adds it).
        steps: number of inner steps.
        update: the inner update rule ``(fast, grads, step) -> fast``, e.g. an algorithm's
            :meth:`~metarec.MetaAlgorithm.inner_update`.
        lam: strength of the pull toward ``theta_0``; ``0`` gives MAML's inner loop.
        first_order: detach the inner gradients (no second-order meta-gradient).
        trajectory: return every iterate (steps ``0..steps``) instead of the last one.
    """
    anchor = fast  # closed over: a constant for the inner grad, differentiable for the outer one

    def objective(params: Params) -> torch.Tensor:
        return model.loss(params, slow, support) + 0.5 * lam * squared_distance(params, anchor)

    objective_grad = grad(objective)
    iterates = [fast]
    for step in range(steps):
        grads = objective_grad(fast)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        fast = update(fast, grads, step)
        iterates.append(fast)
    return iterates if trajectory else iterates[-1]
