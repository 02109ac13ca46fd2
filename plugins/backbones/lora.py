"""LoRA adapters as fast parameters (Hu et al., ICLR 2022: "LoRA: Low-Rank Adaptation of Large
Language Models").

A :class:`LoRALinear` wraps an ``nn.Linear`` ``y = W x + b`` and adds a rank-``r`` update:

    y = W x + b + (alpha / r) * B A x,    A: (r, in), B: (out, r)

``A`` starts random (Kaiming-uniform, as the reference implementation ``loralib``) and ``B``
starts at zero, so a freshly wrapped layer computes exactly what the base layer did. Making
``A`` and ``B`` the *fast* parameters (and every base weight slow) turns any backbone into one
whose per-task adaptation is small: ``r * (in + out)`` numbers per wrapped layer instead of
``in * out``. The base weights are not frozen with ``requires_grad``: they are slow, so the
outer loop still meta-learns them while the inner loop only moves the adapters.

- :func:`add_lora` wraps the ``nn.Linear`` submodules whose names match ``fnmatch`` patterns and
  returns the adapter parameter names, ready to be a backbone's fast parameters.
- :class:`LoRA` is a backbone that wraps any other registered backbone this way, so LoRA works
  with backbones that have no option of their own (e.g. ``melu``) from a recipe::

      model:
        backbone: metarec_plugins.backbones.lora:LoRA
        backbone_args: {backbone: melu, backbone_args: {embedding_dim: 32}, rank: 4}
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from metarec import Backbone, DataSchema, PositiveFloat, PositiveInt, build, select_parameters


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T``: an ``nn.Linear`` with a low-rank adapter.

    Args:
        base: the wrapped linear layer (kept as the submodule ``base``).
        rank: adapter rank ``r`` (>= 1).
        alpha: scaling numerator; the update is scaled by ``alpha / rank`` (default: ``rank``,
            i.e. scale 1).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if int(rank) != rank or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        self.base = base
        self.rank = int(rank)
        self.alpha = float(self.rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(self.rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def effective_weight(self) -> torch.Tensor:
        """``W + (alpha / r) B A``: the weight of the equivalent plain linear layer."""
        return self.base.weight + self.scaling * self.lora_B @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * ((x @ self.lora_A.T) @ self.lora_B.T)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def add_lora(module: nn.Module, targets: Sequence[str], rank: int,
             alpha: float | None = None) -> list[str]:
    """Replace, in place, every ``nn.Linear`` submodule of ``module`` whose name matches one of
    the ``fnmatch`` ``targets`` by a :class:`LoRALinear` around it.

    Returns the names of the adapter parameters (``<layer>.lora_A``, ``<layer>.lora_B``) in
    module order: pass them as the fast parameters. Layers already wrapped are left alone. A
    pattern that matches no linear layer is an error (a typo would otherwise adapt nothing).
    """
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("add_lora needs at least one target pattern")
    wrapped = {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear)}
    bases = {id(m.base) for m in wrapped.values()}
    linears = [name for name, m in module.named_modules()
               if name and isinstance(m, nn.Linear) and id(m) not in bases]
    chosen = [n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in targets)]
    unmatched = [p for p in targets
                 if not any(fnmatch.fnmatchcase(n, p) for n in [*linears, *wrapped])]
    if unmatched:
        raise ValueError(f"LoRA target pattern(s) {unmatched} match no nn.Linear of "
                         f"{type(module).__name__}; its linear layers are {[*linears, *wrapped]}")
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha))
    return [f"{name}.{p}" for name, m in module.named_modules() if isinstance(m, LoRALinear)
            for p in ("lora_A", "lora_B")]


def linear_layers_of(module: nn.Module, parameter_names: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` submodules that own any of ``parameter_names``."""
    owned = set(parameter_names)
    return [name for name, m in module.named_modules()
            if name and isinstance(m, nn.Linear)
            and any(f"{name}.{p}" in owned for p, _ in m.named_parameters(recurse=False))]


class LoRA(Backbone):
    """Any backbone with LoRA adapters as its fast parameters.

    Args:
        schema: the data schema (provided by the framework).
        backbone: the wrapped backbone (alias or class path), e.g. ``melu``.
        backbone_args: its arguments.
        rank: adapter rank.
        alpha: adapter scaling numerator (scale ``alpha / rank``; default ``rank``).
        targets: ``fnmatch`` patterns of the wrapped backbone's ``nn.Linear`` layers to adapt;
            default: the linear layers holding its default fast parameters (for ``melu``: the
            decision and output layers), so LoRA adapts what the backbone would adapt, in low
            rank. The adapters are the fast parameters; every base weight is slow.
    """

    def __init__(self, schema: DataSchema, backbone: str = "melu",
                 backbone_args: dict[str, Any] | None = None, rank: PositiveInt = 4,
                 alpha: PositiveFloat | None = None, targets: Sequence[str] | None = None) -> None:
        super().__init__(schema)
        self.backbone = build("backbones", backbone, backbone_args, schema=schema)
        self._head = list(self.backbone.head_parameters())
        if targets is None:
            fast = select_parameters(self.backbone, self.backbone.default_fast_parameters())
            targets = linear_layers_of(self.backbone, fast)
            if not targets:
                raise ValueError(f"backbone {backbone!r} has no nn.Linear among its default "
                                 f"fast parameters {fast}; name LoRA targets explicitly")
        self._fast = [f"backbone.{n}" for n in add_lora(self.backbone, list(targets), rank, alpha)]

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(features)

    def default_fast_parameters(self) -> list[str]:
        return list(self._fast)

    def head_parameters(self) -> list[str]:
        """The adapters inside the wrapped backbone's head (its whole head if it has none)."""
        head = [n for n, _ in self.named_parameters()
                if any(fnmatch.fnmatchcase(n, f"backbone.{p}") for p in self._head)]
        adapters = [n for n in head if n in self._fast]
        return adapters or [f"backbone.{p}" for p in self._head]
