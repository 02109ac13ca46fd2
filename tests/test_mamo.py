"""MAMO: the memory read and write rules on hand-worked cases, the personalised start as step 0
of every policy, writes only in training, and the CLI and Adapter paths."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, synthetic_batch
from metarec import Adapter, FunctionalModel, select_parameters
from metarec.cli import MetarecCLI
from metarec.data import EpisodeCollator
from metarec_plugins.algorithms.mamo import MAMO, memory_attention, sequential_write
from metarec_plugins.backbones.mamo import MAMO as MAMOBackbone


def setup(n_tasks: int = 5, **algorithm_args):
    table, batch = synthetic_batch(n_tasks=n_tasks)
    torch.manual_seed(0)
    backbone = MAMOBackbone(table.schema, embedding_dim=4, n_layers=2).double()
    algorithm = MAMO(inner_steps=2, inner_lr=0.1, **algorithm_args)
    model = FunctionalModel(backbone, select_parameters(backbone, algorithm.select_fast(backbone)),
                            "explicit")
    algorithm.bind(model)
    algorithm.double()
    return backbone, algorithm, model, batch


def test_attention_is_the_softmax_of_cosine_similarities():
    keys = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    got = memory_attention(torch.tensor([2.0, 0.0]), keys)
    e = [math.e, 1.0, math.exp(-1.0)]  # cosines 1, 0, -1
    torch.testing.assert_close(got, torch.tensor([x / sum(e) for x in e]))


def test_sequential_write_equals_writing_one_user_after_another():
    gen = torch.Generator().manual_seed(1)
    memory = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
    attention = F.softmax(torch.randn(5, 3, generator=gen, dtype=torch.float64), -1)
    values = torch.randn(5, 2, 4, generator=gen, dtype=torch.float64)
    expected = memory.clone()
    for a, v in zip(attention, values):  # M <- r * a (x) v + (1 - r) * M
        expected = 0.3 * a[:, None, None] * v[None] + 0.7 * expected
    torch.testing.assert_close(sequential_write(memory, attention, values, 0.3), expected)
    # One user, by hand: a = (1, 0), v = 2 -> slot 0 moves halfway to 2, slot 1 decays.
    one = sequential_write(torch.tensor([[0.0], [4.0]]), torch.tensor([[1.0, 0.0]]),
                           torch.tensor([[2.0]]), 0.5)
    torch.testing.assert_close(one, torch.tensor([[1.0], [2.0]]))


def test_the_start_is_phi_minus_tau_times_the_attended_bias_and_the_attended_fast_weights():
    backbone, algorithm, model, batch = setup(tau=0.5)
    fast, slow = model.split()
    support = {k: v[0] for k, v in batch.support.items()}
    profile = backbone.user_profile({k: v[0] for k, v in support.items()})
    a = memory_attention(profile, algorithm.profile_memory)
    start = algorithm.task_start(model, fast, slow, support)
    bias = a @ algorithm.bias_memory
    at = 0
    for name in algorithm.personalised:  # theta_u = phi_u - tau * (a^T M_U)[slice of name]
        n = fast[name].numel()
        torch.testing.assert_close(start[name], fast[name] - 0.5 * bias[at:at + n].view_as(fast[name]))
        at += n
    assert at == algorithm.bias_memory.shape[1]
    torch.testing.assert_close(start["mem_layer.weight"],
                               (a[:, None, None] * algorithm.task_memory).sum(0))
    for name in fast:  # everything else starts at the shared phi
        if name not in algorithm.personalised and name != "mem_layer.weight":
            assert torch.equal(start[name], fast[name])


def test_users_with_different_profiles_start_differently_and_frozen_reports_that_start():
    from metarec_plugins.policies.frozen import Frozen

    backbone, algorithm, model, batch = setup()
    fast, slow = model.split()
    policy = Frozen()
    policy.bind(algorithm)
    (starts,) = policy.adapt(model, fast, slow, batch.support)
    for t in range(len(batch)):
        one = algorithm.task_start(model, fast, slow, {k: v[t] for k, v in batch.support.items()})
        for name in fast:
            torch.testing.assert_close(starts[name][t], one[name])
    assert (starts["mem_layer.weight"][0] - starts["mem_layer.weight"][1]).abs().max() > 1e-6


@pytest.mark.parametrize("grad_clip", [None, 1e-3])  # 1e-3: every written gradient clipped
def test_training_writes_the_memories_in_order_and_evaluation_reads_only(grad_clip):
    backbone, algorithm, model, batch = setup(grad_clip=grad_clip)
    fast, slow = model.split()
    before = {k: v.clone() for k, v in algorithm.named_buffers()}
    algorithm.eval()
    loss_eval, _ = algorithm.outer_loss(model, batch)
    for k, v in algorithm.named_buffers():
        assert torch.equal(v, before[k]), k  # evaluation never writes
    # The expected writes, one user at a time, from the memories before the batch.
    attention, profiles, grads, weights = [], [], [], []
    for t in range(len(batch)):
        support = {k: v[t] for k, v in batch.support.items()}
        query = {k: v[t] for k, v in batch.query.items()}
        profile, a = algorithm.read(model, fast, slow, support)
        start = algorithm.personal_start(fast, a)
        adapted = {k: v.detach() for k, v in model.adapt(start, slow, support, 2,
                                                          algorithm.inner_optimizer()).items()}
        adapted = {k: v.requires_grad_() for k, v in adapted.items()}
        g = torch.autograd.grad(model.loss(adapted, slow, query), [adapted[n] for n in algorithm.personalised])
        attention.append(a.detach())
        profiles.append(profile.detach())
        g = torch.cat([x.reshape(-1) for x in g])
        if grad_clip is not None:
            assert float(g.norm()) > grad_clip  # the clip is active
            g = g * grad_clip / g.norm()
        grads.append(g)
        weights.append(adapted["mem_layer.weight"].detach())
    algorithm.train()
    loss, logs = algorithm.outer_loss(model, batch)
    torch.testing.assert_close(loss, loss_eval)  # reads the memories as they were
    loss.backward()  # the writes replaced buffers; the graph is intact
    m_p, m_u, m_ui = before["profile_memory"], before["bias_memory"], before["task_memory"]
    for a, p, g, w in zip(attention, profiles, grads, weights):
        m_p = 0.5 * torch.outer(a, p) + 0.5 * m_p
        m_u = 0.05 * torch.outer(a, g) + 0.95 * m_u
        m_ui = 0.1 * a[:, None, None] * w[None] + 0.9 * m_ui
    torch.testing.assert_close(algorithm.profile_memory, m_p)
    torch.testing.assert_close(algorithm.bias_memory, m_u)
    torch.testing.assert_close(algorithm.task_memory, m_ui)
    assert 0 <= float(logs["memory_attention_entropy"]) <= math.log(3) + 1e-9


def test_the_meta_gradient_reaches_the_shared_start_through_the_personalised_start():
    backbone, algorithm, model, batch = setup()
    loss, _ = algorithm.outer_loss(model, batch)
    loss.backward()
    for name, p in backbone.named_parameters():
        if name == "mem_layer.weight":  # its start comes from the task memory, not phi
            assert p.grad is None or float(p.grad.abs().max()) == 0.0
        else:
            assert p.grad is not None and float(p.grad.abs().max()) > 0, name


def test_bind_names_what_is_missing():
    from metarec_plugins.backbones.melu import MeLU

    table, _ = synthetic_batch(n_tasks=2)
    melu = MeLU(table.schema, embedding_dim=4, hidden=(8,))
    algorithm = MAMO()
    model = FunctionalModel(melu, select_parameters(melu, algorithm.select_fast(melu)), "explicit")
    with pytest.raises(ValueError, match="user_profile"):
        algorithm.bind(model)


@pytest.mark.slow
def test_fit_then_adapt_a_new_user_from_the_checkpoint(tmp_path, capsys):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cli = MetarecCLI(args=[
            "fit", "--config", str(REPO / "recipes" / "quickstart.yaml"),
            "--model.backbone", "mamo", "--model.backbone_args", "{embedding_dim: 8}",
            "--model.algorithm", "mamo", "--model.algorithm_args", "{inner_steps: 2}",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", "[]", "--trainer.max_steps", "3",
            "--trainer.limit_val_batches", "0", "--trainer.enable_model_summary", "false"])
    finally:
        os.chdir(cwd)
    (ckpt,) = (tmp_path / "runs" / "checkpoints").glob("*.ckpt")
    memories = dict(cli.model.algorithm.named_buffers())
    adapter = Adapter.from_checkpoint(ckpt)
    for k, v in adapter.model.algorithm.named_buffers():  # the memories travel in the checkpoint
        assert torch.equal(v, memories[k]), k
    tasks = cli.datamodule.splits.test
    batch = EpisodeCollator(tasks, cli.datamodule.table)(list(range(4)))
    adapter.model.eval()
    with torch.no_grad():
        iterates = adapter.model.adapt(batch)
    slow = {k: v.detach() for k, v in adapter.model.functional.split()[1].items()}
    expected = adapter.model.functional.predict_tasks(iterates[-1], slow, batch.query)
    for t in range(4):
        m = int(tasks.support_mask[t].sum())
        events = list(zip(tasks.support_items[t, :m].tolist(), tasks.support_labels[t, :m].tolist(),
                          tasks.support_times[t, :m].tolist()))
        session = adapter.adapt(events, user=int(tasks.users[t]))
        mask = batch.query["mask"][t]
        torch.testing.assert_close(session.scores(batch.query["item_id"][t][mask]),
                                   expected[t][mask], rtol=0, atol=2e-5)
    # `metarec adapt` on an interactions file: the same top-k as the Adapter.
    import json

    from metarec.cli import main

    m = int(tasks.support_mask[0].sum())
    user = int(tasks.users[0])
    events = list(zip(tasks.support_items[0, :m].tolist(), tasks.support_labels[0, :m].tolist(),
                      tasks.support_times[0, :m].tolist()))
    path = tmp_path / "events.csv"
    path.write_text("user,item,label,timestamp\n" + "".join(f"{user},{i},{r},{t}\n"
                                                           for i, r, t in events))
    capsys.readouterr()
    main(["adapt", "--ckpt_path", str(ckpt), "--interactions", str(path), "--k", "3"])
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["items"] == adapter.adapt(events, user=user).recommend(3).items.tolist()
