"""Meta-SGD (Li, Zhou, Chen and Li, 2017: "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning").

MAML whose inner step size is a learned tensor with one rate per fast-parameter element:
``phi = theta - alpha * grad`` (elementwise). ``alpha`` is meta-trained by the outer optimiser
together with the initialisation, through the same (second-order by default) meta-gradient.
Evaluation (``finetune`` with no ``lr``) adapts with the learned rates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metarec import SGD, FunctionalModel, InnerOptimizer, NonNegativeInt, PositiveFloat
from metarec_plugins.algorithms.maml import MAML


class MetaSGD(MAML):
    """Meta-SGD.

    Args:
        inner_steps: inner steps per task (the paper uses 1).
        inner_lr: initial value of every per-element rate.
        first_order: drop second-order terms (the rates still learn through the last step).
        fast_parameters: patterns overriding the backbone's fast parameters.
    """

    def __init__(self, inner_steps: NonNegativeInt = 1, inner_lr: PositiveFloat = 0.01,
                 first_order: bool = False,
                 fast_parameters: Sequence[str] | None = None) -> None:
        super().__init__(inner_steps, inner_lr, first_order=first_order,
                         fast_parameters=fast_parameters)
        self.rates = nn.ParameterDict()
        self._names: dict[str, str] = {}

    def bind(self, model: FunctionalModel) -> None:
        fast, _ = model.split()
        for name, param in fast.items():
            key = name.replace(".", "__")
            self._names[name] = key
            self.rates[key] = nn.Parameter(torch.full_like(param, self.inner_lr))

    def inner_optimizer(self) -> InnerOptimizer:
        return SGD({name: self.rates[key] for name, key in self._names.items()})
