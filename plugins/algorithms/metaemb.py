"""Meta-Embedding (Pan, Li, Ao, Tang and He, SIGIR 2019: "Warm Up Cold-start Advertisements:
Improving CTR Predictions via Learning to Learn ID Embeddings").

A *generator* maps a new item's side information to the initial value of its id embedding; the
pretrained backbone is frozen and only the generator learns. For a training (old) item with two
batches of its interactions, ``a`` (the task's support: its first ratings in time order) and
``b`` (the query, the ratings after them):

    phi_init = g(x_i)                                   the generated id embedding
    L_a      = loss(phi_init; a)                        the cold-start loss
    phi'     = phi_init - lr * grad_phi L_a             one warm-up step on a
    L_b      = loss(phi'; b)                            the warm-up loss
    L        = alpha * L_a + (1 - alpha) * L_b          (the paper's Eq. 10; alpha = 0.1)

minimised over the generator's parameters only, through the warm-up step (second order).

With tasks per user (``task_by: user``) the same computation generates a new *user's* fast
parameters from the user's features (the paper's method applied to the other side).

In metarec the item's "id embedding" is the backbone's fast parameters (mf's item side:
``item_default`` and ``item_default_bias``, which with ``use_item_table`` stand for a new item's
own row; an old item's pretrained row ``T[i]`` is removed while the generator trains on it, so
training sees what a new item has). The generator is the task-conditioned start (:meth:`task_start`), so evaluation's cold
stage scores ``g(x_i)`` and the warm-up stages adapt it on the item's first ratings with this
algorithm's inner loop (``inner_steps`` steps of ``inner_lr``).

Generator: its own embeddings of the item's features (``embedding_dim`` each), concatenated, an
MLP (``hidden``), a linear output the size of the fast parameters, added to the backbone's
(frozen, pretrained) default: ``g(x) = phi_default + MLP(e(x))``, the output layer
zero-initialised so that training starts from the pretrained cold start. Departures: the paper's
generator reads the frozen backbone's own feature embeddings and ends in a scaled ``tanh``; a
backbone-independent generator needs its own embeddings, and the residual form keeps the scale
of the pretrained rows without a tuned ``tanh`` scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import vmap

from metarec import (
    EpisodeBatch,
    FeatureBatch,
    FunctionalModel,
    MetaAlgorithm,
    NonNegativeInt,
    Params,
    PositiveFloat,
    PositiveInt,
)
from metarec_plugins.algorithms.item_embedding import ItemFeatures, ItemIdEmbedding, freeze
from metarec_plugins.backbones.twotower import mlp


class MetaEmb(MetaAlgorithm):
    """Meta-Embedding: a generator of new items' id embeddings on a frozen backbone.

    Args:
        inner_steps: warm-up steps (the paper: 1, in training and at each warm-up stage).
        inner_lr: warm-up step size.
        alpha: weight of the cold-start loss ``L_a`` (the paper: 0.1).
        embedding_dim: width of the generator's feature embeddings.
        hidden: hidden widths of the generator's MLP.
        freeze_backbone: keep every backbone parameter fixed (the paper); off trains both.
        fast_parameters: patterns overriding the backbone's fast parameters (what is generated).
    """

    def __init__(self, inner_steps: NonNegativeInt = 1, inner_lr: PositiveFloat = 0.1,
                 alpha: float = 0.1, embedding_dim: PositiveInt = 8,
                 hidden: Sequence[PositiveInt] = (16,), freeze_backbone: bool = True,
                 fast_parameters: Sequence[str] | None = None) -> None:
        super().__init__(inner_steps, inner_lr, fast_parameters)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.embedding_dim, self.hidden = int(embedding_dim), [int(h) for h in hidden]
        self.freeze_backbone = bool(freeze_backbone)

    def bind(self, model: FunctionalModel) -> None:
        schema = model.backbone.schema
        side = "item" if getattr(schema, "task_by", "user") == "item" else "user"
        specs = schema.of(side)
        if not specs:
            raise ValueError(f"metaemb generates the task {side}'s embedding from its "
                             f"features: this data has no {side} features")
        # The task entity's id embedding (with mf's use_item_table, an old item's own trained
        # row removed: the generated embedding replaces it, as for a new item).
        self.ids = ItemIdEmbedding(model)
        self.features = ItemFeatures(specs, self.embedding_dim, "metaemb")
        self.body, width = mlp(self.features.width, self.hidden)
        self.out = nn.Linear(width, self.ids.size)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if self.freeze_backbone:
            freeze(model.backbone)

    def generate(self, support: FeatureBatch) -> dict[str, torch.Tensor]:
        """The generator's offsets ``MLP(e(x_i))`` of one task (its entity's features, read
        from the first slot: every slot of a task carries them, padding included)."""
        return self.ids.unflatten(self.out(self.body(self.features(support))))

    def task_start(self, model: FunctionalModel, fast: Params, slow: Params,
                   support: FeatureBatch) -> Params:
        """``phi_init = phi_default + g(x_i)``: the generated id embedding of the task's item
        (the fast values under which it is the item's whole id embedding)."""
        offsets = self.generate(support)
        generated = {k: v + offsets[k] if k in offsets else v for k, v in fast.items()}
        return self.ids.write(fast, slow, support, self.ids.flatten(generated))

    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fast, slow = model.split()

        def task_losses(support, query):
            start = self.task_start(model, fast, slow, support)
            cold = model.loss(start, slow, support)
            warm = model.loss(model.adapt(start, slow, support, self.inner_steps,
                                          self.inner_optimizer()), slow, query)
            return torch.stack([cold, warm])

        cold, warm = vmap(task_losses, randomness="different")(batch.support, batch.query).mean(0)
        loss = self.alpha * cold + (1.0 - self.alpha) * warm
        return loss, {"cold_loss": cold.detach(), "warm_loss": warm.detach()}
