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
    MetarecCLI(args=["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"),
                     "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
                     "--trainer.log_every_n_steps", "1"])
    wandb.finish()  # flush the run file (a CLI process does this at exit)
    runs = list((in_tmp / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
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
                "val/step3/adapt_ratio"):
        assert key in history_keys, key
    assert config["algorithm"] == "maml" and config["backbone"] == "melu"
    # The resolved recipe is the run's config, defaults included.
    recipe = config["recipe"]
    assert recipe["model"]["algorithm_args"] == {"inner_steps": 3, "inner_lr": 0.05}
    assert recipe["data"]["tasks"]["query_size"] == 10
    assert recipe["trainer"]["inference_mode"] is False

    rows = list(csv.DictReader(open(next((in_tmp / "runs" / "csv").glob("version_*/metrics.csv")))))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [r for r in rows if r.get("val/ndcg@5")]
    assert len(train) == 4 and all(x > 0 for x in train)
    assert len(val) == 1 and 0 < float(val[0]["val/ndcg@5"]) <= 1
