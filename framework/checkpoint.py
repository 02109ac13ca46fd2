"""Rebuilding models from checkpoints, and training a recipe as a stage of another."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from metarec import registry
from metarec.backbone import Backbone

_FOR_INFERENCE = contextvars.ContextVar("metarec_for_inference", default=False)


@contextlib.contextmanager
def for_inference() -> Iterator[None]:
    """Within this block a model is being rebuilt only to adapt and serve (e.g. by
    :class:`metarec.Adapter`): plugins may skip what only meta-training needs (a distillation
    teacher, say)."""
    token = _FOR_INFERENCE.set(True)
    try:
        yield
    finally:
        _FOR_INFERENCE.reset(token)


def building_for_inference() -> bool:
    """True inside :func:`for_inference`."""
    return _FOR_INFERENCE.get()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a metarec (Lightning) checkpoint; a clear error if it is missing or foreign."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hparams = ckpt.get("hyper_parameters", {})
    if "schema" not in hparams or "backbone" not in hparams:
        raise ValueError(f"{path} is not a metarec checkpoint (no backbone/schema hyperparameters)")
    return ckpt


def load_backbone(path: str | Path) -> Backbone:
    """The meta-learned backbone of a checkpoint made by ``metarec fit``, in eval mode."""
    ckpt = load_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    backbone = registry.build("backbones", hp["backbone"], hp.get("backbone_args"),
                              schema=hp["schema"])
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    backbone.load_state_dict(state)
    return backbone.eval()


def train_recipe(recipe: str | Path, checkpoint: str | Path, overrides: list[str] | None = None) -> Path:
    """Run ``metarec fit`` on ``recipe`` (quietly) and save the final model to ``checkpoint``.

    Used for stages such as a distillation teacher named in another recipe.
    """
    from metarec.cli import MetarecCLI

    quiet = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
             "--trainer.callbacks", "[]"]
    cli = MetarecCLI(args=["--config", str(recipe), *quiet, *(overrides or [])], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checkpoint = Path(checkpoint)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    cli.trainer.save_checkpoint(checkpoint)
    return checkpoint
