"""DropoutNet (Volkovs, Yu and Poutanen, NeurIPS 2017: "DropoutNet: Addressing Cold Start in
Recommender Systems"): the standard non-meta item cold-start baseline.

Each side has a *preference* input (a latent id vector) and a *content* input (its side
information); a deep tower maps their concatenation to a latent vector and the score is their
inner product:

    f_U = MLP_U([U_u ; Phi_U(x_u)]),   f_V = MLP_V([V_i ; Phi_V(x_i)])
    score = b + <f_U, f_V>

Trained with *input dropout* on the cold side: for each training interaction, with probability
``dropout`` the cold side's preference input is set to 0, the input a cold item (or user) has,
so the towers learn to score from content alone and to use the preference input when there is
one. At evaluation a new item's preference row is 0 (its row was never trained: zero-initialised)
so the cold stage scores from content; the warm-up stages adapt ``task_preference``, a fast
d-vector added to the task's preference input (0 at the start), on the item's first ratings.

Departures: the paper takes U, V from a pretrained collaborative-filtering model and regresses
its scores ``U_u . V_i``; here U, V are id tables learned end to end on the labels (BCE/MSE), the
usual form when no pretrained CF model is at hand. The paper's transform step (DropoutNet-WMF's
``tanh`` layers on U and V) is the first tower layer here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from metarec import Backbone, DataSchema, NonNegativeFloat, PositiveInt
from metarec_plugins.backbones.feature_tables import FeatureEmbeddings
from metarec_plugins.backbones.twotower import mlp


class DropoutNet(Backbone):
    """Two deep towers over [preference ; content], with input dropout of the cold side.

    Args:
        schema: the data schema (provided by the framework).
        embedding_dim: width of the preference rows and of each feature embedding.
        hidden: tower hidden widths (the paper: 800, 400).
        out_dim: width of ``f_U``, ``f_V``.
        dropout: probability of dropping the cold side's preference input of a training
            interaction (the paper: 0.5).
        cold_side: the side that is dropped and adapts: ``item``, ``user`` or ``auto`` (the
            schema's ``task_by``).
    """

    def __init__(self, schema: DataSchema, embedding_dim: PositiveInt = 32,
                 hidden: Sequence[PositiveInt] = (64,), out_dim: PositiveInt = 32,
                 dropout: NonNegativeFloat = 0.5,
                 cold_side: Literal["auto", "user", "item"] = "auto") -> None:
        super().__init__(schema)
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must lie in [0, 1], got {dropout}")
        if cold_side not in ("auto", "user", "item"):
            raise ValueError(f"cold_side must be auto, user or item, got {cold_side!r}")
        self.cold_side = getattr(schema, "task_by", "user") if cold_side == "auto" else cold_side
        self.dropout = float(dropout)
        d = int(embedding_dim)
        self.user_preference = nn.Embedding(schema.num_users, d)
        self.item_preference = nn.Embedding(schema.num_items, d)
        # The cold side's rows start at 0: a row never trained is the cold input itself.
        cold, warm = ((self.item_preference, self.user_preference) if self.cold_side == "item"
                      else (self.user_preference, self.item_preference))
        nn.init.zeros_(cold.weight)
        nn.init.normal_(warm.weight, std=0.1)
        self.user_content = FeatureEmbeddings(schema.of("user"), d)
        self.item_content = FeatureEmbeddings(schema.of("item"), d)
        body_u, width_u = mlp(d * (1 + len(schema.of("user"))), hidden)
        body_v, width_v = mlp(d * (1 + len(schema.of("item"))), hidden)
        self.user_tower = nn.Sequential(body_u, nn.Linear(width_u, out_dim))
        self.item_tower = nn.Sequential(body_v, nn.Linear(width_v, out_dim))
        explicit = schema.feedback == "explicit" and schema.rating_range is not None
        self.bias = nn.Parameter(torch.tensor(sum(schema.rating_range) / 2 if explicit else 0.0))
        # Fast: the task's own preference offset (0 = the cold input).
        self.task_preference = nn.Parameter(torch.zeros(d))

    def preference(self, features: Mapping[str, torch.Tensor], side: str) -> torch.Tensor:
        """A side's preference input ``(*lead, d)``: its row; on the cold side, input-dropped
        in training and offset by the fast ``task_preference``."""
        table = self.user_preference if side == "user" else self.item_preference
        row = table(features[f"{side}_id"])
        if side != self.cold_side:
            return row
        if self.training and self.dropout > 0:
            keep = torch.bernoulli(torch.full(row.shape[:-1], 1.0 - self.dropout,
                                              dtype=row.dtype, device=row.device))
            row = row * keep.unsqueeze(-1)
        return row + self.task_preference

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        u = torch.cat([self.preference(features, "user"), *self.user_content(features)], -1)
        v = torch.cat([self.preference(features, "item"), *self.item_content(features)], -1)
        return self.bias + (self.user_tower(u) * self.item_tower(v)).sum(-1)

    def default_fast_parameters(self) -> list[str]:
        return ["task_preference"]

    def head_parameters(self) -> list[str]:
        return ["task_preference"]
