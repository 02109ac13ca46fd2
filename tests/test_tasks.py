"""Task building (filter, user split, support/query, negatives) and episode collation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from metarec import DataError, InteractionTable, TaskConfig, build_tasks
from metarec.data import EpisodeCollator, TaskSet, inputs
from metarec.data.tasks import SPLITS
from metarec_plugins.datasets.synthetic import SyntheticDataset


@pytest.fixture(scope="module")
def table() -> InteractionTable:
    # Counts per user span 5..70, so filtering at [13, 50] drops users on both sides.
    return SyntheticDataset(num_users=400, num_items=150, min_interactions=5,
                            max_interactions=70, seed=7).load()


@pytest.fixture(scope="module")
def clicks() -> InteractionTable:
    """An implicit table with room for 3 negatives per positive for every user."""
    return _implicit(SyntheticDataset(num_users=300, num_items=600, min_interactions=5,
                                      max_interactions=70, seed=8).load())


def _implicit(table: InteractionTable) -> InteractionTable:
    return InteractionTable(
        users=table.users, items=table.items, labels=np.ones(len(table)),
        timestamps=table.timestamps, num_users=table.num_users, num_items=table.num_items,
        user_features=table.user_features, item_features=table.item_features,
        feedback="implicit", rating_range=None, source="implicit-synthetic")


def _side(tasks: TaskSet, t: int, prefix: str):
    """(items, labels, times) of task ``t``'s masked slots on one side."""
    mask = getattr(tasks, f"{prefix}_mask")[t]
    return (getattr(tasks, f"{prefix}_items")[t][mask].numpy(),
            getattr(tasks, f"{prefix}_labels")[t][mask].numpy(),
            getattr(tasks, f"{prefix}_times")[t][mask].numpy())


def _triples(user: int, items, times) -> list[tuple[int, int, int]]:
    return [(user, int(i), int(s)) for i, s in zip(items, times, strict=True)]


def _user_triples(table: InteractionTable, user: int) -> list[tuple[int, int, int]]:
    rows = table.users == user
    return _triples(user, table.items[rows], table.timestamps[rows])


def _all_tasks(splits):
    for name in SPLITS:
        tasks = splits[name]
        for t in range(len(tasks)):
            yield tasks, t, int(tasks.users[t])


# --------------------------------------------------------------------------------------------
# users: filtering and split


def test_splits_are_disjoint_and_cover_exactly_the_kept_users(table):
    config = TaskConfig(min_interactions=13, max_interactions=50)
    splits = build_tasks(table, config, seed=0)
    counts = np.bincount(table.users, minlength=table.num_users)
    expected = set(np.flatnonzero((counts >= 13) & (counts <= 50)).tolist())
    assert 0 < len(expected) < (counts > 0).sum(), "fixture must drop users on both sides"
    members = {name: splits[name].users.tolist() for name in SPLITS}
    for name, users in members.items():
        assert len(users) == len(set(users)), f"user repeated within {name}"
    sets = {name: set(users) for name, users in members.items()}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    assert sets["train"] | sets["val"] | sets["test"] == expected
    n = len(expected)
    assert abs(len(sets["train"]) - 0.8 * n) <= 1
    assert abs(len(sets["val"]) - 0.1 * n) <= 1
    assert abs(len(sets["test"]) - 0.1 * n) <= 1
    assert splits.stats == {
        "users": int((counts > 0).sum()),
        "dropped_below_min": int(((counts > 0) & (counts < 13)).sum()),
        "dropped_above_max": int((counts > 50).sum()),
        "tasks": n,
    }


def test_custom_split_fractions(table):
    splits = build_tasks(table, TaskConfig(split=(0.5, 0.25, 0.25)), seed=0)
    n = splits.stats["tasks"]
    assert abs(len(splits.train) - n / 2) <= 1 and abs(len(splits.val) - n / 4) <= 1
    assert len(splits.train) + len(splits.val) + len(splits.test) == n


def _table_with_counts(counts: list[int], num_items: int = 200) -> InteractionTable:
    users = np.repeat(np.arange(len(counts)), counts)
    items = np.concatenate([np.arange(c) for c in counts]).astype(np.int64)
    return InteractionTable(users=users, items=items, labels=np.full(len(users), 3.0),
                            timestamps=np.arange(len(users)), num_users=len(counts),
                            num_items=num_items, source="handmade")


def test_filter_keeps_exactly_the_users_in_range():
    # User 5 has no interactions at all: it is neither a task nor counted as dropped.
    counts = [12, 13, 20, 100, 101, 0, 150, 3]
    table = _table_with_counts(counts)
    splits = build_tasks(table, TaskConfig(min_interactions=13, max_interactions=100), seed=1)
    kept = sorted(u for name in SPLITS for u in splits[name].users.tolist())
    assert kept == [1, 2, 3]
    assert splits.stats == {"users": 7, "dropped_below_min": 2, "dropped_above_max": 2,
                            "tasks": 3}


def test_no_task_left_names_the_rules():
    table = _table_with_counts([3, 5, 150, 0, 7])
    with pytest.raises(DataError) as info:
        build_tasks(table, TaskConfig(min_interactions=13, max_interactions=100))
    message = str(info.value)
    assert "no task left" in message
    assert "of 4 users" in message
    assert "3 have fewer than min_interactions=13" in message
    assert "1 more than max_interactions=100" in message
    assert "handmade" in message


# --------------------------------------------------------------------------------------------
# support and query


@pytest.mark.parametrize("strategy", ["random", "latest"])
def test_support_and_query_partition_each_users_interactions(table, strategy):
    config = TaskConfig(min_interactions=13, max_interactions=50, query_size=7,
                        query_strategy=strategy)
    splits = build_tasks(table, config, seed=3)
    checked = 0
    for tasks, t, user in _all_tasks(splits):
        s_items, s_labels, s_times = _side(tasks, t, "support")
        q_items, q_labels, q_times = _side(tasks, t, "query")
        support, query = _triples(user, s_items, s_times), _triples(user, q_items, q_times)
        assert len(query) == 7
        assert not set(support) & set(query)
        assert Counter(support + query) == Counter(_user_triples(table, user))
        # Labels travel with their interaction.
        rows = {(int(i), int(s)): float(y) for i, s, y in
                zip(table.items[table.users == user], table.timestamps[table.users == user],
                    table.labels[table.users == user], strict=True)}
        assert [rows[(int(i), int(s))] for i, s in zip(s_items, s_times, strict=True)] == \
            s_labels.tolist()
        assert [rows[(int(i), int(s))] for i, s in zip(q_items, q_times, strict=True)] == \
            q_labels.tolist()
        # Slots are filled from the left, oldest first.
        for prefix in ("support", "query"):
            mask = getattr(tasks, f"{prefix}_mask")[t]
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()
        assert (np.diff(s_times) >= 0).all() and (np.diff(q_times) >= 0).all()
        checked += 1
    assert checked == splits.stats["tasks"]


def test_latest_query_is_the_most_recent(table):
    config = TaskConfig(min_interactions=13, max_interactions=50, query_size=5,
                        query_strategy="latest")
    splits = build_tasks(table, config, seed=0)
    for tasks, t, user in _all_tasks(splits):
        _, _, s_times = _side(tasks, t, "support")
        _, _, q_times = _side(tasks, t, "query")
        assert q_times.min() >= s_times.max()
        newest = np.sort(table.timestamps[table.users == user])[-5:]
        assert np.array_equal(np.sort(q_times), newest)


def test_random_query_is_not_just_the_latest(table):
    config = TaskConfig(min_interactions=13, max_interactions=50, query_size=5)
    splits = build_tasks(table, config, seed=0)
    latest = 0
    for tasks, t, _ in _all_tasks(splits):
        _, _, s_times = _side(tasks, t, "support")
        _, _, q_times = _side(tasks, t, "query")
        latest += q_times.min() >= s_times.max()
    assert latest < 0.2 * splits.stats["tasks"]


@pytest.mark.parametrize("strategy", ["random", "latest"])
def test_max_support_caps_the_support_set(table, strategy):
    config = TaskConfig(min_interactions=13, max_interactions=50, query_size=6, max_support=9,
                        query_strategy=strategy)
    splits = build_tasks(table, config, seed=2)
    assert splits.train.support_mask.shape[1] == 9
    capped = 0
    for tasks, t, user in _all_tasks(splits):
        s_items, _, s_times = _side(tasks, t, "support")
        q_items, _, q_times = _side(tasks, t, "query")
        count = int((table.users == user).sum())
        assert len(s_items) == min(count - 6, 9)
        assert len(q_items) == 6
        support, query = _triples(user, s_items, s_times), _triples(user, q_items, q_times)
        assert not set(support) & set(query)
        assert set(support) | set(query) <= set(_user_triples(table, user))
        if strategy == "latest":  # the kept support is the most recent before the query
            ordered = np.sort(table.timestamps[table.users == user])
            assert np.array_equal(np.sort(s_times), ordered[-6 - len(s_times):-6])
        capped += count - 6 > 9
    assert capped > 0


def test_deterministic_in_seed(table):
    config = TaskConfig(min_interactions=13, max_interactions=50)
    a, b, c = (build_tasks(table, config, seed=s) for s in (5, 5, 6))
    for name in SPLITS:
        for field in ("users", "support_items", "support_mask", "query_items", "query_times"):
            assert torch.equal(getattr(a[name], field), getattr(b[name], field))
    assert not torch.equal(a.train.users, c.train.users)
    # Same user, different seed: a different random query draw.
    common = sorted(set(a.train.users.tolist()) & set(c.train.users.tolist()))
    assert len(common) > 10
    differ = 0
    for user in common:
        ta, tc = (int(np.flatnonzero(s.train.users.numpy() == user)[0]) for s in (a, c))
        qa = set(_side(a.train, ta, "query")[0].tolist())
        qc = set(_side(c.train, tc, "query")[0].tolist())
        differ += qa != qc
    assert differ > 0.9 * len(common)


# --------------------------------------------------------------------------------------------
# implicit feedback


@pytest.mark.parametrize("per_positive", [1, 3])
def test_implicit_negatives(clicks, per_positive):
    config = TaskConfig(min_interactions=13, max_interactions=50, query_size=5,
                        negatives_per_positive=per_positive)
    splits = build_tasks(clicks, config, seed=4)
    assert splits.feedback == "implicit"
    for tasks, t, user in _all_tasks(splits):
        interacted = set(clicks.items[clicks.users == user].tolist())
        task_items = []
        for prefix in ("support", "query"):
            items, labels, times = _side(tasks, t, prefix)
            assert set(np.unique(labels)) <= {0.0, 1.0}
            positives, negatives = items[labels == 1], items[labels == 0]
            assert len(negatives) == per_positive * len(positives)
            assert set(positives.tolist()) <= interacted
            assert not set(negatives.tolist()) & interacted
            task_items += items.tolist()
        assert len(task_items) == len(set(task_items)), "items repeat within a task"
        assert int(tasks.query_mask[t].sum()) == 5 * (1 + per_positive)
        assert (tasks.query_labels[t][tasks.query_mask[t]] == 1).sum() == 5


def test_implicit_latest_keeps_time_order_with_negatives(clicks):
    config = TaskConfig(min_interactions=13, max_interactions=50, query_size=4,
                        query_strategy="latest", negatives_per_positive=2)
    splits = build_tasks(clicks, config, seed=0)
    for tasks, t, _ in _all_tasks(splits):
        assert _side(tasks, t, "query")[2].min() >= _side(tasks, t, "support")[2].max()


def test_explicit_table_as_implicit_with_threshold(table):
    config = TaskConfig(min_interactions=13, max_interactions=50, query_size=5,
                        feedback="implicit", positive_threshold=4.0, negatives_per_positive=2)
    splits = build_tasks(table, config, seed=0)
    assert splits.feedback == "implicit"
    for tasks, t, user in _all_tasks(splits):
        rows = table.users == user
        rating = dict(zip(table.items[rows].tolist(), table.labels[rows].tolist(), strict=True))
        for prefix in ("support", "query"):
            items, labels, _ = _side(tasks, t, prefix)
            observed = np.array([i in rating for i in items.tolist()])
            # Observed interactions are labelled by the threshold...
            assert labels[observed].tolist() == \
                [float(rating[i] >= 4.0) for i in items[observed].tolist()]
            # ... and sampled negatives come two per *positive*, never for a low rating.
            assert (labels[~observed] == 0).all()
            assert (~observed).sum() == 2 * (labels[observed] == 1).sum()


def test_implicit_without_negatives(table):
    config = TaskConfig(min_interactions=13, max_interactions=50, negatives_per_positive=0)
    splits = build_tasks(_implicit(table), config, seed=0)
    assert (splits.train.query_labels[splits.train.query_mask] == 1).all()
    assert (splits.train.query_mask.sum(1) == 10).all()


def test_negatives_impossible_when_users_saw_everything():
    counts = [20, 20, 20]
    table = _table_with_counts(counts, num_items=21)
    table = _implicit(table)
    with pytest.raises(DataError, match="negatives"):
        build_tasks(table, TaskConfig(negatives_per_positive=2))


# --------------------------------------------------------------------------------------------
# episode collation


def test_episode_collator_shapes_masks_and_features(table):
    config = TaskConfig(min_interactions=13, max_interactions=50, query_size=5)
    splits = build_tasks(table, config, seed=0)
    tasks = splits.train
    full_width = tasks.support_mask.shape[1]
    support_counts = tasks.support_mask.sum(1)
    # Pick the three shortest tasks: their batch must be trimmed below the split's width.
    idx = torch.argsort(support_counts)[:3].tolist()
    width = int(support_counts[idx].max())
    assert width < full_width
    batch = EpisodeCollator(tasks, table)(idx)
    assert len(batch) == 3 and torch.equal(batch.users, tasks.users[idx])

    support, query = batch.support, batch.query
    for key in ("user_id", "item_id", "label", "mask", "time", "user.segment", "user.region",
                "item.category", "item.style"):
        assert support[key].shape == (3, width), key
        assert query[key].shape == (3, 5), key
    assert support["item.tags"].shape == (3, width, 10)
    assert query["item.tags"].shape == (3, 5, 10)
    assert support["mask"].dtype == torch.bool and support["label"].is_floating_point()
    assert torch.equal(support["mask"].sum(1), support_counts[idx])
    assert torch.equal(support["item_id"], tasks.support_items[idx][:, :width])
    assert torch.equal(query["label"], tasks.query_labels[idx][:, :5])
    assert torch.equal(query["time"], tasks.query_times[idx][:, :5])
    assert (support["user_id"] == batch.users[:, None]).all()

    feats = {f.spec.key: f.values for f in table.user_features + table.item_features}
    for b in range(3):
        user = int(batch.users[b])
        assert (support["user.segment"][b] == int(feats["user.segment"][user])).all()
        assert (query["user.region"][b] == int(feats["user.region"][user])).all()
        for s in range(int(support["mask"][b].sum())):
            item = int(support["item_id"][b, s])
            assert int(support["item.category"][b, s]) == int(feats["item.category"][item])
            assert int(support["item.style"][b, s]) == int(feats["item.style"][item])
            assert torch.equal(support["item.tags"][b, s], torch.from_numpy(feats["item.tags"][item]))
        for s in range(5):
            item = int(query["item_id"][b, s])
            assert int(query["item.category"][b, s]) == int(feats["item.category"][item])
    assert set(inputs(support)) == set(support) - {"label", "mask", "time"}


def test_episode_collator_uses_the_longest_task_of_the_batch(table):
    splits = build_tasks(table, TaskConfig(min_interactions=13, max_interactions=50), seed=0)
    tasks = splits.train
    longest = int(torch.argmax(tasks.support_mask.sum(1)))
    batch = EpisodeCollator(tasks, table)([longest, 0])
    assert batch.support["item_id"].shape[1] == tasks.support_mask.shape[1]
    assert torch.equal(batch.support["mask"][1], tasks.support_mask[0])


def test_episode_collator_multihot_user_feature():
    from metarec import Feature, FeatureSpec

    counts = [15, 16, 17]
    base = _table_with_counts(counts, num_items=30)
    hobbies = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=np.float32)
    table = InteractionTable(
        users=base.users, items=base.items, labels=base.labels, timestamps=base.timestamps,
        num_users=3, num_items=30,
        user_features=[Feature(FeatureSpec("hobby", "user", "multihot", 4), hobbies)])
    splits = build_tasks(table, TaskConfig(min_interactions=13, max_interactions=20,
                                           split=(1.0, 0.0, 0.0)), seed=0)
    assert len(splits.train) == 3 and len(splits.val) == 0 and len(splits.test) == 0
    batch = EpisodeCollator(splits.train, table)([2, 0])
    support = batch.support
    assert support["user.hobby"].shape == (2, 7, 4)  # user counts 17 and 15 minus 10 queries
    for b in range(2):
        user = int(batch.users[b])
        assert (support["user.hobby"][b] == torch.from_numpy(hobbies[user])).all()


# --------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize("kwargs,needle", [
    (dict(query_size=0), "query_size"),
    (dict(query_size=-3), "query_size"),
    (dict(min_interactions=10, query_size=10), "min_interactions"),
    (dict(min_interactions=5, query_size=10), "min_interactions"),
    (dict(min_interactions=20, max_interactions=19), "max_interactions"),
    (dict(split=(0.8, 0.1, 0.05)), "split"),
    (dict(split=(0.8, 0.3, -0.1)), "split"),
    (dict(split=(0.9, 0.1)), "split"),
    (dict(max_support=0), "max_support"),
    (dict(query_strategy="oldest"), "query_strategy"),
    (dict(negatives_per_positive=-1), "negatives_per_positive"),
])
def test_task_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        TaskConfig(**kwargs)


def test_task_config_accepts_edge_values():
    config = TaskConfig(min_interactions=2, max_interactions=2, query_size=1, max_support=1,
                        split=[1 / 3, 1 / 3, 1 / 3])
    assert config.split == (1 / 3, 1 / 3, 1 / 3)
    assert isinstance(config.split, tuple)


def test_repeated_pairs_and_feedback_mismatch_are_rejected():
    import numpy as np

    from metarec import DataError, InteractionTable, TaskConfig, build_tasks

    users = np.repeat(np.arange(3), 15)
    items = np.tile(np.arange(15), 3)
    items[14] = 0  # user 0 rates item 0 twice
    table = InteractionTable(users=users, items=items, labels=np.full(45, 4.0),
                             timestamps=np.arange(45), num_users=3, num_items=20)
    with pytest.raises(DataError, match="more than once"):
        build_tasks(table, TaskConfig(min_interactions=13, query_size=5))
    implicit = InteractionTable(users=users, items=np.tile(np.arange(15), 3),
                                labels=np.ones(45), timestamps=np.arange(45), num_users=3,
                                num_items=20, feedback="implicit", rating_range=None)
    with pytest.raises(DataError, match="no ratings"):
        build_tasks(implicit, TaskConfig(min_interactions=13, query_size=5, feedback="explicit"))
