"""Large-vocabulary synthetic data and the 100M-parameter scale recipe's configuration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from metarec_plugins.datasets import synthetic
from metarec_plugins.datasets.synthetic import SyntheticDataset, _distinct_items

REPO = Path(__file__).resolve().parents[1]


def _assert_distinct_per_user(counts: np.ndarray, items: np.ndarray, num_items: int) -> None:
    users = np.repeat(np.arange(len(counts)), counts)
    assert len(items) == counts.sum()
    assert items.min() >= 0 and items.max() < num_items
    assert len(np.unique(users * num_items + items)) == len(items), "an item repeats for a user"


def test_rejection_draw_gives_distinct_items_even_when_collisions_are_common(monkeypatch):
    # 5 of 50 items per user: about one user in five collides on the first draw, so redraw
    # rounds must run (the sparse regime where redrawing is used).
    monkeypatch.setattr(synthetic, "_DENSE_DRAW_CELLS", 0)  # force the large-catalogue path
    counts = np.full(3000, 5)
    items = _distinct_items(np.random.default_rng(0), counts, 50)
    _assert_distinct_per_user(counts, items, 50)
    np.testing.assert_array_equal(items, _distinct_items(np.random.default_rng(0), counts, 50))


def test_dense_large_problems_draw_by_blocks_not_by_endless_redraws(monkeypatch):
    """Users who rate most of a catalogue: the permutation draw, a block of users at a time
    (redrawing repeats would take thousands of rounds)."""
    monkeypatch.setattr(synthetic, "_DENSE_DRAW_CELLS", 50 * 200)  # 50 users per block
    counts = np.random.default_rng(0).integers(150, 201, 2000)
    items = _distinct_items(np.random.default_rng(1), counts, 200)
    _assert_distinct_per_user(counts, items, 200)


def test_million_item_catalogue_loads_without_a_users_by_items_matrix():
    table = SyntheticDataset(num_users=500, num_items=1_000_000, min_interactions=20,
                             max_interactions=40, seed=1).load()
    assert table.num_items == 1_000_000
    counts = np.bincount(table.users, minlength=500)
    assert counts.min() >= 20 and counts.max() <= 40
    _assert_distinct_per_user(counts, table.items, 1_000_000)
    # Spread over the catalogue, not the first few items.
    assert table.items.max() > 900_000


def test_scale_recipe_has_over_100m_parameters_and_under_1_percent_fast():
    """Builds the backbone of recipes/scale/transformer-large.yaml (no data, no training)."""
    import torch

    from metarec import DataSchema, registry
    from metarec.callbacks import parameter_counts
    from metarec.functional import FunctionalModel, select_parameters

    recipe = yaml.safe_load((REPO / "recipes/scale/transformer-large.yaml").read_text())
    model = recipe["model"]
    args = recipe["data"]["dataset_args"]
    # The schema the synthetic data set produces, without generating the interactions.
    table = SyntheticDataset(**{**args, "num_users": 50, "min_interactions": 20,
                                "max_interactions": 20}).load()
    schema = DataSchema(table.schema.num_users, table.schema.num_items, table.schema.features,
                        "explicit", table.rating_range)
    torch.manual_seed(0)
    backbone = registry.build("backbones", model["backbone"], model["backbone_args"],
                              schema=schema)
    fast = select_parameters(backbone, backbone.default_fast_parameters())

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.functional = FunctionalModel(backbone, fast, "explicit")

    counts = parameter_counts(Holder())
    assert counts["backbone"] >= 100_000_000
    assert 0 < counts["fast_fraction"] <= 0.01
    assert counts["fast"] == sum(p.numel() for n, p in backbone.named_parameters() if n in fast)


@pytest.mark.slow
def test_scale_recipe_meta_trains_from_the_cli(tmp_path):
    """The acceptance command (one meta-step here, three in docs/results.md): exits 0 and
    reports >= 100M parameters with <= 1% fast. Needs ~9 GB of memory."""
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, "-m", "metarec", "fit", "--config",
         str(REPO / "recipes/scale/transformer-large.yaml"), "--trainer.max_steps", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    line = re.search(r"metarec parameters: backbone ([\d,]+), fast ([\d,]+) \(([\d.]+)%",
                     out.stdout)
    assert line, out.stdout[-3000:]
    backbone, fast = (int(line.group(i).replace(",", "")) for i in (1, 2))
    assert backbone >= 100_000_000 and 0 < fast <= 0.01 * backbone
    assert "max_steps=1` reached" in out.stdout + out.stderr
