"""MAMO (Dong et al., KDD 2020: "MAMO: Memory-Augmented Meta-Optimization for Cold-start
Recommendation"): MAML whose start is personalised by two memories.

A user's profile ``p_u`` (its feature embeddings, the backbone's ``user_profile``) reads the
*feature-specific memory*: attention ``a_u = softmax(cos(p_u, M_P))`` over ``K`` profile slots
``M_P``, then

* the personalised bias ``b_u = a_u^T M_U`` (``M_U`` holds, per slot, a vector as long as the
  personalised parameters ``theta_u``) gives the user's start ``theta_u = phi_u - tau * b_u``;
* the *task-specific memory* ``M_{U,I}`` (``K`` copies of the memory layer's weight) gives the
  user's fast weights ``M_{u,I} = a_u^T M_{U,I}``, the memory layer's start.

From that start the usual local update (the MAML inner loop) adapts the fast parameters on the
support set and the global update differentiates the query loss (the outer loss). The memories
are not trained by gradient: after each meta-training batch they are written

* ``M_P   <- alpha * a_u p_u^T            + (1 - alpha) * M_P``,
* ``M_U   <- beta  * a_u grad_{theta_u}^T + (1 - beta)  * M_U``  (the query-loss gradient of
  the adapted ``theta_u``, as the authors' code writes it),
* ``M_{U,I} <- gamma * a_u (x) M_{u,I}'   + (1 - gamma) * M_{U,I}`` (``M_{u,I}'``: the memory
  layer's weight after the local update),

one user after another in batch order (:func:`sequential_write`). Evaluation and adaptation only
read them, so evaluating twice gives the same numbers.

Departures, all for batching: every user of a batch reads the memories as they were before the
batch (the authors update after each user, so later users in a batch read earlier users'
writes; the writes themselves are the same sequence); the attention is the paper's softmax of
cosine similarities (the authors' code also passes them through a linear layer that it
re-initialises at random on every read); the task memory's slots start as independent draws of
the memory layer's own initialisation (the authors' draw N(0, 1) entries, which for a 200-wide
layer scales activations by ~14).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from metarec import (
    EpisodeBatch,
    FeatureBatch,
    FunctionalModel,
    NonNegativeInt,
    Params,
    PositiveFloat,
    PositiveInt,
    UnitFraction,
    select_parameters,
)
from metarec_plugins.algorithms.maml import MAML


def memory_attention(profile: torch.Tensor, keys: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``softmax_k cos(profile, keys[k])``: attention of one profile ``(d,)`` over ``(K, d)``."""
    return F.softmax(F.cosine_similarity(profile[None], keys, dim=-1, eps=eps), dim=-1)


def sequential_write(memory: torch.Tensor, attention: torch.Tensor, values: torch.Tensor,
                     rate: float) -> torch.Tensor:
    """The memory after writing ``B`` users in order: ``M <- rate * a_b (x) v_b + (1 - rate) * M``
    for ``b = 1..B``, in closed form (``memory`` ``(K, *shape)``, ``attention`` ``(B, K)``,
    ``values`` ``(B, *shape)``): ``(1-rate)^B M + sum_b rate (1-rate)^(B-b) a_b (x) v_b``."""
    b = attention.shape[0]
    keep = 1.0 - rate
    weights = rate * keep ** torch.arange(b - 1, -1, -1, dtype=memory.dtype, device=memory.device)
    written = torch.einsum("b,bk,bv->kv", weights, attention.to(memory.dtype),
                           values.reshape(b, -1).to(memory.dtype))
    return keep ** b * memory + written.reshape(memory.shape)


class MAMO(MAML):
    """MAML from a memory-personalised start (see the module docstring).

    Args:
        inner_steps: local-update steps per user (authors' code: 3 passes).
        inner_lr: local learning rate ``rho`` (paper: 0.01).
        memory_size: ``K``, the number of memory slots (paper: 3).
        tau: scale of the personalised bias in ``theta_u = phi_u - tau * b_u`` (paper: 0.01).
        alpha: write rate of the profile memory ``M_P`` (paper: 0.5).
        beta: write rate of the bias memory ``M_U`` (paper: 0.05).
        gamma: write rate of the task memory ``M_{U,I}`` (paper: 0.1).
        personalised: patterns of ``theta_u``, the parameters the bias memory personalises
            (default: the backbone's user embedding network).
        fast_weights: the parameter the task memory initialises (default: the memory layer).
        grad_clip: the global L2 norm every local-update gradient and every gradient written
            to ``M_U`` is clipped to (the authors' code clips both at 5; None: off). Without it
            the bias memory can feed back on itself: a large written gradient makes a worse
            start, whose gradient is larger still (seen on ml-100k: a non-finite start after
            ~300 steps).
        first_order: first-order meta-gradient.
        fast_parameters: patterns overriding the backbone's fast parameters.
    """

    def __init__(self, inner_steps: NonNegativeInt = 3, inner_lr: PositiveFloat = 0.01,
                 memory_size: PositiveInt = 3, tau: PositiveFloat = 0.01,
                 alpha: UnitFraction = 0.5, beta: UnitFraction = 0.05,
                 gamma: UnitFraction = 0.1,
                 personalised: Sequence[str] = ("user_embedding.*",),
                 fast_weights: str | None = "mem_layer.weight",
                 grad_clip: PositiveFloat | None = 5.0,
                 first_order: bool = False,
                 fast_parameters: Sequence[str] | None = None) -> None:
        super().__init__(inner_steps, inner_lr, first_order=first_order,
                         fast_parameters=fast_parameters, inner_grad_clip=grad_clip)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        for name, rate in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if not 0.0 < rate <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {rate}")
        if memory_size < 1 or tau <= 0:
            raise ValueError(f"memory_size must be >= 1 and tau > 0, got {memory_size}, {tau}")
        self.memory_size, self.tau = int(memory_size), float(tau)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.personalised_patterns = list(personalised)
        self.fast_weights = fast_weights
        self.personalised: list[str] = []  # filled by bind()

    # -- memories --------------------------------------------------------------------------
    def bind(self, model: FunctionalModel) -> None:
        super().bind(model)
        backbone = model.backbone
        if not callable(getattr(backbone, "user_profile", None)):
            raise ValueError(f"mamo reads its memories with the user profile: the "
                             f"{type(backbone).__name__} backbone has no user_profile(features) "
                             "method (use the mamo backbone)")
        fast, _ = model.split()
        chosen = select_parameters(backbone, self.personalised_patterns)
        self.personalised = [n for n in chosen if n in fast]
        if not self.personalised:
            raise ValueError(f"mamo: personalised={self.personalised_patterns} matches no fast "
                             f"parameter; the fast parameters are {sorted(fast)}")
        if self.fast_weights is not None and self.fast_weights not in fast:
            raise ValueError(f"mamo: fast_weights={self.fast_weights!r} is not a fast parameter; "
                             f"the fast parameters are {sorted(fast)}")
        k = self.memory_size
        ref = fast[self.personalised[0]]
        size = sum(fast[n].numel() for n in self.personalised)
        dim = int(backbone.profile_dim)
        gen = torch.Generator().manual_seed(0)  # the memories' own draw: seeds nothing else
        self.register_buffer("profile_memory",
                             torch.randn(k, dim, generator=gen).to(ref))
        self.register_buffer("bias_memory",
                             (0.05 * torch.randn(k, size, generator=gen)).to(ref))
        if self.fast_weights is not None:
            weight = fast[self.fast_weights]
            bound = 1.0 / math.sqrt(weight.shape[-1])  # nn.Linear's default initialisation
            slots = (torch.rand(k, *weight.shape, generator=gen) * 2 - 1) * bound
            self.register_buffer("task_memory", slots.to(weight))

    def read(self, model: FunctionalModel, fast: Params, slow: Params,
             support: FeatureBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One user's ``(p_u, a_u)``: its profile (from the first support row; every row of a
        task carries the same user features) and its attention over the profile memory."""
        row = {k: v[0] for k, v in support.items()}
        profile = model.call("user_profile", fast, slow, row)
        return profile, memory_attention(profile, self.profile_memory)

    def personal_start(self, fast: Params, attention: torch.Tensor) -> Params:
        """``phi_u - tau * a_u^T M_U`` for ``theta_u`` and ``a_u^T M_{U,I}`` for the fast
        weights; the other fast parameters start at the shared ``phi``."""
        start = dict(fast)
        bias = attention @ self.bias_memory
        at = 0
        for name in self.personalised:
            n = fast[name].numel()
            start[name] = fast[name] - self.tau * bias[at:at + n].view_as(fast[name])
            at += n
        if self.fast_weights is not None:
            start[self.fast_weights] = torch.tensordot(attention, self.task_memory, dims=1)
        return start

    def task_start(self, model: FunctionalModel, fast: Params, slow: Params,
                   support: FeatureBatch) -> Params:
        _, attention = self.read(model, fast, slow, support)
        return self.personal_start(fast, attention)

    # -- meta-training ---------------------------------------------------------------------
    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fast, slow = model.split()
        first_order = self.first_order_now()
        optimizer = self.inner_optimizer()

        def one_user(support: FeatureBatch, query: FeatureBatch):
            profile, attention = self.read(model, fast, slow, support)
            start = self.personal_start(fast, attention)
            adapted = model.adapt(start, slow, support, self.inner_steps, optimizer,
                                  first_order=first_order)
            loss = model.loss(adapted, slow, query)
            # What the memories are written with (no gradient flows into them).
            theta = {k: v.detach() for k, v in adapted.items()}
            grads = grad(lambda f: model.loss(f, slow, query))(theta)
            written = torch.cat([grads[n].reshape(-1) for n in self.personalised])
            if self.grad_clip is not None:  # as the authors' clip_grad_norm_(..., 5.)
                written = written * (self.grad_clip / written.norm().clamp_min(1e-12)).clamp(max=1.0)
            weights = (theta[self.fast_weights] if self.fast_weights is not None
                       else torch.zeros(()))
            return loss, profile.detach(), attention.detach(), written, weights

        losses, profiles, attention, written, weights = vmap(
            one_user, randomness="different")(batch.support, batch.query)
        if self.training:  # evaluation never writes
            with torch.no_grad():
                self.profile_memory = sequential_write(self.profile_memory, attention,
                                                       profiles, self.alpha)
                self.bias_memory = sequential_write(self.bias_memory, attention, written,
                                                    self.beta)
                if self.fast_weights is not None:
                    self.task_memory = sequential_write(self.task_memory, attention, weights,
                                                        self.gamma)
        entropy = -(attention * attention.clamp_min(1e-12).log()).sum(-1).mean()
        return losses.mean(), {"memory_attention_entropy": entropy}

