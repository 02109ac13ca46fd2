"""Feedback events of one entity, parsed and validated, and the histories sequential backbones
read, computed exactly as training computes them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from metarec.data.episodes import EpisodeCollator, FeatureBatch

Events = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def parse_events(interactions: Any, where: str, count: int, device: torch.device,
                 other: str = "item") -> Events:
    """``(ids, labels, times or None)`` of one entity's events, oldest first, validated.

    ``interactions``: a sequence of ``(id, label[, timestamp])`` or an ``(n, 2|3)``
    array/tensor, where ``id`` is a contiguous id in ``[0, count)`` of the ``other`` side (the
    items a user rated; the users an item was shown to); replayed in timestamp order (the given
    order without timestamps)."""
    if isinstance(interactions, (torch.Tensor, np.ndarray)):
        array = torch.as_tensor(interactions)
        if array.ndim != 2 or array.shape[1] not in (2, 3):
            if array.numel() == 0:
                array = array.reshape(0, 2)
            else:
                raise ValueError(f"{where}: expected shape (n, 2) or (n, 3) as ({other}, label"
                                 f"[, timestamp]), got {tuple(array.shape)}")
        columns = list(array.unbind(1))
    else:
        events = list(interactions)
        width = {len(e) for e in events}
        if not width <= {2, 3} or len(width) > 1:
            bad = next(i for i, e in enumerate(events) if len(e) not in (2, 3) or
                       len(e) != len(events[0]))
            raise ValueError(f"{where}: event {bad} is {events[bad]!r}; every event must be "
                             f"({other}, label) or ({other}, label, timestamp), all alike")
        columns = [[e[j] for e in events] for j in range(width.pop() if width else 2)]
    ids = torch.as_tensor(columns[0], device=device)
    if ids.is_floating_point():
        if not bool((ids == ids.round()).all()):
            bad = int(torch.nonzero(ids != ids.round())[0])
            raise ValueError(f"{where}: event {bad}: {other} {ids[bad].item()!r} is not an id")
    ids = ids.long()
    outside = (ids < 0) | (ids >= count)
    if bool(outside.any()):
        bad = int(torch.nonzero(outside)[0])
        raise ValueError(f"{where}: event {bad}: {other} {int(ids[bad])} is not a contiguous "
                         f"{other} id in [0, {count})")
    labels = torch.as_tensor(columns[1], dtype=torch.float32, device=device)
    if not bool(torch.isfinite(labels).all()):
        bad = int(torch.nonzero(~torch.isfinite(labels))[0])
        raise ValueError(f"{where}: event {bad}: label {float(labels[bad])} is not finite")
    times = None
    if len(columns) == 3:
        times = torch.as_tensor(columns[2], device=device).long()
        order = torch.sort(times, stable=True).indices
        ids, labels, times = ids[order], labels[order], times[order]
    return ids, labels, times


def histories(length: int, item_features: dict[str, torch.Tensor], items: torch.Tensor,
              labels: torch.Tensor, times: torch.Tensor, mask: torch.Tensor,
              slot_times: torch.Tensor, slot_mask: torch.Tensor) -> FeatureBatch:
    """Each slot's history among the events ``(B, P)`` (stored oldest first): the latest
    ``length`` strictly before the slot's time, exactly as ``EpisodeCollator`` computes it in
    training and evaluation, padded to ``length`` (mask False)."""
    tables = SimpleNamespace(history_length=length, item_features=item_features)
    out = EpisodeCollator._history(tables, items, labels, times, mask, slot_times, slot_mask)
    return {k: _pad_history(v, length) for k, v in out.items()}


def _pad_history(value: torch.Tensor, width: int) -> torch.Tensor:
    if value.shape[2] == width:
        return value
    out = value.new_zeros((*value.shape[:2], width, *value.shape[3:]))
    out[:, :, :value.shape[2]] = value[:, :, :width]
    return out
