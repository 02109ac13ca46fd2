"""benchmarks/item_cold_start.py: the study file, resuming, the statistics and the tables (on
hand-made run records; the one real run is the synthetic smoke test at the end)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import item_cold_start as ics  # noqa: E402
from cold_start import Method, StudyMismatch  # noqa: E402


def _run(method: str, seed: int, auc: dict[str, float], per_item: dict[str, list[float]]) -> dict:
    """A warm-up run record: pooled AUC/F1 per stage and per-item AUC rows at steps 0 and 1."""
    rows = {"user": [], "k": [], "step": [], "auc": []}
    for stage, values in per_item.items():
        for step in (0, 1):
            for item, value in enumerate(values):
                rows["user"].append(item)
                rows["k"].append(stage)
                rows["step"].append(step)
                rows["auc"].append(value - 0.1 if step == 0 else value)
    metrics = {f"{s}/auc": v for s, v in auc.items()} | {f"{s}/f1": 0.6 for s in auc}
    return {"method": method, "seed": seed, "run_seconds": 1.0, "tests": {"test": {
        "metrics": metrics, "max_step": 1, "rows": rows,
        "chance": {"auc": 0.5, "f1": 0.52, "positive_rate": 0.55}}}}


def _result(runs: list[dict]) -> dict:
    methods = sorted({r["method"] for r in runs})
    return {"config": {"kind": "warmup", "baseline": "base", "seeds": [0, 1],
                       "methods": {m: {"recipe": "r.yaml", "overrides": []} for m in methods}},
            "runs": runs, "complete": True}


STAGES = ("cold", "warm_a", "warm_b", "warm_c")


def test_summary_means_over_seeds_and_pairs_by_seed_and_item():
    runs = [_run("base", 0, dict.fromkeys(STAGES, 0.70), dict.fromkeys(STAGES, [0.6, 0.7, 0.8])),
            _run("base", 1, dict.fromkeys(STAGES, 0.72), dict.fromkeys(STAGES, [0.6, 0.7, 0.8])),
            _run("new", 0, dict.fromkeys(STAGES, 0.75), dict.fromkeys(STAGES, [0.7, 0.8, 0.9])),
            _run("new", 1, dict.fromkeys(STAGES, 0.73), dict.fromkeys(STAGES, [0.7, 0.8, 0.9]))]
    summary = ics.summarise(_result(runs))
    cell = summary["new"]["warm_a AUC"]
    assert cell["mean"] == pytest.approx(0.74) and cell["n"] == 2
    assert cell["diff"]["mean"] == pytest.approx(0.03)  # (0.05 + 0.01) / 2, paired by seed
    # Per item: the final step's values only (step 0 is 0.1 lower and must not count).
    assert cell["per_task"]["mean"] == pytest.approx(0.1) and cell["per_task"]["n"] == 6
    assert "diff" not in summary["base"]["warm_a AUC"]
    assert summary["chance"]["cold AUC"]["mean"] == 0.5
    table = ics.markdown(_result(runs))
    assert "| new | 0.740 ± " in table and "| chance | 0.500 |" in table
    assert "Difference with `base`" in table and "+0.100, +0.100" in table


def test_a_stage_filter_keeps_each_stages_rows_apart():
    per_item = {"cold": [0.5, 0.5], "warm_a": [0.6, 0.6], "warm_b": [0.7, 0.7],
                "warm_c": [0.8, 0.8]}
    test = _run("m", 0, dict.fromkeys(STAGES, 0.7), per_item)["tests"]["test"]
    assert ics._final_rows(test, "auc", "warm_b") == {0: 0.7, 1: 0.7}
    assert ics._final_rows(test, "auc", "cold") == {0: 0.5, 1: 0.5}


def test_study_file_checks(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("kind: warmup\nbaseline: a\nseeds: 3\nmethods:\n"
                    "  - {name: a, recipe: recipes/movielens-100k/mf-pretrain-item.yaml}\n")
    study = ics.load_study(path)
    assert study["seeds"] == [3] and study["methods"][0].name == "a"
    path.write_text("kind: folds\nbaseline: a\nmethods: []\n")
    with pytest.raises(ValueError, match="kind must be one of"):
        ics.load_study(path)
    path.write_text("kind: warmup\nbaseline: zzz\nmethods:\n"
                    "  - {name: a, recipe: recipes/movielens-100k/mf-pretrain-item.yaml}\n")
    with pytest.raises(ValueError, match="baseline 'zzz'"):
        ics.load_study(path)


def test_resume_skips_finished_runs_and_refuses_a_changed_method(tmp_path, monkeypatch):
    calls = []

    def fake(method, seed, **kwargs):
        calls.append((method.name, seed))
        return _run(method.name, seed, dict.fromkeys(STAGES, 0.7),
                    dict.fromkeys(STAGES, [0.6, 0.7]))

    monkeypatch.setattr(ics, "run_one", fake)
    study = {"description": "d", "kind": "warmup", "baseline": "base", "seeds": [0, 1],
             "overrides": [], "fit_scenario": "new_user",
             "methods": [Method("base", "r.yaml"), Method("new", "r.yaml")]}
    out = tmp_path / "items.json"
    ics.run_study(study, out)
    assert len(calls) == 4 and json.loads(out.read_text())["complete"]
    ics.run_study(study, out)
    assert len(calls) == 4  # nothing left to run
    study["methods"][1] = Method("new", "r.yaml", ["--model.policy", "frozen"])
    with pytest.raises(StudyMismatch, match="method 'new' changed"):
        ics.run_study(study, out)


def test_a_real_warmup_run_on_synthetic_item_tasks(tmp_path, monkeypatch):
    """One quick run through the CLI: every stage's pooled AUC and the per-item rows."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    extra = ["--data.dataset", "synthetic", "--data.dataset_args",
             "{num_users: 120, num_items: 40, min_interactions: 10, max_interactions: 30}",
             "--data.tasks.min_interactions", "30", "--trainer.max_epochs", "1",
             "--data.tasks.query_size", "10"]
    run = ics.run_one(Method("mf", str(REPO / "recipes/movielens-100k/mf-pretrain-item.yaml")), 0,
                      kind="warmup", extra=extra)
    metrics = run["tests"]["test"]["metrics"]
    for stage in STAGES:
        assert 0.0 <= metrics[f"{stage}/auc"] <= 1.0
    assert set(run["tests"]["test"]["rows"]["k"]) == set(STAGES)
    assert run["tests"]["test"]["chance"]["auc"] == 0.5
