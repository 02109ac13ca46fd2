"""Meta-SGD (Li, Zhou, Chen and Li, 2017: "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning").

MAML whose inner step size is a learned tensor with one rate per fast-parameter element:
``phi = theta - alpha * grad`` (elementwise). ``alpha`` is meta-trained by the outer optimiser
together with the initialisation, through the same (second-order by default) meta-gradient.
Evaluation (``finetune`` with no ``lr``) adapts with the learned rates.

The paper's rates are unbounded: a rate driven negative turns the inner step into ascent, and
a large one overshoots, which at a few support ratings can blow a user's inner loop up.
``lr_bound`` (``softplus``: positive; ``clamp``: in ``[0, max_lr]``) and ``inner_grad_clip``
(each step's gradients clipped to a global norm) keep it stable; both are off by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metarec import (
    SGD,
    FunctionalModel,
    InnerOptimizer,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from metarec_plugins.algorithms.maml import MAML, LrBound


class MetaSGD(MAML):
    """Meta-SGD.

    Args:
        inner_steps: inner steps per task (the paper uses 1).
        inner_lr: initial value of every per-element rate.
        first_order: drop second-order terms (the rates still learn through the last step).
        fast_parameters: patterns overriding the backbone's fast parameters.
        multi_step_loss, msl_epochs, first_order_epochs: MAML++'s multi-step loss and
            derivative-order annealing, as ``maml``.
        inner_grad_clip: clip each inner step's gradients to this global norm (None: off).
        lr_bound: None (unbounded rates, the paper), ``softplus`` (rate = softplus(raw) > 0,
            starting at ``inner_lr``) or ``clamp`` (rate = raw clamped to ``[0, max_lr]``).
        max_lr: the upper bound of ``lr_bound: clamp``.
    """

    learns_rates = True

    def __init__(self, inner_steps: NonNegativeInt = 1, inner_lr: PositiveFloat = 0.01,
                 first_order: bool = False,
                 fast_parameters: Sequence[str] | None = None,
                 multi_step_loss: bool = False,
                 msl_epochs: PositiveInt = 10,
                 first_order_epochs: NonNegativeInt = 0,
                 inner_grad_clip: PositiveFloat | None = None,
                 lr_bound: LrBound | None = None,
                 max_lr: PositiveFloat | None = None) -> None:
        super().__init__(inner_steps, inner_lr, first_order=first_order,
                         fast_parameters=fast_parameters, multi_step_loss=multi_step_loss,
                         msl_epochs=msl_epochs, first_order_epochs=first_order_epochs,
                         inner_grad_clip=inner_grad_clip, lr_bound=lr_bound, max_lr=max_lr)
        self.rates = nn.ParameterDict()  # raw values; the rates are bounded(raw)
        self._names: dict[str, str] = {}

    def bind(self, model: FunctionalModel) -> None:
        super().bind(model)
        fast, _ = model.split()
        for name, param in fast.items():
            key = name.replace(".", "__")
            self._names[name] = key
            self.rates[key] = nn.Parameter(torch.full_like(param, self.raw_rate(self.inner_lr)))

    def element_rates(self) -> dict[str, torch.Tensor]:
        """The per-element rates (bounded), keyed by fast-parameter name."""
        return {name: self.bounded(self.rates[key]) for name, key in self._names.items()}

    def inner_optimizer(self) -> InnerOptimizer:
        return SGD(self.element_rates(), max_grad_norm=self.inner_grad_clip)
