"""Adaptation policies (proximal, early-stop, frozen) against finetune, closed forms and by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import REPO, melu_setup
from metarec import (
    SGD,
    AdaptationPolicy,
    FunctionalModel,
    MetaAlgorithm,
    PluginError,
    available,
    build,
)
from metarec.cli import MetarecCLI
from metarec_plugins.algorithms.maml import MAML
from metarec_plugins.algorithms.metasgd import MetaSGD
from metarec_plugins.algorithms.reptile import Reptile
from metarec_plugins.policies.early_stop import EarlyStop
from metarec_plugins.policies.finetune import FineTune
from metarec_plugins.policies.frozen import Frozen
from metarec_plugins.policies.proximal import Proximal, ProximalStep

POLICIES = sorted(i.alias for i in available("policies") if i.distribution == "metarec")
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")


# -- fixtures -------------------------------------------------------------------------------
def _melu(algorithm, n_tasks=6, seed=0):
    """MeLU (float64) on synthetic tasks; detached (fast, slow) as evaluation passes them."""
    _, model, batch = melu_setup(algorithm, n_tasks, seed)
    fast, slow = model.split()
    return (model, {k: v.detach() for k, v in fast.items()},
            {k: v.detach() for k, v in slow.items()}, batch)


def _run(policy, algorithm, model, fast, slow, support):
    policy.bind(algorithm)
    with torch.no_grad():  # as in validation
        return policy.adapt(model, fast, slow, support)


def _task_params(iterate, t):
    return {k: v[t] for k, v in iterate.items()}


def _norm(params, start):
    return math.sqrt(sum(float(((params[k] - start[k]) ** 2).sum()) for k in start))


class Scale(nn.Module):
    """score = w * x: with zero labels, SGD multiplies the residual by ``1 - 2 lr x^2`` per step,
    so a task's support-loss ratio after t steps is ``(1 - 2 lr x^2) ** (2 t)`` exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))

    def forward(self, features):
        return self.w[0] * features["x"]


def _scale(xs):
    """The Scale model and a support batch with one task per x (plus a padded junk slot)."""
    module = Scale()
    model = FunctionalModel(module, ["w"], "explicit")
    x = torch.tensor([[v, v, 100.0] for v in xs], dtype=torch.float64)
    # Zero labels, except where x = 0: there the loss is a constant 1 (no gradient, ratio 1).
    label = torch.tensor([[0.0 if v else 1.0] * 2 + [5.0] for v in xs], dtype=torch.float64)
    support = {"x": x, "label": label,
               "mask": torch.tensor([[True, True, False]] * len(xs))}
    fast, slow = model.split()
    return model, {k: v.detach() for k, v in fast.items()}, slow, support


LR = 1 / 32  # x = 1, 2, 3, 0 -> residual factor 15/16, 3/4, 7/16, 1 per step


def _stops(policy, xs=(1.0, 2.0, 3.0, 0.0), algorithm=None):
    model, fast, slow, support = _scale(xs)
    iterates = _run(policy, algorithm or MetaAlgorithm(inner_lr=LR), model, fast, slow, support)
    return iterates, policy.last_steps_used


# -- proximal -------------------------------------------------------------------------------
def _perturbed(algorithm):
    """Give learned step sizes distinct values, so that using them (or not) shows."""
    with torch.no_grad():
        for p in algorithm.parameters():
            p.mul_(torch.rand_like(p) + 0.5)
    return algorithm


ALGORITHMS = {
    "maml": lambda: MAML(inner_steps=4, inner_lr=0.05),
    "maml-per-step-lr": lambda: MAML(inner_steps=4, inner_lr=0.05, learn_inner_lr=True),
    "metasgd": lambda: MetaSGD(inner_steps=4, inner_lr=0.05),
    "reptile-adam": lambda: Reptile(inner_steps=4, inner_lr=0.01, inner_optimizer="adam"),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_proximal_with_alpha_zero_is_finetune_bit_for_bit(name):
    algorithm = ALGORITHMS[name]()
    model, fast, slow, batch = _melu(algorithm)
    _perturbed(algorithm)  # metasgd: per-element rates; MAML++: per-step rates
    for kwargs in ({}, {"lr": 0.07, "steps": 3}):
        expected = _run(FineTune(**kwargs), algorithm, model, fast, slow, batch.support)
        got = _run(Proximal(alpha=0.0, **kwargs), algorithm, model, fast, slow, batch.support)
        assert len(got) == len(expected) == (kwargs.get("steps") or algorithm.inner_steps) + 1
        for step, (a, b) in enumerate(zip(got, expected)):
            assert set(a) == set(b) == set(model.fast_names)
            for k in a:
                assert torch.equal(a[k], b[k]), (name, kwargs, step, k)
        # ... and the comparison is sharp: the smallest pull already changes the iterates.
        pulled = _run(Proximal(alpha=1e-3, **kwargs), algorithm, model, fast, slow, batch.support)
        assert not torch.equal(pulled[-1]["output.weight"], expected[-1]["output.weight"])


def test_proximal_step_applies_the_update_formula():
    theta0 = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    theta = {"w": torch.tensor([1.5, 1.0], dtype=torch.float64)}
    grads = {"w": torch.tensor([0.2, -0.4], dtype=torch.float64)}
    opt = ProximalStep(SGD(0.1), alpha=0.3)
    new, state = opt.step(theta, grads, opt.init(theta0), 0)
    # theta - lr * grad - alpha * (theta - theta0)
    torch.testing.assert_close(new["w"], torch.tensor([1.5 - 0.02 - 0.15, 1.0 + 0.04 + 0.3],
                                                      dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(state[0]["w"], theta0["w"], rtol=0, atol=0)  # the anchor is kept


def test_proximal_trajectory_by_hand():
    """Three steps of theta <- theta - lr * grad - alpha * (theta - theta_0) per task, with plain
    torch.autograd on MeLU (float64)."""
    lr, alpha, steps = 0.2, 0.3, 3
    algorithm = MAML(inner_steps=steps, inner_lr=lr)
    model, fast, slow, batch = _melu(algorithm, n_tasks=3)
    got = _run(Proximal(alpha=alpha), algorithm, model, fast, slow, batch.support)
    for t in range(3):
        support = {k: v[t] for k, v in batch.support.items()}
        theta = dict(fast)
        for i in range(steps):
            p = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
            with torch.enable_grad():
                grads = torch.autograd.grad(model.loss(p, slow, support), list(p.values()))
            theta = {k: theta[k] - lr * g - alpha * (theta[k] - fast[k])
                     for k, g in zip(theta, grads)}
            for k in theta:
                torch.testing.assert_close(got[i + 1][k][t], theta[k], rtol=1e-10, atol=1e-12)


def test_proximal_with_large_alpha_stays_near_the_start():
    """d_t = theta_t - theta_0 obeys d_{t+1} = (1 - alpha) d_t - lr g_t, so
    |d_{t+1}| <= (1 - alpha) |d_t| + lr |g_t|  and  |d_k| <= lr max_t |g_t| / alpha."""
    lr, alpha, steps = 0.05, 0.9, 20
    algorithm = MAML(inner_steps=steps, inner_lr=lr)
    model, fast, slow, batch = _melu(algorithm)
    prox = _run(Proximal(alpha=alpha), algorithm, model, fast, slow, batch.support)
    ft = _run(FineTune(), algorithm, model, fast, slow, batch.support)
    for t in range(len(batch.users)):
        support = {k: v[t] for k, v in batch.support.items()}
        gnorms = []
        for i in range(steps):
            p = {k: v[t].clone().requires_grad_(True) for k, v in prox[i].items()}
            with torch.enable_grad():
                g = torch.autograd.grad(model.loss(p, slow, support), list(p.values()))
            gnorms.append(math.sqrt(sum(float((x ** 2).sum()) for x in g)))
            d_now = _norm(_task_params(prox[i], t), fast)
            d_next = _norm(_task_params(prox[i + 1], t), fast)
            assert d_next <= (1 - alpha) * d_now + lr * gnorms[-1] + 1e-12, (t, i)
        d_prox, d_ft = _norm(_task_params(prox[-1], t), fast), _norm(_task_params(ft[-1], t), fast)
        assert d_prox <= lr * max(gnorms) * (1 - (1 - alpha) ** steps) / alpha + 1e-12
        assert 0 < d_prox < 0.25 * d_ft, (t, d_prox, d_ft)


# -- early-stop -----------------------------------------------------------------------------
def test_early_stop_stops_where_the_ratio_reaches_the_target():
    target, cap = 0.2, 15
    iterates, used = _stops(EarlyStop(max_steps=cap, target_ratio=target, patience=None))
    factors = [1 - 2 * LR * x * x for x in (1.0, 2.0, 3.0, 0.0)]
    # ratio after t steps = factor ** (2 t): first t with ratio <= target, else the cap.
    expected = [next((t for t in range(cap + 1) if f ** (2 * t) <= target), cap) for f in factors]
    assert expected == [13, 3, 1, 15]
    assert used.tolist() == expected
    assert len(iterates) == cap + 1
    for b, (f, stop) in enumerate(zip(factors, expected)):
        for t, it in enumerate(iterates):
            w = it["w"][b, 0]
            torch.testing.assert_close(w, torch.tensor(f ** min(t, stop), dtype=torch.float64),
                                       rtol=1e-12, atol=0)
            if t > stop:  # frozen from its stop step on: not just close, identical
                assert torch.equal(w, iterates[stop]["w"][b, 0]), (b, t)


@pytest.mark.parametrize("patience,expected", [(1, [5, 1, 3, 8]), (2, [8, 2, 4, 12])])
def test_early_stop_patience_counts_steps_without_improving_the_best_ratio(patience, expected):
    """Ratios q^t (q = 0.5625, 1, 0.1914, 0.8789); improvement = below best - 0.05.
    E.g. q = 0.5625: 1, .5625, .3164, .1780, .1001 all improve; .0563 does not (> .1001 - .05):
    patience 1 stops there (5 steps); with patience 2, .0317 improves again, .0178 and .0100 do
    not: 8 steps. q = 1 (no gradient) never improves: it stops after `patience` steps."""
    iterates, used = _stops(EarlyStop(max_steps=12, target_ratio=None, patience=patience,
                                      min_delta=0.05), xs=(2.0, 0.0, 3.0, 1.0))
    assert used.tolist() == expected
    for b, stop in enumerate(expected):
        assert all(torch.equal(it["w"][b], iterates[stop]["w"][b]) for it in iterates[stop:])
        assert not torch.equal(iterates[stop]["w"][b], iterates[stop - 1]["w"][b]) or b == 1


def test_early_stop_uses_the_algorithms_objective_and_optimiser():
    """Gradient of the algorithm's inner objective (here twice the loss = double step size),
    ratio of the plain support loss."""
    class Doubled(MetaAlgorithm):
        def inner_objective(self, model, start, slow):
            return lambda f, batch: 2 * model.loss(f, slow, batch)

    _, used = _stops(EarlyStop(max_steps=15, target_ratio=0.2, patience=None),
                     algorithm=Doubled(inner_lr=LR / 2))
    assert used.tolist() == [13, 3, 1, 15]
    _, used = _stops(EarlyStop(max_steps=15, target_ratio=0.2, patience=None, lr=LR),
                     algorithm=MetaAlgorithm(inner_lr=1.0))  # lr overrides the algorithm's
    assert used.tolist() == [13, 3, 1, 15]


def test_early_stop_on_melu_freezes_stopped_tasks_and_respects_the_cap():
    cap = 8
    algorithm = MAML(inner_steps=3, inner_lr=0.05)
    model, fast, slow, batch = _melu(algorithm, n_tasks=8)
    ft = _run(FineTune(steps=cap), algorithm, model, fast, slow, batch.support)
    ratios = torch.stack([model.loss_tasks(it, slow, batch.support) for it in ft])
    ratios = ratios / ratios[0]
    target = float(ratios[3].median())  # about half the tasks get there within 3 steps
    policy = EarlyStop(max_steps=cap, target_ratio=target, patience=None)
    got = _run(policy, algorithm, model, fast, slow, batch.support)
    assert len(got) == cap + 1
    reached = ratios <= target
    expected = torch.where(reached.any(0), reached.int().argmax(0), cap)
    assert torch.equal(policy.last_steps_used, expected)
    assert len(set(expected.tolist())) > 1 and int(expected.max()) <= cap
    assert torch.equal(policy.diagnostics()["steps_used"], expected.to(torch.float32))
    for b, stop in enumerate(expected.tolist()):
        for t, it in enumerate(got):  # finetune until the stop step, then constant
            ref = ft[min(t, stop)]
            assert all(torch.equal(it[k][b], ref[k][b]) for k in it), (b, t, stop)

    # Without a reachable target or patience every task runs to the cap: exactly finetune.
    never = EarlyStop(max_steps=cap, target_ratio=0.0, patience=None)
    got = _run(never, algorithm, model, fast, slow, batch.support)
    assert never.last_steps_used.tolist() == [cap] * len(batch.users)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(got, ft) for k in a)


def test_early_stop_with_zero_steps_and_the_default_diagnostics():
    model, fast, slow, support = _scale((1.0, 2.0))
    policy = EarlyStop(max_steps=0)
    assert policy.diagnostics() == {}
    iterates = _run(policy, MetaAlgorithm(inner_lr=LR), model, fast, slow, support)
    assert len(iterates) == 1 and iterates[0]["w"].shape == (2, 1)
    assert policy.last_steps_used.tolist() == [0, 0]
    assert AdaptationPolicy().diagnostics() == {} and FineTune().diagnostics() == {}


# -- frozen ---------------------------------------------------------------------------------
def test_frozen_returns_the_start_for_every_task():
    algorithm = MAML(inner_steps=3, inner_lr=0.05)
    model, fast, slow, batch = _melu(algorithm)
    policy = Frozen()
    iterates = _run(policy, algorithm, model, fast, slow, batch.support)
    assert policy.max_steps == 0 and len(iterates) == 1
    assert set(iterates[0]) == set(fast)
    for k, v in iterates[0].items():
        assert v.shape == (len(batch.users), *fast[k].shape)
        assert all(torch.equal(v[b], fast[k]) for b in range(len(batch.users)))
    # Identical to step 0 of finetune's trajectory.
    start = _run(FineTune(), algorithm, model, fast, slow, batch.support)[0]
    assert all(torch.equal(start[k], iterates[0][k]) for k in start)


def test_frozen_through_the_cli_logs_step0_only(in_tmp):
    cli = MetarecCLI(args=["fit", "--config", QUICKSTART, "--model.policy", "frozen",
                           "--trainer.fast_dev_run", "1"])
    metrics = cli.trainer.callback_metrics
    val = [k for k in metrics if k.startswith("val/")]
    assert "val/step0/loss" in val and "val/step0/adapt_ratio" in val
    assert not [k for k in val if k.startswith("val/step") and not k.startswith("val/step0/")]
    assert torch.equal(metrics["val/loss"], metrics["val/step0/loss"])
    assert float(metrics["val/adapt_ratio"]) == 1.0


# -- every policy, end to end; argument checking --------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_runs_through_the_cli(policy, in_tmp):
    args = ["--model.policy_args", "{max_steps: 8}"] if policy == "early-stop" else []
    cli = MetarecCLI(args=["fit", "--config", QUICKSTART, "--model.policy", policy,
                           "--trainer.fast_dev_run", "1", *args])
    trainer, bound = cli.trainer, cli.model.policy
    assert trainer.state.finished and trainer.global_step == 1
    metrics = trainer.callback_metrics
    last = f"val/step{bound.max_steps}/loss"
    assert last in metrics and f"val/step{bound.max_steps + 1}/loss" not in metrics
    val = {k: v for k, v in metrics.items() if k.startswith("val/")}
    assert val and all(bool(v.isfinite()) for v in val.values()), val
    for name, values in bound.diagnostics().items():
        assert values.ndim == 1 and bool(values.isfinite().all()), name
    if policy == "early-stop":
        used = bound.last_steps_used
        assert bound.max_steps == 8 and used.ndim == 1 and len(used) > 1
        assert int(used.min()) >= 0 and int(used.max()) <= 8


def test_the_new_policies_are_registered():
    assert {"finetune", "proximal", "early-stop", "frozen"} <= set(POLICIES)


@pytest.mark.parametrize("name,args,message", [
    ("proximal", {"alpha": 1.0}, "alpha must be in"),
    ("proximal", {"alpha": -0.1}, "alpha must be in"),
    ("proximal", {"alpha": float("nan")}, "alpha must be in"),
    ("proximal", {"lr": 0.0}, "lr must be > 0"),
    ("proximal", {"steps": -1}, "steps must be >= 0"),
    ("early-stop", {"max_steps": -1}, "max_steps must be"),
    ("early-stop", {"target_ratio": 1.0}, "target_ratio must be in"),
    ("early-stop", {"patience": 0}, "patience must be"),
    ("early-stop", {"min_delta": -0.01}, "min_delta must be"),
    ("early-stop", {"lr": -1.0}, "lr must be > 0"),
    ("early-stop", {"patience_steps": 3}, "unknown argument"),
    ("frozen", {"steps": 3}, "unknown argument"),
])
def test_bad_arguments_are_rejected_naming_the_plugin(name, args, message):
    with pytest.raises(PluginError, match=message) as err:
        build("policies", name, args)
    assert f"policy {name!r}" in str(err.value)


def test_defaults():
    p = build("policies", "proximal")
    assert (p.alpha, p.steps, p.lr) == (0.1, None, None)
    p.bind(MAML(inner_steps=4))
    assert p.max_steps == 4
    e = build("policies", "early-stop")
    assert (e.max_steps, e.target_ratio, e.patience, e.min_delta, e.lr) == (20, 0.5, 3, 0.0, None)
    e.bind(MAML(inner_steps=4))
    assert e.max_steps == 20  # a cap of its own, not the algorithm's inner_steps


def test_early_stop_steps_used_reach_the_logs(in_tmp):
    from metarec.cli import MetarecCLI

    cli = MetarecCLI(args=["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"),
                           "--trainer.fast_dev_run", "1", "--model.policy", "early-stop",
                           "--model.policy_args", "{max_steps: 6, target_ratio: 0.9}"])
    used = float(cli.trainer.callback_metrics["val/steps_used"])
    assert 0 <= used <= 6
