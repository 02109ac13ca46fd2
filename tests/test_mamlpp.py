"""MAML++ (Antoniou, Edwards and Storkey, ICLR 2019) and the stable inner loops of ``maml`` and
``metasgd``: multi-step loss, per-layer per-step rates, derivative-order annealing, inner
gradient clipping and bounded learned rates; and that all of it is off by default."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, vmap

from conftest import REPO, melu_setup
from metarec import SGD
from metarec.functional import clip_grad_norm
from metarec_plugins.algorithms.maml import MAML, msl_weights
from metarec_plugins.algorithms.metasgd import MetaSGD
from metarec_plugins.policies.finetune import FineTune


def _task_loss(backbone, params, side, t):
    """Task ``t``'s masked MSE under ``params``, with plain autograd (no torch.func)."""
    x = {k: v[t] for k, v in side.items() if k not in ("label", "mask", "time")}
    m = side["mask"][t].to(side["label"].dtype)
    return (((functional_call(backbone, params, (x,)) - side["label"][t]) ** 2) * m).sum() / m.sum()


def _grads(loss, backbone, extra=()):
    params = list(backbone.parameters()) + list(extra)
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_grads_equal(a, b, exact=False):
    for x, y in zip(a, b):
        x = torch.zeros_like(y) if x is None and y is not None else x
        y = torch.zeros_like(x) if y is None and x is not None else y
        if x is None:
            continue
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-10)


# -- multi-step loss ---------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("msl_epochs", [1, 3, 10, 40])
def test_msl_weights_sum_to_one_and_anneal_onto_the_last_step(steps, msl_epochs):
    previous = None
    for epoch in range(msl_epochs + 3):
        w = msl_weights(steps, epoch, msl_epochs)
        assert len(w) == steps and all(x >= 0 for x in w)
        assert math.isclose(sum(w), 1.0, rel_tol=0, abs_tol=1e-12), (epoch, w)
        if epoch == 0:
            assert w == pytest.approx([1.0 / steps] * steps, abs=1e-15)
        if epoch >= msl_epochs:
            assert w == [0.0] * (steps - 1) + [1.0]
        elif steps > 1:
            assert all(x >= 0.03 / steps - 1e-15 for x in w[:-1])  # the reference's floor
            assert w[-1] <= 1 - (steps - 1) * 0.03 / steps + 1e-15
        if previous is not None:  # non-final weights never grow, the final one never shrinks
            assert all(a <= b + 1e-15 for a, b in zip(w[:-1], previous[:-1]))
            assert w[-1] >= previous[-1] - 1e-15
        previous = w


def test_msl_weights_match_the_reference_schedule_by_hand():
    # N=5, msl_epochs=10: decay 1/5/10 = 0.02 per epoch, floor 0.03/5 = 0.006, cap 0.976.
    assert msl_weights(5, 3, 10) == pytest.approx([0.14] * 4 + [0.44], abs=1e-12)
    assert msl_weights(5, 9, 10) == pytest.approx([0.02] * 4 + [0.92], abs=1e-12)
    # msl_epochs=40: epoch 39 would go below the floor and above the cap: both clamp.
    assert msl_weights(5, 39, 40) == pytest.approx([0.006] * 4 + [0.976], abs=1e-12)
    assert msl_weights(5, 40, 40) == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_msl_weights_follow_the_epoch_hook():
    algo = MAML(inner_steps=4, inner_lr=0.1, multi_step_loss=True, msl_epochs=3)
    assert algo.step_loss_weights() == msl_weights(4, 0, 3)  # before any epoch: epoch 0
    for epoch in range(6):
        algo.on_train_epoch_start(epoch, 6)
        expected = None if epoch >= 3 else msl_weights(4, epoch, 3)
        assert algo.step_loss_weights() == expected
    assert MAML(inner_steps=4).step_loss_weights() is None  # MSL off: only the last step


def _msl_reference(backbone, batch, fast_names, steps, lr, weights):
    """sum_i w_i * mean_tasks L_query(theta_i), unrolled per task with plain autograd."""
    params = dict(backbone.named_parameters())
    n = len(batch.users)
    total = 0.0
    for t in range(n):
        p = dict(params)
        for i in range(steps):
            g = torch.autograd.grad(_task_loss(backbone, p, batch.support, t),
                                    [p[k] for k in fast_names], create_graph=True)
            p = {**p, **{k: p[k] - lr * gk for k, gk in zip(fast_names, g)}}
            total = total + weights[i] * _task_loss(backbone, p, batch.query, t) / n
    return total


def test_msl_outer_loss_is_the_weighted_sum_of_per_step_query_losses():
    algo = MAML(inner_steps=3, inner_lr=0.1, multi_step_loss=True, msl_epochs=4)
    backbone, model, batch = melu_setup(algo, n_tasks=4)
    algo.on_train_epoch_start(1, 10)
    weights = algo.step_loss_weights()
    assert len(set(weights)) == 2  # a non-trivial mixture
    loss, logs = algo.outer_loss(model, batch)
    ref = _msl_reference(backbone, batch, model.fast_names, 3, 0.1, weights)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    _assert_grads_equal(_grads(loss, backbone), _grads(ref, backbone))
    # The last step's query loss alone is plain MAML's outer loss.
    plain = MAML(inner_steps=3, inner_lr=0.1).outer_loss(model, batch)[0]
    torch.testing.assert_close(logs["final_query_loss"], plain.detach(), rtol=1e-10, atol=0)


def test_msl_runs_one_inner_loop_and_reads_its_trajectory(monkeypatch):
    algo = MAML(inner_steps=3, inner_lr=0.1, multi_step_loss=True)
    backbone, model, batch = melu_setup(algo, n_tasks=3)
    calls = []
    adapt = model.adapt

    def counting(*args, **kwargs):
        calls.append(kwargs.get("trajectory", False))
        return adapt(*args, **kwargs)

    monkeypatch.setattr(model, "adapt", counting)
    algo.outer_loss(model, batch)
    assert calls == [True]  # one (vmapped) inner loop for all steps' query losses


def test_msl_after_annealing_is_plain_maml_exactly():
    algo = MAML(inner_steps=3, inner_lr=0.1, multi_step_loss=True, msl_epochs=2)
    backbone, model, batch = melu_setup(algo)
    algo.on_train_epoch_start(2, 5)
    a = algo.outer_loss(model, batch)[0]
    b = MAML(inner_steps=3, inner_lr=0.1).outer_loss(model, batch)[0]
    assert torch.equal(a, b)
    _assert_grads_equal(_grads(a, backbone), _grads(b, backbone), exact=True)


# -- per-layer per-step learned rates (LSLR) ----------------------------------------------------

def test_lslr_rates_are_per_layer_per_step_and_receive_gradients():
    algo = MAML(inner_steps=3, inner_lr=0.05, per_layer_lr=True)
    backbone, model, batch = melu_setup(algo)
    rates = algo.layer_rates()
    assert set(rates) == set(model.fast_names) and len(rates) >= 4  # MeLU: decision + output
    for r in rates.values():
        assert r.shape == (3,)
        torch.testing.assert_close(r, torch.full_like(r, 0.05), rtol=0, atol=0)
    assert {f"layer_lrs.{n.replace('.', '__')}" for n in model.fast_names} == \
        set(algo.state_dict())
    loss, _ = algo.outer_loss(model, batch)
    loss.backward()
    for key, raw in algo.layer_lrs.items():
        assert raw.grad is not None and (raw.grad != 0).all(), key  # every layer, every step
    optimizer = torch.optim.SGD(algo.parameters(), lr=1e-2)
    before = {k: v.detach().clone() for k, v in algo.layer_lrs.items()}
    optimizer.step()
    assert all(not torch.equal(before[k], v) for k, v in algo.layer_lrs.items())


def test_lslr_rates_are_used_by_evaluation_and_reused_beyond_the_learned_steps():
    algo = MAML(inner_steps=2, inner_lr=0.05, per_layer_lr=True)
    backbone, model, batch = melu_setup(algo, n_tasks=3)
    with torch.no_grad():  # distinct rates per layer and per step
        for j, raw in enumerate(algo.layer_lrs.values()):
            raw.copy_(torch.tensor([0.01 * (j + 1), 0.02 * (j + 1)]))
    rates = {n: r.detach() for n, r in algo.layer_rates().items()}
    policy = FineTune(steps=4)  # two steps beyond the learned ones: they reuse step 2's rates
    policy.bind(algo)
    fast, slow = model.split()
    fast = {k: v.detach() for k, v in fast.items()}
    slow = {k: v.detach() for k, v in slow.items()}
    iterates = policy.adapt(model, fast, slow, batch.support)
    assert len(iterates) == 5
    for t in range(3):
        p = {**slow, **fast}
        for i in range(4):
            p = {k: v.detach().requires_grad_(k in fast) for k, v in p.items()}
            g = torch.autograd.grad(_task_loss(backbone, p, batch.support, t),
                                    [p[k] for k in fast])
            p = {**p, **{k: p[k] - rates[k][min(i, 1)] * gk for k, gk in zip(fast, g)}}
            for k in fast:
                torch.testing.assert_close(iterates[i + 1][k][t], p[k].detach(),
                                           rtol=1e-10, atol=1e-12)


def test_per_step_rates_keep_their_meaning_and_can_be_bounded():
    algo = MAML(inner_steps=3, inner_lr=0.05, learn_inner_lr=True, lr_bound="softplus")
    torch.testing.assert_close(algo.bounded(algo.step_lrs).double(),
                               torch.full((3,), 0.05, dtype=torch.float64), rtol=1e-6, atol=0)
    assert isinstance(algo.inner_rates(), torch.Tensor) and algo.inner_rates().shape == (3,)
    lslr = MAML(inner_steps=3, inner_lr=0.05, learn_inner_lr=True, per_layer_lr=True)
    assert lslr.step_lrs is None  # per_layer_lr subsumes the shared per-step rates


# -- derivative-order annealing -------------------------------------------------------------------

def test_derivative_order_annealing_switches_from_first_to_second_order():
    algo = MAML(inner_steps=3, inner_lr=0.1, first_order_epochs=2)
    backbone, model, batch = melu_setup(algo)
    first = MAML(inner_steps=3, inner_lr=0.1, first_order=True).outer_loss(model, batch)[0]
    second = MAML(inner_steps=3, inner_lr=0.1).outer_loss(model, batch)[0]
    g1, g2 = _grads(first, backbone), _grads(second, backbone)
    assert max((a - b).abs().max() for a, b in zip(g1, g2)) > 1e-6  # the orders differ
    for epoch, expected in [(0, g1), (1, g1), (2, g2), (7, g2)]:
        algo.on_train_epoch_start(epoch, 10)
        assert algo.first_order_now() == (epoch < 2)
        loss = algo.outer_loss(model, batch)[0]
        _assert_grads_equal(_grads(loss, backbone), expected, exact=True)


# -- inner gradient clipping ------------------------------------------------------------------------

def test_clip_grad_norm_bounds_the_global_norm_and_keeps_small_gradients():
    grads = {"a": torch.tensor([3.0, 0.0], dtype=torch.float64),
             "b": torch.tensor([[4.0]], dtype=torch.float64)}
    clipped = clip_grad_norm(grads, 1.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0], dtype=torch.float64))
    torch.testing.assert_close(clipped["b"], torch.tensor([[0.8]], dtype=torch.float64))
    same = clip_grad_norm(grads, 5.0 + 1e-9)
    assert all(torch.equal(same[k], grads[k]) for k in grads)
    zero = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(clip_grad_norm({"z": zero * 2}, 1.0)["z"].sum(), zero)
    assert torch.isfinite(g).all()  # differentiable at a zero gradient too


@pytest.mark.parametrize("cls", [MAML, MetaSGD])
def test_inner_grad_clip_bounds_every_steps_update_per_task(cls):
    lr, clip, steps = 0.5, 0.05, 4
    algo = cls(inner_steps=steps, inner_lr=lr, inner_grad_clip=clip)
    backbone, model, batch = melu_setup(algo)
    fast, slow = model.split()
    optimizer = algo.inner_optimizer()
    assert optimizer.max_grad_norm == clip
    iterates = model.adapt_tasks(fast, slow, batch.support, steps, optimizer, trajectory=True)
    free = model.adapt_tasks(fast, slow, batch.support, steps, cls(steps, lr).inner_optimizer()
                             if cls is MAML else SGD(lr), trajectory=True)
    clipped_steps = 0
    for i in range(steps):
        delta = torch.stack([(iterates[i + 1][k] - iterates[i][k]).flatten(1).pow(2).sum(1)
                             for k in fast]).sum(0).sqrt()
        assert (delta <= lr * clip * (1 + 1e-9)).all(), (i, delta)
        clipped_steps += int((delta > lr * clip * (1 - 1e-9)).sum())
    assert clipped_steps > 0
    # Step 1 unclipped moves further (the bound did something), and the norm is per task.
    free_delta = torch.stack([(free[1][k] - free[0][k]).flatten(1).pow(2).sum(1)
                              for k in fast]).sum(0).sqrt()
    assert (free_delta > lr * clip).any()
    for t in range(len(batch.users)):
        single = model.adapt(fast, slow, {k: v[t] for k, v in batch.support.items()}, steps,
                             optimizer)
        for k in fast:
            torch.testing.assert_close(iterates[-1][k][t], single[k], rtol=1e-9, atol=1e-12)


def test_inner_grad_clip_is_differentiable_and_a_loose_clip_changes_nothing():
    algo = MAML(inner_steps=3, inner_lr=0.1, inner_grad_clip=1e9)
    backbone, model, batch = melu_setup(algo)
    a = algo.outer_loss(model, batch)[0]
    b = MAML(inner_steps=3, inner_lr=0.1).outer_loss(model, batch)[0]
    assert torch.equal(a, b)
    _assert_grads_equal(_grads(a, backbone), _grads(b, backbone), exact=True)
    tight = MAML(inner_steps=3, inner_lr=0.1, inner_grad_clip=0.01).outer_loss(model, batch)[0]
    assert all(g is None or torch.isfinite(g).all() for g in _grads(tight, backbone))


# -- bounded learned rates ---------------------------------------------------------------------------

@pytest.mark.parametrize("cls,kwargs", [
    (MetaSGD, {}),
    (MAML, {"learn_inner_lr": True}),
    (MAML, {"per_layer_lr": True}),
])
def test_softplus_and_clamp_bounds_hold_and_start_at_inner_lr(cls, kwargs):
    for bound in ("softplus", "clamp"):
        extra = {"max_lr": 0.2} if bound == "clamp" else {}
        algo = cls(inner_steps=2, inner_lr=0.05, lr_bound=bound, **extra, **kwargs)
        backbone, model, batch = melu_setup(algo)
        raws = [p for n, p in algo.named_parameters()]
        assert raws

        def rates(algo=algo):
            lr = algo.inner_optimizer().lr
            if isinstance(lr, torch.Tensor):
                return [lr]
            if isinstance(lr, dict):
                return list(lr.values())
            return [torch.stack(list(step.values())) for step in lr]

        for r in rates():
            torch.testing.assert_close(r, torch.full_like(r, 0.05), rtol=1e-6, atol=0)  # f32 init
        loss = algo.outer_loss(model, batch)[0]
        assert all(g is not None and g.abs().sum() > 0 for g in torch.autograd.grad(loss, raws))
        for value in (-50.0, -1.0, 0.1, 3.0, 50.0):
            with torch.no_grad():
                for raw in raws:
                    raw.fill_(value)
            for r in rates():
                if bound == "softplus":
                    assert (r > 0).all()
                else:
                    assert ((r >= 0) & (r <= 0.2)).all()


def _k_shot(batch, k):
    batch.support["mask"] = batch.support["mask"] & (batch.support["mask"].cumsum(-1) <= k)
    return batch


def _adapted_query_losses(algo, model, batch):
    fast, slow = model.split()
    fast = {k: v.detach() for k, v in fast.items()}
    slow = {k: v.detach() for k, v in slow.items()}
    policy = FineTune()
    policy.bind(algo)
    with torch.no_grad():
        iterates = policy.adapt(model, fast, slow, batch.support)
        return model.loss_tasks(iterates[-1], slow, batch.query)


@pytest.mark.parametrize("raw,dtype,fixes", [
    # rates learned negative: the inner loop ascends until it is NaN
    (-5.0, torch.float64, [{"lr_bound": "softplus"}, {"lr_bound": "clamp", "max_lr": 0.1},
                           {"inner_grad_clip": 1.0}]),
    # rates learned far too large: the inner loop overshoots until it overflows (float32)
    (10.0, torch.float32, [{"lr_bound": "clamp", "max_lr": 0.1}, {"inner_grad_clip": 1.0}]),
])
def test_bounded_rates_or_inner_clipping_keep_an_exploding_metasgd_finite(raw, dtype, fixes):
    """melu + metasgd at K = 3 support ratings, with rates that diverge: the unbounded inner
    loop is non-finite for every user, each fix keeps every user's query loss finite."""
    for options in [{}, *fixes]:
        algo = MetaSGD(inner_steps=20, inner_lr=0.05, **options)
        backbone, model, batch = melu_setup(algo)
        backbone.to(dtype)
        algo.to(dtype)
        for side in (batch.support, batch.query):
            for key, value in side.items():
                if value.is_floating_point():
                    side[key] = value.to(dtype)
        _k_shot(batch, 3)
        with torch.no_grad():
            for r in algo.rates.values():
                r.fill_(raw)
        losses = _adapted_query_losses(algo, model, batch)
        if options:
            assert torch.isfinite(losses).all(), (options, losses)
        else:
            assert not torch.isfinite(losses).any(), losses


@pytest.mark.parametrize("kwargs,match", [
    ({"learn_inner_lr": True, "lr_bound": "clamp"}, "max_lr"),
    ({"learn_inner_lr": True, "max_lr": 1.0}, "max_lr"),
    ({"learn_inner_lr": True, "lr_bound": "clamp", "max_lr": 0.01}, "above max_lr"),
    ({"lr_bound": "softplus"}, "learned inner rates"),
    ({"lr_bound": "sigmoid", "learn_inner_lr": True}, "lr_bound"),
    ({"first_order": True, "first_order_epochs": 3}, "first_order_epochs"),
    ({"inner_steps": 0, "multi_step_loss": True}, "inner_steps >= 1"),
    ({"msl_epochs": 0}, "msl_epochs"),
    ({"inner_grad_clip": 0.0}, "inner_grad_clip"),
])
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MAML(**{"inner_lr": 0.05, **kwargs})


# -- defaults: exactly as before ----------------------------------------------------------------------

def _old_maml_loss(model, batch, steps, lr):
    """MAML's outer loss as it was computed before the MAML++ options."""
    fast, slow = model.split()

    def query_loss(support, query):
        adapted = model.adapt(fast, slow, support, steps, SGD(lr))
        return model.loss(adapted, slow, query)

    return vmap(query_loss, randomness="different")(batch.support, batch.query).mean()


def test_defaults_are_exactly_the_old_maml_at_every_epoch():
    algo = MAML(inner_steps=3, inner_lr=0.1)
    assert algo.state_dict() == {} and list(algo.parameters()) == []
    assert (algo.multi_step_loss, algo.per_layer_lr, algo.first_order_epochs,
            algo.inner_grad_clip, algo.lr_bound, algo.max_lr) == (False, False, 0, None, None, None)
    backbone, model, batch = melu_setup(algo)
    old = _old_maml_loss(model, batch, 3, 0.1)
    g_old = _grads(old, backbone)
    for epoch in (0, 1, 50):
        algo.on_train_epoch_start(epoch, 60)
        loss, logs = algo.outer_loss(model, batch)
        assert torch.equal(loss, old) and logs == {}
        _assert_grads_equal(_grads(loss, backbone), g_old, exact=True)
    optimizer = algo.inner_optimizer()
    assert optimizer.lr == 0.1 and optimizer.max_grad_norm is None


def test_old_learned_rate_checkpoints_load_and_mean_the_same():
    # A learn_inner_lr / metasgd state dict holds the rates themselves (no bound): unchanged.
    algo = MAML(inner_steps=3, inner_lr=0.05, learn_inner_lr=True)
    assert set(algo.state_dict()) == {"step_lrs"}
    old = {"step_lrs": torch.tensor([0.01, 0.02, 0.03])}
    algo.load_state_dict(old, strict=True)
    assert torch.equal(algo.inner_optimizer().lr, old["step_lrs"])
    msgd = MetaSGD(inner_steps=1, inner_lr=0.05)
    backbone, model, batch = melu_setup(msgd)
    assert set(msgd.state_dict()) == {f"rates.{n.replace('.', '__')}" for n in model.fast_names}
    state = {k: torch.rand_like(v) for k, v in msgd.state_dict().items()}
    msgd.load_state_dict(state, strict=True)
    lr = msgd.inner_optimizer().lr
    assert all(torch.equal(lr[n], state[f"rates.{n.replace('.', '__')}"]) for n in lr)


def test_shipped_maml_recipes_keep_the_defaults():
    import yaml

    from metarec import build

    for name in ("melu-maml", "mf-maml", "melu-metasgd"):
        recipe = yaml.safe_load((REPO / "recipes" / "movielens-100k" / f"{name}.yaml").read_text())
        model = recipe["model"]
        algo = build("algorithms", model["algorithm"], model["algorithm_args"])
        assert not algo.multi_step_loss and not algo.per_layer_lr
        assert algo.first_order_epochs == 0 and algo.inner_grad_clip is None
        assert algo.lr_bound is None


def test_mamlpp_options_through_the_cli_follow_the_epochs(in_tmp):
    """A two-epoch fit: the Lightning module's hook drives the epoch, rates are optimised."""
    from metarec.cli import MetarecCLI

    cli = MetarecCLI(args=["--config", str(REPO / "recipes" / "quickstart.yaml"),
                           "--model.algorithm_args",
                           '{"inner_steps": 2, "inner_lr": 0.05, "multi_step_loss": true, '
                           '"msl_epochs": 1, "per_layer_lr": true, "first_order_epochs": 1, '
                           '"inner_grad_clip": 10.0, "lr_bound": "softplus"}',
                           "--trainer.logger", "false", "--trainer.max_epochs", "2",
                           "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches",
                           "1", "--trainer.enable_progress_bar", "false",
                           "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"],
                     run=False)
    algo = cli.model.algorithm
    before = {k: v.detach().clone() for k, v in algo.layer_lrs.items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert algo.epoch == 1 and not algo.first_order_now() and algo.step_loss_weights() is None
    assert all(not torch.equal(before[k], v.detach()) for k, v in algo.layer_lrs.items())
    # The learned rates are checkpointed and an adapter rebuilt from it adapts with them.
    from metarec import Adapter

    cli.trainer.save_checkpoint(in_tmp / "mamlpp.ckpt")
    adapter = Adapter.from_checkpoint(in_tmp / "mamlpp.ckpt")
    loaded = adapter.model.algorithm
    assert loaded.per_layer_lr and loaded.lr_bound == "softplus" and loaded.inner_grad_clip == 10
    for name, rate in algo.layer_rates().items():
        assert torch.equal(loaded.layer_rates()[name], rate.detach())
