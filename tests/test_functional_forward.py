"""MeLU's ``functional_forward`` (the fast path of ``FunctionalModel.predict``) is bit-identical
to ``functional_call`` of its forward, and steps aside when a layer is wrapped."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from conftest import synthetic_batch
from metarec import FunctionalModel, select_parameters
from metarec.data.episodes import to_bags
from metarec_plugins.backbones.lora import add_lora
from metarec_plugins.backbones.melu import MeLU


def _melu(schema, hidden=(8, 6), double=True, **kwargs):
    """A small seeded MeLU and its FunctionalModel on the default fast parameters."""
    torch.manual_seed(0)
    melu = MeLU(schema, embedding_dim=4, hidden=hidden, **kwargs)
    melu = melu.double() if double else melu
    return melu, FunctionalModel(melu, select_parameters(melu, melu.default_fast_parameters()),
                                 "explicit")


@pytest.mark.parametrize("use_ids", [False, True])
@pytest.mark.parametrize("bags", [False, True])
def test_functional_forward_is_bit_identical(use_ids, bags):
    table, batch = synthetic_batch(n_tasks=4)
    melu, model = _melu(table.schema, use_ids=use_ids)
    x = {k: v for k, v in batch.query.items() if k not in ("label", "mask", "time")}
    if bags:
        for spec in table.schema.features:
            if spec.kind == "multihot":
                v = x[spec.key]
                x[spec.key] = to_bags(v.reshape(-1, v.shape[-1])).reshape(*v.shape[:-1], -1)
    params = dict(melu.named_parameters())
    assert torch.equal(melu.functional_forward(params, x), functional_call(melu, params, (x,)))
    encoded = {**x, "_encoded": melu.encode(x)}
    assert torch.equal(melu.functional_forward(params, encoded), melu(encoded))
    # Gradients under vmap (per-task parameters) agree too.
    fast, slow = model.split()
    per_task = {k: v.detach().expand(4, *v.shape).clone() for k, v in fast.items()}
    support = {**batch.support}

    def loss(f, side, pure):
        if not pure:
            return model.loss.__func__(_NoFast(model), f, slow, side)
        return model.loss(f, slow, side)
    ours = vmap(grad(lambda f, s: loss(f, s, True)))(per_task, support)
    ref = vmap(grad(lambda f, s: loss(f, s, False)))(per_task, support)
    for k in ours:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-14)


def test_the_pure_encoder_equals_the_encode_only_forward():
    """``prepare`` encodes through ``functional_forward(..., encode_only=True)``: the same
    encoding as the module's ``forward(encode_only=True)``, from the slow parameters alone."""
    table, batch = synthetic_batch(n_tasks=3)
    melu, model = _melu(table.schema, use_ids=True)
    fast, slow = model.split()
    x = {k: v for k, v in batch.support.items() if k not in ("label", "mask", "time")}
    prepared = model.prepare(slow, batch.support)
    assert torch.equal(prepared["_encoded"], melu(x, encode_only=True))
    assert torch.equal(model.predict(fast, slow, prepared), model.predict(fast, slow,
                                                                         batch.support))


class _NoFast:
    """A FunctionalModel stand-in whose backbone hides functional_forward."""

    def __init__(self, model):
        self._model = model
        self.feedback = model.feedback

    def predict(self, fast, slow, batch):
        from metarec.data.episodes import inputs
        return functional_call(self._model.backbone, {**slow, **fast}, (inputs(batch),))


def test_wrapped_layers_fall_back_to_functional_call():
    table, batch = synthetic_batch(n_tasks=2)
    torch.manual_seed(0)
    melu = MeLU(table.schema, embedding_dim=4, hidden=(8, 6)).double()
    add_lora(melu, ["decision.0"], rank=2)
    x = {k: v for k, v in batch.query.items() if k not in ("label", "mask", "time")}
    assert melu.functional_forward(dict(melu.named_parameters()), x) is NotImplemented
    model = FunctionalModel(melu, ["decision.0.lora_A", "decision.0.lora_B"], "explicit")
    fast, slow = model.split()
    assert torch.equal(model.predict(fast, slow, batch.query), melu(x))


def test_first_order_single_task_plain_autograd_equals_functorch(monkeypatch):
    """A batch of one task adapts first-order by plain ``torch.autograd.grad`` (no functorch
    wrapping, the deployed-user path): the same iterates as ``torch.func.grad`` under vmap, a
    zero gradient for a fast parameter the loss does not use, and the update stays
    differentiable with respect to the start (FOMAML's outer gradient)."""
    import metarec.functional as functional
    from metarec import SGD, vmap_tasks

    table, batch = synthetic_batch(n_tasks=1)
    melu, model = _melu(table.schema)
    fast, slow = model.split()
    fast = {**fast, "unused": torch.ones(3, dtype=torch.float64, requires_grad=True)}
    calls = []
    real = functional._first_order_grad
    monkeypatch.setattr(functional, "_first_order_grad",
                        lambda objective: calls.append(1) or real(objective))

    def run(single: bool):
        adapt = lambda task: model.adapt(fast, slow, task, 3, SGD(0.1),  # noqa: E731
                                         first_order=True, trajectory=True)
        return vmap_tasks(adapt)(batch.support) if single else vmap(adapt)(batch.support)

    plain, ref = run(True), run(False)
    assert calls == [1]  # the plain path ran once (one task), functorch's under vmap
    for a, b in zip(plain, ref):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12)
    assert torch.equal(plain[-1]["unused"], fast["unused"].unsqueeze(0))  # zero gradient
    outer = model.loss_tasks(plain[-1], slow, batch.query).sum()
    grads = torch.autograd.grad(outer, [v for k, v in fast.items() if k != "unused"])
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("tasks", [1, 3])  # one task: the plain-autograd path; three: vmapped
@pytest.mark.parametrize("custom", [False, True])
def test_support_losses_are_the_iterates_support_losses(tasks, custom):
    """``adapt(support_losses=True)`` returns every iterate's support loss (what the guard
    reads): the values the default objective's gradients were taken at, or, under another
    inner objective, the support loss computed beside it."""
    from metarec import SGD, vmap_tasks

    table, batch = synthetic_batch(n_tasks=tasks)
    melu, model = _melu(table.schema)
    fast, slow = model.split()
    fast = {k: v.detach() for k, v in fast.items()}
    objective = None
    if custom:  # a proximal term: not the support loss
        objective = lambda f, b: model.loss(f, slow, b) + sum(  # noqa: E731
            ((f[k] - fast[k]) ** 2).sum() for k in f)
    iterates, losses = vmap_tasks(lambda task: model.adapt(
        fast, slow, task, 3, SGD(0.5), objective=objective, first_order=True,
        trajectory=True, support_losses=True))(batch.support)
    assert losses.shape == (tasks, 4)
    expected = torch.stack([model.loss_tasks(f, slow, batch.support) for f in iterates], 1)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    assert len({round(float(v), 9) for v in losses[0]}) == 4  # the steps moved the loss


def test_compiled_inner_steps_equal_eager():
    """The inner loop under ``torch.compile`` (what ``Adapter(compile=True)`` runs) gives the
    eager iterates: a guard against Inductor miscompiling the SGD step (it computes ``add``'s
    ``alpha`` wrongly after ``grad_and_value`` in torch 2.13)."""
    from metarec import SGD

    table, batch = synthetic_batch(n_tasks=1)
    melu, model = _melu(table.schema, hidden=(8,), double=False)
    fast, slow = model.split()
    fast = {k: v.detach() for k, v in fast.items()}
    slow = {k: v.detach() for k, v in slow.items()}
    task = {k: v[0] for k, v in batch.support.items()}
    run = lambda task: model.adapt(fast, slow, task, 3, SGD(0.1),  # noqa: E731
                                   first_order=True, support_losses=True)
    with torch.no_grad():
        eager = run(task)
        compiled = torch.compile(run, dynamic=False)(task)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-6)
    for k in fast:
        torch.testing.assert_close(compiled[0][k], eager[0][k], rtol=1e-5, atol=1e-6)
