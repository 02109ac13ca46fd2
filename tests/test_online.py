"""The online policy: replay semantics by hand, replay = incremental updates, bounded buffer,
session isolation, and evaluation through the CLI."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import REPO, synthetic_batch, synthetic_setup
from metarec import Adapter, FunctionalModel, PluginError, build, select_parameters
from metarec.cli import MetarecCLI
from metarec.module import MetaLearner
from metarec_plugins.algorithms.maml import MAML
from metarec_plugins.backbones.melu import MeLU
from metarec_plugins.policies.online import Online

QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")


def _melu(n_tasks=4, inner_lr=0.05):
    """MeLU (float64) on synthetic tasks, bound to MAML; detached (fast, slow) and the batch."""
    table, batch = synthetic_batch(n_tasks=n_tasks)
    torch.manual_seed(0)
    backbone = MeLU(table.schema, embedding_dim=4, hidden=(8, 6)).double()
    algorithm = MAML(inner_steps=2, inner_lr=inner_lr)
    model = FunctionalModel(backbone, select_parameters(backbone, algorithm.select_fast(backbone)),
                            "explicit")
    algorithm.bind(model)
    fast, slow = model.split()
    return (algorithm, model, {k: v.detach() for k, v in fast.items()},
            {k: v.detach() for k, v in slow.items()}, batch)


def _adapt(policy, algorithm, model, fast, slow, support):
    policy.bind(algorithm)
    with torch.no_grad():  # as in validation
        return policy.adapt(model, fast, slow, support)


def _task(support, t, lo=0, hi=None):
    n = int(support["mask"][t].sum())
    return {k: v[t, lo:n if hi is None else min(hi, n)] for k, v in support.items()}


def _by_hand(model, slow, start, rows, per, size, steps, lr, alpha):
    """Every iterate of the replay, with plain torch.autograd on explicit buffers."""
    n = int(rows["mask"].shape[0])
    theta, out = dict(start), [dict(start)]
    for u in range(math.ceil(n / per)):
        end = min((u + 1) * per, n)
        buffer = {k: v[max(0, end - size):end] for k, v in rows.items()}
        assert int(buffer["mask"].sum()) == min(size, end)  # the latest `size` events so far
        for _ in range(steps):
            p = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
            with torch.enable_grad():
                grads = torch.autograd.grad(model.loss(p, slow, buffer), list(p.values()))
            theta = {k: theta[k] - lr * g - alpha * (theta[k] - start[k])
                     for k, g in zip(theta, grads)}
        out.append(theta)
    return out


# -- the update rule and the trajectory ------------------------------------------------------
@pytest.mark.parametrize("per,size,steps,alpha", [(1, 3, 1, 0.0), (2, 3, 2, 0.3), (3, 7, 1, 0.1)])
def test_replay_follows_the_update_rule_by_hand(per, size, steps, alpha):
    lr = 0.05
    algorithm, model, fast, slow, batch = _melu(n_tasks=3, inner_lr=lr)
    policy = Online(events_per_update=per, buffer_size=size, steps_per_update=steps, alpha=alpha,
                    max_steps=100)
    got = _adapt(policy, algorithm, model, fast, slow, batch.support)
    assert len(got) == 101
    for t in range(3):
        expected = _by_hand(model, slow, fast, _task(batch.support, t), per, size, steps, lr, alpha)
        assert int(policy.last_updates[t]) == len(expected) - 1
        for s, theta in enumerate(expected):
            for k in theta:
                torch.testing.assert_close(got[s][k][t], theta[k], rtol=1e-9, atol=1e-11)
        for s in range(len(expected), 101):  # the stream has ended: held, identical
            assert all(torch.equal(got[s][k][t], got[len(expected) - 1][k][t]) for k in fast)
    assert torch.equal(policy.diagnostics()["updates"], policy.last_updates.float())


def test_trajectory_reports_max_steps_and_ends_after_the_whole_stream():
    algorithm, model, fast, slow, batch = _melu(n_tasks=2)
    support = dict(batch.support)
    support["mask"] = support["mask"].clone()
    support["mask"][1, 2:] = False  # task 1: a stream of two events
    n0 = int(support["mask"][0].sum())
    assert n0 > 4
    full = _adapt(Online(max_steps=100), algorithm, model, fast, slow, support)
    short = _adapt(Online(max_steps=4), algorithm, model, fast, slow, support)
    assert len(short) == 5
    for k in fast:
        assert torch.equal(short[0][k][0], fast[k])  # step 0: the meta-learned start
        for s in range(4):
            assert torch.equal(short[s][k], full[s][k])
        # The last reported step is after the whole stream (n0 updates for task 0) ...
        assert torch.equal(short[4][k][0], full[n0][k][0])
        assert not torch.equal(short[4][k][0], full[4][k][0])
        # ... and task 1 stopped after 2 updates.
        assert torch.equal(short[4][k][1], full[2][k][1])
        assert torch.equal(short[3][k][1], full[2][k][1])


def test_a_stream_with_no_events_stays_at_the_start():
    algorithm, model, fast, slow, batch = _melu(n_tasks=2)
    support = {**batch.support, "mask": torch.zeros_like(batch.support["mask"])}
    got = _adapt(Online(max_steps=3), algorithm, model, fast, slow, support)
    assert len(got) == 4
    assert all(torch.equal(it[k][b], fast[k]) for it in got for k in fast for b in range(2))


def test_alpha_pulls_toward_the_meta_learned_start():
    algorithm, model, fast, slow, batch = _melu(n_tasks=4)
    free = _adapt(Online(max_steps=1, alpha=0.0), algorithm, model, fast, slow, batch.support)[-1]
    pulled = _adapt(Online(max_steps=1, alpha=0.5), algorithm, model, fast, slow,
                    batch.support)[-1]

    def drift(params, t):
        return math.sqrt(sum(float(((params[k][t] - fast[k]) ** 2).sum()) for k in fast))

    for t in range(4):
        assert 0 < drift(pulled, t) < 0.5 * drift(free, t)


# -- deployment: incremental updates --------------------------------------------------------
@pytest.mark.parametrize("per,size,steps,alpha,prefix", [(1, 4, 1, 0.0, 5), (2, 5, 2, 0.2, 3)])
def test_incremental_updates_equal_the_replay(per, size, steps, alpha, prefix):
    """Adapting on the first `prefix` chunks and then `update` with the rest of the stream
    (chunk by chunk, and all at once) ends where replaying the whole stream ends."""
    algorithm, model, fast, slow, batch = _melu(n_tasks=3)
    policy = Online(events_per_update=per, buffer_size=size, steps_per_update=steps, alpha=alpha,
                    max_steps=50)
    replay = _adapt(policy, algorithm, model, fast, slow, batch.support)
    for t in range(3):
        rows = _task(batch.support, t)
        n, m = int(rows["mask"].shape[0]), prefix * per
        theta = {k: v[t] for k, v in replay[prefix].items()}
        buffer = policy.init_state(_task(batch.support, t, hi=m))
        assert int(buffer["mask"].shape[0]) == min(size, m)
        assert torch.equal(buffer["item_id"], rows["item_id"][max(0, m - size):m])
        one_go = policy.update(model, theta, slow, fast, buffer, _task(batch.support, t, lo=m))
        for lo in range(m, n, per):  # the same stream delivered chunk by chunk
            theta, buffer = policy.update(model, theta, slow, fast, buffer,
                                          _task(batch.support, t, lo=lo, hi=lo + per))
            assert int(buffer["mask"].shape[0]) <= size
        final = {k: v[t] for k, v in replay[-1].items()}
        for k in fast:
            torch.testing.assert_close(theta[k], final[k], rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(one_go[0][k], final[k], rtol=1e-9, atol=1e-11)
        assert torch.equal(buffer["item_id"], rows["item_id"][-size:])  # the latest events


def test_update_leaves_its_inputs_unchanged():
    algorithm, model, fast, slow, batch = _melu(n_tasks=1)
    policy = Online(buffer_size=3)
    policy.bind(algorithm)
    buffer = policy.init_state(_task(batch.support, 0, hi=5))
    theta = {k: v.clone() for k, v in fast.items()}
    saved = ({k: v.clone() for k, v in theta.items()}, {k: v.clone() for k, v in buffer.items()})
    new, new_buffer = policy.update(model, theta, slow, fast, buffer, _task(batch.support, 0, lo=5))
    assert all(torch.equal(theta[k], saved[0][k]) for k in theta)
    assert all(torch.equal(buffer[k], saved[1][k]) for k in buffer)
    assert not torch.equal(new["output.weight"], theta["output.weight"])


def _online_adapter(**policy_args):
    table, splits = synthetic_setup()
    torch.manual_seed(0)
    model = MetaLearner(backbone="melu", backbone_args={"embedding_dim": 4, "hidden": [8]},
                        algorithm="maml", algorithm_args={"inner_steps": 2, "inner_lr": 0.1},
                        policy="online", policy_args=policy_args, schema=table.schema)
    features = {owner: {f.spec.key: torch.from_numpy(f.values) for f in feats}
                for owner, feats in (("user", table.user_features),
                                     ("item", table.item_features))}
    adapter = Adapter(model, item_features=features["item"], user_features=features["user"])
    test = splits.test
    streams = {}
    for t in range(3):
        n = int(test.support_mask[t].sum())
        streams[int(test.users[t])] = [(int(i), float(y), int(s)) for i, y, s in zip(
            test.support_items[t, :n], test.support_labels[t, :n], test.support_times[t, :n])]
    return adapter, streams


def _snapshot(session):
    rec = session.recommend(10)
    return ({k: v.clone() for k, v in session.fast.items()},
            {k: v.clone() for k, v in session.state.items()}, rec.items.clone(), rec.scores.clone())


def _same(a, b):
    return (all(torch.equal(a[0][k], b[0][k]) for k in a[0])
            and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
            and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]))


def test_an_update_for_one_user_leaves_other_sessions_unchanged():
    adapter, streams = _online_adapter(buffer_size=6, events_per_update=2)
    (a, ev_a), (b, ev_b), (c, ev_c) = list(streams.items())
    sessions = adapter.adapt({a: ev_a[:-4], b: ev_b, c: ev_c})  # one vmapped call
    alone = adapter.adapt(ev_b, user=b)
    before_b, before_c = _snapshot(sessions[b]), _snapshot(sessions[c])
    before_a = _snapshot(sessions[a])
    for event in ev_a[-4:] + [(3, 5.0), (4, 1.0), (5, 2.0)]:
        sessions[a].update([event])
    assert not _same(_snapshot(sessions[a]), before_a)  # A did change
    assert _same(_snapshot(sessions[b]), before_b)  # B and C: bit for bit unchanged
    assert _same(_snapshot(sessions[c]), before_c)
    # The batched adaptation of B equals adapting B alone.
    for k, v in alone.fast.items():
        torch.testing.assert_close(sessions[b].fast[k], v, rtol=1e-5, atol=1e-6)
    # A's own feedback is excluded from its recommendations.
    assert not set(sessions[a].recommend(300).items.tolist()) & {3, 4, 5}
    assert {3, 4, 5} <= set(sessions[a].seen.tolist())


def test_the_session_replay_buffer_is_bounded():
    adapter, streams = _online_adapter(buffer_size=5, events_per_update=2)
    user, events = next(iter(streams.items()))
    session = adapter.adapt(events, user=user)
    assert len(events) > 5 and session.state["item_id"].shape == (5,)
    latest = sorted(events, key=lambda e: e[2])[-5:]
    assert session.state["item_id"].tolist() == [e[0] for e in latest]
    fresh = [(i, 3.0) for i in range(40)]
    for lo in range(0, 40, 3):
        session.update(fresh[lo:lo + 3])
        assert all(v.shape[0] <= 5 for v in session.state.values())
    assert session.state["item_id"].tolist() == [35, 36, 37, 38, 39]


# -- evaluation through the CLI; arguments ----------------------------------------------------
def test_online_in_evaluation_through_the_cli(in_tmp):
    cli = MetarecCLI(args=["fit", "--config", QUICKSTART, "--model.policy", "online",
                           "--model.policy_args", "{events_per_update: 5, buffer_size: 10, "
                           "max_steps: 4, alpha: 0.1}", "--trainer.fast_dev_run", "1"])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.state.finished and cli.model.policy.max_steps == 4
    assert "val/step4/loss" in metrics and "val/step5/loss" not in metrics
    val = {k: v for k, v in metrics.items() if k.startswith("val/")}
    assert all(bool(v.isfinite()) for v in val.values()), val
    # Support sets of 5-50 events in chunks of 5: 1-10 updates per task.
    assert 1 <= float(metrics["val/updates"]) <= 10
    assert float(metrics["val/step0/adapt_ratio"]) == 1.0
    assert float(metrics["val/loss"]) != float(metrics["val/step0/loss"])


@pytest.mark.parametrize("args,message", [
    ({"events_per_update": 0}, "events_per_update must be"),
    ({"buffer_size": 2, "events_per_update": 3}, "buffer_size"),
    ({"steps_per_update": 0}, "steps_per_update must be"),
    ({"max_steps": 0}, "max_steps must be"),
    ({"alpha": 1.0}, "alpha must be in"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"buffer": 3}, "unknown argument"),
])
def test_bad_arguments_are_rejected_naming_the_policy(args, message):
    with pytest.raises(PluginError, match=message) as err:
        build("policies", "online", args)
    assert "policy 'online'" in str(err.value)


def test_registered_with_defaults():
    policy = build("policies", "online")
    assert isinstance(policy, Online)
    assert (policy.events_per_update, policy.buffer_size, policy.steps_per_update, policy.lr,
            policy.alpha, policy.max_steps) == (1, 20, 1, None, 0.0, 20)
