"""The plugin guide's example package (docs/examples/metarec-example-plugin) works as shipped.

It is "installed" without network and without touching the venv: a ``.dist-info`` folder
generated from its ``pyproject.toml`` plus its ``src`` folder go on ``sys.path`` for the test
only, which is all that entry-point discovery needs.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from metarec import available, reset_registry, resolve
from metarec.cli import MetarecCLI, print_plugins

EXAMPLE = REPO / "docs" / "examples" / "metarec-example-plugin"
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def write_dist_info(folder: Path) -> tuple[str, str]:
    """A ``<name>-<version>.dist-info`` (METADATA, entry_points.txt) from the example's pyproject."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    sections = [f"[{group}]\n" + "".join(f"{alias} = {target}\n" for alias, target in eps.items())
                for group, eps in project["entry-points"].items()]
    (info / "entry_points.txt").write_text("\n".join(sections))
    return name, version


@pytest.fixture
def example_installed(tmp_path, monkeypatch):
    """The example package importable and its entry points registered, for this test only."""
    site = tmp_path / "site"
    site.mkdir()
    name, version = write_dist_info(site)
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.syspath_prepend(str(site))
    reset_registry()
    yield {"site": site, "name": name, "version": version}
    reset_registry()
    for module in [m for m in sys.modules if m == "metarec_example" or m.startswith("metarec_example.")]:
        del sys.modules[module]


def test_metarec_plugins_lists_both_example_plugins(example_installed):
    infos = {(i.kind, i.alias): i for kind in ("algorithms", "policies") for i in available(kind)}
    algo = infos["algorithms", "example-l2maml"]
    policy = infos["policies", "example-proximal-finetune"]
    assert (algo.distribution, algo.version) == ("metarec-example-plugin", "0.1.0")
    assert algo.target == "metarec_example.l2maml:L2MAML"
    assert policy.distribution == "metarec-example-plugin"
    assert resolve("algorithms", "example-l2maml").__name__ == "L2MAML"
    assert ("algorithms", "maml") in infos  # the built-ins are still there

    out = io.StringIO()
    print_plugins(out)
    lines = out.getvalue().splitlines()
    for alias in ("example-l2maml", "example-proximal-finetune"):
        row = next((line for line in lines if f" {alias} " in line), "")
        assert "metarec-example-plugin" in row and "0.1.0" in row, out.getvalue()


def test_example_recipe_fast_dev_run(example_installed, in_tmp):
    recipe = EXAMPLE / "recipe.yaml"
    cli = MetarecCLI(args=["fit", "--config", str(recipe), "--trainer.fast_dev_run", "1"])
    assert type(cli.model.algorithm).__name__ == "L2MAML"
    assert cli.model.algorithm.lam == 1.0
    assert type(cli.model.policy).__name__ == "FineTune"  # evaluates with L2MAML's objective
    trainer = cli.trainer
    assert trainer.state.finished and trainer.global_step == 1
    metrics = trainer.callback_metrics
    for key in ("train/loss", "val/loss", "train/adapted_sq_distance"):
        assert key in metrics and bool(metrics[key].isfinite()), (key, dict(metrics))


def test_example_policy_on_maml_fast_dev_run(example_installed, in_tmp):
    """The example policy by alias on top of plain MAML, as the example recipe's comment shows."""
    cli = MetarecCLI(args=["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"),
                           "--model.policy", "example-proximal-finetune",
                           "--model.policy_args", "{lam: 2.0}", "--trainer.fast_dev_run", "1"])
    assert type(cli.model.algorithm).__name__ == "MAML"
    assert type(cli.model.policy).__name__ == "ProximalFineTune"
    policy, algorithm = cli.model.policy, cli.model.algorithm
    assert (policy.lam, policy.max_steps) == (2.0, algorithm.inner_steps)
    trainer = cli.trainer
    assert trainer.state.finished and trainer.global_step == 1
    assert bool(trainer.callback_metrics["val/loss"].isfinite()), dict(trainer.callback_metrics)


def test_example_package_own_tests_pass(example_installed):
    """The example's tests, run as its author would (pytest in its folder), same interpreter."""
    path = [str(example_installed["site"]), str(EXAMPLE / "src"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p),
           "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests"], cwd=EXAMPLE, env=env, capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert " passed" in output and "skipped" not in output and "failed" not in output, output
