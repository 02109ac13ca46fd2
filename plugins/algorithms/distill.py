"""Meta-distillation: a small fast-adapting student learns from a large frozen teacher.

The teacher is a backbone from an earlier run's checkpoint (``teacher_checkpoint``), trained
first by ``teacher_recipe`` when the checkpoint does not exist yet (a pretraining stage named
in the recipe). It is frozen: it never adapts, receives no gradient and stays bit-identical.
The student is meta-trained with MAML; its outer loss mixes the task loss with a
distillation loss between the *adapted* student's and the teacher's query predictions:

    loss = (1 - weight) * task_loss + weight * distill_loss

``distill_loss`` is the MSE between predicted ratings (explicit feedback), or the binary
cross-entropy between the student's and the teacher's probabilities at temperature ``T``,
scaled by ``T^2`` (implicit feedback; Hinton et al. 2015).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import vmap

from metarec import (
    ClosedUnitInterval,
    EpisodeBatch,
    FunctionalModel,
    NonNegativeInt,
    PositiveFloat,
    building_for_inference,
    inputs,
    load_backbone,
    masked_loss,
    train_recipe,
)
from metarec_plugins.algorithms.maml import MAML


class Distill(MAML):
    """MAML on a student with a distillation term toward a frozen teacher.

    Args:
        teacher_checkpoint: checkpoint (from ``metarec fit``) holding the teacher backbone.
        teacher_recipe: recipe that trains the teacher when ``teacher_checkpoint`` is missing.
        teacher_overrides: command-line overrides for that recipe (e.g. the same ``--data.seed``,
            so the teacher never sees this run's test users).
        weight: lambda in ``(1 - lambda) * task + lambda * distill``; 0 is MAML exactly.
        temperature: softening temperature of implicit-feedback distillation.
        inner_steps, inner_lr, first_order, learn_inner_lr, fast_parameters: as ``maml``.
    """

    def __init__(self, teacher_checkpoint: str, teacher_recipe: str | None = None,
                 teacher_overrides: list[str | int | float] | None = None,
                 weight: ClosedUnitInterval = 0.5,
                 temperature: PositiveFloat = 1.0, inner_steps: NonNegativeInt = 5,
                 inner_lr: PositiveFloat = 0.01, first_order: bool = False, learn_inner_lr: bool = False,
                 fast_parameters: Sequence[str] | None = None) -> None:
        super().__init__(inner_steps, inner_lr, first_order=first_order,
                         learn_inner_lr=learn_inner_lr, fast_parameters=fast_parameters)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.weight, self.temperature = float(weight), float(temperature)
        self._teacher: list[torch.nn.Module] = []
        if building_for_inference():
            return  # adapting and serving a trained student needs no teacher
        path = Path(teacher_checkpoint)
        if not path.is_file():
            if teacher_recipe is None:
                raise FileNotFoundError(f"teacher checkpoint {path} not found and no "
                                        "teacher_recipe to train it")
            train_recipe(teacher_recipe, path, [str(o) for o in teacher_overrides or []])
        teacher = load_backbone(path)
        for p in teacher.parameters():
            p.requires_grad_(False)
        # Kept out of the module tree: not optimised, not in the student's state_dict.
        self._teacher = [teacher]

    @property
    def teacher(self) -> torch.nn.Module:
        if not self._teacher:
            raise RuntimeError("distill: no teacher loaded (the model was rebuilt for inference)")
        return self._teacher[0]

    def bind(self, model: FunctionalModel) -> None:
        super().bind(model)
        if not self._teacher:
            return
        mine, theirs = model.backbone.schema, self.teacher.schema
        if (mine.num_users, mine.num_items, mine.feedback) != \
                (theirs.num_users, theirs.num_items, theirs.feedback):
            raise ValueError("distill: the teacher was trained on different data "
                             f"({theirs.num_users} users, {theirs.num_items} items, "
                             f"{theirs.feedback}) than the student ({mine.num_users}, "
                             f"{mine.num_items}, {mine.feedback})")

    def teacher_scores(self, query: dict[str, torch.Tensor]) -> torch.Tensor:
        teacher = self.teacher
        device = query["label"].device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        with torch.no_grad():
            return teacher.eval()(inputs(query))

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                     feedback: str) -> torch.Tensor:
        if feedback == "implicit":
            t = self.temperature
            per = F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t),
                                                     reduction="none") * t * t
        else:
            per = (student - teacher) ** 2
        weight = mask.to(per.dtype)
        return (per * weight).sum() / weight.sum().clamp_min(1.0)

    def outer_loss(self, model: FunctionalModel,
                   batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fast, slow = model.split()
        teacher = self.teacher_scores(batch.query)

        def losses(support, query, target):
            adapted = self.adapt(model, fast, slow, support, first_order=self.first_order)
            scores = model.predict(adapted, slow, query)
            task = masked_loss(scores, query["label"], query["mask"], model.feedback)
            return task, self.distill_loss(scores, target, query["mask"], model.feedback)

        task, distill = vmap(losses, randomness="different")(batch.support, batch.query, teacher)
        if self.weight == 0.0:  # exactly MAML, even if the teacher's scores are not finite
            loss = task.mean()
        else:
            loss = (1 - self.weight) * task.mean() + self.weight * distill.mean()
        return loss, {"task_loss": task.mean().detach(), "distill_loss": distill.mean().detach()}
