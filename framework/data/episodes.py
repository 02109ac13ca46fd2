"""Episode batches: padded tensors of tasks x support and tasks x query, with masks.

A batch's ``support`` and ``query`` are plain dicts (pytrees), so they pass straight through
``torch.func.vmap`` and Lightning's device transfer. Keys:

- ``"user_id"``, ``"item_id"``: ``(B, N)`` contiguous ids;
- ``"user.<name>"`` / ``"item.<name>"``: features, ``(B, N)`` codes or ``(B, N, K)`` multi-hot;
- ``"label"`` ``(B, N)`` float, ``"mask"`` ``(B, N)`` bool, ``"time"`` ``(B, N)`` int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metarec.data.table import InteractionTable
from metarec.data.tasks import TaskSet

FeatureBatch = dict[str, torch.Tensor]
RESERVED_KEYS = ("label", "mask", "time")
# Key of a backbone's cached slow-only encoding of a batch (see Backbone.encoder_parameters).
ENCODED = "_encoded"


@dataclass
class EpisodeBatch:
    """A batch of tasks. ``users`` holds each task's contiguous user id."""

    users: torch.Tensor
    support: FeatureBatch
    query: FeatureBatch

    def __len__(self) -> int:
        return len(self.users)


def inputs(batch: FeatureBatch) -> FeatureBatch:
    """The model inputs of a feature batch (everything but label, mask and time)."""
    return {k: v for k, v in batch.items() if k not in RESERVED_KEYS}


class EpisodeCollator:
    """Gathers :class:`EpisodeBatch` es from a :class:`TaskSet` by tensor indexing.

    Picklable, so it works as a ``DataLoader`` ``collate_fn`` with worker processes.
    """

    def __init__(self, tasks: TaskSet, table: InteractionTable) -> None:
        self.tasks = tasks
        self.user_features = {f.spec.key: torch.from_numpy(f.values) for f in table.user_features}
        self.item_features = {f.spec.key: torch.from_numpy(f.values) for f in table.item_features}

    def __call__(self, indices: list[int] | torch.Tensor) -> EpisodeBatch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        t = self.tasks
        users = t.users[idx]
        support = self._side(users, t.support_items[idx], t.support_labels[idx],
                             t.support_times[idx], t.support_mask[idx])
        query = self._side(users, t.query_items[idx], t.query_labels[idx], t.query_times[idx],
                           t.query_mask[idx])
        return EpisodeBatch(users=users, support=support, query=query)

    def _side(self, users: torch.Tensor, items: torch.Tensor, labels: torch.Tensor,
              times: torch.Tensor, mask: torch.Tensor) -> FeatureBatch:
        # Trim the padding to the longest task of this batch.
        width = max(int(mask.sum(1).max()), 1)
        items, labels, times, mask = (x[:, :width] for x in (items, labels, times, mask))
        user_ids = users[:, None].expand_as(items)
        out: FeatureBatch = {"user_id": user_ids, "item_id": items}
        for key, values in self.user_features.items():
            out[key] = values[users][:, None].expand(*items.shape, *values.shape[1:])
        for key, values in self.item_features.items():
            out[key] = values[items]
        out.update(label=labels, mask=mask, time=times)
        return out
