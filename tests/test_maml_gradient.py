"""MAML's meta-gradient against an independent per-task unrolled reference (plain autograd)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from conftest import synthetic_batch
from metarec import FunctionalModel
from metarec.functional import select_parameters
from metarec_plugins.algorithms.fomaml import FOMAML
from metarec_plugins.algorithms.maml import MAML
from metarec_plugins.backbones.melu import MeLU


def _model(table, seed=0):
    torch.manual_seed(seed)
    backbone = MeLU(table.schema, embedding_dim=4, hidden=(8, 6)).double()
    fast = select_parameters(backbone, backbone.default_fast_parameters())
    return backbone, FunctionalModel(backbone, fast, "explicit")


def _reference_meta_grad(backbone, batch, steps, lr, first_order):
    """Per-task loop, written with torch.autograd.grad only (no torch.func, no vmap)."""
    params = dict(backbone.named_parameters())
    fast_names = [n for n in params if n.startswith(("decision", "output"))]
    total = 0.0
    n_tasks = len(batch.users)

    def task_loss(p, side, t):
        x = {k: v[t] for k, v in side.items() if k not in ("label", "mask", "time")}
        pred = functional_call(backbone, p, (x,))
        m = side["mask"][t].double()
        return (((pred - side["label"][t]) ** 2) * m).sum() / m.sum()

    for t in range(n_tasks):
        p = dict(params)
        for _ in range(steps):
            loss = task_loss(p, batch.support, t)
            grads = torch.autograd.grad(loss, [p[n] for n in fast_names],
                                        create_graph=not first_order)
            p = {**p, **{n: p[n] - lr * g for n, g in zip(fast_names, grads)}}
        total = total + task_loss(p, batch.query, t) / n_tasks
    return total, torch.autograd.grad(total, list(params.values()), allow_unused=True)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_unrolled_reference(first_order):
    table, batch = synthetic_batch(n_tasks=5)
    backbone, model = _model(table)
    algo = (FOMAML if first_order else MAML)(inner_steps=3, inner_lr=0.1)
    loss, _ = algo.outer_loss(model, batch)
    ours = torch.autograd.grad(loss, list(backbone.parameters()), allow_unused=True)
    ref_loss, ref = _reference_meta_grad(backbone, batch, 3, 0.1, first_order)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-7, atol=1e-9)
    checked = 0
    for (name, _), a, b in zip(backbone.named_parameters(), ours, ref):
        a = torch.zeros_like(b) if a is None else a
        assert b is not None, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8, msg=name)
        checked += int(b.abs().sum() > 0)
    assert checked >= 6  # embeddings and decision layers all receive a meta-gradient


def test_second_and_first_order_differ():
    """The second-order terms are really there: FOMAML's meta-gradient is different."""
    table, batch = synthetic_batch(n_tasks=4)
    backbone, model = _model(table)
    g2 = torch.autograd.grad(MAML(3, 0.1).outer_loss(model, batch)[0],
                             backbone.decision[0].weight)[0]
    g1 = torch.autograd.grad(FOMAML(3, 0.1).outer_loss(model, batch)[0],
                             backbone.decision[0].weight)[0]
    assert (g2 - g1).abs().max() > 1e-6


def test_vmapped_batch_equals_loop_of_single_tasks():
    table, batch = synthetic_batch(n_tasks=6)
    backbone, model = _model(table)
    fast, slow = model.split()
    algo = MAML(inner_steps=2, inner_lr=0.1)
    batched = model.adapt_tasks(fast, slow, batch.support, 2, algo.inner_optimizer())
    for t in range(6):
        # The single task, trimmed of its own padding, adapted without vmap.
        n = int(batch.support["mask"][t].sum())
        support = {k: v[t, :n] for k, v in batch.support.items()}
        single = model.adapt(fast, slow, support, 2, algo.inner_optimizer())
        for k in fast:
            torch.testing.assert_close(batched[k][t], single[k], rtol=1e-6, atol=1e-9)


def test_encoding_once_per_task_changes_nothing_but_speed():
    """MeLU's embeddings are slow: they are encoded once per task, not at every inner step."""
    table, batch = synthetic_batch(n_tasks=4)
    backbone, model = _model(table)
    assert model.encodes
    loss, _ = MAML(3, 0.1).outer_loss(model, batch)
    grads = torch.autograd.grad(loss, list(backbone.parameters()))
    model.encodes = False
    ref_loss, _ = MAML(3, 0.1).outer_loss(model, batch)
    ref = torch.autograd.grad(ref_loss, list(backbone.parameters()))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # With every parameter fast (e.g. Reptile's ["*"]) the encoder is adapted: no caching.
    everything = FunctionalModel(backbone, [n for n, _ in backbone.named_parameters()], "explicit")
    assert not everything.encodes
