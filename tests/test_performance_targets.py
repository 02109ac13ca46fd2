"""benchmarks/performance_targets.py: the committed targets table is what the committed
benchmark results say (rerun the script after a benchmark), and a target's verdict follows its
goal."""

from __future__ import annotations

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import performance_targets  # noqa: E402


def test_committed_targets_match_the_benchmark_results():
    committed = json.loads(performance_targets.DEFAULT_JSON.read_text())
    assert json.loads(json.dumps(performance_targets.collect())) == committed, (
        "rerun python benchmarks/performance_targets.py, then docs_tables.py --write")


def test_a_target_is_met_only_on_the_right_side_of_its_goal():
    assert performance_targets._row("t", 1.5, 2.0, False, " ms", "s")["met"] is True
    assert performance_targets._row("t", 2.5, 2.0, False, " ms", "s")["met"] is False
    assert performance_targets._row("t", 12, 10, True, "x", "s")["met"] is True
    assert performance_targets._row("t", None, 10, True, "x", "s")["met"] is None


def test_the_throughput_benchmark_writes_the_fields_issue_14_asks_for(tmp_path):
    """Issue 14's acceptance command, cut to one batch and one repeat on synthetic data: the
    JSON has the useful-FLOP efficiency, the three paths' rates (learn2learn null without its
    venv) and the padded and useful FLOPs, consistent with each other (no timing asserted)."""
    import subprocess

    out = tmp_path / "throughput.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "meta_train_throughput.py"),
                          "--quick", "--batches", "1", "--repeats", "1", "--synthetic",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    for key in ("useful_flop_efficiency", "vmap_tasks_per_s", "loop_tasks_per_s",
                "padded_gflop_per_batch", "useful_gflop_per_batch", "matmul_peak_gflops"):
        assert result[key] > 0, key
    assert "l2l_tasks_per_s" in result and result["l2l_tasks_per_s"] is None
    assert result["useful_gflop_per_batch"] <= result["padded_gflop_per_batch"]
    assert 0 < result["useful_flop_efficiency"] < 1
