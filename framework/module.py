"""MetaLearner: the LightningModule that wires backbone, meta-algorithm and policy together."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.func import vmap

from metarec import contract, registry
from metarec.checkpoint import init_checkpoint, load_backbone_weights
from metarec.data.episodes import EpisodeBatch, FeatureBatch
from metarec.functional import FunctionalModel, Params, select_parameters
from metarec.metrics import AdaptationMetrics, DivergenceGuard, MetricsConfig, per_task_metrics
from metarec.optim import clip_gradients
from metarec.policy import AdaptationPolicy
from metarec.schema import DataSchema
from metarec.tracking import log_curve, log_table

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


# Up to this many tasks the divergence guard scores all iterates in one stacked pass.
STACKED_GUARD_TASKS = 8


def finite_rows(tensors: list[torch.Tensor], rows: int) -> torch.Tensor:
    """``(rows,)``: whether row ``r`` of every tensor (its leading ``rows`` entries) is all
    finite. Read through the rows' sums, one fast pass (a non-finite element makes a sum
    non-finite; ``isfinite(x).all()`` is many times slower on CPU), and checked element by
    element only when some sum is not finite (a sum of finite values can overflow)."""
    flat = [t.reshape(rows, -1) for t in tensors]
    if not torch.compiler.is_compiling():
        sums = torch.stack([t.sum(1) for t in flat]).sum(0)
        if bool(torch.isfinite(sums).all()):
            return torch.ones(rows, dtype=torch.bool, device=sums.device)
    return torch.stack([torch.isfinite(t).all(1) for t in flat]).all(0)


def guard_iterates(model: FunctionalModel, iterates: list[Params], slow: Params,
                   support: FeatureBatch, guard: DivergenceGuard, query: FeatureBatch | None = None,
                   losses: torch.Tensor | None = None
                   ) -> tuple[list[Params], list[torch.Tensor], list[torch.Tensor] | None]:
    """The divergence guard on a policy's iterates (leading task dim): ``(iterates, diverged,
    scores)``; ``scores`` are the query scores of the (guarded) iterates when ``query`` is
    given (each computed once, for the guard and for the caller), else None. ``losses``: the
    iterates' support losses ``(steps + 1, n)`` when the policy has them
    (:meth:`AdaptationPolicy.adapt_with_losses`), else the guard computes them.

    A task diverges at the first step whose *support* loss is non-finite or above
    ``guard.factor`` times its step-0 support loss, or whose fast parameters (or, when
    ``query`` is given, query scores) are not all finite; neither looks at a query label, so
    evaluation and deployment (:class:`metarec.Adapter`) run the same guard. A task stays
    diverged for the later steps; with ``guard.fallback: start`` its iterates (and scores) from
    then on are its step-0 start's, with ``keep`` they are left as they are (and only counted).
    """
    n = support["mask"].shape[0]
    none = torch.zeros(n, dtype=torch.bool, device=support["mask"].device)
    score = (lambda fast: model.predict_tasks(fast, slow, query)) if query is not None else None
    if guard.factor is None:
        return iterates, [none] * len(iterates), \
            [score(f) for f in iterates] if score is not None else None
    with torch.no_grad():
        # The backbone's slow-only encoding (e.g. the transformer's histories), once for every
        # iterate: only the fast parameters differ between them.
        support = model.prepare(slow, support)
        if query is not None:
            query = model.prepare(slow, query)
        if n <= STACKED_GUARD_TASKS and not torch.compiler.is_compiling():
            # A few tasks (a deployed single user): every iterate in one vmapped pass over the
            # stacked iterates, since per-call overhead dominates; many tasks: one pass per
            # iterate (a (steps + 1)-times larger pass is slower once the work dominates).
            # Compiled (Adapter(compile=True)): one pass per iterate too, which compiles faster
            # and has no per-call overhead to save.
            stacked = {k: torch.stack([f[k] for f in iterates]) for k in iterates[0]}
            if losses is None:
                losses = vmap(lambda f: model.loss_tasks(f, slow, support),
                              randomness="different")(stacked)  # (steps + 1, n)
            all_scores = (vmap(score, randomness="different")(stacked)
                          if score is not None else None)  # (steps + 1, n, Q)
            finite = finite_rows(list(stacked.values()), len(iterates) * n
                                 ).view(len(iterates), n)
        else:
            if losses is None:
                losses = torch.stack([model.loss_tasks(f, slow, support) for f in iterates])
            all_scores = (torch.stack([score(f) for f in iterates])
                          if score is not None else None)
            finite = torch.stack([~none, *[finite_rows(list(f.values()), n)
                                           for f in iterates[1:]]])  # the start: never flagged
        first = losses[0]
        bad = ~torch.isfinite(losses) | (losses > guard.factor * first.clamp_min(1e-12))
        bad = bad | ~finite
        if all_scores is not None:
            bad = bad | ~(torch.isfinite(all_scores) | ~query["mask"]).all(-1)
        bad[0] = False  # the start is the fallback: never flagged
        diverged = torch.cummax(bad.to(torch.int8), 0).values.bool()  # stays diverged
        flags = list(diverged.unbind(0))
        scores = list(all_scores.unbind(0)) if all_scores is not None else [None] * len(iterates)
        guarded = list(iterates)
        # Compiled: no data-dependent branch (a graph break); the selection runs for all.
        compiling = torch.compiler.is_compiling()
        if guard.fallback == "start" and (compiling or bool(diverged.any())):
            for i in range(1, len(iterates)):
                if not compiling and not bool(diverged[i].any()):
                    continue
                guarded[i] = {k: torch.where(diverged[i].view(-1, *([1] * (v.ndim - 1))),
                                             iterates[0][k], v) for k, v in iterates[i].items()}
                if all_scores is not None:
                    scores[i] = torch.where(diverged[i][:, None], scores[0], scores[i])
    return guarded, flags, scores if score is not None else None


class MetaLearner(pl.LightningModule):
    """Meta-trains a backbone with a meta-algorithm; evaluates it through an adaptation policy.

    ``training_step`` returns the algorithm's outer loss. ``validation_step``/``test_step``
    adapt each task with the policy from the meta-learned start and report metrics at every
    adaptation step (see :mod:`metarec.metrics`). Adaptation is functional: the module's own
    parameters are never changed by it, so evaluating twice gives identical numbers.

    Args:
        backbone, algorithm, policy: plugin alias or class path.
        backbone_args, algorithm_args, policy_args: their arguments.
        optimizer: outer optimiser factory (default Adam, lr 1e-3).
        lr_scheduler: optional scheduler factory, stepped after every meta-training step
            (e.g. ``torch.optim.lr_scheduler.LinearLR`` to anneal Reptile's outer step size).
        metrics: which metrics, and how query relevance is defined.
        nonfinite: what a NaN/inf outer loss does: ``error`` stops with the users and inner
            step that diverged; ``skip`` skips that batch's update and counts it
            (``train/skipped_batches``).
        divergence: the evaluation-time divergence guard (see :meth:`adapt_guarded`): a task
            whose adaptation diverges is counted (``{stage}/diverged_users``), flagged in the
            per-user table and, by default, scored from its step-0 start.
        init_from: start meta-training from another run's backbone weights (any algorithm, e.g.
            pretrain -> maml): a checkpoint of ``metarec fit``, or a recipe (``.yaml``) that is
            fit first on this run's data settings (see :func:`init_checkpoint`). Loaded when
            fit starts from scratch (a resumed fit restores its own weights; evaluation never
            reads it). The backbone must have the same parameters and shapes, and the
            checkpoint must not have trained on this run's validation or test users.
        schema: the data schema; the CLI links it from the datamodule.
    """

    def __init__(self, backbone: str = "melu", backbone_args: dict[str, Any] | None = None,
                 algorithm: str = "maml", algorithm_args: dict[str, Any] | None = None,
                 policy: str = "finetune", policy_args: dict[str, Any] | None = None,
                 optimizer: OptimizerFactory | None = None,
                 lr_scheduler: SchedulerFactory | None = None,
                 metrics: MetricsConfig | None = None,
                 nonfinite: Literal["error", "skip"] = "error",
                 divergence: DivergenceGuard | None = None,
                 init_from: str | None = None,
                 schema: DataSchema | None = None) -> None:
        super().__init__()
        if schema is None:
            raise ValueError("MetaLearner needs the data schema: run it through the metarec CLI, "
                             "or pass schema=datamodule.schema")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.schema = schema
        self.backbone = registry.build("backbones", backbone, backbone_args, schema=schema)
        self.algorithm = registry.build("algorithms", algorithm, algorithm_args)
        self.policy = registry.build("policies", policy, policy_args)
        patterns = self.algorithm.select_fast(self.backbone)
        self.functional = FunctionalModel(self.backbone, select_parameters(self.backbone, patterns),
                                          schema.feedback)
        self.algorithm.bind(self.functional)
        self.policy.bind(self.algorithm)
        if not isinstance(self.policy.max_steps, int) or self.policy.max_steps < 0:
            raise ValueError(f"policy {policy!r}: max_steps must be a non-negative int once bound "
                             f"(metrics are kept for steps 0..max_steps), got {self.policy.max_steps!r}")
        if nonfinite not in ("error", "skip"):
            raise ValueError(f"nonfinite must be 'error' or 'skip', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.skipped_batches = 0
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.metrics_config = metrics or MetricsConfig()
        self.divergence = divergence or DivergenceGuard()
        self.init_from = init_from
        # Metric collections per support cap ("all" without data.eval_support), made on use.
        self.val_metrics = torch.nn.ModuleDict()
        self.test_metrics = torch.nn.ModuleDict()
        self.user_results: list[dict[str, Any]] = []

    # -- meta-training -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Before Lightning restores a resumed fit's checkpoint, which then overwrites these.
        if stage == "fit" and self.init_from is not None:
            datamodule = getattr(self.trainer, "datamodule", None)
            path = init_checkpoint(self.init_from, datamodule, self.trainer.default_root_dir) \
                if datamodule is not None else Path(self.init_from)
            splits = getattr(datamodule, "splits", None)
            keys = getattr(getattr(datamodule, "table", None), "user_keys", None)
            load_backbone_weights(self.backbone, path, splits, keys)

    def on_train_epoch_start(self) -> None:
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        self.algorithm.on_train_epoch_start(self.current_epoch,
                                            max_epochs if max_epochs and max_epochs > 0 else None)

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> torch.Tensor | None:
        loss, logs = self.algorithm.outer_loss(self.functional, batch)
        if not torch.isfinite(loss):
            if self.nonfinite == "error":
                raise FloatingPointError(self._diagnose_nonfinite(batch))
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches), batch_size=len(batch))
            return None  # Lightning skips the optimiser step
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        for name, value in logs.items():
            self.log(f"train/{name}", value, batch_size=len(batch))
        return loss

    def _diagnose_nonfinite(self, batch: EpisodeBatch) -> str:
        """Which users' inner loops diverged, and at which inner step (slow path, on failure)."""
        fast, slow = self.functional.split()
        fast = {k: v.detach() for k, v in fast.items()}
        slow = {k: v.detach() for k, v in slow.items()}
        keys = getattr(getattr(self.trainer, "datamodule", None), "table", None)
        keys = getattr(keys, "user_keys", None)
        found = []
        with torch.no_grad():
            for t in range(len(batch)):
                support = {k: v[t] for k, v in batch.support.items()}
                iterates = self.algorithm.adapt(self.functional, fast, slow, support,
                                                first_order=True, trajectory=True)
                for step, params in enumerate(iterates):
                    loss = self.functional.loss(params, slow, support)
                    if not torch.isfinite(loss):
                        user = int(batch.users[t])
                        found.append((user if keys is None else keys[user], step))
                        break
        where = (", ".join(f"user {u} at inner step {s}" for u, s in found[:10])
                 if found else "no single task's inner loop (the outer loss itself)")
        return (f"non-finite outer loss at global step {self.global_step}: diverged for {where}"
                f"{' and more' if len(found) > 10 else ''}. Lower the inner or outer learning "
                "rate, set trainer.gradient_clip_val, or set model.nonfinite: skip.")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = (torch.optim.Adam(params, lr=1e-3) if self.optimizer_factory is None
                     else self.optimizer_factory(params))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, except with sparse gradients (e.g. the transformer's
        ``sparse_item_gradients``), which ``torch.nn.utils.clip_grad_*`` reject: then
        :func:`metarec.optim.clip_gradients` clips dense and sparse gradients together."""
        if gradient_clip_val:
            params = [p for group in optimizer.param_groups for p in group["params"]
                      if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                clip_gradients(params, float(gradient_clip_val), gradient_clip_algorithm or "norm")
                return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- adaptation and evaluation --------------------------------------------------------
    def _detached(self) -> tuple[Params, Params]:
        """Detached copies of the (fast, slow) parameters: what adaptation starts from."""
        fast, slow = self.functional.split()
        return ({k: v.detach() for k, v in fast.items()},
                {k: v.detach() for k, v in slow.items()})

    def adapt(self, batch: EpisodeBatch) -> list[dict[str, torch.Tensor]]:
        """The policy's iterates (steps 0..k) for each task of ``batch``; module unchanged."""
        return self.policy.adapt(self.functional, *self._detached(), batch.support)

    def adapt_guarded(self, batch: EpisodeBatch
                      ) -> tuple[list[Params], list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`adapt` under the divergence guard (:func:`guard_iterates`): ``(iterates,
        diverged, scores)``, ``diverged[s]`` ``(B,)`` marking the tasks caught by step ``s`` and
        ``scores[s]`` the query scores at step ``s``."""
        fast, slow = self._detached()
        # The backbone's slow-only encoding of the support set, once for the policy and the
        # guard (both skip it when present).
        support = self.functional.prepare(slow, batch.support)
        iterates, losses = self.policy.adapt_with_losses(self.functional, fast, slow, support)
        return guard_iterates(self.functional, iterates, slow, support, self.divergence,
                              batch.query, losses)

    def _evaluate(self, batch: EpisodeBatch | dict[str, EpisodeBatch], stage: str) -> None:
        """Adapt and score a batch (or, with ``data.eval_support``, the same tasks at every
        support cap: a dict keyed by :func:`metarec.data.support_label`)."""
        variants = batch if isinstance(batch, dict) else {"": batch}
        for label, tasks in variants.items():
            self._evaluate_variant(tasks, stage, label)

    def _evaluate_variant(self, batch: EpisodeBatch, stage: str, label: str) -> None:
        prefix = f"{stage}/{label}" if label else stage
        metrics = self._metrics(stage, label)
        _, diverged, scores = self.adapt_guarded(batch)
        # Per-task facts about this adaptation (e.g. early-stop's steps used), averaged over
        # tasks. Not synchronised per step: under DDP, ranks may run different numbers of
        # evaluation batches (tasks are never repeated), so this is rank 0's average.
        for name, values in self.policy.diagnostics().items():
            self.log(f"{prefix}/{name}", values.float().mean(), batch_size=len(batch))
        base = None
        support_size = batch.support["mask"].sum(1)
        for step, step_scores in enumerate(scores):
            per_task = per_task_metrics(step_scores, batch.query, batch.users, self.functional.feedback,
                                        self.metrics_config, self.schema.rating_range)
            losses = per_task["loss"].nan_to_num(0.0, posinf=float("inf"))
            base = losses if base is None else base
            metrics.update(step, step_scores, batch.query, batch.users, losses, base, per_task,
                           diverged=diverged[step])
            if stage == "test":
                self._user_parts.append((label, step, batch.users, support_size, diverged[step],
                                         per_task))

    def _metrics(self, stage: str, label: str) -> AdaptationMetrics:
        """The metric collections of ``stage`` for support cap ``label`` (made on first use)."""
        store = self.val_metrics if stage == "val" else self.test_metrics
        key = label or "plain"
        if key not in store:
            store[key] = AdaptationMetrics(self.policy.max_steps, self.schema.feedback,
                                           self.metrics_config, self.schema.rating_range
                                           ).to(self.device)
        return store[key]

    def validation_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_start(self) -> None:
        self._user_parts: list[tuple[Any, ...]] = []

    def on_test_start(self) -> None:
        self._calibrate_policy()

    def on_predict_start(self) -> None:
        self._calibrate_policy()

    def _calibrate_policy(self) -> None:
        """Let the policy choose its settings on the validation users (never the test users):
        :meth:`metarec.AdaptationPolicy.calibrate`. The choice is printed and logged as the
        ``{stage}/policy_calibration`` table."""
        if type(self.policy).calibrate is AdaptationPolicy.calibrate or self._trainer is None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        fast, slow = self.functional.split()
        fast = {k: v.detach() for k, v in fast.items()}
        slow = {k: v.detach() for k, v in slow.items()}
        transfer = lambda b: self.trainer.strategy.batch_to_device(b, self.device)  # noqa: E731

        def batches() -> Iterator[EpisodeBatch]:
            for batch in datamodule.val_dataloader():
                for tasks in (batch.values() if isinstance(batch, dict) else [batch]):
                    yield transfer(tasks)

        with torch.enable_grad():
            choice = self.policy.calibrate(self.functional, fast, slow, batches())
        if choice and self.trainer.is_global_zero:
            rows = [[str(k), *v.values()] for k, v in choice.items()]
            columns = ["support", *next(iter(choice.values())).keys()]
            print(f"metarec: {type(self.policy).__name__} chose on the validation users: "
                  + "; ".join(f"support {r[0]}: " + ", ".join(
                      f"{c}={v:.4g}" if isinstance(v, float) else f"{c}={v}"
                      for c, v in zip(columns[1:], r[1:])) for r in rows), flush=True)
            log_table(self.trainer, f"{self.trainer.state.stage.value}/policy_calibration",
                      columns, rows)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
        self.user_results = self._user_rows()
        if self._trainer is not None and not self.trainer.sanity_checking and self.user_results:
            columns = list(self.user_results[0])
            log_table(self.trainer, "test/users", columns,
                      [[row[c] for c in columns] for row in self.user_results])

    def _user_rows(self) -> list[dict[str, Any]]:
        """One row per (test user, support cap, adaptation step), from every rank: the raw user
        id, ``k`` (the cap: ``"5"``, ``"all"``), ``step``, ``support_size``, ``diverged`` and
        every per-user metric (:func:`metarec.metrics.per_task_metrics`; NaN where undefined)."""
        datamodule = getattr(self._trainer, "datamodule", None)
        by_item = getattr(getattr(datamodule, "task_config", None), "task_by", "user") == "item"
        keys = getattr(getattr(datamodule, "table", None), "item_keys" if by_item else "user_keys",
                       None)  # tasks per item: the row's "user" is the task's item
        rows = []
        for label, step, users, sizes, diverged, per_task in getattr(self, "_user_parts", []):
            values = {name: v.tolist() for name, v in per_task.items()}
            for i, user in enumerate(users.tolist()):
                raw = keys[user] if keys is not None else user
                rows.append({"user": raw.item() if hasattr(raw, "item") else raw,
                             "k": (label[1:] if label.startswith("k") else label) if label
                             else "all", "step": step,
                             "support_size": int(sizes[i]), "diverged": bool(diverged[i]),
                             **{name: v[i] for name, v in values.items()}})
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:  # every rank's tasks
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        order = {label: i for i, label in enumerate(dict.fromkeys(r["k"] for r in rows))}
        rows.sort(key=lambda r: (order[r["k"]], r["step"], str(r["user"])))
        return rows

    def _log_metrics(self, stage: str) -> None:
        store = self.val_metrics if stage == "val" else self.test_metrics
        ndcg = f"ndcg@{self.metrics_config.top_k[0]}"
        for key, metrics in store.items():
            prefix = stage if key == "plain" else f"{stage}/{key}"
            values = metrics.compute(prefix)
            if self._trainer is not None and not self.trainer.sanity_checking:
                steps = list(range(len(metrics.per_step)))
                log_curve(self.trainer, f"{prefix}/adaptation_curve", "step", steps, {
                    "loss": [values[f"{prefix}/step{s}/loss"] for s in steps],
                    ndcg: [values[f"{prefix}/step{s}/{ndcg}"] for s in steps]})
            headline = {f"{prefix}/loss", f"{prefix}/{ndcg}"}
            self.log_dict({k: v for k, v in values.items() if k in headline}, prog_bar=True)
            self.log_dict({k: v for k, v in values.items() if k not in headline})
            metrics.reset()

    # -- deployment ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what deployment needs beside the weights (``checkpoint["metarec_data"]``): the
        user and item feature tables and the raw id keys of the datamodule's interaction table,
        and its ``history_length``, so that :class:`metarec.Adapter` needs nothing but the
        checkpoint; and the record of the user split (``checkpoint["metarec_split"]``, see
        :mod:`metarec.contract`). Under the CLI, also the resolved recipe (``checkpoint["metarec_recipe"]``,
        a plain dict: ``metarec fit --config`` on it rebuilds the model and the task split)."""
        recipe = getattr(self, "metarec_recipe", None)
        if recipe is not None:
            checkpoint["metarec_recipe"] = recipe
        datamodule = getattr(self._trainer, "datamodule", None)
        table = getattr(datamodule, "table", None)
        if table is None:
            return
        keys = lambda k: None if k is None else k.tolist()  # noqa: E731 - plain lists pickle anywhere
        checkpoint["metarec_data"] = {
            "user_features": {f.spec.key: torch.from_numpy(f.values) for f in table.user_features},
            "item_features": {f.spec.key: torch.from_numpy(f.values) for f in table.item_features},
            "user_keys": keys(table.user_keys), "item_keys": keys(table.item_keys),
            "history_length": getattr(datamodule, "history_length", None),
        }
        splits = getattr(datamodule, "splits", None)
        if splits is not None:  # the data contract (metarec.contract)
            checkpoint["metarec_split"] = contract.split_record(splits)

    def predict_step(self, batch: EpisodeBatch | dict[str, EpisodeBatch],
                     batch_idx: int) -> dict[str, Any]:
        """Adapted scores for each task's query items: users, items, scores, labels, mask, and
        which tasks the divergence guard caught (a dict of these per support cap when
        ``data.eval_support`` is set)."""
        if isinstance(batch, dict):
            return {label: self.predict_step(tasks, batch_idx) for label, tasks in batch.items()}
        _, diverged, scores = self.adapt_guarded(batch)
        return {"users": batch.users, "items": batch.query["item_id"], "scores": scores[-1],
                "labels": batch.query["label"], "mask": batch.query["mask"],
                "diverged": diverged[-1]}
