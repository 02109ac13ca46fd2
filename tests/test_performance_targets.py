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
