"""benchmarks/cold_start.py: aggregation, pairing, resume and markdown on synthetic per-user
rows, and one end-to-end study through the real framework on synthetic data."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import _stats  # noqa: E402
import cold_start  # noqa: E402

USERS = [f"u{i}" for i in range(60)]
STEPS = 3


def fake_rows(method: str, fold: int, seed: int, folds: int, ks) -> dict:
    """Per-user rows shaped as MetaLearner.user_results: the users of ``fold`` (a seeded deal),
    steps 0 and STEPS, MAE lower for "good" by 0.1, nDCG undefined for every 7th user."""
    order = np.random.default_rng(seed).permutation(len(USERS))
    users = [USERS[i] for i in np.array_split(order, folds)[fold]]
    records = []
    for user in users:
        u = int(user[1:])
        for k in ks:
            label = cold_start.k_label(k)
            kk = 100 if k is None else k
            for step in range(STEPS + 1):
                noise = np.random.default_rng([u, kk, step, seed, len(method)]).normal(0, 0.02)
                mae = 1.0 - 0.02 * min(kk, 20) * step / STEPS + noise + 0.001 * u
                if method == "good" and step == STEPS:
                    mae -= 0.1
                records.append({"user": user, "k": label, "step": step, "support_size": min(kk, 30),
                                "diverged": method == "bad" and u == 5 and step == STEPS,
                                "loss": mae ** 2, "mae": mae, "rmse": mae * 1.2,
                                "ndcg@5": math.nan if u % 7 == 0 else 0.5 + 0.01 * step + noise})
    return records


class FakeRunner:
    """run_one's stand-in: synthetic rows, a record of the calls, optional failure."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple] = []
        self.fail_after = fail_after

    def __call__(self, method, fold, seed, *, folds, ks, extra=(), quick=False):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append((method.name, fold, seed))
        records = fake_rows(method.name, fold, seed, folds, ks)
        users = list(dict.fromkeys(r["user"] for r in records))
        return {"method": method.name, "recipe": method.recipe, "overrides": method.overrides,
                "command": "metarec fit ...", "fold": fold, "seed": seed, "fit_seconds": 1.0,
                "sec_per_epoch": 0.5, "epochs": 2, "best_epoch": 1, "monitor": "val/mae",
                "best_score": 0.9, "tested": "best", "max_step": STEPS, "torch_threads": 1,
                "dataset": "synthetic", "feedback": "explicit",
                "users": {"train": 40, "val": 5, "test": len(users), "eligible": len(USERS)},
                "tasks": {"min_interactions": 15, "max_interactions": 60, "query_size": 10,
                          "query_strategy": "random"},
                "rows": cold_start.columnar(records, {0, STEPS}),
                "chance": {"mean_rating": 3.5, "draws": 20,
                           "rows": {"user": users, "mae": [1.3] * len(users),
                                    "rmse": [1.6] * len(users),
                                    "ndcg@5": [None if int(u[1:]) % 7 == 0 else 0.4
                                               for u in users]}}}


METHODS = [cold_start.Method("base", "recipes/quickstart.yaml"),
           cold_start.Method("good", "recipes/quickstart.yaml", ["--model.algorithm_args.inner_steps", "2"]),
           cold_start.Method("bad", "recipes/quickstart.yaml", ["--model.policy", "frozen"])]


def study(tmp_path, runner, methods=METHODS, **kw):
    args = dict(baseline="base", folds=3, seeds=[0, 1], ks=[1, 5, None],
                json_path=tmp_path / "study.json", progress=False, runner=runner,
                stats={"n_resamples": 500})
    args.update(kw)
    return cold_start.run_study(methods, **args)


def test_columnar_keeps_first_and_last_step_rounds_and_nulls_nan():
    records = [{"user": 1, "k": "1", "step": s, "support_size": 1, "diverged": False,
                "mae": 0.123456789, "ndcg@5": math.nan} for s in range(4)]
    cols = cold_start.columnar(records, {0, 3})
    assert cols["step"] == [0, 3] and cols["mae"] == [0.123457, 0.123457]
    assert cols["ndcg@5"] == [None, None]
    assert list(cols)[:5] == ["user", "k", "step", "support_size", "diverged"]


def test_parse_k_and_labels():
    assert cold_start.parse_k("1,3,all") == [1, 3, None]
    assert cold_start.parse_k([1, "all"]) == [1, None]
    assert [cold_start.k_label(k) for k in (1, None)] == ["1", "all"]
    with pytest.raises(ValueError):
        cold_start.parse_k("1,1")
    with pytest.raises(ValueError):
        cold_start.parse_k("0")


def test_aggregation_over_users_and_seeds(tmp_path):
    result = study(tmp_path, FakeRunner())
    assert result["complete"] and len(result["runs"]) == 3 * 3 * 2
    cell = result["summary"]["methods"]["good"]["k"]["5"]
    # By hand: each user's final MAE averaged over the 2 seeds, then mean + t-interval.
    per_user: dict[str, list[float]] = {}
    for seed in (0, 1):
        for fold in range(3):
            for r in fake_rows("good", fold, seed, 3, [1, 5, None]):
                if r["k"] == "5" and r["step"] == STEPS:
                    per_user.setdefault(r["user"], []).append(round(r["mae"], 6))
    assert sorted(len(v) for v in per_user.values()) == [2] * len(USERS)  # once per seed
    values = [np.mean(v) for v in per_user.values()]
    expect = _stats.mean_ci(values)
    assert cell["mae"]["final"]["n"] == len(USERS)
    assert cell["mae"]["final"]["mean"] == pytest.approx(expect["mean"])
    assert cell["mae"]["final"]["lo"] == pytest.approx(expect["lo"])
    # nDCG: users with no defined value skipped and counted.
    nan_users = sum(int(u[1:]) % 7 == 0 for u in USERS)
    assert cell["ndcg@5"]["final"]["n_skipped"] == nan_users
    assert cell["ndcg@5"]["final"]["n"] == len(USERS) - nan_users
    assert cell["users"] == len(USERS) and cell["rows"] == 2 * len(USERS)
    # Step 0 differs from the final step; diverged users are counted per (method, K).
    assert cell["mae"]["step0"]["mean"] > cell["mae"]["final"]["mean"]
    assert result["summary"]["methods"]["bad"]["k"]["1"]["diverged"] == 2  # user 5, 2 seeds
    assert result["summary"]["chance"]["mae"]["mean"] == pytest.approx(1.3)
    assert result["summary"]["chance"]["ndcg@5"]["n_skipped"] == nan_users


def test_paired_difference_uses_the_same_users(tmp_path):
    result = study(tmp_path, FakeRunner())
    diff = result["summary"]["methods"]["good"]["k"]["all"]["mae"]["vs_baseline"]
    assert diff["n"] == len(USERS)
    assert diff["mean"] == pytest.approx(-0.1, abs=0.02)
    assert diff["hi"] < 0 and diff["p"] < 1e-6
    assert "vs_baseline" not in result["summary"]["methods"]["base"]["k"]["all"]["mae"]
    # Drop the baseline's fold 2 of seed 1 and shuffle the others' rows: only the common
    # (seed, fold, user) pairs count, whatever the row order.
    runs = [r for r in result["runs"] if not (r["method"] == "base" and r["fold"] == 2
                                              and r["seed"] == 1)]
    for r in runs:
        perm = np.random.default_rng(0).permutation(len(r["rows"]["user"]))
        r["rows"] = {c: [v[i] for i in perm] for c, v in r["rows"].items()}
    partial = {**result, "runs": runs}
    s = cold_start.summarise(partial, n_resamples=500)
    d = s["methods"]["good"]["k"]["all"]["mae"]["vs_baseline"]
    assert d["n"] == len(USERS)  # every user still paired (in the other seed)
    # By hand: per user, mean over the seeds where both are present of (good - base).
    vals = {}
    for m in ("good", "base"):
        for r in runs:
            if r["method"] != m:
                continue
            for u, k, st, v in zip(r["rows"]["user"], r["rows"]["k"], r["rows"]["step"],
                                   r["rows"]["mae"]):
                if k == "all" and st == STEPS:
                    vals[(m, r["seed"], r["fold"], u)] = v
    diffs = {}
    for (m, seed, fold, u), v in vals.items():
        if m == "good" and ("base", seed, fold, u) in vals:
            diffs.setdefault(u, []).append(v - vals[("base", seed, fold, u)])
    assert d["mean"] == pytest.approx(np.mean([np.mean(x) for x in diffs.values()]))
    assert sum(len(x) == 1 for x in diffs.values()) == len(fake_rows("base", 2, 1, 3, [None])) // (STEPS + 1)


def test_resume_skips_finished_runs(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        study(tmp_path, FakeRunner(fail_after=4))
    saved = json.loads((tmp_path / "study.json").read_text())
    assert len(saved["runs"]) == 4 and not saved["complete"]
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary file
    first = [(r["method"], r["fold"], r["seed"]) for r in saved["runs"]]
    # Seed-major, fold next, methods innermost: pairs complete early.
    assert first == [("base", 0, 0), ("good", 0, 0), ("bad", 0, 0), ("base", 1, 0)]
    runner = FakeRunner()
    result = study(tmp_path, runner)
    assert len(runner.calls) == 18 - 4 and not set(runner.calls) & set(first)
    assert result["complete"] and len(result["runs"]) == 18
    assert len(result["chance"]) == 3 * 2  # one per (fold, seed)
    # Nothing left: no run at all; adding a seed runs only that seed's runs.
    again = FakeRunner()
    study(tmp_path, again)
    assert again.calls == []
    more = FakeRunner()
    result = study(tmp_path, more, seeds=[0, 1, 2])
    assert {c[2] for c in more.calls} == {2} and len(more.calls) == 9
    assert result["config"]["seeds"] == [0, 1, 2] and result["complete"]


def test_resume_refuses_a_different_study(tmp_path):
    study(tmp_path, FakeRunner())
    with pytest.raises(cold_start.StudyMismatch, match="k ="):
        study(tmp_path, FakeRunner(), ks=[1, None])
    changed = [cold_start.Method("good", "recipes/quickstart.yaml", ["--model.policy", "frozen"])]
    with pytest.raises(cold_start.StudyMismatch, match="method 'good'"):
        study(tmp_path, FakeRunner(), methods=[METHODS[0], *changed])
    # --fresh starts over.
    runner = FakeRunner()
    study(tmp_path, runner, ks=[1, None], fresh=True)
    assert len(runner.calls) == 18


def test_markdown_has_intervals_differences_chance_and_footer(tmp_path):
    result = study(tmp_path, FakeRunner(), command="python benchmarks/cold_start.py --quick")
    text = cold_start.markdown(json.loads((tmp_path / "study.json").read_text()))
    assert "| method | K=1 | K=5 | K=all |" in text
    assert "| base (baseline) |" in text and "| good − base |" in text
    assert "**MAE**" in text and "**RMSE**" in text and "**nDCG@5**" in text
    good_diff = next(line for line in text.splitlines() if line.startswith("| good − base |"))
    assert "p<0.001" in good_diff and good_diff.count("[-0.") == 3
    assert "step 0 (before adaptation)" in text
    assert "chance: mean training rating (3.50) (any K)" in text and "chance: random scores" in text
    assert "95% t-interval" in text and "Wilcoxon signed-rank" in text
    assert "paired percentile bootstrap" in text and "3 user folds x 2 seeds (0, 1)" in text
    assert "bad K=1: 2 of 120" in text and "`python benchmarks/cold_start.py --quick`" in text
    assert "Incomplete" not in text
    # Rendered from a JSON without a stored summary too (computed on the fly).
    result.pop("summary")
    assert cold_start.markdown(result).startswith("**MAE**")


def test_command_line(tmp_path, monkeypatch, capsys):
    runner = FakeRunner()
    monkeypatch.setattr(cold_start, "run_one", runner)
    path = tmp_path / "s.yaml"
    path.write_text("baseline: base\nfolds: 3\nk: [1, all]\nmethods:\n"
                    "  - {name: base, recipe: recipes/quickstart.yaml}\n"
                    "  - {name: good, recipe: recipes/quickstart.yaml, overrides: [--a, '1']}\n")
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["--study", str(path), "--json", str(out), "--markdown", str(md), "--seeds", "0,1",
            "--no-progress", "--resamples", "500", "--", "--trainer.max_epochs", "2"]
    assert cold_start.main(argv) == 0
    assert len(runner.calls) == 12 and md.read_text() in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["config"]["extra"] == ["--trainer.max_epochs", "2"]
    assert saved["config"]["k"] == ["1", "all"] and saved["complete"]
    assert saved["command"].startswith("python benchmarks/cold_start.py --study")
    # Resumed with nothing left to do: no run, and the command that produced it is kept.
    assert cold_start.main(["--threads", "1", *argv]) == 0
    assert len(runner.calls) == 12
    assert json.loads(out.read_text())["command"] == saved["command"]
    # A different study in the same file: refused, with the reason.
    assert cold_start.main(argv[:-3]) == 2
    assert "extra = [] here but" in capsys.readouterr().err
    # --quick: 2 folds, the first seed, K 1 and all.
    quick = tmp_path / "q.json"
    cold_start.main(["--study", str(path), "--quick", "--json", str(quick), "--no-progress",
                     "--resamples", "200"])
    q = json.loads(quick.read_text())
    assert q["config"]["folds"] == 2 and q["config"]["seeds"] == [0] and q["config"]["quick"]
    assert len(q["runs"]) == 4


def test_study_file_and_baseline_by_path(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("baseline: recipes/quickstart.yaml\nfolds: 4\nseeds: 3\nk: [1, all]\n"
                    "overrides: [--trainer.max_epochs, '2']\nmethods:\n"
                    "  - {recipe: recipes/quickstart.yaml}\n"
                    "  - name: q-frozen\n    recipe: recipes/quickstart.yaml\n"
                    "    overrides: [--model.policy, frozen]\n")
    s = cold_start.load_study(path)
    assert [m.name for m in s["methods"]] == ["quickstart", "q-frozen"]
    assert s["methods"][1].overrides == ["--model.policy", "frozen"]
    assert s["k"] == [1, None] and s["seeds"] == [3] and s["folds"] == 4
    assert s["overrides"] == ["--trainer.max_epochs", "2"]
    with pytest.raises(ValueError, match="several use that recipe"):
        cold_start.resolve_baseline(s["baseline"], s["methods"])
    assert cold_start.resolve_baseline("q-frozen", s["methods"]) == "q-frozen"
    assert cold_start.resolve_baseline("recipes/quickstart.yaml", s["methods"][:1]) == "quickstart"
    with pytest.raises(ValueError, match="unknown keys"):
        path.write_text("methods: [{recipe: recipes/quickstart.yaml, overide: []}]\n")
        cold_start.load_study(path)
    assert cold_start.load_study(REPO / "benchmarks" / "studies" / "ml100k_kshot.yaml")["methods"]


def test_merge_of_parallel_halves(tmp_path):
    study(tmp_path, FakeRunner(), only_folds=[0, 1], json_path=tmp_path / "a.json")
    b = study(tmp_path, FakeRunner(), only_folds=[2], json_path=tmp_path / "b.json")
    assert not b["complete"]
    merged = cold_start.merge([tmp_path / "a.json", tmp_path / "b.json"])
    assert len(merged["runs"]) == 18 and len(merged["chance"]) == 6
    whole = study(tmp_path, FakeRunner(), json_path=tmp_path / "whole.json")
    s = cold_start.summarise(merged, n_resamples=500)
    for part in ("final", "step0", "vs_baseline"):
        ours, ref = (x["methods"]["good"]["k"]["1"]["mae"][part] for x in (s, whole["summary"]))
        assert ours == pytest.approx(ref)
    # From the command line: the merged file is complete; a file of another study is refused.
    out = tmp_path / "merged.json"
    assert cold_start.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                            "--json", str(out), "--resamples", "200"]) == 0
    saved = json.loads(out.read_text())
    assert saved["complete"] and len(saved["runs"]) == 18
    study(tmp_path, FakeRunner(), ks=[1, None], json_path=tmp_path / "c.json")
    assert cold_start.main(["--merge", str(out), str(tmp_path / "c.json"), "--json",
                            str(tmp_path / "bad.json")]) == 2


# -- end to end --------------------------------------------------------------------------
def test_end_to_end_quickstart_two_folds(tmp_path):
    """The real framework: recipes/quickstart.yaml (240 users), 2 folds, 1 seed, K {1, all},
    2 training batches; maml against the same recipe without adaptation (frozen) as baseline."""
    pytest.importorskip("metarec.metrics").per_task_metrics  # noqa: B018 - the interface is in
    methods = [cold_start.Method("maml", "recipes/quickstart.yaml"),
               cold_start.Method("frozen", "recipes/quickstart.yaml",
                                 ["--model.policy", "frozen"])]
    extra = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
             "--trainer.check_val_every_n_epoch", "1",
             "--data.dataset_args.num_users", "240"]  # fewer test users: a faster test
    out = tmp_path / "e2e.json"
    result = cold_start.run_study(methods, baseline="frozen", folds=2, seeds=[0], ks=[1, None],
                                  json_path=out, extra=extra, progress=False,
                                  stats={"n_resamples": 1000})
    saved = json.loads(out.read_text())
    assert saved["complete"] and len(saved["runs"]) == 4
    test_users = {}
    for run in saved["runs"]:
        rows = run["rows"]
        users = set(rows["user"])
        assert len(users) == run["users"]["test"]
        for k in ("1", "all"):
            for step in (0, run["max_step"]):
                sel = [u for u, kk, s in zip(rows["user"], rows["k"], rows["step"])
                       if kk == k and s == step]
                assert sorted(sel, key=str) == sorted(users, key=str)  # every test user, once
        assert all(s == 1 for s, kk in zip(rows["support_size"], rows["k"]) if kk == "1")
        assert run["tested"] == "best" and run["best_epoch"] == 0
        assert run["command"].startswith("metarec fit --config recipes/quickstart.yaml")
        test_users.setdefault(run["fold"], users)
        assert test_users[run["fold"]] == users  # same users for both methods
    eligible = saved["runs"][0]["users"]["eligible"]
    assert not test_users[0] & test_users[1]
    assert len(test_users[0] | test_users[1]) == eligible
    diff = saved["summary"]["methods"]["maml"]["k"]["all"]["mae"]["vs_baseline"]
    assert diff["n"] == eligible and diff["mean"] is not None and diff["p"] is not None
    assert saved["summary"]["chance"]["mae"]["n"] == eligible
    assert "| maml − frozen |" in cold_start.markdown(result)


def test_a_method_can_name_its_own_baseline(tmp_path):
    """melu-maml against melu-pretrain while the study's baseline is mf-pretrain: each
    difference row pairs a method with its own baseline."""
    methods = [*METHODS[:2], cold_start.Method("bad", "recipes/quickstart.yaml",
                                               ["--model.policy", "frozen"], baseline="good")]
    result = study(tmp_path, FakeRunner(), methods=methods)
    assert result["config"]["baselines"] == {"bad": "good"}
    summary = result["summary"]["methods"]
    assert summary["good"]["baseline"] == "base" and summary["bad"]["baseline"] == "good"
    diff = summary["bad"]["k"]["all"]["mae"]["vs_baseline"]
    assert diff["mean"] == pytest.approx(+0.1, abs=0.02)  # bad - good, not bad - base
    table = cold_start.markdown(result)
    assert "| bad − good |" in table and "| good − base |" in table
    assert "| bad − base |" not in table
