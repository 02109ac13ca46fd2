"""L2-MAML: MAML whose inner loop minimises the support loss plus an L2 pull toward the
initialisation, ``support_loss(phi) + lam / 2 * ||phi - theta_0||^2``.

The proximal term keeps each task's adapted parameters close to the meta-learned start,
which regularises adaptation on users with few interactions (the iMAML inner problem,
Rajeswaran et al. 2019). The meta-gradient is MAML's: the outer (query) loss is
differentiated through the unrolled inner steps, including the anchor ``theta_0`` inside the
proximal term. ``lam = 0`` is exactly MAML.

The algorithm only overrides :meth:`~metarec.MetaAlgorithm.inner_objective`; metarec's
:meth:`~metarec.MetaAlgorithm.adapt` runs the inner loop with it, and the built-in
``finetune`` policy adapts new tasks with it too, so evaluation adapts the way training did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import vmap

from metarec import EpisodeBatch, FunctionalModel, MetaAlgorithm, Objective, Params
from metarec_example.proximal import check_stable, squared_distance, support_loss, with_proximal


class L2MAML(MetaAlgorithm):
    """MAML with a proximal inner objective.

    Args:
        inner_steps: inner gradient steps per task.
        inner_lr: inner step size (``inner_lr * lam`` must be < 2 for a stable inner loop).
        lam: strength of the L2 pull toward the initialisation (``0`` = MAML).
        first_order: drop the second-order terms of the meta-gradient.
        fast_parameters: patterns overriding the backbone's fast parameters.
    """

    def __init__(self, inner_steps: int = 5, inner_lr: float = 0.01, lam: float = 1.0,
                 first_order: bool = False,
                 fast_parameters: Sequence[str] | None = None) -> None:
        super().__init__(inner_steps, inner_lr, fast_parameters)
        check_stable(self.inner_lr, lam)
        self.lam = float(lam)
        self.first_order = bool(first_order)

    def inner_objective(self, model: FunctionalModel, start: Params, slow: Params) -> Objective:
        # The support loss plus the pull toward the task's starting point.
        return with_proximal(support_loss(model, slow), start, self.lam)

    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The live parameters: the meta-gradient reaches the backbone through them.
        fast, slow = model.split()

        def one_task(support, query):
            # inner_steps steps of inner_optimizer() on inner_objective(), starting at fast.
            adapted = self.adapt(model, fast, slow, support, first_order=self.first_order)
            return model.loss(adapted, slow, query), squared_distance(adapted, fast)

        # One batched computation over the tasks (leading dim of support and query).
        losses, distances = vmap(one_task, randomness="different")(batch.support, batch.query)
        # One scalar outer loss; the extra values are logged as train/<name>.
        return losses.mean(), {"adapted_sq_distance": distances.mean().detach()}
