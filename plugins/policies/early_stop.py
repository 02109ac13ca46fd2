"""Early-stopped fine-tuning: each task adapts until its support loss has dropped enough, or has
stopped dropping, with a cap on the number of steps.

The *adaptation ratio* of a task at step ``t`` is ``r_t = L_t / L_0``: its support loss at the
current parameters divided by its support loss at the meta-learned start. Before each step a
task is checked, and it stops (takes no further step) when

- ``r_t <= target_ratio`` (it has adapted enough), or
- ``r_t`` has not improved on the best ratio seen by more than ``min_delta`` for ``patience``
  consecutive steps (it has stopped improving), or
- ``max_steps`` steps have been taken (the cap).

Tasks are adapted together under ``vmap``, so every task runs the same number of loop
iterations; a stopped task's parameters are held (per task, ``torch.where`` on an ``active``
flag) from the step it stopped at. The returned trajectory therefore always has the
``max_steps + 1`` iterates the policy contract and the per-step metrics need, and a stopped
task's iterates are constant after its stop step. The steps each task actually used are
reported by :meth:`EarlyStop.diagnostics` (``steps_used``) and ``last_steps_used``.
"""

from __future__ import annotations

import math

import torch
from torch.func import grad, grad_and_value

from metarec import (
    SGD,
    AdaptationPolicy,
    FeatureBatch,
    FunctionalModel,
    MetaAlgorithm,
    NonNegativeFloat,
    NonNegativeInt,
    Params,
    PositiveFloat,
    PositiveInt,
    UnitFraction,
    vmap_tasks,
)


class EarlyStop(AdaptationPolicy):
    """The algorithm's inner loop, stopped per task by the adaptation ratio of its support loss.

    Args:
        max_steps: step cap (and length of the trajectory minus one). Default 20.
        target_ratio: stop once ``support loss / initial support loss <= target_ratio``,
            in ``[0, 1)``; ``null`` disables this criterion. Default 0.5.
        patience: stop after this many consecutive steps without improving the best ratio by
            more than ``min_delta``; ``null`` disables this criterion. Default 3.
        min_delta: the smallest decrease of the ratio (a fraction of the initial support
            loss) that counts as an improvement, ``>= 0``. Default 0.
        lr: step size of plain SGD; default: the algorithm's own inner optimiser, as
            ``finetune``. The gradient is always that of the algorithm's inner objective;
            the ratio is always measured on the plain support loss.
    """

    def __init__(self, max_steps: NonNegativeInt = 20, target_ratio: UnitFraction | None = 0.5,
                 patience: PositiveInt | None = 3, min_delta: NonNegativeFloat = 0.0,
                 lr: PositiveFloat | None = None) -> None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
            raise ValueError(f"max_steps must be an int >= 0, got {max_steps!r}")
        if target_ratio is not None and not (math.isfinite(target_ratio)
                                             and 0 <= target_ratio < 1):
            raise ValueError(f"target_ratio must be in [0, 1) or null, got {target_ratio!r}")
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int)
                                     or patience < 1):
            raise ValueError(f"patience must be an int >= 1 or null, got {patience!r}")
        if not (math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.max_steps = max_steps
        self.target_ratio = None if target_ratio is None else float(target_ratio)
        self.patience, self.min_delta, self.lr = patience, float(min_delta), lr
        self.algorithm: MetaAlgorithm | None = None
        self.last_steps_used: torch.Tensor | None = None

    def bind(self, algorithm: MetaAlgorithm) -> None:
        self.algorithm = algorithm

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """``steps_used``: the steps each task of the last :meth:`adapt` call took, ``(B,)``."""
        if self.last_steps_used is None:
            return {}
        return {"steps_used": self.last_steps_used.to(torch.get_default_dtype())}

    def adapt(self, model: FunctionalModel, fast: Params, slow: Params,
              support: FeatureBatch) -> list[Params]:
        algorithm = self.algorithm
        if algorithm is None:
            raise RuntimeError("EarlyStop.adapt called before bind(algorithm)")
        tasks = support["mask"].shape[0]
        if self.max_steps == 0:
            self.last_steps_used = torch.zeros(tasks, dtype=torch.long,
                                               device=support["mask"].device)
            return [algorithm.task_starts(model, fast, slow, support)]
        optimizer = SGD(self.lr) if self.lr is not None else algorithm.inner_optimizer()
        objective = algorithm.inner_objective(model, fast, slow)
        support_loss = lambda f, batch: model.loss(f, slow, batch)  # noqa: E731
        target, patience, min_delta = self.target_ratio, self.patience, self.min_delta

        def one_task(task: FeatureBatch) -> tuple[list[Params], torch.Tensor]:
            start = algorithm.task_start(model, fast, slow, task)
            theta, state, iterates = start, optimizer.init(start), [start]
            active = used = base = best = wait = None
            for step in range(self.max_steps):
                if objective is None:  # one backward gives both the gradient and the loss
                    grads, loss = grad_and_value(support_loss)(theta, task)
                else:
                    grads, loss = grad(objective)(theta, task), support_loss(theta, task)
                grads = {k: g.detach() for k, g in grads.items()}
                if step == 0:
                    base = loss.clamp_min(torch.finfo(loss.dtype).tiny)
                    active = torch.ones_like(loss, dtype=torch.bool)
                    used = torch.zeros_like(loss, dtype=torch.long)
                ratio = loss / base
                if target is not None:  # NaN compares False: a diverged task stops too
                    active = active & (ratio > target)
                if patience is not None:
                    if step == 0:
                        best, wait = ratio, torch.zeros_like(used)
                    else:
                        improved = ratio < best - min_delta
                        best = torch.where(improved, ratio, best)
                        wait = torch.where(improved, torch.zeros_like(wait), wait + 1)
                        active = active & (wait < patience)
                new, state = optimizer.step(theta, grads, state, step)
                theta = {k: torch.where(active, new[k], theta[k]) for k in theta}
                used = used + active.long()
                iterates.append(theta)
            return iterates, used

        iterates, used = vmap_tasks(one_task)(support)
        self.last_steps_used = used
        return iterates
