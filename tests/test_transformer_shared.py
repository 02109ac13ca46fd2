"""The transformer scores candidates that share one history (``UserSession.recommend``) in one
batched pass, encoding the history once, with the same scores as slot by slot."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from conftest import synthetic_setup
from metarec import EpisodeCollator, build

SMALL = {"dim": 8, "layers": 2, "heads": 2, "scorer_hidden": (6,)}


@pytest.fixture(scope="module")
def setup():
    table, splits = synthetic_setup(query_strategy="random")
    batch = EpisodeCollator(splits.train, table, history_length=5)(list(range(3)))
    return table, batch


def _candidates(side, n_items):
    """Every item as a candidate for task 0, all with slot 0's history (broadcast, stride 0)."""
    out = {"item_id": torch.arange(n_items), "user_id": side["user_id"][0, :1].expand(n_items)}
    for key, value in side.items():
        if key.startswith("history."):
            out[key] = value[0, 0].expand(n_items, *value.shape[2:])
        elif key.startswith("user."):
            out[key] = value[0, 0].expand(n_items, *value.shape[2:])
    return out


def _item_features(table, items):
    return {f.spec.key: torch.from_numpy(f.values)[items] for f in table.item_features}


@pytest.mark.parametrize("layers", [0, 2])
def test_shared_history_scores_equal_slot_by_slot(setup, layers):
    table, batch = setup
    torch.manual_seed(0)
    model = build("backbones", "transformer", {**SMALL, "layers": layers},
                  schema=table.schema).double().eval()
    n = table.num_items
    query = {k: v.double() if v.is_floating_point() else v for k, v in batch.query.items()}
    items = {k: v.double() if v.is_floating_point() else v
             for k, v in _item_features(table, torch.arange(n)).items()}
    x = {**_candidates(query, n), **items}
    assert model._shared_history(x, 1)
    calls = []
    original = model.target.shared
    model.target.shared = lambda *a: calls.append(1) or original(*a)
    with torch.no_grad():
        fast = model(x)
        materialised = {k: v.contiguous() for k, v in x.items()}  # the same values, per slot
        assert not model._shared_history(materialised, 1)
        slow = model(materialised)
    assert calls == [1]
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    # Per task under vmap (predict_tasks), a broadcast history is detected per task too.
    stacked = {k: v.expand(2, *v.shape) for k, v in x.items()}
    with torch.no_grad():
        torch.testing.assert_close(vmap(model)(stacked), slow.expand(2, -1), rtol=1e-12,
                                   atol=1e-12)


def test_not_shared_while_training_with_dropout(setup):
    table, batch = setup
    model = build("backbones", "transformer", {**SMALL, "dropout": 0.1}, schema=table.schema)
    x = _candidates(batch.query, 4)
    assert not model.train()._shared_history(x, 1)
    assert model.eval()._shared_history(x, 1)
