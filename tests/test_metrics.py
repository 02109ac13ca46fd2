"""Query-set metrics: definitions by hand, relevance rules, chance levels, pooling."""

from __future__ import annotations

import math

import pytest
import torch

from metarec.metrics import AdaptationMetrics, MetricsConfig, relevance

SCALE = (1.0, 5.0)


def _compute(scores, labels, config=None, feedback="explicit", losses=None, base=None):
    scores, labels = torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.float32)
    mask = torch.ones_like(labels, dtype=torch.bool)
    return _compute_masked(scores, labels, mask, config, feedback, losses, base)


def _compute_masked(scores, labels, mask, config=None, feedback="explicit", losses=None, base=None):
    metrics = AdaptationMetrics(0, feedback, config or MetricsConfig(top_k=[3]), SCALE)
    n = len(labels)
    losses = torch.ones(n) if losses is None else losses
    metrics.update(0, scores, {"label": labels, "mask": mask}, torch.arange(n), losses,
                   losses if base is None else base)
    return {k.split("/")[-1]: float(v) for k, v in metrics.compute("val").items()
            if "/step" not in k}


def test_ranking_metrics_by_hand():
    # Ratings 5, 1, 4, 2 (relevant: >= 4 -> items 0 and 2); the model ranks 1, 0, 2, 3.
    out = _compute([[0.8, 0.9, 0.5, 0.1]], [[5, 1, 4, 2]])
    dcg = 1 / math.log2(3) + 1 / math.log2(4)   # relevant items at ranks 2 and 3
    idcg = 1 + 1 / math.log2(3)
    assert out["ndcg@3"] == pytest.approx(dcg / idcg, abs=1e-6)
    assert out["precision@3"] == pytest.approx(2 / 3)
    assert out["recall@3"] == pytest.approx(1.0)
    assert out["hitrate@3"] == pytest.approx(1.0)
    assert out["mrr@3"] == pytest.approx(0.5)
    assert out["mae"] == pytest.approx((4.2 + 0.1 + 3.5 + 1.9) / 4, abs=1e-6)
    assert out["rmse"] == pytest.approx(math.sqrt((4.2**2 + 0.1**2 + 3.5**2 + 1.9**2) / 4), abs=1e-6)


def test_ties_are_broken_the_same_way_for_every_metric_and_not_by_position():
    """Identical scores everywhere: the order comes from the (user, item) key, the same for
    every metric, and positives (first positions) are not systematically favoured."""
    n = 3000
    labels = torch.randint(1, 6, (n, 10), generator=torch.Generator().manual_seed(1)).float()
    query = {"label": labels, "mask": torch.ones_like(labels, dtype=torch.bool),
             "user_id": torch.arange(n)[:, None].expand(n, 10),
             "item_id": torch.randint(0, 1000, (n, 10), generator=torch.Generator().manual_seed(2))}
    metrics = AdaptationMetrics(0, "explicit", MetricsConfig(top_k=[3], relevance="recbole"), SCALE)
    metrics.update(0, torch.zeros(n, 10), query, torch.arange(n), torch.ones(n), torch.ones(n))
    out = {k.split("/")[-1]: float(v) for k, v in metrics.compute("val").items() if "/step" not in k}
    # Every task has 5 positives: hits in the top 3 = 3 * P@3 = 5 * R@3 iff both metrics saw
    # the same order of the tied items.
    assert 3 * out["precision@3"] == pytest.approx(5 * out["recall@3"], abs=1e-6)
    assert out["precision@3"] == pytest.approx(0.5, abs=0.015)


def test_negative_scores_are_ranked_like_any_others():
    """Logits and centred scores can be negative; ranking must depend on order only."""
    a = _compute([[0.8, 0.9, 0.5, 0.1]], [[5, 1, 4, 2]])
    b = _compute([[-3.2, -3.1, -3.5, -3.9]], [[5, 1, 4, 2]])
    for k in ("ndcg@3", "precision@3", "recall@3", "mrr@3", "hitrate@3"):
        assert a[k] == pytest.approx(b[k]), k


def test_graded_ndcg_uses_exponential_gain():
    config = MetricsConfig(top_k=[3], relevance="graded")
    out = _compute([[0.8, 0.9, 0.5, 0.1]], [[5, 1, 4, 2]], config)
    gains = {0: 31, 1: 1, 2: 15, 3: 3}
    dcg = gains[1] + gains[0] / math.log2(3) + gains[2] / math.log2(4)
    idcg = gains[0] + gains[2] / math.log2(3) + gains[3] / math.log2(4)
    assert out["ndcg@3"] == pytest.approx(dcg / idcg, abs=1e-5)


def test_recbole_rule_top5_by_rating_ties_by_position():
    labels = torch.tensor([[3., 5., 3., 4., 3., 3., 1., 2., 3., 5.]])
    mask = torch.ones_like(labels, dtype=torch.bool)
    rel, _ = relevance(labels, mask, MetricsConfig(relevance="recbole"), "explicit", SCALE)
    # 5, 5, 4 and then the two earliest of the 3-star items (positions 0 and 2).
    assert rel[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 9]


def test_padding_is_never_relevant_nor_ranked():
    labels = torch.tensor([[5., 4., 0., 0.]])
    mask = torch.tensor([[True, True, False, False]])
    scores = torch.tensor([[0.1, 0.2, 9.0, 8.0]])
    out = _compute_masked(scores, labels, mask, MetricsConfig(top_k=[2]))
    assert out["precision@2"] == pytest.approx(1.0) and out["ndcg@2"] == pytest.approx(1.0)
    assert out["mae"] == pytest.approx((4.9 + 3.8) / 2, abs=1e-6)


def test_chance_levels_under_the_recbole_rule():
    """A random ranking of 10 items with 5 positives: P@5 = nDCG@5 = 0.5, MRR@5 = 0.704."""
    gen = torch.Generator().manual_seed(0)
    n = 4000
    labels = torch.randint(1, 6, (n, 10), generator=gen).float()
    scores = torch.rand(n, 10, generator=gen)
    out = _compute(scores, labels, MetricsConfig(top_k=[5], relevance="recbole"))
    assert out["precision@5"] == pytest.approx(0.5, abs=0.01)
    assert out["recall@5"] == pytest.approx(out["precision@5"], abs=1e-6)
    assert out["ndcg@5"] == pytest.approx(0.5, abs=0.01)
    assert out["mrr@5"] == pytest.approx(0.704, abs=0.01)
    assert out["hitrate@5"] > 0.99


def test_adapt_ratio_is_mean_of_per_task_ratios():
    out = _compute([[1.0], [1.0]], [[1.0], [1.0]], losses=torch.tensor([1.0, 3.0]),
                   base=torch.tensor([2.0, 4.0]))
    assert out["adapt_ratio"] == pytest.approx((0.5 + 0.75) / 2)
    assert out["loss"] == pytest.approx(2.0)


def test_implicit_mode_reports_auc_and_classification_metrics():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    out = _compute(logits, labels, MetricsConfig(top_k=[2]), feedback="implicit")
    assert out["auc"] == pytest.approx(0.5)  # pairs (0>1, 0>2, 3<1, 3<2): 2 of 4 ordered
    assert out["accuracy"] == pytest.approx(0.5)  # predicted 1,0,1,0
    assert out["precision"] == pytest.approx(0.5) and out["recall"] == pytest.approx(0.5)
    assert out["f1"] == pytest.approx(0.5)
    assert "mae" not in out


def test_config_validation():
    with pytest.raises(ValueError, match="relevance"):
        MetricsConfig(relevance="top5")
    with pytest.raises(ValueError, match="top_k"):
        MetricsConfig(top_k=[0])


def test_explicit_ratings_without_a_scale_need_a_threshold():
    labels = torch.tensor([[3.0, 7.0]])
    mask = torch.ones_like(labels, dtype=torch.bool)
    with pytest.raises(ValueError, match="relevance_threshold"):
        relevance(labels, mask, MetricsConfig(), "explicit", None)
    rel, _ = relevance(labels, mask, MetricsConfig(relevance_threshold=5.0), "explicit", None)
    assert rel.tolist() == [[False, True]]
