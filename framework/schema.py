"""What a backbone needs to know about the data: entity counts, feature specs, feedback type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FeatureKind = Literal["categorical", "multihot"]
Owner = Literal["user", "item"]
Feedback = Literal["explicit", "implicit"]


@dataclass
class FeatureSpec:
    """One side-information column.

    ``categorical`` features are integer codes in ``[0, cardinality)``; ``multihot`` features
    are 0/1 vectors of width ``cardinality`` (e.g. a movie's genres).
    """

    name: str
    owner: Owner
    kind: FeatureKind
    cardinality: int

    @property
    def key(self) -> str:
        """The key of this feature in a feature batch, e.g. ``"user.age"``."""
        return f"{self.owner}.{self.name}"


@dataclass
class DataSchema:
    """Shapes and semantics of a data set, handed from the datamodule to the backbone."""

    num_users: int
    num_items: int
    features: tuple[FeatureSpec, ...] = field(default_factory=tuple)
    feedback: Feedback = "explicit"
    rating_range: tuple[float, float] | None = (1.0, 5.0)
    # What a task is (``data.tasks.task_by``): "user" (one task per user, the default) or "item".
    # Backbones whose fast parameters belong to one side (mf) follow it.
    task_by: Literal["user", "item"] = "user"

    def of(self, owner: Owner) -> tuple[FeatureSpec, ...]:
        """The feature specs that belong to users or to items."""
        return tuple(f for f in self.features if f.owner == owner)


def _allow_in_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` (Lightning's default) read the schema in a checkpoint."""
    import torch

    torch.serialization.add_safe_globals([DataSchema, FeatureSpec])


_allow_in_checkpoints()
