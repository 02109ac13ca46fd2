"""Shared fixtures: small synthetic tasks, the real MovieLens folder, isolated run dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# The test models are tiny: one thread avoids OpenMP overhead that dominates them (measured 8x).
torch.set_num_threads(1)


def ml100k_root() -> Path | None:
    """The folder holding MovieLens-100K (``$METAREC_DATA`` or ../shared/data), or None."""
    for base in (os.environ.get("METAREC_DATA"), REPO.parent / "shared" / "data"):
        if base and (Path(base) / "ml-100k" / "u.data").is_file():
            return Path(base) / "ml-100k"
    return None


@pytest.fixture
def ml100k() -> Path:
    root = ml100k_root()
    if root is None:
        pytest.skip("MovieLens-100K not found: set METAREC_DATA or put ml-100k in ../shared/data")
    return root


def synthetic_setup(num_users: int = 120, num_items: int = 60, seed: int = 0, **task_kwargs):
    """(table, splits) of a small synthetic data set."""
    from metarec import TaskConfig, build_tasks
    from metarec_plugins.datasets.synthetic import SyntheticDataset

    table = SyntheticDataset(num_users=num_users, num_items=num_items, min_interactions=15,
                             max_interactions=40, seed=seed).load()
    config = TaskConfig(min_interactions=13, max_interactions=40, **task_kwargs)
    return table, build_tasks(table, config, seed=seed)


def synthetic_batch(n_tasks: int = 6, split: str = "train", dtype=torch.float64, **kwargs):
    """(table, episode batch) with ``n_tasks`` tasks; float features cast to ``dtype``."""
    from metarec.data import EpisodeCollator

    table, splits = synthetic_setup(**kwargs)
    batch = EpisodeCollator(splits[split], table)(list(range(n_tasks)))
    for side in (batch.support, batch.query):
        for key, value in side.items():
            if value.is_floating_point():
                side[key] = value.to(dtype)
    return table, batch


def melu_setup(algorithm, n_tasks: int = 4, seed: int = 0):
    """(backbone, functional model, batch): a tiny float64 MeLU bound to ``algorithm``."""
    from metarec import FunctionalModel, select_parameters
    from metarec_plugins.backbones.melu import MeLU

    table, batch = synthetic_batch(n_tasks=n_tasks)
    torch.manual_seed(seed)
    backbone = MeLU(table.schema, embedding_dim=4, hidden=(8, 6)).double()
    model = FunctionalModel(backbone, select_parameters(backbone, algorithm.select_fast(backbone)),
                            "explicit")
    algorithm.double()
    algorithm.bind(model)
    return backbone, model, batch


def assert_vmap_matches_loop(model, fast, slow, query, per_task) -> None:
    """Per-task scores from one vmapped call equal a loop of single-task calls, and the
    per-task fast parameters really matter (otherwise the comparison would be vacuous)."""
    n = len(next(iter(per_task.values())))
    batched = model.predict_tasks(per_task, slow, query)
    assert batched.shape == query["item_id"].shape
    for t in range(n):
        single = model.predict({k: v[t] for k, v in per_task.items()}, slow,
                               {k: v[t] for k, v in query.items()})
        torch.testing.assert_close(batched[t], single, rtol=1e-10, atol=1e-10)
    shared = model.predict_tasks({k: v.detach().expand(n, *v.shape) for k, v in fast.items()},
                                 slow, query)
    assert (batched - shared).abs().max() > 1e-6


def assert_inner_loop_changes_exactly(backbone, model, names, support) -> None:
    """Two MAML inner steps on one task change exactly the parameters ``names`` (two: LoRA's A
    only moves once B has left zero), and never write the module itself."""
    from metarec_plugins.algorithms.maml import MAML

    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    fast, slow = model.split()
    adapted = MAML(inner_steps=2, inner_lr=0.1).adapt(model, fast, slow, support)
    after = {**slow, **adapted}
    assert set(after) == {n for n, _ in backbone.named_parameters()}
    changed = {n for n, p in backbone.named_parameters() if not torch.equal(after[n], p)}
    assert changed == set(names)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, state[k]), k


def assert_encoded_path_equals_full_forward(model, support) -> None:
    """MAML's inner loop on one task with the slow-only encoding computed once
    (``model.encodes``) equals the same loop re-encoding at every step."""
    from metarec import ENCODED, FunctionalModel
    from metarec_plugins.algorithms.maml import MAML

    assert model.encodes
    fast, slow = model.split()
    full = FunctionalModel(model.backbone, model.fast_names, model.feedback)
    full.encodes = False
    a = MAML(inner_steps=3, inner_lr=0.1).adapt(model, fast, slow, support)
    b = MAML(inner_steps=3, inner_lr=0.1).adapt(full, fast, slow, support)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)
    assert ENCODED in model.prepare(slow, support)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in a temporary directory (runs/ and wandb/ files land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    """In-process fits leave their W&B run open (a CLI process closes it at exit); close it so
    the next test's logger starts its own run instead of reusing this one."""
    yield
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def item_task_batch(support_mask=((True, True), (True, True))):
    """Two hand-made item tasks (item 0: genre 1, item 1: genre 0), float64 0/1 labels:
    support of 2 users each (``support_mask``), query of 2 (item 1's second slot padded).
    The item cold-start models' tests compute their losses on it by hand."""
    from metarec.data import EpisodeBatch

    genre = torch.tensor([1, 0])

    def side(users, labels, mask, items):
        items = torch.tensor(items)[:, None].expand(-1, 2)
        return {"user_id": torch.tensor(users), "item_id": items, "item.genre": genre[items],
                "label": torch.tensor(labels, dtype=torch.float64), "mask": torch.tensor(mask)}

    return EpisodeBatch(users=torch.tensor([0, 1]),
                        support=side([[0, 1], [2, 0]], [[1.0, 0.0], [1.0, 1.0]],
                                     [list(m) for m in support_mask], [0, 1]),
                        query=side([[2, 1], [1, 2]], [[0.0, 1.0], [0.0, 0.0]],
                                   [[True, True], [True, False]], [0, 1]))
