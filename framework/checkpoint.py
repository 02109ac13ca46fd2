"""Rebuilding models from checkpoints, and training a recipe as a stage of another."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from metarec import contract, registry
from metarec.backbone import Backbone
from metarec.data.errors import ConfigError
from metarec.data.tasks import TaskSplits

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


class CheckpointError(ConfigError):
    """A file that is not a readable metarec checkpoint (the CLI: one line, exit status 2)."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: tensors, containers and the few metarec types
    allow-listed for it (:mod:`metarec.schema`, :mod:`metarec.metrics`, ...), never code. A file
    that does not load that way (a pickle carrying code, or not a checkpoint at all) is a
    :class:`CheckpointError` that names it; nothing in it runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "Weights only load failed" in first:
            first = "it holds objects other than tensors and plain data (refused unread)"
        raise CheckpointError(f"{path} is not a metarec checkpoint: {first}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a metarec checkpoint (it holds a "
                              f"{type(ckpt).__name__}, not a checkpoint dict)")
    return ckpt


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a metarec (Lightning) checkpoint; a clear error if it is missing or foreign
    (``FileNotFoundError``, :class:`CheckpointError`)."""
    ckpt = read_checkpoint(path)
    hparams = ckpt.get("hyper_parameters", {})
    if not isinstance(hparams, dict) or "schema" not in hparams or "backbone" not in hparams:
        raise CheckpointError(f"{path} is not a metarec checkpoint (no backbone/schema "
                              "hyperparameters)")
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


def train_recipe(recipe: str | Path, checkpoint: str | Path, overrides: list[str] | None = None,
                 progress_bar: bool = False) -> Path:
    """Run ``metarec fit`` on ``recipe`` (quietly; with ``progress_bar``, Lightning's progress
    bar only) and save the final model to ``checkpoint``.

    Used for stages such as a distillation teacher named in another recipe.
    """
    from metarec.lightning_cli import MetarecCLI

    quiet = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
             "--trainer.enable_progress_bar", "true" if progress_bar else "false",
             "--trainer.enable_model_summary", "false", "--trainer.callbacks", "[]"]
    cli = MetarecCLI(args=["--config", str(recipe), *quiet, *(overrides or [])], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checkpoint = Path(checkpoint)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    cli.trainer.save_checkpoint(checkpoint)
    return checkpoint


def load_backbone_weights(backbone: torch.nn.Module, path: str | Path,
                          splits: TaskSplits | None = None,
                          user_keys: Sequence[Any] | None = None) -> None:
    """Load the backbone weights of checkpoint ``path`` into ``backbone`` (``model.init_from``):
    every parameter and buffer, same names and shapes, else a :class:`ConfigError` naming them.

    With ``splits`` (this run's), also refuse a checkpoint that meta-trained on users this run
    validates or tests on (its data contract, :mod:`metarec.contract`): starting from it would
    leak their ratings into the start."""
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"model.init_from: {err}") from None
    if splits is not None:
        for split in ("val", "test"):
            n = contract.trained_on(ckpt, splits, user_keys, split)
            if n:
                raise ConfigError(f"model.init_from {path}: it was fit on {n} of this run's "
                                  f"{split} users (another data.seed, fold or data set); start "
                                  "from a checkpoint fit on this run's split")
    prefix = "backbone."
    saved = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(saved))
    extra = sorted(set(saved) - set(own))
    shapes = [f"{k}: {tuple(saved[k].shape)} there, {tuple(v.shape)} here"
              for k, v in own.items() if k in saved and saved[k].shape != v.shape]
    if missing or extra or shapes:
        parts = ([f"missing {missing}"] if missing else []) + \
            ([f"not in this backbone {extra}"] if extra else []) + shapes
        raise ConfigError(f"model.init_from {path}: its backbone does not fit this one: "
                          + "; ".join(parts))
    backbone.load_state_dict(saved)


def init_checkpoint(init_from: str, datamodule: Any, root: str | Path) -> Path:
    """The checkpoint ``model.init_from`` names: the file itself, or, for a recipe
    (``.yaml``), that recipe fit first on this run's data settings (same data set, tasks, seed,
    folds and fold, so the same users) and cached under ``{root}/init/`` by recipe and data."""
    if not init_from.endswith((".yaml", ".yml")):
        return Path(init_from)
    if not Path(init_from).is_file():
        raise ConfigError(f"model.init_from: recipe not found: {init_from}")
    data = {k: v for k, v in dict(datamodule.hparams).items() if k in contract.CONTRACT_KEYS}
    data = contract.plain(data)
    seed = os.environ.get("PL_GLOBAL_SEED", "0")
    text = json.dumps([Path(init_from).read_text(), data, seed], sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = Path(root) / "init" / f"{Path(init_from).stem}-{digest}.ckpt"
    if not path.is_file():
        overrides = ["--seed_everything", seed]
        for key, value in data.items():
            overrides += [f"--data.{key}", value if isinstance(value, str) else json.dumps(value)]
        train_recipe(init_from, path, overrides)
    return path


def datamodule_from_checkpoint(path: str | Path, data: dict[str, Any] | None = None, *,
                               where: str = "metarec") -> Any:
    """The datamodule a checkpoint was fit with (its data contract), or one from ``data``
    (EpisodeDataModule arguments, as a recipe's ``data:``); a :class:`ValueError` if that
    split's test users were the checkpoint's meta-training users."""
    from metarec.data.tasks import TaskConfig
    from metarec.datamodule import EpisodeDataModule

    ckpt = load_checkpoint(path)
    if data is None:
        data = ckpt.get("datamodule_hyper_parameters")
    if not isinstance(data, dict):
        raise ValueError(f"{where}: the checkpoint carries no data settings (written before "
                         "checkpoints carried their split): give a data: section, as the fit "
                         "recipe's data:")
    data = {k: v for k, v in data.items() if not k.startswith("_")}  # Lightning's _instantiator
    if isinstance(data.get("tasks"), dict):
        data["tasks"] = TaskConfig(**data["tasks"])
    datamodule = EpisodeDataModule(**data)
    n = contract.trained_on(ckpt, datamodule.splits, datamodule.table.user_keys, "test")
    if n:
        raise ValueError(f"{where}: {n} of the {len(datamodule.splits.test)} test users of "
                         "data: were meta-training users of the checkpoint; drop data: to use "
                         "the checkpoint's own test users")
    return datamodule
