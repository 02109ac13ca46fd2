"""Deployment-time adaptation: a checkpoint from ``metarec fit`` in, adapted users out.

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

For any other policy, ``update`` re-runs the policy's ``adapt`` on the new events starting from
the session's current parameters (finetune: ``steps`` more steps on the new feedback).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from metarec.checkpoint import for_inference, load_checkpoint
from metarec.data.episodes import EpisodeCollator, FeatureBatch
from metarec.functional import Params

if TYPE_CHECKING:  # the module (and Lightning) is imported when a checkpoint is loaded
    from metarec.module import MetaLearner

__all__ = ["Adapter", "Recommendations", "UserSession"]


class Recommendations(NamedTuple):
    """Top-k of a session: contiguous item ids, best first, and their scores (predicted
    ratings for explicit feedback, logits for implicit)."""

    items: torch.Tensor
    scores: torch.Tensor


def _bucket(n: int, minimum: int) -> int:
    """The next power of two >= max(n, minimum): shapes seen by a compiled adapt function."""
    return 1 << max(int(n) - 1, minimum - 1, 0).bit_length()


class Adapter:
    """Adapts users with a meta-learned model and its adaptation policy; see the module doc.

    Usually made with :meth:`from_checkpoint`. The model is put in eval mode and never
    written to.

    Args:
        model: a trained :class:`~metarec.module.MetaLearner` (its policy is the one used).
        item_features: ``{"item.<name>": (num_items, ...) tensor}`` for every item feature of
            the schema (required when the schema has item features).
        user_features: ``{"user.<name>": (num_users, ...) tensor}``; without them every user's
            features must be passed to :meth:`adapt` (``user_features=``).
        user_keys, item_keys: raw id of each contiguous id (``keys[i]`` is id ``i``'s raw id).
        compile: run the policy through ``torch.compile`` (one compiled graph per padded
            shape: users and events per user are padded to powers of two, so a handful of
            shapes serve any request). The first call of each shape compiles (tens of seconds on
            a small CPU); later calls are many times faster than eager. See
            docs/adaptation.md for the numbers.
        group_size: users per vmapped policy call when many are adapted at once: they are
            sorted by number of events and adapted in groups of this many, so that padding
            every user to the group's longest support wastes little (None: one call for all).
        history_length: give every slot the user's history, as ``data.history_length`` does in
            training (``history.*`` inputs, for sequential backbones such as ``transformer``):
            a support event sees the user's latest ``history_length`` events strictly before
            it; a scored candidate sees the latest ``history_length`` events of all.
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
        self.item_features = self._tables("item", item_features, self.num_items, required=True)
        self.user_features = self._tables("user", user_features, self.num_users, required=False)
        self.user_keys = None if user_keys is None else list(user_keys)
        self.item_keys = None if item_keys is None else list(item_keys)
        for name, keys, n in (("user_keys", self.user_keys, self.num_users),
                              ("item_keys", self.item_keys, self.num_items)):
            if keys is not None and len(keys) != n:
                raise ValueError(f"{name} has {len(keys)} entries, the model has {n}")
        self._user_index: dict[Hashable, int] | None = None
        self._item_index: dict[Hashable, int] | None = None
        self.online = callable(getattr(self.policy, "update", None)) and \
            callable(getattr(self.policy, "init_state", None))
        self.compile = bool(compile)
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be >= 1 or None, got {group_size}")
        self.group_size = group_size
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
        all_items = torch.arange(self.num_items, device=self.device)
        self._all_items = {"item_id": all_items,
                           **{k: v for k, v in self.item_features.items()}}

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
        need ``item_features``).
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
        if item_features is None and "item_features" not in data and model.schema.of("item"):
            raise ValueError(f"{path} holds no item feature tables (it predates their storage "
                             "in checkpoints): pass item_features={'item.<name>': tensor}")
        return cls(model.to(device),
                   item_features=data.get("item_features") if item_features is None else item_features,
                   user_features=data.get("user_features") if user_features is None else user_features,
                   user_keys=data.get("user_keys"), item_keys=data.get("item_keys"),
                   compile=compile, group_size=group_size,
                   history_length=history_length if history_length is not None
                   else data.get("history_length"))

    # -- ids ------------------------------------------------------------------------------
    def encode_user(self, raw: Hashable) -> int:
        """The contiguous id of a raw user id (KeyError if unknown)."""
        if self.user_keys is None:
            raise ValueError("this checkpoint stores no raw user ids: use contiguous ids")
        if self._user_index is None:
            self._user_index = {k: i for i, k in enumerate(self.user_keys)}
        if raw not in self._user_index:
            raise KeyError(f"unknown user id {raw!r}: not among the model's {self.num_users} users")
        return self._user_index[raw]

    def encode_items(self, raw: Sequence[Hashable]) -> torch.Tensor:
        """Contiguous ids of raw item ids (KeyError naming the first unknown one)."""
        if self.item_keys is None:
            raise ValueError("this checkpoint stores no raw item ids: use contiguous ids")
        if self._item_index is None:
            self._item_index = {k: i for i, k in enumerate(self.item_keys)}
        index = self._item_index
        for position, key in enumerate(raw):
            if key not in index:
                raise KeyError(f"unknown item id {key!r} at position {position}: not among the "
                               f"model's {self.num_items} items")
        return torch.tensor([index[k] for k in raw], dtype=torch.long, device=self.device)

    def decode_items(self, items: torch.Tensor | Sequence[int]) -> list[Hashable]:
        """Raw ids of contiguous item ids (the ids themselves when no keys are stored)."""
        ids = [int(i) for i in items]
        return ids if self.item_keys is None else [self.item_keys[i] for i in ids]

    def decode_user(self, user: int) -> Hashable:
        return user if self.user_keys is None else self.user_keys[int(user)]

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
        """
        if isinstance(interactions, Mapping):
            if user is not None or user_features is not None:
                raise TypeError("adapt({user: events, ...}) takes no user or user_features")
            users = list(interactions)
            parsed = [self._events(interactions[u], f"interactions of user {u}") for u in users]
            return dict(zip(users, self._adapt(users, parsed, None, seed)))
        parsed = [self._events(interactions, "interactions")]
        return self._adapt([user], parsed, user_features, seed)[0]

    def _adapt(self, users: list[int | None],
               parsed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
               overrides: Mapping[str, Any] | None, seed: int | None) -> list[UserSession]:
        """Adapt users from their parsed events (``_events``: oldest first, validated)."""
        rows = [self._user_row(u, overrides) for u in users]
        order = list(range(len(users)))
        size = self.group_size or len(order)
        if len(order) > size:  # similar lengths together: little padding in each group
            order.sort(key=lambda i: len(parsed[i][0]))
        sessions: list[UserSession | None] = [None] * len(users)
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
                    sessions[i] = UserSession(self, uid, values, fast, state,
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
        if key == "user_id":
            return ValueError("this backbone embeds user ids: adapt the user with a contiguous "
                              "user id (user=...)")
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

        iterates = self.policy.adapt(self.functional, start, slow, support)
        guarded, _, _ = guard_iterates(self.functional, iterates, slow, support,
                                       self.model.divergence)
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
    def _user_row(self, user: int | None,
                  overrides: Mapping[str, Any] | None) -> tuple[int | None, dict[str, torch.Tensor]]:
        """(user id, {"user.<name>": value}) of one user, overrides applied and validated."""
        if user is not None:
            if isinstance(user, bool) or not isinstance(user, (int, np.integer)) \
                    or not 0 <= int(user) < self.num_users:
                raise ValueError(f"user {user!r} is not a contiguous user id in "
                                 f"[0, {self.num_users})" + (
                                     "; map raw ids with adapter.encode_user"
                                     if self.user_keys is not None else ""))
            user = int(user)
        values: dict[str, torch.Tensor] = {}
        given = {}
        for name, value in (overrides or {}).items():
            key = name if name.startswith("user.") else f"user.{name}"
            given[key] = value
        specs = {s.key: s for s in self.schema.of("user")}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            raise ValueError(f"unknown user feature(s) {unknown}; the model's are {sorted(specs)}")
        for key, spec in specs.items():
            if key in given:
                values[key] = self._feature_value(spec, given[key])
            elif user is not None and key in self.user_features:
                values[key] = self.user_features[key][user]
            else:
                raise ValueError(f"user feature {key!r} is needed: " + (
                    "pass user=<contiguous id> or user_features={...}" if user is None else
                    "this adapter has no user feature tables; pass user_features={...}"))
        return user, values

    def _feature_value(self, spec: Any, value: Any) -> torch.Tensor:
        if spec.kind == "categorical":
            code = int(value)
            if code != value or not 0 <= code < spec.cardinality:
                raise ValueError(f"{spec.key}: expected a code in [0, {spec.cardinality}), "
                                 f"got {value!r}")
            return torch.tensor(code, dtype=torch.long, device=self.device)
        vec = torch.as_tensor(value, dtype=torch.float32, device=self.device)
        if vec.shape != (spec.cardinality,):
            raise ValueError(f"{spec.key}: expected a multi-hot vector of {spec.cardinality}, "
                             f"got shape {tuple(vec.shape)}")
        return vec

    def _items(self, items: Any, where: str = "candidates") -> torch.Tensor:
        """A 1-D tensor of contiguous item ids, validated."""
        ids = torch.as_tensor(items, device=self.device)
        if ids.ndim != 1 or (ids.numel() and (ids.is_floating_point() or ids.dtype == torch.bool)):
            raise ValueError(f"{where}: expected a 1-D sequence of integer item ids, got "
                             f"{tuple(ids.shape)} {ids.dtype}")
        ids = ids.long()
        outside = (ids < 0) | (ids >= self.num_items)
        if bool(outside.any()):
            bad = int(torch.nonzero(outside)[0])
            raise ValueError(f"{where}[{bad}]: item {int(ids[bad])} is not a contiguous item id "
                             f"in [0, {self.num_items})")
        return ids

    def _events(self, interactions: Any,
                where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(items, labels, times or None) of one user's events, oldest first, validated."""
        if isinstance(interactions, (torch.Tensor, np.ndarray)):
            array = torch.as_tensor(interactions)
            if array.ndim != 2 or array.shape[1] not in (2, 3):
                if array.numel() == 0:
                    array = array.reshape(0, 2)
                else:
                    raise ValueError(f"{where}: expected shape (n, 2) or (n, 3) as (item, label"
                                     f"[, timestamp]), got {tuple(array.shape)}")
            columns = list(array.unbind(1))
        else:
            events = list(interactions)
            width = {len(e) for e in events}
            if not width <= {2, 3} or len(width) > 1:
                bad = next(i for i, e in enumerate(events) if len(e) not in (2, 3) or
                           len(e) != len(events[0]))
                raise ValueError(f"{where}: event {bad} is {events[bad]!r}; every event must be "
                                 "(item, label) or (item, label, timestamp), all alike")
            columns = [[e[j] for e in events] for j in range(width.pop() if width else 2)]
        items = torch.as_tensor(columns[0], device=self.device)
        if items.is_floating_point():
            if not bool((items == items.round()).all()):
                bad = int(torch.nonzero(items != items.round())[0])
                raise ValueError(f"{where}: event {bad}: item {items[bad].item()!r} is not an id")
        items = items.long()
        outside = (items < 0) | (items >= self.num_items)
        if bool(outside.any()):
            bad = int(torch.nonzero(outside)[0])
            raise ValueError(f"{where}: event {bad}: item {int(items[bad])} is not a contiguous "
                             f"item id in [0, {self.num_items})")
        labels = torch.as_tensor(columns[1], dtype=torch.float32, device=self.device)
        if not bool(torch.isfinite(labels).all()):
            bad = int(torch.nonzero(~torch.isfinite(labels))[0])
            raise ValueError(f"{where}: event {bad}: label {float(labels[bad])} is not finite")
        times = None
        if len(columns) == 3:
            times = torch.as_tensor(columns[2], device=self.device).long()
            order = torch.sort(times, stable=True).indices
            items, labels, times = items[order], labels[order], times[order]
        return items, labels, times

    def _support(self, rows: list[tuple[int | None, dict[str, torch.Tensor]]],
                 parsed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> FeatureBatch:
        """The users' events as one padded support batch (B, N), oldest first, as the
        evaluation path's (``EpisodeCollator``) batches are."""
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
        out: FeatureBatch = {}
        if all(uid is not None for uid, _ in rows):
            users = torch.tensor([uid for uid, _ in rows], dtype=torch.long, device=self.device)
            out["user_id"] = users[:, None].expand(count, width)
        out["item_id"] = items
        for spec in self.schema.of("user"):
            values = torch.stack([v[spec.key] for _, v in rows])
            out[spec.key] = values[:, None].expand(count, width, *values.shape[1:])
        for key, table in self.item_features.items():
            out[key] = table[items]
        out.update(label=labels, mask=mask, time=times)
        if self.history_length is not None:
            out.update(self._history(items, labels, times, mask, times, mask))
        return out

    def _history(self, items: torch.Tensor, labels: torch.Tensor, times: torch.Tensor,
                 mask: torch.Tensor, slot_times: torch.Tensor,
                 slot_mask: torch.Tensor) -> FeatureBatch:
        """Each slot's history among the events ``(B, P)`` (stored oldest first): the latest
        ``history_length`` strictly before the slot's time, exactly as ``EpisodeCollator``
        computes it in training and evaluation, padded to ``history_length`` (mask False)."""
        h = self.history_length
        tables = SimpleNamespace(history_length=h, item_features=self.item_features)
        out = EpisodeCollator._history(tables, items, labels, times, mask, slot_times, slot_mask)
        return {k: self._pad_history(v, h) for k, v in out.items()}

    @staticmethod
    def _pad_history(value: torch.Tensor, width: int) -> torch.Tensor:
        if value.shape[2] == width:
            return value
        out = value.new_zeros((*value.shape[:2], width, *value.shape[3:]))
        out[:, :, :value.shape[2]] = value[:, :, :width]
        return out

    def _rows(self, user: int | None, values: dict[str, torch.Tensor], items: torch.Tensor,
              labels: torch.Tensor | None = None, times: torch.Tensor | None = None,
              history: FeatureBatch | None = None) -> FeatureBatch:
        """One user's feature batch over ``items`` (unbatched rows); ``history``: the rows'
        ``history.*`` inputs, ``(n, H, ...)``."""
        n = items.shape[0]
        out: FeatureBatch = {}
        if user is not None:
            out["user_id"] = torch.full((n,), user, dtype=torch.long, device=self.device)
        out["item_id"] = items
        for key, value in values.items():
            out[key] = value.expand(n, *value.shape)
        if items is self._all_items["item_id"]:
            out.update({k: v for k, v in self._all_items.items() if k != "item_id"})
        else:
            for key, table in self.item_features.items():
                out[key] = table[items]
        if labels is not None:
            out["label"] = labels
            out["mask"] = torch.ones(n, dtype=torch.bool, device=self.device)
            out["time"] = torch.arange(n, device=self.device) if times is None else times
        out.update(history or {})
        return out

    def _tables(self, owner: str, given: Mapping[str, Any] | None, count: int,
                required: bool) -> dict[str, torch.Tensor]:
        specs = self.schema.of(owner)  # type: ignore[arg-type]
        if given is None:
            if required and specs:
                raise ValueError(f"the model needs {owner} feature tables "
                                 f"{[s.key for s in specs]}: pass {owner}_features=")
            return {}
        tables = {}
        for spec in specs:
            if spec.key not in given:
                raise ValueError(f"{owner}_features lacks {spec.key!r}; needs "
                                 f"{[s.key for s in specs]}")
            dtype = torch.long if spec.kind == "categorical" else torch.float32
            table = torch.as_tensor(given[spec.key], dtype=dtype).to(self.device)
            want = (count,) if spec.kind == "categorical" else (count, spec.cardinality)
            if tuple(table.shape) != want:
                raise ValueError(f"{owner}_features[{spec.key!r}] has shape {tuple(table.shape)}, "
                                 f"expected {want}")
            tables[spec.key] = table
        return tables


class UserSession:
    """One adapted user: their fast parameters (and the policy's per-user state).

    Made by :meth:`Adapter.adapt`. ``recommend`` scores items with the user's parameters;
    ``update`` adapts them further to new feedback. Nothing is shared with other sessions.
    """

    def __init__(self, adapter: Adapter, user: int | None, user_values: dict[str, torch.Tensor],
                 fast: Params, state: Any, seen: torch.Tensor,
                 recent: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 clock: int = -1) -> None:
        self.adapter = adapter
        self.user = user
        self._values = user_values
        self._fast = fast
        self._state = state
        self._seen = seen
        # With histories: the user's latest `history_length` events (items, labels, times),
        # oldest first. `clock`: the latest event time (events without timestamps follow it).
        self._recent = recent
        self._clock = clock
        # Every event so far (items, labels, times), oldest first: non-incremental policies
        # re-adapt from the meta-learned start on all of them at each update.
        self._events: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _candidate_history(self, n: int) -> FeatureBatch | None:
        """The ``history.*`` inputs of ``n`` candidates scored now: the latest events."""
        adapter = self.adapter
        if adapter.history_length is None or self._recent is None:
            return None
        items, labels, times = (x[None] for x in self._recent)
        mask = torch.ones_like(items, dtype=torch.bool)
        now = torch.full((1, 1), torch.iinfo(torch.long).max, device=adapter.device)
        history = adapter._history(items, labels, times, mask, now, torch.ones_like(now, dtype=torch.bool))
        return {k: v[0, 0].expand(n, *v.shape[2:]) for k, v in history.items()}

    @property
    def fast(self) -> Params:
        """This user's adapted fast parameters (a copy of the dict; tensors are never written)."""
        return dict(self._fast)

    @property
    def state(self) -> Any:
        """The policy's per-user state (``online``: the replay buffer), or None."""
        return self._state

    @property
    def seen(self) -> torch.Tensor:
        """Contiguous ids of the items this user has interacted with (sorted)."""
        return self._seen

    def scores(self, items: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Scores of ``items`` (contiguous ids; default every item) for this user."""
        adapter = self.adapter
        every = adapter._all_items["item_id"]
        items = every if items is None or items is every else adapter._items(items)
        batch = adapter._rows(self.user, self._values, items,
                              history=self._candidate_history(len(items)))
        with torch.no_grad():
            try:
                return adapter.functional.predict(self._fast, adapter.slow, batch)
            except KeyError as err:
                raise adapter._missing_input(err, batch) from err

    def recommend(self, k: int = 10, candidates: torch.Tensor | Sequence[int] | None = None,
                  exclude_seen: bool = True, epsilon: float = 0.0,
                  generator: torch.Generator | None = None) -> Recommendations:
        """The ``k`` best-scored candidates (default: every item), best first.

        Items the user has interacted with (in ``adapt`` or ``update``) are left out unless
        ``exclude_seen`` is false. Ties keep candidate order. Fewer than ``k`` are returned
        when fewer candidates are left.

        ``epsilon`` > 0 explores (epsilon-greedy): each of the ``k`` slots, independently with
        probability ``epsilon``, shows a uniformly drawn candidate not yet in the list instead of
        the best remaining one, trading immediate accuracy for information about the new user.
        ``generator`` makes the draws reproducible.
        """
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        adapter = self.adapter
        items = adapter._all_items["item_id"] if candidates is None else adapter._items(candidates)
        scores = self.scores(items)
        if exclude_seen and len(self._seen):
            if candidates is None:
                keep = torch.ones(len(items), dtype=torch.bool, device=adapter.device)
                keep[self._seen] = False
            else:
                keep = ~torch.isin(items, self._seen)
            items, scores = items[keep], scores[keep]
        ranked = torch.sort(scores, descending=True, stable=True).indices
        if epsilon == 0.0:
            order = ranked[:k]
        else:
            order = self._explore(ranked, min(k, len(ranked)), epsilon, generator)
        return Recommendations(items[order].clone(), scores[order])

    @staticmethod
    def _explore(ranked: torch.Tensor, k: int, epsilon: float,
                 generator: torch.Generator | None) -> torch.Tensor:
        """Epsilon-greedy slots over candidates ``ranked`` best first (indices into them)."""
        explore = torch.rand(k, generator=generator) < epsilon
        taken = torch.zeros(len(ranked), dtype=torch.bool)
        picks = []
        for slot in range(k):
            free = (~taken).nonzero().flatten()
            if explore[slot]:
                j = free[torch.randint(len(free), (1,), generator=generator)].item()
            else:
                j = free[0].item()  # the best candidate not shown yet
            taken[j] = True
            picks.append(j)
        return ranked[torch.as_tensor(picks, dtype=torch.long, device=ranked.device)]

    def update(self, feedback_events: Any) -> UserSession:
        """Adapt this user's parameters to new feedback (``(item, label[, timestamp])`` events
        as in :meth:`Adapter.adapt`, replayed in timestamp order). Only this session changes.

        With an incremental policy (``online``) its ``update`` is applied (one update per chunk
        of events, on the user's replay buffer); otherwise the policy adapts again from the
        meta-learned start on every event so far (the support set grows), exactly as evaluation
        adapts a support set. Returns the session.
        """
        adapter = self.adapter
        items, labels, times = adapter._events(feedback_events, "feedback events")
        if len(items) == 0:
            return self
        if times is None:  # after every event so far, in the given order
            times = self._clock + 1 + torch.arange(len(items), device=adapter.device)
        history = None
        if adapter.history_length is not None and self._recent is not None:
            # Each new event's history: the latest earlier events among the recent ones and
            # the new ones (all oldest first, as in a support set).
            past = [torch.cat([old, new]) for old, new in zip(self._recent, (items, labels, times))]
            order = torch.sort(past[2], stable=True).indices
            past = [x[order] for x in past]
            ones = torch.ones(1, len(past[0]), dtype=torch.bool, device=adapter.device)
            history = adapter._history(past[0][None], past[1][None], past[2][None], ones,
                                       times[None], torch.ones_like(times[None], dtype=torch.bool))
            history = {k: v[0] for k, v in history.items()}
            keep = slice(max(0, len(past[0]) - adapter.history_length), None)
            recent = (past[0][keep], past[1][keep], past[2][keep])
        events = adapter._rows(self.user, self._values, items, labels, times, history)
        policy, model = adapter.policy, adapter.functional
        with torch.no_grad():
            if adapter.online:
                self._fast, self._state = policy.update(model, self._fast, adapter.slow,
                                                        adapter.start, self._state, events)
            elif self._events is not None:
                # As evaluation does: adapt from the meta-learned start on the whole support
                # set, now the earlier events plus the new feedback (repeating k steps on each
                # new event from the current parameters drifts and can diverge).
                merged = [torch.cat([old, new]) for old, new in
                          zip(self._events, (items, labels, times.to(self._events[2].dtype)))]
                order = torch.sort(merged[2], stable=True).indices
                self._events = tuple(x[order] for x in merged)
                support = adapter._support([(self.user, self._values)], [self._events])
                self._fast = {k: v[0].clone() for k, v in adapter._run(support).items()}
            else:
                batch = {k: v[None] for k, v in events.items()}
                adapted = policy.adapt(model, self._fast, adapter.slow, batch)[-1]
                self._fast = {k: v[0] for k, v in adapted.items()}
        self._seen = torch.unique(torch.cat([self._seen, items]))
        self._clock = max(self._clock, int(times.max()))
        if history is not None:
            self._recent = recent
        return self

    def __repr__(self) -> str:
        user = "new user" if self.user is None else f"user {self.user}"
        return f"UserSession({user}, {len(self._seen)} items seen)"



# -- metarec adapt ---------------------------------------------------------------------------
def read_interactions(path: str | Path, adapter: Adapter) -> dict[int, tuple[torch.Tensor, ...]]:
    """Events per user of a CSV/Parquet file with columns ``user, item, label[, timestamp]``.

    Ids are raw ids when the checkpoint stores keys (as in the training data), else contiguous
    ids. Returns ``{contiguous user: (items, labels, times or None)}``, users in order of first
    appearance, each user's events in timestamp order (file order without timestamps). A bad
    value raises a :class:`DataError` naming the file, line and field.
    """
    from metarec.data import DataError, numeric_column, read_frame, require_columns

    frame = read_frame(path)
    require_columns(frame, ["user", "item", "label"])
    source, lines = frame.attrs.get("source"), frame.attrs["line"]

    def ids(field: str, keys: list[Hashable] | None, count: int) -> np.ndarray:
        if keys is None:
            return numeric_column(frame, field, integer=True, minimum=0, maximum=count - 1)
        if all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in keys):
            raw: Sequence[Hashable] = numeric_column(frame, field, integer=True).tolist()
        else:
            raw = frame[field].astype(str).tolist()
            keys = [str(k) for k in keys]
        index = {k: i for i, k in enumerate(keys)}
        out = np.empty(len(raw), dtype=np.int64)
        for row, key in enumerate(raw):
            code = index.get(key)
            if code is None:
                raise DataError(f"unknown {field} id {key!r}: not among the checkpoint's "
                                f"{count} {field}s", source=source, line=int(lines[row]),
                                field=field)
            out[row] = code
        return out

    users = ids("user", adapter.user_keys, adapter.num_users)
    items = ids("item", adapter.item_keys, adapter.num_items)
    schema = adapter.schema
    low, high = ((0.0, 1.0) if schema.feedback == "implicit" else
                 (schema.rating_range or (None, None)))
    labels = numeric_column(frame, "label", minimum=low, maximum=high)
    times = numeric_column(frame, "timestamp", integer=True) if "timestamp" in frame else None
    # Grouped by user; within a user by timestamp (file order on ties, or without timestamps).
    order = np.lexsort((np.arange(len(users)),) + (() if times is None else (times,)) + (users,))
    first = {}
    for u in users.tolist():
        first.setdefault(u, len(first))
    grouped: dict[int, tuple[torch.Tensor, ...]] = {}
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    for rows in np.split(order, bounds) if len(order) else []:
        user = int(users[rows[0]])
        grouped[user] = (torch.as_tensor(items[rows], device=adapter.device),
                         torch.as_tensor(labels[rows], dtype=torch.float32, device=adapter.device),
                         None if times is None else torch.as_tensor(times[rows],
                                                                    device=adapter.device))
    return {u: grouped[u] for u in sorted(grouped, key=first.__getitem__)}


def adapt_command(argv: Any, stream: Any = None) -> None:
    """``metarec adapt``: adapt the users of an interactions file and print their top-k as JSON
    Lines (one object per user: ``{"user": id, "items": [ids], "scores": [floats]}``).

    ``argv``: the command's parsed arguments (:func:`metarec.cli.add_adapt_arguments`), or an
    argument list (``["--ckpt_path", CKPT, "--interactions", FILE]``) parsed here."""
    import json
    import sys

    from metarec.cli import EXTRA_COMMANDS, add_adapt_arguments, new_parser
    from metarec.data import DataError
    from metarec.registry import PluginError

    if isinstance(argv, (list, tuple)):
        parser = new_parser(prog="metarec adapt", description=EXTRA_COMMANDS["adapt"])
        add_adapt_arguments(parser)
        argv = parser.parse_args(list(argv))
    args = argv
    stream = stream or sys.stdout
    try:
        adapter = Adapter.from_checkpoint(args.ckpt_path, policy=args.policy,
                                          policy_args=args.policy_args, device=args.device)
        events = read_interactions(args.interactions, adapter)
        users = list(events)
        for lo in range(0, len(users), args.batch_users):
            chunk = users[lo:lo + args.batch_users]
            sessions = adapter._adapt(chunk, [events[u] for u in chunk], None, args.seed)
            for user, session in zip(chunk, sessions):
                rec = session.recommend(args.k, exclude_seen=not args.include_seen)
                stream.write(json.dumps({"user": adapter.decode_user(user),
                                         "items": adapter.decode_items(rec.items),
                                         "scores": [float(x) for x in rec.scores]}) + "\n")
    except (DataError, PluginError, ValueError, KeyError, FileNotFoundError) as err:
        text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"metarec adapt: error: {text}".replace("\n", "\n  "), file=sys.stderr)
        raise SystemExit(2) from None
