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
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from metarec import Backbone, DataSchema, NonNegativeFloat, PositiveInt
from metarec_plugins.backbones.twotower import FeatureEmbeddings


class MatrixFactorization(Backbone):
    """Biased MF with a meta-learned default user row as the fast parameters.

    Args:
        schema: the data schema (provided by the framework).
        embedding_dim: latent dimension ``d``.
        user_features: add (slow) embeddings of the user's features to the default row.
        use_user_table: add a (slow, zero-initialised) per-user row and bias.
        init_std: standard deviation of the initial item rows and default user row.
    """

    def __init__(self, schema: DataSchema, embedding_dim: PositiveInt = 32, user_features: bool = True,
                 use_user_table: bool = False, init_std: NonNegativeFloat = 0.1) -> None:
        super().__init__(schema)
        if embedding_dim < 1 or init_std < 0:
            raise ValueError("embedding_dim must be >= 1 and init_std >= 0")
        d = self.dim = int(embedding_dim)
        explicit = schema.feedback == "explicit" and schema.rating_range is not None
        self.global_bias = nn.Parameter(torch.tensor(sum(schema.rating_range) / 2
                                                     if explicit else 0.0))
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
        item = features["item_id"]
        p, b_u = self.user_row(features)
        q, b_i = self.item_embedding(item), self.item_bias(item).squeeze(-1)
        return self.global_bias + b_u + b_i + (p * q).sum(-1)

    def default_fast_parameters(self) -> list[str]:
        return ["user_default", "user_default_bias"]

    def head_parameters(self) -> list[str]:
        """The score is linear in the user row given the item rows (the "body"): ANIL adapts
        the same user row as the default."""
        return ["user_default", "user_default_bias"]
