"""Every shipped recipe runs end to end through the CLI (fast_dev_run)."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO, ml100k_root
from metarec.cli import MetarecCLI

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "sweeps" not in p.parts and not p.name.startswith("simulate"))


def _needs_ml100k(path) -> bool:
    return "movielens" in path.read_text()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_fast_dev_run(recipe, in_tmp, monkeypatch):
    monkeypatch.setenv("METAREC_RECIPES", str(REPO / "recipes"))
    if "algorithm: l2l" in recipe.read_text() and importlib.util.find_spec("learn2learn") is None:
        pytest.skip("learn2learn is not installed here (make test-l2l runs this in its venv)")
    if _needs_ml100k(recipe):
        root = ml100k_root()
        if root is None:
            pytest.skip("MovieLens-100K not found (METAREC_DATA or ../shared/data)")
        monkeypatch.setenv("METAREC_DATA", str(root.parent))
    extra = []
    if "teacher_recipe" in recipe.read_text():  # keep the teacher stage short too
        extra = ["--model.algorithm_args.teacher_overrides",
                 '["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]']
    cli = MetarecCLI(args=["fit", "--config", str(recipe), "--trainer.fast_dev_run", "1", *extra])
    trainer = cli.trainer
    assert trainer.state.finished
    assert trainer.global_step == 1
    metrics = trainer.callback_metrics
    # data.warmup (item cold start) logs validation per stage (val/cold/loss, val/warm_a/...).
    val = "val/cold/loss" if getattr(cli.datamodule, "warmup", None) else "val/loss"
    assert "train/loss" in metrics and val in metrics
    assert all(bool(v.isfinite()) for v in metrics.values())


def test_inference_mode_is_off_by_default(in_tmp):
    """validate/test adapt with gradients, which inference_mode would forbid."""
    cli = MetarecCLI(args=["--config", str(REPO / "recipes" / "quickstart.yaml"),
                           "--trainer.fast_dev_run", "1"], run=False)
    assert cli.trainer.validate_loop.inference_mode is False
    assert cli.trainer.test_loop.inference_mode is False
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    assert "val/step0/loss" in cli.trainer.callback_metrics


def test_fit_then_test_from_the_checkpoint_through_the_cli(in_tmp):
    """`metarec test --ckpt_path` reloads a checkpoint (weights_only loading included)."""
    quick = str(REPO / "recipes" / "quickstart.yaml")
    MetarecCLI(args=["fit", "--config", quick, "--trainer.max_steps", "3",
                     "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])
    ckpt = next((in_tmp / "runs").rglob("*.ckpt"))
    cli = MetarecCLI(args=["test", "--config", quick, "--ckpt_path", str(ckpt),
                           "--trainer.enable_progress_bar", "false"])
    metrics = cli.trainer.callback_metrics
    assert 0 < float(metrics["test/mae"]) < 2 and "test/step0/ndcg@5" in metrics


def test_sweep_configs_name_valid_overrides(in_tmp, monkeypatch):
    """Every parameter of a shipped W&B sweep is an override the CLI accepts."""
    import yaml

    root = ml100k_root()
    if root is None:
        pytest.skip("MovieLens-100K not found (METAREC_DATA or ../shared/data)")
    monkeypatch.setenv("METAREC_DATA", str(root.parent))
    sweeps = sorted((REPO / "recipes" / "sweeps").glob("*.yaml"))
    assert sweeps
    for path in sweeps:
        sweep = yaml.safe_load(path.read_text())
        config = sweep["command"][sweep["command"].index("--config") + 1]
        assert sweep["metric"]["name"].startswith("val/")
        overrides = []
        for name, spec in sweep["parameters"].items():
            value = spec["values"][0] if "values" in spec else spec["min"]
            overrides.append(f"--{name}={value}")
        cli = MetarecCLI(args=["--config", str(REPO / config), *overrides,
                               "--trainer.logger", "false"], run=False)
        lr = sweep["parameters"].get("model.algorithm_args.inner_lr")
        if lr is not None:  # the override reached the plugin
            assert cli.model.algorithm.inner_lr == pytest.approx(lr.get("min", lr.get("values", [0])[0]))


def test_ctrl_c_during_fit_leaves_a_usable_checkpoint(in_tmp, monkeypatch):
    """KeyboardInterrupt mid-epoch: Lightning shuts down gracefully and the default callbacks
    write runs/interrupted/on_exception.ckpt, which `metarec test` then loads."""
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    quick = str(REPO / "recipes" / "quickstart.yaml")
    # Appended to the default callbacks (which are what is under test).
    interrupt = "{class_path: helpers.interrupt.InterruptAt, init_args: {step: 3}}"
    with pytest.raises(SystemExit):  # Lightning exits after its graceful-shutdown handling
        MetarecCLI(args=["fit", "--config", quick, "--trainer.callbacks+", interrupt,
                         "--trainer.logger", "false"])
    ckpt = in_tmp / "runs" / "interrupted" / "on_exception.ckpt"
    assert ckpt.is_file()
    cli = MetarecCLI(args=["test", "--config", quick, "--ckpt_path", str(ckpt),
                           "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    assert float(cli.trainer.callback_metrics["test/loss"]) > 0


def test_checkpointing_can_be_switched_off_with_the_default_callbacks(in_tmp):
    MetarecCLI(args=["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"),
                     "--trainer.max_steps", "2", "--trainer.max_epochs", "1",
                     "--trainer.enable_checkpointing", "false", "--trainer.logger", "false"])
    assert not list(in_tmp.rglob("*.ckpt"))
