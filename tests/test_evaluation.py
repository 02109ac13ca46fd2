"""Evaluation building blocks: user folds, nested support caps, per-user metrics, and the
divergence guard."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import synthetic_batch, synthetic_setup
from metarec import TaskConfig, build_tasks
from metarec.data import EpisodeCollator, SupportSweepCollator
from metarec.metrics import AdaptationMetrics, MetricsConfig, per_task_metrics


def test_folds_test_every_eligible_user_exactly_once():
    table, plain = synthetic_setup()
    eligible = torch.cat([plain[s].users for s in ("train", "val", "test")])
    config = TaskConfig(min_interactions=13, max_interactions=40)
    tested = []
    for fold in range(5):
        splits = build_tasks(table, config, seed=3, folds=5, fold=fold)
        users = {s: set(splits[s].users.tolist()) for s in ("train", "val", "test")}
        assert not (users["train"] & users["val"]) and not (users["train"] & users["test"])
        assert not (users["val"] & users["test"])
        assert users["train"] | users["val"] | users["test"] == set(eligible.tolist())
        # validation users come from the training folds, in the split's proportion (0.1 : 0.8)
        rest = len(users["train"]) + len(users["val"])
        assert len(users["val"]) == round(rest / 9)
        tested += splits["test"].users.tolist()
    assert sorted(tested) == sorted(eligible.tolist())
    # Another seed deals other folds; the same seed the same ones.
    again = build_tasks(table, config, seed=3, folds=5, fold=0)
    other = build_tasks(table, config, seed=4, folds=5, fold=0)
    assert torch.equal(again.test.users, build_tasks(table, config, 3, 5, 0).test.users)
    assert not torch.equal(again.test.users, other.test.users)
    with pytest.raises(ValueError, match="data.folds"):
        build_tasks(table, config, seed=0, folds=5, fold=5)


def test_support_caps_are_nested_and_keep_the_query():
    table, splits = synthetic_setup()
    tasks = splits["test"]
    caps = [1, 3, 5, None]
    capped = {k: tasks.capped(k) for k in caps}
    full = {(t, int(i)) for t in range(len(tasks))
            for i in tasks.support_items[t][tasks.support_mask[t]]}
    previous = None
    for k in caps:
        c = capped[k]
        assert torch.equal(c.query_items, tasks.query_items)
        assert torch.equal(c.query_labels, tasks.query_labels)
        sizes = c.support_mask.sum(1)
        expected = tasks.support_mask.sum(1) if k is None else tasks.support_mask.sum(1).clamp_max(k)
        assert torch.equal(sizes, expected)
        items = {(t, int(i)) for t in range(len(c)) for i in c.support_items[t][c.support_mask[t]]}
        assert items <= full
        if previous is not None:
            assert previous <= items  # nested: the K=1 support is inside the K=3 one, ...
        previous = items
        # still oldest first within each task
        times = c.support_times.masked_fill(~c.support_mask, 2**62)
        assert bool((times[:, 1:] >= times[:, :-1]).all())
    # The order is fixed by the data seed (so every method sees the same K-shot supports).
    again = build_tasks(table, TaskConfig(min_interactions=13, max_interactions=40), seed=0)
    assert torch.equal(again.test.capped(3).support_items, capped[3].support_items)


def test_sweep_collator_builds_histories_from_the_capped_support_only():
    table, splits = synthetic_setup()
    tasks = splits["test"]
    batches = SupportSweepCollator(tasks, table, [2, None], history_length=50)(list(range(4)))
    assert set(batches) == {"k2", "kall"}
    two = batches["k2"]
    assert int(two.query["history.mask"].sum(-1).max()) <= 2
    assert int(two.query["history.mask"].sum()) > 0  # histories exist, so the check below bites
    for t in range(4):
        allowed = set(two.support["item_id"][t][two.support["mask"][t]].tolist())
        seen = set(two.query["history.item_id"][t][two.query["history.mask"][t]].tolist())
        assert seen <= allowed
    plain = EpisodeCollator(tasks, table, history_length=50)(list(range(4)))
    assert torch.equal(batches["kall"].query["history.item_id"], plain.query["history.item_id"])


@pytest.mark.parametrize("relevance", ["threshold", "graded", "recbole"])
def test_per_user_metrics_average_to_torchmetrics_retrieval_metrics(relevance):
    """The mean over users of the per-user ranking metrics (what AdaptationMetrics logs) equals
    torchmetrics' retrieval metrics on the same ranking (the independent reference); per-user
    MAE/RMSE are each user's own, averaged (MeLU's definition)."""
    from torchmetrics.retrieval import (
        RetrievalHitRate,
        RetrievalMRR,
        RetrievalNormalizedDCG,
        RetrievalPrecision,
        RetrievalRecall,
    )

    from metarec.metrics import relevance as relevance_of
    from metarec.metrics import tie_broken_ranks

    _, batch = synthetic_batch(n_tasks=12, dtype=torch.float32)
    query = batch.query
    scores = torch.randn(query["label"].shape, generator=torch.Generator().manual_seed(0)) * 2 + 3
    config = MetricsConfig(top_k=[3, 5], relevance=relevance)
    per = per_task_metrics(scores, query, batch.users, "explicit", config, (1.0, 5.0))
    metrics = AdaptationMetrics(0, "explicit", config, (1.0, 5.0))
    metrics.update(0, scores, query, batch.users, per["loss"], per["loss"], per)
    pooled = metrics.compute("t")
    mask = query["mask"]
    rel, gain = relevance_of(query["label"], mask, config, "explicit", (1.0, 5.0))
    ranks = tie_broken_ranks(scores, query["user_id"], query["item_id"], mask)
    order = (mask.shape[1] - ranks).float()[mask]  # distinct positive scores in rank order
    index = batch.users[:, None].expand_as(mask)[mask]
    reference = {"ndcg": RetrievalNormalizedDCG, "precision": RetrievalPrecision,
                 "recall": RetrievalRecall, "hitrate": RetrievalHitRate, "mrr": RetrievalMRR}
    for k in (3, 5):
        for name, cls in reference.items():
            metric = cls(top_k=k, empty_target_action="skip")
            target = gain[mask] if name == "ndcg" else rel[mask]
            expected = float(metric(order, target, indexes=index))
            assert float(pooled[f"t/{name}@{k}"]) == pytest.approx(expected, abs=1e-6), name
    for t in range(len(batch)):
        err = (scores[t] - query["label"][t])[mask[t]]
        assert float(per["mae"][t]) == pytest.approx(float(err.abs().mean()), rel=1e-6)
        assert float(per["rmse"][t]) == pytest.approx(math.sqrt(float((err ** 2).mean())), rel=1e-6)
    assert float(pooled["t/user_mae"]) == pytest.approx(float(per["mae"].mean()), rel=1e-6)
    assert float(pooled["t/user_rmse"]) == pytest.approx(float(per["rmse"].mean()), rel=1e-6)


def test_per_user_auc_counts_ties_half():
    scores = torch.tensor([[2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    query = {"label": torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]),
             "mask": torch.tensor([[True, True, True, True], [True, True, True, False]])}
    per = per_task_metrics(scores, query, torch.tensor([0, 1]), "implicit",
                           MetricsConfig(top_k=[2]), None)
    # task 0: positives 2.0, 1.0 vs negatives 1.0, 0.0 -> (1 + 1 + 0.5 + 1) / 4
    assert float(per["auc"][0]) == pytest.approx(0.875)
    assert math.isnan(float(per["auc"][1]))  # no negative


def _exploding_learner(fallback: str, factor: float | None = 10.0):
    from metarec import DataSchema
    from metarec.metrics import DivergenceGuard
    from metarec.module import MetaLearner

    table, splits = synthetic_setup()
    schema = DataSchema(table.num_users, table.num_items, table.schema.features, "explicit",
                        (1.0, 5.0))
    torch.manual_seed(0)
    model = MetaLearner(backbone="melu", backbone_args={"embedding_dim": 4, "hidden": [8, 8]},
                        algorithm="maml", algorithm_args={"inner_steps": 3, "inner_lr": 0.01},
                        policy="finetune", policy_args={"steps": 3, "lr": 50.0},
                        divergence=DivergenceGuard(factor=factor, fallback=fallback),
                        schema=schema)
    batch = EpisodeCollator(splits["test"], table)(list(range(8)))
    return model, batch


def test_divergence_guard_falls_back_to_the_start_and_counts():
    model, batch = _exploding_learner("start")
    iterates, diverged, scores = model.adapt_guarded(batch)
    raw = model.adapt(batch)
    slow = {k: v.detach() for k, v in model.functional.split()[1].items()}
    for fast, step_scores in zip(iterates, scores):  # the scores are those of the guarded iterates
        torch.testing.assert_close(step_scores,
                                   model.functional.predict_tasks(fast, slow, batch.query))
    assert not diverged[0].any() and diverged[-1].any()
    caught = diverged[-1]
    for name, start in iterates[0].items():
        assert torch.equal(iterates[-1][name][caught], start[caught])
        assert torch.equal(iterates[-1][name][~caught], raw[-1][name][~caught])
    for earlier, later in zip(diverged, diverged[1:]):
        assert bool((later | ~earlier).all())  # once diverged, diverged from then on
    model.on_test_epoch_start()
    metrics = model._metrics("test", "")
    model._evaluate(batch, "test")
    values = metrics.compute("test")
    assert float(values["test/diverged_users"]) == float(caught.sum())
    assert float(values["test/step0/diverged_users"]) == 0
    # the fallback scores the caught users exactly like step 0
    rows = {(r["user"], r["step"]): r for r in model._user_rows()}
    for r in rows.values():
        if r["diverged"]:
            assert r["mae"] == pytest.approx(rows[(r["user"], 0)]["mae"])
    assert math.isfinite(float(values["test/mae"]))


def test_divergence_guard_keep_only_counts_and_off_does_nothing():
    model, batch = _exploding_learner("keep")
    iterates, diverged, _ = model.adapt_guarded(batch)
    raw = model.adapt(batch)
    assert diverged[-1].any()
    for name in raw[-1]:
        assert torch.equal(iterates[-1][name], raw[-1][name])
    model, batch = _exploding_learner("start", factor=None)
    _, diverged, _ = model.adapt_guarded(batch)
    assert not any(bool(d.any()) for d in diverged)


def test_the_guard_flags_the_same_tasks_stacked_and_per_iterate(monkeypatch):
    """A few tasks are guarded in one stacked pass, many one iterate at a time: the same flags
    (a non-finite fast parameter, a blown-up loss) and the same guarded iterates either way."""
    import metarec.module as module

    model, batch = _exploding_learner("start", factor=1e6)
    slow = {k: v.detach() for k, v in model.functional.split()[1].items()}
    iterates = [dict(f) for f in model.adapt(batch)]

    def run():
        return module.guard_iterates(model.functional, iterates, slow, batch.support,
                                     model.divergence, batch.query)

    caught = run()[1][1]
    assert caught.any() and not caught.all()  # some losses blow up at step 1, not all
    healthy = int((~caught).nonzero()[0])
    name = next(iter(iterates[1]))
    poisoned = iterates[1][name].clone()
    poisoned[healthy].view(-1)[0] = float("nan")  # its fast parameters turn NaN at step 1
    iterates[1][name] = poisoned
    stacked = run()
    monkeypatch.setattr(module, "STACKED_GUARD_TASKS", 0)
    looped = run()
    assert torch.equal(stacked[1][1], caught.index_fill(0, torch.tensor([healthy]), True))
    # The parameter check alone (every loss 0, no query): only the poisoned task is caught.
    functional = model.functional
    monkeypatch.setattr(functional, "loss_tasks", lambda f, s, b: torch.zeros(len(batch)))
    for tasks in (0, 8):  # per iterate, then stacked
        monkeypatch.setattr(module, "STACKED_GUARD_TASKS", tasks)
        flags = module.guard_iterates(functional, iterates, slow, batch.support,
                                      model.divergence)[1]
        assert flags[1].nonzero().flatten().tolist() == [healthy]
    for a, b in zip(stacked[1], looped[1]):
        assert torch.equal(a, b)
    for a, b in zip(stacked[0], looped[0]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(stacked[2], looped[2]):
        torch.testing.assert_close(a, b)


def test_the_adapter_serves_under_the_same_guard():
    """Deployment runs the evaluation's guard: a user whose adaptation explodes is served from
    the start."""
    from metarec import Adapter
    from metarec.module import guard_iterates

    model, batch = _exploding_learner("start")
    slow = {k: v.detach() for k, v in model.functional.split()[1].items()}
    expected, diverged, _ = guard_iterates(model.functional, model.adapt(batch), slow,
                                           batch.support, model.divergence)
    assert diverged[-1].any()
    table, _ = synthetic_setup()
    tables = lambda features: {f.spec.key: torch.from_numpy(f.values) for f in features}  # noqa: E731
    served = Adapter(model, item_features=tables(table.item_features),
                     user_features=tables(table.user_features))._run(batch.support)
    for name, value in served.items():
        torch.testing.assert_close(value, expected[-1][name])


def test_finite_rows_is_exact_when_a_sum_overflows():
    """The guard's parameter check reads row sums, but a row of large finite values whose sum
    overflows is still finite; NaN and +-inf anywhere in a row are caught."""
    from metarec.module import finite_rows

    big = torch.full((4, 3, 2), 3e38)
    other = torch.zeros(4, 5)
    assert finite_rows([big, other], 4).all()
    other[1, 2], big[2, 0, 1], big[3, 1, 0] = float("nan"), float("inf"), -float("inf")
    assert finite_rows([big, other], 4).tolist() == [True, False, False, False]
    assert finite_rows([torch.randn(6, 2)], 6).all()


def test_the_guard_reads_the_policys_losses_with_the_same_flags():
    """``finetune`` hands the guard the support losses its steps computed: the same flags and
    iterates as the guard computing them itself."""
    from metarec.module import guard_iterates

    model, batch = _exploding_learner("start", factor=1e6)
    fast, slow = model.functional.split()
    fast = {k: v.detach() for k, v in fast.items()}
    slow = {k: v.detach() for k, v in slow.items()}
    iterates, losses = model.policy.adapt_with_losses(model.functional, fast, slow,
                                                      batch.support)
    assert losses.shape == (len(iterates), len(batch))
    given = guard_iterates(model.functional, iterates, slow, batch.support, model.divergence,
                           losses=losses)
    computed = guard_iterates(model.functional, iterates, slow, batch.support,
                              model.divergence)
    assert given[1][1].any() and not given[1][1].all()
    for a, b in zip(given[1], computed[1]):
        assert torch.equal(a, b)
    for a, b in zip(given[0], computed[0]):
        assert all(torch.equal(a[k], b[k]) for k in a)
