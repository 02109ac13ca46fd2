"""TaNP: the KL, FiLM, Gating-FiLM, Student's t assignment and clustering loss on hand-worked
cases; the amortised start (vmap equals a loop, padding and empty supports, deterministic
evaluation, gradient steps after it); the objective; the CLI and Adapter paths."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Independent, Normal, kl_divergence

from conftest import REPO, assert_vmap_matches_loop, ml100k_root, synthetic_batch
from metarec import Adapter, FunctionalModel, masked_loss, select_parameters
from metarec.data import EpisodeCollator
from metarec_plugins.algorithms.tanp import (
    TaNP,
    cluster_target,
    clustering_loss,
    gaussian_kl,
    union,
)
from metarec_plugins.backbones.tanp import ModulatedDecoder, film, gated_film, student_t_assignment
from metarec_plugins.backbones.tanp import TaNP as TaNPBackbone
from metarec_plugins.policies.finetune import FineTune
from metarec_plugins.policies.frozen import Frozen


def setup(n_tasks: int = 5, modulation: str = "film", **algorithm_args):
    """(backbone, algorithm, functional model, batch): a tiny float64 TaNP on synthetic tasks."""
    table, batch = synthetic_batch(n_tasks=n_tasks)
    torch.manual_seed(0)
    backbone = TaNPBackbone(table.schema, embedding_dim=4, encoder_hidden=(8,), r_dim=6, s_dim=5,
                            z_dim=3, identity_hidden=(8,), task_dim=4, clusters=3,
                            decoder_hidden=(8, 6), modulation=modulation).double()
    algorithm = TaNP(**algorithm_args)
    model = FunctionalModel(backbone, select_parameters(backbone, algorithm.select_fast(backbone)),
                            "explicit")
    algorithm.bind(model)
    return backbone, algorithm, model, batch


def task(batch, t: int) -> dict[str, torch.Tensor]:
    return {k: v[t] for k, v in batch.items()}


def detached(model):
    fast, slow = model.split()
    return ({k: v.detach() for k, v in fast.items()}, {k: v.detach() for k, v in slow.items()})


# -- the paper's operations on hand-worked cases --------------------------------------------------
def test_gaussian_kl_against_the_closed_form_and_torch_distributions():
    # q = N(1, 1), p = N(0, 4): log(2/1) + (1 + 1^2) / (2 * 4) - 1/2 = log 2 - 1/4.
    got = gaussian_kl(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                      torch.tensor([math.log(4.0)]))
    torch.testing.assert_close(got, torch.tensor(math.log(2.0) - 0.25))
    # Sums over dimensions; zero for equal distributions; KL(q||p), not KL(p||q).
    gen = torch.Generator().manual_seed(0)
    mq, vq, mp, vp = (torch.randn(7, 5, generator=gen, dtype=torch.float64) for _ in range(4))
    expected = kl_divergence(Independent(Normal(mq, vq.mul(0.5).exp()), 1),
                             Independent(Normal(mp, vp.mul(0.5).exp()), 1))
    torch.testing.assert_close(gaussian_kl(mq, vq, mp, vp), expected)
    torch.testing.assert_close(gaussian_kl(mq, vq, mq, vq), torch.zeros(7, dtype=torch.float64))
    assert not torch.allclose(gaussian_kl(mp, vp, mq, vq), expected)


def _tiny_decoder(modulation: str) -> ModulatedDecoder:
    """One hidden layer of width 2 on a 2-wide input, a 1-wide task embedding: W = I, b = 0,
    output = h1 + h2; with o = 1 the task maps give gamma = (0.5, -0.25), beta = (0.1, 0.3),
    eta = (0.2, -0.4), delta = (0.25, 0.75)."""
    decoder = ModulatedDecoder(2, 1, [2], modulation).double()
    with torch.no_grad():
        decoder.layers[0].weight.copy_(torch.eye(2))
        decoder.layers[0].bias.zero_()
        decoder.output.weight.fill_(1.0)
        decoder.output.bias.zero_()
        atanh, logit = torch.atanh, torch.logit
        values = {"gamma": atanh(torch.tensor([0.5, -0.25])), "beta": atanh(torch.tensor([0.1, 0.3])),
                  "eta": atanh(torch.tensor([0.2, -0.4])), "delta": logit(torch.tensor([0.25, 0.75]))}
        for name, value in values.items():
            if hasattr(decoder, name):
                getattr(decoder, name)[0].weight.copy_(value.double()[:, None])
    return decoder


def test_film_is_gamma_times_h_plus_beta_on_a_tiny_layer():
    h = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    torch.testing.assert_close(film(h, torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])),
                               torch.tensor([[2.5, 3.0], [6.5, 0.5]]))
    decoder = _tiny_decoder("film")
    x, o = torch.tensor([[1.0, -2.0]], dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    # a = (1, -2); gamma * a + beta = (0.5 + 0.1, 0.5 + 0.3) = (0.6, 0.8); ReLU; sum = 1.4.
    torch.testing.assert_close(decoder(x, o), torch.tensor([1.4], dtype=torch.float64))
    # A negative modulated unit is cut by the ReLU: a = (-1, 2) -> (-0.4, -0.2) -> 0.
    torch.testing.assert_close(decoder(-x, o), torch.tensor([0.0], dtype=torch.float64))


def test_gating_film_mixes_the_film_parameters_with_eta_by_the_gate():
    h, gamma, beta = torch.tensor([1.0, -2.0]), torch.tensor([0.5, -0.25]), torch.tensor([0.1, 0.3])
    eta, delta = torch.tensor([0.2, -0.4]), torch.tensor([0.25, 0.75])
    # gamma' = (0.25 * 0.5 + 0.75 * 0.2, 0.75 * -0.25 + 0.25 * -0.4) = (0.275, -0.2875);
    # beta' = (0.25 * 0.1 + 0.75 * 0.2, 0.75 * 0.3 + 0.25 * -0.4) = (0.175, 0.125).
    torch.testing.assert_close(gated_film(h, gamma, beta, eta, delta),
                               torch.tensor([0.275 + 0.175, 0.575 + 0.125]))
    # An open gate (delta = 1) is FiLM; a closed one (delta = 0) is eta * h + eta.
    torch.testing.assert_close(gated_film(h, gamma, beta, eta, torch.ones(2)), film(h, gamma, beta))
    torch.testing.assert_close(gated_film(h, gamma, beta, eta, torch.zeros(2)), eta * h + eta)
    decoder = _tiny_decoder("gating")
    x, o = torch.tensor([[1.0, -2.0]], dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    torch.testing.assert_close(decoder(x, o), torch.tensor([1.15], dtype=torch.float64))
    plain = _tiny_decoder("none")  # no modulation: ReLU(x) summed
    torch.testing.assert_close(plain(x, o), torch.tensor([1.0], dtype=torch.float64))


def test_student_t_assignment_on_two_clusters():
    pool = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    # alpha = 1: kernel 1 / (1 + d^2); t = (0.5, 0): d^2 = 0.25 and 2.25 -> 0.8 and 4/13,
    # normalised: 13/18 and 5/18.
    got = student_t_assignment(torch.tensor([0.5, 0.0]), pool, alpha=1.0)
    torch.testing.assert_close(got, torch.tensor([13 / 18, 5 / 18]))
    # alpha = 3: kernel (1 + d^2/3)^-2 -> (12/13)^2 and (4/7)^2.
    k1, k2 = (12 / 13) ** 2, (4 / 7) ** 2
    torch.testing.assert_close(student_t_assignment(torch.tensor([0.5, 0.0]), pool, alpha=3.0),
                               torch.tensor([k1 / (k1 + k2), k2 / (k1 + k2)]))
    # Batched over leading dims; the midpoint is split evenly; far away stays finite.
    batched = student_t_assignment(torch.tensor([[0.5, 0.0], [1.0, 0.0], [1e6, 0.0]]), pool, 1.0)
    torch.testing.assert_close(batched[1], torch.tensor([0.5, 0.5]))
    assert bool(torch.isfinite(batched).all()) and torch.allclose(batched.sum(-1), torch.ones(3))


def test_clustering_loss_on_a_two_cluster_toy():
    c = torch.tensor([[0.8, 0.2], [0.6, 0.4]], dtype=torch.float64, requires_grad=True)
    # f = (1.4, 0.6); p_1 ~ (0.64/1.4, 0.04/0.6), p_2 ~ (0.36/1.4, 0.16/0.6), renormalised.
    w1, w2 = (0.64 / 1.4, 0.04 / 0.6), (0.36 / 1.4, 0.16 / 0.6)
    p = [[w / sum(w1) for w in w1], [w / sum(w2) for w in w2]]
    torch.testing.assert_close(cluster_target(c), torch.tensor(p, dtype=torch.float64))
    assert p[0][0] > 0.8  # sharper than c for the confident task
    kl = sum(p[i][k] * math.log(p[i][k] / float(c.detach()[i, k])) for i in range(2) for k in range(2)) / 2
    loss = clustering_loss(c)
    torch.testing.assert_close(loss, torch.tensor(kl, dtype=torch.float64))
    torch.testing.assert_close(loss, F.kl_div(c.log(), cluster_target(c), reduction="batchmean"))
    # The paper's loss differentiates through p too; the fixed (DEC) target does not.
    (free,) = torch.autograd.grad(clustering_loss(c), c)
    (fixed,) = torch.autograd.grad(clustering_loss(c, fixed_target=True), c)
    torch.testing.assert_close(fixed, -torch.tensor(p, dtype=torch.float64) / c.detach() / 2)
    assert not torch.allclose(free, fixed)


def test_the_task_embedding_is_the_identity_plus_the_assigned_clusters():
    backbone, _, _, batch = setup()
    support = task(batch.support, 0)
    rows = backbone.identity(backbone.pairs(support))[support["mask"]]
    t = rows.mean(0)
    c, o = backbone.customise(support)
    torch.testing.assert_close(c, student_t_assignment(t, backbone.pool, backbone.alpha))
    torch.testing.assert_close(o, t + c @ backbone.pool)
    # The encoder's input label is the rating rescaled to [-1, 1].
    labels = backbone.pairs(support)[..., -1]
    torch.testing.assert_close(labels, (support["label"] - 3.0) / 2.0)


# -- the amortised start -----------------------------------------------------------------------
def test_vmapped_starts_and_scores_equal_a_loop_over_tasks():
    backbone, algorithm, model, batch = setup(n_tasks=6)
    backbone.eval()
    fast, slow = detached(model)
    starts = algorithm.task_starts(model, fast, slow, batch.support)
    assert starts["task_z"].shape == (6, 3) and starts["task_o"].shape == (6, 4)
    for t in range(6):
        one = backbone.task_start(task(batch.support, t))
        for k, v in one.items():
            torch.testing.assert_close(starts[k][t], v, rtol=1e-12, atol=1e-12)
    assert_vmap_matches_loop(model, fast, slow, batch.query, starts)
    # The per-task losses of the objective too (eval mode: z is the posterior's mean).
    nll, kl, assignment = algorithm.task_losses(model, batch)
    for t in range(6):
        support, query = task(batch.support, t), task(batch.query, t)
        terms = backbone.np_terms(support, union(support, query))
        state = {"task_z": terms["task_z"], "task_o": terms["task_o"]}
        target = union(support, query)
        scores = model.predict({**fast, **state}, slow, target)
        torch.testing.assert_close(nll[t], masked_loss(scores, target["label"], target["mask"],
                                                       "explicit"))
        torch.testing.assert_close(kl[t], gaussian_kl(terms["posterior_mean"],
                                                      terms["posterior_logvar"],
                                                      terms["prior_mean"], terms["prior_logvar"]))
        torch.testing.assert_close(assignment[t], terms["assignment"])


def test_padding_is_ignored_and_an_empty_support_gets_the_prior():
    backbone, algorithm, model, batch = setup()
    backbone.eval()
    support = task(batch.support, 0)
    start = backbone.task_start(support)
    garbage = {k: torch.cat([v, v[:3].flip(0)]) for k, v in support.items()}
    garbage["label"][-3:] = 5.0
    garbage["mask"][-3:] = False
    for k, v in backbone.task_start(garbage).items():
        torch.testing.assert_close(v, start[k], rtol=1e-12, atol=1e-12)
    # No real row: the encoders at the empty aggregate r = t = 0, whatever the padded rows hold.
    empty = {**support, "mask": torch.zeros_like(support["mask"])}
    prior = backbone.task_start(empty)
    hidden = F.relu(backbone.latent_hidden.bias)  # s = ReLU(W_s 0 + b_s)
    torch.testing.assert_close(prior["task_z"], backbone.latent_mean(hidden))
    zero = torch.zeros(backbone.pool.shape[1], dtype=torch.float64)
    c = student_t_assignment(zero, backbone.pool, backbone.alpha)
    torch.testing.assert_close(prior["task_o"], c @ backbone.pool)
    other = {**empty, "label": torch.full_like(support["label"], 1.0)}
    for k, v in backbone.task_start(other).items():
        assert torch.equal(v, prior[k])
    # And in a batch (vmapped), an empty task next to real ones gets the same prior.
    fast, slow = detached(model)
    mixed = {k: v.clone() for k, v in batch.support.items()}
    mixed["mask"][1] = False
    starts = algorithm.task_starts(model, fast, slow, mixed)
    torch.testing.assert_close(starts["task_z"][1], prior["task_z"])
    torch.testing.assert_close(starts["task_z"][0], start["task_z"])


def test_training_samples_z_and_evaluation_is_deterministic():
    backbone, algorithm, model, batch = setup()
    fast, slow = detached(model)
    policy = FineTune()  # the algorithm's inner_steps (0): the amortised start only
    policy.bind(algorithm)
    assert policy.max_steps == 0
    backbone.train()
    draws = [algorithm.task_starts(model, fast, slow, batch.support)["task_z"] for _ in range(2)]
    assert not torch.allclose(draws[0], draws[1])  # reparameterised samples
    backbone.eval()
    first, second = (policy.adapt(model, fast, slow, batch.support) for _ in range(2))
    assert len(first) == 1
    for k in first[0]:
        assert torch.equal(first[0][k], second[0][k])
    mean, _ = torch.func.vmap(backbone.latent)(batch.support)
    torch.testing.assert_close(first[0]["task_z"], mean)
    frozen = Frozen()
    frozen.bind(algorithm)
    assert torch.equal(frozen.adapt(model, fast, slow, batch.support)[0]["task_z"],
                       first[0]["task_z"])


def test_gradient_steps_on_the_task_state_follow_the_start():
    backbone, algorithm, model, batch = setup()
    backbone.eval()
    fast, slow = detached(model)
    policy = FineTune(steps=3, lr=0.5)
    policy.bind(algorithm)
    iterates = policy.adapt(model, fast, slow, batch.support)
    assert len(iterates) == 4
    start = algorithm.task_starts(model, fast, slow, batch.support)
    for k in start:  # step 0 is the amortised start; the steps move only the task state
        torch.testing.assert_close(iterates[0][k], start[k])
    assert set(iterates[-1]) == {"task_z", "task_o"}
    losses = [model.loss_tasks(it, slow, batch.support) for it in iterates]
    assert bool((losses[-1] < losses[0]).all())


# -- the objective -----------------------------------------------------------------------------
@pytest.mark.parametrize("modulation", ["film", "gating", "none"])
def test_the_outer_loss_is_nll_plus_kl_plus_lambda_times_the_clustering_loss(modulation):
    backbone, algorithm, model, batch = setup(modulation=modulation, cluster_weight=0.7,
                                              kl_weight=0.5)
    backbone.eval()  # deterministic, so the parts can be recomputed
    loss, logs = algorithm.outer_loss(model, batch)
    nll, kl, assignment = algorithm.task_losses(model, batch)
    cluster = clustering_loss(assignment)
    torch.testing.assert_close(loss, (nll + 0.5 * kl).mean() + 0.7 * cluster)
    torch.testing.assert_close(logs["kl"], kl.mean())
    torch.testing.assert_close(logs["cluster_loss"], cluster)
    assert bool((kl >= 0).all()) and float(kl.detach().max()) > 0
    backbone.train()
    loss, _ = algorithm.outer_loss(model, batch)
    loss.backward()
    grads = {n: p.grad for n, p in backbone.named_parameters()}
    # The task state is computed, never trained; every weight of the model gets a gradient.
    assert grads.pop("task_z") is None and grads.pop("task_o") is None
    missing = [n for n, g in grads.items() if g is None or not bool(g.abs().sum() > 0)]
    assert not missing, missing


def test_the_likelihood_can_score_the_query_only():
    backbone, algorithm, model, batch = setup(likelihood="query", cluster_weight=0.0,
                                              kl_weight=0.0)
    backbone.eval()
    loss, _ = algorithm.outer_loss(model, batch)
    fast, slow = detached(model)
    expected = []
    for t in range(len(batch)):
        support, query = task(batch.support, t), task(batch.query, t)
        terms = backbone.np_terms(support, union(support, query))
        state = {"task_z": terms["task_z"], "task_o": terms["task_o"]}
        expected.append(model.loss({**fast, **state}, slow, query))
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_bind_needs_the_tanp_backbone_and_arguments_are_checked():
    from metarec_plugins.backbones.melu import MeLU

    table, _ = synthetic_batch(n_tasks=2)
    melu = MeLU(table.schema, embedding_dim=4, hidden=(8,))
    model = FunctionalModel(melu, select_parameters(melu, ["output.*"]), "explicit")
    with pytest.raises(ValueError, match="tanp backbone"):
        TaNP().bind(model)
    with pytest.raises(ValueError, match="likelihood"):
        TaNP(likelihood="all")
    with pytest.raises(ValueError, match="modulation"):
        TaNPBackbone(table.schema, modulation="scale")
    assert TaNP().inner_steps == 0


# -- the CLI and deployment --------------------------------------------------------------------
def test_the_ml100k_recipe_fast_dev_run(in_tmp, monkeypatch):
    root = ml100k_root()
    if root is None:
        pytest.skip("MovieLens-100K not found (METAREC_DATA or ../shared/data)")
    monkeypatch.setenv("METAREC_DATA", str(root.parent))
    from metarec.cli import MetarecCLI

    cli = MetarecCLI(args=["fit", "--config", str(REPO / "recipes/movielens-100k/tanp.yaml"),
                           "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "train/kl", "train/cluster_loss", "val/mae", "val/step0/loss"):
        assert key in metrics and bool(metrics[key].isfinite()), key
    assert "val/step1/loss" not in metrics  # no inner steps: the amortised prediction only


def test_fit_then_adapt_new_users_from_the_checkpoint(tmp_path, capsys):
    from metarec.cli import MetarecCLI

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cli = MetarecCLI(args=[
            "fit", "--config", str(REPO / "recipes" / "quickstart.yaml"),
            "--model.backbone", "tanp", "--model.backbone_args",
            "{embedding_dim: 8, modulation: gating}",
            "--model.algorithm", "tanp", "--model.algorithm_args", "{}",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", "[]", "--trainer.max_steps", "3",
            "--trainer.limit_val_batches", "0", "--trainer.enable_model_summary", "false"])
    finally:
        os.chdir(cwd)
    (ckpt,) = (tmp_path / "runs" / "checkpoints").glob("*.ckpt")
    adapter = Adapter.from_checkpoint(ckpt)
    tasks = cli.datamodule.splits.test
    batch = EpisodeCollator(tasks, cli.datamodule.table)(list(range(4)))
    model = adapter.model.eval()
    with torch.no_grad():
        iterates = model.adapt(batch)
    assert len(iterates) == 1  # step 0: TaNP's amortised start
    slow = {k: v.detach() for k, v in model.functional.split()[1].items()}
    expected = model.functional.predict_tasks(iterates[-1], slow, batch.query)
    streams = {}
    for t in range(4):
        m = int(tasks.support_mask[t].sum())
        streams[int(tasks.users[t])] = list(zip(tasks.support_items[t, :m].tolist(),
                                                tasks.support_labels[t, :m].tolist(),
                                                tasks.support_times[t, :m].tolist()))
    sessions = adapter.adapt(streams)
    for t, (user, events) in enumerate(streams.items()):
        mask = batch.query["mask"][t]
        items = batch.query["item_id"][t][mask]
        torch.testing.assert_close(sessions[user].scores(items), expected[t][mask],
                                   rtol=0, atol=2e-5)
        alone, again = (adapter.adapt(events, user=user) for _ in range(2))
        assert torch.equal(again.scores(items), alone.scores(items))  # deterministic
        torch.testing.assert_close(alone.scores(items), expected[t][mask], rtol=0, atol=2e-5)
    # New feedback re-encodes the grown support set; a user with no events gets the prior.
    user, events = next(iter(streams.items()))
    grown = adapter.adapt(events[:-2], user=user).update(events[-2:])
    torch.testing.assert_close(grown.fast["task_z"], sessions[user].fast["task_z"],
                               rtol=0, atol=1e-6)
    cold = adapter.adapt([], user=user)
    assert bool(torch.isfinite(cold.scores()).all())
    # `metarec adapt` on an interactions file.
    from metarec.cli import main

    path = tmp_path / "events.csv"
    path.write_text("user,item,label,timestamp\n" + "".join(
        f"{u},{i},{r},{s}\n" for u, ev in streams.items() for i, r, s in ev))
    capsys.readouterr()
    main(["adapt", "--ckpt_path", str(ckpt), "--interactions", str(path), "--k", "3"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["user"] for r in rows] == list(streams) and all(len(r["items"]) == 3 for r in rows)
    best = sessions[rows[0]["user"]].recommend(3)
    assert rows[0]["items"] == best.items.tolist()
