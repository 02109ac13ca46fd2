"""Recipes are validated when parsed: bad plugin arguments, out-of-range hyperparameters and
inconsistent task settings stop the CLI before anything is built, loaded or written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from metarec import registry
from metarec.cli import MetarecCLI, validate_recipe

QUICK = str(REPO / "recipes" / "quickstart.yaml")
MAML = "algorithm 'maml' (metarec_plugins.algorithms.maml:MAML)"
FINETUNE = "policy 'finetune' (metarec_plugins.policies.finetune:FineTune)"
PROXIMAL = "policy 'proximal' (metarec_plugins.policies.proximal:Proximal)"
SYNTHETIC = "dataset 'synthetic' (metarec_plugins.datasets.synthetic:SyntheticDataset)"
MELU = "backbone 'melu' (metarec_plugins.backbones.melu:MeLU)"


class ParseOnly(MetarecCLI):
    """Parses and validates a recipe, instantiates nothing (no data, no run directory)."""

    def instantiate_classes(self) -> None:
        pass


@pytest.fixture
def nothing_built(in_tmp, monkeypatch):
    """The working directory (empty), with plugin instantiation made to fail loudly."""
    def build(*args, **kwargs):
        raise AssertionError(f"a plugin was instantiated: {args}")

    monkeypatch.setattr(registry, "build", build)
    return in_tmp


def _rejected(args: list[str], capsys, run: bool = True) -> str:
    with pytest.raises(SystemExit) as exit_info:
        MetarecCLI(args=(["fit"] if run else []) + ["--config", QUICK, *args], run=run)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


BAD = {
    "inner_steps<0": (["--model.algorithm_args.inner_steps", "-1"],
                      "model.algorithm_args.inner_steps = -1", MAML, "must be an int >= 0"),
    "inner_lr=0": (["--model.algorithm_args.inner_lr", "0"],
                   "model.algorithm_args.inner_lr = 0", MAML, "must be a float > 0"),
    "inner_lr=inf": (["--model.algorithm_args.inner_lr", ".inf"],
                     "model.algorithm_args.inner_lr = inf", MAML, "must be a float > 0 and < inf"),
    "seed<0": (["--data.dataset_args.seed", "-1"],
               "data.dataset_args.seed = -1", SYNTHETIC, "must be an int >= 0"),
    "policy steps<0": (["--model.policy_args.steps", "-1"],
                       "model.policy_args.steps = -1", FINETUNE, "must be an int >= 0 (or null)"),
    "policy lr<0": (["--model.policy_args.lr", "-0.1"],
                    "model.policy_args.lr = -0.1", FINETUNE, "must be a float > 0"),
    "proximal alpha=1": (["--model.policy", "proximal", "--model.policy_args.alpha", "1"],
                         "model.policy_args.alpha = 1", PROXIMAL, "float >= 0.0 and < 1.0"),
    "unknown key": (["--model.algorithm_args.inner_stepz", "3"],
                    "model.algorithm_args.inner_stepz", MAML,
                    "accepts inner_steps, inner_lr, first_order, learn_inner_lr, fast_parameters"),
    "string for an int": (["--model.algorithm_args.inner_steps", "three"],
                          "model.algorithm_args.inner_steps = 'three'", MAML,
                          "expected int, got a string"),
    "backbone type": (["--model.backbone_args.embedding_dim", "[16]"],
                      "model.backbone_args.embedding_dim = [16]", MELU, "expected int, got list"),
    "dataset type": (["--data.dataset_args.num_users", "many"],
                     "data.dataset_args.num_users = 'many'", SYNTHETIC, "expected int"),
    "backbone width=0": (["--model.backbone_args.embedding_dim", "0"],
                         "model.backbone_args.embedding_dim = 0", MELU, "must be an int > 0"),
    "hidden width=0": (["--model.backbone_args.hidden", "[32, 0]"],
                       "model.backbone_args.hidden = [32, 0]", MELU, "> 0"),
    "dataset range": (["--data.dataset_args.num_items", "0"],
                      "data.dataset_args.num_items = 0", SYNTHETIC, "must be an int > 0"),
    "informativeness>1": (["--data.dataset_args.feature_informativeness", "1.5"],
                          "data.dataset_args.feature_informativeness = 1.5", SYNTHETIC, "<= 1"),
    "sparse gradients with Adam": (
        ["--model.backbone", "transformer", "--data.history_length", "4",
         "--model.backbone_args", "{dim: 8, sparse_item_gradients: true}"],
        "model.optimizer", "torch.optim.Adam", "does not take the sparse gradients"),
    "outer lr=0": (["--model.optimizer.init_args.lr", "0"],
                   "model.optimizer.init_args.lr = 0.0", "outer optimizer torch.optim.Adam",
                   "must be > 0"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_hyperparameters_stop_the_cli_before_anything_is_built(case, nothing_built, capsys):
    args, key, plugin, rule = BAD[case]
    err = _rejected(args, capsys)
    line = next((x for x in err.splitlines() if x.strip().startswith(key)), None)
    assert line is not None, err
    assert plugin in line and rule in line, line
    assert "Traceback" not in err
    assert list(nothing_built.iterdir()) == []  # no runs/, checkpoint or log


def test_every_problem_is_reported_at_once(nothing_built, capsys):
    err = _rejected(["--model.algorithm_args.inner_steps", "-1", "--model.algorithm_args.x", "1",
                     "--model.policy_args.steps", "-2", "--model.optimizer.init_args.lr", "-1"],
                    capsys, run=False)
    for key in ("model.algorithm_args.inner_steps", "model.algorithm_args.x",
                "model.policy_args.steps", "model.optimizer.init_args.lr"):
        assert key in err
    assert list(nothing_built.iterdir()) == []


def test_query_size_below_one_is_a_parse_error(nothing_built, capsys):
    err = _rejected(["--data.tasks.query_size", "0"], capsys)
    assert "data.tasks" in err and "query_size" in err and "PositiveInt" in err
    assert list(nothing_built.iterdir()) == []


def test_inconsistent_task_settings_are_rejected_before_loading(nothing_built, capsys):
    err = _rejected(["--data.tasks.min_interactions", "5"], capsys)
    assert "data.tasks: tasks.min_interactions (5) must exceed tasks.query_size (10)" in err
    assert list(nothing_built.iterdir()) == []


def test_unknown_plugin_names_the_key(nothing_built, capsys):
    err = _rejected(["--model.algorithm", "mamal"], capsys)
    assert "model.algorithm: unknown algorithm 'mamal'; registered algorithms:" in err


def test_the_metarec_command_exits_with_a_clean_message(tmp_path):
    command = Path(sys.executable).parent / "metarec"
    done = subprocess.run([str(command), "fit", "--config", QUICK,
                           "--model.algorithm_args.inner_lr", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"model.algorithm_args.inner_lr = 0 is invalid for {MAML}: must be a float > 0" \
        in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_valid_values_pass(in_tmp):
    cli = ParseOnly(args=["--config", QUICK, "--model.algorithm_args.inner_steps", "0",
                          "--model.policy", "proximal", "--model.policy_args",
                          "{steps: 0, lr: 0.5, alpha: 0.0}", "--data.tasks.query_size", "1",
                          "--data.tasks.max_support", "2"], run=False)
    assert validate_recipe(cli.config) == []
    # the recipe's values, the plugin's defaults filled in for the rest (metarec.cli)
    args = dict(cli.config.model.algorithm_args)
    assert {k: args[k] for k in ("inner_steps", "inner_lr", "first_order")} == \
        {"inner_steps": 0, "inner_lr": 0.05, "first_order": False}


RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "sweeps" not in p.parts
                 and not p.name.startswith("simulate"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_shipped_recipe_parses_and_validates(recipe, in_tmp, monkeypatch):
    monkeypatch.setenv("METAREC_RECIPES", str(REPO / "recipes"))
    cli = ParseOnly(args=["--config", str(recipe)], run=False)
    assert validate_recipe(cli.config) == []
    assert list(in_tmp.iterdir()) == []


def test_the_cli_builds_task_config_with_plain_ints(in_tmp):
    cli = MetarecCLI(args=["--config", QUICK, "--trainer.logger", "false"], run=False)
    config = cli.datamodule.task_config
    assert type(config.query_size) is int and type(config.min_interactions) is int


# -- registry.validate_args directly -------------------------------------------------------

def test_validate_args_accepts_defaults_of_every_plugin_without_required_arguments():
    """Nothing is instantiated: l2l validates without learn2learn installed."""
    for kind in registry.GROUPS:
        for info in registry.available(kind):
            if info.alias in ("interactions", "distill"):  # they require a path
                with pytest.raises(registry.PluginArgumentError, match="requires"):
                    registry.validate_args(kind, info.alias, {})
                continue
            registry.validate_args(kind, info.alias, {})


def test_framework_arguments_and_kwargs():
    with pytest.raises(registry.PluginArgumentError, match="gets 'schema' from the framework"):
        registry.validate_args("backbones", "melu", {"schema": None}, key="model.backbone_args")

    class Open:
        def __init__(self, steps: int = 1, **kwargs) -> None:
            pass

    registry.validate_args("policies", Open, {"anything": 1, "steps": 2})
    with pytest.raises(registry.PluginArgumentError, match=r"policy_args.steps = 'x'.*'Open'"):
        registry.validate_args("policies", Open, {"steps": "x"})


def test_validate_args_by_class_path_and_unknown_plugin():
    path = "metarec_plugins.algorithms.maml.MAML"
    with pytest.raises(registry.PluginArgumentError,
                       match=r"algorithm 'metarec_plugins.algorithms.maml.MAML' "
                             r"\(metarec_plugins.algorithms.maml:MAML\): must be a float > 0"):
        registry.validate_args("algorithms", path, {"inner_lr": -1.0})
    with pytest.raises(registry.PluginError, match="unknown algorithm"):
        registry.validate_args("algorithms", "nope", {})


def test_annotations_change_nothing_for_direct_python_use():
    from metarec_plugins.algorithms.maml import MAML
    from metarec_plugins.algorithms.pretrain import Pretrain
    from metarec_plugins.policies.early_stop import EarlyStop
    from metarec_plugins.policies.finetune import FineTune

    maml = MAML(inner_steps=2, inner_lr=0.1)
    assert type(maml.inner_steps) is int and type(maml.inner_lr) is float
    assert Pretrain(inner_steps=0).inner_steps == 0
    for make in (lambda: MAML(inner_steps=-1), lambda: MAML(inner_lr=0.0),
                 lambda: Pretrain(inner_lr=-1.0), lambda: FineTune(steps=-1),
                 lambda: EarlyStop(target_ratio=1.0)):
        with pytest.raises(ValueError):
            make()
