"""Pretrain-then-finetune: the non-meta baseline.

Meta-training is ordinary supervised training on every interaction (support and query) of
the meta-train users, each interaction weighted equally. At evaluation the same adaptation
policy fine-tunes the fast parameters from the pretrained weights, so the comparison with
MAML isolates what meta-learning the initialisation adds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metarec import (
    EpisodeBatch,
    FunctionalModel,
    MetaAlgorithm,
    NonNegativeInt,
    PositiveFloat,
    masked_loss,
)


class Pretrain(MetaAlgorithm):
    """Supervised pretraining. ``inner_steps``/``inner_lr`` only set the default fine-tuning."""

    def __init__(self, inner_steps: NonNegativeInt = 5, inner_lr: PositiveFloat = 0.01,
                 fast_parameters: Sequence[str] | None = None) -> None:
        super().__init__(inner_steps, inner_lr, fast_parameters)

    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fast, slow = model.split()
        sides = (batch.support, batch.query)
        scores = [model.predict(fast, slow, side) for side in sides]
        flat = lambda xs: torch.cat([x.reshape(-1) for x in xs])  # noqa: E731
        loss = masked_loss(flat(scores), flat([s["label"] for s in sides]),
                           flat([s["mask"] for s in sides]), model.feedback)
        return loss, {}
