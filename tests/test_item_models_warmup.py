"""MWUF's and CVAR's key computations on hand-worked small cases: the warm embedding
(scaled cold row plus shift from the interacted users), the CVAE losses and generated rows, and
that an old item's own pretrained row never leaks into a generated one."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from conftest import item_task_batch
from metarec import DataSchema, FunctionalModel, select_parameters
from metarec.schema import FeatureSpec
from metarec_plugins.algorithms.cvar import CVAR, gaussian_kl, gaussian_w2
from metarec_plugins.algorithms.mwuf import MWUF
from metarec_plugins.backbones.mf import MatrixFactorization

SCHEMA = DataSchema(num_users=3, num_items=2, feedback="implicit", rating_range=None,
                    task_by="item", features=(FeatureSpec("genre", "item", "categorical", 2),))
bce = F.binary_cross_entropy_with_logits


def _batch():
    """Item 1's second support slot padded."""
    return item_task_batch(support_mask=((True, True), (True, False)))


def _mf(seed: int) -> tuple[MatrixFactorization, torch.Tensor, torch.Tensor]:
    """A pretrained-looking mf (item side, own item rows) whose old items' rows are non-zero."""
    torch.manual_seed(seed)
    mf = MatrixFactorization(SCHEMA, embedding_dim=2, item_features=False,
                             use_item_table=True).double()
    with torch.no_grad():
        mf.item_embedding.weight.copy_(torch.tensor([[3.0, -2.0], [-1.0, 4.0]]))
        mf.item_bias.weight.copy_(torch.tensor([[0.7], [-0.4]]))
        mf.user_bias.weight.normal_()
        mf.item_default_bias.fill_(0.2)
    return mf, mf.item_embedding.weight.clone(), mf.item_bias.weight.clone()


def _bind(mf, algo):
    model = FunctionalModel(mf, select_parameters(mf, algo.select_fast(mf)), "implicit")
    algo.bind(model)
    algo.double()
    return model


def _task(batch, t):
    return ({k: v[t] for k, v in batch.support.items()}, {k: v[t] for k, v in batch.query.items()})


def _masked(mf, row, bias, side):
    """mf's score of ``side`` with the item's effective row and bias given (no own row)."""
    u = side["user_id"]
    s = mf.global_bias + mf.user_bias(u).squeeze(-1) + bias + (mf.user_embedding(u) * row).sum(-1)
    m = side["mask"].double()
    return (bce(s, side["label"], reduction="none") * m).sum() / m.sum().clamp_min(1.0)


def test_mwuf_warm_embedding_is_scaled_cold_plus_shift():
    mf, _, _ = _mf(0)
    algo = MWUF(cold_steps=1, cold_lr=0.5, embedding_dim=3, hidden=(4,))
    model = _bind(mf, algo)
    assert not any(p.requires_grad for p in mf.parameters())  # the backbone is frozen
    with torch.no_grad():
        for layer in (algo.scale_out, algo.shift_out):
            layer.weight.normal_()
            layer.bias.normal_()
    batch = _batch()
    loss, logs = algo.outer_loss(model, batch)
    warm_losses, cold_losses = [], []
    for t in range(2):
        sup, qry = _task(batch, t)
        # The cold row: one SGD step of the support loss from the default (own row removed).
        row = mf.item_default.detach().clone().requires_grad_(True)
        bias = mf.item_default_bias.detach().clone().requires_grad_(True)
        grow, gbias = torch.autograd.grad(_masked(mf, row, bias, sup), (row, bias))
        e_cold = torch.cat([row - 0.5 * grow, (bias - 0.5 * gbias)[None]]).detach()
        # Scale from the genre; shift from the mean row of the support's (unmasked) users.
        emb = algo.features.embed.tables["item__genre"].weight[sup["item.genre"][0]]
        scale = 1 + algo.scale_out(algo.scale_body(emb))
        users = sup["user_id"][sup["mask"]]
        shift = algo.shift_out(algo.shift_body(mf.user_embedding.weight[users].mean(0)))
        warm = scale * e_cold + shift
        warm_losses.append(_masked(mf, warm[:2], warm[2], qry))
        cold_losses.append(_masked(mf, e_cold[:2], e_cold[2], qry))
    assert float(loss.detach()) == pytest.approx(float(sum(warm_losses) / 2), rel=1e-9)
    assert float(logs["cold_loss"]) == pytest.approx(float(sum(cold_losses) / 2), rel=1e-9)
    loss.backward()
    for layer in (algo.scale_out, algo.shift_out):  # both meta networks learn
        assert layer.bias.grad.abs().sum() > 0


def test_mwuf_cold_stage_scales_the_default_and_has_no_shift():
    mf, T, t = _mf(1)
    algo = MWUF(cold_steps=2, embedding_dim=3, hidden=(4,))
    model = _bind(mf, algo)
    with torch.no_grad():
        for layer in (algo.scale_out, algo.shift_out):
            layer.weight.normal_()
            layer.bias.normal_()  # g(0) != 0: a shift of the empty set would show
    sup, qry = _task(_batch(), 0)
    empty = {**sup, "mask": torch.zeros(2, dtype=torch.bool)}
    fast, slow = model.split()
    start = algo.task_start(model, fast, slow, empty)
    e0 = torch.cat([mf.item_default, mf.item_default_bias[None]])
    warm = algo.scale(empty) * e0  # no rating: the cold row is the default, no shift
    # The effective row is the warm one: item 0's own pretrained row is subtracted.
    assert torch.allclose(start["item_default"], warm[:2] - T[0])
    assert torch.allclose(start["item_default_bias"], warm[2] - t[0, 0])
    scores = model.predict(start, slow, qry)
    u = qry["user_id"]
    expected = (mf.global_bias + mf.user_bias(u).squeeze(-1) + warm[2]
                + (mf.user_embedding(u) * warm[:2]).sum(-1))
    assert torch.allclose(scores, expected)
    # The vmapped form (evaluation's) agrees with the one-task form.
    batch = _batch()
    starts = algo.task_starts(model, fast, slow, {**batch.support,
                                                  "mask": torch.zeros(2, 2, dtype=torch.bool)})
    assert torch.allclose(starts["item_default"][0], start["item_default"])


def test_cvar_losses_and_generated_row_by_hand():
    mf, T, t = _mf(2)
    algo = CVAR(latent_dim=2, embedding_dim=3, hidden=(), recon_weight=0.5, beta=0.25)
    model = _bind(mf, algo)
    assert not any(p.requires_grad for p in mf.parameters())
    with torch.no_grad():
        algo.decoder_out.weight.normal_()
        algo.decoder_out.bias.normal_()
    algo.eval()  # z = the means: a deterministic loss to compare with
    batch = _batch()
    loss, logs = algo.outer_loss(model, batch)
    e0 = torch.cat([mf.item_default, mf.item_default_bias[None]])
    parts = []
    for i in range(2):
        sup, qry = _task(batch, i)
        e = torch.cat([mf.item_default + T[i], mf.item_default_bias[None] + t[i]])  # trained
        c = algo.features.embed.tables["item__genre"].weight[sup["item.genre"][0]]
        mu, logvar = algo.encoder_out(torch.cat([e, c])).chunk(2)
        mu_p, logvar_p = algo.prior_out(c).chunk(2)
        recon = ((e0 + algo.decoder_out(torch.cat([mu, c])) - e) ** 2).sum()
        gen = e0 + algo.decoder_out(torch.cat([mu_p, c]))
        both = {k: torch.cat([sup[k], qry[k]]) for k in sup}  # all the item's ratings
        rec = _masked(mf, gen[:2], gen[2], both)
        kl = torch.distributions.kl_divergence(
            torch.distributions.Normal(mu, (0.5 * logvar).exp()),
            torch.distributions.Normal(mu_p, (0.5 * logvar_p).exp())).sum()
        parts.append(torch.stack([rec, recon, kl]))
        # The task start (a cold item: side information only) is the decoded prior mean.
        fast, slow = model.split()
        start = algo.task_start(model, fast, slow, {**sup, "mask": torch.zeros(2, dtype=torch.bool)})
        assert torch.allclose(start["item_default"], gen[:2] - T[i])
        assert torch.allclose(start["item_default_bias"], gen[2] - t[i, 0])
    rec, recon, kl = (sum(parts) / 2).unbind()
    assert float(loss) == pytest.approx(float(rec + 0.5 * recon + 0.25 * kl), rel=1e-9)
    assert float(logs["rec_loss"]) == pytest.approx(float(rec), rel=1e-9)
    assert float(logs["kl"]) == pytest.approx(float(kl), rel=1e-9)
    loss.backward()
    for layer in (algo.encoder_out, algo.prior_out, algo.decoder_out):
        assert layer.weight.grad.abs().sum() > 0


def test_cvar_samples_in_training_only():
    mf, _, _ = _mf(3)
    algo = CVAR(latent_dim=2, embedding_dim=3)
    model = _bind(mf, algo)
    with torch.no_grad():
        algo.decoder_out.weight.normal_()
    batch = _batch()
    algo.eval()
    a, _ = algo.outer_loss(model, batch)
    b, _ = algo.outer_loss(model, batch)
    assert float(a) == float(b)
    algo.train()
    torch.manual_seed(0)
    c, _ = algo.outer_loss(model, batch)
    assert torch.isfinite(c) and float(c) != float(a)


def test_gaussian_divergences_by_hand():
    mu, logvar = torch.tensor([1.0]), torch.log(torch.tensor([4.0]))
    mu_p, logvar_p = torch.tensor([0.0]), torch.log(torch.tensor([1.0]))
    # KL(N(1, 4) || N(0, 1)) = log(1/2) + (4 + 1) / 2 - 1/2
    assert float(gaussian_kl(mu, logvar, mu_p, logvar_p)) == pytest.approx(
        torch.log(torch.tensor(0.5)).item() + 2.5 - 0.5)
    # W2^2 = (1 - 0)^2 + (2 - 1)^2
    assert float(gaussian_w2(mu, logvar, mu_p, logvar_p)) == pytest.approx(2.0)


def test_warmup_algorithms_need_item_tasks_and_features():
    users = DataSchema(num_users=3, num_items=2, feedback="implicit", rating_range=None,
                       features=(FeatureSpec("genre", "item", "categorical", 2),))
    for algo in (MWUF(), CVAR()):
        mf = MatrixFactorization(users)
        with pytest.raises(ValueError, match="task_by: item"):
            algo.bind(FunctionalModel(mf, select_parameters(mf, algo.select_fast(mf)),
                                      "implicit"))
    bare = DataSchema(num_users=3, num_items=2, feedback="implicit", rating_range=None,
                      task_by="item")
    for algo in (MWUF(), CVAR()):
        mf = MatrixFactorization(bare)
        with pytest.raises(ValueError, match="no item features"):
            algo.bind(FunctionalModel(mf, select_parameters(mf, algo.select_fast(mf)),
                                      "implicit"))
