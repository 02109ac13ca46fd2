"""Validated fine-tuning: how many steps (0..k) and which step size, chosen on validation users.

Few-shot adaptation overfits: five steps on one rating can leave a new user worse off than the
unadapted start, and the best step size depends on how much support there is. This policy
makes that choice per support size on the *validation* users, then applies it to test users
(and, through a fixed ``choices`` table, at deployment):

1. :meth:`Validated.calibrate` (called by the Lightning module at the start of ``test`` /
   ``predict`` with the validation batches only) adapts every validation task with every
   candidate step size for ``max_steps`` steps and records the query loss after each step
   ``0..max_steps``, per support-size bucket (``buckets``: a task with ``n`` support
   interactions falls in the largest edge ``<= n``; with ``data.eval_support`` the validation
   users come at every cap, so every K gets its own choice). Each bucket gets the (step size,
   number of steps) with the lowest mean validation query loss; ties go to fewer steps. Step 0
   is a candidate: "do not adapt" is chosen where adapting does not help. A bucket without
   validation tasks takes the choice of the nearest smaller bucket that has some (else the
   choice pooled over all buckets).
2. :meth:`Validated.adapt` adapts each task with its bucket's choice: iterate ``s`` of the
   returned trajectory is the task's iterate ``min(s, chosen steps)``, so the last one is the
   validated choice and metrics are still reported at steps ``0..max_steps``.

Before any calibration (e.g. validation during ``fit``) it adapts like ``finetune``: all
``max_steps`` steps with the first candidate (the algorithm's own inner optimiser by default).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from metarec import (
    SGD,
    AdaptationPolicy,
    EpisodeBatch,
    FeatureBatch,
    FunctionalModel,
    InnerOptimizer,
    MetaAlgorithm,
    NonNegativeInt,
    Params,
    PositiveFloat,
    PositiveInt,
    vmap_tasks,
)

LEARNED = "algorithm"  # the candidate that adapts with the algorithm's own inner optimiser


class Validated(AdaptationPolicy):
    """Fine-tuning with the number of steps and the step size chosen on validation users.

    Args:
        max_steps: the most steps considered (0..max_steps); default the algorithm's
            ``inner_steps``.
        lrs: candidate plain-SGD step sizes, tried beside the algorithm's own inner optimiser
            (its ``inner_lr`` or learned rates); default none (only the number of steps is
            chosen).
        algorithm_rate: whether the algorithm's own inner optimiser is a candidate too (it is
            by default; with it off, ``lrs`` must name at least one step size).
        buckets: support-size bucket edges (ascending, from 1): a task with ``n`` support
            interactions uses the choice of the largest edge ``<= n``.
        choices: a fixed choice table ``{edge: {steps: s, lr: x or "algorithm"}}`` (e.g. the one
            a test run printed), used instead of calibrating: how a deployed
            :class:`metarec.Adapter` applies a validated choice.
    """

    def __init__(self, max_steps: NonNegativeInt | None = None,
                 lrs: Sequence[PositiveFloat] | None = None, algorithm_rate: bool = True,
                 buckets: Sequence[PositiveInt] = (1, 2, 3, 5, 10, 20, 50),
                 choices: dict[int, dict[str, Any]] | None = None) -> None:
        edges = [int(b) for b in buckets]
        if not edges or edges[0] != 1 or sorted(set(edges)) != edges:
            raise ValueError(f"buckets must be ascending distinct ints starting at 1, got {buckets}")
        self.steps = max_steps
        self.max_steps = max_steps or 0
        self.candidates: list[float | str] = ([LEARNED] if algorithm_rate else []) + [
            float(lr) for lr in lrs or []]
        if not self.candidates:
            raise ValueError("no candidate step size: give lrs, or keep algorithm_rate")
        self.edges = edges
        self.algorithm: MetaAlgorithm | None = None
        self.choices: dict[int, tuple[int, int]] | None = None  # edge -> (candidate, steps)
        self.fixed = choices is not None
        if choices is not None:
            self.choices = {int(edge): self._parse_choice(edge, c) for edge, c in choices.items()}
            missing = set(self.choices) - set(edges)
            if missing:
                raise ValueError(f"choices name buckets {sorted(missing)} not among {edges}")

    def _parse_choice(self, edge: Any, choice: dict[str, Any]) -> tuple[int, int]:
        lr = choice.get("lr", LEARNED)
        lr = lr if lr == LEARNED else float(lr)
        if lr not in self.candidates:
            self.candidates.append(lr)
        steps = int(choice["steps"])
        if steps < 0:
            raise ValueError(f"choices[{edge}].steps must be >= 0, got {steps}")
        return self.candidates.index(lr), steps

    def bind(self, algorithm: MetaAlgorithm) -> None:
        self.algorithm = algorithm
        if self.steps is None:
            self.max_steps = algorithm.inner_steps
        if self.choices is not None:
            self.max_steps = max(self.max_steps, *(s for _, s in self.choices.values()))

    def _optimizer(self, candidate: float | str) -> InnerOptimizer:
        if self.algorithm is None:
            raise RuntimeError("Validated used before bind(algorithm)")
        return self.algorithm.inner_optimizer() if candidate == LEARNED else SGD(candidate)

    def _trajectories(self, model: FunctionalModel, fast: Params, slow: Params,
                      support: FeatureBatch, candidates: Sequence[float | str]
                      ) -> list[list[Params]]:
        """Per candidate, the iterates 0..max_steps of every task (vmapped over tasks)."""
        algorithm = self.algorithm
        out = []
        for candidate in candidates:
            optimizer = self._optimizer(candidate)
            out.append(vmap_tasks(lambda task, o=optimizer: algorithm.adapt(
                model, fast, slow, task, steps=self.max_steps, optimizer=o, first_order=True,
                trajectory=True))(support))
        return out

    def _bucket(self, sizes: torch.Tensor) -> torch.Tensor:
        """Index into ``edges`` of each task's bucket (the largest edge <= its support size)."""
        edges = torch.tensor(self.edges, device=sizes.device)
        return (torch.searchsorted(edges, sizes.clamp_min(1), right=True) - 1).clamp_min(0)

    def calibrate(self, model: FunctionalModel, fast: Params, slow: Params,
                  batches: Iterable[EpisodeBatch]) -> dict[str, Any] | None:
        if self.fixed:
            return {edge: {"steps": s, "lr": self.candidates[c], "val_loss": float("nan"),
                           "val_tasks": 0} for edge, (c, s) in self.choices.items()}
        shape = (len(self.edges), len(self.candidates), self.max_steps + 1)
        total = torch.zeros(shape, dtype=torch.float64)
        count = torch.zeros(len(self.edges), dtype=torch.float64)
        for batch in batches:
            has = batch.query["mask"].any(1)
            bucket = self._bucket(batch.support["mask"].sum(1))[has].cpu()
            with torch.no_grad():
                runs = self._trajectories(model, fast, slow, batch.support, self.candidates)
                for c, iterates in enumerate(runs):
                    for s, params in enumerate(iterates):
                        loss = model.loss_tasks(params, slow, batch.query)[has]
                        loss = torch.nan_to_num(loss.double(), nan=float("inf")).cpu()
                        total[:, c, s].index_add_(0, bucket, loss)
            count.index_add_(0, bucket, torch.ones(len(bucket), dtype=torch.float64))
        if not count.any():
            return None
        pooled = total.sum(0) / count.sum()
        choices, table = {}, {}
        for b, edge in enumerate(self.edges):
            source = next((i for i in range(b, -1, -1) if count[i] > 0), None)
            mean = total[source] / count[source] if source is not None else pooled
            # argmin over (candidate, step); ties to fewer steps, then to the earlier candidate
            flat = mean.T.reshape(-1)  # step-major: fewer steps first
            best = int(torch.argmin(flat))
            steps, candidate = divmod(best, len(self.candidates))
            if steps == 0:
                candidate = 0  # no step taken: the step size is moot
            choices[edge] = (candidate, steps)
            table[edge] = {"steps": steps, "lr": self.candidates[candidate],
                           "val_loss": float(mean[candidate, steps]),
                           "val_tasks": int(count[b])}
        self.choices = choices
        return table

    def adapt(self, model: FunctionalModel, fast: Params, slow: Params,
              support: FeatureBatch) -> list[Params]:
        if self.choices is None:  # not calibrated: finetune with the first candidate
            return self._trajectories(model, fast, slow, support, self.candidates[:1])[0]
        bucket = self._bucket(support["mask"].sum(1))
        chosen = torch.tensor([self.choices.get(e, (0, self.max_steps)) for e in self.edges],
                              device=bucket.device)[bucket]  # (B, 2): candidate, steps
        used = torch.unique(chosen[:, 0])  # only the candidates some task needs are run
        runs = self._trajectories(model, fast, slow, support,
                                  [self.candidates[c] for c in used.tolist()])
        position = torch.searchsorted(used, chosen[:, 0])  # each task's run among them
        tasks = torch.arange(len(bucket), device=bucket.device)
        self.last_steps = chosen[:, 1]
        # (runs, steps + 1, tasks, ...) per parameter; iterate s of task t: its run, step min(s, k_t)
        stacked = {name: torch.stack([torch.stack([it[name] for it in run]) for run in runs])
                   for name in fast}
        return [{name: value[position, chosen[:, 1].clamp_max(s), tasks]
                 for name, value in stacked.items()} for s in range(self.max_steps + 1)]

    def diagnostics(self) -> dict[str, torch.Tensor]:
        steps = getattr(self, "last_steps", None)
        return {} if steps is None else {"steps_used": steps.to(torch.get_default_dtype())}
