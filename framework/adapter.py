"""Deployment-time adaptation: a checkpoint from ``metarec fit`` in, adapted users (or items) out.

:class:`Adapter` rebuilds the meta-learned model and its adaptation policy from a checkpoint
(weights, hyperparameters, the data schema and, stored by :class:`~metarec.module.MetaLearner`
when it saves a checkpoint, the user/item feature tables and raw id keys). ``adapt`` turns a
user's interactions into a :class:`UserSession` holding that user's adapted fast parameters;
several users are adapted at once in one vmapped call of the policy. A session recommends
(``recommend``) and keeps adapting to new feedback (``update``). The adaptation is exactly the
evaluation path's: the same policy object is called on the same kind of padded support batch
(``MetaLearner.adapt``), from the same meta-learned start.

State: a session owns only its user's fast parameters (plus, for a policy with an incremental
update such as ``online``, a bounded replay buffer) and the ids of the items the user has
interacted with (to exclude them from recommendations). Sessions never share state and the
meta-learned weights are never written: every update is functional.

Policies with an incremental update implement two optional methods (``online`` does):

- ``init_state(events) -> state``: the per-user state after adapting on ``events`` (one user's
  feature batch, rows oldest first);
- ``update(model, fast, slow, start, state, events) -> (fast, state)``: apply new events.

For any other policy, ``update`` adapts again from the meta-learned start on every event so
far (the support set grows), exactly as evaluation adapts a support set (docs/adaptation.md).

Items: a checkpoint trained with tasks per item (``data.tasks.task_by: item``, the item
cold-start protocol) adapts *items*. :meth:`Adapter.adapt_item` turns a new item's interactions
``(user, label[, timestamp])`` (and its features) into an :class:`ItemSession` holding the
item's fast parameters, which ranks *users* for the item (``recommend`` -> :class:`RankedUsers`).
The support batch is the one ``EpisodeCollator`` builds for item tasks: the slots' ``user_id``
and user features are the item's users, the item's id and features are in every slot. The
adapter follows the checkpoint's ``task_by`` (:attr:`Adapter.task_by`): ``adapt`` serves user
checkpoints, ``adapt_item`` item checkpoints, and each names the other on a mismatch.

Layout: the entity-generic pieces live in :mod:`metarec.serving` (id codecs, feature tables,
event parsing and histories, the session, the ``metarec adapt`` command); this module
assembles them into padded support batches and calls the policy.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from metarec.checkpoint import for_inference, load_checkpoint
from metarec.data.episodes import FeatureBatch
from metarec.functional import Params
from metarec.serving.command import adapt_command, read_interactions
from metarec.serving.events import Events, histories, parse_events
from metarec.serving.features import FeatureTables
from metarec.serving.ids import IdCodec
from metarec.serving.session import (
    ItemSession,
    RankedUsers,
    Recommendations,
    Session,
    UserSession,
)

if TYPE_CHECKING:  # the module (and Lightning) is imported when a checkpoint is loaded
    from metarec.module import MetaLearner

__all__ = ["Adapter", "ItemSession", "RankedUsers", "Recommendations", "Session", "UserSession",
           "adapt_command", "read_interactions"]




def _bucket(n: int, minimum: int) -> int:
    """The next power of two >= max(n, minimum): shapes seen by a compiled adapt function."""
    return 1 << max(int(n) - 1, minimum - 1, 0).bit_length()


class Adapter:
    """Adapts users (or, for a model trained with tasks per item, items) with a meta-learned
    model and its adaptation policy; see the module doc.

    Usually made with :meth:`from_checkpoint`. The model is put in eval mode and never
    written to.

    Args:
        model: a trained :class:`~metarec.module.MetaLearner` (its policy is the one used).
        item_features: ``{"item.<name>": (num_items, ...) tensor}`` for every item feature of
            the schema (required when the schema has item features and tasks are users;
            with tasks per item, without them every item's features must be passed to
            :meth:`adapt_item`, ``item_features=``).
        user_features: ``{"user.<name>": (num_users, ...) tensor}``; without them every user's
            features must be passed to :meth:`adapt` (``user_features=``); required with
            tasks per item when the schema has user features (they fill the support slots).
        user_keys, item_keys: raw id of each contiguous id (``keys[i]`` is id ``i``'s raw id).
        compile: run the policy through ``torch.compile`` (one compiled graph per padded
            shape: users and events per user are padded to powers of two, so a handful of
            shapes serve any request). The first call of each shape compiles (tens of seconds on
            a small CPU); later calls are many times faster than eager. See
            docs/adaptation.md for the numbers.
        group_size: users (items, with tasks per item) per vmapped policy call when many are
            adapted at once: they are sorted by number of events and adapted in groups of this
            many, so that padding each to the group's longest support wastes little (None: one
            call for all).
        history_length: give every slot the user's history, as ``data.history_length`` does in
            training (``history.*`` inputs, for sequential backbones such as ``transformer``):
            a support event sees the user's latest ``history_length`` events strictly before
            it; a scored candidate sees the latest ``history_length`` events of all. Not with
            tasks per item.
    """

    def __init__(self, model: MetaLearner, *, item_features: Mapping[str, Any] | None = None,
                 user_features: Mapping[str, Any] | None = None,
                 user_keys: Sequence[Hashable] | None = None,
                 item_keys: Sequence[Hashable] | None = None, compile: bool = False,
                 group_size: int | None = 128, history_length: int | None = None) -> None:
        self.model = model.eval()
        self.functional = model.functional
        self.policy = model.policy
        self.schema = model.schema
        self.num_users, self.num_items = self.schema.num_users, self.schema.num_items
        self.device = next(model.parameters()).device
        fast, slow = self.functional.split()
        # The meta-learned start theta_0 and the shared weights: views of the model's own
        # parameters, never written (every update below builds new tensors).
        self.start: Params = {k: v.detach() for k, v in fast.items()}
        self.slow: Params = {k: v.detach() for k, v in slow.items()}
        # What a task (a session) is: the checkpoint's data.tasks.task_by. Sessions adapt the
        # `task_by` entity from events on the `other` side and rank the other side.
        self.task_by: str = getattr(self.schema, "task_by", "user") or "user"
        if self.task_by not in ("user", "item"):
            raise ValueError(f"schema.task_by must be 'user' or 'item', got {self.task_by!r}")
        self.other = "item" if self.task_by == "user" else "user"
        # The other side's tables fill every support slot and candidate: required.
        self.item_tables = FeatureTables(self.schema, "item", item_features, self.num_items,
                                         self.device, required=self.other == "item")
        self.user_tables = FeatureTables(self.schema, "user", user_features, self.num_users,
                                         self.device, required=self.other == "user")
        self.item_features, self.user_features = self.item_tables.tables, self.user_tables.tables
        self.users = IdCodec("user", self.num_users, user_keys, self.device)
        self.items = IdCodec("item", self.num_items, item_keys, self.device)
        self.codecs = {"user": self.users, "item": self.items}
        self.tables = {"user": self.user_tables, "item": self.item_tables}
        self.online = callable(getattr(self.policy, "update", None)) and \
            callable(getattr(self.policy, "init_state", None))
        self.compile = bool(compile)
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be >= 1 or None, got {group_size}")
        self.group_size = group_size
        if history_length is not None and self.task_by == "item":
            raise ValueError("history_length (a user's history) cannot be combined with tasks "
                             "per item (data.tasks.task_by: item)")
        if history_length is not None and (isinstance(history_length, bool)
                                           or not isinstance(history_length, int)
                                           or history_length < 1):
            raise ValueError(f"history_length must be an int >= 1 or None, got {history_length!r}")
        if history_length is None and getattr(model.backbone, "needs_history", False):
            raise ValueError(f"the {model.hparams.get('backbone')!r} backbone scores from the "
                             "user's history: pass history_length= (checkpoints of metarec fit "
                             "with data.history_length set carry it)")
        self.history_length = history_length
        self._compiled: Any = None
        # Every candidate of the other side (ids and features), built once.
        count = self.codecs[self.other].count
        self._all_other = {f"{self.other}_id": torch.arange(count, device=self.device),
                           **dict(self.tables[self.other].tables)}

    @classmethod
    def from_checkpoint(cls, path: str | Path, policy: str | None = None,
                        policy_args: dict[str, Any] | None = None, device: str | torch.device = "cpu",
                        *, item_features: Mapping[str, Any] | None = None,
                        user_features: Mapping[str, Any] | None = None,
                        compile: bool = False, group_size: int | None = 128,
                        history_length: int | None = None) -> Adapter:
        """An adapter from a checkpoint made by ``metarec fit``.

        ``policy`` (an alias or class path) and ``policy_args`` replace the checkpoint's
        policy; ``policy_args`` alone replaces its arguments. Feature tables and raw id keys
        come from the checkpoint unless given (checkpoints written before they were stored
        need the other side's tables: ``item_features``, or ``user_features`` for a checkpoint
        of tasks per item).
        """
        from metarec.module import MetaLearner

        ckpt = load_checkpoint(path)
        hparams = dict(ckpt["hyper_parameters"])
        if policy is not None:
            hparams["policy"], hparams["policy_args"] = policy, policy_args
        elif policy_args is not None:
            hparams["policy_args"] = policy_args
        accepted = inspect.signature(MetaLearner).parameters
        kwargs = {k: v for k, v in hparams.items() if k in accepted}
        instantiator = hparams.get("_instantiator")
        with for_inference():  # plugins skip training-only parts (e.g. distill's teacher)
            if instantiator:  # saved by LightningCLI: typed arguments are plain dicts
                module, _, name = str(instantiator).rpartition(".")
                model = getattr(importlib.import_module(module), name)(MetaLearner, kwargs)
            else:
                model = MetaLearner(**kwargs)
        model.load_state_dict(ckpt["state_dict"])
        data = ckpt.get("metarec_data") or {}
        # The other side's tables are required (see __init__): name them when missing.
        other = "user" if getattr(model.schema, "task_by", "user") == "item" else "item"
        given = {"item": item_features, "user": user_features}[other]
        if given is None and f"{other}_features" not in data and model.schema.of(other):
            raise ValueError(f"{path} holds no {other} feature tables (it predates their storage "
                             f"in checkpoints): pass {other}_features={{'{other}.<name>': tensor}}")
        return cls(model.to(device),
                   item_features=data.get("item_features") if item_features is None else item_features,
                   user_features=data.get("user_features") if user_features is None else user_features,
                   user_keys=data.get("user_keys"), item_keys=data.get("item_keys"),
                   compile=compile, group_size=group_size,
                   history_length=history_length if history_length is not None
                   else data.get("history_length"))

    # -- ids ------------------------------------------------------------------------------
    @property
    def user_keys(self) -> list[Hashable] | None:
        return self.users.keys

    @property
    def item_keys(self) -> list[Hashable] | None:
        return self.items.keys

    def encode_user(self, raw: Hashable) -> int:
        """The contiguous id of a raw user id (KeyError if unknown)."""
        return self.users.encode(raw)

    def encode_items(self, raw: Sequence[Hashable]) -> torch.Tensor:
        """Contiguous ids of raw item ids (KeyError naming the first unknown one)."""
        return self.items.encode_many(raw)

    def decode_items(self, items: torch.Tensor | Sequence[int]) -> list[Hashable]:
        """Raw ids of contiguous item ids (the ids themselves when no keys are stored)."""
        return self.items.decode(items)

    def decode_user(self, user: int) -> Hashable:
        return self.users.decode_one(user)

    def encode_item(self, raw: Hashable) -> int:
        """The contiguous id of a raw item id (KeyError if unknown)."""
        return self.items.encode(raw)

    def encode_users(self, raw: Sequence[Hashable]) -> torch.Tensor:
        """Contiguous ids of raw user ids (KeyError naming the first unknown one)."""
        return self.users.encode_many(raw)

    def decode_users(self, users: torch.Tensor | Sequence[int]) -> list[Hashable]:
        """Raw ids of contiguous user ids (the ids themselves when no keys are stored)."""
        return self.users.decode(users)

    def decode_item(self, item: int) -> Hashable:
        return self.items.decode_one(item)

    # -- adaptation -----------------------------------------------------------------------
    def adapt(self, interactions: Any, user: int | None = None, *,
              user_features: Mapping[str, Any] | None = None,
              seed: int | None = None) -> UserSession | dict[int, UserSession]:
        """Adapt one user, or many at once.

        ``interactions`` is one user's events, a sequence of ``(item, label[, timestamp])``
        or an ``(n, 2|3)`` array/tensor (contiguous item ids; replayed in timestamp order, in
        the given order without timestamps), for the contiguous ``user`` id; then a
        :class:`UserSession` is returned. ``user_features`` (``{name: code or multi-hot}``)
        overrides that user's stored features, or gives them for a user the model has no row
        for (``user=None``: then every user feature is required, and a backbone that embeds
        user ids cannot score the user).

        Or ``interactions`` is a mapping ``{user: events}``: all users are adapted together,
        sorted by number of events, one vmapped policy call per ``group_size`` users, and
        ``{user: UserSession}`` is returned.

        ``seed`` seeds a stochastic policy (the global RNG is left as it was).

        For a checkpoint trained with tasks per item use :meth:`adapt_item` (a TypeError here
        says so).
        """
        self._expect("user", "adapt_item(events, item=...)")
        return self._adapt_entry(interactions, user, user_features, seed)

    def adapt_item(self, interactions: Any, item: int | None = None, *,
                   item_features: Mapping[str, Any] | None = None,
                   seed: int | None = None) -> ItemSession | dict[int, ItemSession]:
        """Adapt one new item, or many at once (a checkpoint of tasks per item,
        ``data.tasks.task_by: item``).

        ``interactions`` is one item's events, a sequence of ``(user, label[, timestamp])`` or
        an ``(n, 2|3)`` array/tensor (contiguous user ids; replayed in timestamp order, in the
        given order without timestamps), for the contiguous ``item`` id; an
        :class:`ItemSession` is returned, whose ``recommend`` ranks users for the item. The
        support is built as ``EpisodeCollator`` builds an item task's: each slot holds the
        event's user (``user_id`` and user features) and the item (``item_id``, when ``item``
        is given, and the item's features); the policy adapts from the algorithm's task start
        (e.g. MetaEmb's generated embedding) as in evaluation. No events (``[]``) is the cold
        stage: the session holds the task start, from the item's features only.

        ``item_features`` (``{name: code or multi-hot}``, names with or without ``item.``)
        overrides the item's stored features, or gives them for an item the model has no row
        for (``item=None``: every item feature is required, and a backbone that embeds item
        ids, e.g. mf with ``use_item_table``, cannot score the item).

        Or ``interactions`` is a mapping ``{item: events}``: all items are adapted together
        (one vmapped policy call per ``group_size`` items) and ``{item: ItemSession}`` is
        returned. ``seed`` seeds a stochastic policy.
        """
        self._expect("item", "adapt(events, user=...)")
        return self._adapt_entry(interactions, item, item_features, seed)

    def _expect(self, side: str, instead: str) -> None:
        if self.task_by != side:
            raise TypeError(f"this model adapts {self.task_by}s (its tasks are per "
                            f"{self.task_by}, data.tasks.task_by: {self.task_by}), not {side}s: "
                            f"use adapter.{instead}")

    def _adapt_entry(self, interactions: Any, entity: int | None,
                     overrides: Mapping[str, Any] | None, seed: int | None) -> Any:
        """``adapt``/``adapt_item``: one entity's events, or ``{entity: events}``."""
        side = self.task_by
        if isinstance(interactions, Mapping):
            if entity is not None or overrides is not None:
                raise TypeError(f"adapt{'' if side == 'user' else '_item'}({{{side}: events, "
                                f"...}}) takes no {side} or {side}_features")
            ids = list(interactions)
            parsed = [self._events(interactions[e], f"interactions of {side} {e}") for e in ids]
            return dict(zip(ids, self._adapt(ids, parsed, None, seed)))
        parsed = [self._events(interactions, "interactions")]
        return self._adapt([entity], parsed, overrides, seed)[0]

    def _adapt(self, users: list[int | None],
               parsed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
               overrides: Mapping[str, Any] | None, seed: int | None) -> list[Session]:
        """Adapt task entities (users, or items with tasks per item) from their parsed events
        (``_events``: other-side ids, labels, times; oldest first, validated)."""
        rows = [self._task_row(u, overrides) for u in users]
        session_type = UserSession if self.task_by == "user" else ItemSession
        order = list(range(len(users)))
        size = self.group_size or len(order)
        if len(order) > size:  # similar lengths together: little padding in each group
            order.sort(key=lambda i: len(parsed[i][0]))
        sessions: list[Session | None] = [None] * len(users)
        rng = contextlib.nullcontext() if seed is None else torch.random.fork_rng(
            devices=[] if self.device.type == "cpu" else [self.device])
        with torch.no_grad(), rng:
            if seed is not None:
                torch.manual_seed(seed)
            for lo in range(0, len(order), size):
                group = order[lo:lo + size]
                support = self._support([rows[i] for i in group], [parsed[i] for i in group])
                adapted = self._run(support)
                for j, i in enumerate(group):
                    (uid, values), items = rows[i], parsed[i][0]
                    n = len(items)
                    fast = {k: v[j].clone() for k, v in adapted.items()}
                    state = None
                    if self.online:
                        state = self.policy.init_state({k: v[j, :n] for k, v in support.items()})
                    times = support["time"][j, :n]
                    recent = None
                    if self.history_length is not None:  # the latest events, oldest first
                        keep = slice(max(0, n - self.history_length), n)
                        recent = (items[keep], support["label"][j, keep], times[keep])
                    clock = int(times.max()) if n else -1
                    sessions[i] = session_type(self, uid, values, fast, state,
                                               torch.unique(items), recent, clock)
                    sessions[i]._events = (items, support["label"][j, :n].clone(), times.clone())
        return sessions  # type: ignore[return-value]

    def _run(self, support: FeatureBatch) -> Params:
        """The policy's final iterate for a padded support batch (leading dim = users)."""
        try:
            return self._run_policy(support)
        except KeyError as err:
            raise self._missing_input(err, support) from err

    def _missing_input(self, err: KeyError, batch: FeatureBatch) -> Exception:
        """A clear error when the backbone reads an input the adapter does not build."""
        key = err.args[0] if err.args else None
        if not isinstance(key, str) or key in batch:
            return err
        side = self.task_by
        if key == f"{side}_id":
            return ValueError(f"this backbone embeds {side} ids: adapt the {side} with a "
                              f"contiguous {side} id ({side}=...)")
        return ValueError(f"the {self.model.hparams.get('backbone')!r} backbone reads the input "
                          f"{key!r}, which metarec.Adapter does not build (it builds user_id, "
                          f"item_id, user.* and item.* features)")

    def _run_policy(self, support: FeatureBatch) -> Params:
        if not self.compile:
            return self._final(self.start, self.slow, support)
        users, width = support["mask"].shape
        padded = {k: self._pad(v, _bucket(users, 1), _bucket(width, 64)) for k, v in support.items()}
        if self._compiled is None:
            import torch._dynamo.config as dynamo

            # One graph per padded shape; raise the per-function recompile limit (default 8).
            name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
            setattr(dynamo, name, max(getattr(dynamo, name), 64))
            self._compiled = torch.compile(self._final, dynamic=False)
        adapted = self._compiled(self.start, self.slow, padded)
        return {k: v[:users] for k, v in adapted.items()}

    def _final(self, start: Params, slow: Params, support: FeatureBatch) -> Params:
        """The policy's last iterate, under the model's divergence guard (as in evaluation)."""
        from metarec.module import guard_iterates

        support = self.functional.prepare(slow, support)  # encoded once: policy and guard
        iterates, losses = self.policy.adapt_with_losses(self.functional, start, slow, support)
        guarded, _, _ = guard_iterates(self.functional, iterates, slow, support,
                                       self.model.divergence, losses=losses)
        return guarded[-1]

    @staticmethod
    def _pad(value: torch.Tensor, users: int, width: int) -> torch.Tensor:
        """Pad (B, N, ...) with zeros (mask False) to (users, width, ...)."""
        b, n = value.shape[:2]
        if (b, n) == (users, width):
            return value
        out = value.new_zeros((users, width, *value.shape[2:]))
        out[:b, :n] = value
        return out

    # -- batches --------------------------------------------------------------------------
    def _task_row(self, entity: int | None, overrides: Mapping[str, Any] | None
                  ) -> tuple[int | None, dict[str, torch.Tensor]]:
        """(id, {"<side>.<name>": value}) of one task entity (a user, or an item with tasks
        per item), overrides applied and validated."""
        if entity is not None:
            entity = self.codecs[self.task_by].check_one(entity)
        return entity, self.tables[self.task_by].row(entity, overrides)

    def _others(self, ids: Any, where: str = "candidates") -> torch.Tensor:
        """A 1-D tensor of contiguous ids of the other side (candidates), validated."""
        return self.codecs[self.other].check(ids, where)

    def _items(self, items: Any, where: str = "candidates") -> torch.Tensor:
        """A 1-D tensor of contiguous item ids, validated."""
        return self.items.check(items, where)

    def _events(self, interactions: Any, where: str) -> Events:
        """(other-side ids, labels, times or None) of one task entity's events, oldest first,
        validated: items of a user's events; users of an item's."""
        return parse_events(interactions, where, self.codecs[self.other].count, self.device,
                            other=self.other)

    def _features(self, task: dict[str, torch.Tensor], others: torch.Tensor,
                  shape: tuple[int, ...]) -> FeatureBatch:
        """The feature inputs of slots ``shape``: the task entity's values ``task`` (leading
        dims ``shape[:-1]``, broadcast over the slots) and the other side's gathered for
        ``others``; user features first, as ``EpisodeCollator`` orders them."""
        out: FeatureBatch = {}
        for owner in ("user", "item"):
            if owner == self.task_by:
                for key, value in task.items():
                    tail = value.shape[len(shape) - 1:]  # () or (K,): the value itself
                    out[key] = value.unsqueeze(len(shape) - 1).expand(*shape, *tail)
            elif others is self._all_other[f"{self.other}_id"]:
                out.update({k: v for k, v in self._all_other.items() if k != f"{owner}_id"})
            else:
                out.update(self.tables[owner].gather(others))
        return out

    def _support(self, rows: list[tuple[int | None, dict[str, torch.Tensor]]],
                 parsed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> FeatureBatch:
        """The task entities' events as one padded support batch (B, N), oldest first, as the
        evaluation path's (``EpisodeCollator``) batches are: for users, ``item_id`` and item
        features per slot, the user's in every slot; for items (tasks per item), ``user_id``
        and user features per slot, the item's in every slot."""
        count = len(rows)
        width = max([1] + [len(items) for items, _, _ in parsed])
        items = torch.zeros(count, width, dtype=torch.long, device=self.device)
        labels = torch.zeros(count, width, dtype=torch.float32, device=self.device)
        times = torch.zeros(count, width, dtype=torch.long, device=self.device)
        mask = torch.zeros(count, width, dtype=torch.bool, device=self.device)
        for i, (it, lab, tim) in enumerate(parsed):
            n = len(it)
            items[i, :n], labels[i, :n], mask[i, :n] = it, lab, True
            times[i, :n] = torch.arange(n, device=self.device) if tim is None else tim
        # `items`: the slots' other-side ids (items of users' events; users of items').
        ids: FeatureBatch = {f"{self.other}_id": items}
        if all(uid is not None for uid, _ in rows):
            tasks = torch.tensor([uid for uid, _ in rows], dtype=torch.long, device=self.device)
            ids[f"{self.task_by}_id"] = tasks[:, None].expand(count, width)
        out: FeatureBatch = {k: ids[k] for k in ("user_id", "item_id") if k in ids}
        task = {spec.key: torch.stack([v[spec.key] for _, v in rows])
                for spec in self.schema.of(self.task_by)}  # type: ignore[arg-type]
        out.update(self._features(task, items, (count, width)))
        out.update(label=labels, mask=mask, time=times)
        if self.history_length is not None:
            out.update(self._history(items, labels, times, mask, times, mask))
        return out

    def _history(self, items: torch.Tensor, labels: torch.Tensor, times: torch.Tensor,
                 mask: torch.Tensor, slot_times: torch.Tensor,
                 slot_mask: torch.Tensor) -> FeatureBatch:
        """Each slot's history among the events (:func:`metarec.serving.histories`)."""
        return histories(self.history_length, self.item_features, items, labels, times, mask,
                         slot_times, slot_mask)

    def _rows(self, entity: int | None, values: dict[str, torch.Tensor], others: torch.Tensor,
              labels: torch.Tensor | None = None, times: torch.Tensor | None = None,
              history: FeatureBatch | None = None) -> FeatureBatch:
        """One task entity's feature batch over ``others`` (unbatched rows: items of a user,
        users of an item); ``history``: the rows' ``history.*`` inputs, ``(n, H, ...)``."""
        n = others.shape[0]
        ids: FeatureBatch = {f"{self.other}_id": others}
        if entity is not None:
            ids[f"{self.task_by}_id"] = torch.full((n,), entity, dtype=torch.long,
                                                   device=self.device)
        out: FeatureBatch = {k: ids[k] for k in ("user_id", "item_id") if k in ids}
        out.update(self._features(values, others, (n,)))
        if labels is not None:
            out["label"] = labels
            out["mask"] = torch.ones(n, dtype=torch.bool, device=self.device)
            out["time"] = torch.arange(n, device=self.device) if times is None else times
        out.update(history or {})
        return out
