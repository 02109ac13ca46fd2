"""The item cold-start models' key computations on hand-worked small cases: DropoutNet's input
dropout, MetaEmb's cold + warm-up loss, LWA's and NLBA's class representatives and adapted
weights/biases."""

from __future__ import annotations

import pytest
import torch

from conftest import item_task_batch
from metarec import DataSchema, FunctionalModel, select_parameters
from metarec.schema import FeatureSpec
from metarec_plugins.algorithms.metaemb import MetaEmb
from metarec_plugins.backbones.dropoutnet import DropoutNet
from metarec_plugins.backbones.lwa import LWA, class_representatives
from metarec_plugins.backbones.mf import MatrixFactorization
from metarec_plugins.backbones.nlba import NLBA

IMPLICIT = DataSchema(num_users=3, num_items=2, feedback="implicit", rating_range=None,
                      task_by="item")


def test_dropoutnet_drops_the_cold_preference_in_training_only():
    net = DropoutNet(IMPLICIT, embedding_dim=2, hidden=(), out_dim=2, dropout=1.0)
    assert net.cold_side == "item" and net.default_fast_parameters() == ["task_preference"]
    assert torch.count_nonzero(net.item_preference.weight) == 0  # new items: the cold input
    with torch.no_grad():
        for tower in (net.user_tower, net.item_tower):
            tower[1].weight.copy_(torch.eye(2))
            tower[1].bias.zero_()
        net.user_preference.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]]))
        net.item_preference.weight.copy_(torch.tensor([[0.5, 0.5], [2.0, 0.0]]))
        net.task_preference.copy_(torch.tensor([1.0, 0.0]))
        net.bias.fill_(0.25)
    x = {"user_id": torch.tensor([0, 2]), "item_id": torch.tensor([1, 1])}
    net.eval()  # score = b + <U_u, V_i + delta>: V_1 + delta = (3, 0)
    assert net(x).tolist() == [0.25 + 3.0, 0.25 + 9.0]
    net.train()  # dropout 1: V_i dropped, only the fast offset (1, 0) is left
    assert net(x).tolist() == [0.25 + 1.0, 0.25 + 3.0]
    net.dropout = 0.5
    torch.manual_seed(0)
    many = {"user_id": torch.zeros(2000, dtype=torch.long), "item_id": torch.ones(2000, dtype=torch.long)}
    dropped = (net(many) == 0.25 + 1.0).float().mean()
    assert 0.45 < float(dropped) < 0.55


def _item_batch():
    return item_task_batch()


def test_metaemb_loss_is_cold_plus_one_step_warm():
    schema = DataSchema(num_users=3, num_items=2, feedback="implicit", rating_range=None,
                        task_by="item", features=(FeatureSpec("genre", "item", "categorical", 2),))
    torch.manual_seed(0)
    mf = MatrixFactorization(schema, embedding_dim=2, item_features=False).double()
    algo = MetaEmb(inner_steps=1, inner_lr=0.5, alpha=0.25, embedding_dim=3, hidden=(4,))
    model = FunctionalModel(mf, select_parameters(mf, algo.select_fast(mf)), "implicit")
    algo.bind(model)
    algo.double()
    assert not any(p.requires_grad for p in mf.parameters())  # the backbone is frozen
    with torch.no_grad():
        algo.out.weight.normal_()
    batch = _item_batch()
    loss, logs = algo.outer_loss(model, batch)
    # By hand, per task: phi = default + g(x); L_a on the support; one SGD step; L_b on query.
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = []
    for t in range(2):
        sup = {k: v[t] for k, v in batch.support.items()}
        qry = {k: v[t] for k, v in batch.query.items()}
        g = algo.generate(sup)
        row = mf.item_default + g["item_default"]
        bias = mf.item_default_bias + g["item_default_bias"]

        def score(side, row=row, bias=bias):
            u = side["user_id"]
            return (mf.global_bias + mf.user_bias(u).squeeze(-1) + bias
                    + (mf.user_embedding(u) * row).sum(-1))

        def masked(s, side):
            m = side["mask"].double()
            return (bce(s, side["label"], reduction="none") * m).sum() / m.sum()

        cold = masked(score(sup), sup)
        grow, gbias = torch.autograd.grad(cold, (row, bias), create_graph=True)
        warm = masked(score(qry, row - 0.5 * grow, bias - 0.5 * gbias), qry)
        expected.append((cold, warm))
    cold = sum(c for c, _ in expected) / 2
    warm = sum(w for _, w in expected) / 2
    assert float(loss) == pytest.approx(float(0.25 * cold + 0.75 * warm), rel=1e-9)
    assert float(logs["cold_loss"]) == pytest.approx(float(cold), rel=1e-9)
    loss.backward()
    assert algo.out.weight.grad.abs().sum() > 0
    # The task start is the generated row (evaluation's cold stage).
    fast, slow = model.split()
    start = algo.task_start(model, fast, slow, {k: v[1] for k, v in batch.support.items()})
    assert torch.allclose(start["item_default"],
                          mf.item_default + algo.generate({k: v[1] for k, v in
                                                           batch.support.items()})["item_default"])


def test_class_representatives_by_hand():
    e = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 7.0]])
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0])
    mask = torch.tensor([True, True, True, False])
    r0, r1 = class_representatives(e, labels, mask)
    assert r0.tolist() == [3.0, 2.0] and r1.tolist() == [3.0, 2.0]  # (1,0)+(5,4) / 2
    r0, r1 = class_representatives(e, torch.ones(4), torch.tensor([True, False, False, False]))
    assert r0.tolist() == [0.0, 0.0] and r1.tolist() == [1.0, 0.0]  # an empty class: zeros


def test_lwa_weights_from_the_history():
    torch.manual_seed(1)
    net = LWA(IMPLICIT, embedding_dim=3, hidden=(4,), out_dim=2).double()
    with torch.no_grad():
        net.w0.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
        net.w1.copy_(torch.tensor([[0.5, 0.0], [1.0, 1.0]]))
        net.bias.fill_(0.3)
    batch = _item_batch()
    sup = {k: v[0] for k, v in batch.support.items()}  # users 0 (label 1) and 1 (label 0)
    f = net.encoder(sup)
    w = net.task_start(sup)["task_weight"]
    expected = net.w0 @ f[1] + net.w1 @ f[0]
    assert torch.allclose(w, expected)
    model = FunctionalModel(net, select_parameters(net, net.default_fast_parameters()), "implicit")
    fast, slow = model.split()
    start = model.task_start(fast, slow, sup)
    qry = {k: v[0] for k, v in batch.query.items()}
    scores = model.predict(start, slow, qry)
    assert torch.allclose(scores, 0.3 + net.encoder(qry) @ expected)
    # No history (the cold stage): w = 0, every user scores the bias.
    empty = {**sup, "mask": torch.zeros(2, dtype=torch.bool)}
    assert torch.count_nonzero(net.task_start(empty)["task_weight"]) == 0


def test_nlba_biases_from_the_history():
    torch.manual_seed(2)
    net = NLBA(IMPLICIT, embedding_dim=3, encoder_hidden=(4,), out_dim=2, hidden=(3,)).double()
    sup = {k: v[1] for k, v in _item_batch().support.items()}  # both users label 1
    f = net.encoder(sup)
    r = torch.cat([torch.zeros(2, dtype=torch.float64), f.mean(0)])
    state = net.task_start(sup)
    assert set(state) == {"task_biases.0", "task_output_bias"}
    assert torch.allclose(state["task_biases.0"], net.bias_maps[0].weight @ r)
    assert torch.allclose(state["task_output_bias"], (net.output_bias_map.weight @ r)[0])
    model = FunctionalModel(net, select_parameters(net, net.default_fast_parameters()), "implicit")
    fast, slow = model.split()
    start = model.task_start(fast, slow, sup)
    x = net.encoder(sup)
    h = torch.relu(x @ net.layers[0].weight.T + state["task_biases.0"])
    expected = (h @ net.output.weight.T).squeeze(-1) + state["task_output_bias"]
    assert torch.allclose(model.predict(start, slow, sup), expected)


def test_lwa_needs_implicit_labels():
    with pytest.raises(ValueError, match="implicit"):
        LWA(DataSchema(3, 2, task_by="item"))


def test_metaemb_replaces_an_old_items_own_row():
    """With use_item_table an old item's pretrained row is removed from the generated start:
    the item's whole id embedding is phi_default + g(x), as for a new item."""
    schema = DataSchema(num_users=3, num_items=2, feedback="implicit", rating_range=None,
                        task_by="item", features=(FeatureSpec("genre", "item", "categorical", 2),))
    torch.manual_seed(0)
    mf = MatrixFactorization(schema, embedding_dim=2, item_features=False,
                             use_item_table=True).double()
    with torch.no_grad():
        mf.item_embedding.weight.copy_(torch.tensor([[5.0, -3.0], [0.0, 0.0]]))  # item 0 trained
        mf.item_bias.weight.copy_(torch.tensor([[2.0], [0.0]]))
    algo = MetaEmb(embedding_dim=3, hidden=(4,))
    model = FunctionalModel(mf, select_parameters(mf, algo.select_fast(mf)), "implicit")
    algo.bind(model)
    algo.double()
    with torch.no_grad():
        algo.out.weight.normal_()
    fast, slow = model.split()
    sup = {k: v[0] for k, v in _item_batch().support.items()}  # item 0
    g = algo.generate(sup)
    start = algo.task_start(model, fast, slow, sup)
    row = start["item_default"] + mf.item_embedding.weight[0]  # what mf adds for item 0
    bias = start["item_default_bias"] + mf.item_bias.weight[0, 0]
    assert torch.allclose(row, mf.item_default + g["item_default"])
    assert torch.allclose(bias, mf.item_default_bias + g["item_default_bias"])
