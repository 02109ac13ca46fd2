"""Every registered algorithm runs every shipped backbone end to end through the CLI."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO
from metarec import PluginError, available, resolve, train_recipe
from metarec.cli import MetarecCLI

ALGORITHMS = sorted(i.alias for i in available("algorithms") if i.distribution == "metarec")
BACKBONES = sorted(i.alias for i in available("backbones") if i.distribution == "metarec")
# Algorithms defined with their paper's model (a clear error at build time on any other); mwuf
# and cvar: mf's item side (its per-item id rows and, for mwuf, its user rows).
PAIRED_WITH = {"mamo": {"mamo"}, "tanp": {"tanp"}, "mwuf": {"mf"}, "cvar": {"mf"}}
# Algorithms that warm up new items' id embeddings: they run on tasks per item.
ITEM_TASKS = {"mwuf", "cvar"}
IMPLICIT = ["--data.tasks.feedback", "implicit", "--data.tasks.positive_threshold", "4"]
HAS_L2L = importlib.util.find_spec("learn2learn") is not None


def history_args(backbone: str) -> list[str]:
    """Sequential backbones (``needs_history = True``) need histories in the batches."""
    needs = getattr(resolve("backbones", backbone), "needs_history", False)
    return ["--data.history_length", "8"] if needs else []


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A pretrained teacher per backbone, for `distill`."""
    cache = {}

    def get(backbone):
        if backbone not in cache:
            path = tmp_path_factory.mktemp("teacher") / f"{backbone}.ckpt"
            args = ["--model.algorithm", "pretrain", "--model.backbone", backbone,
                    "--model.backbone_args", "{}", "--trainer.max_steps", "3",
                    *history_args(backbone)]
            try:
                cache[backbone] = train_recipe(REPO / "recipes" / "quickstart.yaml", path, args)
            except PluginError as err:  # a classifier of 0/1 labels: the implicit variant
                if "implicit feedback" not in str(err):
                    raise
                cache[backbone] = train_recipe(REPO / "recipes" / "quickstart.yaml", path,
                                               args + IMPLICIT)
        return cache[backbone]
    return get


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fast_dev_run(algorithm, backbone, teacher, in_tmp):
    if algorithm in PAIRED_WITH and backbone not in PAIRED_WITH[algorithm]:
        pytest.skip(f"{algorithm} runs on its own backbone only ({PAIRED_WITH[algorithm]})")
    if algorithm == "l2l" and not HAS_L2L:
        pytest.skip("learn2learn is not installed here (make test-l2l runs this in its venv)")
    args = ["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"),
            "--trainer.fast_dev_run", "1", "--model.algorithm", algorithm,
            "--model.backbone", backbone, "--model.backbone_args", "{}", *history_args(backbone)]
    if algorithm == "distill":
        args += ["--model.algorithm_args", f"{{teacher_checkpoint: {teacher(backbone)}}}"]
    if algorithm in ITEM_TASKS:
        args += ["--data.tasks.task_by", "item", "--data.tasks.max_interactions", "100000"]
    try:
        trainer = MetarecCLI(args=args).trainer
    except PluginError as err:  # a classifier of 0/1 labels (lwa, nlba): the implicit variant
        if "implicit feedback" not in str(err):
            raise
        trainer = MetarecCLI(args=args + IMPLICIT).trainer
    assert trainer.global_step == 1
    for key in ("train/loss", "val/loss", "val/step0/loss"):
        assert bool(trainer.callback_metrics[key].isfinite()), key


def test_l2l_without_learn2learn_says_how_to_install():
    if HAS_L2L:
        pytest.skip("learn2learn is installed")
    from metarec_plugins.algorithms.l2l import L2L

    with pytest.raises(ImportError, match="learn2learn-venv.sh"):
        L2L()
