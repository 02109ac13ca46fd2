"""Multi-hot features as bags of category ids: the sparse gather equals the dense form."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from conftest import synthetic_setup
from metarec import DataSchema, FeatureSpec, FunctionalModel, build, select_parameters
from metarec.data import EpisodeCollator
from metarec.data.episodes import to_bags
from metarec.datamodule import EpisodeDataModule
from metarec_plugins.algorithms.maml import MAML
from metarec_plugins.backbones.bags import bag_mean

SCHEMA = DataSchema(num_users=9, num_items=11, features=(
    FeatureSpec("hobby", "user", "multihot", 5), FeatureSpec("age", "user", "categorical", 3),
    FeatureSpec("genre", "item", "multihot", 7), FeatureSpec("year", "item", "categorical", 4)))
BACKBONES = {"melu": {"embedding_dim": 4, "hidden": (8, 6)},
             "twotower": {"embedding_dim": 4, "hidden": (8,), "dim": 6},
             "mf": {"embedding_dim": 5},
             "transformer": {"dim": 8, "layers": 1, "heads": 2, "scorer_hidden": (6,)},
             "tanp": {"embedding_dim": 4, "encoder_hidden": (6,), "r_dim": 4, "s_dim": 4,
                      "z_dim": 4, "identity_hidden": (6,), "task_dim": 4, "clusters": 3,
                      "decoder_hidden": (6, 5)},
             "mamo": {"embedding_dim": 4}}


def _dense(lead, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(*lead, k, generator=g) < 0.35).double()
    x.view(-1, k)[0] = 0  # a row with no active category
    return x


def _features(lead, seed=0, history=3):
    g = torch.Generator().manual_seed(seed)
    x = {"user_id": torch.randint(9, lead, generator=g), "item_id": torch.randint(11, lead, generator=g),
         "user.hobby": _dense(lead, 5, seed + 1), "user.age": torch.randint(3, lead, generator=g),
         "item.genre": _dense(lead, 7, seed + 2), "item.year": torch.randint(4, lead, generator=g),
         "history.item_id": torch.randint(11, (*lead, history), generator=g),
         "history.label": torch.randint(1, 6, (*lead, history), generator=g).double(),
         "history.mask": torch.rand(*lead, history, generator=g) < 0.7,
         "history.item.genre": _dense((*lead, history), 7, seed + 3),
         "history.item.year": torch.randint(4, (*lead, history), generator=g)}
    return x


def _as_bags(x):
    return {k: to_bags(v.reshape(-1, v.shape[-1])).reshape(*v.shape[:-1], -1)
            if k.endswith(("hobby", "genre")) else v for k, v in x.items()}


def test_to_bags_lists_the_active_ids():
    dense = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.float32)
    assert to_bags(dense).tolist() == [[1, 3, -1], [-1, -1, -1], [0, 1, 2]]
    assert to_bags(dense, width=4).tolist() == [[1, 3, -1, -1], [-1, -1, -1, -1], [0, 1, 2, -1]]
    with pytest.raises(ValueError, match="bag width"):
        to_bags(dense, width=2)


def test_bag_mean_equals_the_dense_mean_with_gradients_under_vmap():
    rows = torch.randn(7, 3, dtype=torch.float64)
    dense = _dense((4, 5), 7, 0)
    bags = to_bags(dense.reshape(-1, 7)).reshape(4, 5, -1)
    torch.testing.assert_close(bag_mean(bags, rows), bag_mean(dense, rows))
    assert torch.equal(bag_mean(bags, rows)[0, 0], torch.zeros(3, dtype=torch.float64))

    def loss(r, x):
        return (bag_mean(x, r) ** 2).sum()
    g_dense = vmap(grad(loss), in_dims=(None, 0))(rows, dense)
    g_bags = vmap(grad(loss), in_dims=(None, 0))(rows, bags)
    torch.testing.assert_close(g_bags, g_dense)


@pytest.mark.parametrize("name", BACKBONES)
def test_backbones_score_bags_as_the_dense_form(name):
    torch.manual_seed(0)
    backbone = build("backbones", name, dict(BACKBONES[name]), schema=SCHEMA).double()
    dense = _features((3, 4))
    bags = _as_bags(dense)
    torch.testing.assert_close(backbone(bags), backbone(dense), rtol=1e-12, atol=1e-12)
    # And the meta-gradient (second-order MAML, vmapped over the 3 tasks) is the same.
    model = FunctionalModel(backbone, select_parameters(backbone,
                                                        backbone.default_fast_parameters()),
                            "explicit")
    fast, slow = model.split()
    g = torch.Generator().manual_seed(1)

    def side(x):
        lead = x["item_id"].shape
        return {**x, "label": torch.randint(1, 6, lead, generator=g).double(),
                "mask": torch.ones(lead, dtype=torch.bool)}
    from metarec import EpisodeBatch
    labels = side(dense)
    make = lambda x: EpisodeBatch(users=torch.arange(3), support={**x, "label": labels["label"],  # noqa: E731
                                                                  "mask": labels["mask"]},
                                  query={**x, "label": labels["label"], "mask": labels["mask"]})
    grads = []
    for x in (dense, bags):
        torch.manual_seed(2)  # the same draws for a stochastic backbone (TaNP's latent z)
        loss, _ = MAML(inner_steps=2, inner_lr=0.1).outer_loss(model, make(x))
        grads.append(torch.autograd.grad(loss, list(backbone.parameters()), allow_unused=True))
    for (n, _), a, b in zip(backbone.named_parameters(), *grads):
        if a is None:
            assert b is None, n
        else:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=n)


def test_collator_with_bags_gives_the_same_features_as_ids():
    table, splits = synthetic_setup()
    dense = EpisodeCollator(splits["train"], table, history_length=4)(list(range(5)))
    bags = EpisodeCollator(splits["train"], table, history_length=4, bags=True)(list(range(5)))
    multihot = [s.key for s in table.schema.features if s.kind == "multihot"]
    assert multihot
    for side_d, side_b in ((dense.support, bags.support), (dense.query, bags.query)):
        assert side_d.keys() == side_b.keys()
        for key in side_d:
            base = key.removeprefix("history.")
            if base in multihot:
                assert side_b[key].dtype == torch.long
                back = torch.zeros_like(side_d[key]).reshape(-1, side_d[key].shape[-1])
                ids = side_b[key].reshape(len(back), -1)
                rows = torch.arange(len(back))[:, None].expand_as(ids)
                back[rows[ids >= 0], ids[ids >= 0]] = 1
                assert torch.equal(back.reshape(side_d[key].shape), side_d[key]), key
            else:
                assert torch.equal(side_d[key], side_b[key]), key


def test_datamodule_option(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    dm = EpisodeDataModule(dataset_args={"num_users": 60, "num_items": 80}, batch_size=4,
                           multihot_bags=True)
    batch = next(iter(dm.train_dataloader()))
    keys = [s.key for s in dm.table.schema.features if s.kind == "multihot"]
    assert keys and all(batch.support[k].dtype == torch.long for k in keys)
    val = next(iter(dm.val_dataloader()))
    assert all(val.query[k].dtype == torch.long for k in keys)
