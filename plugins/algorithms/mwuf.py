"""MWUF, the Meta Warm Up Framework (Zhu, Xie, Zhuang, Ge, Sun, Zhang, Lin and Cao, SIGIR 2021:
"Learning to Warm Up Cold Item Embeddings for Cold-start Recommendation with Meta Scaling and
Shifting Networks").

A new item's id embedding trained on its few ratings (the *cold* id embedding) fits the
pretrained model badly and is noisy. Two meta networks turn it into a *warm* one:

    e_cold = the item's id embedding after ``cold_steps`` SGD steps (``cold_lr``) of the
             backbone's loss on the item's ratings so far, from the new-item start e_0
             (the paper's L_cold update of the cold embedding, the backbone fixed)
    s_i    = 1 + h(x_i)                  Meta Scaling: from the item's side features x_i
    u_i    = mean of p_u over the users who rated the item so far (the backbone's user rows)
    t_i    = g(u_i) if any user, else 0  Meta Shifting: from the item's interacted users
    e_warm = s_i * e_cold + t_i          (elementwise)

scored by the frozen backbone. Training (the paper's L_warm, on old items): for each training
item, ``e_cold`` from its support (its first ratings in time order), ``e_warm`` as above, the loss
on its query (the ratings after them); only ``h`` and ``g`` (and their feature embeddings) learn.
Old items are made cold for it: ``e_0`` is the backbone's new-item start (mf's ``item_default``,
its own pretrained row ``T[i]`` removed), as the paper trains fresh cold embeddings of old items.

``e_warm`` is the task-conditioned start (:meth:`task_start`): at the cold stage (no rating)
``e_cold = e_0`` and no user, so only the scaling applies; at each warm-up stage the cold
embedding is trained on that stage's ratings and warmed with that stage's users. The
algorithm's own inner loop (``inner_steps``, default 0: the paper scores ``e_warm``) would
further fine-tune ``e_warm`` on the same ratings, as the CVAR authors' evaluation code does; in
training the query loss is then taken after those steps too.

Departures: ``h`` and ``g`` end in zero-initialised layers around the identity (``s = 1 + h``,
``t = g``), so training starts from the pretrained cold start; the paper's networks are plain
MLPs (the CVAR authors' code: ``Linear-ReLU-Linear``, uniform(-0.01, 0.01) init, i.e. a scale
near 0 at first). ``h`` reads its own embeddings of the item features, not the backbone's (a
backbone-independent choice, as in metarec's MetaEmb). The paper's interacted users are every
user of the item in the training data; here the users of the ratings seen so far (a task's
support), which is what a new item has at each warm-up stage. The cold-stage shift of an
empty user set is 0 (the paper's cold items have no users; ``g`` of a zero mean, never seen in
training, would be an untrained extrapolation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import vmap
from torch.nn import functional as F

from metarec import (
    SGD,
    EpisodeBatch,
    FeatureBatch,
    FunctionalModel,
    MetaAlgorithm,
    NonNegativeInt,
    Params,
    PositiveFloat,
    PositiveInt,
)
from metarec_plugins.algorithms.item_embedding import (
    ItemFeatures,
    ItemIdEmbedding,
    freeze,
    require_item_tasks,
)
from metarec_plugins.backbones.twotower import mlp


class MWUF(MetaAlgorithm):
    """MWUF: meta scaling (item features) and meta shifting (interacted users) of the cold id
    embedding, on a frozen pretrained backbone.

    Args:
        inner_steps: fine-tuning steps of the warm embedding on the support (default 0: the
            paper scores the warm embedding itself).
        inner_lr: their step size.
        cold_steps: SGD steps of the cold embedding's update on the item's ratings so far.
        cold_lr: its step size.
        embedding_dim: width of the scaling network's feature embeddings.
        hidden: hidden widths of both meta networks (the authors' code: one layer of 16).
        user_table: the backbone's slow user-row table the shift reads (mf: its item side's
            ``user_embedding.weight``).
        id_tables: fast parameter -> the backbone's per-item table (default: mf's).
        freeze_backbone: keep every backbone parameter fixed (the paper); off trains both.
        fast_parameters: patterns overriding the backbone's fast parameters (the id embedding).
    """

    def __init__(self, inner_steps: NonNegativeInt = 0, inner_lr: PositiveFloat = 0.1,
                 cold_steps: NonNegativeInt = 1, cold_lr: PositiveFloat = 0.1,
                 embedding_dim: PositiveInt = 8, hidden: Sequence[PositiveInt] = (16,),
                 user_table: str = "user_embedding.weight",
                 id_tables: Mapping[str, str] | None = None, freeze_backbone: bool = True,
                 fast_parameters: Sequence[str] | None = None) -> None:
        super().__init__(inner_steps, inner_lr, fast_parameters)
        if cold_steps < 0 or cold_lr <= 0:
            raise ValueError(f"cold_steps must be >= 0 and cold_lr > 0, got {cold_steps}, "
                             f"{cold_lr}")
        self.cold_steps, self.cold_lr = int(cold_steps), float(cold_lr)
        self.embedding_dim, self.hidden = int(embedding_dim), [int(h) for h in hidden]
        self.user_table, self.id_tables = user_table, id_tables
        self.freeze_backbone = bool(freeze_backbone)

    def bind(self, model: FunctionalModel) -> None:
        require_item_tasks(model, "mwuf")
        _, slow = model.split()
        if self.user_table not in slow:
            raise ValueError(f"mwuf's shift reads the backbone's user rows {self.user_table!r} "
                             f"(user_table); {type(model.backbone).__name__} has no such slow "
                             f"parameter")
        self.ids = ItemIdEmbedding(model, self.id_tables)
        # Meta Scaling: item features -> (size,) scale around 1.
        self.features = ItemFeatures(model.backbone.schema.of("item"), self.embedding_dim, "mwuf")
        self.scale_body, width = mlp(self.features.width, self.hidden)
        self.scale_out = nn.Linear(width, self.ids.size)
        # Meta Shifting: mean user row -> (size,) shift around 0.
        self.shift_body, width = mlp(slow[self.user_table].shape[-1], self.hidden)
        self.shift_out = nn.Linear(width, self.ids.size)
        for layer in (self.scale_out, self.shift_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.freeze_backbone:
            freeze(model.backbone)

    def scale(self, support: FeatureBatch) -> torch.Tensor:
        """``s_i = 1 + h(x_i)``: the Meta Scaling network's output for the task's item."""
        return 1.0 + self.scale_out(self.scale_body(self.features(support)))

    def shift(self, slow: Params, support: FeatureBatch) -> torch.Tensor:
        """``t_i = g(mean_u p_u)`` over the support's users; 0 when it has none (cold)."""
        rows = F.embedding(support["user_id"], slow[self.user_table])
        weight = support["mask"].to(rows.dtype)
        count = weight.sum()
        mean = (rows * weight[:, None]).sum(0) / count.clamp_min(1.0)
        return self.shift_out(self.shift_body(mean)) * (count > 0).to(rows.dtype)

    def cold(self, model: FunctionalModel, fast: Params, slow: Params,
             support: FeatureBatch) -> Params:
        """The cold id embedding: ``cold_steps`` SGD steps of the backbone's loss on the
        support from the new-item start (the fast values, the item's own rows removed)."""
        start = self.ids.write(fast, slow, support, self.ids.flatten(fast))
        return model.adapt(start, slow, support, self.cold_steps, SGD(self.cold_lr))

    def warm(self, model: FunctionalModel, fast: Params, slow: Params,
             support: FeatureBatch) -> tuple[Params, Params]:
        """``(cold, warm)`` fast parameters of one task: ``e_warm = s_i * e_cold + t_i``."""
        cold = self.cold(model, fast, slow, support)
        e_cold = self.ids.read(cold, slow, support)
        e_warm = self.scale(support) * e_cold + self.shift(slow, support)
        return cold, self.ids.write(fast, slow, support, e_warm)

    def task_start(self, model: FunctionalModel, fast: Params, slow: Params,
                   support: FeatureBatch) -> Params:
        """The warm id embedding of the task's item given its ratings so far (the support)."""
        return self.warm(model, fast, slow, support)[1]

    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fast, slow = model.split()

        def task_losses(support, query):
            cold, warm = self.warm(model, fast, slow, support)
            if self.inner_steps:
                warm = model.adapt(warm, slow, support, self.inner_steps,
                                   self.inner_optimizer())
            return torch.stack([model.loss(warm, slow, query),
                                model.loss(cold, slow, query).detach()])

        warm, cold = vmap(task_losses, randomness="different")(batch.support, batch.query).mean(0)
        return warm, {"warm_loss": warm.detach(), "cold_loss": cold}
