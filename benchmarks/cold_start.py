"""User cold-start study: methods x user folds x seeds x support sizes K, per-user results.

Every eligible user is a test user exactly once per seed: run ``(method, fold i, seed s)``
meta-trains the method's recipe with ``--seed_everything s --data.seed s --data.folds F
--data.fold i`` (the fold assignment differs per seed; validation users come from the training
folds), keeps the epoch with the best ``val/mae`` (the recipe's ``checkpoint:`` block), and
tests fold i's users at every support cap K of ``--k`` (``--data.eval_support``: each test user's
support cut to K interactions, nested random subsets, ``all`` = no cap; the same users and query
items for every K). Per-user metrics before (step 0) and after adaptation go to one JSON, which
is written (atomically) after every finished run: an interrupted study resumes where it stopped,
skipping the runs already in the file.

    python benchmarks/cold_start.py --study benchmarks/studies/ml100k_kshot.yaml
    python benchmarks/cold_start.py --recipes recipes/movielens-100k/mf-maml.yaml,recipes/movielens-100k/mf-pretrain.yaml \\
        --baseline mf-pretrain --folds 10 --seeds 0 --k 1,3,5,10,20,all \\
        --json benchmarks/results/cold_start.json --markdown /tmp/cold_start.md
    python benchmarks/cold_start.py --study ... --quick        # smoke test: 2 folds, 1 epoch, K 1,all
    python benchmarks/cold_start.py --json benchmarks/results/cold_start.json --summarise  # tables only
    python benchmarks/cold_start.py --study ... -- --trainer.max_epochs 5   # extra overrides, every run

Methods. ``--recipes a.yaml,b.yaml``: one method per recipe, named by the file's stem. Or a study
file (``--study``, YAML), which names methods as recipe + overrides, so that one recipe can be
compared under different settings::

    description: MovieLens-100K user cold start, K-shot
    baseline: mf-pretrain              # a method name (or its recipe path)
    folds: 10
    seeds: [0]
    k: [1, 3, 5, 10, 20, all]
    overrides: []                      # CLI overrides for every method (before --'s)
    methods:
      - name: mf-maml
        recipe: recipes/movielens-100k/mf-maml.yaml
        overrides: ["--model.algorithm_args.inner_steps", "3"]   # optional
      - {name: mf-pretrain, recipe: recipes/movielens-100k/mf-pretrain.yaml}
      - {name: melu-maml, recipe: ..., baseline: melu-pretrain}   # its own baseline

Command-line ``--baseline/--folds/--seeds/--k`` override the study file's values. A run is keyed
by (method name, fold, seed); resuming refuses a file whose folds, K, extra overrides or a
method's recipe/overrides differ from the current ones (``--fresh`` starts the file over).

JSON layout::

    {"protocol": str, "config": {folds, seeds, k, baseline, extra, quick, methods: {name:
     {recipe, overrides}}}, "command": str, "complete": bool, "torch_threads": int,
     "summary": {...},                        # summarise(): what the tables show
     "runs": [{method, recipe, overrides, command, fold, seed, fit_seconds, sec_per_epoch,
               val_seconds, run_seconds, epochs, best_epoch (0-based), monitor, best_score,
               tested ("best" | "final"), validation, max_step, torch_threads, dataset,
               feedback, users: {train, val, test, eligible}, tasks: {...},
               rows: {"user": [...], "k": [...], "step": [...], "support_size": [...],
                      "diverged": [...], "mae": [...], "rmse": [...], "ndcg@5": [...], ...}}],
     "chance": [{fold, seed, mean_rating, draws, rows: {"user": [...], "mae": [...], ...}}]}

``rows`` are columnar, one entry per (test user, K, step) for step 0 and the final step only,
floats rounded to 6 decimals, ``null`` where a metric is undefined for a user (e.g. nDCG with no
relevant query item); every per-user metric of ``MetaLearner.user_results`` except, with
explicit feedback, ``loss`` (the MSE: ``rmse`` squared). ``chance`` (one per fold and seed: the
test users do not depend on the method) scores the same users' query items with uniform random
scores (mean over ``draws`` seeded draws) for the ranking metrics, and predicts every query
rating with the mean training rating for MAE/RMSE.

Validation (which picks the best epoch) runs on the validation users' full support, as the
recipe alone would; the K caps apply to the test users only (``"validation": "full support"``).

Two cores: run halves in parallel (``--threads 1 --only-folds 0,2,4,6,8 --json /tmp/a.json`` and
``--only-folds 1,3,5,7,9 --json /tmp/b.json``), then ``--merge /tmp/a.json /tmp/b.json --json
benchmarks/results/cold_start.json``. Nothing in a run is written outside a temporary folder,
deleted when the run ends.

Statistics (benchmarks/_stats.py; the report is benchmarks/_cold_start_report.py): per-user values are averaged over seeds first; a cell is the
mean over users with a 95% t-interval (``--ci bootstrap``: percentile bootstrap); a difference
is method - baseline on the same users (inner join on (seed, fold, user, K)), with a 95% paired
percentile-bootstrap CI (10,000 resamples, seeded) and the two-sided Wilcoxon signed-rank
p-value. Users whose value is undefined are skipped and counted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the benchmark scripts import each other by bare name

import _stats  # noqa: E402  (benchmarks/_stats.py)
from _cold_start_report import markdown, protocol, summarise  # noqa: E402, F401 (re-exported)

DEFAULT_JSON = REPO / "benchmarks" / "results" / "cold_start.json"
QUICK = {"folds": 2, "k": [1, None], "epochs": 1}
# Quiet, and no logger; checkpointing stays on so that the best epoch can be tested.
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]
# Callbacks the CLI adds by default that only print (removed from each run's trainer).
NOISY_CALLBACKS = ("MetricsSummary", "ParameterCount")
RESULT_KEYS = ("user", "k", "step", "support_size", "diverged")


# -- methods and studies -----------------------------------------------------------------
@dataclass
class Method:
    """A named method: a recipe plus CLI overrides."""

    name: str
    recipe: str
    overrides: list[str] = field(default_factory=list)
    baseline: str | None = None  # the method it is compared with (default: the study's)

    def spec(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "overrides": list(self.overrides)}


def _recipe_path(recipe: str | Path) -> str:
    """A recipe path as stored: relative to the repository root when inside it."""
    path = Path(recipe)
    if not path.is_absolute():
        path = (Path.cwd() / path) if (Path.cwd() / path).is_file() else (REPO / path)
    path = path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"recipe {recipe} not found")
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def methods_from_recipes(recipes: Iterable[str]) -> list[Method]:
    """One method per recipe path, named by the file's stem."""
    methods = [Method(Path(r).stem, _recipe_path(r)) for r in recipes if r]
    _check_names(methods)
    return methods


def _check_names(methods: Sequence[Method]) -> None:
    names = [m.name for m in methods]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"method names must be unique, repeated: {', '.join(dupes)} "
                         "(name them in a study file)")
    if not methods:
        raise ValueError("no method given: --recipes or --study")


def parse_k(values: str | Iterable[Any]) -> list[int | None]:
    """``"1,3,all"`` or ``[1, 3, "all"]`` -> ``[1, 3, None]``."""
    items = values.split(",") if isinstance(values, str) else list(values)
    out: list[int | None] = []
    for item in items:
        text = str(item).strip().lower()
        if text in ("all", "none", "null"):
            out.append(None)
        else:
            k = int(text)
            if k < 1:
                raise ValueError(f"K must be >= 1 or 'all', got {item}")
            out.append(k)
    if len(set(out)) != len(out) or not out:
        raise ValueError(f"K values must be distinct and non-empty, got {values}")
    return out


def k_label(k: int | None) -> str:
    return "all" if k is None else str(k)


def load_study(path: str | Path) -> dict[str, Any]:
    """A study file: ``{description, baseline, folds, seeds, k, overrides, methods: [Method]}``."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(data) - {"description", "baseline", "folds", "seeds", "k", "overrides",
                           "methods"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    methods = []
    for i, entry in enumerate(data.get("methods") or []):
        if not isinstance(entry, dict) or "recipe" not in entry:
            raise ValueError(f"{path}: methods[{i}] needs at least a recipe")
        bad = set(entry) - {"name", "recipe", "overrides", "baseline"}
        if bad:
            raise ValueError(f"{path}: methods[{i}]: unknown keys {sorted(bad)}")
        overrides = [str(o) for o in entry.get("overrides") or []]
        methods.append(Method(str(entry.get("name") or Path(entry["recipe"]).stem),
                              _recipe_path(entry["recipe"]), overrides, entry.get("baseline")))
    _check_names(methods)
    study = {"description": data.get("description"), "baseline": data.get("baseline"),
             "folds": data.get("folds"), "seeds": data.get("seeds"),
             "k": parse_k(data["k"]) if data.get("k") is not None else None,
             "overrides": [str(o) for o in data.get("overrides") or []], "methods": methods}
    if isinstance(study["seeds"], int):
        study["seeds"] = [study["seeds"]]
    return study


def method_baselines(methods: Sequence[Method]) -> dict[str, str]:
    """``{method: its own baseline}`` for the methods that name one (e.g. melu-maml against
    melu-pretrain while the study's baseline is mf-pretrain)."""
    return {m.name: resolve_baseline(m.baseline, methods) for m in methods if m.baseline}


def resolve_baseline(baseline: str | None, methods: Sequence[Method]) -> str:
    """The baseline method's name, from a name or a recipe path."""
    if baseline is None:
        raise ValueError("name the baseline method: --baseline (or baseline: in the study file)")
    for m in methods:
        if m.name == baseline:
            return m.name
    try:
        path = _recipe_path(baseline)
    except FileNotFoundError:
        path = None
    matches = [m.name for m in methods if path is not None and m.recipe == path]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(f"baseline {baseline!r} is none of the methods "
                     f"({', '.join(m.name for m in methods)})"
                     + (" (several use that recipe: give its name)" if len(matches) > 1 else ""))


# -- one run -----------------------------------------------------------------------------
def epoch_timer() -> Any:
    """A Lightning callback timing each training epoch, validation excluded (``seconds``), and
    the validation passes of fit (``val_seconds``). Lightning is imported only here, so that
    ``markdown`` (docs tables) loads without it."""
    import lightning.pytorch as pl

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.val_seconds = 0.0
            self._start = self._val = self._val_start = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._start, self._val = time.perf_counter(), 0.0

        def on_validation_start(self, trainer, pl_module) -> None:
            self._val_start = time.perf_counter()

        def on_validation_end(self, trainer, pl_module) -> None:
            seconds = time.perf_counter() - self._val_start
            self._val += seconds
            self.val_seconds += seconds

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.seconds.append(time.perf_counter() - self._start - self._val)

    return EpochTimer()


def _clean(value: Any) -> Any:
    """A JSON-ready scalar: floats rounded to 6 decimals (NaN/inf -> None), numpy/torch -> python."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def columnar(records: Sequence[dict[str, Any]], steps: Iterable[int] | None = None) -> dict[str, list]:
    """Per-user result dicts -> ``{column: [values]}`` (steps filtered when given)."""
    keep = set(steps) if steps is not None else None
    chosen = [r for r in records if keep is None or int(r["step"]) in keep]
    columns: list[str] = [c for c in RESULT_KEYS if any(c in r for r in chosen)]
    for r in chosen:
        columns += [c for c in r if c not in columns]
    return {c: [_clean(r.get(c)) for r in chosen] for c in columns}


def _best_epoch(path: str) -> int | None:
    match = re.search(r"epoch=(\d+)", Path(path).name)
    if match:
        return int(match.group(1))
    from metarec.checkpoint import read_checkpoint

    return int(read_checkpoint(path).get("epoch", -1))


def chance_rows(cli: Any, seed: int, draws: int = 20, config: Any = None) -> dict[str, Any]:
    """Chance level on the run's test users: ranking metrics of uniform random scores (mean over
    ``draws`` seeded draws) and, explicit feedback, MAE/RMSE of predicting every query rating
    with the mean training rating."""
    import torch

    from metarec.data import EpisodeCollator
    from metarec.metrics import per_task_metrics

    dm = cli.datamodule
    tasks, train = dm.splits["test"], dm.splits["train"]
    feedback, rating_range = dm.splits.feedback, dm.schema.rating_range
    config = config or cli.model.metrics_config
    batch = EpisodeCollator(tasks, dm.table)(list(range(len(tasks))))
    shape = batch.query["label"].shape
    lo, hi = rating_range if (feedback == "explicit" and rating_range) else (0.0, 1.0)
    gen = torch.Generator().manual_seed(int(seed))
    sums: dict[str, torch.Tensor] = {}
    for _ in range(draws):
        scores = torch.rand(shape, generator=gen) * (hi - lo) + lo
        for name, value in per_task_metrics(scores, batch.query, batch.users, feedback, config,
                                            rating_range).items():
            if name in ("loss", "mae", "rmse"):
                continue
            sums[name] = sums.get(name, 0) + value.double() / draws
    mean_rating = None
    if feedback == "explicit":
        labels = torch.cat([train.support_labels[train.support_mask],
                            train.query_labels[train.query_mask]])
        mean_rating = float(labels.double().mean())
        constant = torch.full(shape, mean_rating)
        per = per_task_metrics(constant, batch.query, batch.users, feedback, config, rating_range)
        sums = {"mae": per["mae"], "rmse": per["rmse"], **sums}
    keys = dm.table.user_keys
    users = [_clean(keys[u]) if keys is not None else int(u) for u in batch.users.tolist()]
    rows = {"user": users, **{name: [_clean(float(v)) for v in value] for name, value in sums.items()}}
    return {"mean_rating": _clean(mean_rating), "draws": draws, "rows": rows}


def run_one(method: Method, fold: int, seed: int, *, folds: int, ks: Sequence[int | None],
            extra: Sequence[str] = (), quick: bool = False, chance_draws: int = 20) -> dict:
    """Meta-train ``method`` on the training folds of ``(fold, seed)``, test its best epoch on
    fold ``fold``'s users at every K: the run record (and ``"chance"``: the chance rows)."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    recipe = method.recipe if Path(method.recipe).is_absolute() else str(REPO / method.recipe)
    args = [*QUIET, "--seed_everything", str(seed), "--data.seed", str(seed),
            "--data.folds", str(folds), "--data.fold", str(fold),
            "--data.eval_support", json.dumps(list(ks)), *method.overrides, *extra]
    if quick:
        args += ["--trainer.max_epochs", str(QUICK["epochs"]),
                 "--trainer.check_val_every_n_epoch", "1"]
    root = tempfile.mkdtemp(prefix="metarec-cold-start-")
    start = time.perf_counter()
    try:
        with _quiet():
            run = _run(method, fold, seed, recipe, args, root, chance_draws)
        run["run_seconds"] = round(time.perf_counter() - start, 3)  # build, fit, test, chance
        return run
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's info lines and the warnings every in-process run repeats, silenced."""
    import lightning.pytorch  # noqa: F401 - it sets its loggers' levels when first imported

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for message in ("args parameter is intended to run from within Python",
                        "does not round-trip", "LeafSpec"):
            warnings.filterwarnings("ignore", message=f"(?s).*{message}")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def prepare_run(recipe: str, args: Sequence[str], root: str) -> tuple[Any, Any]:
    """``(cli, timer)``: the recipe's CLI built (not run) with ``args``, the callbacks that only
    print removed, everything the run writes kept inside ``root``, and an :func:`epoch_timer`
    appended to the trainer's callbacks."""
    from metarec.cli import MetarecCLI

    cli = MetarecCLI(args=["--config", recipe, *args, "--trainer.default_root_dir", root],
                     run=False)
    trainer = cli.trainer
    trainer.callbacks[:] = [c for c in trainer.callbacks
                            if type(c).__name__ not in NOISY_CALLBACKS]
    for callback in trainer.callbacks:  # everything this run writes stays in `root`
        if type(callback).__name__ == "InterruptCheckpoint":
            callback.dirpath = os.path.join(root, "interrupted")
    if trainer.checkpoint_callback is not None:
        trainer.checkpoint_callback.dirpath = os.path.join(root, "checkpoints")
    timer = epoch_timer()
    trainer.callbacks.append(timer)
    return cli, timer


def _run(method: Method, fold: int, seed: int, recipe: str, args: list[str], root: str,
         chance_draws: int) -> dict:
    import torch

    cli, timer = prepare_run(recipe, args, root)
    trainer, model = cli.trainer, cli.model
    checkpoint = trainer.checkpoint_callback
    # Validation (and so the best epoch) on the validation users' full support, as the
    # recipe alone would: with data.eval_support, validation would log only val/k{K}/...
    # and the checkpoint's monitor (val/mae) would not exist. The caps apply to the test.
    datamodule = cli.datamodule
    caps, datamodule.eval_support = datamodule.eval_support, None
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    datamodule.eval_support = caps
    monitor = getattr(checkpoint, "monitor", None)
    best = getattr(checkpoint, "best_model_path", "") if monitor else ""
    if best and os.path.isfile(best):
        tested, best_epoch = "best", _best_epoch(best)
        best_score = _clean(checkpoint.best_model_score)
        trainer.test(model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    else:  # no monitored checkpoint: the final weights
        tested, best_epoch, best_score = "final", None, None
        trainer.test(model, datamodule=cli.datamodule, verbose=False)
    results = getattr(model, "user_results", None)
    if not results:
        raise RuntimeError("the model recorded no per-user test results (model.user_results)")
    rules = {}  # the ranking metrics under the other relevance rule (RecBole-MetaRec's)
    if cli.datamodule.splits.feedback == "explicit" and model.metrics_config.relevance != "recbole":
        rules = _retest(trainer, model, cli, "recbole", "best" if tested == "best" else None)
        results = [{**row, **rules.get((row["user"], row["k"], row["step"]), {})}
                   for row in results]
    max_step = max(int(r["step"]) for r in results)
    splits = cli.datamodule.splits
    run = {
        "method": method.name, "recipe": method.recipe, "overrides": list(method.overrides),
        "command": "metarec fit " + shlex.join(["--config", method.recipe, *args]),
        "fold": fold, "seed": seed, "fit_seconds": round(fit_seconds, 3),
        "sec_per_epoch": round(statistics.median(timer.seconds), 4) if timer.seconds else None,
        "val_seconds": round(timer.val_seconds, 3), "epochs": trainer.current_epoch,
        "best_epoch": best_epoch, "monitor": monitor, "best_score": best_score,
        "tested": tested, "validation": "full support", "max_step": max_step,
        "torch_threads": torch.get_num_threads(),
        "dataset": cli.datamodule.dataset_name, "feedback": splits.feedback,
        "users": {"train": len(splits.train), "val": len(splits.val),
                  "test": len(splits.test), "eligible": int(splits.stats["tasks"])},
        "tasks": _task_config(cli.datamodule.task_config),
        # Explicit feedback: the per-user loss is the MSE, rmse squared; not stored twice.
        "rows": columnar([{k: v for k, v in r.items() if k != "loss"} for r in results]
                         if splits.feedback == "explicit" else results, {0, max_step}),
        "chance": chance_rows(cli, seed, chance_draws),
    }
    if rules:  # chance under the other rule too, on the same users
        other = dataclasses.replace(model.metrics_config, relevance="recbole")
        extra = chance_rows(cli, seed, chance_draws, config=other)["rows"]
        run["chance"]["rows"].update({f"recbole:{name}": values for name, values in extra.items()
                                      if name not in ("user", "mae", "rmse")})
    return run


RANKING = ("ndcg", "precision", "recall", "hitrate", "mrr", "auc")


def _retest(trainer: Any, model: Any, cli: Any, rule: str, ckpt_path: str | None) -> dict:
    """Test the same checkpoint again with ``metrics.relevance: rule``: ``{(user, k, step):
    {"<rule>:<metric>": value}}`` for the ranking metrics (MAE/RMSE do not depend on it)."""
    config = model.metrics_config
    model.metrics_config = dataclasses.replace(config, relevance=rule)
    model.test_metrics.clear()  # made on first use with the rule they were made with
    try:
        trainer.test(model, datamodule=cli.datamodule, ckpt_path=ckpt_path, verbose=False)
        rows = model.user_results
    finally:
        model.metrics_config = config
        model.test_metrics.clear()
    return {(r["user"], r["k"], r["step"]): {f"{rule}:{name}": v for name, v in r.items()
                                             if name.split("@")[0] in RANKING}
            for r in rows}


def _task_config(config: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    out = asdict(config) if is_dataclass(config) else dict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


# -- the study ---------------------------------------------------------------------------
class StudyMismatch(ValueError):
    """The JSON to resume holds runs of a different study."""


def _dumps(result: dict) -> str:
    """JSON with one line per run and per summary entry (diffs of a growing study stay
    readable; the file stays small)."""
    parts = []
    for key, value in result.items():
        if key in ("runs", "chance") and value:
            body = ",\n".join("    " + json.dumps(v, separators=(",", ":"), allow_nan=False)
                              for v in value)
            parts.append(f"  {json.dumps(key)}: [\n{body}\n  ]")
        elif key == "summary" and value:  # one line per entry (per method)
            body = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v, allow_nan=False)}"
                              for k, v in value.items())
            parts.append(f"  {json.dumps(key)}: {{\n{body}\n  }}")
        else:
            text = json.dumps(value, indent=2, allow_nan=False).replace("\n", "\n  ")
            parts.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_atomic(path: Path, result: dict) -> None:
    """Write the JSON to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _dumps(result)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_resumable(old: dict, config: dict) -> None:
    was = old.get("config", {})
    for key in ("folds", "k", "extra", "quick"):
        if was.get(key) != config[key]:
            raise StudyMismatch(f"{key} = {config[key]!r} here but {was.get(key)!r} in the JSON; "
                                "use another --json, or --fresh to start it over")
    for name, spec in config["methods"].items():
        if name in was.get("methods", {}) and was["methods"][name] != spec:
            raise StudyMismatch(f"method {name!r} is {spec} here but {was['methods'][name]} in "
                                "the JSON: rename it, use another --json, or --fresh")


Runner = Callable[..., dict]


def run_study(methods: Sequence[Method], *, baseline: str, folds: int, seeds: Sequence[int],
              ks: Sequence[int | None], json_path: str | Path, extra: Sequence[str] = (),
              quick: bool = False, only_folds: Sequence[int] | None = None, fresh: bool = False,
              progress: bool = True, command: str | None = None, runner: Runner | None = None,
              stats: dict[str, Any] | None = None) -> dict:
    """Run every (seed, fold, method) not yet in ``json_path``; write the JSON after each."""
    json_path = Path(json_path)
    runner = runner or run_one
    baseline = resolve_baseline(baseline, methods)
    config = {"folds": folds, "k": [k_label(k) for k in ks], "extra": list(extra),
              "quick": quick, "baseline": baseline, "seeds": sorted(set(seeds)),
              "methods": {m.name: m.spec() for m in methods},
              "baselines": method_baselines(methods)}
    result: dict[str, Any] = {"runs": [], "chance": [], "command": None}
    if json_path.is_file() and not fresh:
        result = json.loads(json_path.read_text())
        _check_resumable(result, config)
        config["seeds"] = sorted(set(result["config"].get("seeds", [])) | set(seeds))
        config["methods"] = {**result["config"].get("methods", {}), **config["methods"]}
    fold_list = list(range(folds)) if only_folds is None else sorted(set(only_folds))
    done = {(r["method"], r["fold"], r["seed"]) for r in result.get("runs", [])}
    todo = [(m, fold, seed) for seed in seeds for fold in fold_list for m in methods
            if (m.name, fold, seed) not in done]
    # The footer's command: the latest invocation that ran something.
    command = command if todo or not result.get("command") else result["command"]
    result = {"protocol": None, "config": config, "command": command, "complete": False,
              "torch_threads": result.get("torch_threads"), "summary": None,
              "runs": result.get("runs", []),
              "chance": result.get("chance", [])}
    chance_done = {(c["fold"], c["seed"]) for c in result["chance"]}

    def finish() -> None:
        wanted = {(name, f, s) for s in config["seeds"] for f in range(folds)
                  for name in config["methods"]}
        have = {(r["method"], r["fold"], r["seed"]) for r in result["runs"]}
        result["complete"] = wanted <= have
        result["protocol"] = protocol(result)
        result["summary"] = summarise(result, **(stats or {}))
        write_atomic(json_path, result)

    bar = None
    if progress and todo:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn(),
                       console=Console(stderr=True), transient=False)
        bar.start()
        task = bar.add_task("cold start", total=len(todo))
    try:
        if not todo and result["runs"]:
            finish()
        for method, fold, seed in todo:
            label = f"{method.name} fold {fold} (of {folds}) seed {seed}"
            if bar is not None:
                bar.update(task, description=label)
            run = runner(method, fold, seed, folds=folds, ks=ks, extra=extra, quick=quick)
            chance = run.pop("chance", None)
            result["runs"].append(run)
            result["torch_threads"] = run.get("torch_threads")
            if chance is not None and (fold, seed) not in chance_done:
                result["chance"].append({"fold": fold, "seed": seed, **chance})
                chance_done.add((fold, seed))
            finish()
            if bar is not None:
                bar.advance(task)
                bar.console.print(f"{label}: {_run_line(run)}", soft_wrap=True)
    finally:
        if bar is not None:
            bar.stop()
    return result


def _run_line(run: dict) -> str:
    rows = run["rows"]
    metric = "mae" if "mae" in rows else "ndcg@5"
    parts = []
    for k in dict.fromkeys(rows["k"]):
        values = [v for v, kk, s in zip(rows[metric], rows["k"], rows["step"])
                  if kk == k and s == run["max_step"] and v is not None]
        if values:
            parts.append(f"K={k} {metric} {statistics.mean(values):.4f}")
    best = f"best epoch {run['best_epoch']}" if run["tested"] == "best" else "final weights"
    total = f" ({run['run_seconds']:.0f}s in all)" if run.get("run_seconds") else ""
    return f"fit {run['fit_seconds']:.0f}s{total}, {best}; " + ", ".join(parts)


def merge(paths: Sequence[str | Path]) -> dict:
    """Runs and chance rows of several JSONs of the same study (from parallel invocations)."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    first = results[0]
    for other in results[1:]:
        _check_resumable(other, {**first["config"], "methods": {}})
    runs: dict[tuple, dict] = {}
    chance: dict[tuple, dict] = {}
    methods: dict[str, Any] = {}
    seeds: set[int] = set()
    for res in results:
        for name, spec in res["config"]["methods"].items():
            if methods.setdefault(name, spec) != spec:
                raise StudyMismatch(f"method {name!r} differs between the files")
        seeds |= set(res["config"]["seeds"])
        for r in res["runs"]:
            runs.setdefault((r["method"], r["fold"], r["seed"]), r)
        for c in res["chance"]:
            chance.setdefault((c["fold"], c["seed"]), c)
    config = {**first["config"], "methods": methods, "seeds": sorted(seeds)}
    return {**first, "config": config, "runs": list(runs.values()), "chance": list(chance.values())}


# -- command line ------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="study file (YAML): methods as recipe + overrides")
    parser.add_argument("--recipes", help="comma-separated recipe paths (methods named by stem)")
    parser.add_argument("--baseline", help="baseline method: name or recipe path")
    parser.add_argument("--folds", type=int, help="user folds F (default: study's, else 10)")
    parser.add_argument("--only-folds", help="run only these folds, e.g. 0,1,2 (the JSON still "
                                             "counts the study complete only with all F)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: study's, else 0)")
    parser.add_argument("--k", help="support sizes, e.g. 1,3,5,10,20,all (default: study's)")
    parser.add_argument("--json", default=None, help=f"results file (default {DEFAULT_JSON.relative_to(REPO)}, "
                                                     "with --quick cold_start-quick.json)")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK['folds']} folds, first seed, {QUICK['epochs']} "
                             "epoch, K 1,all")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--fresh", action="store_true", help="ignore (overwrite) an existing JSON")
    parser.add_argument("--summarise", action="store_true",
                        help="run nothing: recompute the summary of --json and print the tables")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="merge these JSONs (parallel invocations) into --json")
    parser.add_argument("--ci", choices=("t", "bootstrap"), default="t",
                        help="interval of the cells (differences: paired bootstrap always)")
    parser.add_argument("--resamples", type=int, default=_stats.RESAMPLES)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("extra", nargs="*", help="extra CLI overrides for every run, after --")
    args = parser.parse_args(argv)
    stats = {"ci": args.ci, "n_resamples": args.resamples}
    json_path = Path(args.json) if args.json else (
        DEFAULT_JSON.with_name("cold_start-quick.json") if args.quick else DEFAULT_JSON)
    command = "python benchmarks/cold_start.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    if args.summarise or args.merge:
        try:
            result = merge(args.merge) if args.merge else json.loads(json_path.read_text())
        except StudyMismatch as err:
            print(f"cold_start: cannot merge: {err}", file=sys.stderr)
            return 2
        if args.baseline:
            result["config"]["baseline"] = args.baseline
        if args.study:  # the study file's baselines (they only change the summary)
            study = load_study(args.study)
            result["config"]["baseline"] = args.baseline or study.get("baseline") \
                or result["config"]["baseline"]
            result["config"]["baselines"] = method_baselines(study["methods"])
        if args.merge:
            methods = result["config"]["methods"]
            wanted = {(name, f, s) for s in result["config"]["seeds"]
                      for f in range(result["config"]["folds"]) for name in methods}
            result["complete"] = wanted <= {(r["method"], r["fold"], r["seed"])
                                            for r in result["runs"]}
            result["protocol"] = protocol(result)
        result["summary"] = summarise(result, **stats)
        if args.merge:  # the footer names the invocations that ran the runs, then the merge
            commands = [json.loads(Path(p).read_text()).get("command") for p in args.merge]
            result["command"] = "; ".join([*dict.fromkeys(c for c in commands if c), command])
        write_atomic(json_path, result)  # the summary the tables render from, recomputed
        table = markdown(result)
        print(table)
        if args.markdown:
            Path(args.markdown).write_text(table)
        return 0

    try:
        study = load_study(args.study) if args.study else {"methods": [], "overrides": []}
        methods = list(study["methods"])
        if args.recipes:
            methods += methods_from_recipes(args.recipes.split(","))
        _check_names(methods)
        folds = args.folds or study.get("folds") or 10
        seeds = ([int(s) for s in args.seeds.split(",")] if args.seeds
                 else list(study.get("seeds") or [0]))
        ks = parse_k(args.k) if args.k else (study.get("k") or [1, 3, 5, 10, 20, None])
        if args.quick:
            folds, seeds, ks = QUICK["folds"], seeds[:1], list(QUICK["k"])
        baseline = resolve_baseline(args.baseline or study.get("baseline"), methods)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    only = [int(f) for f in args.only_folds.split(",")] if args.only_folds else None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    try:
        result = run_study(methods, baseline=baseline, folds=folds, seeds=seeds, ks=ks,
                           json_path=json_path, extra=[*study.get("overrides", []), *args.extra],
                           quick=args.quick, only_folds=only, fresh=args.fresh,
                           progress=not args.no_progress, command=command, stats=stats)
    except StudyMismatch as err:
        print(f"cold_start: {json_path}: {err}", file=sys.stderr)
        return 2
    if not result["runs"]:
        print("nothing to do", file=sys.stderr)
        return 0
    table = markdown(result)
    print(table)
    print(f"wrote {json_path}", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
