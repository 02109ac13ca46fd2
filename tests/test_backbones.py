"""Backbones (melu, mf, twotower, LoRA): shapes, vmap, fast/slow partition, cold-start prior."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import (
    REPO,
    assert_inner_loop_changes_exactly,
    assert_vmap_matches_loop,
    synthetic_batch,
    synthetic_setup,
)
from metarec import FunctionalModel, build, select_parameters
from metarec.cli import MetarecCLI
from metarec_plugins.algorithms.maml import MAML
from metarec_plugins.backbones.feature_tables import MultiHotEmbedding
from metarec_plugins.backbones.lora import LoRA, LoRALinear, add_lora
from metarec_plugins.backbones.mf import MatrixFactorization
from metarec_plugins.backbones.twotower import TwoTower

LORA = "metarec_plugins.backbones.lora:LoRA"
SMALL_MELU = {"embedding_dim": 4, "hidden": (8, 6)}
SMALL_TOWER = {"embedding_dim": 4, "hidden": (8,), "dim": 6}
# name -> (backbone, args, the documented default fast parameters)
CONFIGS = {
    "melu": ("melu", SMALL_MELU,
             {"decision.0.weight", "decision.0.bias", "decision.2.weight", "decision.2.bias",
              "output.weight", "output.bias"}),
    "mf": ("mf", {"embedding_dim": 5}, {"user_default", "user_default_bias"}),
    "mf-plain": ("mf", {"embedding_dim": 5, "user_features": False},
                 {"user_default", "user_default_bias"}),
    "mf-table": ("mf", {"embedding_dim": 5, "use_user_table": True},
                 {"user_default", "user_default_bias"}),
    "twotower": ("twotower", SMALL_TOWER, {"user_tower.out.weight", "user_tower.out.bias"}),
    "twotower-mlp": ("twotower", {**SMALL_TOWER, "scorer": "mlp", "scorer_hidden": (7,)},
                     {"user_tower.out.weight", "user_tower.out.bias"}),
    "twotower-lora": ("twotower", {**SMALL_TOWER, "lora_rank": 2},
                      {f"user_tower.{m}.lora_{x}" for m in ("body.0", "out") for x in "AB"}),
    "lora-melu": (LORA, {"backbone": "melu", "backbone_args": SMALL_MELU, "rank": 2},
                  {f"backbone.{m}.lora_{x}" for m in ("decision.0", "decision.2", "output")
                   for x in "AB"}),
}


@pytest.fixture(scope="module")
def schema():
    table, _ = synthetic_setup()
    return table.schema


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch(n_tasks=5)[1]


def make(schema, config: str, seed: int = 0) -> nn.Module:
    name, args, _ = CONFIGS[config]
    torch.manual_seed(seed)
    return build("backbones", name, copy.deepcopy(args), schema=schema).double()


def functional(backbone) -> FunctionalModel:
    return FunctionalModel(backbone, select_parameters(backbone,
                                                       backbone.default_fast_parameters()),
                           "explicit")


def random_features(schema, lead: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"user_id": torch.randint(schema.num_users, lead, generator=g),
           "item_id": torch.randint(schema.num_items, lead, generator=g)}
    for spec in schema.features:
        out[spec.key] = (torch.randint(spec.cardinality, lead, generator=g)
                         if spec.kind == "categorical" else
                         (torch.rand(*lead, spec.cardinality, generator=g) < 0.3).double())
    return out


def task(side: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    return {k: v[t] for k, v in side.items()}


def perturbed(fast: dict[str, torch.Tensor], n_tasks: int) -> dict[str, torch.Tensor]:
    """Different fast parameters per task: ``fast + 0.1 * (t + 1) * noise``."""
    g = torch.Generator().manual_seed(1)
    scale = torch.arange(1, n_tasks + 1, dtype=torch.float64)
    return {k: v.detach() + 0.1 * scale.view(-1, *[1] * v.ndim)
            * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in fast.items()}


def table_like(backbone: nn.Module, names) -> list[str]:
    """Those of ``names`` that are a whole embedding table (per user or per item rows)."""
    schema = backbone.schema
    tables = {f"{m}.{p}" for m, mod in backbone.named_modules()
              if isinstance(mod, (nn.Embedding, MultiHotEmbedding))
              for p, _ in mod.named_parameters(recurse=False)}
    params = dict(backbone.named_parameters())
    return [n for n in names if n in tables or
            (params[n].ndim and params[n].shape[0] in (schema.num_users, schema.num_items))]


# -- every backbone --------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("lead", [(7,), (3, 5), (2, 3, 4)], ids=str)
def test_output_shape_for_any_leading_dims(schema, config, lead):
    backbone = make(schema, config)
    x = random_features(schema, lead)
    scores = backbone(x)
    assert scores.shape == lead and scores.dtype == torch.float64
    assert bool(scores.isfinite().all())
    # The same pairs flattened score the same: the leading dims are only batch dims.
    flat = {k: v.reshape(-1, *v.shape[len(lead):]) for k, v in x.items()}
    torch.testing.assert_close(backbone(flat).reshape(lead), scores)


@pytest.mark.parametrize("config", CONFIGS)
def test_vmapped_forward_equals_per_task_loop(schema, batch, config):
    backbone = make(schema, config)
    model = functional(backbone)
    fast, slow = model.split()
    assert_vmap_matches_loop(model, fast, slow, batch.query, perturbed(fast, len(batch)))


@pytest.mark.parametrize("config", CONFIGS)
def test_declared_fast_parameters_are_exactly_what_the_inner_loop_changes(schema, batch, config):
    backbone = make(schema, config)
    names = set(select_parameters(backbone, backbone.default_fast_parameters()))
    assert names == CONFIGS[config][2]
    assert_inner_loop_changes_exactly(backbone, functional(backbone), names,
                                      task(batch.support, 0))


@pytest.mark.parametrize("config", CONFIGS)
def test_no_fast_or_head_parameter_is_a_whole_table(schema, config):
    backbone = make(schema, config)
    for patterns in (backbone.default_fast_parameters(), backbone.head_parameters()):
        assert table_like(backbone, select_parameters(backbone, patterns)) == []


def test_table_check_can_fail(schema):
    backbone = make(schema, "mf-table")
    names = select_parameters(backbone, ["item_embedding.*", "user_bias.*", "user_default"])
    assert table_like(backbone, names) == ["item_embedding.weight", "user_bias.weight"]


# -- mf --------------------------------------------------------------------------------------

def _hand_score(m: MatrixFactorization, x: dict[str, torch.Tensor], j: int) -> torch.Tensor:
    """Score of pair ``j`` of a 1-D batch, written out term by term."""
    p, b = m.user_default.clone(), m.user_default_bias.clone()
    if m.user_features is not None:
        for spec in m.schema.of("user"):
            row = m.user_features.tables[spec.key.replace(".", "__")].weight[x[spec.key][j]]
            p, b = p + row[:-1], b + row[-1]
    if m.use_user_table:
        u = x["user_id"][j]
        p, b = p + m.user_embedding.weight[u], b + m.user_bias.weight[u, 0]
    i = x["item_id"][j]
    return m.global_bias + b + m.item_bias.weight[i, 0] + p @ m.item_embedding.weight[i]


@pytest.mark.parametrize("config", ["mf", "mf-plain", "mf-table"])
def test_mf_new_user_scores_from_the_default_row(schema, config):
    m = make(schema, config)
    with torch.no_grad():  # a trained-looking model: every term non-zero
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if m.use_user_table:  # the user of pair 0 was never trained: its row is still zero
            m.user_embedding.weight[3].zero_()
            m.user_bias.weight[3].zero_()
    x = random_features(schema, (6,), seed=2)
    x["user_id"][0] = 3
    with torch.no_grad():
        scores = m(x)
        for j in range(6):
            torch.testing.assert_close(scores[j], _hand_score(m, x, j))
        # Moving the meta-learned default moves a new user's score by exactly <delta, q_i>.
        delta = torch.randn(m.dim, dtype=torch.float64)
        m.user_default.add_(delta)
        m.user_default_bias.add_(0.5)
        moved = m(x)
    expected = scores + 0.5 + m.item_embedding.weight[x["item_id"]].detach() @ delta
    torch.testing.assert_close(moved, expected)


def test_mf_unseen_user_with_table_starts_exactly_at_the_prior(schema):
    m = make(schema, "mf-table")
    plain = make(schema, "mf")  # same seed: same defaults, no table
    x = random_features(schema, (8,), seed=3)
    # The table is zero-initialised: before training it changes nothing.
    torch.testing.assert_close(m(x), plain(x))


def test_mf_default_row_is_meta_learned(batch, schema):
    m = make(schema, "mf")
    loss, _ = MAML(inner_steps=2, inner_lr=0.5).outer_loss(functional(m), batch)
    loss.backward()
    for name in ("user_default", "user_default_bias", "item_embedding.weight", "global_bias"):
        grad = dict(m.named_parameters())[name].grad
        assert grad is not None and grad.abs().max() > 0, name


# -- twotower --------------------------------------------------------------------------------

@pytest.mark.parametrize("scorer", ["dot", "mlp"])
def test_twotower_scorers_train(schema, batch, scorer):
    torch.manual_seed(0)
    backbone = TwoTower(schema, **{**SMALL_TOWER, "scorer": scorer}).double()
    model, algo = functional(backbone), MAML(inner_steps=1, inner_lr=0.1)
    opt = torch.optim.Adam(backbone.parameters(), lr=0.01)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss, _ = algo.outer_loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    head = select_parameters(backbone, backbone.head_parameters())
    assert head == (["user_tower.out.weight", "user_tower.out.bias"] if scorer == "dot"
                    else ["scorer.out.weight", "scorer.out.bias"])


def test_twotower_dot_scorer_is_bias_plus_inner_product(schema):
    torch.manual_seed(0)
    m = TwoTower(schema, **SMALL_TOWER).double()
    x = random_features(schema, (4,))
    u, v = m.user_tower(x), m.item_tower(x)
    expected = m.global_bias + u[:, -1] + v[:, -1] + (u[:, :-1] * v[:, :-1]).sum(-1)
    torch.testing.assert_close(m(x), expected)
    assert float(m.global_bias) == 3.0  # the middle of the 1-5 scale


def test_twotower_without_user_inputs_uses_a_learned_vector():
    from metarec import DataSchema, FeatureSpec

    schema = DataSchema(num_users=9, num_items=11,
                        features=(FeatureSpec("genre", "item", "multihot", 4),))
    m = TwoTower(schema, **SMALL_TOWER).double()
    x = random_features(schema, (2, 3))
    assert m(x).shape == (2, 3)
    assert m.user_tower.constant is not None


def test_twotower_rejects_unknown_scorer(schema):
    with pytest.raises(ValueError, match="scorer"):
        TwoTower(schema, scorer="cosine")


# -- LoRA ------------------------------------------------------------------------------------

def test_lora_linear_starts_as_the_base_layer_and_is_low_rank():
    torch.manual_seed(0)
    base = nn.Linear(6, 4).double()
    layer = LoRALinear(copy.deepcopy(base), rank=2, alpha=4.0)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    assert torch.equal(layer(x), base(x))  # B = 0: bit-identical
    assert bool((layer.lora_A != 0).all()) and bool((layer.lora_B == 0).all())
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = F.linear(x, base.weight + 2.0 * layer.lora_B @ layer.lora_A, base.bias)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.effective_weight() - base.weight,
                               2.0 * layer.lora_B @ layer.lora_A)
    assert torch.linalg.matrix_rank(layer.effective_weight() - base.weight) == 2


def test_add_lora_wraps_matching_linears_and_keeps_outputs(schema):
    melu = make(schema, "melu")
    wrapped = copy.deepcopy(melu)
    names = add_lora(wrapped, ["decision.*"], rank=3)
    assert names == ["decision.0.lora_A", "decision.0.lora_B",
                     "decision.2.lora_A", "decision.2.lora_B"]
    assert isinstance(wrapped.decision[0], LoRALinear) and isinstance(wrapped.output, nn.Linear)
    x = random_features(schema, (3, 4))
    assert torch.equal(wrapped(x), melu(x))
    # Again, with more targets: nothing is wrapped twice.
    assert add_lora(wrapped, ["decision.*", "output"], rank=3) == [*names, "output.lora_A",
                                                                   "output.lora_B"]
    assert isinstance(wrapped.decision[0].base, nn.Linear)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        add_lora(wrapped, ["embeddings.user__*"], rank=2)  # nn.Embedding


@pytest.mark.parametrize("config", ["twotower-lora", "lora-melu"])
def test_lora_backbone_equals_its_base_model_at_init(schema, config):
    lora = make(schema, config)
    plain = (make(schema, "twotower") if config == "twotower-lora" else make(schema, "melu"))
    # Same seed: the adapters are created after every base weight, so the bases are equal.
    base_state = {k.replace(".base.", ".").removeprefix("backbone." if config == "lora-melu"
                                                        else ""): v
                  for k, v in lora.state_dict().items() if ".lora_" not in k}
    assert base_state.keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(base_state[k], v), k
    x = random_features(schema, (2, 5))
    assert torch.equal(lora(x), plain(x))


@pytest.mark.parametrize("config", ["twotower-lora", "lora-melu"])
def test_one_inner_step_changes_only_adapters(schema, batch, config):
    backbone = make(schema, config)
    model = functional(backbone)
    fast, slow = model.split()
    assert fast and all(".lora_" in n for n in fast)
    adapted = MAML(inner_steps=1, inner_lr=0.1).adapt(model, fast, slow, task(batch.support, 1))
    after = {**slow, **adapted}
    changed = {n for n, p in backbone.named_parameters() if not torch.equal(after[n], p)}
    # One step from B = 0 moves every B (A's gradient is B^T(...) = 0 until then).
    assert changed == {n for n in fast if n.endswith("lora_B")}
    scores = model.predict(adapted, slow, task(batch.query, 1))
    assert (scores - model.predict(fast, slow, task(batch.query, 1))).abs().max() > 0


def test_lora_makes_the_fast_set_small(schema):
    sizes = {}
    for config in ("twotower", "twotower-lora"):
        backbone = make(schema, config)
        fast = select_parameters(backbone, backbone.default_fast_parameters())
        params = dict(backbone.named_parameters())
        sizes[config] = sum(params[n].numel() for n in fast)
    # rank 2 on user_tower.body.0 (8x8) and user_tower.out (7x8) vs the full out layer (7x9)
    assert sizes == {"twotower": 7 * 9, "twotower-lora": 2 * (8 + 8) + 2 * (8 + 7)}


def test_lora_wrapper_needs_linear_targets(schema):
    with pytest.raises(ValueError, match="no nn.Linear"):
        LoRA(schema, backbone="mf", backbone_args={"embedding_dim": 4})
    head = make(schema, "lora-melu").head_parameters()
    assert head == ["backbone.output.lora_A", "backbone.output.lora_B"]


@pytest.mark.parametrize("backbone,args", [
    ("twotower", "{lora_rank: 2}"),
    (LORA, "{backbone: melu, rank: 2}"),
])
@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_lora_from_the_cli(backbone, args, algorithm, in_tmp):
    trainer = MetarecCLI(args=[
        "fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--trainer.fast_dev_run",
        "1", "--model.algorithm", algorithm, "--model.backbone", backbone,
        "--model.backbone_args", args]).trainer
    assert trainer.global_step == 1
    assert bool(trainer.callback_metrics["val/loss"].isfinite())
