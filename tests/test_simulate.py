"""metarec simulate: no leakage (a spy session), an end-to-end run, config errors."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from metarec.cli import main
from metarec.simulate import load_config, replay_user, simulate

QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")


class _SpySession:
    """Records every event it is given; scores are arbitrary but deterministic."""

    def __init__(self, log, events):
        self.log, self.revealed = log, [tuple(e) for e in events]

    def recommend(self, k, candidates, epsilon=0.0, generator=None):
        self.log.append(("recommend", list(self.revealed)))
        shown = torch.as_tensor(candidates)
        seen = {e[0] for e in self.revealed}
        shown = torch.tensor([int(i) for i in shown if int(i) not in seen][:k])
        return type("R", (), {"items": shown})()

    def scores(self, items):
        self.log.append(("score", [int(i) for i in items], list(self.revealed)))
        return torch.full((len(items),), 3.0)

    def update(self, events):
        self.log.append(("update", [tuple(e) for e in events]))
        self.revealed.extend(tuple(e) for e in events)
        return self


class _SpyAdapter:
    def __init__(self):
        self.log = []

    def adapt(self, events, user=None, seed=None):
        self.log.append(("adapt", [tuple(e) for e in events]))
        return _SpySession(self.log, events)


def test_no_interaction_is_revealed_before_its_turn():
    events = np.array([[10 + i, float(1 + i % 5), 100 - i] for i in range(8)], dtype=np.float64)
    events = events[np.argsort(events[:, 2], kind="stable")]  # oldest first, as user_streams
    adapter = _SpyAdapter()
    out = replay_user(adapter, 0, events, np.arange(30), k=3, warmup=3, turns=None,
                      relevant=4.0, explicit=True, seed=0)
    assert [t for t, *_ in out] == list(range(3, 8))
    log = adapter.log
    assert log[0] == ("adapt", [(int(e[0]), e[1], int(e[2])) for e in events[:3]])
    turn = 3
    revealed = {int(e[0]) for e in events[:3]}
    for entry in log[1:]:
        if entry[0] == "recommend":
            # the session has seen exactly the first `turn` events, never the next one
            assert [e[0] for e in entry[1]] == [int(e[0]) for e in events[:turn]]
        elif entry[0] == "score":
            (item,) = entry[1]
            assert item == int(events[turn, 0]) and item not in revealed
            assert all(e[0] != item for e in entry[2])
        else:
            (event,) = entry[1]
            assert event == (int(events[turn, 0]), events[turn, 1], int(events[turn, 2]))
            revealed.add(event[0])
            turn += 1
    assert turn == len(events)
    assert [e[0] for e in log].count("update") == 5
    # hr/ndcg are against not-yet-revealed relevant items (label >= 4): events 3, 4, 8, 9
    # have rating 4 or 5; the MAE is |3 - rating of the next item|
    assert out[0][3] == abs(3.0 - events[3, 1])


def test_bad_configs_are_named(tmp_path):
    base = {"checkpoint": "x.ckpt", "policies": [{"name": "frozen"}]}
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        load_config({**base, "policies": [{"name": "frozen"}, {"name": "nope"}]})
    with pytest.raises(ValueError, match="unknown key"):
        load_config({**base, "kk": 3})
    with pytest.raises(ValueError, match="exactly one of checkpoint or fit_recipe"):
        load_config({"policies": ["frozen"]})
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        load_config({**base, "k": 0})
    with pytest.raises(ValueError, match="labels must be unique"):
        load_config({**base, "policies": ["frozen", "frozen"]})
    config = load_config(base)
    assert config["k"] == 10 and config["warmup"] == 3 and config["policies"][0]["args"] == {}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from metarec.checkpoint import train_recipe

    tmp = tmp_path_factory.mktemp("fit")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        return train_recipe(QUICKSTART, tmp / "model.ckpt",
                            ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"])
    finally:
        os.chdir(cwd)


def test_simulate_end_to_end_writes_curves(checkpoint, tmp_path, capsys, monkeypatch):
    data = yaml.safe_load(open(QUICKSTART))["data"]
    config = {"checkpoint": str(checkpoint), "data": data, "users": 4, "k": 5, "negatives": 20,
              "warmup": 3, "turns": 6, "output": str(tmp_path / "sim"),
              "policies": [{"name": "frozen"}, {"name": "online", "args": {"buffer_size": 8}}]}
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("WANDB_MODE", "offline")
    config["wandb"] = {"project": "metarec-test"}
    path.write_text(yaml.safe_dump(config))
    main(["simulate", "--config", str(path)])
    assert list((tmp_path / "sim" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "frozen" in capsys.readouterr().out
    with open(tmp_path / "sim" / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["policy", "observed", "users", "hr", "ndcg", "mae",
                             "cum_hr", "cum_ndcg", "cum_mae"]
    assert {r["policy"] for r in rows} == {"frozen", "online"}
    for policy in ("frozen", "online"):
        mine = [r for r in rows if r["policy"] == policy]
        assert [int(r["observed"]) for r in mine] == list(range(3, 9))
        assert all(int(r["users"]) == 4 for r in mine)
        for r in mine:
            for col in ("mae", "cum_mae", "cum_hr", "cum_ndcg"):
                assert math.isfinite(float(r[col]))
            assert 0 <= float(r["cum_hr"]) <= 1 and 0 <= float(r["cum_ndcg"]) <= 1
    with open(tmp_path / "sim" / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [r["policy"] for r in summary] == ["frozen", "online"]
    assert all(int(r["user_turns"]) == 24 for r in summary)
    # frozen never changes the scores, online does: the two MAE curves differ
    frozen = [float(r["mae"]) for r in rows if r["policy"] == "frozen"]
    online = [float(r["mae"]) for r in rows if r["policy"] == "online"]
    assert frozen != online


def test_fit_recipe_mode_trains_then_simulates(tmp_path, monkeypatch):
    """fit_recipe: a checkpoint is trained first; data: defaults to the recipe's."""
    monkeypatch.chdir(tmp_path)
    result = simulate({"fit_recipe": QUICKSTART, "users": 2, "k": 3, "negatives": 5,
                       "turns": 2, "output": "out",
                       "fit_overrides": ["--trainer.max_steps", "2",
                                         "--trainer.limit_val_batches", "0"],
                       "policies": [{"name": "finetune", "args": {"steps": 2}},
                                    {"name": "proximal", "args": {"steps": 2, "alpha": 0.5}}]})
    assert (tmp_path / "out" / "model.ckpt").exists()
    assert [r["policy"] for r in result["summary"]] == ["finetune", "proximal"]
    assert all(r["user_turns"] == 4 and math.isfinite(r["mae"]) for r in result["summary"])
    assert (tmp_path / "out" / "curves.csv").exists()


def test_the_movielens_recipe_is_a_valid_config():
    config = load_config(REPO / "recipes" / "movielens-100k" / "simulate-online.yaml")
    assert [p["label"] for p in config["policies"]] == ["frozen", "finetune", "proximal", "online",
                                                        "online-explore"]
    assert config["policies"][-1]["epsilon"] == 0.1
    assert (REPO / config["fit_recipe"]).exists()


def test_epsilon_is_validated_per_policy():
    with pytest.raises(ValueError, match="epsilon must be in"):
        load_config({"checkpoint": "x.ckpt", "policies": [{"name": "online", "epsilon": 2}]})


def test_simulate_replays_the_checkpoints_own_test_users(checkpoint, tmp_path):
    """Without data:, the checkpoint's split (its data contract); a data: whose test users the
    model trained on is an error naming how many."""
    from metarec.checkpoint import load_checkpoint
    from metarec.simulate import _datamodule

    saved = load_checkpoint(checkpoint)["metarec_split"]["users"]["test"]
    assert torch.equal(_datamodule({}, checkpoint).splits.test.users, saved)
    data = {**yaml.safe_load(open(QUICKSTART))["data"], "seed": 5}
    with pytest.raises(ValueError, match=r"\d+ of the \d+ test users of data: were meta-training"):
        _datamodule({"data": data}, checkpoint)
