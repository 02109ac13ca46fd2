"""One adapted entity's state: its fast parameters, what it has seen, and its top-k.

Made by :meth:`metarec.Adapter.adapt`; see :mod:`metarec.adapter` for how sessions adapt and
update. Sessions never share state, and the meta-learned weights are never written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from metarec.data.episodes import FeatureBatch
from metarec.functional import Params

if TYPE_CHECKING:
    from metarec.adapter import Adapter

__all__ = ["Recommendations", "UserSession"]


class Recommendations(NamedTuple):
    """Top-k of a session: contiguous item ids, best first, and their scores (predicted
    ratings for explicit feedback, logits for implicit)."""

    items: torch.Tensor
    scores: torch.Tensor


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
