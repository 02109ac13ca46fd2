"""MeLU's four partitions (data.scenario): who and what each split holds."""

from __future__ import annotations

import numpy as np
import pytest

from metarec import ConfigError, InteractionTable, TaskConfig
from metarec.data import Feature
from metarec.data.tasks import SCENARIOS, ScenarioConfig, build_scenario_tasks, scenario_partition
from metarec.schema import FeatureSpec

YEARS = ("1990", "1995", "1997", "1998", "unknown")


@pytest.fixture(scope="module")
def table() -> InteractionTable:
    rng = np.random.default_rng(0)
    n_users, n_items = 120, 80
    users, items = [], []
    for u in range(n_users):
        k = int(rng.integers(20, 45))
        users += [u] * k
        items += rng.choice(n_items, size=k, replace=False).tolist()
    users, items = np.array(users), np.array(items)
    year = rng.integers(0, len(YEARS), n_items)
    return InteractionTable(
        users=users, items=items, labels=rng.integers(1, 6, len(users)),
        timestamps=rng.integers(0, 10_000, len(users)), num_users=n_users, num_items=n_items,
        item_features=[Feature(FeatureSpec("year", "item", "categorical", len(YEARS)), year,
                               vocabulary=YEARS)])


CONFIG = TaskConfig(min_interactions=13, max_interactions=100, query_size=5)


def _pairs(tasks, side):
    m = getattr(tasks, f"{side}_mask")
    out = set()
    for t in range(len(tasks)):
        u = int(tasks.users[t])
        out |= {(u, i) for i in getattr(tasks, f"{side}_items")[t][m[t]].tolist()}
    return out


@pytest.mark.parametrize("name", SCENARIOS)
def test_partitions_are_disjoint_and_as_defined(table, name):
    scenario = ScenarioConfig(name=name)
    splits = build_scenario_tasks(table, CONFIG, scenario, seed=4)
    eligible, new_user, new_item = scenario_partition(table, CONFIG, scenario, seed=4)
    # Items: year >= 1997 new ("unknown" existing).
    year = table.item_features[0].values
    assert np.array_equal(new_item, np.isin(year, [2, 3]))
    # Users: 20% of the eligible ones new.
    assert new_user.sum() == round(0.2 * eligible.sum()) and not (new_user & ~eligible).any()
    existing_user = eligible & ~new_user
    train_pairs = _pairs(splits.train, "support") | _pairs(splits.train, "query")
    # Meta-training: existing users x existing items only, whatever the scenario.
    assert all(existing_user[u] and not new_item[i] for u, i in train_pairs)
    cold_users = name in ("new_user", "new_user_new_item")
    cold_items = name in ("new_item", "new_user_new_item")
    val_users = set(splits.val.users.tolist())
    test_users = set(splits.test.users.tolist())
    assert val_users and test_users and not (val_users & test_users)
    if not cold_users:  # existing users are meta-training users
        assert val_users | test_users <= set(splits.train.users.tolist())
    for tasks in (splits.val, splits.test):
        for side in ("support", "query"):
            for u, i in _pairs(tasks, side):
                assert (new_user[u] if cold_users else existing_user[u])
                assert bool(new_item[i]) == cold_items
        # What is scored was never trained on.
        assert not (_pairs(tasks, "query") & train_pairs)
    if name == "warm":  # the support of a warm task is its user's training pool
        for t in range(len(splits.test)):
            u = int(splits.test.users[t])
            pool = {(v, i) for v, i in train_pairs if v == u}
            assert _pairs(type(splits.test)(*[getattr(splits.test, f)[t:t + 1] for f in (
                "users", "support_items", "support_labels", "support_times", "support_mask",
                "query_items", "query_labels", "query_times", "query_mask")]), "support") == pool


def test_same_training_tasks_in_every_scenario(table):
    ref = build_scenario_tasks(table, CONFIG, ScenarioConfig(name="warm"), seed=1).train
    for name in SCENARIOS[1:]:
        other = build_scenario_tasks(table, CONFIG, ScenarioConfig(name=name), seed=1).train
        assert ref.users.tolist() == other.users.tolist()
        assert ref.query_items.tolist() == other.query_items.tolist()
        assert ref.support_items.tolist() == other.support_items.tolist()


def test_seeded(table):
    a = build_scenario_tasks(table, CONFIG, ScenarioConfig(name="new_user"), seed=2)
    b = build_scenario_tasks(table, CONFIG, ScenarioConfig(name="new_user"), seed=2)
    c = build_scenario_tasks(table, CONFIG, ScenarioConfig(name="new_user"), seed=3)
    assert a.test.users.tolist() == b.test.users.tolist() != c.test.users.tolist()


def test_errors(table):
    with pytest.raises(ValueError, match="name"):
        ScenarioConfig(name="cold")
    with pytest.raises(ConfigError, match="item_feature"):
        build_scenario_tasks(table, CONFIG, ScenarioConfig(item_feature="genre"))
    with pytest.raises(ConfigError, match="task_by"):
        build_scenario_tasks(table, TaskConfig(task_by="item"), ScenarioConfig())


def test_the_datamodule_switches_scenario_on_the_same_data(table):
    """``use_scenario`` rebuilds the tasks of another scenario from the same table and seed:
    the same training users, that scenario's test users."""
    from metarec.datamodule import EpisodeDataModule

    dm = EpisodeDataModule(tasks=CONFIG, scenario=ScenarioConfig(name="warm"), seed=1)
    dm._table = table  # the module's own table, as if loaded from its dataset
    warm = dm.splits
    dm.use_scenario("new_user")
    new_user = dm.splits
    expected = build_scenario_tasks(table, CONFIG, ScenarioConfig(name="new_user"), seed=1)
    assert new_user is not warm and dm.scenario.name == "new_user"
    assert new_user.train.users.tolist() == warm.train.users.tolist()
    assert new_user.test.users.tolist() == expected.test.users.tolist()
    with pytest.raises(ValueError, match="name"):
        dm.use_scenario("cold")
    with pytest.raises(ConfigError, match="scenario"):
        EpisodeDataModule().use_scenario("warm")
