"""Proximal fine-tuning: adapt a new task on the algorithm's inner objective plus an L2 pull
toward the meta-learned start, ``objective(phi) + lam / 2 * ||phi - theta_0||^2``.

metarec's built-in ``finetune`` already adapts with the algorithm's own inner optimiser and
inner objective (so ``example-l2maml`` is evaluated with its proximal term by ``finetune``).
This policy *adds* a proximal term at evaluation time on top of whatever the algorithm
trained with, e.g. to regularise the adaptation of a plain ``maml`` model on users with few
interactions. On ``maml`` with ``lam = L`` it adapts exactly as ``example-l2maml`` with
``lam = L`` does during training; with ``lam = 0`` it is ``finetune``.
"""

from __future__ import annotations

from torch.func import vmap

from metarec import SGD, AdaptationPolicy, FeatureBatch, FunctionalModel, MetaAlgorithm, Params
from metarec_example.proximal import check_stable, support_loss, with_proximal


class ProximalFineTune(AdaptationPolicy):
    """``steps`` steps of the algorithm's inner optimiser on its inner objective plus
    ``lam / 2 * ||phi - theta_0||^2``.

    Args:
        steps: number of steps; default: the algorithm's ``inner_steps``.
        lr: plain-SGD step size; default: the algorithm's own inner optimiser.
        lam: strength of the added pull toward the start (``0`` = ``finetune``). It adds to
            any pull the algorithm's own objective has (``example-l2maml``'s ``lam``).
    """

    def __init__(self, steps: int | None = None, lr: float | None = None,
                 lam: float = 1.0) -> None:
        if steps is not None and steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if lr is not None and lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        check_stable(lr if lr is not None else 0.0, lam)  # lam >= 0; lr * lam < 2 if lr given
        self.steps, self.lr, self.lam = steps, lr, float(lam)
        self.max_steps = steps or 0
        self.algorithm: MetaAlgorithm | None = None

    def bind(self, algorithm: MetaAlgorithm) -> None:
        self.algorithm = algorithm
        if self.steps is None:
            self.max_steps = algorithm.inner_steps
        check_stable(self.lr if self.lr is not None else algorithm.inner_lr, self.lam)

    def adapt(self, model: FunctionalModel, fast: Params, slow: Params,
              support: FeatureBatch) -> list[Params]:
        algorithm = self.algorithm
        if algorithm is None:
            raise RuntimeError("ProximalFineTune.adapt called before bind(algorithm)")
        optimizer = SGD(self.lr) if self.lr is not None else algorithm.inner_optimizer()

        def one_task(task_support: FeatureBatch) -> list[Params]:
            # The algorithm's inner objective (None: the plain support loss), plus our term.
            base = algorithm.inner_objective(model, fast, slow) or support_loss(model, slow)
            return model.adapt(fast, slow, task_support, self.max_steps, optimizer,
                               objective=with_proximal(base, fast, self.lam),
                               first_order=True, trajectory=True)

        # Iterates 0..max_steps, each a dict of fast parameters with a leading task dim.
        return vmap(one_task, randomness="different")(support)
