"""Online adaptation: feedback arrives as a stream of events, and every event (or mini-batch of
events) triggers an update on a bounded per-user replay buffer.

The stream of a task is its support set in timestamp order (support slots are stored oldest
first). It is cut into chunks of ``events_per_update`` events; chunk ``u`` is pushed into the
replay buffer, which keeps the latest ``buffer_size`` events, and update ``u`` takes
``steps_per_update`` steps of the algorithm's inner optimiser on the loss over the buffer's
contents (the algorithm's inner objective), each optionally pulled back toward the meta-learned
start ``theta_0``:

    theta <- theta - lr * grad L_buffer(theta) - alpha * (theta - theta_0)

Evaluation (:meth:`Online.adapt`) replays the whole support stream of every task under ``vmap``;
deployment (:class:`metarec.UserSession`) calls :meth:`Online.update` with each new batch of
feedback events of one user, on that user's fast parameters and buffer only. Both run the same
update (:meth:`Online.step`), so what is evaluated is what is deployed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.func import grad

from metarec import (
    SGD,
    AdaptationPolicy,
    FeatureBatch,
    FunctionalModel,
    InnerOptimizer,
    MetaAlgorithm,
    Objective,
    Params,
    PositiveFloat,
    PositiveInt,
    UnitFraction,
    vmap_tasks,
)


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class Online(AdaptationPolicy):
    """Streaming updates with a bounded replay buffer and an optional proximal pull.

    Args:
        events_per_update: events per update (1: update after every event).
        buffer_size: the replay buffer keeps the latest ``buffer_size`` events of the user
            (``>= events_per_update``, so a new chunk always fits).
        steps_per_update: optimiser steps per update, each on the whole buffer.
        lr: step size of plain SGD; default: the algorithm's own inner optimiser (its
            ``inner_lr``, learned per-step or per-element rates, Reptile's Adam re-initialised
            at every update; per-step rates are indexed by the step within the update).
        alpha: pull toward the meta-learned start, ``0 <= alpha < 1`` (0: none).
        max_steps: how many updates evaluation reports: iterate ``s`` (``s < max_steps``) is
            the parameters after ``min(s, U)`` updates, ``U`` being the task's number of chunks;
            iterate ``max_steps`` is after the whole stream (all ``U`` updates), however long.
            At least 1, so that step 0 is the meta-learned start as for every policy.
    """

    def __init__(self, events_per_update: PositiveInt = 1, buffer_size: PositiveInt = 20,
                 steps_per_update: PositiveInt = 1, lr: PositiveFloat | None = None,
                 alpha: UnitFraction = 0.0, max_steps: PositiveInt = 20) -> None:
        self.events_per_update = _int("events_per_update", events_per_update, 1)
        self.buffer_size = _int("buffer_size", buffer_size, 1)
        if buffer_size < events_per_update:
            raise ValueError(f"buffer_size ({buffer_size}) must be >= events_per_update "
                             f"({events_per_update}): a new chunk must fit in the buffer")
        self.steps_per_update = _int("steps_per_update", steps_per_update, 1)
        self.max_steps = _int("max_steps", max_steps, 1)
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0 <= alpha < 1):
            raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
        self.lr, self.alpha = lr, float(alpha)
        self.algorithm: MetaAlgorithm | None = None
        self.last_updates: torch.Tensor | None = None

    def bind(self, algorithm: MetaAlgorithm) -> None:
        self.algorithm = algorithm

    def _parts(self, model: FunctionalModel, start: Params,
               slow: Params) -> tuple[InnerOptimizer, Objective]:
        algorithm = self.algorithm
        if algorithm is None:
            raise RuntimeError("Online used before bind(algorithm)")
        optimizer = SGD(self.lr) if self.lr is not None else algorithm.inner_optimizer()
        objective = algorithm.inner_objective(model, start, slow)
        if objective is None:
            objective = lambda f, batch: model.loss(f, slow, batch)  # noqa: E731
        return optimizer, objective

    def step(self, theta: Params, start: Params, buffer: FeatureBatch,
             optimizer: InnerOptimizer, objective: Objective) -> Params:
        """One update: ``steps_per_update`` steps on the loss over ``buffer`` (its ``mask``
        selects the events in it), each followed by the pull ``- alpha * (theta - start)``."""
        loss_grad = grad(objective)
        state = optimizer.init(theta)
        for i in range(self.steps_per_update):
            grads = {k: g.detach() for k, g in loss_grad(theta, buffer).items()}
            new, state = optimizer.step(theta, grads, state, i)
            if self.alpha != 0.0:
                new = {k: new[k] - self.alpha * (theta[k] - start[k]) for k in new}
            theta = new
        return theta

    # -- evaluation: replay every task's support stream, vmapped ---------------------------
    def adapt(self, model: FunctionalModel, fast: Params, slow: Params,
              support: FeatureBatch) -> list[Params]:
        optimizer, objective = self._parts(model, fast, slow)
        mask = support["mask"]
        width, per, size = mask.shape[-1], self.events_per_update, self.buffer_size
        chunks = -(-width // per)

        algorithm = self.algorithm

        def one_task(task: FeatureBatch) -> list[Params]:
            task = model.prepare(slow, task)  # slow-only encoding, once per task (if any)
            # A task-conditioned start sees no event yet: the stream has not begun.
            start = algorithm.task_start(model, fast, slow,
                                         {**task, "mask": torch.zeros_like(task["mask"])})
            theta, iterates = start, [start]
            count = task["mask"].sum()  # this task's events: slots 0..count-1 (oldest first)
            for u in range(chunks):
                end = min((u + 1) * per, width)
                # The buffer after chunk u: the latest `size` events up to the chunk's last
                # event, slots [min(end, count) - size, min(end, count)). Statically, that lies
                # in [u * per + 1 - size, end) when the chunk has an event; mask the rest.
                lo = max(0, u * per + 1 - size)
                slots = torch.arange(lo, end, device=mask.device)
                buffer = {k: v[lo:end] for k, v in task.items()}
                buffer["mask"] = buffer["mask"] & (slots >= torch.clamp(count, max=end) - size)
                new = self.step(theta, start, buffer, optimizer, objective)
                active = task["mask"][u * per]  # chunk u holds at least one event of this task
                theta = {k: torch.where(active, new[k], theta[k]) for k in theta}
                iterates.append(theta)
            return iterates

        if chunks == 0:
            iterates = [fast]
        else:
            iterates = vmap_tasks(one_task)(support)
        self.last_updates = -(-mask.sum(-1) // per)
        if len(iterates) == 1:  # no events at all: the start, like frozen
            empty = {**support, "mask": torch.zeros_like(mask)}
            iterates = [algorithm.task_starts(model, fast, slow, empty)]
        # Steps 0..max_steps: after min(s, U) updates; the last one after the whole stream.
        reported = iterates[:self.max_steps] + [iterates[-1]]
        reported += [iterates[-1]] * (self.max_steps + 1 - len(reported))
        return reported

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """``updates``: the updates each task of the last :meth:`adapt` call took, ``(B,)``."""
        if self.last_updates is None:
            return {}
        return {"updates": self.last_updates.to(torch.get_default_dtype())}

    # -- deployment: one user's state, updated incrementally -------------------------------
    def init_state(self, events: FeatureBatch) -> FeatureBatch:
        """The replay buffer after adapting on ``events`` (one user, rows oldest first, every
        row an event): its latest ``buffer_size`` events."""
        keep = events["mask"]
        return {k: v[keep][-self.buffer_size:] for k, v in events.items()}

    def update(self, model: FunctionalModel, fast: Params, slow: Params, start: Params,
               buffer: FeatureBatch, events: FeatureBatch) -> tuple[Params, FeatureBatch]:
        """Apply new feedback ``events`` (one user, rows oldest first) to that user's ``fast``
        parameters and replay ``buffer``: one update per chunk of ``events_per_update`` events
        (the last chunk may be smaller). ``start`` is the meta-learned start (``theta_0``, the
        anchor of the pull; with a task-conditioned start, the algorithm's start of this user
        conditioned on no event). Returns the new parameters and buffer; the inputs are not changed.
        """
        # A task-conditioned start as evaluation's (conditioned on no event: the user's own
        # features only); the shared start otherwise.
        start = self.algorithm.task_start(model, start, slow,
                                          {**events, "mask": torch.zeros_like(events["mask"])})
        optimizer, objective = self._parts(model, start, slow)
        keep = events["mask"]
        events = {k: v[keep] for k, v in events.items()}
        n, per, size = int(events["mask"].shape[0]), self.events_per_update, self.buffer_size
        # The buffer followed by the new events, encoded once (slow-only encoding, if any);
        # the buffer after chunk u is the latest `size` rows up to that chunk's end.
        rows = {k: torch.cat([buffer[k], events[k]]) for k in events}
        rows = model.prepare(slow, rows)
        before = int(buffer["mask"].shape[0])
        for lo in range(0, n, per):
            end = before + min(lo + per, n)
            fast = self.step(fast, start, {k: v[max(0, end - size):end] for k, v in rows.items()},
                             optimizer, objective)
        return fast, {k: v[-size:] for k, v in rows.items() if k in events}
