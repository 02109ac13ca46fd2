"""MAML (Finn et al., ICML 2017: "Model-Agnostic Meta-Learning for Fast Adaptation"), with the
MAML++ options of Antoniou, Edwards and Storkey (ICLR 2019: "How to train your MAML").

For every task of a batch, ``inner_steps`` gradient steps on the support loss adapt the fast
parameters from the shared initialisation; the outer loss is the mean query loss of the
adapted parameters. Differentiating it through the inner steps gives the (second-order)
meta-gradient; ``first_order=True`` drops the second-order terms (FOMAML).

The inner loop is a pure function of a parameter dict (``torch.func.grad``), vmapped across
the tasks of the batch (:meth:`metarec.FunctionalModel.adapt_tasks`).

MAML++ options (all off by default, so older recipes and checkpoints behave as before):

* ``multi_step_loss`` (MSL): the outer loss is ``sum_i w_i * L_query(theta_i)`` over the inner
  steps ``i = 1..N``, with annealed weights (:meth:`MAML.step_loss_weights`);
* ``learn_inner_lr`` / ``per_layer_lr`` (LSLR): learned per-step (per-layer) inner rates;
* ``first_order_epochs`` (DA): first-order meta-gradients for the first epochs, then second;
* ``inner_grad_clip`` and ``lr_bound`` / ``max_lr``: stable inner loops (clipped inner
  gradients, bounded learned rates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from metarec import (
    SGD,
    EpisodeBatch,
    FunctionalModel,
    InnerOptimizer,
    MetaAlgorithm,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)

LrBound = Literal["softplus", "clamp"]


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """MAML++'s per-step importance of the query losses at ``epoch`` (counting from 0).

    Uniform (``1/N``) at epoch 0; each epoch every non-final weight decays by
    ``1/N/msl_epochs`` down to ``0.03/N`` while the final one grows by ``(N-1)`` times that,
    up to ``1 - (N-1) * 0.03/N`` (the weights sum to 1 throughout); from epoch ``msl_epochs``
    on, only the final step counts. The schedule of the paper's reference code
    (``get_per_step_loss_importance_vector``, used while ``epoch < msl_epochs``).
    """
    if steps < 1:
        raise ValueError(f"the multi-step loss needs inner_steps >= 1, got {steps}")
    if epoch >= msl_epochs:
        return [0.0] * (steps - 1) + [1.0]
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    weights = [max(1.0 / steps - epoch * decay, floor) for _ in range(steps - 1)]
    weights.append(min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return weights


class MAML(MetaAlgorithm):
    """Model-Agnostic Meta-Learning, with the MAML++ options.

    Args:
        inner_steps: inner gradient steps per task (training and default adaptation).
        inner_lr: inner step size (the initial value of learned rates).
        first_order: ignore second-order terms of the meta-gradient.
        learn_inner_lr: learn one inner step size per inner step (initialised at ``inner_lr``),
            shared by all fast parameters.
        fast_parameters: patterns overriding the backbone's fast parameters.
        per_layer_lr: learn one inner step size per fast-parameter tensor per inner step
            (MAML++'s LSLR, initialised at ``inner_lr``); implies learned rates. Adaptation
            beyond the learned steps reuses the last step's rates.
        multi_step_loss: MAML++'s multi-step loss (MSL): the outer loss weighs the query loss
            after every inner step, annealed toward the last step (:func:`msl_weights`).
        msl_epochs: epochs after which only the last step's query loss counts.
        first_order_epochs: derivative-order annealing (DA): first-order meta-gradients for the
            first ``first_order_epochs`` epochs, second-order afterwards (0: off).
        inner_grad_clip: clip each inner step's gradients to this global L2 norm over all fast
            parameters of the task (None: off); applies at evaluation too.
        lr_bound: keep learned rates in range: None (unbounded), ``softplus`` (rate =
            softplus(raw), raw initialised so the rate starts at ``inner_lr``) or ``clamp``
            (rate = raw clamped to ``[0, max_lr]``).
        max_lr: the upper bound of ``lr_bound: clamp``.
    """

    #: Subclasses that always learn rates (Meta-SGD) set this, so ``lr_bound`` is accepted.
    learns_rates: ClassVar[bool] = False

    def __init__(self, inner_steps: NonNegativeInt = 5, inner_lr: PositiveFloat = 0.01,
                 first_order: bool = False,
                 learn_inner_lr: bool = False,
                 fast_parameters: Sequence[str] | None = None,
                 per_layer_lr: bool = False,
                 multi_step_loss: bool = False,
                 msl_epochs: PositiveInt = 10,
                 first_order_epochs: NonNegativeInt = 0,
                 inner_grad_clip: PositiveFloat | None = None,
                 lr_bound: LrBound | None = None,
                 max_lr: PositiveFloat | None = None) -> None:
        super().__init__(inner_steps, inner_lr, fast_parameters)
        if multi_step_loss and inner_steps < 1:
            raise ValueError(f"multi_step_loss needs inner_steps >= 1, got {inner_steps}")
        if msl_epochs < 1:
            raise ValueError(f"msl_epochs must be >= 1, got {msl_epochs}")
        if first_order_epochs < 0:
            raise ValueError(f"first_order_epochs must be >= 0, got {first_order_epochs}")
        if first_order and first_order_epochs:
            raise ValueError("first_order_epochs anneals first-order to second-order "
                             "meta-gradients; with first_order: true it would do nothing")
        if inner_grad_clip is not None and not inner_grad_clip > 0:
            raise ValueError(f"inner_grad_clip must be > 0 or null, got {inner_grad_clip}")
        if lr_bound not in (None, "softplus", "clamp"):
            raise ValueError(f"lr_bound must be null, 'softplus' or 'clamp', got {lr_bound!r}")
        if lr_bound is not None and not (learn_inner_lr or per_layer_lr or self.learns_rates):
            raise ValueError("lr_bound bounds learned inner rates: set learn_inner_lr or "
                             "per_layer_lr")
        if (lr_bound == "clamp") != (max_lr is not None):
            raise ValueError("max_lr is the upper bound of lr_bound: clamp, and clamp needs it "
                             f"(got lr_bound={lr_bound!r}, max_lr={max_lr!r})")
        if max_lr is not None and not inner_lr <= max_lr:
            raise ValueError(f"the learned rates start at inner_lr = {inner_lr}, above "
                             f"max_lr = {max_lr}")
        self.first_order = first_order
        self.multi_step_loss = bool(multi_step_loss)
        self.msl_epochs = int(msl_epochs)
        self.first_order_epochs = int(first_order_epochs)
        self.inner_grad_clip = None if inner_grad_clip is None else float(inner_grad_clip)
        self.lr_bound = lr_bound
        self.max_lr = None if max_lr is None else float(max_lr)
        self.epoch = 0  # set by on_train_epoch_start; the schedules are functions of it
        self._rate_steps = max(inner_steps, 1)
        self.step_lrs = (nn.Parameter(torch.full((self._rate_steps,), self.raw_rate(inner_lr)))
                         if learn_inner_lr and not per_layer_lr else None)
        self.per_layer_lr = bool(per_layer_lr)
        if self.per_layer_lr:  # filled by bind(), once the fast parameters are known
            self.layer_lrs = nn.ParameterDict()
        self._layer_keys: dict[str, str] = {}

    # -- learned rates ---------------------------------------------------------------------
    def raw_rate(self, rate: float) -> float:
        """The raw (stored) value whose bounded rate is ``rate``."""
        if self.lr_bound == "softplus":
            return rate + math.log(-math.expm1(-rate))  # softplus^-1, stable for small rates
        return float(rate)

    def bounded(self, raw: torch.Tensor) -> torch.Tensor:
        """The rate a raw learned value stands for, under ``lr_bound``."""
        if self.lr_bound == "softplus":
            return F.softplus(raw)
        if self.lr_bound == "clamp":
            return raw.clamp(0.0, self.max_lr)
        return raw

    def bind(self, model: FunctionalModel) -> None:
        super().bind(model)
        if not self.per_layer_lr:
            return
        fast, _ = model.split()
        for name, param in fast.items():
            key = name.replace(".", "__")
            self._layer_keys[name] = key
            self.layer_lrs[key] = nn.Parameter(torch.full(
                (self._rate_steps,), self.raw_rate(self.inner_lr), dtype=param.dtype,
                device=param.device))

    def layer_rates(self) -> dict[str, torch.Tensor]:
        """LSLR's rates (bounded): fast-parameter name -> ``(steps,)`` per-step rates."""
        if not self.per_layer_lr:
            raise RuntimeError("layer_rates: per_layer_lr is off")
        if not self._layer_keys:
            raise RuntimeError(f"{type(self).__name__}.layer_rates used before bind(model)")
        return {name: self.bounded(self.layer_lrs[key]) for name, key in self._layer_keys.items()}

    def inner_rates(self) -> float | torch.Tensor | list[dict[str, torch.Tensor]]:
        """What :class:`metarec.SGD` steps with: ``inner_lr``, the per-step rates, or a list of
        per-step dicts of per-layer rates; read fresh at every call."""
        if self.per_layer_lr:
            rates = self.layer_rates()
            return [{name: r[i] for name, r in rates.items()} for i in range(self._rate_steps)]
        if self.step_lrs is not None:
            return self.bounded(self.step_lrs)
        return self.inner_lr

    def inner_optimizer(self) -> InnerOptimizer:
        return SGD(self.inner_rates(), max_grad_norm=self.inner_grad_clip)

    # -- schedules over epochs -------------------------------------------------------------
    def on_train_epoch_start(self, epoch: int, max_epochs: int | None) -> None:
        self.epoch = int(epoch)

    def first_order_now(self) -> bool:
        """Whether this epoch's meta-gradient is first-order (``first_order`` or DA)."""
        return self.first_order or self.epoch < self.first_order_epochs

    def step_loss_weights(self, epoch: int | None = None) -> list[float] | None:
        """MSL's weights of the query losses after steps ``1..N`` at ``epoch`` (default: the
        current one), or None when only the last step counts (MSL off or annealed away)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.multi_step_loss or epoch >= self.msl_epochs:
            return None
        return msl_weights(self.inner_steps, epoch, self.msl_epochs)

    # -- the outer loss --------------------------------------------------------------------
    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fast, slow = model.split()
        first_order = self.first_order_now()
        weights = self.step_loss_weights()
        if weights is None:
            def query_loss(support, query):
                adapted = self.adapt(model, fast, slow, support, first_order=first_order)
                return model.loss(adapted, slow, query)

            losses = vmap(query_loss, randomness="different")(batch.support, batch.query)
            return losses.mean(), {}

        def step_losses(support, query):
            # One inner loop; its trajectory gives the query loss after every step.
            iterates = self.adapt(model, fast, slow, support, first_order=first_order,
                                  trajectory=True)
            query = model.prepare(slow, query)
            return torch.stack([model.loss(params, slow, query) for params in iterates[1:]])

        per_step = vmap(step_losses, randomness="different")(batch.support, batch.query).mean(0)
        w = torch.tensor(weights, dtype=per_step.dtype, device=per_step.device)
        return (w * per_step).sum(), {"final_query_loss": per_step[-1].detach()}
