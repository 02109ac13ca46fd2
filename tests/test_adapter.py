"""metarec.Adapter and `metarec adapt`, from a checkpoint made by a short `metarec fit`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.cli import instantiate_module

from conftest import REPO
from metarec import Adapter, UserSession, load_checkpoint
from metarec.cli import MetarecCLI, main
from metarec.data import EpisodeCollator
from metarec.module import MetaLearner

QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.callbacks", "[]", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(checkpoint path, the fit's CLI) from `metarec fit` on the quick-start recipe, 3 steps."""
    cwd, tmp = os.getcwd(), tmp_path_factory.mktemp("fit")
    os.chdir(tmp)
    try:
        # metrics: a typed (dataclass) argument, saved as a dict in the checkpoint.
        cli = MetarecCLI(args=["fit", "--config", QUICKSTART, *QUIET, "--trainer.max_steps", "3",
                               "--trainer.limit_val_batches", "0",
                               "--model.metrics", "{top_k: [5], relevance: threshold}"])
    finally:
        os.chdir(cwd)
    (ckpt,) = (tmp / "runs" / "checkpoints").glob("*.ckpt")
    return ckpt, cli


def _test_streams(cli, n=None):
    """{user: [(item, label, timestamp)]} of the test split's support sets, and the split."""
    tasks = cli.datamodule.splits.test
    streams = {}
    for t in range(len(tasks) if n is None else n):
        m = int(tasks.support_mask[t].sum())
        streams[int(tasks.users[t])] = list(zip(tasks.support_items[t, :m].tolist(),
                                                tasks.support_labels[t, :m].tolist(),
                                                tasks.support_times[t, :m].tolist()))
    return streams, tasks


def _evaluation_scores(ckpt, cli, policy=None, policy_args=None):
    """Adapted query scores of every test task by the evaluation path: a MetaLearner from the
    checkpoint, MetaLearner.adapt and predict_tasks on the test split's episode batch."""
    hp = {k: v for k, v in load_checkpoint(ckpt)["hyper_parameters"].items()
          if not k.startswith("_")}
    if policy is not None:
        hp.update(policy=policy, policy_args=policy_args)
    model = instantiate_module(MetaLearner, hp)  # as Lightning reloads a CLI checkpoint
    model.load_state_dict(load_checkpoint(ckpt)["state_dict"])
    model.eval()
    tasks = cli.datamodule.splits.test
    batch = EpisodeCollator(tasks, cli.datamodule.table)(list(range(len(tasks))))
    slow = {k: v.detach() for k, v in model.functional.split()[1].items()}
    with torch.no_grad():
        fast = model.adapt(batch)
        adapted = model.functional.predict_tasks(fast[-1], slow, batch.query)
        start = model.functional.predict_tasks(fast[0], slow, batch.query)
    return batch, adapted, start


# -- the checkpoint is enough -----------------------------------------------------------------
def test_the_checkpoint_carries_the_feature_tables(fitted):
    ckpt, cli = fitted
    data = load_checkpoint(ckpt)["metarec_data"]
    table = cli.datamodule.table
    for owner, feats in (("user", table.user_features), ("item", table.item_features)):
        assert set(data[f"{owner}_features"]) == {f.spec.key for f in feats}
        for f in feats:
            assert np.array_equal(data[f"{owner}_features"][f.spec.key].numpy(), f.values)
    assert data["user_keys"] is None and data["item_keys"] is None  # synthetic: contiguous ids
    adapter = Adapter.from_checkpoint(ckpt)  # typed hyperparameters restored
    assert adapter.model.metrics_config.top_k == [5]


@pytest.mark.parametrize("policy,policy_args,group_size", [
    (None, None, None),  # the checkpoint's own: finetune with the algorithm's inner loop
    (None, None, 16),  # users sorted by support size, adapted 16 at a time
    ("proximal", {"alpha": 0.3, "steps": 4}, None),
    ("online", {"events_per_update": 3, "buffer_size": 8, "steps_per_update": 2}, 16),
])
def test_adapted_predictions_equal_the_evaluation_path(fitted, policy, policy_args, group_size):
    ckpt, cli = fitted
    batch, expected, start = _evaluation_scores(ckpt, cli, policy, policy_args)
    adapter = Adapter.from_checkpoint(ckpt, policy=policy, policy_args=policy_args,
                                      group_size=group_size)
    streams, tasks = _test_streams(cli)
    assert len(streams) > 64
    together = adapter.adapt(streams)  # every test user at once (vmapped, in groups)
    mask = batch.query["mask"]
    checked = 0
    for t, user in enumerate(tasks.users.tolist()):
        items = batch.query["item_id"][t][mask[t]]
        want = expected[t][mask[t]]
        torch.testing.assert_close(together[user].scores(items), want, rtol=0, atol=2e-5)
        if t < 4:  # one user at a time
            alone = adapter.adapt(streams[user], user=user)
            torch.testing.assert_close(alone.scores(items), want, rtol=0, atol=2e-5)
            checked += 1
    assert checked == 4
    # The comparison is sharp: adaptation moved the scores far more than the tolerance.
    assert float((expected - start)[mask].abs().max()) > 1e-2


def test_recommend_ranks_unseen_candidates_by_score(fitted):
    ckpt, cli = fitted
    adapter = Adapter.from_checkpoint(ckpt)
    streams, _ = _test_streams(cli, n=2)
    user, events = next(iter(streams.items()))
    session = adapter.adapt(events, user=user)
    assert isinstance(session, UserSession)
    seen = {e[0] for e in events}
    rec = session.recommend(7)
    scores = session.scores()
    unseen = torch.tensor([i for i in range(adapter.num_items) if i not in seen])
    best = unseen[torch.sort(scores[unseen], descending=True, stable=True).indices[:7]]
    assert torch.equal(rec.items, best)
    assert torch.equal(rec.scores, scores[best])
    everything = session.recommend(adapter.num_items, exclude_seen=False)
    assert len(everything.items) == adapter.num_items
    some = [3, 1, 4, 15, 9, 26]
    within = session.recommend(3, candidates=some, exclude_seen=False)
    assert set(within.items.tolist()) <= set(some) and len(within.items) == 3
    assert torch.equal(within.scores, torch.sort(scores[some], descending=True).values[:3])
    assert len(session.recommend(50, candidates=sorted(seen)[:5])) == 2  # all seen: none left
    assert len(session.recommend(50, candidates=sorted(seen)[:5]).items) == 0


def test_new_user_by_features_equals_the_stored_row(fitted):
    ckpt, cli = fitted
    adapter = Adapter.from_checkpoint(ckpt)
    streams, _ = _test_streams(cli, n=1)
    user, events = next(iter(streams.items()))
    table = cli.datamodule.table
    features = {f.spec.name: int(f.values[user]) for f in table.user_features}
    known = adapter.adapt(events, user=user)
    new = adapter.adapt(events, user_features=features)  # MeLU without ids: features suffice
    assert torch.equal(known.scores(), new.scores())
    other = {**features, "segment": (features["segment"] + 1) % 4}
    assert not torch.equal(adapter.adapt(events, user_features=other).scores(), new.scores())


@pytest.mark.parametrize("policy", ["finetune", "online"])
def test_meta_learned_weights_are_bit_identical_after_many_calls(fitted, policy):
    ckpt, cli = fitted
    adapter = Adapter.from_checkpoint(ckpt, policy=policy)
    saved = load_checkpoint(ckpt)["state_dict"]
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    streams, _ = _test_streams(cli, n=6)
    sessions = adapter.adapt(streams)
    for round_ in range(5):
        for user, session in sessions.items():
            session.update([(round_ * 7 + user % 50, 4.0, 98), (round_ + 100, 1.0, 99)])
            session.recommend(5)
        adapter.adapt(streams[user], user=user).update([(1, 2.0)])
    after = adapter.model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
        assert torch.equal(after[k], saved[k]), k
    start = {k: v for k, v in adapter.start.items()}
    assert all(torch.equal(start[k], saved[f"backbone.{k}"]) for k in start)


def test_finetune_update_readapts_from_the_start_on_every_event_so_far(fitted):
    """A non-incremental policy treats new feedback as a larger support set: after update, the
    session equals a fresh adaptation on all the events (what evaluation would measure)."""
    ckpt, cli = fitted
    adapter = Adapter.from_checkpoint(ckpt)
    streams, _ = _test_streams(cli, n=1)
    user, events = next(iter(streams.items()))
    session = adapter.adapt(events[:-3], user=user)
    before = session.fast
    for event in events[-3:]:  # one event at a time, as a stream
        session.update([event])
    fresh = adapter.adapt(events, user=user)
    for k, v in session.fast.items():
        torch.testing.assert_close(v, fresh.fast[k], rtol=0, atol=1e-6)
        assert not torch.equal(v, before[k])


def test_bad_python_input_is_rejected_clearly(fitted):
    ckpt, _ = fitted
    adapter = Adapter.from_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"event 1: item 300 is not a contiguous item id"):
        adapter.adapt([(1, 4.0), (300, 3.0)], user=0)
    with pytest.raises(ValueError, match="event 1 is"):
        adapter.adapt([(1, 4.0), (2,)], user=0)
    with pytest.raises(ValueError, match="label nan is not finite"):
        adapter.adapt([(1, float("nan"))], user=0)
    with pytest.raises(ValueError, match="not a contiguous user id"):
        adapter.adapt([(1, 4.0)], user=800)
    with pytest.raises(ValueError, match=r"user feature 'user.region' is needed"):
        adapter.adapt([(1, 4.0)], user_features={"segment": 1})
    with pytest.raises(ValueError, match="unknown user feature"):
        adapter.adapt([(1, 4.0)], user=0, user_features={"age": 1})
    with pytest.raises(ValueError, match=r"candidates\[1\]: item -1"):
        adapter.adapt([(1, 4.0)], user=0).recommend(3, candidates=[2, -1])
    with pytest.raises(ValueError, match="k must be"):
        adapter.adapt([(1, 4.0)], user=0).recommend(0)


def test_a_checkpoint_without_feature_tables_needs_them_passed(fitted, tmp_path):
    ckpt, cli = fitted
    old = torch.load(ckpt, weights_only=False)
    del old["metarec_data"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="holds no item feature tables"):
        Adapter.from_checkpoint(tmp_path / "old.ckpt")
    table = cli.datamodule.table
    items = {f.spec.key: torch.from_numpy(f.values) for f in table.item_features}
    adapter = Adapter.from_checkpoint(tmp_path / "old.ckpt", item_features=items)
    with pytest.raises(ValueError, match="no user feature tables"):
        adapter.adapt([(1, 4.0)], user=0)
    session = adapter.adapt([(1, 4.0)], user_features={"segment": 1, "region": 2})
    assert len(session.recommend(4).items) == 4


# -- metarec adapt ------------------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_metarec_adapt_prints_k_items_per_user(fitted, tmp_path, capsys):
    ckpt, cli = fitted
    streams, _ = _test_streams(cli, n=3)
    lines = ["user,item,label,timestamp"]
    for user, events in streams.items():
        lines += [f"{user},{i},{y:g},{s}" for i, y, s in reversed(events)]  # any row order
    csv = _write(tmp_path / "events.csv", "\n".join(lines) + "\n")
    main(["adapt", "--ckpt_path", str(ckpt), "--interactions", str(csv), "--k", "5"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["user"] for o in out] == list(streams)
    adapter = Adapter.from_checkpoint(ckpt)
    for o in out:
        assert len(o["items"]) == len(o["scores"]) == 5
        assert not set(o["items"]) & {e[0] for e in streams[o["user"]]}
        expected = adapter.adapt(streams[o["user"]], user=o["user"]).recommend(5)
        assert o["items"] == expected.items.tolist()
        np.testing.assert_allclose(o["scores"], expected.scores.numpy(), rtol=0, atol=1e-5)
    # Another policy, and Parquet input.
    frame = __import__("pandas").read_csv(csv)
    frame.to_parquet(tmp_path / "events.parquet")
    main(["adapt", "--ckpt_path", str(ckpt), "--interactions", str(tmp_path / "events.parquet"),
          "--k", "3", "--policy", "online", "--policy_args", "{buffer_size: 5}"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 3 and all(len(o["items"]) == 3 for o in out)


def test_metarec_adapt_with_raw_ids(fitted, tmp_path, capsys):
    """A checkpoint whose data had raw ids (here: keys written into a copy)."""
    ckpt, _ = fitted
    raw = torch.load(ckpt, weights_only=False)
    raw["metarec_data"]["user_keys"] = [f"u{i}" for i in range(800)]
    raw["metarec_data"]["item_keys"] = [1000 + 3 * i for i in range(300)]
    torch.save(raw, tmp_path / "raw.ckpt")
    csv = _write(tmp_path / "raw.csv", "user,item,label\nu7,1003,5\nu7,1030,1\nu9,1000,3\n")
    main(["adapt", "--ckpt_path", str(tmp_path / "raw.ckpt"), "--interactions", str(csv), "--k", "4"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["user"] for o in out] == ["u7", "u9"]
    adapter = Adapter.from_checkpoint(tmp_path / "raw.ckpt")
    expected = adapter.adapt([(1, 5.0), (10, 1.0)], user=7).recommend(4)
    assert out[0]["items"] == [1000 + 3 * i for i in expected.items.tolist()]
    assert not {1003, 1030} & set(out[0]["items"])
    bad = _write(tmp_path / "bad.csv", "user,item,label\nu7,1003,5\nu7,1001,1\n")
    with pytest.raises(SystemExit):
        main(["adapt", "--ckpt_path", str(tmp_path / "raw.ckpt"), "--interactions", str(bad)])
    err = capsys.readouterr().err
    assert "bad.csv:3" in err and "field 'item'" in err and "unknown item id 1001" in err


@pytest.mark.parametrize("text,message", [
    ("user,item\n3,1\n", "missing column(s) ['label']"),
    ("user,item,label\n3,1,4\n3,500,2\n", "bad.csv:3, field 'item': expected an integer in [0, 299]"),
    ("user,item,label\n3,1,4\n3,2,x\n", "bad.csv:3, field 'label': expected a finite number"),
    ("user,item,label\n3,1,4\n3,2,9\n", "bad.csv:3, field 'label'"),  # outside 1-5 stars
    ("user,item,label\n3,1.5,4\n", "bad.csv:2, field 'item': expected an integer"),
    ("user,item,label\n900,1,4\n", "bad.csv:2, field 'user'"),
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


def test_metarec_adapt_bad_arguments(fitted, tmp_path, capsys):
    ckpt, _ = fitted
    csv = _write(tmp_path / "ok.csv", "user,item,label\n3,1,4\n")
    for args, message in ((["--ckpt_path", str(tmp_path / "none.ckpt")], "checkpoint not found"),
                          (["--ckpt_path", str(ckpt), "--policy", "nope"], "unknown policy 'nope'"),
                          (["--ckpt_path", str(ckpt), "--policy_args", "[1]"],
                           'key "policy_args": expected dict'),
                          (["--ckpt_path", str(ckpt), "--k", "0"], 'key "k"'),
                          (["--ckpt", str(ckpt), "--batch-users", "0"], 'key "batch_users"')):
        with pytest.raises(SystemExit) as exit_:
            main(["adapt", "--interactions", str(csv), *args])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) <= 4, err


def test_inputs_the_adapter_does_not_build_are_named():
    from conftest import synthetic_setup
    from metarec_plugins.backbones.melu import MeLU

    class WithHistory(MeLU):
        def forward(self, features, encode_only=False):
            if encode_only:
                return super().forward(features, encode_only=True)
            return super().forward(features) + features["history.item_id"].sum(-1)

    table, _ = synthetic_setup()
    tables = {owner: {f.spec.key: torch.from_numpy(f.values) for f in feats}
              for owner, feats in (("user", table.user_features), ("item", table.item_features))}
    ids = MetaLearner(backbone="melu", backbone_args={"embedding_dim": 4, "hidden": [8],
                                                      "use_ids": True}, schema=table.schema)
    adapter = Adapter(ids, item_features=tables["item"], user_features=tables["user"])
    assert len(adapter.adapt([(1, 4.0)], user=5).recommend(3).items) == 3
    with pytest.raises(ValueError, match="embeds user ids"):
        adapter.adapt([(1, 4.0)], user_features={"segment": 1, "region": 2})
    history = MetaLearner(backbone=WithHistory, backbone_args={"embedding_dim": 4, "hidden": [8]},
                          schema=table.schema)
    adapter = Adapter(history, item_features=tables["item"], user_features=tables["user"])
    with pytest.raises(ValueError, match="reads the input 'history.item_id'"):
        adapter.adapt([(1, 4.0)], user=5)


# -- sequential backbones: histories ------------------------------------------------------------
H = 6


@pytest.fixture(scope="module")
def fitted_transformer(tmp_path_factory):
    """A transformer checkpoint (histories of H events); queries are each user's latest
    interactions, so a query item's history is the user's latest support events."""
    cwd, tmp = os.getcwd(), tmp_path_factory.mktemp("fit_transformer")
    os.chdir(tmp)
    try:
        cli = MetarecCLI(args=["fit", "--config", QUICKSTART, *QUIET, "--trainer.max_steps", "3",
                               "--trainer.limit_val_batches", "0",
                               "--model.backbone", "transformer",
                               "--model.backbone_args", "{dim: 8, heads: 2}",
                               "--data.history_length", str(H),
                               "--data.tasks.query_strategy", "latest"])
    finally:
        os.chdir(cwd)
    (ckpt,) = (tmp / "runs" / "checkpoints").glob("*.ckpt")
    return ckpt, cli


@pytest.mark.parametrize("policy,policy_args,group_size", [
    (None, None, None),
    ("online", {"events_per_update": 2, "buffer_size": 5}, 16),
])
def test_transformer_predictions_equal_the_evaluation_path(fitted_transformer, policy,
                                                           policy_args, group_size):
    ckpt, cli = fitted_transformer
    assert load_checkpoint(ckpt)["metarec_data"]["history_length"] == H
    hp = {k: v for k, v in load_checkpoint(ckpt)["hyper_parameters"].items()
          if not k.startswith("_")}
    if policy is not None:
        hp.update(policy=policy, policy_args=policy_args)
    model = instantiate_module(MetaLearner, hp)
    model.load_state_dict(load_checkpoint(ckpt)["state_dict"])
    model.eval()
    tasks = cli.datamodule.splits.test
    batch = EpisodeCollator(tasks, cli.datamodule.table, H)(list(range(len(tasks))))
    assert "history.item_id" in batch.support
    slow = {k: v.detach() for k, v in model.functional.split()[1].items()}
    with torch.no_grad():
        fast = model.adapt(batch)
        expected = model.functional.predict_tasks(fast[-1], slow, batch.query)
        start = model.functional.predict_tasks(fast[0], slow, batch.query)
    adapter = Adapter.from_checkpoint(ckpt, policy=policy, policy_args=policy_args,
                                      group_size=group_size)
    assert adapter.history_length == H
    streams, _ = _test_streams(cli)
    together = adapter.adapt(streams)
    mask = batch.query["mask"]
    for t, user in enumerate(tasks.users.tolist()):
        items = batch.query["item_id"][t][mask[t]]
        torch.testing.assert_close(together[user].scores(items), expected[t][mask[t]],
                                   rtol=0, atol=2e-5)
    assert float((expected - start)[mask].abs().max()) > 1e-2


def test_transformer_updates_see_the_history_like_a_replay(fitted_transformer):
    """online: adapting on the first events and then `update` with the rest, one event at a
    time (each new event's history built from the session's latest events), ends where
    replaying the whole stream ends, and scores from the full history."""
    ckpt, cli = fitted_transformer
    adapter = Adapter.from_checkpoint(ckpt, policy="online",
                                      policy_args={"buffer_size": 4, "max_steps": 50})
    streams, _ = _test_streams(cli, n=3)
    for user, events in streams.items():
        whole = adapter.adapt(events, user=user)
        session = adapter.adapt(events[:5], user=user)
        for event in events[5:]:
            session.update([event])
        for k, v in whole.fast.items():
            torch.testing.assert_close(session.fast[k], v, rtol=0, atol=1e-5)
        torch.testing.assert_close(session.scores(), whole.scores(), rtol=0, atol=1e-5)
        assert all(v.shape[0] == 4 and (not k.startswith("history.") or v.shape[1] == H)
                   for k, v in session.state.items())
    # Without timestamps, new events follow everything seen; the history moves on.
    frozen = Adapter.from_checkpoint(ckpt, policy="frozen")
    session = frozen.adapt(events, user=user)
    before = session.scores()
    session.update([(1, 5.0), (2, 1.0)])
    assert not torch.equal(session.scores(), before)  # same parameters, newer history
    assert session._recent[0].tolist()[-2:] == [1, 2] and len(session._recent[0]) == H


def test_a_history_backbone_needs_a_history_length(fitted_transformer, tmp_path):
    ckpt, _ = fitted_transformer
    old = torch.load(ckpt, weights_only=False)
    old["metarec_data"]["history_length"] = None
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="pass history_length="):
        Adapter.from_checkpoint(tmp_path / "old.ckpt")
    assert Adapter.from_checkpoint(tmp_path / "old.ckpt", history_length=3).history_length == 3


def test_metarec_adapt_with_a_transformer_checkpoint(fitted_transformer, tmp_path, capsys):
    ckpt, cli = fitted_transformer
    streams, _ = _test_streams(cli, n=2)
    lines = ["user,item,label,timestamp"] + [f"{u},{i},{y:g},{s}" for u, events in streams.items()
                                             for i, y, s in events]
    csv = _write(tmp_path / "events.csv", "\n".join(lines) + "\n")
    main(["adapt", "--ckpt_path", str(ckpt), "--interactions", str(csv), "--k", "4"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    adapter = Adapter.from_checkpoint(ckpt)
    assert [o["user"] for o in out] == list(streams)
    for o in out:
        expected = adapter.adapt(streams[o["user"]], user=o["user"]).recommend(4)
        assert o["items"] == expected.items.tolist()


def test_epsilon_greedy_exploration(fitted):
    ckpt, cli = fitted
    adapter = Adapter.from_checkpoint(ckpt)
    streams, _ = _test_streams(cli, n=1)
    user, events = next(iter(streams.items()))
    session = adapter.adapt(events, user=user)
    candidates = list(range(40))
    greedy = session.recommend(5, candidates)
    same = session.recommend(5, candidates, epsilon=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.items, same.items)
    draw = lambda seed, eps: session.recommend(  # noqa: E731
        5, candidates, epsilon=eps, generator=torch.Generator().manual_seed(seed)).items
    assert torch.equal(draw(3, 0.5), draw(3, 0.5))  # reproducible
    shown = torch.stack([draw(s, 1.0) for s in range(400)])
    assert all(len(set(row.tolist())) == 5 for row in shown)  # never the same item twice
    counts = torch.bincount(shown.flatten(), minlength=40).float()
    seen = counts[[c for c in candidates if c not in session._seen.tolist()]]
    # Pure exploration is uniform over the unseen candidates (2000 draws / ~35 items each).
    assert seen.min() > 0.4 * seen.mean() and seen.max() < 1.8 * seen.mean()
    assert not torch.equal(counts.argsort(descending=True)[:5].sort().values,
                           greedy.items.sort().values)
    with pytest.raises(ValueError, match="epsilon"):
        session.recommend(5, epsilon=1.5)


@pytest.mark.parametrize("k", [1, 3, 10, 50, 60])
def test_top_k_is_the_stable_sort_prefix(k):
    """``recommend``'s top-k equals the first k of a stable descending sort: ties in candidate
    order, also when the k-th score is tied, and with NaN or infinite scores."""
    from metarec.serving.session import top_k

    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 6, (50,), generator=g).float()  # many ties
    expected = torch.sort(scores, descending=True, stable=True).indices[:k]
    assert torch.equal(top_k(scores, k), expected)
    for bad in (float("nan"), float("inf"), -float("inf")):
        odd = scores.clone()
        odd[[4, 17]] = bad
        assert torch.equal(top_k(odd, k),
                           torch.sort(odd, descending=True, stable=True).indices[:k])
