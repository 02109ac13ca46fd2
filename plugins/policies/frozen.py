"""Zero-shot baseline: the meta-learned start, with no adaptation at all."""

from __future__ import annotations

from metarec import AdaptationPolicy, FeatureBatch, FunctionalModel, MetaAlgorithm, Params


class Frozen(AdaptationPolicy):
    """Every task is scored with the meta-learned start: the trajectory is step 0 only.

    ``max_steps`` is 0, so evaluation reports step-0 metrics only (``val/step0/<metric>``, and
    the same values as ``val/<metric>``). It measures what meta-learning buys before a new user
    has given any feedback, and is the reference the adapting policies improve on.
    """

    max_steps: int = 0

    def bind(self, algorithm: MetaAlgorithm) -> None:
        """Nothing to take from the algorithm: no inner loop is run."""

    def adapt(self, model: FunctionalModel, fast: Params, slow: Params,
              support: FeatureBatch) -> list[Params]:
        tasks = support["mask"].shape[0]
        # Broadcast views of the start, as step 0 of any other policy's trajectory.
        return [{k: v.expand(tasks, *v.shape) for k, v in fast.items()}]
