"""Transformer backbone over user histories (the BST / SASRec family: Chen et al., DLP-KDD 2019,
"Behavior Sequence Transformer for E-commerce Recommendation in Alibaba"; Kang and McAuley,
ICDM 2018, "Self-Attentive Sequential Recommendation").

Each slot (a candidate item to score) comes with the user's history as it was before the slot
(``history.*`` keys, produced by the data module when ``data.history_length`` is set):

- every history entry is a token: item id embedding + item feature embeddings + an embedding of
  its rating / implicit label + a position embedding by recency (0 = the most recent);
- a learned *empty* token is always prepended, so a slot with no history at all still attends
  to something (no all-masked softmax, no NaN) and the encoding is a learned default;
- ``layers`` pre-norm Transformer blocks (multi-head self-attention and a feed-forward network,
  written with plain ``nn.Linear``/``nn.LayerNorm`` so they run under ``torch.func.vmap`` and
  ``functional_call`` with any leading dimensions);
- target attention: the candidate item attends to the encoded history;
- ``[candidate, attended history, user features]`` -> MLP ``scorer`` -> linear ``output``.

``attention: causal`` (SASRec-style) instead encodes the task's events *once*, as one sequence
with a causal mask, and each slot reads the encoded state at its place in it (the candidate does
not attend to the history); see :meth:`Transformer.encode` and docs/backbones.md.

Fast by default: the scorer MLP and the output layer (small); every embedding and the attention
layers are slow. Since the scorer's input depends only on slow parameters, the backbone declares
an encoder (``encoder_parameters``): the inner loop encodes each task once. ``lora_rank`` puts
LoRA adapters on the linear layers named by ``lora_targets`` and makes them the fast parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from metarec import (
    ENCODED,
    Backbone,
    DataSchema,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitFraction,
)
from metarec_plugins.backbones.feature_tables import FeatureEmbeddings
from metarec_plugins.backbones.lora import add_lora
from metarec_plugins.backbones.twotower import mlp, mlp_head

HISTORY_KEYS = ("history.item_id", "history.label", "history.mask")
# The shared layout (``attention: causal``; EpisodeCollator with ``shared_history``): one
# sequence per task, broadcast over the slots, and each slot's place in it.
SEQUENCE_KEYS = ("history.seq.item_id", "history.seq.label", "history.seq.mask", "history.pos",
                 "history.window")
SHARED_PREFIXES = ("history.seq.", "history.pos", "history.window")


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               heads: int, dropout: float, training: bool,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention of ``q`` (M, Tq, D) over ``k``, ``v`` (M, Tk, D); ``mask`` (M, Tk)
    (the same keys for every query) or (M, Tq, Tk) (per query, e.g. causal) is True for the
    keys that may be attended (at least one per query); ``bias`` (M, heads, Tq, Tk) is added to
    the logits (relative positions)."""
    m, tq, d = q.shape
    tk = k.shape[1]
    split = lambda x, t: x.reshape(m, t, heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q, tq), split(k, tk), split(v, tk)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d // heads)  # (M, heads, Tq, Tk)
    if bias is not None:
        logits = logits + bias
    mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]
    logits = logits.masked_fill(~mask, float("-inf"))
    weights = F.dropout(logits.softmax(-1), dropout, training)
    return (weights @ v).transpose(1, 2).reshape(m, tq, d)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(_attention(q, k, v, mask, self.heads, self.dropout, self.training,
                                   bias))


class Block(nn.Module):
    """Pre-norm Transformer encoder block: ``x + attn(ln(x))``, then ``x + ffn(ln(x))``."""

    def __init__(self, dim: int, heads: int, dropout: float, ffn: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, ffn)
        self.ffn_out = nn.Linear(ffn, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + F.dropout(self.attn(self.norm1(x), mask, bias), self.dropout, self.training)
        h = self.ffn_out(F.dropout(F.gelu(self.ffn_in(self.norm2(x))), self.dropout,
                                   self.training))
        return x + F.dropout(h, self.dropout, self.training)


class TargetAttention(nn.Module):
    """The candidate item (query) attends to the encoded history tokens (keys, values)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, target: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(tokens).chunk(2, dim=-1)
        h = _attention(self.q(target)[:, None, :], k, v, mask, self.heads, self.dropout,
                       self.training)
        return self.out(h[:, 0])

    def shared(self, target: torch.Tensor, tokens: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for ``M`` candidates ``(M, D)`` that share one history: ``tokens``
        ``(T, D)`` and ``mask`` ``(T,)`` are projected once, and every candidate attends to them
        in one batched product (no dropout: only used when it is off)."""
        m, d = target.shape
        dh = d // self.heads
        k, v = self.kv(tokens).chunk(2, dim=-1)
        q = self.q(target).reshape(m, self.heads, dh)  # (M, heads, dh)
        k = k.reshape(-1, self.heads, dh).transpose(0, 1)  # (heads, T, dh)
        v = v.reshape(-1, self.heads, dh).transpose(0, 1)
        logits = (q.transpose(0, 1) @ k.transpose(-1, -2)) / math.sqrt(dh)  # (heads, M, T)
        logits = logits.masked_fill(~mask, float("-inf"))
        h = (logits.softmax(-1) @ v).transpose(0, 1).reshape(m, d)  # (M, D)
        return self.out(h)


class Transformer(Backbone):
    """Sequential recommender: self-attention over the slot's history + target attention
    (``attention: target``, the default), or one causal encoding of the task's events that every
    slot reads at its place (``attention: causal``, SASRec-style).

    Needs ``history.*`` keys in every batch: set ``data.history_length`` (the backbone reads
    whatever history width it is given).

    Args:
        schema: the data schema (provided by the framework).
        dim: model width (every embedding, every token).
        layers: self-attention blocks over the history.
        heads: attention heads (must divide ``dim``).
        ffn: hidden width of each block's feed-forward network (default ``4 * dim``).
        dropout: dropout in attention and blocks.
        scorer_hidden: hidden widths of the scorer MLP (fast by default).
        max_positions: size of the recency position table (target attention) or of each
            layer's relative-distance bias table (causal); older entries share the last row.
        use_item_features: add item feature embeddings to item ids (candidate and history).
        use_user_features: feed the user's feature embeddings to the scorer.
        lora_rank: when set, LoRA adapters of this rank on the ``lora_targets`` linear layers
            become the fast parameters (all base weights slow).
        lora_alpha: adapter scale numerator (default: the rank).
        lora_targets: ``fnmatch`` patterns of the linear layers to adapt.
        sparse_item_gradients: give the item-id table a sparse gradient (only the rows a
            batch reads), for large vocabularies; the outer optimiser must accept sparse
            gradients (``metarec.optim.LazyAdam``; ``torch.optim.Adam`` does not: checked when
            the recipe is parsed); gradient clipping handles them
            (``metarec.optim.clip_gradients``).
        attention: ``target`` (each slot's history encoded on its own, the candidate attends
            to it) or ``causal`` (the task's events encoded once with a causal mask; a slot
            reads the state after its latest history event; the data module then builds the
            shared layout, ``history.seq.*`` and ``history.pos``). Both score a slot from
            exactly the events of its history (the latest ``history_length`` support events
            strictly before it).
    """

    needs_history = True
    shared_history = False  # set per instance: True with attention: causal

    def __init__(self, schema: DataSchema, dim: PositiveInt = 32, layers: NonNegativeInt = 1,
                 heads: PositiveInt = 2, ffn: PositiveInt | None = None,
                 dropout: UnitFraction = 0.0, scorer_hidden: Sequence[PositiveInt] = (64,),
                 max_positions: PositiveInt = 128,
                 use_item_features: bool = True, use_user_features: bool = True,
                 lora_rank: PositiveInt | None = None, lora_alpha: PositiveFloat | None = None,
                 lora_targets: Sequence[str] = ("scorer.*", "output"),
                 sparse_item_gradients: bool = False,
                 attention: Literal["target", "causal"] = "target") -> None:
        super().__init__(schema)
        if dim < 1 or layers < 0 or heads < 1 or dim % heads:
            raise ValueError(f"need dim >= 1, layers >= 0 and heads dividing dim; got dim={dim}, "
                             f"layers={layers}, heads={heads}")
        if not 0.0 <= dropout < 1.0 or max_positions < 1 or min([*scorer_hidden, 1]) < 1:
            raise ValueError("need 0 <= dropout < 1, max_positions >= 1, scorer widths >= 1")
        if attention not in ("target", "causal"):
            raise ValueError(f"attention must be 'target' or 'causal', got {attention!r}")
        self.dim, self.max_positions, self.attention = dim, max_positions, attention
        self.layers = layers
        self.shared_history = attention == "causal"
        self.item_embedding = nn.Embedding(schema.num_items, dim, sparse=sparse_item_gradients)
        self.item_features = FeatureEmbeddings(schema.of("item") if use_item_features else [],
                                               dim)
        self.user_features = FeatureEmbeddings(schema.of("user") if use_user_features else [],
                                               dim)
        explicit = schema.feedback == "explicit" and schema.rating_range is not None
        lo, hi = schema.rating_range if explicit else (0.0, 1.0)
        self.label_center, self.label_scale = (lo + hi) / 2, max((hi - lo) / 2, 1e-6)
        self.label_embedding = nn.Linear(1, dim)
        if attention == "target":
            self.position = nn.Embedding(max_positions, dim)
        else:  # per layer and head, a learned logit bias by distance (0: the query itself)
            self.relative = nn.Parameter(torch.zeros(layers, heads, max_positions))
        self.empty = nn.Parameter(torch.randn(dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout, ffn or 4 * dim)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        if attention == "target":
            self.target = TargetAttention(dim, heads, dropout)
        width = dim * (2 + int(bool(self.user_features.specs)))
        self.scorer, width = mlp(width, scorer_hidden)
        self.output = nn.Linear(width, 1)
        nn.init.normal_(self.item_embedding.weight, std=0.1)
        nn.init.constant_(self.output.bias, (lo + hi) / 2 if explicit else 0.0)
        self._fast = (add_lora(self, list(lora_targets), lora_rank, lora_alpha)
                      if lora_rank is not None
                      else ["scorer.*", "output.*"] if scorer_hidden else ["output.*"])

    # -- pieces ---------------------------------------------------------------------------
    def items(self, features: Mapping[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        """Item vectors: id embedding + the item's feature embeddings."""
        ids = features[f"{prefix}item_id"]
        out = self.item_embedding(ids)
        if self.item_features.specs:
            feats = {s.key: features[f"{prefix}{s.key}"] for s in self.item_features.specs}
            for e in self.item_features(feats):
                out = out + e
        return out

    def _events(self, events: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """History tokens before position information: item vector + label embedding."""
        tokens = self.items(events)
        label = ((events["label"].to(tokens.dtype) - self.label_center) / self.label_scale)
        return tokens + self.label_embedding(label[..., None])

    def encode(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The scorer's input ``(*lead, width)``: candidate, history state, user features
        (the attended history with target attention; the causal state before the slot with
        causal attention)."""
        missing = [k for k in HISTORY_KEYS if k not in features]
        if missing and not (self.attention == "causal"
                            and all(k in features for k in SEQUENCE_KEYS)):
            raise self._missing(missing)
        lead = features["item_id"].shape
        flat = lambda x: x.reshape(-1, *x.shape[len(lead):])  # noqa: E731
        candidate = flat(self.items(features))  # (M, D)
        state = (self._causal_state(features, lead) if self.attention == "causal"
                 else self._target_state(features, lead, candidate))
        parts = [candidate, state]
        if self.user_features.specs:
            users = sum(self.user_features({s.key: flat(features[s.key])
                                            for s in self.user_features.specs}))
            parts.append(users)
        return torch.cat(parts, dim=-1).reshape(*lead, -1)

    def _missing(self, keys: Sequence[str]) -> ValueError:
        return ValueError(
            f"the transformer backbone scores a slot from the user's history, but the batch "
            f"has no {list(keys)}: set data.history_length (e.g. `--data.history_length 20` or "
            f"`data: {{history_length: 20}}` in the recipe)")

    @staticmethod
    def _slot_history(features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The per-slot ``history.*`` inputs (not the shared layout's)."""
        return {k: v for k, v in features.items()
                if k.startswith("history.") and not k.startswith(SHARED_PREFIXES)}

    def _target_state(self, features: Mapping[str, torch.Tensor], lead: torch.Size,
                      candidate: torch.Tensor) -> torch.Tensor:
        """Target attention: each slot's history encoded on its own, the candidate attends."""
        flat = lambda x: x.reshape(-1, *x.shape[len(lead):])  # noqa: E731
        slots = self._slot_history(features)
        h = features["history.mask"].shape[-1]
        hist = {k[len("history."):]: flat(v) for k, v in slots.items()}
        shared = self._shared_history(slots, len(lead))
        if shared:  # one history for every slot (recommend): encode it once
            hist = {k: v[:1] for k, v in hist.items()}
        mask = hist["mask"]  # (M, H), or (1, H) when shared
        tokens = self._events(hist)  # (M, H, D)
        # Recency: 0 for the most recent real entry (entries are oldest first, padding last).
        count = mask.sum(-1, keepdim=True)
        recency = (count - 1 - torch.arange(h, device=mask.device)).clamp(0, self.max_positions - 1)
        tokens = tokens + self.position(recency)
        m = tokens.shape[0]
        tokens = torch.cat([self.empty.expand(m, 1, -1), tokens], dim=1)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        for block in self.blocks:
            tokens = block(tokens, mask)
        tokens = self.norm(tokens)
        return (self.target.shared(candidate, tokens[0], mask[0]) if shared
                else self.target(candidate, tokens, mask))

    def _causal_state(self, features: Mapping[str, torch.Tensor],
                      lead: torch.Size) -> torch.Tensor:
        """Causal attention: the state ``(M, D)`` each slot reads.

        Shared layout (``history.seq.*`` ``(*lead, S, ...)``, the task's support events oldest
        first and the same in every slot; ``history.pos`` ``(*lead)``, how many of them precede
        the slot; ``history.window`` ``(*lead)``, the history length ``H``): the sequence of
        each task is encoded once and slot ``j`` reads position ``pos_j`` (0: the empty token).
        Per-slot layout (``history.*``, as ``metarec.Adapter`` builds it, or a collator without
        ``shared_history``): each slot's own history is encoded with the same causal encoder
        (``H`` = its width) and read after its latest entry. The two are equal
        (tests/test_transformer_causal.py)."""
        d = self.dim
        if all(k in features for k in SEQUENCE_KEYS):
            slot_dim = len(lead) - 1
            # The task's sequence is broadcast over its slots: read it from the first slot.
            first = lambda v: v.select(slot_dim, 0)  # noqa: E731
            seq = {k[len("history.seq."):]: first(v).reshape(-1, *v.shape[len(lead):])
                   for k, v in features.items() if k.startswith("history.seq.")}
            window = first(features["history.window"]).reshape(-1)  # (G,)
            pos = features["history.pos"].reshape(-1, lead[-1])  # (G, N)
            states = self._encode_causal(seq, window)  # (G, 1 + S, D)
            read = states.gather(1, pos[..., None].expand(-1, -1, d))  # (G, N, D)
            return read.reshape(-1, d)
        flat = lambda x: x.reshape(-1, *x.shape[len(lead):])  # noqa: E731
        slots = self._slot_history(features)
        hist = {k[len("history."):]: flat(v) for k, v in slots.items()}
        shared = self._shared_history(slots, len(lead))
        if shared:  # one history for every slot (recommend): encode it once
            hist = {k: v[:1] for k, v in hist.items()}
        mask = hist["mask"]  # (M, H), oldest first, padding last
        window = torch.full(mask.shape[:1], mask.shape[-1], dtype=torch.long,
                            device=mask.device)
        states = self._encode_causal(hist, window)  # (M, 1 + H, D)
        count = mask.sum(-1)  # the latest entry's position (0: none, the empty token)
        read = states.gather(1, count[:, None, None].expand(-1, 1, d))[:, 0]
        if shared:
            read = read.expand(features["item_id"].numel(), d)
        return read

    def _encode_causal(self, events: Mapping[str, torch.Tensor],
                       window: torch.Tensor) -> torch.Tensor:
        """Causal encoding ``(G, 1 + S, D)`` of ``G`` event sequences ``(G, S)`` (oldest first,
        padding last), after a learned empty token at position 0.

        Position ``i`` attends to the empty token and to the real events among the latest
        ``w`` up to itself (``i - w < k <= i``), with ``w = (H - 1) // layers + 1`` for history
        length ``H`` (``window``, per sequence): after ``layers`` blocks the state at ``i``
        depends on at most the latest ``H`` events, and exactly as it would if only those were
        encoded, so a shared sequence gives each slot the same state as its own history.
        Positions enter as a learned per-layer, per-head logit bias by distance ``i - k``
        (recency from the reading position; none for the empty token): the encoding is
        translation invariant, hence the same for a slot's history alone."""
        mask = events["mask"]
        g = mask.shape[0]
        tokens = self._events(events)  # (G, S, D)
        tokens = torch.cat([self.empty.expand(g, 1, -1), tokens], dim=1)
        t = tokens.shape[1]
        index = torch.arange(t, device=mask.device)
        distance = index[:, None] - index[None, :]  # (T, T): query - key
        keys = torch.cat([mask.new_ones(g, 1), mask], dim=1)  # (G, T)
        w = (window - 1) // max(self.layers, 1) + 1  # (G,)
        visible = (distance >= 0) & (distance < w[:, None, None]) & keys[:, None, :]
        visible = visible | (index == 0)  # the empty token: visible from every position
        relative = distance.clamp(0, self.max_positions - 1)
        events_only = (index != 0).to(tokens.dtype)  # no bias towards the empty token
        for layer, block in enumerate(self.blocks):
            bias = self.relative[layer][:, relative] * events_only  # (heads, T, T)
            tokens = block(tokens, visible, bias.expand(g, *bias.shape))
        return self.norm(tokens)

    def _shared_history(self, features: Mapping[str, torch.Tensor], lead: int) -> bool:
        """Whether every slot provably has the same history: each ``history.*`` input is
        broadcast over the slots (stride 0 on every leading dim, as ``UserSession.recommend``
        builds it with ``expand``), outside ``vmap``, and dropout is off. Then the history is
        encoded once and all candidates attend to it in one batched pass; the scores are the
        same as slot by slot."""
        if self.training and any(
                getattr(m, "dropout", 0.0) for m in self.modules() if m is not self):
            return False
        values = [v for k, v in features.items() if k.startswith("history.")]
        if not values or values[0].ndim <= lead or values[0][..., 0].numel() <= 1:
            return False
        try:
            return all(all(v.stride(i) == 0 for i in range(lead)) for v in values)
        except RuntimeError:  # a batched tensor under vmap has no strides to query
            return False

    # -- Backbone -------------------------------------------------------------------------
    def forward(self, features: Mapping[str, torch.Tensor],
                encode_only: bool = False) -> torch.Tensor:
        x = features[ENCODED] if ENCODED in features else self.encode(features)
        if encode_only:
            return x
        return self.output(self.scorer(x)).squeeze(-1)

    def functional_forward(self, params: Mapping[str, torch.Tensor],
                           features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`forward` as a pure function of a parameter dict, for a batch that carries its
        encoding (``features[ENCODED]``, what the inner loop and the guard score): the scorer
        and output layer by ``torch.nn.functional`` ops (:func:`mlp_head`), without
        ``functional_call`` re-binding every parameter of the encoder (most of a deployed
        user's adaptation time). ``NotImplemented`` otherwise (no encoding: the full encoder
        runs through ``functional_call``; a LoRA-wrapped head). No ``encode_only``: the
        history encoder has no pure form, so ``prepare`` encodes through ``functional_call``."""
        if ENCODED not in features:
            return NotImplemented
        scores = mlp_head(self.scorer, self.output, "scorer.", "output.", params,
                          features[ENCODED])
        return NotImplemented if scores is None else scores

    def default_fast_parameters(self) -> list[str]:
        return list(self._fast)

    def head_parameters(self) -> list[str]:
        if type(self.output) is nn.Linear:
            return ["output.*"]
        return ["output.lora_A", "output.lora_B"]

    def encoder_parameters(self) -> list[str]:
        """Everything but the scorer and the output layer (what ``encode`` uses)."""
        return [f"{name}.*" for name, _ in self.named_children()
                if name not in ("scorer", "output")] + [
                    name for name, _ in self.named_parameters(recurse=False)]
