"""The ``metarec`` command: LightningCLI (fit/validate/test/predict) plus ``metarec plugins``."""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from metarec import registry
from metarec.data.tasks import TaskConfig
from metarec.datamodule import EpisodeDataModule
from metarec.module import MetaLearner

TRAINER_DEFAULTS: dict[str, Any] = {
    # validate/test adapt with gradients: inference_mode would kill the inner loop.
    "inference_mode": False,
    "default_root_dir": "runs",
}
# Defaults given as configs (class_path/init_args), set on the parser so that they are
# instantiated like a recipe's own and a recipe's trainer.logger / trainer.callbacks replace them.
PARSER_DEFAULTS: dict[str, Any] = {
    "trainer.logger": [
        {"class_path": "metarec.loggers.WandbLogger", "init_args": {"save_dir": "runs"}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger",
         "init_args": {"save_dir": "runs", "name": "csv"}},
    ],
    "trainer.callbacks": [
        {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
        {"class_path": "metarec.callbacks.MetricsSummary"},
        {"class_path": "metarec.callbacks.ParameterCount"},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True}},
        # Ctrl-C (or any exception) during fit leaves runs/interrupted/on_exception.ckpt.
        # Not Lightning's OnExceptionCheckpoint: with one of those, every later fit without
        # --ckpt_path silently resumes from the newest last/exception checkpoint it finds.
        {"class_path": "metarec.callbacks.InterruptCheckpoint",
         "init_args": {"dirpath": "runs/interrupted"}},
    ],
}


def resolved_recipe(parser: Any, config: Any) -> dict[str, Any]:
    """The recipe as resolved (config files, overrides and defaults), a plain dict without
    ``config`` and the subcommand's own arguments (``ckpt_path``, ``weights_only``): what
    ``metarec fit --config`` (or any other subcommand) would rerun."""
    recipe = yaml.safe_load(parser.dump(config, skip_none=False))
    for key in ("config", "ckpt_path", "weights_only"):
        recipe.pop(key, None)
    return recipe


class RecipeToLoggers(SaveConfigCallback):
    """Saves the resolved recipe beside the logs and records it as every logger's config."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        recipe = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        recipe.pop("config", None)
        for logger in trainer.loggers:
            logger.log_hyperparams({"recipe": recipe})


class MetarecCLI(LightningCLI):
    """LightningCLI for MetaLearner + EpisodeDataModule, OmegaConf recipes, seeded by default."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", RecipeToLoggers)
        super().__init__(MetaLearner, EpisodeDataModule, args=args, run=run,
                         auto_configure_optimizers=False, **kwargs)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The resolved recipe travels in every checkpoint (MetaLearner.on_save_checkpoint).
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.model.metarec_recipe = resolved_recipe(self._parser(self.subcommand), config)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.schema", "model.schema", apply_on="instantiate")
        parser.set_defaults(PARSER_DEFAULTS)

    def before_instantiate_classes(self) -> None:
        """Check the recipe before anything is built (see :func:`validate_recipe`), then make
        ``--trainer.enable_progress_bar false`` / ``--trainer.enable_checkpointing false`` also
        drop the default progress-bar / checkpoint callbacks (Lightning refuses them then)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        problems = validate_recipe(config)
        if problems:
            # Reported as jsonargparse reports a parse error: usage, message, exit status 2.
            self._parser(self.subcommand).error(
                "invalid recipe:\n  " + "\n  ".join(problems))
        trainer = config.get("trainer")
        if trainer is None:
            return
        dropped = []
        if trainer.get("enable_progress_bar") is False:
            dropped.append("ProgressBar")
        if trainer.get("enable_checkpointing") is False:
            dropped.append("Checkpoint")
        if dropped:
            trainer["callbacks"] = [
                c for c in trainer.get("callbacks") or []
                if not any(str(getattr(c, "class_path", c)).endswith(d) for d in dropped)]


# (section, plugin key, registry kind): the plugin choices a recipe makes.
PLUGIN_KEYS = (("model", "backbone", "backbones"), ("model", "algorithm", "algorithms"),
               ("model", "policy", "policies"), ("data", "dataset", "datasets"))


# Outer optimisers that accept a mix of sparse and dense gradients.
SPARSE_OPTIMIZERS = ("metarec.optim.LazyAdam", "torch.optim.SGD", "torch.optim.Adagrad",
                     "torch.optim.sgd.SGD", "torch.optim.adagrad.Adagrad")


def validate_recipe(config: Any) -> list[str]:
    """What is wrong with a parsed recipe (one line each, naming the key), before instantiation.

    jsonargparse has already checked what the signatures of MetaLearner, EpisodeDataModule and
    ``data.tasks`` (:class:`~metarec.data.tasks.TaskConfig`) type. This adds what it cannot see:
    the plugin argument dicts (``model.algorithm_args`` and the others, checked against the
    plugin's signature by :func:`metarec.registry.validate_args`), the rules that span several
    ``data.tasks`` fields, ``model.optimizer``'s ``lr > 0``, and an optimiser that accepts
    sparse gradients when the backbone produces them. Nothing is instantiated.
    """
    problems: list[str] = []
    for section, field, kind in PLUGIN_KEYS:
        part = config.get(section)
        name = part.get(field) if part is not None else None
        if name is None:
            continue
        try:
            registry.validate_args(kind, name, part.get(f"{field}_args"),
                                   key=f"{section}.{field}_args")
        except registry.PluginArgumentError as err:
            problems.extend(str(err).splitlines())
        except registry.PluginError as err:
            problems.append(f"{section}.{field}: {err}")
    tasks = config.get("data.tasks") if config.get("data") is not None else None
    if tasks is not None:
        try:
            TaskConfig(**(tasks.as_dict() if hasattr(tasks, "as_dict") else dict(tasks)))
        except (TypeError, ValueError) as err:
            problems.append(f"data.tasks: {err}")
    optimizer = config.get("model.optimizer") if config.get("model") is not None else None
    init_args = getattr(optimizer, "init_args", None)
    lr = init_args.get("lr") if init_args is not None else None
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and not lr > 0:
        problems.append(f"model.optimizer.init_args.lr = {lr!r} is invalid for the outer "
                        f"optimizer {optimizer.class_path}: must be > 0")
    model = config.get("model")
    backbone_args = model.get("backbone_args") if model is not None else None
    sparse = bool(backbone_args and dict(backbone_args).get("sparse_item_gradients"))
    optimizer_class = getattr(optimizer, "class_path", None) or "torch.optim.Adam (default)"
    if sparse and optimizer_class not in SPARSE_OPTIMIZERS:
        problems.append(
            f"model.optimizer: {optimizer_class} does not take the sparse gradients that "
            "model.backbone_args.sparse_item_gradients produces; use metarec.optim.LazyAdam "
            "(Adam on dense gradients, lazy Adam on sparse ones), torch.optim.SGD or "
            "torch.optim.Adagrad")
    return problems


def print_plugins(stream: Any = None) -> None:
    """Print every plugin group: alias, class path, distribution and version."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=stream or sys.stdout, width=140)
    for kind in registry.GROUPS:
        table = Table(title=f"{kind} ({registry.GROUPS[kind]})", title_justify="left")
        for col in ("alias", "class", "distribution", "version"):
            table.add_column(col)
        for info in registry.available(kind):
            table.add_row(info.alias, info.target, info.distribution, info.version)
        console.print(table)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["plugins"]:
        print_plugins()
        return
    if args[:1] == ["adapt"]:
        from metarec.adapter import adapt_command

        adapt_command(args[1:])
        return
    if args[:1] == ["simulate"]:
        from metarec.simulate import simulate_command

        simulate_command(args[1:])
        return
    MetarecCLI(args=argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
