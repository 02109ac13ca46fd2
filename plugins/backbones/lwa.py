"""LWA: Linear Weight Adaptation (Vartak, Thiagarajan, Miranda, Bratman and Larochelle, NeurIPS
2017: "A Meta-Learning Perspective on Cold-Start Recommendations for Items", Sec. 3.1).

One task per item (``data.tasks.task_by: item``); the task's support is the item's history: the
users it was shown to, with their 0/1 labels. Each user is embedded, ``F(u)``, and the history
is summarised by its two *class representatives*, the mean embedding of the users of each class:

    R_c = mean { F(u) : (u, y) in history, y = c },  c in {0, 1}   (0 when the class is empty)

The item's classifier is then linear in ``F(u)`` with weights that are a (meta-learned) linear
function of the representatives:

    w_i = W_0 R_0 + W_1 R_1,    P(y = 1 | u, i) = sigmoid(b + F(u) . w_i)

``F`` (an MLP over the user's feature embeddings and, with ``use_ids``, a user id embedding:
users are shared between training and new items), ``W_0``, ``W_1`` and ``b`` are learned across
items; ``w_i`` is computed from the support set by :meth:`LWA.task_start`, so no gradient step
adapts it (train with ``maml`` and ``inner_steps: 0``; a policy may still fine-tune ``w_i``).
With tasks per user the roles swap (the history holds items, ``F`` embeds items), as in
RecBole-MetaRec's user-task rows. Needs implicit (0/1) labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from metarec import Backbone, DataSchema, FeatureBatch, PositiveInt
from metarec_plugins.backbones.feature_tables import FeatureEmbeddings
from metarec_plugins.backbones.twotower import mlp


class HistoryEncoder(nn.Module):
    """``F``: the embedding of a history slot's entity (the users of an item's task, or the
    items of a user's task): its feature embeddings (and id embedding), concatenated, an MLP."""

    def __init__(self, schema: DataSchema, embedding_dim: int, hidden: Sequence[int],
                 out_dim: int, use_ids: bool) -> None:
        super().__init__()
        self.side = "user" if getattr(schema, "task_by", "user") == "item" else "item"
        specs = schema.of(self.side)
        self.features = FeatureEmbeddings(specs, embedding_dim)
        count = schema.num_users if self.side == "user" else schema.num_items
        self.ids = nn.Embedding(count, embedding_dim) if use_ids else None
        width = embedding_dim * (len(specs) + int(use_ids))
        if width == 0:
            raise ValueError(f"the {self.side}s have no features: set use_ids: true")
        body, w = mlp(width, hidden)
        self.net = nn.Sequential(body, nn.Linear(w, out_dim))

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = self.features(features)
        if self.ids is not None:
            parts = [*parts, self.ids(features[f"{self.side}_id"])]
        return self.net(torch.cat(parts, -1))


def class_representatives(embedded: torch.Tensor, labels: torch.Tensor,
                          mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R_0, R_1)``: the mean of ``embedded`` ``(N, d)`` over the real slots of each class
    (label < 0.5, >= 0.5); a zero vector for a class with no slot."""
    positive = (labels >= 0.5) & mask
    negative = (labels < 0.5) & mask

    def mean(m: torch.Tensor) -> torch.Tensor:
        w = m.to(embedded.dtype)
        return (embedded * w.unsqueeze(-1)).sum(-2) / w.sum().clamp_min(1.0)

    return mean(negative), mean(positive)


def _check_implicit(schema: DataSchema, name: str) -> None:
    if schema.feedback != "implicit":
        raise ValueError(f"{name} is a classifier of 0/1 labels: use implicit feedback "
                         "(data.tasks.feedback: implicit, with positive_threshold for ratings)")


class LWA(Backbone):
    """Linear Weight Adaptation.

    Args:
        schema: the data schema (provided by the framework).
        embedding_dim: width of each feature (and id) embedding of a history entity.
        hidden: hidden widths of ``F``.
        out_dim: width of ``F(u)`` (and of ``w_i``).
        use_ids: embed the history entities' ids too (shared between tasks, so learnable).
    """

    def __init__(self, schema: DataSchema, embedding_dim: PositiveInt = 16,
                 hidden: Sequence[PositiveInt] = (32,), out_dim: PositiveInt = 16,
                 use_ids: bool = True) -> None:
        super().__init__(schema)
        _check_implicit(schema, "lwa")
        self.encoder = HistoryEncoder(schema, embedding_dim, hidden, out_dim, use_ids)
        self.w0 = nn.Parameter(torch.eye(out_dim) * 0.1)
        self.w1 = nn.Parameter(torch.eye(out_dim) * 0.1)
        self.bias = nn.Parameter(torch.zeros(()))
        # The fast task state w_i: stored neutral, computed per task by task_start.
        self.task_weight = nn.Parameter(torch.zeros(out_dim))

    def task_start(self, support: FeatureBatch) -> dict[str, torch.Tensor]:
        """``w_i = W_0 R_0 + W_1 R_1`` from one task's support set."""
        r0, r1 = class_representatives(self.encoder(support), support["label"], support["mask"])
        return {"task_weight": self.w0 @ r0 + self.w1 @ r1}

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.bias + self.encoder(features) @ self.task_weight

    def default_fast_parameters(self) -> list[str]:
        return ["task_weight"]

    def head_parameters(self) -> list[str]:
        return ["task_weight"]
