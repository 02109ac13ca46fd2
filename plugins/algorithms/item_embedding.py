"""What the item warm-up algorithms (MWUF, CVAR) share: a task item's id embedding as one vector,
and its side information as one vector.

In metarec the "id embedding" of a task's item (tasks per item) is the backbone's fast
parameters, e.g. mf's item side ``item_default`` and ``item_default_bias``: they are the row and
bias every new item starts from. With ``use_item_table`` an old item also has its own
(pretrained) row ``T[i]`` and bias ``t[i]`` added to them, zero for an item never trained on. So
the item's id embedding is

    e_i = [item_default + T[i], item_default_bias + t[i]]        (d + 1 numbers for mf)

:class:`ItemIdEmbedding` reads it (:meth:`~ItemIdEmbedding.read`) and writes a replacement
(:meth:`~ItemIdEmbedding.write`: the fast values that make the item's effective id embedding a
given vector, ``fast = e - T[i]``, so an old item's own row never leaks into a generated one).
The per-item tables are found by name (``id_tables``: fast parameter -> slow ``(num_items, *)``
table); a backbone without them has ``e_i`` = its fast parameters, the shared start.

Every function here is pure and acts on one task (vmap it across tasks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from metarec import FeatureBatch, FeatureSpec, FunctionalModel, Params
from metarec_plugins.backbones.feature_tables import FeatureEmbeddings

# mf's item side: the fast default row and bias, and the slow per-item rows (use_item_table).
MF_ID_TABLES = {"item_default": "item_embedding.weight", "item_default_bias": "item_bias.weight"}


def require_item_tasks(model: FunctionalModel, algorithm: str) -> None:
    """The warm-up algorithms act on items: tasks must be per item (``data.tasks.task_by``)."""
    if getattr(model.backbone.schema, "task_by", "user") != "item":
        raise ValueError(f"{algorithm} warms up new items' id embeddings: it needs tasks per "
                         f"item (data.tasks.task_by: item)")


class ItemIdEmbedding:
    """The task item's id embedding as a flat vector: the backbone's fast parameters plus the
    item's own rows of the per-item tables, when the backbone has them.

    Args:
        model: the functional backbone (its fast parameters are the id embedding).
        id_tables: fast parameter name -> slow per-item table name; default: mf's. Pairs the
            backbone does not have are ignored (an mf without ``use_item_table``: ``e_i`` is
            the default row).
    """

    def __init__(self, model: FunctionalModel,
                 id_tables: Mapping[str, str] | None = None) -> None:
        fast, slow = model.split()
        self.shapes = {name: tuple(p.shape) for name, p in fast.items()}
        self.size = sum(math.prod(s) for s in self.shapes.values())
        tables = MF_ID_TABLES if id_tables is None else dict(id_tables)
        self.tables = {k: t for k, t in tables.items() if k in fast and t in slow}

    def flatten(self, params: Params) -> torch.Tensor:
        """The fast values as one ``(size,)`` vector, in the backbone's parameter order."""
        return torch.cat([params[name].reshape(-1) for name in self.shapes])

    def unflatten(self, vector: torch.Tensor) -> Params:
        """Inverse of :meth:`flatten`."""
        out, start = {}, 0
        for name, shape in self.shapes.items():
            n = math.prod(shape)
            out[name] = vector[start:start + n].reshape(shape)
            start += n
        return out

    def own_rows(self, slow: Params, support: FeatureBatch) -> Params:
        """The item's own rows of the per-item tables (its id: the first slot's ``item_id``,
        which every slot of a task per item carries, padding included)."""
        item = support["item_id"][0]
        return {name: F.embedding(item, slow[table]).reshape(self.shapes[name])
                for name, table in self.tables.items()}

    def read(self, fast: Params, slow: Params, support: FeatureBatch) -> torch.Tensor:
        """``e_i``: the fast values plus the item's own rows (its trained id embedding)."""
        own = self.own_rows(slow, support)
        return self.flatten({k: v + own[k] if k in own else v for k, v in fast.items()})

    def write(self, fast: Params, slow: Params, support: FeatureBatch,
              vector: torch.Tensor) -> Params:
        """The fast parameters under which the item's id embedding is ``vector``."""
        own, new = self.own_rows(slow, support), self.unflatten(vector)
        return {k: new[k] - own[k] if k in own else new[k] if k in new else v
                for k, v in fast.items()}


class ItemFeatures(nn.Module):
    """The task entity's side information as one vector: an embedding of each of its features
    (``specs``, ``dim`` wide), concatenated. Read from the first slot: every slot of a task
    carries its entity's features (the item's with tasks per item; MetaEmb also reads a user's
    with tasks per user)."""

    def __init__(self, specs: Sequence[FeatureSpec], dim: int, algorithm: str) -> None:
        super().__init__()
        if not specs:
            raise ValueError(f"{algorithm} reads the items' side information: this data has "
                             f"no item features")
        self.specs = list(specs)
        self.embed = FeatureEmbeddings(self.specs, dim)
        self.width = dim * len(self.specs)

    def forward(self, support: FeatureBatch) -> torch.Tensor:
        first = {s.key: support[s.key][0] for s in self.specs}
        return torch.cat(self.embed(first), -1)


def freeze(module: nn.Module) -> None:
    """Keep every parameter of ``module`` fixed (the pretrained backbone)."""
    for p in module.parameters():
        p.requires_grad_(False)
