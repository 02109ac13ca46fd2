"""Every shipped recipe runs end to end through the CLI (fast_dev_run)."""

from __future__ import annotations

import pytest

from conftest import REPO, ml100k_root
from metarec.cli import MetarecCLI

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "sweeps" not in p.parts)


def _needs_ml100k(path) -> bool:
    return "movielens" in path.read_text()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_fast_dev_run(recipe, in_tmp, monkeypatch):
    if _needs_ml100k(recipe):
        root = ml100k_root()
        if root is None:
            pytest.skip("MovieLens-100K not found (METAREC_DATA or ../shared/data)")
        monkeypatch.setenv("METAREC_DATA", str(root.parent))
    cli = MetarecCLI(args=["fit", "--config", str(recipe), "--trainer.fast_dev_run", "1"])
    trainer = cli.trainer
    assert trainer.state.finished
    assert trainer.global_step == 1
    metrics = trainer.callback_metrics
    assert "train/loss" in metrics and "val/loss" in metrics
    assert all(bool(v.isfinite()) for v in metrics.values())


def test_inference_mode_is_off_by_default(in_tmp):
    """validate/test adapt with gradients, which inference_mode would forbid."""
    cli = MetarecCLI(args=["--config", str(REPO / "recipes" / "quickstart.yaml"),
                           "--trainer.fast_dev_run", "1"], run=False)
    assert cli.trainer.validate_loop.inference_mode is False
    assert cli.trainer.test_loop.inference_mode is False
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    assert "val/step0/loss" in cli.trainer.callback_metrics
