"""metarec.Adapter for items (tasks per item, ``data.tasks.task_by: item``): ``adapt_item``,
``ItemSession`` and ``metarec adapt`` with an item checkpoint, from a short ``metarec fit`` of
mf's item side on the synthetic data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.cli import instantiate_module

from metarec import Adapter, ItemSession, RankedUsers, UserSession, load_checkpoint
from metarec.cli import MetarecCLI, main
from metarec.data import EpisodeCollator
from metarec.module import MetaLearner

QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.callbacks", "[]", "--trainer.enable_model_summary", "false"]
RECIPE = """\
seed_everything: 0
trainer: {max_steps: 4, accelerator: cpu, devices: 1, limit_val_batches: 0}
model:
  backbone: mf
  backbone_args: {embedding_dim: 8, item_features: true, use_item_table: %(table)s}
  algorithm: %(algorithm)s
  algorithm_args: %(algorithm_args)s
  policy: finetune
  optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.05}}
data:
  dataset: synthetic
  dataset_args: {num_users: 200, num_items: 80, seed: 0}
  tasks: {task_by: item, min_interactions: 20, max_interactions: 1000,
          query_strategy: chronological, support_size: 8, query_size: 10}
  batch_size: 16
  seed: 0
"""


def _fit(where: Path, algorithm: str = "pretrain",
         algorithm_args: str = "{inner_steps: 3, inner_lr: 0.5}", table: bool = False):
    """(checkpoint, the fit's CLI): `metarec fit` of an item-task mf, 4 steps."""
    (where / "recipe.yaml").write_text(RECIPE % {"algorithm": algorithm, "table": str(table).lower(),
                                                 "algorithm_args": algorithm_args})
    cwd = os.getcwd()
    os.chdir(where)
    try:
        cli = MetarecCLI(args=["fit", "--config", "recipe.yaml", *QUIET])
    finally:
        os.chdir(cwd)
    (ckpt,) = (where / "runs" / "checkpoints").glob("*.ckpt")
    return ckpt, cli


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("item-fit"))


def _streams(cli):
    """{item: [(user, label, timestamp)]} of the test items' support sets, and the split."""
    tasks = cli.datamodule.splits.test
    streams = {}
    for t in range(len(tasks)):
        m = int(tasks.support_mask[t].sum())
        streams[int(tasks.users[t])] = list(zip(tasks.support_items[t, :m].tolist(),
                                                tasks.support_labels[t, :m].tolist(),
                                                tasks.support_times[t, :m].tolist()))
    return streams, tasks


def _evaluation(ckpt, cli, policy=None, policy_args=None):
    """The evaluation path on every test item: (episode batch, guarded iterates, query scores)
    of a MetaLearner rebuilt from the checkpoint (MetaLearner.adapt_guarded)."""
    hp = {k: v for k, v in load_checkpoint(ckpt)["hyper_parameters"].items()
          if not k.startswith("_")}
    if policy is not None:
        hp.update(policy=policy, policy_args=policy_args)
    model = instantiate_module(MetaLearner, hp)
    model.load_state_dict(load_checkpoint(ckpt)["state_dict"])
    model.eval()
    tasks = cli.datamodule.splits.test
    batch = EpisodeCollator(tasks, cli.datamodule.table)(list(range(len(tasks))))
    with torch.no_grad():
        iterates, _, scores = model.adapt_guarded(batch)
    return batch, iterates, scores


# -- the support is the collator's; the adaptation is evaluation's ---------------------------
def test_the_item_support_is_built_as_the_collator_builds_item_tasks(fitted):
    ckpt, cli = fitted
    adapter = Adapter.from_checkpoint(ckpt)
    assert adapter.task_by == "item" and adapter.other == "user"
    streams, tasks = _streams(cli)
    batch = EpisodeCollator(tasks, cli.datamodule.table)(list(range(len(tasks))))
    items = list(streams)
    rows = [adapter._task_row(i, None) for i in items]
    parsed = [adapter._events(streams[i], "interactions") for i in items]
    support = adapter._support(rows, parsed)
    assert set(support) == set(batch.support)
    width = support["mask"].shape[1]
    mask = batch.support["mask"][:, :width]
    assert torch.equal(support["mask"], mask)
    for key, value in batch.support.items():
        mine, theirs = support[key], value[:, :width]
        assert mine.shape == theirs.shape, key
        assert torch.equal(mine[mask], theirs[mask]), key  # padding slots may differ
    # The roles: the slots' users, the task item (and its features) in every slot.
    assert torch.equal(support["item_id"][mask],
                       tasks.users[:, None].expand_as(mask)[mask])
    users = support["user_id"][mask]
    for key, table in adapter.user_features.items():
        assert torch.equal(support[key][mask], table[users])


@pytest.mark.parametrize("policy,policy_args,group_size", [
    (None, None, None),  # the checkpoint's own: finetune with pretrain's inner loop
    (None, None, 4),  # items sorted by support size, adapted 4 at a time
    ("proximal", {"alpha": 0.3, "steps": 4}, None),
    ("online", {"events_per_update": 3, "buffer_size": 5, "steps_per_update": 2}, 4),
])
def test_adapted_item_parameters_equal_the_evaluation_path(fitted, policy, policy_args,
                                                           group_size):
    """The key test: for every test item the adapter's fast parameters (and scores of the
    item's query users) are those evaluation computes on the same support."""
    ckpt, cli = fitted
    batch, iterates, scores = _evaluation(ckpt, cli, policy, policy_args)
    adapter = Adapter.from_checkpoint(ckpt, policy=policy, policy_args=policy_args,
                                      group_size=group_size)
    streams, tasks = _streams(cli)
    assert len(streams) >= 6
    together = adapter.adapt_item(streams)  # every test item at once (vmapped, in groups)
    mask = batch.query["mask"]
    moved = 0.0
    for t, item in enumerate(tasks.users.tolist()):
        alone = adapter.adapt_item(streams[item], item=item)
        for session in (together[item], alone):
            assert isinstance(session, ItemSession) and session.item == item
            assert set(session.fast) == set(iterates[-1]) == {"item_default",
                                                              "item_default_bias"}
            for name, value in session.fast.items():
                torch.testing.assert_close(value, iterates[-1][name][t], rtol=0, atol=2e-5)
            users = batch.query["user_id"][t][mask[t]]
            torch.testing.assert_close(session.scores(users), scores[-1][t][mask[t]],
                                       rtol=0, atol=2e-5)
        moved = max(moved, float((iterates[-1]["item_default"][t]
                                  - iterates[0]["item_default"][t]).abs().max()))
    assert moved > 1e-2  # the comparison is sharp: adaptation moved the parameters


def test_a_task_conditioned_start_runs_as_in_evaluation(tmp_path):
    """MetaEmb's generator (the algorithm's task_start) makes each new item's start from its
    features; the adapter calls it through the policy, as evaluation does."""
    pytest.importorskip("metarec_plugins.algorithms.metaemb")  # MetaEmb ships separately
    ckpt, cli = _fit(tmp_path, "metarec_plugins.algorithms.metaemb.MetaEmb", "{inner_steps: 1, inner_lr: 0.1, embedding_dim: 4, "
                                         "hidden: [8]}", table=True)
    batch, iterates, scores = _evaluation(ckpt, cli)
    adapter = Adapter.from_checkpoint(ckpt)
    streams, tasks = _streams(cli)
    starts = []
    for t, item in enumerate(tasks.users.tolist()):
        session = adapter.adapt_item(streams[item], item=item)
        for name, value in session.fast.items():
            torch.testing.assert_close(value, iterates[-1][name][t], rtol=0, atol=2e-5)
        cold = adapter.adapt_item([], item=item)  # the cold stage: the generated start
        for name, value in cold.fast.items():
            torch.testing.assert_close(value, iterates[0][name][t], rtol=0, atol=2e-5)
        starts.append(cold.fast["item_default"])
    # The start depends on the item (the generator learned in 4 steps).
    assert float((starts[0] - starts[1]).abs().max()) > 1e-4


# -- cold items, new items, update, recommend ------------------------------------------------
def test_a_cold_item_is_scored_from_its_features(fitted):
    ckpt, cli = fitted
    batch, iterates, scores = _evaluation(ckpt, cli)
    adapter = Adapter.from_checkpoint(ckpt)
    _, tasks = _streams(cli)
    mask = batch.query["mask"]
    for t, item in enumerate(tasks.users.tolist()[:3]):
        cold = adapter.adapt_item([], item=item)
        assert len(cold.seen) == 0
        for name, value in cold.fast.items():  # step 0: the meta-learned start
            torch.testing.assert_close(value, adapter.start[name], rtol=0, atol=0)
        users = batch.query["user_id"][t][mask[t]]
        torch.testing.assert_close(cold.scores(users), scores[0][t][mask[t]], rtol=0, atol=1e-6)
        # A new item (no row in the model) from its features alone scores the same.
        features = {key: table[item] for key, table in adapter.item_features.items()}
        new = adapter.adapt_item([], item_features={k[len("item."):]: v.tolist()
                                                    for k, v in features.items()})
        assert new.item is None and "new item" in repr(new)
        torch.testing.assert_close(new.scores(users), cold.scores(users), rtol=0, atol=1e-6)
        assert len(new.recommend(5).users) == 5
    # Different features: a different cold score.
    a, b = tasks.users.tolist()[:2]
    assert not torch.allclose(adapter.adapt_item([], item=a).scores(),
                              adapter.adapt_item([], item=b).scores())


def test_update_readapts_on_every_event_so_far(fitted):
    ckpt, cli = fitted
    adapter = Adapter.from_checkpoint(ckpt)
    streams, _ = _streams(cli)
    item, events = next(iter(streams.items()))
    session = adapter.adapt_item(events[:3], item=item)
    assert session.update(events[3:]) is session
    whole = adapter.adapt_item(events, item=item)
    for name, value in session.fast.items():
        torch.testing.assert_close(value, whole.fast[name], rtol=0, atol=1e-6)
    assert session.seen.tolist() == sorted({u for u, _, _ in events})
    # From cold, one event at a time, without timestamps: ends where adapting on all ends.
    cold = adapter.adapt_item([], item=item)
    for user, label, _ in events:
        cold.update([(user, label)])
    for name, value in cold.fast.items():
        torch.testing.assert_close(value, whole.fast[name], rtol=0, atol=1e-5)


def test_recommend_ranks_users_for_the_item(fitted):
    ckpt, cli = fitted
    adapter = Adapter.from_checkpoint(ckpt)
    streams, _ = _streams(cli)
    item, events = next(iter(streams.items()))
    session = adapter.adapt_item(events, item=item)
    rec = session.recommend(10)
    assert isinstance(rec, RankedUsers) and rec.ids is rec.users and len(rec.users) == 10
    seen = {u for u, _, _ in events}
    assert not set(rec.users.tolist()) & seen
    every = session.scores()
    assert every.shape == (adapter.num_users,)
    torch.testing.assert_close(rec.scores, every[rec.users])
    unseen = torch.tensor([u for u in range(adapter.num_users) if u not in seen])
    best = unseen[torch.sort(every[unseen], descending=True, stable=True).indices[:10]]
    assert rec.users.tolist() == best.tolist()
    # Candidates: an ad's audience among given users, seen users kept when asked.
    candidates = [events[0][0], 5, 17, 42]
    some = session.recommend(3, candidates=candidates, exclude_seen=False)
    order = torch.sort(every[torch.tensor(candidates)], descending=True, stable=True).indices
    assert some.users.tolist() == [candidates[i] for i in order[:3].tolist()]
    assert events[0][0] not in session.recommend(4, candidates=candidates).users.tolist()


def test_the_sides_are_not_mixed_up(fitted):
    from conftest import synthetic_setup

    ckpt, cli = fitted
    adapter = Adapter.from_checkpoint(ckpt)
    with pytest.raises(TypeError, match=r"adapts items .* use adapter.adapt_item"):
        adapter.adapt([(1, 4.0)], user=0)
    with pytest.raises(ValueError, match=r"event 1: user 200 is not a contiguous user id"):
        adapter.adapt_item([(1, 4.0), (200, 3.0)], item=0)
    with pytest.raises(ValueError, match="not a contiguous item id"):
        adapter.adapt_item([(1, 4.0)], item=80)
    with pytest.raises(ValueError, match=r"item feature 'item\.\w+' is needed"):
        adapter.adapt_item([(1, 4.0)], item_features={"category": 1})
    with pytest.raises(ValueError, match="unknown item feature"):
        adapter.adapt_item([(1, 4.0)], item=0, item_features={"segment": 1})
    with pytest.raises(ValueError, match=r"candidates\[1\]: user 200"):
        adapter.adapt_item([(1, 4.0)], item=0).recommend(3, candidates=[2, 200])
    with pytest.raises(TypeError, match="takes no item"):
        adapter.adapt_item({0: [(1, 4.0)]}, item=0)
    with pytest.raises(ValueError, match="history_length"):
        Adapter(adapter.model, item_features=adapter.item_features,
                user_features=adapter.user_features, history_length=4)
    # A model of tasks per user: adapt_item names adapt.
    table, _ = synthetic_setup()
    users = MetaLearner(backbone="mf", algorithm="maml", policy="finetune", schema=table.schema)
    features = lambda fs: {f.spec.key: torch.from_numpy(f.values) for f in fs}  # noqa: E731
    user_side = Adapter(users, item_features=features(table.item_features),
                        user_features=features(table.user_features))
    assert user_side.task_by == "user"
    with pytest.raises(TypeError, match=r"adapts users .* use adapter.adapt\(events, user"):
        user_side.adapt_item([(1, 4.0)], item=0)
    assert isinstance(user_side.adapt([(1, 4.0)], user=0), UserSession)


def test_a_backbone_that_embeds_item_ids_needs_the_item(fitted):
    _, cli = fitted
    model = MetaLearner(backbone="mf", backbone_args={"use_item_table": True},
                        algorithm="pretrain", policy="finetune", schema=cli.datamodule.schema)
    table = cli.datamodule.table
    features = lambda fs: {f.spec.key: torch.from_numpy(f.values) for f in fs}  # noqa: E731
    adapter = Adapter(model, item_features=features(table.item_features),
                      user_features=features(table.user_features))
    row = {k[len("item."):]: v[3].tolist() for k, v in adapter.item_features.items()}
    with pytest.raises(ValueError, match=r"embeds item ids: adapt the item with a contiguous "
                                         r"item id \(item=\.\.\.\)"):
        adapter.adapt_item([(1, 4.0)], item_features=row)
    assert len(adapter.adapt_item([(1, 4.0)], item=3).recommend(2).users) == 2
    # Without user feature tables the support slots cannot be filled.
    with pytest.raises(ValueError, match="needs user feature tables"):
        Adapter(model, item_features=features(table.item_features))


# -- metarec adapt ----------------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_metarec_adapt_prints_k_users_per_item(fitted, tmp_path, capsys):
    ckpt, cli = fitted
    streams, _ = _streams(cli)
    chosen = dict(list(streams.items())[:3])
    lines = ["item,user,label,timestamp"]  # columns by name: any order
    for item, events in chosen.items():
        lines += [f"{item},{u},{y:g},{s}" for u, y, s in reversed(events)]  # any row order
    csv = _write(tmp_path / "events.csv", "\n".join(lines) + "\n")
    main(["adapt", "--ckpt_path", str(ckpt), "--interactions", str(csv), "--k", "5"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["item"] for o in out] == list(chosen)
    adapter = Adapter.from_checkpoint(ckpt)
    for o in out:
        assert set(o) == {"item", "users", "scores"}
        assert len(o["users"]) == len(o["scores"]) == 5
        assert not set(o["users"]) & {u for u, _, _ in chosen[o["item"]]}
        expected = adapter.adapt_item(chosen[o["item"]], item=o["item"]).recommend(5)
        assert o["users"] == expected.users.tolist()
        np.testing.assert_allclose(o["scores"], expected.scores.numpy(), rtol=0, atol=1e-5)


def test_metarec_adapt_with_raw_ids(fitted, tmp_path, capsys):
    ckpt, _ = fitted
    raw = torch.load(ckpt, weights_only=False)
    raw["metarec_data"]["user_keys"] = [f"u{i}" for i in range(200)]
    raw["metarec_data"]["item_keys"] = [1000 + 3 * i for i in range(80)]
    torch.save(raw, tmp_path / "raw.ckpt")
    csv = _write(tmp_path / "raw.csv", "user,item,label\nu7,1003,5\nu9,1003,1\nu2,1000,3\n")
    main(["adapt", "--ckpt_path", str(tmp_path / "raw.ckpt"), "--interactions", str(csv),
          "--k", "4"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["item"] for o in out] == [1003, 1000]
    adapter = Adapter.from_checkpoint(tmp_path / "raw.ckpt")
    expected = adapter.adapt_item([(7, 5.0), (9, 1.0)], item=1).recommend(4)
    assert out[0]["users"] == [f"u{i}" for i in expected.users.tolist()]
    assert not {"u7", "u9"} & set(out[0]["users"])


@pytest.mark.parametrize("text,message", [
    ("item,user\n3,1\n", "missing column(s) ['label']"),
    ("user,item,label\n3,1,4\n200,1,2\n", "bad.csv:3, field 'user': expected an integer in [0, 199]"),
    ("user,item,label\n3,1,4\n3,80,2\n", "bad.csv:3, field 'item'"),
    ("user,item,label\n3,1,4\n4,1,x\n", "bad.csv:3, field 'label': expected a finite number"),
    ("user,item,label\n3,1,4\n4,1,9\n", "bad.csv:3, field 'label'"),  # outside 1-5 stars
    ("user,item,label,timestamp\n3,1,4,yesterday\n", "bad.csv:2, field 'timestamp'"),
])
def test_metarec_adapt_bad_input_names_file_row_and_field(fitted, tmp_path, capsys, text, message):
    ckpt, _ = fitted
    bad = _write(tmp_path / "bad.csv", text)
    with pytest.raises(SystemExit) as exit_:
        main(["adapt", "--ckpt_path", str(ckpt), "--interactions", str(bad)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("metarec adapt: error:") and message in err, err
    assert len(err.strip().splitlines()) <= 2


def test_metarec_predict_writes_k_users_per_test_item(fitted, tmp_path, capsys):
    """``metarec predict`` on an item checkpoint: one line per test item, its top users (not
    its support users), the same as ``adapt_item(...).recommend``."""
    ckpt, cli = fitted
    out = tmp_path / "top.jsonl"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        main(["predict", "--ckpt_path", str(ckpt), "--predictions.path", str(out),
              "--predictions.k", "4", *QUIET])
    finally:
        os.chdir(cwd)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    streams, tasks = _streams(cli)
    assert sorted(x["item"] for x in lines) == sorted(streams)
    adapter = Adapter.from_checkpoint(ckpt)
    for x in lines[:3]:
        assert set(x) == {"item", "users", "scores"} and len(x["users"]) == 4
        assert not set(x["users"]) & {u for u, _, _ in streams[x["item"]]}
        expected = adapter.adapt_item(streams[x["item"]], item=x["item"]).recommend(4)
        assert x["users"] == expected.users.tolist()
    assert f"wrote the top-4 of {len(lines)} items" in capsys.readouterr().out
