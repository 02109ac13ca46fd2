"""model.init_from: meta-training starts from another run's backbone weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO
from metarec.cli import MetarecCLI, main

QUICK = str(REPO / "recipes" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
         "--trainer.enable_model_summary", "false"]


class StartState:
    """Records the backbone's state when training starts (after init_from is applied)."""

    def __init__(self):
        import lightning.pytorch as pl

        outer = self

        class Hook(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                outer.state = {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}

        self.callback = Hook()


def _pretrain(tmp, *extra) -> Path:
    cli = MetarecCLI(args=["--config", QUICK, "--model.algorithm", "pretrain",
                           "--trainer.max_steps", "3", *QUIET, *extra], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = tmp / "pretrain.ckpt"
    cli.trainer.save_checkpoint(path)
    return path


def test_init_from_loads_exactly_the_checkpoints_backbone(in_tmp):
    ckpt = _pretrain(in_tmp)
    saved = {k[len("backbone."):]: v for k, v in torch.load(ckpt, weights_only=True)
             ["state_dict"].items() if k.startswith("backbone.")}
    cli = MetarecCLI(args=["--config", QUICK, "--model.init_from", str(ckpt),
                           "--trainer.max_steps", "1", *QUIET], run=False)
    fresh = {k: v.clone() for k, v in cli.model.backbone.state_dict().items()}
    start = StartState()
    cli.trainer.callbacks.append(start.callback)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert set(start.state) == set(saved)
    for name, value in saved.items():
        assert torch.equal(start.state[name], value), name
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved)  # not a no-op


def test_init_from_refuses_another_backbone_and_another_split(in_tmp, capsys):
    ckpt = _pretrain(in_tmp)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", QUICK, "--model.init_from", str(ckpt),
              "--model.backbone_args", "{embedding_dim: 8, hidden: [32, 32]}",
              "--trainer.max_steps", "1", *QUIET])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "model.init_from" in err and "does not fit this one" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICK, "--model.init_from", str(ckpt), "--data.seed", "7",
              "--trainer.max_steps", "1", *QUIET])
    assert "it was fit on" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICK, "--model.init_from", "missing.ckpt",
              "--trainer.max_steps", "1", *QUIET])
    assert "checkpoint not found: missing.ckpt" in capsys.readouterr().err


def test_init_from_a_recipe_fits_it_on_this_runs_split_first(in_tmp, tmp_path):
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(Path(QUICK).read_text().replace("algorithm: maml", "algorithm: pretrain")
                      .replace("max_epochs: 8", "max_epochs: 1"))
    args = ["--config", QUICK, "--model.init_from", str(recipe), "--data.seed", "3",
            "--trainer.max_steps", "1", *QUIET]
    cli = MetarecCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cached = list((in_tmp / "runs" / "init").glob("pretrain-*.ckpt"))
    assert len(cached) == 1
    from metarec import load_checkpoint

    ckpt = load_checkpoint(cached[0])
    assert ckpt["datamodule_hyper_parameters"]["seed"] == 3  # this run's split, passed on
    assert torch.equal(ckpt["metarec_split"]["users"]["test"], cli.datamodule.splits.test.users)
    assert ckpt["hyper_parameters"]["algorithm"] == "pretrain"
    # A second run with the same data reuses the cached stage.
    stamp = cached[0].stat().st_mtime_ns
    cli = MetarecCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cached[0].stat().st_mtime_ns == stamp
