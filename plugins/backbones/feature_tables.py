"""One embedding table per side-information feature, and their lookup: what every built-in
backbone that reads user or item features shares.

A categorical feature is an ``nn.Embedding`` row; a multi-hot feature (e.g. genres) the mean of
its active categories' rows, read from either input form (dense 0/1 or a bag of ids:
:func:`metarec_plugins.backbones.bags.bag_mean`). Tables are keyed by the feature's key with
``.`` replaced by ``__`` (``user.age`` -> ``user__age``). Two layouts, for their parameter
names:

- :class:`FeatureEmbeddings`, a module (``<attribute>.tables.user__age.weight``; multi-hot rows
  ``(K, dim)``): the two-tower family (twotower, mf, transformer, dropoutnet, lwa);
- :func:`feature_tables` and :func:`embed_features`, a flat ``ModuleDict`` whose multi-hot
  tables are bias-free ``nn.Linear(K, dim)`` (``<attribute>.user__age.weight``, rows as
  columns), as MeLU's reference code lays them out: MeLU, TaNP and MAMO; with a parameter
  dict, the same lookup as a pure function (MeLU's ``functional_forward``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metarec import FeatureSpec
from metarec_plugins.backbones.bags import bag_mean, is_bag


def table_name(spec: FeatureSpec) -> str:
    """The table's key in the ``ModuleDict``: the feature key, ``.`` -> ``__``."""
    return spec.key.replace(".", "__")


class MultiHotEmbedding(nn.Module):
    """Mean of the embeddings of the active categories (zeros when none), of a 0/1 vector
    ``(*lead, K)`` or of a bag of category ids ``(*lead, L)`` padded with -1 (a sparse gather,
    :func:`metarec_plugins.backbones.bags.bag_mean`)."""

    def __init__(self, cardinality: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cardinality, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bag_mean(x, self.weight)


class FeatureEmbeddings(nn.Module):
    """One embedding per feature: a table lookup for categorical features, the mean of the
    active rows for multi-hot ones. Returns the list of ``(*lead, dim)`` embeddings."""

    def __init__(self, specs: Sequence[FeatureSpec], dim: int) -> None:
        super().__init__()
        self.specs = list(specs)
        self.tables = nn.ModuleDict({
            table_name(s): nn.Embedding(s.cardinality, dim) if s.kind == "categorical"
            else MultiHotEmbedding(s.cardinality, dim) for s in self.specs})

    def forward(self, features: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return [self.tables[table_name(s)](features[s.key]) for s in self.specs]


def feature_tables(specs: Sequence[FeatureSpec], dim: int) -> nn.ModuleDict:
    """A table of width ``dim`` per feature: ``nn.Embedding`` (categorical) or a bias-free
    ``nn.Linear`` holding the category rows (multi-hot)."""
    return nn.ModuleDict({
        table_name(spec): (nn.Embedding(spec.cardinality, dim) if spec.kind == "categorical"
                           else nn.Linear(spec.cardinality, dim, bias=False))
        for spec in specs})


def embed_features(tables: nn.ModuleDict, specs: Sequence[FeatureSpec],
                   features: Mapping[str, torch.Tensor],
                   params: Mapping[str, torch.Tensor] | None = None,
                   prefix: str = "") -> list[torch.Tensor] | None:
    """Each feature's embedding ``(..., dim)``, in ``specs`` order.

    With ``params`` (a parameter dict, names ``{prefix}{table}.weight``) the weights come from
    it, by ``torch.nn.functional`` ops: a pure function of ``params``, as a backbone's
    ``functional_forward`` needs; None when a table is not a plain ``nn.Embedding`` or
    ``nn.Linear`` (e.g. wrapped by LoRA), for the caller to fall back to the module."""
    parts = []
    for spec in specs:
        name = table_name(spec)
        table, x = tables[name], features[spec.key]
        if params is not None and type(table) not in (nn.Embedding, nn.Linear):
            return None
        weight = table.weight if params is None else params[f"{prefix}{name}.weight"]
        if spec.kind == "categorical":
            parts.append(table(x) if params is None else F.embedding(x, weight))
        elif is_bag(x):  # the mean of the active categories' rows: a gather
            parts.append(bag_mean(x, weight.t()))
        else:  # the same mean from a dense 0/1 vector
            x = x.to(weight.dtype)
            rows = table(x) if params is None else F.linear(x, weight)
            parts.append(rows / x.sum(-1, keepdim=True).clamp_min(1.0))
    return parts
