"""One adapted entity's state: its fast parameters, what it has seen, and its top-k.

A session belongs to the entity a task adapts (``data.tasks.task_by`` of the checkpoint): a
:class:`UserSession` (made by :meth:`metarec.Adapter.adapt`) holds a user's fast parameters and
ranks items; an :class:`ItemSession` (made by :meth:`metarec.Adapter.adapt_item`, for a model
trained with tasks per item) holds an item's and ranks *users* (the item's target audience).
Both are :class:`Session` s: the same code with the roles swapped. See :mod:`metarec.adapter`
for how sessions adapt and update. Sessions never share state, and the meta-learned weights are
never written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from metarec.data.episodes import FeatureBatch
from metarec.functional import Params

if TYPE_CHECKING:
    from metarec.adapter import Adapter

__all__ = ["ItemSession", "RankedUsers", "Recommendations", "Session", "UserSession"]


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, best first, ties in index order: the first ``k`` of
    a stable descending sort, without sorting every score (``topk`` finds the k-th score; only
    the scores at or above it are sorted), which matters for catalogues of a million items."""
    n = scores.shape[0]
    if k >= n:
        return torch.sort(scores, descending=True, stable=True).indices
    kth = torch.topk(scores, k, sorted=False).values.min()
    if not bool(torch.isfinite(kth)):  # NaN or -inf among the top: the full sort's order
        return torch.sort(scores, descending=True, stable=True).indices[:k]
    keep = (scores >= kth).nonzero().flatten()  # index order
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices[:k]]


class Recommendations(NamedTuple):
    """Top-k of a user session: contiguous item ids, best first, and their scores (predicted
    ratings for explicit feedback, logits for implicit)."""

    items: torch.Tensor
    scores: torch.Tensor

    @property
    def ids(self) -> torch.Tensor:
        """The ranked ids (``items``), whichever the side: for code serving either kind."""
        return self.items


class RankedUsers(NamedTuple):
    """Top-k of an item session: contiguous user ids, best first (the users to show the item
    to), and their scores (predicted ratings for explicit feedback, logits for implicit)."""

    users: torch.Tensor
    scores: torch.Tensor

    @property
    def ids(self) -> torch.Tensor:
        """The ranked ids (``users``), whichever the side: for code serving either kind."""
        return self.users


class Session:
    """One adapted entity (a user, or an item with tasks per item): its fast parameters (and
    the policy's per-entity state).

    The entity's *events* are ``(other, label[, timestamp])``, ``other`` being the other side's
    contiguous id (the items a user rated; the users an item was shown to). ``recommend``
    ranks other-side candidates with the entity's parameters; ``update`` adapts them further to
    new feedback. Nothing is shared with other sessions. Use :class:`UserSession` or
    :class:`ItemSession`, which name the sides.
    """

    side = "user"  # the entity this session adapts; its candidates are the other side's
    ranked: type = Recommendations

    def __init__(self, adapter: Adapter, entity: int | None, values: dict[str, torch.Tensor],
                 fast: Params, state: Any, seen: torch.Tensor,
                 recent: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 clock: int = -1) -> None:
        self.adapter = adapter
        self.entity = entity  # contiguous id, or None for an entity the model has no row for
        self._values = values  # {"<side>.<name>": value}: the entity's features
        self._fast = fast
        self._state = state
        self._seen = seen
        # With histories (user side only): the user's latest `history_length` events (items,
        # labels, times), oldest first. `clock`: the latest event time (events without
        # timestamps follow it).
        self._recent = recent
        self._clock = clock
        # Every event so far (other ids, labels, times), oldest first: non-incremental
        # policies re-adapt from the meta-learned start on all of them at each update.
        self._events: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def other(self) -> str:
        return "item" if self.side == "user" else "user"

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
        """The adapted fast parameters (a copy of the dict; tensors are never written)."""
        return dict(self._fast)

    @property
    def state(self) -> Any:
        """The policy's per-entity state (``online``: the replay buffer), or None."""
        return self._state

    @property
    def seen(self) -> torch.Tensor:
        """Contiguous ids of the other side's entities in this session's events (sorted)."""
        return self._seen

    def scores(self, candidates: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Scores of ``candidates`` (contiguous other-side ids; default all of them)."""
        adapter = self.adapter
        every = adapter._all_other[f"{self.other}_id"]
        ids = every if candidates is None or candidates is every else adapter._others(candidates)
        batch = adapter._rows(self.entity, self._values, ids,
                              history=self._candidate_history(len(ids)))
        with torch.no_grad():
            try:
                return adapter.functional.predict(self._fast, adapter.slow, batch)
            except KeyError as err:
                raise adapter._missing_input(err, batch) from err

    def recommend(self, k: int = 10, candidates: torch.Tensor | Sequence[int] | None = None,
                  exclude_seen: bool = True, epsilon: float = 0.0,
                  generator: torch.Generator | None = None) -> Any:
        """The ``k`` best-scored candidates (default: every one of the other side), best first.

        Candidates in this session's events (in ``adapt`` or ``update``) are left out unless
        ``exclude_seen`` is false. Ties keep candidate order. Fewer than ``k`` are returned
        when fewer candidates are left.

        ``epsilon`` > 0 explores (epsilon-greedy): each of the ``k`` slots, independently with
        probability ``epsilon``, shows a uniformly drawn candidate not yet in the list instead of
        the best remaining one, trading immediate accuracy for information about the new entity.
        ``generator`` makes the draws reproducible.
        """
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        adapter = self.adapter
        every = adapter._all_other[f"{self.other}_id"]
        ids = every if candidates is None else adapter._others(candidates)
        scores = self.scores(ids)
        if exclude_seen and len(self._seen):
            if candidates is None:
                keep = torch.ones(len(ids), dtype=torch.bool, device=adapter.device)
                keep[self._seen] = False
            else:
                keep = ~torch.isin(ids, self._seen)
            ids, scores = ids[keep], scores[keep]
        if epsilon == 0.0:
            order = top_k(scores, k)
        else:
            ranked = torch.sort(scores, descending=True, stable=True).indices
            order = self._explore(ranked, min(k, len(ranked)), epsilon, generator)
        return self.ranked(ids[order].clone(), scores[order])

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

    def update(self, feedback_events: Any) -> Session:
        """Adapt the parameters to new feedback (``(other, label[, timestamp])`` events as in
        ``adapt``, replayed in timestamp order). Only this session changes.

        With an incremental policy (``online``) its ``update`` is applied (one update per chunk
        of events, on the session's replay buffer); otherwise the policy adapts again from the
        meta-learned start on every event so far (the support set grows), exactly as evaluation
        adapts a support set. Returns the session.
        """
        adapter = self.adapter
        others, labels, times = adapter._events(feedback_events, "feedback events")
        if len(others) == 0:
            return self
        if times is None:  # after every event so far, in the given order
            times = self._clock + 1 + torch.arange(len(others), device=adapter.device)
        history = None
        if adapter.history_length is not None and self._recent is not None:
            # Each new event's history: the latest earlier events among the recent ones and
            # the new ones (all oldest first, as in a support set).
            past = [torch.cat([old, new]) for old, new in zip(self._recent, (others, labels, times))]
            order = torch.sort(past[2], stable=True).indices
            past = [x[order] for x in past]
            ones = torch.ones(1, len(past[0]), dtype=torch.bool, device=adapter.device)
            history = adapter._history(past[0][None], past[1][None], past[2][None], ones,
                                       times[None], torch.ones_like(times[None], dtype=torch.bool))
            history = {k: v[0] for k, v in history.items()}
            keep = slice(max(0, len(past[0]) - adapter.history_length), None)
            recent = (past[0][keep], past[1][keep], past[2][keep])
        events = adapter._rows(self.entity, self._values, others, labels, times, history)
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
                          zip(self._events, (others, labels, times.to(self._events[2].dtype)))]
                order = torch.sort(merged[2], stable=True).indices
                self._events = tuple(x[order] for x in merged)
                support = adapter._support([(self.entity, self._values)], [self._events])
                self._fast = {k: v[0].clone() for k, v in adapter._run(support).items()}
            else:
                batch = {k: v[None] for k, v in events.items()}
                adapted = policy.adapt(model, self._fast, adapter.slow, batch)[-1]
                self._fast = {k: v[0] for k, v in adapted.items()}
        self._seen = torch.unique(torch.cat([self._seen, others]))
        self._clock = max(self._clock, int(times.max()))
        if history is not None:
            self._recent = recent
        return self

    def __repr__(self) -> str:
        who = f"new {self.side}" if self.entity is None else f"{self.side} {self.entity}"
        return f"{type(self).__name__}({who}, {len(self._seen)} {self.other}s seen)"


class UserSession(Session):
    """One adapted user: their fast parameters (and the policy's per-user state).

    Made by :meth:`Adapter.adapt`. ``recommend`` scores items with the user's parameters
    (:class:`Recommendations`); ``update`` adapts them further to new ``(item, label[,
    timestamp])`` feedback. Nothing is shared with other sessions.
    """

    side = "user"
    ranked = Recommendations

    @property
    def user(self) -> int | None:
        """The user's contiguous id (None: a user the model has no row for)."""
        return self.entity

    @property
    def seen(self) -> torch.Tensor:
        """Contiguous ids of the items this user has interacted with (sorted)."""
        return self._seen

    def scores(self, items: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Scores of ``items`` (contiguous ids; default every item) for this user."""
        return super().scores(items)

    def recommend(self, k: int = 10, candidates: torch.Tensor | Sequence[int] | None = None,
                  exclude_seen: bool = True, epsilon: float = 0.0,
                  generator: torch.Generator | None = None) -> Recommendations:
        """The ``k`` best-scored items (``candidates``: contiguous item ids; default every
        item), best first, as :class:`Recommendations`; see :meth:`Session.recommend`."""
        return super().recommend(k, candidates, exclude_seen, epsilon, generator)


class ItemSession(Session):
    """One adapted item (a model trained with tasks per item, ``data.tasks.task_by: item``):
    its fast parameters (and the policy's per-item state).

    Made by :meth:`Adapter.adapt_item`. ``recommend`` ranks *users* for the item (who to show
    it to: :class:`RankedUsers`); ``update`` adapts it further to new ``(user, label[,
    timestamp])`` feedback. Nothing is shared with other sessions.
    """

    side = "item"
    ranked = RankedUsers

    @property
    def item(self) -> int | None:
        """The item's contiguous id (None: an item the model has no row for)."""
        return self.entity

    @property
    def seen(self) -> torch.Tensor:
        """Contiguous ids of the users in this item's events (sorted)."""
        return self._seen

    def scores(self, users: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Scores of ``users`` (contiguous ids; default every user) for this item."""
        return super().scores(users)

    def recommend(self, k: int = 10, candidates: torch.Tensor | Sequence[int] | None = None,
                  exclude_seen: bool = True, epsilon: float = 0.0,
                  generator: torch.Generator | None = None) -> RankedUsers:
        """The ``k`` best-scored users for the item (``candidates``: contiguous user ids;
        default every user), best first, as :class:`RankedUsers`; users already in the item's
        events are left out unless ``exclude_seen`` is false (see :meth:`Session.recommend`)."""
        return super().recommend(k, candidates, exclude_seen, epsilon, generator)
