"""Zero-shot baseline: the meta-learned start, with no adaptation at all."""

from __future__ import annotations

from metarec import AdaptationPolicy, FeatureBatch, FunctionalModel, MetaAlgorithm, Params


class Frozen(AdaptationPolicy):
    """Every task is scored with its start (the meta-learned start, or the algorithm's
    task-conditioned one): the trajectory is step 0 only.

    ``max_steps`` is 0, so evaluation reports step-0 metrics only (``val/step0/<metric>``, and
    the same values as ``val/<metric>``). It measures what meta-learning buys before a new user
    has given any feedback, and is the reference the adapting policies improve on.
    """

    max_steps: int = 0
    algorithm: MetaAlgorithm | None = None

    def bind(self, algorithm: MetaAlgorithm) -> None:
        """Keep the algorithm for its start of each task (no inner loop is run)."""
        self.algorithm = algorithm

    def adapt(self, model: FunctionalModel, fast: Params, slow: Params,
              support: FeatureBatch) -> list[Params]:
        if self.algorithm is not None:  # each task's start (task-conditioned or shared)
            return [self.algorithm.task_starts(model, fast, slow, support)]
        tasks = support["mask"].shape[0]
        # Broadcast views of the start, as step 0 of any other policy's trajectory.
        return [{k: v.expand(tasks, *v.shape) for k, v in fast.items()}]
