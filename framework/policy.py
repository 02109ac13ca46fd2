"""The adaptation-policy interface: how a new task is adapted at deployment and evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from metarec.algorithm import MetaAlgorithm
from metarec.data.episodes import EpisodeBatch, FeatureBatch
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

    def adapt_with_losses(self, model: FunctionalModel, fast: Params, slow: Params,
                          support: FeatureBatch) -> tuple[list[Params], torch.Tensor | None]:
        """:meth:`adapt`, and every iterate's support loss ``(max_steps + 1, B)`` when the
        policy has it for free (its inner steps computed it), else None. The divergence guard
        reads these losses instead of scoring every iterate's support set again. Default:
        ``(adapt(...), None)``."""
        return self.adapt(model, fast, slow, support), None

    def calibrate(self, model: FunctionalModel, fast: Params, slow: Params,
                  batches: Iterable[EpisodeBatch]) -> dict[str, Any] | None:
        """Choose settings on *validation* tasks before a test (or predict) run.

        The Lightning module calls it at the start of ``test``/``predict`` with the
        validation users' batches only (one :class:`EpisodeBatch` per validation batch and
        support cap when ``data.eval_support`` is set); never with a test user. Return a plain
        description of what was chosen (logged and printed), or None. Default: nothing to
        choose (returns None).
        """
        return None

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Per-task values describing the most recent :meth:`adapt` call, each shaped ``(B,)``.

        E.g. ``{"steps_used": ...}`` for a policy that decides per task how long to adapt.
        Evaluation may log their means next to the metrics. Default: none.
        """
        return {}
