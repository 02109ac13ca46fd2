"""The adaptation-policy interface: how a new task is adapted at deployment and evaluation."""

from __future__ import annotations

import torch

from metarec.algorithm import MetaAlgorithm
from metarec.data.episodes import FeatureBatch
from metarec.functional import FunctionalModel, Params


class AdaptationPolicy:
    """Adapts the fast parameters of a batch of new tasks from their support sets.

    Evaluation and deployment call the same policy, so what is measured is what is deployed.
    :meth:`adapt` returns the iterates at steps ``0..max_steps`` (step 0 is the meta-learned
    start), each a dict of fast parameters with a leading task dimension; metrics are
    reported at every step. It never mutates the model: parameters are passed functionally.
    """

    max_steps: int = 0

    def bind(self, algorithm: MetaAlgorithm) -> None:
        """Receive the trained algorithm (defaults such as its inner update rule)."""

    def adapt(self, model: FunctionalModel, fast: Params, slow: Params,
              support: FeatureBatch) -> list[Params]:  # pragma: no cover - interface
        raise NotImplementedError

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Per-task values describing the most recent :meth:`adapt` call, each shaped ``(B,)``.

        E.g. ``{"steps_used": ...}`` for a policy that decides per task how long to adapt.
        Evaluation may log their means next to the metrics. Default: none.
        """
        return {}
