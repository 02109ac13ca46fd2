"""How a plugin author tests a metarec plugin: against the public API only.

The checks: the entry points resolve; ``lam = 0`` reproduces metarec's own MAML exactly; the
meta-gradient matches a plain-autograd unrolled reference; a large ``lam`` keeps the adapted
parameters near the initialisation; the policy follows the ``AdaptationPolicy`` contract; and
evaluation adapts on the training objective (metarec's ``finetune`` applies L2-MAML's
proximal term; ``example-proximal-finetune`` adds one on top of any algorithm's objective).
Run with ``pip install -e .[test] && pytest`` (the entry-point test needs the package
installed, so that its metadata is visible).
"""

from __future__ import annotations

import pytest
import torch
from metarec_example import L2MAML, ProximalFineTune, squared_distance

from metarec import (
    DataSchema,
    EpisodeBatch,
    FunctionalModel,
    PluginError,
    build,
    resolve,
    select_parameters,
)

NUM_USERS, NUM_ITEMS = 40, 30


def make_batch(n_tasks: int = 5, n_support: int = 12, n_query: int = 6,
               seed: int = 0) -> EpisodeBatch:
    """A padded batch of tasks built by hand: the layout every algorithm receives.

    ``support``/``query`` map keys to ``(tasks, slots)`` tensors; ``mask`` marks the real
    entries (tasks have different sizes, the rest is padding); labels are float ratings.
    """
    g = torch.Generator().manual_seed(seed)
    users = torch.randperm(NUM_USERS, generator=g)[:n_tasks]

    def side(width: int) -> dict[str, torch.Tensor]:
        lengths = torch.randint(width // 2, width + 1, (n_tasks,), generator=g)
        return {
            "user_id": users[:, None].expand(n_tasks, width),
            "item_id": torch.randint(0, NUM_ITEMS, (n_tasks, width), generator=g),
            "label": torch.randint(1, 6, (n_tasks, width), generator=g).double(),
            "mask": torch.arange(width)[None, :] < lengths[:, None],
            "time": torch.zeros(n_tasks, width, dtype=torch.long),
        }

    return EpisodeBatch(users=users, support=side(n_support), query=side(n_query))


def make_model(seed: int = 0) -> FunctionalModel:
    """metarec's MeLU backbone on id embeddings, in float64 for tight comparisons."""
    torch.manual_seed(seed)
    schema = DataSchema(num_users=NUM_USERS, num_items=NUM_ITEMS)
    backbone = build("backbones", "melu", {"embedding_dim": 4, "hidden": [8, 6], "use_ids": True},
                     schema=schema).double()
    fast = select_parameters(backbone, backbone.default_fast_parameters())
    return FunctionalModel(backbone, fast, schema.feedback)


def detached(model: FunctionalModel):
    """``(fast, slow)`` as a policy receives them: detached copies of the parameters."""
    return ({k: v.detach() for k, v in d.items()} for d in model.split())


def meta_grads(loss: torch.Tensor, model: FunctionalModel) -> list[torch.Tensor]:
    params = list(model.backbone.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def test_entry_points_resolve_to_the_plugin_classes():
    assert resolve("algorithms", "example-l2maml") is L2MAML
    assert resolve("policies", "example-proximal-finetune") is ProximalFineTune


@pytest.mark.parametrize("first_order", [False, True])
def test_lam_zero_is_exactly_metarecs_maml(first_order):
    batch, model = make_batch(), make_model()
    maml = build("algorithms", "maml", {"inner_steps": 3, "inner_lr": 0.1,
                                        "first_order": first_order})
    ours = L2MAML(inner_steps=3, inner_lr=0.1, lam=0.0, first_order=first_order)
    loss_maml, _ = maml.outer_loss(model, batch)
    loss_ours, _ = ours.outer_loss(model, batch)
    torch.testing.assert_close(loss_ours, loss_maml, rtol=0, atol=0)
    for a, b in zip(meta_grads(loss_ours, model), meta_grads(loss_maml, model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _reference_outer_loss(model: FunctionalModel, batch: EpisodeBatch, steps: int, lr: float,
                          lam: float) -> torch.Tensor:
    """Per-task Python loop with plain ``torch.autograd.grad`` (no torch.func, no vmap)."""
    backbone = model.backbone
    params = dict(backbone.named_parameters())
    fast_names = list(model.fast_names)

    def task_loss(p, side, t):
        x = {k: v[t] for k, v in side.items() if k not in ("label", "mask", "time")}
        m = side["mask"][t].double()
        scores = torch.func.functional_call(backbone, p, (x,))
        return (((scores - side["label"][t]) ** 2) * m).sum() / m.sum()

    total = 0.0
    for t in range(len(batch)):
        p = dict(params)
        for _ in range(steps):
            prox = sum(((p[n] - params[n]) ** 2).sum() for n in fast_names)
            objective = task_loss(p, batch.support, t) + 0.5 * lam * prox
            grads = torch.autograd.grad(objective, [p[n] for n in fast_names], create_graph=True)
            p = {**p, **{n: p[n] - lr * g for n, g in zip(fast_names, grads)}}
        total = total + task_loss(p, batch.query, t) / len(batch)
    return total


def test_meta_gradient_matches_unrolled_reference():
    batch, model = make_batch(), make_model()
    loss, logs = L2MAML(inner_steps=3, inner_lr=0.1, lam=2.0).outer_loss(model, batch)
    reference = _reference_outer_loss(model, batch, steps=3, lr=0.1, lam=2.0)
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    for a, b in zip(meta_grads(loss, model), meta_grads(reference, model)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    assert logs["adapted_sq_distance"] > 0


def test_proximal_term_changes_the_meta_gradient():
    batch, model = make_batch(), make_model()
    g0 = meta_grads(L2MAML(3, 0.1, lam=0.0).outer_loss(model, batch)[0], model)
    g1 = meta_grads(L2MAML(3, 0.1, lam=2.0).outer_loss(model, batch)[0], model)
    assert max(float((a - b).abs().max()) for a, b in zip(g0, g1)) > 1e-6


def test_large_lam_keeps_adapted_parameters_near_the_initialisation():
    batch, model = make_batch(), make_model()
    distances = []
    for lam in (0.0, 1.0, 10.0, 100.0):  # inner_lr * lam <= 1: a stable inner loop
        _, logs = L2MAML(inner_steps=5, inner_lr=0.01, lam=lam).outer_loss(model, batch)
        distances.append(float(logs["adapted_sq_distance"]))
    assert all(a > b for a, b in zip(distances, distances[1:])), distances
    # With inner_lr * lam = 1 every step restarts from theta_0: one step's worth of movement
    # instead of five, so the squared distance shrinks by well over 2x.
    assert distances[-1] < 0.5 * distances[0], distances


def test_unstable_or_negative_lam_is_rejected():
    with pytest.raises(PluginError, match="must be < 2"):
        build("algorithms", L2MAML, {"inner_lr": 0.1, "lam": 20.0})
    with pytest.raises(PluginError, match="lam must be >= 0"):
        build("algorithms", L2MAML, {"lam": -1.0})
    with pytest.raises(PluginError, match="lamda"):
        build("algorithms", L2MAML, {"lamda": 1.0})
    with pytest.raises(PluginError, match="lam must be >= 0"):
        build("policies", ProximalFineTune, {"lam": -1.0})
    with pytest.raises(PluginError, match="must be < 2"):
        build("policies", ProximalFineTune, {"lr": 0.5, "lam": 4.0})
    policy = ProximalFineTune(lam=30.0)  # checked against the algorithm's step size on bind
    with pytest.raises(ValueError, match="must be < 2"):
        policy.bind(build("algorithms", "maml", {"inner_lr": 0.1}))


def test_policy_follows_the_adaptation_contract():
    batch, model = make_batch(), make_model()
    algorithm = build("algorithms", "maml", {"inner_steps": 4, "inner_lr": 0.05})
    policy = ProximalFineTune(lam=3.0)
    policy.bind(algorithm)
    assert policy.max_steps == 4  # the default comes from the algorithm
    fast, slow = detached(model)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    iterates = policy.adapt(model, fast, slow, batch.support)
    assert len(iterates) == policy.max_steps + 1
    for step in iterates:
        assert set(step) == set(fast)
        for k, v in step.items():
            assert v.shape == (len(batch), *fast[k].shape)
    for k in fast:  # step 0 is the meta-learned start, for every task
        torch.testing.assert_close(iterates[0][k], fast[k].expand_as(iterates[0][k]))
    for k, v in model.backbone.state_dict().items():  # the model is never mutated
        assert torch.equal(v, before[k]), k
    # On maml with lam = 3, the last iterate is what L2-MAML with lam = 3 adapts to in
    # meta-training (one task at a time, no vmap).
    l2maml = L2MAML(inner_steps=4, inner_lr=0.05, lam=3.0)
    for t in range(len(batch)):
        support = {k: v[t] for k, v in batch.support.items()}
        single = l2maml.adapt(model, fast, slow, support)
        for k in fast:
            torch.testing.assert_close(iterates[-1][k][t], single[k], rtol=1e-9, atol=1e-12)
        assert float(squared_distance({k: v[t] for k, v in iterates[-1].items()}, fast)) > 0


@pytest.mark.parametrize("algorithm", [
    ("maml", {"inner_steps": 3, "inner_lr": 0.1}),
    (L2MAML, {"inner_steps": 3, "inner_lr": 0.1, "lam": 2.0}),
])
def test_policy_with_lam_zero_is_metarecs_finetune(algorithm):
    batch, model = make_batch(), make_model()
    algorithm = build("algorithms", *algorithm)
    ours, theirs = ProximalFineTune(lam=0.0), build("policies", "finetune")
    ours.bind(algorithm)
    theirs.bind(algorithm)
    fast, slow = detached(model)
    for a, b in zip(ours.adapt(model, fast, slow, batch.support),
                    theirs.adapt(model, fast, slow, batch.support), strict=True):
        for k in fast:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_finetune_adapts_l2maml_with_its_proximal_objective():
    """metarec's ``finetune`` reuses the algorithm's inner objective: on an L2-MAML model it
    is exactly ``example-proximal-finetune`` with the same ``lam`` on top of plain MAML."""
    batch, model = make_batch(), make_model()
    fast, slow = detached(model)
    finetune = build("policies", "finetune")
    finetune.bind(L2MAML(inner_steps=3, inner_lr=0.1, lam=2.0))
    proximal = ProximalFineTune(lam=2.0)
    proximal.bind(build("algorithms", "maml", {"inner_steps": 3, "inner_lr": 0.1}))
    plain = build("policies", "finetune")
    plain.bind(build("algorithms", "maml", {"inner_steps": 3, "inner_lr": 0.1}))
    ours = finetune.adapt(model, fast, slow, batch.support)
    for a, b in zip(ours, proximal.adapt(model, fast, slow, batch.support), strict=True):
        for k in fast:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # ... and not the plain support loss: the pull keeps the adapted parameters closer.
    without = plain.adapt(model, fast, slow, batch.support)
    assert (float(squared_distance({k: v[0] for k, v in ours[-1].items()}, fast))
            < float(squared_distance({k: v[0] for k, v in without[-1].items()}, fast)))


def test_policy_adds_its_pull_to_the_algorithms_objective():
    """On L2-MAML (lam = 2), a policy lam of 1 adapts like finetune on L2-MAML with lam = 3."""
    batch, model = make_batch(), make_model()
    fast, slow = detached(model)
    stacked = ProximalFineTune(lam=1.0)
    stacked.bind(L2MAML(inner_steps=3, inner_lr=0.1, lam=2.0))
    finetune = build("policies", "finetune")
    finetune.bind(L2MAML(inner_steps=3, inner_lr=0.1, lam=3.0))
    for a, b in zip(stacked.adapt(model, fast, slow, batch.support),
                    finetune.adapt(model, fast, slow, batch.support), strict=True):
        for k in fast:
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14)
