"""LightningCLI for metarec (``metarec fit|validate|test|predict|export-split``): the recipe
commands of :mod:`metarec.cli`, on the parser that also carries ``plugins``, ``adapt`` and
``simulate``. Imported only when a recipe command runs (it loads Lightning)."""

from __future__ import annotations

import dataclasses
import datetime
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from metarec import contract
from metarec.cli import (
    EVALUATION_SUBCOMMANDS,
    EXTRA_COMMANDS,
    LIGHTNING_COMMANDS,
    PARSER_DEFAULTS,
    RECIPE_COMMANDS,
    TRAINER_DEFAULTS,
    BestCheckpoint,
    ShortErrors,
    add_command_parsers,
    add_verbose_argument,
    checkpoint_defaults,
    command_line_keys,
    fill_plugin_defaults,
    raw_plugin_strings,
    resolved_recipe,
    run_command,
    validate_recipe,
)
from metarec.datamodule import EpisodeDataModule
from metarec.module import MetaLearner

__all__ = ["MetarecCLI", "MetarecLightningParser", "PredictionSettings", "RecipeToLoggers"]

# ckpt_path values that Lightning resolves itself (not files)
_SPECIAL_CKPT = {"best", "last", "hpc", "registry"}
# (Lightning's own CSVLogger, named in a recipe, keeps the folders the recipe gives it.)
_CSV_LOGGERS = ("metarec.loggers.CSVLogger",)


class MetarecLightningParser(ShortErrors, LightningArgumentParser):
    """LightningCLI's parser with metarec's short errors (see :class:`metarec.cli.ShortErrors`)."""


class RecipeToLoggers(SaveConfigCallback):
    """Saves the resolved recipe beside the logs and records it as every logger's config."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        recipe = resolved_recipe(self.parser, self.config)
        for logger in trainer.loggers:
            logger.log_hyperparams({"recipe": recipe})


@dataclasses.dataclass
class PredictionSettings:
    """``metarec predict``'s ``predictions:`` block: where each test user's adapted top-k goes.

    ``path``: the JSON Lines file (default: ``predictions.jsonl`` in the run folder); ``k``:
    recommendations per user; ``include_seen``: also recommend the user's support items.
    """

    path: str | None = None
    k: int = 10
    include_seen: bool = False


def new_run_name(stem: str) -> str:
    """``20261202-074214-quickstart-3fa1``: sortable by start time, unique, a valid W&B id."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    clean = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem)[:40]
    return f"{stamp}-{clean}-{secrets.token_hex(2)}"


class MetarecCLI(LightningCLI):
    """LightningCLI for MetaLearner + EpisodeDataModule, OmegaConf recipes, seeded by default."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("parser_class", MetarecLightningParser)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", RecipeToLoggers)
        self.run_dir: Path | None = None
        super().__init__(MetaLearner, EpisodeDataModule, args=args, run=run,
                         auto_configure_optimizers=False, **kwargs)

    # -- the parser -------------------------------------------------------------------------
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)  # --trainer.max_epoch is not --max_epochs
        kwargs.setdefault("parser_mode", "omegaconf")
        kwargs.setdefault("prog", "metarec")
        return super().init_parser(**kwargs)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            add_verbose_argument(self.parser)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """LightningCLI's four, then ``export-split`` (a recipe command too) and the commands
        with their own arguments, on the same parser (see :mod:`metarec.cli`)."""
        super()._add_subcommands(parser, **kwargs)
        subcommands = parser._subcommands_action
        for action in getattr(subcommands, "_choices_actions", []):
            if action.dest in LIGHTNING_COMMANDS:
                action.help = LIGHTNING_COMMANDS[action.dest]
        for name in ("validate", "test"):  # metarec's summary instead of Lightning's table
            self._subcommand_parsers[name].set_defaults(verbose=False)
        predict = self._subcommand_parsers["predict"]
        predict.set_defaults(return_predictions=False)
        predict.add_class_arguments(PredictionSettings, "predictions")
        export = self.init_parser(description=RECIPE_COMMANDS["export-split"])
        self._add_arguments(export)
        export.add_argument("--out", type=str, required=True, help="the split file to write")
        export.add_argument("--ckpt_path", type=str | None, default=None,
                            help="the split this checkpoint was fit on (alone: no recipe)")
        self._subcommand_parsers["export-split"] = export
        self._subcommand_method_arguments["export-split"] = []
        subcommands.add_subcommand("export-split", export, help=RECIPE_COMMANDS["export-split"])
        self._subcommand_parsers.update(add_command_parsers(subcommands))

    def parse_arguments(self, parser: Any, args: Any) -> None:
        # (LightningCLI's own warns when args and sys.argv are both given: simulate and
        # train_recipe call the CLI from within a command.)
        if isinstance(args, dict):
            self._argv: list[str] = []
            self._print_config: str | None = None
            self._raw_strings: dict[str, str] = {}
            self.config = parser.parse_object(args)
            return
        tokens = [str(a) for a in (sys.argv[1:] if args is None else args)]
        self._argv = tokens
        self._raw_strings = raw_plugin_strings(tokens)
        self._print_config = None
        from metarec.cli import _subcommand

        if _subcommand(tokens) not in EXTRA_COMMANDS:
            # printed once the plugin defaults and a checkpoint's settings are resolved
            kept = []
            for token in tokens:
                if token == "--print_config" or token.startswith("--print_config="):
                    self._print_config = token.partition("=")[2]
                else:
                    kept.append(token)
            tokens = kept
        self.config = parser.parse_args(tokens)

    # -- checkpoints ------------------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path``: the checkpoint's model and data settings become the defaults
        (they replace the recipe file's), and what the command line sets wins over them, except
        where it would change the trained architecture (an error). Replaces Lightning's own,
        which applies the checkpoint's hyperparameters over the command line (so ``--model.*``
        overrides were silently lost: Lightning issues #20801, #20310)."""
        from metarec.checkpoint import load_checkpoint

        self._ckpt: dict[str, Any] | None = None
        subcommand = self.config.get("subcommand")
        if not subcommand or subcommand not in RECIPE_COMMANDS:
            return
        path = self.config[subcommand].get("ckpt_path")
        if not path or str(path) in _SPECIAL_CKPT:
            return
        if not Path(path).is_file():
            self._exit(subcommand, f"--ckpt_path: checkpoint not found: {path}")
        ckpt = load_checkpoint(path)  # weights_only: a file carrying code is refused unread
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

    # -- the other commands on this parser --------------------------------------------------
    def _set_seed(self) -> None:
        if self.config.get("subcommand") in EXTRA_COMMANDS:
            return
        super()._set_seed()

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in EXTRA_COMMANDS:
            run_command(subcommand, self.config[subcommand])
        elif subcommand == "export-split":
            self._export_split()
        else:
            super()._run_subcommand(subcommand)

    def _export_split(self) -> None:
        from metarec.contract import write_split_file

        config = self.config["export-split"]
        path = write_split_file(config.out, self.datamodule.splits, self.datamodule.table)
        splits = self.datamodule.splits
        print(f"wrote {path}: {len(splits.train)} train, {len(splits.val)} val, "
              f"{len(splits.test)} test users")

    # -- instantiation ----------------------------------------------------------------------
    def instantiate_classes(self) -> None:
        if self.subcommand in EXTRA_COMMANDS:
            return
        super().instantiate_classes()
        # The resolved recipe travels in every checkpoint (MetaLearner.on_save_checkpoint).
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.model.metarec_recipe = resolved_recipe(self._parser(self.subcommand), config)
        if self.subcommand == "predict":
            from metarec.callbacks import PredictionWriter

            settings = config.get("predictions")
            settings = settings.as_dict() if hasattr(settings, "as_dict") else dict(settings or {})
            if not settings.get("path"):
                root = self.run_dir or Path(config.trainer.get("default_root_dir") or "runs")
                settings["path"] = str(root / "predictions.jsonl")
            self.trainer.callbacks.append(PredictionWriter(**settings))

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.schema", "model.schema", apply_on="instantiate")
        parser.set_defaults(PARSER_DEFAULTS)
        parser.add_class_arguments(BestCheckpoint, "checkpoint")
        parser.add_argument("--allow_train_users", type=bool, default=False,
                            help="validate/test/predict from a checkpoint: evaluate even when "
                                 "the evaluated users were meta-training users of the checkpoint")

    def before_instantiate_classes(self) -> None:
        """Check the recipe before anything is built (see :func:`validate_recipe`), fill in the
        plugins' defaults, print it for ``--print_config``, put the default loggers and
        checkpoints in one run folder, and make ``--trainer.enable_progress_bar false`` /
        ``--trainer.enable_checkpointing false`` also drop the default progress-bar /
        checkpoint callbacks (Lightning refuses them then)."""
        if self.subcommand in EXTRA_COMMANDS:
            return
        config = self.config[self.subcommand] if self.subcommand else self.config
        problems = validate_recipe(config, getattr(self, "_raw_strings", None))
        if problems:
            # Reported as jsonargparse reports a parse error: the message, exit status 2.
            self._parser(self.subcommand).error(
                "invalid recipe:\n  " + "\n  ".join(problems))
        fill_plugin_defaults(config)
        if getattr(self, "_print_config", None) is not None:
            skip_none = "skip_null" in self._print_config
            sys.stdout.write(self._parser(self.subcommand).dump(config, skip_none=skip_none))
            raise SystemExit(0)
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
        if self.subcommand in LIGHTNING_COMMANDS:
            self._run_folder(config)

    def _run_folder(self, config: Any) -> None:
        """One run, one folder: ``{trainer.default_root_dir}/{run}/`` holds the CSV log
        (``metrics.csv``, the adaptation curves and their PNG), ``config.yaml``, the W&B run
        (id ``{run}``: ``wandb/offline-run-*-{run}``) and ``checkpoints/`` (the interrupt
        checkpoint too). Applies to the default loggers and checkpoint callbacks, those whose
        folders a recipe leaves as they are; a recipe that sets its own keeps them.

        ``{run}`` is ``<date>-<time>-<recipe>-<4 hex>``; a fit resumed from a checkpoint of a
        run folder (``--ckpt_path RUN/checkpoints/x.ckpt``) continues that run: the same
        folder, CSV log (appended to) and W&B run id. DDP ranks started by Lightning share the
        name of rank 0 (``METAREC_RUN_NAME``)."""
        trainer = config.trainer
        loggers = trainer.get("logger")
        entries = loggers if isinstance(loggers, list) else [loggers] if loggers else []
        entries = [e for e in entries if hasattr(e, "class_path")]
        wandb = [e for e in entries if e.class_path == "metarec.loggers.WandbLogger"
                 and e.init_args.get("save_dir") == "runs" and not e.init_args.get("id")]
        csv_ = [e for e in entries if e.class_path in _CSV_LOGGERS
                and e.init_args.get("save_dir") == "runs" and e.init_args.get("name") == "csv"
                and e.init_args.get("version") is None]
        if not wandb and not csv_:
            return
        root = Path(trainer.get("default_root_dir") or "runs")
        name = self._resumed_run(config, root)
        if name is None:
            if os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get("METAREC_RUN_NAME"):
                name = os.environ["METAREC_RUN_NAME"]  # a DDP rank started by rank 0
            else:
                configs = [self._argv[i + 1] for i, t in enumerate(self._argv[:-1])
                           if t in ("-c", "--config")]
                stem = Path(configs[0]).stem if configs else "metarec"
                if self.subcommand != "fit":
                    stem += f"-{self.subcommand}"
                name = new_run_name(stem)
        os.environ["METAREC_RUN_NAME"] = name
        run_dir = root / name
        self.run_dir = run_dir
        for entry in wandb:
            entry.init_args["save_dir"] = str(run_dir)
            entry.init_args["id"] = name
            if not entry.init_args.get("name"):
                entry.init_args["name"] = name
        for entry in csv_:
            entry.init_args["save_dir"] = str(root)
            entry.init_args["name"] = name
            entry.init_args["version"] = ""
        for callback in trainer.get("callbacks") or []:
            path = str(getattr(callback, "class_path", ""))
            init = getattr(callback, "init_args", None)
            if init is None:
                continue
            if path.endswith("ModelCheckpoint") and init.get("dirpath") is None:
                init["dirpath"] = str(run_dir / "checkpoints")
            elif path == "metarec.callbacks.InterruptCheckpoint" and \
                    init.get("dirpath") in (None, "runs/interrupted"):
                init["dirpath"] = str(run_dir / "checkpoints")

    def _resumed_run(self, config: Any, root: Path) -> str | None:
        """The run folder name of a fit resumed from a checkpoint inside one, else None."""
        path = config.get("ckpt_path")
        if self.subcommand != "fit" or not path or str(path) in _SPECIAL_CKPT:
            return None
        folder = Path(path).resolve().parent.parent
        if Path(path).resolve().parent.name != "checkpoints" or \
                folder.parent != root.resolve() or \
                not any((folder / f).exists() for f in ("metrics.csv", "config.yaml", "wandb")):
            return None
        return folder.name
