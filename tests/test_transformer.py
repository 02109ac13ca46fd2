"""Histories in episode batches (no leakage, most recent H, oldest first) and the transformer
backbone (shapes, padding invariance, vmap, fast/slow partition, CLI)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import (
    REPO,
    assert_encoded_path_equals_full_forward,
    assert_inner_loop_changes_exactly,
    assert_vmap_matches_loop,
    synthetic_setup,
)
from metarec import (
    ENCODED,
    SGD,
    EpisodeCollator,
    FunctionalModel,
    build,
    resolve,
    select_parameters,
)
from metarec.cli import MetarecCLI
from metarec.data.tasks import TaskSet

H = 6
SMALL = {"dim": 8, "layers": 2, "heads": 2, "scorer_hidden": (6,)}
FAST = {"scorer.0.weight", "scorer.0.bias", "output.weight", "output.bias"}


@pytest.fixture(scope="module")
def setup():
    return synthetic_setup(query_strategy="random")


@pytest.fixture(scope="module")
def schema(setup):
    return setup[0].schema


def as_double(side):
    return {k: v.double() if v.is_floating_point() else v for k, v in side.items()}


@pytest.fixture(scope="module")
def batch(setup):
    table, splits = setup
    b = EpisodeCollator(splits.train, table, history_length=H)(list(range(5)))
    b.support, b.query = as_double(b.support), as_double(b.query)
    return b


def make(schema, seed=0, **kwargs):
    torch.manual_seed(seed)
    return build("backbones", "transformer", {**SMALL, **kwargs}, schema=schema).double()


def functional(backbone):
    return FunctionalModel(backbone, select_parameters(backbone,
                                                       backbone.default_fast_parameters()),
                           "explicit")


def task(side, t):
    return {k: v[t] for k, v in side.items()}


# -- histories in episode batches --------------------------------------------------------------

def reference_history(tasks: TaskSet, t: int, time: int, h: int) -> list[tuple[int, float]]:
    """The latest ``h`` support interactions of task ``t`` strictly before ``time``, by a loop."""
    n = int(tasks.support_mask[t].sum())
    past = [(int(tasks.support_items[t, s]), float(tasks.support_labels[t, s]),
             int(tasks.support_times[t, s])) for s in range(n)]
    past = sorted((e for e in past if e[2] < time), key=lambda e: e[2])
    return [(i, y) for i, y, _ in past[-h:]] if h else []


@pytest.mark.parametrize("strategy", ["random", "latest"])
@pytest.mark.parametrize("h", [1, 4, 50])
def test_history_is_the_latest_earlier_support_oldest_first(strategy, h):
    table, splits = synthetic_setup(query_strategy=strategy)
    tasks = splits.train
    idx = list(range(0, 12, 2))
    b = EpisodeCollator(tasks, table, history_length=h)(idx)
    lengths = []
    for side in (b.support, b.query):
        assert side["history.item_id"].dtype == torch.long
        assert side["history.label"].is_floating_point()
        assert side["history.mask"].dtype == torch.bool
        assert side["history.item_id"].shape == (*side["item_id"].shape,
                                                 side["history.item_id"].shape[-1])
        for row, t in enumerate(idx):
            support_items = set(tasks.support_items[t][tasks.support_mask[t]].tolist())
            for j in range(side["mask"].shape[1]):
                m = side["history.mask"][row, j]
                if not side["mask"][row, j]:
                    assert not m.any()  # padded slots have an empty history
                    continue
                k = int(m.sum())
                assert m[:k].all() and not m[k:].any()  # padding at the end
                got = list(zip(side["history.item_id"][row, j, :k].tolist(),
                               side["history.label"][row, j, :k].tolist()))
                assert got == reference_history(tasks, t, int(side["time"][row, j]), h)
                # No leakage: only support interactions, never the query.
                assert set(side["history.item_id"][row, j, :k].tolist()) <= support_items
                lengths.append(k)
    assert min(lengths) < min(h, max(lengths)) or h == 1
    assert max(lengths) == min(h, max(lengths))
    if strategy == "latest":  # the query is after the whole support: its history is full
        full = torch.minimum(torch.tensor(h), tasks.support_mask[idx].sum(1))
        assert torch.equal(b.query["history.mask"][:, 0].sum(-1), full)


def test_history_excludes_ties_and_the_query(setup):
    table, _ = setup
    tasks = TaskSet(
        users=torch.tensor([0]),
        support_items=torch.tensor([[1, 2, 3, 4, 0]]),
        support_labels=torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0]]),
        support_times=torch.tensor([[10, 20, 20, 30, 0]]),
        support_mask=torch.tensor([[True, True, True, True, False]]),
        query_items=torch.tensor([[7, 8, 9]]), query_labels=torch.tensor([[5.0, 5.0, 5.0]]),
        query_times=torch.tensor([[5, 20, 31]]), query_mask=torch.ones(1, 3, dtype=torch.bool))
    b = EpisodeCollator(tasks, table, history_length=2)([0])
    items = b.query["history.item_id"][0].where(b.query["history.mask"][0], -1)
    assert items.tolist() == [[-1, -1], [1, -1], [3, 4]]
    assert b.query["history.label"][0, 2].tolist() == [3.0, 4.0]
    items = b.support["history.item_id"][0].where(b.support["history.mask"][0], -1)
    assert items.tolist() == [[-1, -1], [1, -1], [1, -1], [2, 3]]
    for key in ("history.item.category", "history.item.tags"):  # features of the history items
        assert torch.equal(b.query[key][0, 2], EpisodeCollator(tasks, table).item_features[
            key.removeprefix("history.")][torch.tensor([3, 4])])


def test_histories_are_opt_in(setup):
    table, splits = setup
    plain = EpisodeCollator(splits.train, table)([0, 1])
    assert not any(k.startswith("history.") for k in plain.support)
    with pytest.raises(ValueError, match="history_length"):
        EpisodeCollator(splits.train, table, history_length=0)


# -- the transformer backbone ------------------------------------------------------------------

def random_features(schema, lead, h=H, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {"user_id": torch.randint(schema.num_users, lead, generator=g),
           "item_id": torch.randint(schema.num_items, lead, generator=g)}
    for spec in schema.features:
        shape = (*lead, h) if spec.owner == "item" else lead
        for key, s in ((spec.key, lead), (f"history.{spec.key}", shape)):
            if spec.owner == "user" and key.startswith("history."):
                continue
            out[key] = (torch.randint(spec.cardinality, s, generator=g)
                        if spec.kind == "categorical" else
                        (torch.rand(*s, spec.cardinality, generator=g) < 0.3).double())
    out["history.item_id"] = torch.randint(schema.num_items, (*lead, h), generator=g)
    out["history.label"] = torch.randint(1, 6, (*lead, h), generator=g).double()
    count = torch.randint(0, h + 1, lead, generator=g)
    out["history.mask"] = torch.arange(h) < count[..., None]
    return out


@pytest.mark.parametrize("lead", [(7,), (3, 5), (2, 3, 4)], ids=str)
def test_output_shape_for_any_leading_dims(schema, lead):
    backbone = make(schema)
    x = random_features(schema, lead)
    scores = backbone(x)
    assert scores.shape == lead and scores.dtype == torch.float64
    assert bool(scores.isfinite().all())
    flat = {k: v.reshape(-1, *v.shape[len(lead):]) for k, v in x.items()}
    torch.testing.assert_close(backbone(flat).reshape(lead), scores)


def test_empty_history_is_finite_and_differentiable(schema):
    backbone = make(schema)
    x = random_features(schema, (4,))
    x["history.mask"] = torch.zeros_like(x["history.mask"])
    scores = backbone(x)
    assert bool(scores.isfinite().all())
    scores.sum().backward()
    assert all(bool(p.grad.isfinite().all()) for p in backbone.parameters() if p.grad is not None)
    # An empty history scores from the learned empty token only: history contents are ignored.
    y = dict(x, **{"history.item_id": (x["history.item_id"] + 1) % schema.num_items})
    torch.testing.assert_close(backbone(y), scores, rtol=0, atol=0)


def pad(side, extra_slots, extra_history, seed=0):
    """``side`` with ``extra_slots`` padded slots and ``extra_history`` padded history entries,
    filled with random (masked-out) ids, labels and features."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, v in side.items():
        if key.startswith("history."):
            shape = list(v.shape)
            shape[2] = extra_history
            fill = (torch.zeros(shape, dtype=torch.bool) if key == "history.mask"
                    else torch.randint(0, 2, shape, generator=g).to(v.dtype))
            v = torch.cat([v, fill], dim=2)
        shape = list(v.shape)
        shape[1] = extra_slots
        fill = (torch.zeros(shape, dtype=torch.bool) if v.dtype == torch.bool
                else torch.randint(0, 2, shape, generator=g).to(v.dtype))
        out[key] = torch.cat([v, fill], dim=1)
    return out


def test_padding_invariance(schema, batch):
    backbone = make(schema)
    model = functional(backbone)
    fast, slow = model.split()
    for side in (batch.support, batch.query):
        base = backbone(side)
        wide = backbone(pad(side, 3, 4))
        n = side["mask"].shape[1]
        torch.testing.assert_close(wide[:, :n], base, rtol=1e-12, atol=1e-12)
    # Adaptation too: the inner loop sees the padded support and ends at the same parameters.
    a = model.adapt_tasks(fast, slow, batch.support, 2, SGD(0.1))
    b = model.adapt_tasks(fast, slow, pad(batch.support, 3, 4), 2,
                          SGD(0.1))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)
    # The check can fail: unmasking the padding changes the scores.
    leaky = pad(batch.query, 0, 4)
    leaky["history.mask"] = leaky["history.mask"].clone()
    leaky["history.mask"][..., -1] = True
    assert (backbone(leaky) - backbone(batch.query)).abs().max() > 1e-6


def test_collated_batches_of_different_widths_score_the_same(setup):
    table, splits = setup
    tasks = splits.train
    longest = int(tasks.support_mask.sum(1).argmax())
    shortest = int(tasks.support_mask.sum(1).argmin())
    collate = EpisodeCollator(tasks, table, history_length=H)
    narrow, wide = collate([shortest]), collate([shortest, longest])
    assert wide.support["mask"].shape[1] > narrow.support["mask"].shape[1]
    backbone = make(table.schema).float()
    n = narrow.support["mask"].shape[1]
    torch.testing.assert_close(backbone(wide.support)[0, :n], backbone(narrow.support)[0])


def test_vmapped_forward_equals_per_task_loop(schema, batch):
    model = functional(make(schema))
    fast, slow = model.split()
    n = len(batch)
    g = torch.Generator().manual_seed(1)
    per_task = {k: v.detach() + 0.1 * torch.randn(n, *v.shape, generator=g, dtype=v.dtype)
                for k, v in fast.items()}
    assert_vmap_matches_loop(model, fast, slow, batch.query, per_task)


@pytest.mark.parametrize("kwargs,expected", [
    ({}, FAST),
    ({"lora_rank": 2}, {f"{m}.lora_{x}" for m in ("scorer.0", "output") for x in "AB"}),
    ({"lora_rank": 2, "lora_targets": ["blocks.*.ffn_in"]},
     {f"blocks.{i}.ffn_in.lora_{x}" for i in range(2) for x in "AB"}),
])
def test_declared_fast_parameters_are_exactly_what_the_inner_loop_changes(schema, batch,
                                                                          kwargs, expected):
    backbone = make(schema, **kwargs)
    names = set(select_parameters(backbone, backbone.default_fast_parameters()))
    assert names == expected
    model = functional(backbone)
    # The encoder fast path is on exactly when no fast parameter is in the encoder.
    assert model.encodes == (not any(n.startswith("blocks") for n in names))
    assert_inner_loop_changes_exactly(backbone, model, names, task(batch.support, 0))
    head = select_parameters(backbone, backbone.head_parameters())
    assert set(head) == ({"output.weight", "output.bias"} if not kwargs
                         else {"output.lora_A", "output.lora_B"} if len(kwargs) == 1
                         else {"output.weight", "output.bias"})


def test_encoded_fast_path_equals_the_full_forward(schema, batch):
    assert_encoded_path_equals_full_forward(functional(make(schema)), task(batch.support, 1))


def test_functional_forward_scores_an_encoded_batch_as_the_module(schema, batch):
    """With the batch's encoding present, the pure scorer equals the module's forward; without
    it (or with a LoRA-wrapped head) it steps aside for ``functional_call``."""
    backbone = make(schema)
    params = dict(backbone.named_parameters())
    x = {k: v for k, v in batch.support.items() if k not in ("label", "mask", "time")}
    encoded = {**x, ENCODED: backbone(x, encode_only=True)}
    assert torch.equal(backbone.functional_forward(params, encoded), backbone(encoded))
    assert backbone.functional_forward(params, x) is NotImplemented
    model = functional(backbone)
    fast, slow = model.split()
    assert torch.equal(model.predict(fast, slow, model.prepare(slow, batch.support)),
                       backbone(x))
    lora = make(schema, lora_rank=2)
    assert lora.functional_forward(dict(lora.named_parameters()),
                                   {**x, ENCODED: lora(x, encode_only=True)}) is NotImplemented


def test_explicit_starts_at_the_scale_midpoint_and_implicit_at_zero(setup):
    table, _ = setup
    explicit = make(table.schema)
    lo, hi = table.schema.rating_range
    assert float(explicit.output.bias) == (lo + hi) / 2
    implicit_schema = copy.copy(table.schema)
    implicit_schema.feedback, implicit_schema.rating_range = "implicit", None
    assert float(make(implicit_schema).output.bias) == 0.0


def test_missing_history_says_to_set_history_length(schema):
    x = random_features(schema, (3,))
    x = {k: v for k, v in x.items() if not k.startswith("history.")}
    with pytest.raises(ValueError, match="data.history_length"):
        make(schema)(x)
    assert resolve("backbones", "transformer").needs_history is True


def test_no_fast_parameter_is_a_table(schema):
    backbone = make(schema)
    params = dict(backbone.named_parameters())
    for n in select_parameters(backbone, backbone.default_fast_parameters()):
        assert params[n].shape[0] not in (schema.num_items, schema.num_users)
    assert all(not isinstance(backbone.get_submodule(n.rpartition(".")[0]), nn.Embedding)
               for n in select_parameters(backbone, backbone.default_fast_parameters()))


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "pretrain"])
def test_cli_fast_dev_run(algorithm, in_tmp):
    trainer = MetarecCLI(args=[
        "fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--trainer.fast_dev_run",
        "1", "--model.algorithm", algorithm, "--model.backbone", "transformer",
        "--model.backbone_args", "{dim: 8, heads: 2}", "--data.history_length", "8"]).trainer
    assert trainer.global_step == 1
    for key in ("train/loss", "val/loss", "val/step0/loss"):
        assert bool(trainer.callback_metrics[key].isfinite()), key


def test_cli_without_history_length_fails_clearly(in_tmp):
    with pytest.raises(ValueError, match="data.history_length"):
        MetarecCLI(args=[
            "fit", "--config", str(REPO / "recipes" / "quickstart.yaml"),
            "--trainer.fast_dev_run", "1", "--model.backbone", "transformer",
            "--model.backbone_args", "{dim: 8}"])
