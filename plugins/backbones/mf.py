"""Biased matrix factorisation (Koren, Bell and Volinsky, IEEE Computer 2009: "Matrix
Factorization Techniques for Recommender Systems"), meta-learned for new users.

    score = b + b_u + b_i + <p_u, q_i>

a predicted rating (explicit feedback) or a logit (implicit). Items have their own slow rows
``q_i`` and biases ``b_i`` (items are shared between meta-train and evaluation users).

The user side is what adapts. Meta-train, validation and test users are disjoint, so a per-user
table learned on meta-train users has nothing to say about an evaluation user. Instead, the
task user's row is built from a *meta-learned default*:

    p_u = user_default + sum_f E_f[x_{u,f}]      (+ T[u] with use_user_table)
    b_u = user_default_bias + sum_f e_f[x_{u,f}] (+ t[u])

``user_default`` (a ``d``-vector) and ``user_default_bias`` (a scalar) are the fast parameters:
MAML meta-learns them as the prior row of a new user, and the inner loop adapts them on the
task's support set. Since ``p_u`` is ``user_default`` plus terms that do not depend on it,
a step on ``user_default`` is exactly a step on the task user's own row: only that row (and
bias) adapts, never a table. The optional terms are slow:

- ``E_f``/``e_f`` (``user_features``, default on): embeddings of the user's side information,
  zero-initialised, so a user's starting row is personalised by demographics;
- ``T``/``t`` (``use_user_table``, default off): a per-user row for warm-start data sets where
  evaluation users also appear in meta-training. It is zero-initialised, so a user never seen
  in training starts exactly from the default row.

**Tasks per item** (``data.tasks.task_by: item``, item cold start): the roles swap. Test items
are never seen in meta-training, users are shared, so the *item* row is built from a
meta-learned default and adapts, and users have their own slow rows:

    q_i = item_default + sum_f F_f[x_{i,f}]      (+ T[i] with use_item_table)
    b_i = item_default_bias + sum_f f_f[x_{i,f}] (+ t[i])
    score = b + b_u + b_i + <p_u, q_i>,  p_u, b_u: slow per-user rows

with ``item_default``/``item_default_bias`` the fast parameters, ``F_f``/``f_f`` (``item_features``)
zero-initialised embeddings of the item's side information and ``T``/``t`` (``use_item_table``)
zero-initialised per-item rows (an old item's own id embedding; a new item's stays 0, so it
starts from the default row plus its features). ``side`` picks the mode: ``auto`` (default)
follows the schema's ``task_by``, which the datamodule sets from ``data.tasks.task_by``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from metarec import Backbone, DataSchema, NonNegativeFloat, PositiveInt
from metarec_plugins.backbones.feature_tables import FeatureEmbeddings


class MatrixFactorization(Backbone):
    """Biased MF with a meta-learned default user row as the fast parameters.

    Args:
        schema: the data schema (provided by the framework).
        embedding_dim: latent dimension ``d``.
        user_features: add (slow) embeddings of the user's features to the default row.
        use_user_table: add a (slow, zero-initialised) per-user row and bias.
        init_std: standard deviation of the initial item rows and default user row.
        side: which side adapts per task: ``user`` (tasks per user), ``item`` (tasks per item:
            the item row is built from a fast default, users get slow rows) or ``auto`` (the
            schema's ``task_by``, i.e. ``data.tasks.task_by``).
        item_features: item side only: add (slow) embeddings of the item's features to the
            default item row.
        use_item_table: item side only: add a (slow, zero-initialised) per-item row and bias.
    """

    def __init__(self, schema: DataSchema, embedding_dim: PositiveInt = 32, user_features: bool = True,
                 use_user_table: bool = False, init_std: NonNegativeFloat = 0.1,
                 side: Literal["auto", "user", "item"] = "auto", item_features: bool = True,
                 use_item_table: bool = False) -> None:
        super().__init__(schema)
        if embedding_dim < 1 or init_std < 0:
            raise ValueError("embedding_dim must be >= 1 and init_std >= 0")
        if side not in ("auto", "user", "item"):
            raise ValueError(f"side must be auto, user or item, got {side!r}")
        self.side = getattr(schema, "task_by", "user") if side == "auto" else side
        d = self.dim = int(embedding_dim)
        explicit = schema.feedback == "explicit" and schema.rating_range is not None
        self.global_bias = nn.Parameter(torch.tensor(sum(schema.rating_range) / 2
                                                     if explicit else 0.0))
        if self.side == "item":
            if use_user_table:
                raise ValueError("use_user_table is for side: user (with side: item every user "
                                 "has a slow row already); use use_item_table")
            self._item_side(schema, d, init_std, item_features, use_item_table)
            return
        if use_item_table:
            raise ValueError("use_item_table is for side: item (tasks per item)")
        self.item_embedding = nn.Embedding(schema.num_items, d)
        self.item_bias = nn.Embedding(schema.num_items, 1)
        nn.init.normal_(self.item_embedding.weight, std=init_std)
        nn.init.zeros_(self.item_bias.weight)
        self.user_default = nn.Parameter(torch.randn(d) * init_std)
        self.user_default_bias = nn.Parameter(torch.zeros(()))
        specs = schema.of("user") if user_features else ()
        # Each feature embeds to d + 1 numbers: a row offset and a bias offset.
        self.user_features = FeatureEmbeddings(specs, d + 1) if specs else None
        if self.user_features is not None:
            for p in self.user_features.parameters():
                nn.init.zeros_(p)
        self.use_user_table = use_user_table
        if use_user_table:
            self.user_embedding = nn.Embedding(schema.num_users, d)
            self.user_bias = nn.Embedding(schema.num_users, 1)
            nn.init.zeros_(self.user_embedding.weight)
            nn.init.zeros_(self.user_bias.weight)

    def _item_side(self, schema: DataSchema, d: int, init_std: float, item_features: bool,
                   use_item_table: bool) -> None:
        """The parameters of the item side (tasks per item): see the module docs."""
        self.user_embedding = nn.Embedding(schema.num_users, d)
        self.user_bias = nn.Embedding(schema.num_users, 1)
        nn.init.normal_(self.user_embedding.weight, std=init_std)
        nn.init.zeros_(self.user_bias.weight)
        self.item_default = nn.Parameter(torch.randn(d) * init_std)
        self.item_default_bias = nn.Parameter(torch.zeros(()))
        specs = schema.of("item") if item_features else ()
        self.item_features = FeatureEmbeddings(specs, d + 1) if specs else None
        if self.item_features is not None:
            for p in self.item_features.parameters():
                nn.init.zeros_(p)
        self.use_item_table = use_item_table
        if use_item_table:
            self.item_embedding = nn.Embedding(schema.num_items, d)
            self.item_bias = nn.Embedding(schema.num_items, 1)
            nn.init.zeros_(self.item_embedding.weight)
            nn.init.zeros_(self.item_bias.weight)

    def item_row(self, features: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Item side: the task item's ``(q_i, b_i)``, broadcastable to ``(*lead, d)``, ``(*lead,)``."""
        q, b = self.item_default, self.item_default_bias
        if self.item_features is not None:
            for e in self.item_features(features):
                q, b = q + e[..., :-1], b + e[..., -1]
        if self.use_item_table:
            item = features["item_id"]
            q, b = q + self.item_embedding(item), b + self.item_bias(item).squeeze(-1)
        return q, b

    def user_row(self, features: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The task user's ``(p_u, b_u)``: broadcastable to ``(*lead, d)`` and ``(*lead,)``."""
        p, b = self.user_default, self.user_default_bias
        if self.user_features is not None:
            for e in self.user_features(features):
                p, b = p + e[..., :-1], b + e[..., -1]
        if self.use_user_table:
            user = features["user_id"]
            p, b = p + self.user_embedding(user), b + self.user_bias(user).squeeze(-1)
        return p, b

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.side == "item":
            user = features["user_id"]
            q, b_i = self.item_row(features)
            p, b_u = self.user_embedding(user), self.user_bias(user).squeeze(-1)
            return self.global_bias + b_u + b_i + (p * q).sum(-1)
        item = features["item_id"]
        p, b_u = self.user_row(features)
        q, b_i = self.item_embedding(item), self.item_bias(item).squeeze(-1)
        return self.global_bias + b_u + b_i + (p * q).sum(-1)

    def default_fast_parameters(self) -> list[str]:
        if self.side == "item":
            return ["item_default", "item_default_bias"]
        return ["user_default", "user_default_bias"]

    def head_parameters(self) -> list[str]:
        """The score is linear in the user row given the item rows (the "body"): ANIL adapts
        the same user row as the default."""
        return self.default_fast_parameters()
