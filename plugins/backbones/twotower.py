"""Two-tower backbone (dual encoder; Covington et al., RecSys 2016 "Deep Neural Networks for
YouTube Recommendations"; Yi et al., RecSys 2019 "Sampling-Bias-Corrected Neural Modeling for
Large Corpus Item Recommendations").

A *user tower* encodes the user's side information (one embedding per feature, optionally a
user id embedding) with an MLP into a vector ``u``; an *item tower* encodes the item's features
and (by default) its id into ``v``. The scorer is either

- ``dot``: ``score = b + u_b + v_b + <u, v>``, where each tower emits one extra coordinate used
  as its bias (``u_b``, ``v_b``) and ``b`` is a global bias starting at the middle of the
  rating scale (explicit feedback) or 0 (implicit), so ratings on a 1-5 scale come out directly;
- ``mlp``: an MLP on ``[u, v]`` (its output bias starts at the middle of the rating scale).

Fast by default: the last layer of the user tower (``user_tower.out``). With the dot scorer
the score is linear in that layer's output, so adapting it moves the task user's vector and
bias, as the user row of matrix factorisation would, from a starting point that the features
of the user already personalise. Everything else (all embeddings, the item tower, the rest of
the user tower, the scorer) is slow.

``lora_rank`` puts LoRA adapters (:mod:`metarec_plugins.backbones.lora`) on the linear layers
named by ``lora_targets``; the fast parameters are then exactly the adapter tensors.

Pooled interaction history in the user tower is not implemented: a task's user is described by
its features only (the sequential ``transformer`` backbone is the history model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metarec import Backbone, DataSchema, FeatureSpec, PositiveFloat, PositiveInt
from metarec_plugins.backbones.feature_tables import FeatureEmbeddings
from metarec_plugins.backbones.lora import LoRALinear, add_lora


def mlp(width: int, hidden: Sequence[int]) -> tuple[nn.Sequential, int]:
    """``Linear -> ReLU`` per hidden width (empty: identity); returns it and its output width."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers), width


def mlp_head(body: nn.Sequential, out: nn.Module, body_prefix: str, out_prefix: str,
             params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor | None:
    """``out(body(x)).squeeze(-1)`` for an :func:`mlp` body and a linear ``out``, as a pure
    function of a parameter dict (``{body_prefix}{i}.weight``, ``{out_prefix}weight``, ...)
    with ``torch.nn.functional`` ops: what a backbone's ``functional_forward`` runs instead of
    ``functional_call``, whose re-binding of every module parameter costs far more than a small
    head. None when a layer is not a plain ``nn.Linear``/``nn.ReLU`` (e.g. wrapped by LoRA)."""
    layers = list(body._modules.values())  # (no Sequential slicing: it builds a module)
    if not (all(type(m) is nn.Linear for m in [*layers[0::2], out])
            and all(type(m) is nn.ReLU for m in layers[1::2])):
        return None
    h = x
    for i in range(0, len(layers), 2):
        h = F.relu(F.linear(h, params[f"{body_prefix}{i}.weight"], params[f"{body_prefix}{i}.bias"]))
    return F.linear(h, params[f"{out_prefix}weight"], params[f"{out_prefix}bias"]).squeeze(-1)


class Tower(nn.Module):
    """Feature (and optional id) embeddings -> MLP ``body`` -> linear ``out``.

    With no input at all (no features, no ids), the tower's input is a learned vector, so it
    still yields a learned (and, if fast, per-task adapted) representation.
    """

    def __init__(self, specs: Sequence[FeatureSpec], embedding_dim: int, hidden: Sequence[int],
                 out_dim: int, id_key: str, num_ids: int | None) -> None:
        super().__init__()
        self.embed = FeatureEmbeddings(specs, embedding_dim)
        self.id_key = id_key
        self.ids = nn.Embedding(num_ids, embedding_dim) if num_ids else None
        n_inputs = len(specs) + int(self.ids is not None)
        self.constant = None if n_inputs else nn.Parameter(torch.randn(embedding_dim))
        self.body, width = mlp(embedding_dim * max(n_inputs, 1), hidden)
        self.out = nn.Linear(width, out_dim)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = self.embed(features)
        if self.ids is not None:
            parts.append(self.ids(features[self.id_key]))
        if self.constant is not None:
            lead = features[self.id_key].shape
            parts.append(self.constant.expand(*lead, -1))
        return self.out(self.body(torch.cat(parts, dim=-1)))


class TwoTower(Backbone):
    """User tower x item tower, with a dot-product or MLP scorer.

    Args:
        schema: the data schema (provided by the framework).
        embedding_dim: width of every feature / id embedding.
        hidden: hidden widths of each tower's MLP (before its output layer; may be empty).
        dim: width of the tower outputs ``u`` and ``v``.
        scorer: ``dot`` (``b + u_b + v_b + <u, v>``) or ``mlp`` (MLP on ``[u, v]``).
        scorer_hidden: hidden widths of the ``mlp`` scorer.
        use_item_ids: embed the item id in the item tower (slow). Items are shared between
            meta-train and evaluation users, so ids help; features still carry rare items.
        use_user_ids: embed the user id in the user tower (slow). Off by default: evaluation
            users are never seen in meta-training, so their rows would be untrained.
        lora_rank: when set, LoRA adapters of this rank on the ``lora_targets`` layers become
            the fast parameters (all base weights slow).
        lora_alpha: adapter scale numerator (scale ``lora_alpha / lora_rank``; default rank).
        lora_targets: ``fnmatch`` patterns of the linear layers to adapt (default: every
            linear layer of the user tower).
    """

    def __init__(self, schema: DataSchema, embedding_dim: PositiveInt = 16,
                 hidden: Sequence[PositiveInt] = (64,), dim: PositiveInt = 32, scorer: str = "dot",
                 scorer_hidden: Sequence[PositiveInt] = (64,), use_item_ids: bool = True,
                 use_user_ids: bool = False, lora_rank: PositiveInt | None = None,
                 lora_alpha: PositiveFloat | None = None,
                 lora_targets: Sequence[str] = ("user_tower.*",)) -> None:
        super().__init__(schema)
        if scorer not in ("dot", "mlp"):
            raise ValueError(f"scorer must be 'dot' or 'mlp', got {scorer!r}")
        if embedding_dim < 1 or dim < 1 or min([*hidden, *scorer_hidden, 1]) < 1:
            raise ValueError("embedding_dim, dim and every hidden width must be >= 1")
        self.scorer_kind = scorer
        out = dim + 1 if scorer == "dot" else dim  # dot: the extra coordinate is the bias
        self.user_tower = Tower(schema.of("user"), embedding_dim, hidden, out, "user_id",
                                schema.num_users if use_user_ids else None)
        self.item_tower = Tower(schema.of("item"), embedding_dim, hidden, out, "item_id",
                                schema.num_items if use_item_ids else None)
        explicit = schema.feedback == "explicit" and schema.rating_range is not None
        start = sum(schema.rating_range) / 2 if explicit else 0.0
        if scorer == "dot":
            self.global_bias = nn.Parameter(torch.tensor(float(start)))
        else:
            self.scorer = nn.Module()
            self.scorer.body, width = mlp(2 * dim, scorer_hidden)
            self.scorer.out = nn.Linear(width, 1)
            nn.init.constant_(self.scorer.out.bias, start)
        self.lora_rank = lora_rank
        self._fast = (add_lora(self, list(lora_targets), lora_rank, lora_alpha)
                      if lora_rank is not None else ["user_tower.out.*"])

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        u, v = self.user_tower(features), self.item_tower(features)
        if self.scorer_kind == "dot":
            return self.global_bias + u[..., -1] + v[..., -1] + (u[..., :-1] * v[..., :-1]).sum(-1)
        return self.scorer.out(self.scorer.body(torch.cat([u, v], dim=-1))).squeeze(-1)

    def default_fast_parameters(self) -> list[str]:
        return list(self._fast)

    def head_parameters(self) -> list[str]:
        """ANIL's head: the user tower's output layer (dot scorer; the score is linear in it)
        or the scorer's output layer (mlp). Under LoRA, that layer's adapters if it has any."""
        name = "user_tower.out" if self.scorer_kind == "dot" else "scorer.out"
        layer = self.get_submodule(name)
        if isinstance(layer, LoRALinear):
            return [f"{name}.lora_A", f"{name}.lora_B"]
        return [f"{name}.*"]
