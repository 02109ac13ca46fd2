"""learn2learn interop: the `l2l` plugin against metarec's own algorithms (run by make test-l2l)."""

from __future__ import annotations

import pytest
import torch

from conftest import synthetic_batch
from metarec import FunctionalModel, select_parameters
from metarec_plugins.algorithms.maml import MAML
from metarec_plugins.algorithms.metasgd import MetaSGD
from metarec_plugins.backbones.melu import MeLU

pytest.importorskip("learn2learn", reason="learn2learn is not installed here; `make test-l2l` "
                                          "builds its venv and runs these tests there")
from metarec_plugins.algorithms.l2l import L2L  # noqa: E402


def _grads(algorithm, first_order=False):
    table, batch = synthetic_batch(n_tasks=5)
    torch.manual_seed(0)
    backbone = MeLU(table.schema, embedding_dim=4, hidden=(8, 6)).double()
    model = FunctionalModel(backbone, select_parameters(backbone, algorithm.select_fast(backbone)),
                            "explicit")
    algorithm.double()
    algorithm.bind(model)
    loss, _ = algorithm.outer_loss(model, batch)
    return loss, torch.autograd.grad(loss, list(backbone.parameters()))


@pytest.mark.parametrize("first_order", [False, True])
def test_l2l_maml_meta_gradient_equals_metarec_maml(first_order):
    ours_loss, ours = _grads(MAML(inner_steps=3, inner_lr=0.1, first_order=first_order))
    l2l_loss, theirs = _grads(L2L("maml", inner_steps=3, inner_lr=0.1, first_order=first_order))
    torch.testing.assert_close(l2l_loss, ours_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_l2l_metasgd_meta_gradient_equals_metarec_metasgd():
    ours_loss, ours = _grads(MetaSGD(inner_steps=2, inner_lr=0.1))
    l2l_loss, theirs = _grads(L2L("metasgd", inner_steps=2, inner_lr=0.1))
    torch.testing.assert_close(l2l_loss, ours_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
