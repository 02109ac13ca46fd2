"""Episode batches: padded tensors of tasks x support and tasks x query, with masks.

A batch's ``support`` and ``query`` are plain dicts (pytrees), so they pass straight through
``torch.func.vmap`` and Lightning's device transfer. Keys:

- ``"user_id"``, ``"item_id"``: ``(B, N)`` contiguous ids;
- ``"user.<name>"`` / ``"item.<name>"``: features, ``(B, N)`` codes or ``(B, N, K)`` multi-hot
  (0/1 floats); with ``bags`` (``data.multihot_bags``, opt-in) a multi-hot feature is instead
  the bag of its active category ids, ``(B, N, L)`` int64 padded with -1 (``L``: the most
  categories of any row of the table; :func:`to_bags`), which the built-in backbones gather
  sparsely (same values);
- ``"label"`` ``(B, N)`` float, ``"mask"`` ``(B, N)`` bool, ``"time"`` ``(B, N)`` int64;
- with ``history_length`` set (opt-in), each slot's history: ``"history.item_id"`` ``(B, N, H)``
  long, ``"history.label"`` ``(B, N, H)`` float, ``"history.mask"`` ``(B, N, H)`` bool and
  ``"history.item.<name>"`` ``(B, N, H[, K])`` item features. The history of a slot is the
  task's *support* interactions with a timestamp strictly before the slot's (ties excluded;
  query labels are never visible), the most recent ``history_length`` of them, oldest first,
  padding (mask False) at the end. These are model inputs: :func:`inputs` keeps them, and the
  loss still uses the slot's own ``"label"``/``"mask"``;
- with ``shared_history`` too (asked for by backbones with ``shared_history = True``, e.g. the
  transformer with ``attention: causal``), the *shared layout* instead of per-slot histories:
  the task's support interactions as one sequence, oldest first, padding last,
  ``"history.seq.item_id"``, ``"history.seq.label"``, ``"history.seq.mask"`` and
  ``"history.seq.item.<name>"`` ``(B, N, S[, K])`` (the same in every slot: broadcast with
  stride 0), ``"history.pos"`` ``(B, N)`` long, how many of them are strictly before the slot
  (the slot's history is the latest ``history_length`` of those), and ``"history.window"``
  ``(B, N)`` long, ``history_length``. The sequence is ``S`` wide instead of ``N x H``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metarec.data.table import InteractionTable
from metarec.data.tasks import TaskSet

FeatureBatch = dict[str, torch.Tensor]
RESERVED_KEYS = ("label", "mask", "time")
# Key of a backbone's cached slow-only encoding of a batch (see Backbone.encoder_parameters).
ENCODED = "_encoded"


@dataclass
class EpisodeBatch:
    """A batch of tasks. ``users`` holds each task's contiguous user id (with tasks per item,
    ``data.tasks.task_by: item``, each task's item id; the slots' ``user_id`` are then the
    users who interacted with it)."""

    users: torch.Tensor
    support: FeatureBatch
    query: FeatureBatch

    def __len__(self) -> int:
        return len(self.users)


def inputs(batch: FeatureBatch) -> FeatureBatch:
    """The model inputs of a feature batch (everything but label, mask and time)."""
    return {k: v for k, v in batch.items() if k not in RESERVED_KEYS}


def support_label(k: int | None) -> str:
    """The metric-key label of a support cap: ``k5`` for at most 5, ``kall`` for no cap."""
    return "kall" if k is None else f"k{k}"


class EpisodeCollator:
    """Gathers :class:`EpisodeBatch` es from a :class:`TaskSet` by tensor indexing.

    Picklable, so it works as a ``DataLoader`` ``collate_fn`` with worker processes.
    """

    def __init__(self, tasks: TaskSet, table: InteractionTable,
                 history_length: int | None = None, bags: bool = False,
                 shared_history: bool = False) -> None:
        if history_length is not None and history_length < 1:
            raise ValueError(f"data.history_length must be >= 1 or null, got {history_length}")
        self.tasks = tasks
        self.history_length = history_length
        self.shared_history = bool(shared_history)
        self.bags = bags
        self.by_item = getattr(tasks, "task_by", "user") == "item"
        if self.by_item and history_length is not None:
            raise ValueError("data.history_length (a user's history) cannot be combined with "
                             "data.tasks.task_by: item")

        def values(f) -> torch.Tensor:
            v = torch.from_numpy(f.values)
            return to_bags(v) if bags and f.spec.kind == "multihot" else v
        self.user_features = {f.spec.key: values(f) for f in table.user_features}
        self.item_features = {f.spec.key: values(f) for f in table.item_features}
        if history_length is not None:
            # Histories rely on each task's support being stored oldest first (see _pad_split).
            t, m = tasks.support_times, tasks.support_mask
            if not bool(((t[:, 1:] >= t[:, :-1]) | ~m[:, 1:]).all()):
                raise ValueError("support interactions must be stored oldest first per task")

    def __call__(self, indices: list[int] | torch.Tensor) -> EpisodeBatch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        t = self.tasks
        users = t.users[idx]
        support = self._side(users, t.support_items[idx], t.support_labels[idx],
                             t.support_times[idx], t.support_mask[idx])
        query = self._side(users, t.query_items[idx], t.query_labels[idx], t.query_times[idx],
                           t.query_mask[idx])
        if self.history_length is not None:
            past = (t.support_items[idx], t.support_labels[idx], t.support_times[idx],
                    t.support_mask[idx])
            for side in (support, query):
                side.update(self._histories(*past, side["time"], side["mask"]))
        return EpisodeBatch(users=users, support=support, query=query)

    def _histories(self, *args: torch.Tensor) -> FeatureBatch:
        """The slots' history inputs: per slot, or the shared layout (``shared_history``)."""
        return self._shared(*args) if self.shared_history else self._history(*args)

    def _shared(self, items: torch.Tensor, labels: torch.Tensor, times: torch.Tensor,
                mask: torch.Tensor, slot_times: torch.Tensor,
                slot_mask: torch.Tensor) -> FeatureBatch:
        """The shared layout over the support interactions ``(B, S)`` (stored oldest first):
        the real ones as one sequence per task, and each slot's count of those strictly
        before it (the events its per-slot history, :meth:`_history`, takes the latest
        ``history_length`` of)."""
        b, n = slot_times.shape
        # Real interactions first (stable: still oldest first), trimmed to the longest task.
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
        items, labels, times, mask = (x.gather(1, order) for x in (items, labels, times, mask))
        width = max(int(mask.sum(1).max()) if mask.numel() else 0, 1)
        items, labels, times, mask = (x[:, :width] for x in (items, labels, times, mask))
        # Padding sorts last; ties with the slot's time are not before it (searchsorted left).
        keyed = torch.where(mask, times, torch.iinfo(torch.int64).max).contiguous()
        before = torch.searchsorted(keyed, slot_times.contiguous(), side="left")
        pos = torch.where(slot_mask, before.clamp(max=width), 0)
        items = torch.where(mask, items, 0)
        seq: FeatureBatch = {"history.seq.item_id": items,
                             "history.seq.label": torch.where(mask, labels, 0.0),
                             "history.seq.mask": mask}
        for key, values in self.item_features.items():
            seq[f"history.seq.{key}"] = values[items]
        out = {k: v[:, None].expand(b, n, *v.shape[1:]) for k, v in seq.items()}
        out["history.pos"] = pos
        out["history.window"] = torch.full((b, n), self.history_length, dtype=torch.long)
        return out

    def _history(self, items: torch.Tensor, labels: torch.Tensor, times: torch.Tensor,
                 mask: torch.Tensor, slot_times: torch.Tensor,
                 slot_mask: torch.Tensor) -> FeatureBatch:
        """Each slot's history among the support interactions ``(B, S)`` (stored oldest first):
        those strictly before the slot's time, the latest ``history_length``, oldest first."""
        h = self.history_length
        b, n = slot_times.shape
        # (B, N, S): support interaction s is visible to slot j (strictly earlier, real, and j real).
        earlier = (times[:, None, :] < slot_times[:, :, None]) & mask[:, None, :] \
            & slot_mask[:, :, None]
        rank = earlier.long().cumsum(-1)  # 1-based rank among the visible ones, oldest first
        count = rank[..., -1:]  # (B, N, 1)
        start = (count - h).clamp_min(0)  # visible ones ranked <= start are too old
        keep = earlier & (rank > start)
        width = max(int((count - start).max()) if count.numel() else 0, 1)
        # Scatter the kept entries to positions 0..k-1 (oldest first); the rest to a dump column.
        dest = torch.where(keep, rank - start - 1, torch.full_like(rank, width))
        source = torch.arange(items.shape[1]).expand(b, n, -1)
        position = torch.zeros(b, n, width + 1, dtype=torch.long).scatter_(-1, dest, source)
        position = position[..., :width]
        valid = torch.arange(width) < (count - start)
        rows = torch.arange(b)[:, None, None]
        hist_items = torch.where(valid, items[rows, position], 0)
        out: FeatureBatch = {
            "history.item_id": hist_items,
            "history.label": torch.where(valid, labels[rows, position], 0.0),
            "history.mask": valid,
        }
        for key, values in self.item_features.items():
            out[f"history.{key}"] = values[hist_items]
        return out

    def _side(self, users: torch.Tensor, items: torch.Tensor, labels: torch.Tensor,
              times: torch.Tensor, mask: torch.Tensor) -> FeatureBatch:
        # Trim the padding to the longest task of this batch.
        width = max(int(mask.sum(1).max()), 1)
        items, labels, times, mask = (x[:, :width] for x in (items, labels, times, mask))
        if self.by_item:  # tasks per item: `users` are the task items, the slots hold users
            return self._item_side(users, items, labels, times, mask)
        user_ids = users[:, None].expand_as(items)
        out: FeatureBatch = {"user_id": user_ids, "item_id": items}
        for key, values in self.user_features.items():
            out[key] = values[users][:, None].expand(*items.shape, *values.shape[1:])
        for key, values in self.item_features.items():
            out[key] = values[items]
        out.update(label=labels, mask=mask, time=times)
        return out

    def _item_side(self, task_items: torch.Tensor, users: torch.Tensor, labels: torch.Tensor,
                   times: torch.Tensor, mask: torch.Tensor) -> FeatureBatch:
        """:meth:`_side` of tasks per item: slot users ``(B, N)``, the task's item in every slot."""
        item_ids = task_items[:, None].expand_as(users)
        out: FeatureBatch = {"user_id": users, "item_id": item_ids}
        for key, values in self.user_features.items():
            out[key] = values[users]
        for key, values in self.item_features.items():
            out[key] = values[task_items][:, None].expand(*users.shape, *values.shape[1:])
        out.update(label=labels, mask=mask, time=times)
        return out


class SupportSweepCollator:
    """Gathers the same tasks at several support caps: ``{support_label(k): EpisodeBatch}``.

    Every variant has the same users and the same query items; the support at cap ``k`` is the
    task's first ``k`` support interactions in a fixed random order (:meth:`TaskSet.capped`),
    so smaller caps are subsets of larger ones. Histories (``history_length``) are built from
    the capped support only: a query slot never sees support interactions the cap removed.
    """

    def __init__(self, tasks: TaskSet, table: InteractionTable, caps: list[int | None],
                 history_length: int | None = None, bags: bool = False,
                 labels: list[str] | None = None, shared_history: bool = False) -> None:
        # ``labels`` (optional) name the caps instead of support_label (data.warmup: cold,
        # warm_a, ...).
        labels = [support_label(k) for k in caps] if labels is None else list(labels)
        if not caps or len(set(labels)) != len(labels):
            raise ValueError(f"data.eval_support must list distinct caps (ints >= 1 or null), "
                             f"got {caps}")
        self.collators = {label: EpisodeCollator(tasks.capped(k), table, history_length, bags,
                                                 shared_history)
                          for label, k in zip(labels, caps)}

    def __call__(self, indices: list[int] | torch.Tensor) -> dict[str, EpisodeBatch]:
        return {label: collate(indices) for label, collate in self.collators.items()}


def to_bags(dense: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Dense 0/1 multi-hot rows ``(n, K)`` as bags ``(n, L)`` of their active category ids,
    ascending, padded with -1; ``L`` = ``width`` or the most active categories of any row (at
    least 1). The inverse of the dense form: a backbone reads either (the same values)."""
    active = dense != 0
    count = int(active.sum(-1).max()) if active.numel() else 0
    width = max(count, 1) if width is None else width
    if count > width:
        raise ValueError(f"a row has {count} active categories, more than the bag width {width}")
    k = dense.shape[-1]
    # Active ids first (ascending), then the inactive ones; keep the first `width`.
    key = torch.where(active, torch.arange(k), k + torch.arange(k))
    order = torch.sort(key, dim=-1).values[..., :width]
    bags = torch.where(order < k, order, torch.full_like(order, -1))
    if bags.shape[-1] < width:
        bags = torch.cat([bags, bags.new_full((*bags.shape[:-1], width - bags.shape[-1]), -1)],
                         -1)
    return bags


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a counter-based hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def episode_uniforms(seed: int, epoch: torch.Tensor, task: torch.Tensor, width: int,
                     stream: int) -> torch.Tensor:
    """``(B, width)`` uniforms in [0, 1), a pure function of (seed, epoch, task, slot, stream):
    the same whatever the batch a task lands in, the rank that draws it, or a resume."""
    with np.errstate(over="ignore"):
        x = _splitmix(np.full(len(task), seed, dtype=np.uint64) ^ np.uint64(stream << 32))
        x = _splitmix(x ^ epoch.numpy().astype(np.uint64))
        x = _splitmix(x ^ task.numpy().astype(np.uint64))
        z = _splitmix(x[:, None] ^ np.arange(width, dtype=np.uint64)[None, :])
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)


class EpisodicCollator(EpisodeCollator):
    """Meta-training episodes with a fresh support set per (task, epoch) (``data.train_support``).

    Called with ``(task, epoch)`` keys. Each episode draws ``k ~ U{k_min..k_max}`` (at most the
    task's pool) and a random subset of size ``k`` of the task's non-query interactions; with
    ``resample_query`` the query is redrawn too, ``query_size`` interactions from the task's whole
    pool (support and query together), the support then coming from the rest. Draws are a pure
    function of (``seed``, epoch, task) (:func:`episode_uniforms`), vectorised over the batch:
    a new draw each epoch, the same one for the same seed and epoch, on any rank and after a
    resume. Nothing is thrown away: every interaction can be drawn in some epoch. With implicit
    feedback, ``k`` counts support entries, sampled negatives included.
    """

    def __init__(self, tasks: TaskSet, table: InteractionTable,
                 support_range: tuple[int, int] | None, resample_query: bool, seed: int,
                 history_length: int | None = None, bags: bool = False,
                 shared_history: bool = False) -> None:
        super().__init__(tasks, table, history_length, bags, shared_history)
        self.support_range, self.resample_query, self.seed = support_range, resample_query, seed
        self.query_size = int(tasks.query_mask.sum(1).max()) if len(tasks) else 0

    def support_sizes(self, epoch: int) -> torch.Tensor:
        """Every task's support size in its episode of ``epoch`` (what ``__call__`` draws), for
        length-bucketed batching."""
        t = self.tasks
        idx = torch.arange(len(t))
        epochs = torch.full_like(idx, epoch)
        sizes = t.support_mask.sum(1)
        if self.resample_query:
            pool = sizes + t.query_mask.sum(1)
            sizes = pool - pool.clamp(max=self.query_size)
        if self.support_range is not None:
            lo, hi = self.support_range
            k = lo + (episode_uniforms(self.seed, epochs, idx, 1, stream=2)[:, 0]
                      * (hi - lo + 1)).long()
            sizes = torch.minimum(sizes, k)
        return sizes

    def __call__(self, keys: list[tuple[int, int]] | torch.Tensor) -> EpisodeBatch:  # type: ignore[override]
        keys = torch.as_tensor(keys, dtype=torch.long).reshape(-1, 2)
        idx, epoch = keys[:, 0], keys[:, 1]
        t = self.tasks
        support = [t.support_items[idx], t.support_labels[idx], t.support_times[idx],
                   t.support_mask[idx]]
        query = [t.query_items[idx], t.query_labels[idx], t.query_times[idx], t.query_mask[idx]]
        if self.resample_query:
            pool = [torch.cat([s, q], 1) for s, q in zip(support, query)]
            key = episode_uniforms(self.seed, epoch, idx, pool[0].shape[1], stream=1)
            rank = _ranks(key.masked_fill(~pool[3], 2.0))
            query = _keep(pool, rank < self.query_size)
            support = _keep(pool, (rank >= self.query_size) & pool[3])
        if self.support_range is not None:
            lo, hi = self.support_range
            k = lo + (episode_uniforms(self.seed, epoch, idx, 1, stream=2)[:, 0]
                      * (hi - lo + 1)).long()
            key = episode_uniforms(self.seed, epoch, idx, support[0].shape[1], stream=3)
            rank = _ranks(key.masked_fill(~support[3], 2.0))
            support = _keep(support, rank < k[:, None])
        users = t.users[idx]
        support_side = self._side(users, *support)
        query_side = self._side(users, *query)
        if self.history_length is not None:
            for side in (support_side, query_side):
                side.update(self._histories(*support, side["time"], side["mask"]))
        return EpisodeBatch(users=users, support=support_side, query=query_side)


def _ranks(key: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row by ``key`` (0 = smallest)."""
    return torch.argsort(torch.argsort(key, dim=1), dim=1)


def _keep(columns: list[torch.Tensor], keep: torch.Tensor) -> list[torch.Tensor]:
    """``[items, labels, times, mask]`` reduced to the ``keep`` entries of each row, oldest
    first (stable on ties), padding trimmed to the widest row."""
    items, labels, times, mask = columns
    keep = keep & mask
    order = torch.argsort(torch.where(keep, times, torch.iinfo(torch.int64).max), dim=1,
                          stable=True)
    width = max(int(keep.sum(1).max()) if len(keep) else 0, 1)
    index = order[:, :width]
    return [items.gather(1, index), labels.gather(1, index), times.gather(1, index),
            keep.gather(1, index)]
