"""learn2learn interop: run a learn2learn algorithm object on a metarec backbone and tasks.

``learn2learn.algorithms.MAML`` or ``MetaSGD`` wraps a module holding the backbone's *fast*
parameters (the slow ones stay shared and are meta-trained by the outer loss). Each task
follows the usual learn2learn loop, one task at a time: ``learner = wrapper.clone()``,
``learner.adapt(support_loss)`` for each inner step, then the query loss of the adapted
learner; the outer loss is the mean over tasks. Use it to bring learn2learn code into
metarec's harness and to compare against metarec's vmapped implementations on equal terms.

learn2learn is optional (it does not build on Python 3.11 from PyPI):
``../shared/tools/learn2learn-venv.sh`` builds a venv that has it, and ``make test-l2l`` runs
the interop tests there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from metarec import (
    SGD,
    EpisodeBatch,
    FunctionalModel,
    InnerOptimizer,
    MetaAlgorithm,
    NonNegativeInt,
    PositiveFloat,
)


def _import_learn2learn():
    try:
        import learn2learn
    except ImportError as err:
        raise ImportError(
            "the l2l algorithm needs learn2learn, which is not installed here. learn2learn 0.2.0 "
            "does not build from PyPI on Python 3.11; build a separate environment with "
            "`../shared/tools/learn2learn-venv.sh DIR` and install metarec into it "
            "(`make test-l2l` does both)") from err
    return learn2learn


class _FastParameters(nn.Module):
    """A module whose parameters are exactly the backbone's fast parameters (shared, not copied)."""

    def __init__(self, fast: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self.names = list(fast)
        for i, name in enumerate(self.names):
            self.register_parameter(f"p{i}", fast[name])

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"p{i}") for i, name in enumerate(self.names)}


class L2L(MetaAlgorithm):
    """A learn2learn algorithm (``maml`` or ``metasgd``) on metarec tasks.

    Args:
        method: ``maml`` (``learn2learn.algorithms.MAML``) or ``metasgd``
            (``learn2learn.algorithms.MetaSGD``).
        inner_steps, inner_lr: inner loop; ``first_order`` as in learn2learn.
        fast_parameters: patterns overriding the backbone's fast parameters.
    """

    def __init__(self, method: Literal["maml", "metasgd"] = "maml",
                 inner_steps: NonNegativeInt = 5, inner_lr: PositiveFloat = 0.01,
                 first_order: bool = False,
                 fast_parameters: Sequence[str] | None = None) -> None:
        super().__init__(inner_steps, inner_lr, fast_parameters)
        if method not in ("maml", "metasgd"):
            raise ValueError(f"method must be 'maml' or 'metasgd', got {method!r}")
        self.l2l = _import_learn2learn()
        self.method, self.first_order = method, first_order
        self._wrapper: list[nn.Module] = []

    def bind(self, model: FunctionalModel) -> None:
        fast, _ = model.split()
        algorithms = self.l2l.algorithms
        if self.method == "maml":
            wrapper = algorithms.MAML(_FastParameters(fast), lr=self.inner_lr,
                                      first_order=self.first_order)
            self._wrapper = [wrapper]  # its parameters are the backbone's: not registered twice
        else:
            wrapper = algorithms.MetaSGD(_FastParameters(fast), lr=self.inner_lr,
                                         first_order=self.first_order)
            self.metasgd = wrapper  # registered: its learned rates are meta-parameters
            self._wrapper = [wrapper]

    def inner_optimizer(self) -> InnerOptimizer:
        if self.method == "metasgd":
            names = self._wrapper[0].module.names
            return SGD(dict(zip(names, self._wrapper[0].lrs)))
        return SGD(self.inner_lr)

    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, slow = model.split()
        wrapper = self._wrapper[0]
        total = 0.0
        n = len(batch.users)
        for t in range(n):  # learn2learn's loop: one task at a time
            support = {k: v[t] for k, v in batch.support.items()}
            query = {k: v[t] for k, v in batch.query.items()}
            learner = wrapper.clone()
            for _ in range(self.inner_steps):
                learner.adapt(model.loss(learner.module.as_dict(), slow, support))
            total = total + model.loss(learner.module.as_dict(), slow, query) / n
        return total, {}
