"""The ``metarec`` command: LightningCLI (fit/validate/test/predict) plus ``metarec plugins``."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from metarec import contract, registry
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
    for key in ("config", "ckpt_path", "weights_only", "allow_train_users"):
        recipe.pop(key, None)
    return recipe


# What an evaluation from a checkpoint may not change: the trained model's architecture.
ARCHITECTURE_KEYS = ("model.backbone", "model.backbone_args", "model.algorithm",
                     "model.algorithm_args")
EVALUATION_SUBCOMMANDS = {"validate": "val", "test": "test", "predict": "test"}


def command_line_keys(args: list[str]) -> set[str]:
    """The dotted keys an argument list sets explicitly (``--data.seed 1`` -> ``data.seed``),
    as opposed to what a ``--config`` file sets."""
    keys = set()
    for token in args:
        if token.startswith("--") and len(token) > 2:
            key = token[2:].split("=", 1)[0]
            if key not in ("config", "print_config", "help"):
                keys.add(key)
    return keys


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def checkpoint_defaults(ckpt: dict[str, Any], current: dict[str, Any], given: set[str]
                        ) -> tuple[dict[str, Any], list[str], list[str]]:
    """The ``model``/``data`` values an evaluation from ``ckpt`` runs with.

    The checkpoint's hyperparameters are the defaults: they replace what the recipe file (or
    the parser defaults) say, and every key given explicitly on the command line (``given``)
    wins over them. Returns ``(values, notices, problems)``: ``values`` as ``{"model": ...,
    "data": ...}`` for ``parse_object``; ``notices`` for recipe values the checkpoint replaced;
    ``problems`` for command-line values that would change the trained architecture.
    """
    sections = {"model": dict(ckpt.get("hyper_parameters") or {}),
                "data": dict(ckpt.get("datamodule_hyper_parameters") or {})}
    sections["model"].pop("schema", None)  # linked from the data
    sections["model"].pop("_instantiator", None)
    sections["data"] = {k: v for k, v in sections["data"].items() if k in contract.CONTRACT_KEYS}
    values: dict[str, Any] = {"model": {}, "data": {}}
    notices, problems = [], []
    for section, saved in sections.items():
        for key, value in saved.items():
            dotted = f"{section}.{key}"
            value = contract.plain(value)
            now = contract.plain((current.get(section) or {}).get(key))
            inner = sorted(g for g in given if g.startswith(dotted + "."))
            if dotted in given:
                if dotted in ARCHITECTURE_KEYS and now != value:
                    problems.append(f"--{dotted} {now!r} differs from the checkpoint's "
                                    f"{value!r}: it would change the trained model")
                continue  # the command line wins
            if inner:  # e.g. --data.tasks.query_size: the checkpoint's dict, that key replaced
                if dotted in ARCHITECTURE_KEYS:
                    problems.append(f"--{inner[0]} would change the trained model")
                merged = dict(value) if isinstance(value, dict) else {}
                for g in inner:
                    path = g[len(dotted) + 1:].split(".")
                    node = now
                    for part in path:
                        node = node.get(part) if isinstance(node, dict) else None
                    _set_path(merged, path, node)
                value = merged
            elif now is not None and now != value:
                notices.append(f"{dotted} = {value!r} from the checkpoint (the recipe says "
                               f"{now!r}; pass --{dotted} to override)")
            values[section][key] = value
    return values, notices, problems


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

    def parse_arguments(self, parser: Any, args: Any) -> None:
        # Kept to tell what the command line sets explicitly from what a --config file sets.
        self._argv = [str(a) for a in (sys.argv[1:] if args is None else args)] \
            if not isinstance(args, dict) else []
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path``: the checkpoint's model and data settings become the defaults
        (they replace the recipe file's), and what the command line sets wins over them, except
        where it would change the trained architecture (an error). Replaces Lightning's own,
        which applies the checkpoint's hyperparameters over the command line (so ``--model.*``
        overrides were silently lost: Lightning issues #20801, #20310)."""
        self._ckpt: dict[str, Any] | None = None
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        path = self.config[subcommand].get("ckpt_path")
        if not path or not Path(path).is_file():
            return
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
        self._ckpt = {k: ckpt.get(k) for k in ("metarec_split", "metarec_data")}
        config = self.config[subcommand]
        current = {section: yaml.safe_load(self._parser(subcommand).dump(
            config, skip_none=False)).get(section) or {} for section in ("model", "data")}
        given = command_line_keys(self._argv)
        values, notices, problems = checkpoint_defaults(ckpt, current, given)
        if problems:
            self._exit(subcommand, "the command line changes the checkpoint's model:\n  "
                       + "\n  ".join(problems) + "\n  (evaluation may change model.policy, "
                       "model.policy_args, model.metrics, model.divergence)")
        for line in notices:
            print(f"metarec {subcommand}: {line}", file=sys.stderr)
        self.config = self.parser.parse_object({subcommand: values}, self.config)

    @staticmethod
    def _exit(subcommand: str, message: str) -> None:
        """A usage error: one short message on stderr, exit status 2, no traceback."""
        print(f"metarec {subcommand}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def _check_contract(self) -> None:
        """Stop when the users to evaluate were meta-training users of the checkpoint."""
        split = EVALUATION_SUBCOMMANDS[self.subcommand]
        saved = (getattr(self, "_ckpt", None) or {})
        splits = self.datamodule.splits
        n = contract.trained_on(saved, splits, self.datamodule.table.user_keys, split)
        if n is None:
            return  # no checkpoint, or one written before checkpoints carried their split
        allowed = self.config[self.subcommand].get("allow_train_users")
        if n and not allowed:
            self._exit(self.subcommand, f"{n} of the {len(splits[split])} {split} users were "
                       "meta-training users of the checkpoint (the data settings differ from "
                       "the ones it was fit with: data.seed, data.fold, data.tasks or the data "
                       "set); drop the --data overrides to use the checkpoint's split, or pass "
                       "--allow_train_users true to evaluate anyway")
        if n:
            print(f"metarec {self.subcommand}: warning: {n} {split} users were meta-training "
                  "users (allowed by --allow_train_users)", file=sys.stderr)
        elif not contract.same_split(saved["metarec_split"], splits, split):
            print(f"metarec {self.subcommand}: note: the {split} tasks differ from the "
                  "checkpoint's (no user overlap with its meta-training users)", file=sys.stderr)

    def before_validate(self) -> None:
        self._check_contract()

    def before_test(self) -> None:
        self._check_contract()

    def before_predict(self) -> None:
        self._check_contract()

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The resolved recipe travels in every checkpoint (MetaLearner.on_save_checkpoint).
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.model.metarec_recipe = resolved_recipe(self._parser(self.subcommand), config)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.schema", "model.schema", apply_on="instantiate")
        parser.set_defaults(PARSER_DEFAULTS)
        parser.add_class_arguments(BestCheckpoint, "checkpoint")
        parser.add_argument("--allow_train_users", type=bool, default=False,
                            help="validate/test/predict from a checkpoint: evaluate even when "
                                 "the evaluated users were meta-training users of the checkpoint")

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
        best = config.get("checkpoint")
        if best is not None and best.get("monitor"):
            checkpoints = [c for c in trainer.get("callbacks") or []
                           if str(getattr(c, "class_path", "")).endswith("ModelCheckpoint")]
            for callback in checkpoints:  # keep the best epoch on the metric (and last)
                callback.init_args["monitor"] = best.monitor
                callback.init_args["mode"] = best.mode
                callback.init_args["save_last"] = True
                callback.init_args["filename"] = "best-{epoch}-{step}"
                callback.init_args["auto_insert_metric_name"] = False
        dropped = []
        if trainer.get("enable_progress_bar") is False:
            dropped.append("ProgressBar")
        if trainer.get("enable_checkpointing") is False:
            dropped.append("Checkpoint")
        if dropped:
            trainer["callbacks"] = [
                c for c in trainer.get("callbacks") or []
                if not any(str(getattr(c, "class_path", c)).endswith(d) for d in dropped)]


@dataclasses.dataclass
class BestCheckpoint:
    """A recipe's ``checkpoint:`` block: keep the best epoch on a validation metric.

    ``monitor`` (e.g. ``val/mae``) and ``mode`` (``min`` or ``max``) configure the default
    ``ModelCheckpoint``: it keeps the best checkpoint (``best-<epoch>-<step>.ckpt``) and
    ``last.ckpt``; ``trainer.test(ckpt_path="best")`` and the results runner test the best one.
    Without ``monitor``, only the last is kept.
    """

    monitor: str | None = None
    mode: Literal["min", "max"] = "min"


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


def export_split_command(args: list[str]) -> None:
    """``metarec export-split --out FILE --config RECIPE [overrides]`` (or ``--ckpt_path CKPT``
    alone: the split that checkpoint was fit on): write the users of each split and every
    query, in raw ids. ``--data.split_file FILE`` reads it back in any later run."""
    from metarec.contract import write_split_file

    if "--out" not in args or args.index("--out") + 1 >= len(args):
        print("metarec export-split: error: give --out FILE (and the recipe: --config ...)",
              file=sys.stderr)
        raise SystemExit(2)
    at = args.index("--out")
    out, rest = args[at + 1], args[:at] + args[at + 2:]
    if rest[:1] == ["--ckpt_path"] and len(rest) == 2:  # a checkpoint's own split
        from metarec.checkpoint import datamodule_from_checkpoint

        datamodule = datamodule_from_checkpoint(rest[1])
    else:
        datamodule = MetarecCLI(args=rest, run=False).datamodule
    path = write_split_file(out, datamodule.splits, datamodule.table)
    splits = datamodule.splits
    print(f"wrote {path}: {len(splits.train)} train, {len(splits.val)} val, "
          f"{len(splits.test)} test users")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["plugins"]:
        print_plugins()
        return
    if args[:1] == ["adapt"]:
        from metarec.adapter import adapt_command

        adapt_command(args[1:])
        return
    # Bad input (a data file, a setting, a plugin) is one line on stderr and exit status 2;
    # METAREC_TRACEBACK=1 shows the traceback too.
    from metarec.data.errors import ConfigError, DataError

    try:
        if args[:1] == ["export-split"]:
            export_split_command(args[1:])
            return
        if args[:1] == ["simulate"]:
            from metarec.simulate import simulate_command

            simulate_command(args[1:])
            return
        MetarecCLI(args=argv)  # None: LightningCLI reads sys.argv itself
    except (DataError, ConfigError, registry.PluginError) as err:
        if os.environ.get("METAREC_TRACEBACK"):
            raise
        command = args[0] if args and not args[0].startswith("-") else "fit"
        print(f"metarec {command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
