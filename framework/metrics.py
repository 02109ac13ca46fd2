"""Metrics of adapted models on query sets, at every adaptation step.

How relevance is defined on a query set (``MetricsConfig.relevance``):

- ``threshold`` (default): an item is relevant when its true rating is at least
  ``relevance_threshold`` (default: the top of the rating scale minus one, i.e. 4 on 1-5
  stars); in implicit mode, when its label is 1. nDCG uses these binary gains.
- ``graded``: as ``threshold`` for Precision/Recall/HitRate/MRR, but nDCG uses the graded
  gain ``2^rating - 1`` (MeLU's definition).
- ``recbole``: RecBole-MetaRec's rule: the ``recbole_positives`` (5) query items with the
  highest true rating are the positives, ties broken by query position (earlier first).

Ranking metrics rank each task's query items by predicted score and are averaged over tasks
(tasks with no relevant item are skipped). Tied scores (common: a backbone without id
embeddings gives items with identical features identical scores) are broken by a fixed
pseudo-random key of (user, item), the same for every metric and every run, never by query
position (which under the ``recbole`` rule would leak the tie-breaking of the labels).
``mae``/``rmse`` and the classification metrics pool all query interactions (the global
values); ``user_mae``/``user_rmse`` are each user's own MAE/RMSE averaged over users (MeLU's
definition), which weights every user equally whatever their query size. ``adapt_ratio`` is each task's query loss after the step divided by its
query loss at step 0, averaged over tasks. All reductions are torchmetrics states, so they are
synchronised correctly across DDP ranks (sums and counts, not means of means).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torchmetrics import (
    MeanAbsoluteError,
    MeanMetric,
    MeanSquaredError,
    MetricCollection,
    SumMetric,
)
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
)

from metarec.data.episodes import FeatureBatch


@dataclass
class MetricsConfig:
    """Which metrics are reported and how query relevance is defined (see module docs)."""

    top_k: list[int] = field(default_factory=lambda: [5])
    relevance: Literal["threshold", "graded", "recbole"] = "threshold"
    relevance_threshold: float | None = None
    recbole_positives: int = 5
    classification_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not self.top_k or min(self.top_k) < 1:
            raise ValueError(f"metrics.top_k must be a non-empty list of k >= 1, got {self.top_k}")
        if self.relevance not in ("threshold", "graded", "recbole"):
            raise ValueError(f"metrics.relevance must be threshold, graded or recbole, "
                             f"got {self.relevance!r}")


@dataclass
class DivergenceGuard:
    """When an evaluated (or served) task's adaptation counts as diverged, and what then.

    ``factor``: a task diverges at the first adaptation step whose support loss is non-finite
    or exceeds ``factor`` times its step-0 support loss, or whose query scores are not all
    finite (``null``: no guard). ``fallback``: ``start`` scores a diverged task from its
    step-0 start (the meta-learned or pretrained weights) from that step on; ``keep`` keeps
    its raw adapted values. Either way it is counted (``diverged_users``) and flagged in the
    per-user table. Only support losses and scores are looked at, never a query label.
    """

    factor: float | None = 10.0
    fallback: Literal["start", "keep"] = "start"

    def __post_init__(self) -> None:
        if self.factor is not None and not self.factor > 1:
            raise ValueError(f"divergence.factor must be > 1 or null, got {self.factor}")
        if self.fallback not in ("start", "keep"):
            raise ValueError(f"divergence.fallback must be start or keep, got {self.fallback!r}")


def relevance(labels: torch.Tensor, mask: torch.Tensor, config: MetricsConfig, feedback: str,
              rating_range: tuple[float, float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary relevance and nDCG gain of each query slot ``(B, Q)`` under ``config``."""
    if feedback == "implicit":
        rel = (labels > 0.5) & mask
        return rel, rel.to(labels.dtype)
    if config.relevance == "recbole":
        key = labels.masked_fill(~mask, float("-inf"))
        order = torch.argsort(key, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        rel = (rank < config.recbole_positives) & mask
        return rel, rel.to(labels.dtype)
    threshold = config.relevance_threshold
    if threshold is None:
        if rating_range is None:
            raise ValueError("set metrics.relevance_threshold: the data declares no rating_range, "
                             "so which ratings are relevant is unknown")
        threshold = rating_range[1] - 1.0
    rel = (labels >= threshold) & mask
    if config.relevance == "graded":
        return rel, torch.where(mask, 2.0 ** labels - 1.0, torch.zeros_like(labels))
    return rel, rel.to(labels.dtype)


def tie_broken_ranks(scores: torch.Tensor, users: torch.Tensor, items: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """Rank of each slot within its task (0 = best): by score, ties by a hash of (user, item)."""
    key = (users.long() * 1_000_003 + items.long()) * 2_654_435_761 % 2_147_483_647
    scores = scores.masked_fill(~mask, float("-inf"))
    by_key = torch.argsort(key, dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, by_key), dim=1, descending=True, stable=True)
    order = by_key.gather(1, by_score)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def _merge_list_states(metric: nn.Module) -> None:
    """Concatenate each list state of a torchmetrics metric into a single tensor, in place.

    torchmetrics' AUROC (like its retrieval metrics) keeps one tensor per ``update`` in list
    states whose
    distributed reduction is ``None``, and gather them across ranks one tensor at a time: with
    ranks that ran different numbers of evaluation batches (every task evaluated exactly once,
    see :mod:`metarec.datamodule`) the ranks would issue different numbers of collectives and
    deadlock or fail. One tensor per state and rank makes the gathers line up.
    """
    for name, value in metric.metric_state.items():
        if isinstance(value, list) and len(value) > 1:
            setattr(metric, name, [torch.cat([v.reshape(-1) if v.ndim == 0 else v for v in value])])


def _per_task_auc(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each task's ROC AUC over its query (pairs positive x negative, ties count half); NaN
    for a task without both a positive and a negative."""
    pos = (labels > 0.5) & mask
    neg = (labels <= 0.5) & mask
    diff = scores[:, :, None] - scores[:, None, :]  # (B, Q, Q): positive i vs negative j
    wins = (diff > 0).to(scores.dtype) + 0.5 * (diff == 0).to(scores.dtype)
    pairs = pos[:, :, None] & neg[:, None, :]
    n = pairs.sum((1, 2))
    auc = (wins * pairs).sum((1, 2)) / n.clamp_min(1)
    return torch.where(n > 0, auc, torch.full_like(auc, float("nan")))


@torch.no_grad()
def per_task_metrics(scores: torch.Tensor, query: FeatureBatch, users: torch.Tensor,
                     feedback: str, config: MetricsConfig,
                     rating_range: tuple[float, float] | None) -> dict[str, torch.Tensor]:
    """Every metric of each task (user) on its own query: ``{name: (B,)}``.

    The same definitions as the pooled metrics of :class:`AdaptationMetrics` (same relevance,
    same tie-breaking), one value per task: ``loss``; ``mae``/``rmse`` (explicit) or ``auc``
    (implicit); and ``ndcg@k``, ``precision@k``, ``recall@k``, ``hitrate@k``, ``mrr@k``. A value
    is NaN where it is undefined for that task (no query entry; a ranking metric with no
    relevant item, as the pooled metrics skip them; AUC without both classes). Averaging the
    non-NaN ranking values over tasks gives the pooled ranking metrics exactly.
    """
    mask, labels = query["mask"], query["label"]
    count = mask.sum(1).to(scores.dtype)
    nan = torch.full_like(count, float("nan"))
    has = count > 0
    weight = mask.to(scores.dtype)
    if feedback == "implicit":
        per = torch.nn.functional.binary_cross_entropy_with_logits(scores, labels,
                                                                   reduction="none")
    else:
        per = (scores - labels) ** 2
    out = {"loss": torch.where(has, (per * weight).sum(1) / count.clamp_min(1), nan)}
    if feedback == "explicit":
        out["mae"] = torch.where(has, ((scores - labels).abs() * weight).sum(1)
                                 / count.clamp_min(1), nan)
        out["rmse"] = torch.where(has, out["loss"].sqrt(), nan)
    else:
        out["auc"] = _per_task_auc(scores, labels, mask)
    rel, gain = relevance(labels, mask, config, feedback, rating_range)
    task_users = users[:, None].expand_as(mask)
    ranks = tie_broken_ranks(scores, query.get("user_id", task_users),
                             query.get("item_id", torch.zeros_like(task_users)), mask)
    discount = 1.0 / torch.log2(ranks.to(scores.dtype) + 2.0)
    n_rel = rel.sum(1)
    any_rel = n_rel > 0
    ideal_gain = torch.sort(torch.where(mask, gain, torch.zeros_like(gain)), dim=1,
                            descending=True).values
    ideal_discount = 1.0 / torch.log2(torch.arange(mask.shape[1], device=scores.device,
                                                   dtype=scores.dtype) + 2.0)
    for k in config.top_k:
        top = (ranks < k) & mask
        hits = (rel & top).sum(1).to(scores.dtype)
        dcg = (gain * discount * top).sum(1)
        idcg = (ideal_gain[:, :k] * ideal_discount[:k]).sum(1)
        out[f"ndcg@{k}"] = torch.where(idcg > 0, dcg / idcg.clamp_min(1e-12), nan)
        out[f"precision@{k}"] = torch.where(any_rel, hits / k, nan)
        out[f"recall@{k}"] = torch.where(any_rel, hits / n_rel.clamp_min(1), nan)
        out[f"hitrate@{k}"] = torch.where(any_rel, (hits > 0).to(scores.dtype), nan)
        first = torch.where(rel & top, ranks, torch.full_like(ranks, mask.shape[1])).min(1).values
        rr = torch.where(first < k, 1.0 / (first.to(scores.dtype) + 1.0), torch.zeros_like(count))
        out[f"mrr@{k}"] = torch.where(any_rel, rr, nan)
    return out


class AdaptationMetrics(nn.Module):
    """One torchmetrics collection per adaptation step ``0..steps``."""

    def __init__(self, steps: int, feedback: str, config: MetricsConfig,
                 rating_range: tuple[float, float] | None) -> None:
        super().__init__()
        self.feedback, self.config, self.rating_range = feedback, config, rating_range
        self.per_step = nn.ModuleList([self._collection() for _ in range(steps + 1)])

    def _collection(self) -> MetricCollection:
        m: dict[str, nn.Module] = {"loss": MeanMetric(), "adapt_ratio": MeanMetric(),
                                   "diverged_users": SumMetric()}
        if self.feedback == "explicit":
            m["mae"] = MeanAbsoluteError()
            m["rmse"] = MeanSquaredError(squared=False)
            m["user_mae"] = MeanMetric()
            m["user_rmse"] = MeanMetric()
        else:
            t = self.config.classification_threshold
            m.update(auc=BinaryAUROC(), accuracy=BinaryAccuracy(threshold=t),
                     precision=BinaryPrecision(threshold=t), recall=BinaryRecall(threshold=t),
                     f1=BinaryF1Score(threshold=t))
        # Ranking metrics: the mean over tasks of each task's value (per_task_metrics), tasks
        # where it is undefined skipped, as torchmetrics' retrieval metrics with
        # empty_target_action="skip" compute them (tested equal), at a fraction of the cost:
        # a sum and a count per metric instead of every query score kept until compute.
        for k in self.config.top_k:
            for name in ("ndcg", "precision", "recall", "hitrate", "mrr"):
                m[f"{name}@{k}"] = MeanMetric()
        return MetricCollection(m, compute_groups=False)

    @torch.no_grad()
    def update(self, step: int, scores: torch.Tensor, query: FeatureBatch, task_ids: torch.Tensor,
               losses: torch.Tensor, base_losses: torch.Tensor,
               per_task: dict[str, torch.Tensor] | None = None,
               diverged: torch.Tensor | None = None) -> None:
        """Add one batch of tasks at adaptation ``step``: scores ``(B, Q)``, losses ``(B,)``.

        ``per_task`` (from :func:`per_task_metrics`, computed here when not given) feeds the
        per-user averages; ``diverged`` ``(B,)`` marks tasks the divergence guard caught. A task
        with no query entry counts nowhere.
        """
        if per_task is None:
            per_task = per_task_metrics(scores, query, task_ids, self.feedback, self.config,
                                        self.rating_range)
        weights = query["mask"].any(1).to(losses.dtype)
        mask, labels = query["mask"], query["label"]
        preds, target = scores[mask], labels[mask]
        metrics = self.per_step[step]
        empty = not bool(mask.any())
        for name, metric in metrics.items():
            if empty and name not in ("loss", "adapt_ratio", "diverged_users"):
                continue  # torchmetrics rejects empty updates; nothing to add anyway
            if name == "loss":
                metric.update(losses, weights)
            elif name == "diverged_users":
                metric.update(losses.new_zeros(()) if diverged is None
                              else (diverged & (weights > 0)).sum().to(losses.dtype))
            elif name == "adapt_ratio":
                metric.update(losses / base_losses.clamp_min(1e-12), weights)
            elif name in ("mae", "rmse"):
                metric.update(preds, target)
            elif name in ("user_mae", "user_rmse"):
                value = per_task[name[5:]]
                metric.update(torch.where(weights > 0, value, torch.zeros_like(value)), weights)
            elif "@" in name:  # ranking: mean over the tasks where it is defined
                value = per_task[name]
                defined = ~torch.isnan(value) & (weights > 0)
                metric.update(torch.where(defined, value, torch.zeros_like(value)),
                              defined.to(value.dtype))
            else:  # binary classification on probabilities
                metric.update(torch.sigmoid(preds), target.round().long())

    def compute(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{prefix}/step{s}/{name}`` for every step, and ``{prefix}/{name}`` for the last."""
        out = {}
        last = len(self.per_step) - 1
        for step, metrics in enumerate(self.per_step):
            for metric in metrics.values():
                _merge_list_states(metric)
            for name, value in metrics.compute().items():
                out[f"{prefix}/step{step}/{name}"] = value
                if step == last:
                    out[f"{prefix}/{name}"] = value
        return out

    def reset(self) -> None:
        for metrics in self.per_step:
            metrics.reset()


# The model's hyperparameters (in checkpoints) may hold these: let torch.load(weights_only=True)
# read them.
torch.serialization.add_safe_globals([MetricsConfig, DivergenceGuard])
