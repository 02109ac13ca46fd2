"""Plugin registry: aliases, class paths, errors, third-party discovery, package boundaries."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from metarec import PluginError, available, build, reset_registry, resolve
from metarec.cli import print_plugins


@pytest.fixture(autouse=True)
def _fresh_registry():
    reset_registry()
    yield
    reset_registry()


def test_alias_and_class_path_resolve_to_the_same_class():
    from metarec_plugins.algorithms.maml import MAML

    assert resolve("algorithms", "maml") is MAML
    assert resolve("algorithms", "metarec_plugins.algorithms.maml.MAML") is MAML
    assert resolve("algorithms", "metarec_plugins.algorithms.maml:MAML") is MAML


def test_unknown_alias_lists_the_registered_ones():
    with pytest.raises(PluginError) as err:
        resolve("algorithms", "mamll")
    message = str(err.value)
    assert "unknown algorithm 'mamll'" in message
    for alias in ("fomaml", "maml", "pretrain"):
        assert alias in message


def test_unknown_kind_and_bad_class_path():
    with pytest.raises(PluginError, match="unknown plugin kind"):
        resolve("optimizers", "adam")
    with pytest.raises(PluginError, match="cannot be imported"):
        resolve("backbones", "no_such_module.Backbone")


def test_build_rejects_unknown_arguments_naming_the_accepted_ones():
    with pytest.raises(PluginError) as err:
        build("algorithms", "maml", {"inner_step": 3})
    assert "inner_step" in str(err.value) and "inner_steps" in str(err.value)


def test_build_reports_out_of_range_hyperparameters():
    with pytest.raises(PluginError, match="inner_lr must be > 0"):
        build("algorithms", "maml", {"inner_lr": 0.0})
    with pytest.raises(PluginError, match="steps must be >= 0"):
        build("policies", "finetune", {"steps": -1})


def test_builtin_groups_list_every_foundation_plugin():
    expected = {
        "backbones": {"melu"}, "algorithms": {"maml", "fomaml", "pretrain"},
        "policies": {"finetune"}, "datasets": {"synthetic", "movielens-100k", "interactions"},
    }
    for kind, aliases in expected.items():
        infos = {i.alias: i for i in available(kind)}
        assert aliases <= set(infos), kind
        for alias in aliases:
            assert infos[alias].distribution == "metarec"
            assert infos[alias].target.startswith("metarec_plugins.")


def _third_party(tmp_path: Path, module_body: str, entry: str, name: str = "acme_recs") -> Path:
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(module_body))
    meta = tmp_path / f"{name}-1.2.3.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-recs\nVersion: 1.2.3\n")
    (meta / "entry_points.txt").write_text(f"[metarec.policies]\n{entry}\n")
    return tmp_path


def test_third_party_plugin_is_discovered_from_dist_info(tmp_path, monkeypatch, capsys):
    body = """
        from metarec import AdaptationPolicy

        class Zero(AdaptationPolicy):
            def adapt(self, model, fast, slow, support):
                return [fast]
    """
    monkeypatch.syspath_prepend(str(_third_party(tmp_path, body, "zero-shot = acme_recs:Zero")))
    reset_registry()
    info = {i.alias: i for i in available("policies")}["zero-shot"]
    assert (info.distribution, info.version, info.target) == ("acme-recs", "1.2.3", "acme_recs:Zero")
    assert resolve("policies", "zero-shot").__name__ == "Zero"
    print_plugins()
    out = capsys.readouterr().out
    assert "zero-shot" in out and "acme-recs" in out and "1.2.3" in out


def test_plugin_that_fails_to_import_names_plugin_and_distribution(tmp_path, monkeypatch):
    body = "import a_dependency_that_is_not_installed\n"
    folder = _third_party(tmp_path, body, "broken = acme_broken:Broken", name="acme_broken")
    monkeypatch.syspath_prepend(str(folder))
    reset_registry()
    with pytest.raises(PluginError) as err:
        resolve("policies", "broken")
    message = str(err.value)
    assert "'broken'" in message and "acme-recs 1.2.3" in message
    assert "a_dependency_that_is_not_installed" in message


def _imports(folder: Path) -> list[tuple[Path, str]]:
    found = []
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(path, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((path, node.module))
    return found


def test_framework_never_imports_plugins():
    bad = [(p, m) for p, m in _imports(REPO / "framework") if m.startswith("metarec_plugins")]
    assert not bad, bad


def test_plugins_use_only_the_public_api():
    """Plugins import ``metarec`` itself (its __all__), never its internal modules."""
    imports = _imports(REPO / "plugins")
    assert any(m == "metarec" for _, m in imports)
    bad = [(p.name, m) for p, m in imports if m.startswith("metarec.")]
    assert not bad, bad
