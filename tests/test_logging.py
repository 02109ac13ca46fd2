"""Offline W&B run file and the CSV log beside it."""

from __future__ import annotations

import csv
import json
import time

import wandb

from conftest import REPO
from metarec.cli import MetarecCLI
from wandb_records import read_records


def test_offline_wandb_and_csv_logs(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cli = MetarecCLI(args=["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"),
                           "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
                           "--trainer.log_every_n_steps", "1"])
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    wandb.finish()  # flush the run file (a CLI process does this at exit)
    # One run, one folder: runs/<run>/ holds the W&B run (id <run>), the CSV log, config.yaml
    # and the checkpoints.
    (folder,) = [p for p in (in_tmp / "runs").iterdir() if p.is_dir()]
    runs = list((folder / "wandb").glob(f"offline-run-*-{folder.name}/run-{folder.name}.wandb"))
    assert len(runs) == 1
    assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
    # The W&B service writes asynchronously: wait for the run's exit record (the last one).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        records = list(read_records(runs[0]))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.2)
    history_keys, config = set(), {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history_keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    for key in ("train/loss", "val/loss", "val/mae", "val/ndcg@5", "val/step0/rmse",
                "val/step3/adapt_ratio",
                # adaptation curves (a table, and a line chart per series whose data W&B stores
                # as "<chart>_table"), and the per-user test table
                "val/adaptation_curve/path", "val/adaptation_curve/loss_table/path",
                "val/adaptation_curve/ndcg@5_table/path", "test/adaptation_curve/path",
                "test/users/path"):
        assert key in history_keys, key
    table = {"/".join(i.nested_key): json.loads(i.value_json) for r in records
             if r.WhichOneof("record_type") == "history" for i in r.history.item}
    # one row per (user, support cap, step): user, k, step, support_size, diverged + 8 metrics
    assert table["test/users/ncols"] == 13
    assert table["test/users/nrows"] == 4 * len(cli.datamodule.splits["test"])
    assert config["algorithm"] == "maml" and config["backbone"] == "melu"
    # The resolved recipe is the run's config, defaults included.
    recipe = config["recipe"]
    # (the plugin's defaults filled in: the values the run used)
    assert recipe["model"]["algorithm_args"]["inner_steps"] == 3
    assert recipe["model"]["algorithm_args"]["inner_lr"] == 0.05
    assert recipe["model"]["algorithm_args"]["first_order"] is False
    assert recipe["data"]["tasks"]["query_size"] == 10
    assert recipe["trainer"]["inference_mode"] is False
    # Parameter counts (the default ParameterCount callback): total, fast, fast fraction.
    params = config["parameters"]
    fast = sum(p.numel() for p in cli.model.functional.split()[0].values())
    assert params["fast"] == fast
    assert params["total"] == sum(p.numel() for p in cli.model.parameters())
    assert params["fast_fraction"] == fast / sum(p.numel() for p in cli.model.backbone.parameters())

    csv_dir = folder
    curve = list(csv.DictReader(open(csv_dir / "val_adaptation_curve.csv")))
    assert [int(r["step"]) for r in curve] == [0, 1, 2, 3]
    assert {r["epoch"] for r in curve} == {"0"} and {r["global_step"] for r in curve} == {"4"}
    assert float(curve[-1]["loss"]) < float(curve[0]["loss"])  # adaptation lowers query loss
    users = [r for r in csv.DictReader(open(csv_dir / "test_users.csv")) if r["step"] == "3"]
    assert len(users) == len(cli.datamodule.splits["test"])
    assert {u["k"] for u in users} == {"all"} and {u["diverged"] for u in users} == {"False"}
    assert all(int(u["support_size"]) >= 3 for u in users)
    rows = list(csv.DictReader(open(csv_dir / "metrics.csv")))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [r for r in rows if r.get("val/ndcg@5")]
    assert len(train) == 4 and all(x > 0 for x in train)
    assert len(val) == 1 and 0 < float(val[0]["val/ndcg@5"]) <= 1
