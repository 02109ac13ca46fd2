"""MeLU backbone (Lee et al., KDD 2019: "MeLU: Meta-Learned User Preference Estimator").

User and item side information is embedded (one table per categorical feature; multi-hot
features such as genres are the mean of their category embeddings, given as 0/1 vectors or as
bags of category ids: :mod:`metarec_plugins.backbones.feature_tables`), the user and item
embeddings are concatenated and passed through the *decision layers* (an MLP) and a linear
*output layer*. As in the paper, only the decision and output layers adapt per task (fast);
the embeddings are global (slow). Optional id embeddings (``use_ids``) are slow as well.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metarec import ENCODED, Backbone, DataSchema, PositiveInt
from metarec_plugins.backbones.feature_tables import embed_features, feature_tables
from metarec_plugins.backbones.twotower import mlp_head


class MeLU(Backbone):
    """MeLU: feature embeddings -> decision layers -> output.

    Args:
        schema: the data schema (provided by the framework).
        embedding_dim: width of every feature embedding (paper: 32).
        hidden: widths of the decision layers (paper: 64, 64).
        use_ids: also embed the user and item ids (slow parameters).
    """

    def __init__(self, schema: DataSchema, embedding_dim: PositiveInt = 32,
                 hidden: Sequence[PositiveInt] = (64, 64), use_ids: bool = False) -> None:
        super().__init__(schema)
        if embedding_dim < 1 or not hidden or min(hidden) < 1:
            raise ValueError("embedding_dim and every hidden width must be >= 1")
        self.specs = list(schema.features)
        if not self.specs and not use_ids:
            raise ValueError("MeLU needs user/item features or use_ids=True")
        self.embeddings = feature_tables(self.specs, embedding_dim)
        self.use_ids = use_ids
        if use_ids:
            self.user_embedding = nn.Embedding(schema.num_users, embedding_dim)
            self.item_embedding = nn.Embedding(schema.num_items, embedding_dim)
        width = embedding_dim * (len(self.specs) + 2 * int(use_ids))
        layers: list[nn.Module] = []
        for i, h in enumerate(hidden):
            layers += [nn.Linear(width if i == 0 else hidden[i - 1], h), nn.ReLU()]
        self.decision = nn.Sequential(*layers)
        self.output = nn.Linear(hidden[-1], 1)
        if schema.feedback == "explicit" and schema.rating_range is not None:
            # Start at the middle of the rating scale rather than at 0.
            nn.init.constant_(self.output.bias, sum(schema.rating_range) / 2)

    def forward(self, features: Mapping[str, torch.Tensor],
                encode_only: bool = False) -> torch.Tensor:
        h = features[ENCODED] if ENCODED in features else self.encode(features)
        if encode_only:
            return h
        return self.output(self.decision(h)).squeeze(-1)

    def encode(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The concatenated user and item embeddings (slow parameters only)."""
        parts = embed_features(self.embeddings, self.specs, features)
        if self.use_ids:
            parts += [self.user_embedding(features["user_id"]),
                      self.item_embedding(features["item_id"])]
        return torch.cat(parts, dim=-1)

    def functional_forward(self, params: Mapping[str, torch.Tensor],
                           features: Mapping[str, torch.Tensor],
                           encode_only: bool = False) -> torch.Tensor:
        """:meth:`forward` as a pure function of a parameter dict ``{name: tensor}`` (every
        parameter; with ``encode_only``, the encoder's suffice), with ``torch.nn.functional``
        ops only: the fast path that :meth:`metarec.FunctionalModel.predict` and ``prepare``
        take, which skips ``functional_call``'s re-binding of the module's parameters (most of
        the cost of one small forward pass). Bit-identical to
        ``functional_call(self, params, (features,), {"encode_only": encode_only})``. Returns
        ``NotImplemented`` (use ``functional_call``) when a layer is not the plain one it
        expects, e.g. wrapped by LoRA."""
        if ENCODED in features:
            h = features[ENCODED]
        else:
            parts = embed_features(self.embeddings, self.specs, features, params, "embeddings.")
            if parts is None:
                return NotImplemented
            if self.use_ids:
                parts += [F.embedding(features["user_id"], params["user_embedding.weight"]),
                          F.embedding(features["item_id"], params["item_embedding.weight"])]
            h = torch.cat(parts, dim=-1)
        if encode_only:
            return h
        scores = mlp_head(self.decision, self.output, "decision.", "output.", params, h)
        return NotImplemented if scores is None else scores

    def default_fast_parameters(self) -> list[str]:
        return ["decision.*", "output.*"]

    def head_parameters(self) -> list[str]:
        return ["output.*"]

    def encoder_parameters(self) -> list[str]:
        return ["embeddings.*", "user_embedding.*", "item_embedding.*"]
