"""The transformer's causal (SASRec-style) mode: the task's events encoded once, each slot
reading the state before it, is exactly a per-slot encoding of the slot's own history; no later
event leaks into a slot's score; vmap, MAML's meta-gradients and the CLI work with it."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    REPO,
    assert_encoded_path_equals_full_forward,
    assert_inner_loop_changes_exactly,
    assert_vmap_matches_loop,
    synthetic_setup,
)
from metarec import EpisodeCollator, FunctionalModel, build, select_parameters
from metarec.cli import MetarecCLI
from metarec.serving.events import _pad_history
from metarec_plugins.algorithms.maml import MAML

H = 4
SMALL = {"dim": 8, "heads": 2, "scorer_hidden": (6,), "attention": "causal"}
FAST = {"scorer.0.weight", "scorer.0.bias", "output.weight", "output.bias"}


@pytest.fixture(scope="module")
def setup():
    return synthetic_setup(query_strategy="random")


def as_double(side):
    return {k: v.double() if v.is_floating_point() else v for k, v in side.items()}


def collate(setup, shared, n=5, h=H):
    table, splits = setup
    b = EpisodeCollator(splits.train, table, history_length=h, shared_history=shared)(
        list(range(n)))
    b.support, b.query = as_double(b.support), as_double(b.query)
    return b


def make(schema, layers=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = build("backbones", "transformer", {**SMALL, "layers": layers, **kwargs},
                  schema=schema).double()
    with torch.no_grad():  # non-zero relative biases (zero at initialisation)
        model.relative.normal_(0.0, 1.0)
    return model


def functional(backbone):
    return FunctionalModel(backbone, select_parameters(backbone,
                                                       backbone.default_fast_parameters()),
                           "explicit")


def task(side, t):
    return {k: v[t] for k, v in side.items()}


def score_from_state(model, side, t, j, state):
    """The score of slot ``j`` of task ``t`` from a history state ``(D,)``."""
    row = {k: v[t, j:j + 1] for k, v in side.items() if not k.startswith("history.")}
    x = model.encode({**row, **{k: v[t, j:j + 1] for k, v in side.items()
                                if k.startswith("history.")}})
    d = model.dim
    x = torch.cat([x[:, :d], state[None], x[:, 2 * d:]], dim=-1)
    return model.output(model.scorer(x))[0, 0]


def sequence(side, t, lo, hi):
    """Events ``lo:hi`` of task ``t``'s shared sequence, as one (1, hi - lo) sequence."""
    return {k[len("history.seq."):]: v[t, 0, lo:hi][None] for k, v in side.items()
            if k.startswith("history.seq.")}


# -- the shared layout ---------------------------------------------------------------------

def test_shared_layout_is_one_sequence_per_task_and_the_slots_places(setup):
    shared, slots = collate(setup, True), collate(setup, False)
    for side_s, side_p in ((shared.support, slots.support), (shared.query, slots.query)):
        assert not any(k in side_s for k in ("history.item_id", "history.label", "history.mask"))
        seq, pos = side_s["history.seq.item_id"], side_s["history.pos"]
        assert seq.stride(1) == 0  # broadcast over the slots: S wide, not N x H
        assert bool((side_s["history.window"] == H).all())
        for t in range(len(shared)):
            real = side_s["history.seq.mask"][t, 0]
            for j in range(pos.shape[1]):
                if not side_s["mask"][t, j]:
                    assert pos[t, j] == 0
                    continue
                p = int(pos[t, j])
                assert bool(real[:p].all())
                # The per-slot history is the latest H of the events before the slot.
                m = side_p["history.mask"][t, j]
                k = int(m.sum())
                assert k == min(p, H)
                assert torch.equal(seq[t, j, p - k:p], side_p["history.item_id"][t, j][m])
                assert torch.equal(side_s["history.seq.label"][t, j, p - k:p],
                                   side_p["history.label"][t, j][m])


@pytest.mark.parametrize("layers", [0, 1, 2, 3])
@pytest.mark.parametrize("h", [1, H, 50])
def test_shared_encoding_equals_each_slot_encoded_alone(setup, layers, h):
    """Sharing is exact: each slot's causal score from the one shared pass equals (a) the same
    encoder run on the slot's truncated sequence alone (its latest ``h`` events before it, read
    at the last one), (b) the same with the whole prefix before the slot (older events are out
    of reach), (c) the backbone on per-slot histories (what metarec.Adapter builds)."""
    table, _ = setup
    model = make(table.schema, layers).eval()
    shared, slots = collate(setup, True, h=h), collate(setup, False, h=h)
    with torch.no_grad():
        for side, per_slot in ((shared.support, slots.support), (shared.query, slots.query)):
            scores = model(side)
            padded = {k: _pad_history(v, h) if k.startswith("history.") else v
                      for k, v in per_slot.items()}
            mask = side["mask"]
            torch.testing.assert_close(model(padded)[mask], scores[mask], rtol=1e-12,
                                       atol=1e-12)
            for t in range(len(shared)):
                for j in torch.nonzero(mask[t]).flatten().tolist():
                    p = int(side["history.pos"][t, j])
                    window = torch.tensor([h])
                    alone = model._encode_causal(sequence(side, t, max(0, p - h), p), window)
                    prefix = model._encode_causal(sequence(side, t, 0, p), window)
                    for states in (alone, prefix):
                        expected = score_from_state(model, side, t, j, states[0, -1])
                        torch.testing.assert_close(scores[t, j], expected, rtol=1e-12,
                                                   atol=1e-12)


def edited(side, t, position, item, label):
    """``side`` with event ``position`` of task ``t``'s sequence given another item id and
    label (in every slot: the sequence stays broadcast)."""
    out = dict(side)
    for key, value in (("history.seq.item_id", item), ("history.seq.label", label)):
        base = out[key][:, 0].clone()
        base[t, position] = value
        out[key] = base[:, None].expand_as(side[key])
    return out


@pytest.mark.parametrize("layers", [1, 2])
def test_no_leakage_of_the_slot_or_later_events(setup, layers):
    """Changing an event's item and label leaves the score of its own slot and of every
    earlier slot unchanged (no leakage of the slot's label or of later events), and of slots
    whose latest H events do not include it; it moves the scores of the slots whose history
    holds it (so the check can fail)."""
    table, _ = setup
    model = make(table.schema, layers).eval()
    side = collate(setup, True, h=H).support  # support slot j is event j of the sequence
    with torch.no_grad():
        before = model(side)
        t, n = 0, int(side["mask"][0].sum())
        for e in (0, n // 2, n - 1):
            after = model(edited(side, t, e, item=(int(side["history.seq.item_id"][t, 0, e])
                                                   + 7) % table.num_items, label=1.0))
            pos = side["history.pos"][t]
            real = side["mask"][t]
            untouched = real & (pos <= e)  # the event is the slot's own or later
            torch.testing.assert_close(after[t][untouched], before[t][untouched], rtol=0,
                                       atol=0)
            # Out of reach: events older than the slot's latest H before it.
            torch.testing.assert_close(after[t][real & (pos > e + H)],
                                       before[t][real & (pos > e + H)], rtol=0, atol=0)
            inside = real & (pos > e) & (pos <= e + H)
            if bool(inside.any()):  # a slot whose history holds the event: its score moves
                assert float((after[t][inside] - before[t][inside]).abs().max()) > 1e-8
            torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=0)  # other tasks


def test_vmapped_forward_equals_per_task_loop(setup):
    table, _ = setup
    batch = collate(setup, True)
    model = functional(make(table.schema))
    fast, slow = model.split()
    g = torch.Generator().manual_seed(1)
    per_task = {k: v.detach() + 0.1 * torch.randn(len(batch), *v.shape, generator=g,
                                                   dtype=v.dtype) for k, v in fast.items()}
    assert_vmap_matches_loop(model, fast, slow, batch.query, per_task)


def test_fast_parameters_and_the_encoded_path(setup):
    table, _ = setup
    batch = collate(setup, True)
    backbone = make(table.schema)
    assert backbone.shared_history and not hasattr(backbone, "target")
    names = set(select_parameters(backbone, backbone.default_fast_parameters()))
    assert names == FAST
    assert "relative" in select_parameters(backbone, backbone.encoder_parameters())
    model = functional(backbone)
    assert_inner_loop_changes_exactly(backbone, model, names, task(batch.support, 0))
    assert_encoded_path_equals_full_forward(model, task(batch.support, 1))


def test_maml_meta_gradients_are_finite_and_equal_vmapped_and_per_task(setup):
    table, _ = setup
    batch = collate(setup, True)
    backbone = make(table.schema)
    model = functional(backbone)
    maml = MAML(inner_steps=2, inner_lr=0.1)
    params = [p for _, p in backbone.named_parameters()]
    loss, _ = maml.outer_loss(model, batch)
    vmapped = torch.autograd.grad(loss, params, allow_unused=True)
    fast, slow = model.split()
    losses = []
    for t in range(len(batch)):
        adapted = maml.adapt(model, fast, slow, task(batch.support, t))
        losses.append(model.loss(adapted, slow, task(batch.query, t)))
    looped = torch.autograd.grad(torch.stack(losses).mean(), params, allow_unused=True)
    torch.testing.assert_close(torch.stack(losses).mean(), loss, rtol=1e-10, atol=1e-10)
    touched = 0
    for (name, _), a, b in zip(backbone.named_parameters(), vmapped, looped):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert bool(a.isfinite().all()), name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
        touched += bool(a.abs().max() > 0)
    assert touched >= 10  # the encoder (slow) gets meta-gradients too, not just the head


def test_recommend_with_a_broadcast_history_encodes_once(setup):
    """As ``UserSession.recommend`` builds it: every candidate with the same per-slot history
    (stride 0) is scored from one encoding, equal to slot by slot."""
    table, _ = setup
    model = make(table.schema).eval()
    side = collate(setup, False, h=H).query
    n = table.num_items
    x = {"item_id": torch.arange(n), "user_id": side["user_id"][0, :1].expand(n)}
    for key, value in side.items():
        if key.startswith("history."):  # the last query slot's history, padded to H
            row = _pad_history(value, H)[0, -1]
            x[key] = row.expand(n, *row.shape)
        elif key.startswith("user."):
            x[key] = value[0, 0].expand(n, *value.shape[2:])
    for f in table.item_features:
        v = torch.from_numpy(f.values)[torch.arange(n)]
        x[f.spec.key] = v.double() if v.is_floating_point() else v
    calls = []
    original = model._encode_causal
    model._encode_causal = lambda e, w: calls.append(e["mask"].shape[0]) or original(e, w)
    with torch.no_grad():
        fast = model(x)
        slow = model({k: v.contiguous() for k, v in x.items()})
    assert calls == [1, n]
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


def test_missing_history_says_to_set_history_length(setup):
    table, _ = setup
    model = make(table.schema)
    with pytest.raises(ValueError, match="data.history_length"):
        model({"item_id": torch.zeros(3, dtype=torch.long),
               "user_id": torch.zeros(3, dtype=torch.long)})


@pytest.mark.parametrize("recipe,extra", [
    ("transformer-maml.yaml", ["--model.backbone_args.attention", "causal"]),
    ("transformer-causal-maml.yaml", []),
])
def test_cli_fast_dev_run_on_movielens(recipe, extra, in_tmp):
    cli = MetarecCLI(args=[
        "fit", "--config", str(REPO / "recipes" / "movielens-100k" / recipe), *extra,
        "--trainer.fast_dev_run", "1"])
    trainer = cli.trainer
    assert trainer.global_step == 1
    assert cli.model.backbone.attention == "causal"
    assert trainer.train_dataloader.collate_fn.shared_history  # the shared layout was used
    for key in ("train/loss", "val/loss"):
        assert bool(trainer.callback_metrics[key].isfinite()), key


def test_adapter_recommend_equals_the_evaluation_path_in_causal_mode(tmp_path, monkeypatch):
    """A causal checkpoint served by metarec.Adapter (per-slot histories of the latest H events,
    read by the same causal encoder) scores the test users' query items as evaluation does on
    the shared layout, and ``recommend`` works."""
    from lightning.pytorch.cli import instantiate_module
    from test_adapter import QUICKSTART, QUIET, _test_streams

    from metarec import Adapter, load_checkpoint
    from metarec.module import MetaLearner

    monkeypatch.chdir(tmp_path)
    cli = MetarecCLI(args=["fit", "--config", QUICKSTART, *QUIET, "--trainer.max_steps", "3",
                           "--trainer.limit_val_batches", "0", "--model.backbone", "transformer",
                           "--model.backbone_args", "{dim: 8, heads: 2, layers: 2, "
                           "attention: causal}", "--data.history_length", str(H),
                           "--data.tasks.query_strategy", "latest"])
    (ckpt,) = (tmp_path / "runs" / "checkpoints").glob("*.ckpt")
    hp = {k: v for k, v in load_checkpoint(ckpt)["hyper_parameters"].items()
          if not k.startswith("_")}
    model = instantiate_module(MetaLearner, hp)
    model.load_state_dict(load_checkpoint(ckpt)["state_dict"])
    model.eval()
    tasks = cli.datamodule.splits.test
    batch = EpisodeCollator(tasks, cli.datamodule.table, H, shared_history=True)(
        list(range(len(tasks))))
    slow = {k: v.detach() for k, v in model.functional.split()[1].items()}
    with torch.no_grad():
        expected = model.functional.predict_tasks(model.adapt(batch)[-1], slow, batch.query)
    adapter = Adapter.from_checkpoint(ckpt)
    streams, _ = _test_streams(cli)
    sessions = adapter.adapt(streams)
    mask = batch.query["mask"]
    for t, user in enumerate(tasks.users.tolist()):
        items = batch.query["item_id"][t][mask[t]]
        torch.testing.assert_close(sessions[user].scores(items), expected[t][mask[t]],
                                   rtol=0, atol=2e-5)
    top = sessions[tasks.users.tolist()[0]].recommend(k=5)
    assert len(top.items) == 5 and bool(top.scores.isfinite().all())
