"""The meta-algorithm suite against hand-computed references and their papers' definitions."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from conftest import REPO, melu_setup
from metarec_plugins.algorithms.anil import ANIL
from metarec_plugins.algorithms.maml import MAML
from metarec_plugins.algorithms.metasgd import MetaSGD
from metarec_plugins.algorithms.reptile import Reptile
from metarec_plugins.policies.finetune import FineTune


def _setup(algorithm, n_tasks=4, seed=0):
    return melu_setup(algorithm, n_tasks, seed)


def _task_loss(backbone, params, side, t):
    x = {k: v[t] for k, v in side.items() if k not in ("label", "mask", "time")}
    m = side["mask"][t].double()
    return (((functional_call(backbone, params, (x,)) - side["label"][t]) ** 2) * m).sum() / m.sum()


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_reptile_outer_step_is_interpolation_toward_mean_adapted(inner):
    eps, lr, steps = 0.3, 0.05, 3
    algo = Reptile(inner_steps=steps, inner_lr=lr, inner_optimizer=inner, fast_parameters=["*"])
    backbone, model, batch = _setup(algo)
    theta = {k: v.detach().clone() for k, v in backbone.named_parameters()}
    # By hand: per task, `steps` steps of SGD or Adam(beta1=0, beta2=0.999) on all parameters.
    phis = []
    for t in range(len(batch.users)):
        p = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        v2 = {k: torch.zeros_like(x) for k, x in p.items()}
        for i in range(steps):
            grads = torch.autograd.grad(_task_loss(backbone, p, batch.support, t), list(p.values()))
            new = {}
            for (k, x), g in zip(p.items(), grads):
                if inner == "sgd":
                    new[k] = x - lr * g
                else:
                    v2[k] = 0.999 * v2[k] + 0.001 * g * g
                    new[k] = x - lr * g / ((v2[k] / (1 - 0.999 ** (i + 1))).sqrt() + 1e-8)
            p = {k: x.detach().requires_grad_(True) for k, x in new.items()}
        phis.append({k: x.detach() for k, x in p.items()})
    expected = {k: theta[k] + eps * (torch.stack([phi[k] for phi in phis]).mean(0) - theta[k])
                for k in theta}
    optimizer = torch.optim.SGD(backbone.parameters(), lr=eps)
    loss, _ = algo.outer_loss(model, batch)
    loss.backward()
    optimizer.step()
    moved = 0
    for k, v in backbone.named_parameters():
        torch.testing.assert_close(v.detach(), expected[k], rtol=1e-6, atol=1e-9, msg=k)
        moved += int(not torch.equal(v.detach(), theta[k]))
    assert moved == len(theta)


def test_reptile_trains_parameters_outside_the_fast_set():
    algo = Reptile(inner_steps=2, inner_lr=0.05)  # default partition: embeddings are slow
    backbone, model, batch = _setup(algo)
    loss, logs = algo.outer_loss(model, batch)
    loss.backward()
    assert "query_loss" in logs
    emb = next(p for n, p in backbone.named_parameters() if n.startswith("embeddings"))
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_metasgd_rates_receive_gradients_and_change():
    algo = MetaSGD(inner_steps=2, inner_lr=0.05)
    backbone, model, batch = _setup(algo)
    assert set(algo._names) == set(model.fast_names)
    for name, key in algo._names.items():
        assert algo.rates[key].shape == dict(backbone.named_parameters())[name].shape
    before = {k: v.detach().clone() for k, v in algo.rates.items()}
    optimizer = torch.optim.Adam(list(backbone.parameters()) + list(algo.parameters()), lr=1e-2)
    loss, _ = algo.outer_loss(model, batch)
    loss.backward()
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in algo.rates.values())
    optimizer.step()
    assert all(not torch.equal(before[k], v) for k, v in algo.rates.items())


def test_metasgd_with_frozen_rates_equals_maml():
    msgd, maml = MetaSGD(inner_steps=3, inner_lr=0.05), MAML(inner_steps=3, inner_lr=0.05)
    backbone, model, batch = _setup(msgd)
    for rate in msgd.rates.values():
        rate.requires_grad_(False)
    a = msgd.outer_loss(model, batch)[0]
    ga = torch.autograd.grad(a, list(backbone.parameters()))
    b = maml.outer_loss(model, batch)[0]
    gb = torch.autograd.grad(b, list(backbone.parameters()))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_anil_adapts_only_the_head():
    algo = ANIL(inner_steps=3, inner_lr=0.1)
    backbone, model, batch = _setup(algo)
    assert model.fast_names == ("output.weight", "output.bias")
    fast, slow = model.split()
    policy = FineTune()
    policy.bind(algo)
    iterates = policy.adapt(model, fast, slow, batch.support)
    assert len(iterates) == 4 and set(iterates[-1]) == set(model.fast_names)
    assert not torch.equal(iterates[-1]["output.weight"][0], fast["output.weight"])
    # The body is learned by the outer loop only: it gets a meta-gradient, never an inner step.
    loss, _ = algo.outer_loss(model, batch)
    loss.backward()
    assert backbone.decision[0].weight.grad.abs().sum() > 0


def test_anil_body_is_bit_identical_after_adaptation_through_the_cli(in_tmp):
    from metarec.cli import MetarecCLI

    cli = MetarecCLI(args=["--config", str(REPO / "recipes" / "quickstart.yaml"),
                           "--model.algorithm", "anil", "--trainer.logger", "false",
                           "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
                           "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"],
                     run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    model = cli.model
    batch = next(iter(cli.datamodule.val_dataloader()))
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    iterates = model.adapt(batch)
    final = iterates[-1]
    assert set(final) == {"output.weight", "output.bias"}
    assert not torch.equal(final["output.weight"][0], before["output.weight"])  # the head moved
    for name, p in model.backbone.named_parameters():
        assert torch.equal(p, before[name]), name  # the module itself is never written


def test_maml_learned_per_step_inner_lr_trains():
    algo = MAML(inner_steps=3, inner_lr=0.05, learn_inner_lr=True)
    backbone, model, batch = _setup(algo)
    loss, _ = algo.outer_loss(model, batch)
    loss.backward()
    assert algo.step_lrs.grad is not None and (algo.step_lrs.grad != 0).all()
