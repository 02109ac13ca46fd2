"""MAMO's recommendation model (Dong et al., KDD 2020: "MAMO: Memory-Augmented Meta-Optimization
for Cold-start Recommendation", Section 4.1 and the authors' code).

Each side-information feature has an embedding table; a user's *profile* ``p_u`` is the
concatenation of its feature embeddings (likewise ``p_i`` for an item). Two embedding networks
map profiles to ``e_u = f_{theta_u}(p_u)`` and ``e_i = f_{theta_i}(p_i)`` (``n_layers`` linear
layers, halving the width, LeakyReLU); the recommendation network ``f_{theta_r}`` scores
``[e_u; e_i]`` through the *memory layer* (a square linear layer whose weight the
``mamo`` algorithm initialises per user from its task-specific memory, the paper's "fast
weights" ``M_{u,I}``), then halving layers and a linear output.

The feature tables are global (slow); ``theta_u``, ``theta_i`` and ``theta_r`` adapt per user
(fast), as in the paper's local update. :meth:`MAMO.user_profile` gives ``p_u``, what the
``mamo`` algorithm's feature-specific memory attends with.

Departure: the paper classifies ratings with a softmax over the rating values; metarec
regresses the rating (MSE; BCE on a logit for implicit feedback), as RecBole-MetaRec's MAMO
does, so every model here is measured by the same loss and metrics.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from metarec import ENCODED, Backbone, DataSchema, FeatureSpec, PositiveInt
from metarec_plugins.backbones.feature_tables import embed_features, feature_tables

SLOPE = 0.1  # the authors' LeakyReLU slope


def _halving(width: int, out: int | None, layers: int) -> tuple[nn.ModuleList, int]:
    """``layers - 1`` linear layers that halve the width, then one to ``out`` (None: keep
    halving); returns the layers and the final width."""
    modules = nn.ModuleList()
    for _ in range(layers - 1):
        modules.append(nn.Linear(width, max(width // 2, 1)))
        width = max(width // 2, 1)
    if out is not None:
        modules.append(nn.Linear(width, out))
        width = out
    return modules, width


class MAMO(Backbone):
    """MAMO's model: feature embeddings -> user/item embedding networks -> memory layer ->
    recommendation layers -> score.

    Args:
        schema: the data schema (provided by the framework).
        embedding_dim: width of each feature embedding and of ``e_u``, ``e_i`` (authors' code:
            100).
        n_layers: layers of each embedding network and of the recommendation network after the
            memory layer (authors' code: 2).
    """

    def __init__(self, schema: DataSchema, embedding_dim: PositiveInt = 100,
                 n_layers: PositiveInt = 2) -> None:
        super().__init__(schema)
        if embedding_dim < 1 or n_layers < 1:
            raise ValueError("embedding_dim and n_layers must be >= 1")
        self.user_specs, self.item_specs = schema.of("user"), schema.of("item")
        if not self.user_specs or not self.item_specs:
            raise ValueError("MAMO needs user features (its memories are read with the user "
                             "profile) and item features; this data set has "
                             f"{len(self.user_specs)} user and {len(self.item_specs)} item "
                             "features")
        self.tables = feature_tables(self.user_specs + self.item_specs, embedding_dim)
        self.profile_dim = embedding_dim * len(self.user_specs)
        self.item_profile_dim = embedding_dim * len(self.item_specs)
        self.user_embedding, _ = _halving(self.profile_dim, embedding_dim, n_layers)
        self.item_embedding, _ = _halving(self.item_profile_dim, embedding_dim, n_layers)
        width = 2 * embedding_dim
        self.mem_layer = nn.Linear(width, width, bias=False)
        self.rec, width = _halving(width, None, n_layers)
        self.output = nn.Linear(width, 1)
        if schema.feedback == "explicit" and schema.rating_range is not None:
            nn.init.constant_(self.output.bias, sum(schema.rating_range) / 2)

    def _profile(self, features: Mapping[str, torch.Tensor],
                 specs: tuple[FeatureSpec, ...]) -> torch.Tensor:
        return torch.cat(embed_features(self.tables, specs, features), dim=-1)

    def user_profile(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``p_u``: the concatenated user-feature embeddings (slow parameters only)."""
        return self._profile(features, self.user_specs)

    @staticmethod
    def _mlp(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            x = F.leaky_relu(layer(x), SLOPE)
        return x

    def forward(self, features: Mapping[str, torch.Tensor],
                encode_only: bool = False) -> torch.Tensor:
        if ENCODED in features:
            profiles = features[ENCODED]
        else:
            profiles = torch.cat([self.user_profile(features),
                                  self._profile(features, self.item_specs)], dim=-1)
        if encode_only:
            return profiles
        p_u, p_i = profiles.split([self.profile_dim, self.item_profile_dim], dim=-1)
        x = torch.cat([self._mlp(self.user_embedding, p_u),
                       self._mlp(self.item_embedding, p_i)], dim=-1)
        x = self._mlp(self.rec, self.mem_layer(x))
        return self.output(x).squeeze(-1)

    def default_fast_parameters(self) -> list[str]:
        return ["user_embedding.*", "item_embedding.*", "mem_layer.*", "rec.*", "output.*"]

    def encoder_parameters(self) -> list[str]:
        return ["tables.*"]

    def head_parameters(self) -> list[str]:
        return ["output.*"]
