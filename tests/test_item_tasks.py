"""Tasks per item (data.tasks.task_by: item), the chronological cut, warm-up stages and mf's
item side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarec import ConfigError, DataSchema, InteractionTable, TaskConfig, build_tasks
from metarec.data import EpisodeCollator, SupportSweepCollator
from metarec.data.tasks import SPLITS
from metarec_plugins.backbones.mf import MatrixFactorization
from metarec_plugins.datasets.synthetic import SyntheticDataset


@pytest.fixture(scope="module")
def table() -> InteractionTable:
    # 60 items, 300 users: every item gets many interactions.
    return SyntheticDataset(num_users=300, num_items=60, min_interactions=10,
                            max_interactions=30, seed=3).load()


def _item_config(**kw) -> TaskConfig:
    base = dict(task_by="item", min_interactions=20, max_interactions=10_000, query_size=8,
                query_strategy="chronological", support_size=6)
    return TaskConfig(**{**base, **kw})


def test_item_tasks_are_items_and_test_items_unseen(table):
    splits = build_tasks(table, _item_config(), seed=0)
    assert splits.task_by == "item" and all(splits[s].task_by == "item" for s in SPLITS)
    keys = [set(splits[s].users.tolist()) for s in SPLITS]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    counts = np.bincount(table.items, minlength=table.num_items)
    eligible = set(np.flatnonzero(counts >= 20).tolist())
    assert set().union(*keys) == eligible
    # Slots hold users who interacted with the task item, with the table's label and time.
    rating = {(u, i): (r, t) for u, i, r, t in zip(table.users.tolist(), table.items.tolist(),
                                                   table.labels.tolist(),
                                                   table.timestamps.tolist())}
    train = splits.train
    for t in range(len(train)):
        item = int(train.users[t])
        for side in ("support", "query"):
            m = getattr(train, f"{side}_mask")[t]
            for u, r, ts in zip(getattr(train, f"{side}_items")[t][m].tolist(),
                                getattr(train, f"{side}_labels")[t][m].tolist(),
                                getattr(train, f"{side}_times")[t][m].tolist()):
                assert rating[(u, item)] == (pytest.approx(r), ts)


def test_chronological_cut(table):
    """Support = the earliest support_size interactions, query = the next query_size."""
    splits = build_tasks(table, _item_config(), seed=0)
    tasks = splits.test
    for t in range(len(tasks)):
        item = int(tasks.users[t])
        rows = np.flatnonzero(table.items == item)
        rows = rows[np.lexsort((rows, table.timestamps[rows]))]  # time order, ties by row
        support = set(table.users[rows[:6]].tolist())
        query = set(table.users[rows[6:14]].tolist())
        assert set(tasks.support_items[t][tasks.support_mask[t]].tolist()) == support
        assert set(tasks.query_items[t][tasks.query_mask[t]].tolist()) == query
        # Every query interaction comes no earlier than every support interaction.
        s_t = tasks.support_times[t][tasks.support_mask[t]]
        q_t = tasks.query_times[t][tasks.query_mask[t]]
        assert int(s_t.max()) <= int(q_t.min())
        # The support order is the time order: capped(k) keeps the first k.
        for k in (0, 2, 4, 6):
            capped = tasks.capped(k)
            assert set(capped.support_items[t][capped.support_mask[t]].tolist()) == set(
                table.users[rows[:k]].tolist())


def test_hand_worked_item_tasks():
    """Two items, five users, every time distinct: the cut and the split by hand."""
    users = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    items = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    times = [5, 1, 4, 2, 3, 10, 14, 12, 11, 13]
    labels = [1, 2, 3, 4, 5, 5, 4, 3, 2, 1]
    table = InteractionTable(users=users, items=items, labels=labels, timestamps=times,
                             num_users=5, num_items=2)
    config = TaskConfig(task_by="item", min_interactions=3, max_interactions=10, query_size=2,
                        query_strategy="chronological", support_size=2, split=(0.5, 0.5, 0.0))
    splits = build_tasks(table, config, seed=0)
    both = {int(s.users[0]): s for s in (splits.train, splits.val)}
    assert sorted(both) == [0, 1] and len(splits.test) == 0
    item0, item1 = both[0], both[1]
    # Item 0 in time order: users 1 (t=1), 3 (2), 4 (3), 2 (4), 0 (5).
    assert item0.support_items[0].tolist() == [1, 3]
    assert item0.query_items[0].tolist() == [4, 2]
    assert item0.query_labels[0].tolist() == [5.0, 3.0]
    # Item 1 in time order: users 0 (10), 3 (11), 2 (12), 4 (13), 1 (14).
    assert item1.support_items[0].tolist() == [0, 3]
    assert item1.query_items[0].tolist() == [2, 4]


def test_collator_swaps_ids_and_features(table):
    splits = build_tasks(table, _item_config(), seed=0)
    batch = EpisodeCollator(splits.train, table)([0, 1, 2])
    for side in (batch.support, batch.query):
        assert torch.equal(side["item_id"], batch.users[:, None].expand_as(side["item_id"]))
        for f in table.user_features:
            assert torch.equal(side[f.spec.key], torch.from_numpy(f.values)[side["user_id"]])
        for f in table.item_features:
            assert torch.equal(side[f.spec.key], torch.from_numpy(f.values)[side["item_id"]])
    first = splits.train.support_mask[0]
    assert torch.equal(batch.support["user_id"][0][batch.support["mask"][0]],
                       splits.train.support_items[0][first])
    with pytest.raises(ValueError, match="history_length"):
        EpisodeCollator(splits.train, table, history_length=3)


def test_warmup_sweep_is_nested_with_one_query(table):
    splits = build_tasks(table, _item_config(), seed=0)
    sweep = SupportSweepCollator(splits.test, table, [0, 2, 4, 6],
                                 labels=["cold", "warm_a", "warm_b", "warm_c"])
    out = sweep([0, 1])
    assert list(out) == ["cold", "warm_a", "warm_b", "warm_c"]
    assert not out["cold"].support["mask"].any()
    for label, k in (("warm_a", 2), ("warm_b", 4), ("warm_c", 6)):
        assert out[label].support["mask"].sum(1).tolist() == [k, k]
        assert torch.equal(out[label].query["user_id"], out["cold"].query["user_id"])
    a = out["warm_a"].support["user_id"][out["warm_a"].support["mask"]]
    c = out["warm_c"].support["user_id"][:, :2][out["warm_c"].support["mask"][:, :2]]
    assert torch.equal(a, c)  # stage a is the first two of stage c, in time order


def test_implicit_item_tasks_sample_users_as_negatives(table):
    config = _item_config(feedback="implicit", positive_threshold=4.0, negatives_per_positive=1)
    splits = build_tasks(table, config, seed=0)
    seen = set(zip(table.users.tolist(), table.items.tolist()))
    tasks = splits.train
    found = 0
    for t in range(len(tasks)):
        item = int(tasks.users[t])
        m = tasks.support_mask[t]
        for u, y in zip(tasks.support_items[t][m].tolist(), tasks.support_labels[t][m].tolist()):
            if (u, item) not in seen:  # a sampled negative: a user who never saw the item
                assert y == 0.0
                found += 1
    assert found > 0


def test_user_path_unchanged_by_default(table):
    """task_by defaults to user; an explicit task_by: user gives the same tensors."""
    a = build_tasks(table, TaskConfig(min_interactions=13, max_interactions=30), seed=1)
    b = build_tasks(table, TaskConfig(min_interactions=13, max_interactions=30, task_by="user"),
                    seed=1)
    for s in SPLITS:
        assert a[s].task_by == "user"
        for name in ("users", "support_items", "query_items", "support_order"):
            assert torch.equal(getattr(a[s], name), getattr(b[s], name))


def test_config_errors():
    with pytest.raises(ValueError, match="support_size"):
        TaskConfig(query_strategy="chronological")
    with pytest.raises(ValueError, match="support_size"):
        TaskConfig(support_size=3)
    with pytest.raises(ValueError, match="task_by"):
        TaskConfig(task_by="domain")
    with pytest.raises(ValueError, match="min_interactions"):
        TaskConfig(query_strategy="chronological", support_size=20, min_interactions=20)
    # A short query_size no longer needs min_interactions > query_size when chronological.
    TaskConfig(query_strategy="chronological", support_size=3, min_interactions=5, query_size=50)


def test_split_file_refused_for_items(table):
    from metarec.data.tasks import SplitAssignment

    with pytest.raises(ConfigError, match="task_by"):
        build_tasks(table, _item_config(), assignment=SplitAssignment(
            np.zeros(table.num_users, dtype=np.int64), np.zeros((0, 2), dtype=np.int64)))


def test_mf_item_side_fast_parameters_and_score():
    schema = DataSchema(num_users=3, num_items=4, task_by="item")
    mf = MatrixFactorization(schema, embedding_dim=2, init_std=0.0, use_item_table=True)
    assert mf.side == "item" and mf.default_fast_parameters() == ["item_default",
                                                                  "item_default_bias"]
    names = {n for n, _ in mf.named_parameters()}
    assert "user_default" not in names and {"user_embedding.weight", "item_default"} <= names
    with torch.no_grad():
        mf.global_bias.fill_(1.0)
        mf.user_embedding.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0]]))
        mf.user_bias.weight.copy_(torch.tensor([[0.5], [0.0], [-1.0]]))
        mf.item_default.copy_(torch.tensor([0.5, -1.0]))
        mf.item_default_bias.fill_(0.25)
        mf.item_embedding.weight[2] = torch.tensor([1.0, 1.0])
        mf.item_bias.weight[2] = 2.0
    features = {"user_id": torch.tensor([[0, 2]]), "item_id": torch.tensor([[2, 2]])}
    # q_2 = (0.5, -1) + (1, 1) = (1.5, 0); b_2 = 0.25 + 2.
    # user 0: 1 + 0.5 + 2.25 + (1*1.5 + 2*0) = 5.25; user 2: 1 - 1 + 2.25 + 4.5 = 6.75.
    assert mf(features).tolist() == [[5.25, 6.75]]
    # side follows the schema; an explicit side wins.
    assert MatrixFactorization(DataSchema(3, 4)).side == "user"
    assert MatrixFactorization(schema, side="user").default_fast_parameters() == [
        "user_default", "user_default_bias"]
    with pytest.raises(ValueError, match="use_item_table"):
        MatrixFactorization(DataSchema(3, 4), use_item_table=True)


SYNTH = {"num_users": 200, "num_items": 40, "min_interactions": 10, "max_interactions": 25,
         "seed": 5}


def _warmup_datamodule(**kw):
    from metarec.datamodule import EpisodeDataModule

    tasks = _item_config(feedback="implicit", positive_threshold=4.0, negatives_per_positive=0,
                         support_size=6, query_size=10)
    return EpisodeDataModule(dataset="synthetic", dataset_args=SYNTH, tasks=tasks, warmup=2,
                             batch_size=4, eval_batch_size=8, **kw)


def test_warmup_evaluation_end_to_end(tmp_path):
    """Stages cold, warm_a/b/c: AUC and F1 each, one query for all, cold = no support."""
    import lightning.pytorch as pl

    from metarec.module import MetaLearner

    dm = _warmup_datamodule()
    batch = next(iter(dm.test_dataloader()))
    assert list(batch) == ["cold", "warm_a", "warm_b", "warm_c"]
    assert [int(b.support["mask"].sum(1).max()) for b in batch.values()] == [0, 2, 4, 6]
    model = MetaLearner(backbone="mf", backbone_args={"embedding_dim": 4}, algorithm="maml",
                        algorithm_args={"inner_steps": 1, "inner_lr": 0.1}, schema=dm.schema)
    assert model.functional.split()[0].keys() == {"item_default", "item_default_bias"}
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         inference_mode=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    out = trainer.test(model, datamodule=dm, verbose=False)[0]
    for stage in ("cold", "warm_a", "warm_b", "warm_c"):
        assert {f"test/{stage}/auc", f"test/{stage}/f1"} <= set(out)
    # No support: nothing to adapt on, the cold stage's adapted score is its start's.
    assert out["test/cold/auc"] == pytest.approx(out["test/cold/step0/auc"])
    # Every stage starts from the same (item-independent) start: same step-0 numbers.
    assert out["test/warm_c/step0/auc"] == pytest.approx(out["test/cold/step0/auc"])
    rows = model.user_results
    assert {r["k"] for r in rows} == {"cold", "warm_a", "warm_b", "warm_c"}


def test_warmup_needs_chronological_tasks():
    from metarec.datamodule import EpisodeDataModule

    with pytest.raises(ConfigError, match="chronological"):
        EpisodeDataModule(dataset="synthetic", tasks=TaskConfig(), warmup=2)
    with pytest.raises(ConfigError, match="support_size >= 9"):
        EpisodeDataModule(dataset="synthetic", tasks=_item_config(support_size=6), warmup=3)
    with pytest.raises(ConfigError, match="eval_support"):
        EpisodeDataModule(dataset="synthetic", tasks=_item_config(), warmup=2, eval_support=[1])


@pytest.mark.parametrize("recipe", ["mf-maml", "melu-maml"])
def test_task_by_item_on_the_command_line(recipe, ml100k, in_tmp):
    """Issue 13's acceptance: ``--data.tasks.task_by item`` runs a user-side recipe's backbone
    (mf, melu) on tasks per item through the CLI."""
    from conftest import REPO
    from metarec.cli import MetarecCLI

    cli = MetarecCLI(args=["fit", "--config", str(REPO / "recipes/movielens-100k" / f"{recipe}.yaml"),
                           "--data.tasks.task_by", "item", "--trainer.fast_dev_run", "1"])
    assert cli.datamodule.schema.task_by == "item"
    assert cli.trainer.global_step == 1
    assert bool(cli.trainer.callback_metrics["val/loss"].isfinite())
