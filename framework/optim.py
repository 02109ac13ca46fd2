"""Outer-loop optimisers for models with sparse embedding gradients.

A large item table (e.g. a million items x 256) is mostly untouched by one meta-batch. With
``nn.Embedding(sparse=True)`` its gradient is a sparse tensor of the rows the batch read, but
``torch.optim.Adam`` refuses sparse gradients and ``torch.optim.SparseAdam`` refuses dense ones,
and Lightning's automatic optimisation wants one optimiser. :class:`LazyAdam` takes both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class LazyAdam(Optimizer):
    """Adam for dense gradients, *lazy* Adam for sparse ones, in one optimiser.

    Dense gradients get the Adam update of Kingma and Ba (ICLR 2015) with bias correction,
    as ``torch.optim.Adam`` computes it (L2 ``weight_decay`` added to the gradient, as Adam
    does). Sparse gradients update only the rows they contain: those rows' moments and values
    move, every other row (and its moments) stays as it is; this is the rule of
    ``torch.optim.SparseAdam`` and of TensorFlow's ``LazyAdam``. Bias correction uses the
    optimiser's step count. A row that every step touches therefore follows dense Adam exactly;
    a row that is rarely touched is not decayed in between (the point: the cost of a step is
    proportional to the rows read, not to the size of the table). One difference from
    ``SparseAdam``: ``eps`` is added after bias correction, as ``Adam`` does, so that rows
    touched at every step match dense Adam to rounding.

    Args:
        params: parameters or parameter groups.
        lr: step size.
        betas: moment decay rates.
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient (dense and, on the touched rows, sparse).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"LazyAdam needs lr > 0, eps > 0, weight_decay >= 0; got lr={lr}, "
                             f"eps={eps}, weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"LazyAdam betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                correction1 = 1 - b1 ** state["step"]
                correction2 = 1 - b2 ** state["step"]
                if p.grad.is_sparse:
                    self._sparse_update(p, state, lr, b1, b2, eps, decay, correction1, correction2)
                else:
                    grad = p.grad if decay == 0 else p.grad.add(p, alpha=decay)
                    state["exp_avg"].lerp_(grad, 1 - b1)
                    state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    denom = (state["exp_avg_sq"] / correction2).sqrt_().add_(eps)
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / correction1)
        return loss

    @staticmethod
    def _sparse_update(p: torch.Tensor, state: dict[str, Any], lr: float, b1: float, b2: float,
                       eps: float, decay: float, correction1: float, correction2: float) -> None:
        grad = p.grad.coalesce()  # one entry per touched row (repeated lookups summed)
        rows, values = grad.indices()[0], grad.values()
        if rows.numel() == 0:
            return
        if decay:
            values = values + decay * p.index_select(0, rows)
        m = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - b1)
        v = state["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(values, values,
                                                                        value=1 - b2)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        p.index_add_(0, rows, m.div_(correction1).div_((v / correction2).sqrt_().add_(eps)),
                     alpha=-lr)


@torch.no_grad()
def clip_gradients(parameters: Iterable[torch.Tensor], clip_value: float,
                   algorithm: str = "norm") -> None:
    """Gradient clipping that also handles sparse gradients (``torch.nn.utils.clip_grad_*``
    fail on them): ``norm`` scales every gradient so that their joint 2-norm is at most
    ``clip_value`` (sparse gradients count with the norm of their coalesced values, i.e. of
    the rows they hold, exactly as their dense form would); ``value`` clamps every entry to
    ``[-clip_value, clip_value]``.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if algorithm == "value":
        for i, g in enumerate(grads):
            if g.is_sparse:
                g = g.coalesce()
                g.values().clamp_(-clip_value, clip_value)
                grads[i].copy_(g)
            else:
                g.clamp_(-clip_value, clip_value)
        return
    if algorithm != "norm":
        raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {algorithm!r}")
    norms = [torch.linalg.vector_norm(g.coalesce().values() if g.is_sparse else g)
             for g in grads]
    if not norms:
        return
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = (clip_value / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale)
