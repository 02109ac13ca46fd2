"""LazyAdam: dense Adam on dense gradients, lazy (row-wise) Adam on sparse ones; and the
transformer's sparse item-table gradient equals the dense one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metarec.optim import LazyAdam
from tests.test_transformer import batch, functional, make, schema, setup  # noqa: F401


def _run(model_fn, opt_fn, steps=6, seed=0, rows=None):
    torch.manual_seed(seed)
    model = model_fn()
    opt = opt_fn(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = rows if rows is not None else torch.randint(0, 50, (7,), generator=gen)
        loss = (model(ids) ** 2).sum() + model(ids).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_dense_gradients_follow_torch_adam(decay):
    make_model = lambda: nn.Sequential(nn.Embedding(50, 4), nn.Linear(4, 3))  # noqa: E731
    ours = _run(make_model, lambda p: LazyAdam(p, lr=0.05, weight_decay=decay))
    ref = _run(make_model, lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=decay))
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_sparse_gradients_follow_torch_sparse_adam_and_leave_other_rows_alone():
    make_model = lambda: nn.Embedding(50, 4, sparse=True)  # noqa: E731
    # SparseAdam adds eps to sqrt(v) before bias correction, Adam (and LazyAdam) after it:
    # with a negligible eps the two rules coincide.
    ours = _run(make_model, lambda p: LazyAdam(p, lr=0.05, eps=1e-14))
    ref = _run(make_model, lambda p: torch.optim.SparseAdam(list(p), lr=0.05, eps=1e-14))
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-6, atol=1e-7)
    # Rows never read keep their initial values (a dense Adam would move nothing either, but
    # rows read once and then not again would keep drifting under dense Adam; lazily they stop).
    torch.manual_seed(0)
    start = nn.Embedding(50, 4).weight.detach()
    only = torch.tensor([3, 7])
    model = _run(lambda: nn.Embedding(50, 4, sparse=True), lambda p: LazyAdam(p, lr=0.05),
                 rows=only)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[only] = False
    assert torch.equal(model.weight[untouched], start[untouched])
    assert not torch.equal(model.weight[only], start[only])


def test_rows_touched_every_step_follow_dense_adam():
    rows = torch.arange(50)
    sparse = _run(lambda: nn.Embedding(50, 4, sparse=True), lambda p: LazyAdam(p, lr=0.05),
                  rows=rows)
    dense = _run(lambda: nn.Embedding(50, 4), lambda p: torch.optim.Adam(p, lr=0.05), rows=rows)
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-6, atol=1e-7)


def test_rejects_bad_hyperparameters():
    p = [nn.Parameter(torch.zeros(2))]
    for kwargs in ({"lr": 0.0}, {"eps": 0.0}, {"betas": (0.9, 1.0)}, {"weight_decay": -1.0}):
        with pytest.raises(ValueError, match="LazyAdam"):
            LazyAdam(p, **kwargs)


def test_transformer_sparse_item_gradient_equals_the_dense_one(schema, batch):  # noqa: F811
    """Second-order MAML through the vmapped inner loop: the sparse gradient of the item table
    (only the rows the batch read) densifies to exactly the dense gradient."""
    from metarec_plugins.algorithms.maml import MAML

    grads = {}
    for sparse in (False, True):
        backbone = make(schema, sparse_item_gradients=sparse)
        model = functional(backbone)
        algorithm = MAML(inner_steps=2, inner_lr=0.1)
        algorithm.bind(model)
        loss, _ = algorithm.outer_loss(model, batch)
        loss.backward()
        grads[sparse] = {n: p.grad for n, p in backbone.named_parameters()}
    table = "item_embedding.weight"
    assert grads[True][table].is_sparse and not grads[False][table].is_sparse
    read = grads[True][table].coalesce().indices()[0]
    assert len(read) < schema.num_items  # only the rows the batch read
    torch.testing.assert_close(grads[True][table].to_dense(), grads[False][table])
    for name, g in grads[False].items():
        if name != table:
            torch.testing.assert_close(grads[True][name], g)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_sparse_gradients_equals_clipping_their_dense_form(algorithm):
    from metarec.optim import clip_gradients

    grads = {}
    for sparse in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(10, 3, sparse=sparse), nn.Linear(3, 1))
        (model(torch.tensor([1, 1, 4])) ** 2).sum().mul(10).backward()
        if sparse:
            clip_gradients(model.parameters(), 0.3, algorithm)
        elif algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        else:
            torch.nn.utils.clip_grad_value_(model.parameters(), 0.3)
        grads[sparse] = [p.grad.to_dense() if p.grad.is_sparse else p.grad
                         for p in model.parameters()]
    clipped = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads[False]]))
    assert clipped <= 0.3 + 1e-6 if algorithm == "norm" else grads[False][0].abs().max() <= 0.3
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b)


def test_scale_recipe_style_fit_with_sparse_gradients_and_clipping(in_tmp):
    """A small sparse-gradient transformer with LazyAdam and gradient clipping trains from the
    CLI (torch's own clipping raises on sparse gradients)."""
    from conftest import REPO
    from metarec.cli import MetarecCLI

    cli = MetarecCLI(args=[
        "fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--trainer.max_steps", "2",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.gradient_clip_val", "0.01",
        "--model.backbone", "transformer",
        "--model.backbone_args", "{dim: 8, layers: 1, heads: 2, sparse_item_gradients: true}",
        "--model.optimizer", "{class_path: metarec.optim.LazyAdam, init_args: {lr: 0.01}}",
        "--data.history_length", "4", "--data.dataset_args", "{num_users: 120, num_items: 60}"])
    assert cli.trainer.global_step == 2
    assert cli.model.backbone.item_embedding.sparse
