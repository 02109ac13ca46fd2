"""The ``metarec`` command: one jsonargparse parser for every subcommand.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's (:class:`MetarecCLI`, in
:mod:`metarec.lightning_cli`); ``export-split`` takes a recipe like them; ``plugins``, ``adapt``
and ``simulate`` are registered on the same parser (as anomalib registers its extra
subcommands), each with typed arguments, ``--config`` files and ``--print_config``.

Nothing here imports torch or Lightning at module level: ``metarec --help``, ``metarec
plugins`` and the other commands that do not train answer without loading Lightning. For
those, :func:`main` builds the same top-level parser with the Lightning subcommands listed but
not expanded (their arguments are listed by ``metarec fit --help``, which builds the full one).

User errors (a bad recipe key or value, a data file, a plugin, a checkpoint) are one short
message on stderr and exit status 2; ``METAREC_TRACEBACK=1`` shows the traceback as well.
Warnings that say nothing to a metarec user are hidden; ``metarec --verbose ...`` (or
``METAREC_VERBOSE=1``) shows them.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import yaml

from metarec import registry

if TYPE_CHECKING:  # the Lightning classes live in metarec.lightning_cli (see __getattr__ below)
    from metarec.lightning_cli import MetarecCLI  # noqa: F401

TRAINER_DEFAULTS: dict[str, Any] = {
    # validate/test adapt with gradients: inference_mode would kill the inner loop.
    "inference_mode": False,
    "default_root_dir": "runs",
}
# Defaults given as configs (class_path/init_args), set on the parser so that they are
# instantiated like a recipe's own and a recipe's trainer.logger / trainer.callbacks replace them.
# A fit puts the default loggers and checkpoints in one run folder, {default_root_dir}/{run}/
# (see metarec.lightning_cli.MetarecCLI.run_folder).
PARSER_DEFAULTS: dict[str, Any] = {
    "trainer.logger": [
        {"class_path": "metarec.loggers.WandbLogger", "init_args": {"save_dir": "runs"}},
        {"class_path": "metarec.loggers.CSVLogger",
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

# The subcommands, in the order --help lists them. The first five take a recipe (the Lightning
# arguments: trainer, model, data); the others have their own arguments.
LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "Meta-train a model on a recipe (validates on new users every epoch).",
    "validate": "Evaluate a model (or a checkpoint) on the validation users.",
    "test": "Evaluate a model (or a checkpoint) on the test users, before and after adaptation.",
    "predict": "Write each test user's adapted top-k (JSON Lines) from a checkpoint.",
}
RECIPE_COMMANDS: dict[str, str] = {
    **LIGHTNING_COMMANDS,
    "export-split": "Write a recipe's or a checkpoint's user split (users, queries, raw ids).",
}
EXTRA_COMMANDS: dict[str, str] = {
    "plugins": "List the registered plugins, or describe one: metarec plugins maml.",
    "adapt": "Adapt users (or a task_by: item checkpoint's items) of an interactions file with "
             "a checkpoint; top-k as JSON Lines.",
    "simulate": "Replay held-out users' feedback through adaptation policies (curves.csv/png).",
}
COMMANDS: dict[str, str] = {**RECIPE_COMMANDS, **EXTRA_COMMANDS}
DESCRIPTION = ("metarec: meta-learning and fast adaptation for recommender systems. "
               "`metarec COMMAND --help` lists a command's options.")
# Old spellings, still accepted (with a note on stderr).
DEPRECATED_FLAGS: dict[str, dict[str, str]] = {
    "adapt": {"--ckpt": "--ckpt_path", "--policy-args": "--policy_args",
              "--include-seen": "--include_seen", "--batch-users": "--batch_users"},
}


# -- parsing ------------------------------------------------------------------------------

def short_message(message: str) -> str:
    """jsonargparse's error, without the union/subtype detail: at most a few lines."""
    lines = [line.rstrip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return str(message)
    if any("Does not validate against any of the Union subtypes" in line for line in lines):
        given = next((line.strip() for line in lines if line.strip().startswith("Given value:")),
                     "")
        expected = [m.group(1) for line in lines
                    for m in [re.search(r"Expected an? (.+?)\.?$", line.strip())] if m]
        head = lines[0].rstrip(":")
        nested = [i for i, line in enumerate(lines) if i > 0 and "Parser key" in line]
        if nested:  # the member that matched the shape: its own error
            i = nested[0]
            key = re.search(r'Parser key "([^"]+)"', lines[i])
            outer = re.search(r'Parser key "([^"]+)"', head)
            reason = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if key and outer:
                return f'Parser key "{outer.group(1)}.{key.group(1)}": {reason}'
        names = ", ".join(dict.fromkeys(re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", e)
                                        for e in expected))
        return f"{head}: expected {names or 'another type'}" + (f" ({given})" if given else "")
    if len(lines) == 2 and lines[0].startswith("Parser key") and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1].strip()}"
    return "\n".join(lines)


def _known_options(parser: Any) -> list[str]:
    options: list[str] = []
    for action in getattr(parser, "_actions", []):
        options.extend(s for s in action.option_strings if s.startswith("--"))
    return options


def did_you_mean(message: str, parser: Any) -> str:
    """`` (did you mean --trainer.max_epochs?)`` for an unknown option or key in ``message``."""
    found = re.search(r"unrecognized arguments: (--[\w.\-]+)", message, re.I) or \
        re.search(r"does not accept (?:option|key)s? '([\w.\-]+)'", message) or \
        re.search(r"Key '([\w.\-]+)' is not expected", message) or \
        re.search(r"No action for key \"?'?([\w.\-]+)", message)
    if not found:
        return ""
    wrong = found.group(1).lstrip("-")
    options = [o[2:] for o in _known_options(parser)]
    guess = difflib.get_close_matches(wrong, options, n=1, cutoff=0.75)
    return f" (did you mean --{guess[0]}?)" if guess else ""


class ShortErrors:
    """An argument parser whose errors are one short message and exit status 2: no usage dump,
    a "did you mean" for a mistyped option, the traceback with ``METAREC_TRACEBACK=1``."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not getattr(self, "exit_on_error", True) or os.environ.get("METAREC_TRACEBACK") \
                or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)  # type: ignore[misc]
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = str(getattr(parser, "prog", "metarec")).replace(" [options]", "")
        text = short_message(message) + did_you_mean(message, parser)
        sys.stderr.write(f"{prog}: error: {text}\n"
                         f"(`{prog} --help` lists the accepted options)\n")
        raise SystemExit(2)


def _parser_class() -> type:
    from jsonargparse import ArgumentParser

    return type("MetarecParser", (ShortErrors, ArgumentParser), {})


def new_parser(**kwargs: Any) -> Any:
    """A jsonargparse parser with metarec's settings: no abbreviated options, short errors, a
    ``-c/--config`` file option (and so ``--print_config``)."""
    from jsonargparse import ActionConfigFile

    kwargs.setdefault("allow_abbrev", False)
    kwargs.setdefault("parser_mode", "omegaconf")
    parser = _parser_class()(**kwargs)
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="Path to a configuration file in json or yaml format.")
    return parser


def add_plugins_arguments(parser: Any) -> None:
    parser.add_argument("name", nargs="?", type=str | None, default=None,
                        help="a plugin alias (maml, finetune, ...), or a kind (algorithms, "
                             "backbones, policies, datasets): describe it; none: list all")


def add_adapt_arguments(parser: Any) -> None:
    from metarec.ranges import PositiveInt

    parser.add_argument("--ckpt_path", type=str, required=True,
                        help="checkpoint made by metarec fit")
    parser.add_argument("--interactions", type=str, required=True,
                        help="CSV/Parquet file with columns user,item,label[,timestamp] (grouped by "
                             "user, or by item for a checkpoint of tasks per item)")
    parser.add_argument("--k", type=PositiveInt, default=10, help="recommendations per user (users per item with tasks per item)")
    parser.add_argument("--policy", type=str | None, default=None,
                        help="adaptation policy (default: the checkpoint's)")
    parser.add_argument("--policy_args", type=dict | None, default=None,
                        help="policy arguments, e.g. '{steps: 5}'")
    parser.add_argument("--include_seen", type=bool, default=False,
                        help="also recommend items the user has interacted with (users in the item's "
                             "rows, with tasks per item)")
    parser.add_argument("--batch_users", type=PositiveInt, default=1024,
                        help="users (items, with tasks per item) adapted per call")
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--seed", type=int | None, default=None)


def add_command_parsers(subcommands: Any, stub: bool = False) -> dict[str, Any]:
    """Register ``plugins``, ``adapt`` and ``simulate`` on ``subcommands`` (a jsonargparse
    subcommands action); with ``stub``, the recipe commands too, without their arguments (what
    ``metarec --help`` needs). Returns the parsers by name."""
    from metarec.simulate import add_simulate_arguments

    parsers = {}
    if stub:
        for name, text in RECIPE_COMMANDS.items():
            parsers[name] = new_parser(prog=f"metarec {name}", description=text)
            subcommands.add_subcommand(name, parsers[name], help=text)
    adders = {"plugins": add_plugins_arguments, "adapt": add_adapt_arguments,
              "simulate": add_simulate_arguments}
    for name, add in adders.items():
        parsers[name] = new_parser(prog=f"metarec {name}", description=EXTRA_COMMANDS[name])
        add(parsers[name])
        subcommands.add_subcommand(name, parsers[name], help=EXTRA_COMMANDS[name])
    return parsers


def top_parser() -> Any:
    """The ``metarec`` parser without Lightning: every subcommand listed, the extra ones with
    their arguments (see the module doc)."""
    parser = new_parser(prog="metarec", description=DESCRIPTION)
    add_verbose_argument(parser)
    subcommands = parser.add_subcommands(required=True, dest="subcommand")
    add_command_parsers(subcommands, stub=True)
    return parser


def add_verbose_argument(parser: Any) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every warning (also METAREC_VERBOSE=1) and tracebacks of "
                             "errors (also METAREC_TRACEBACK=1)")


def run_command(name: str, config: Any) -> None:
    """Run ``plugins``, ``adapt`` or ``simulate`` with its parsed arguments."""
    if name == "plugins":
        name_arg = config.get("name")
        if name_arg:
            print(describe_plugins(name_arg))
        else:
            print_plugins()
    elif name == "adapt":
        from metarec.adapter import adapt_command

        adapt_command(config)
    elif name == "simulate":
        from metarec.simulate import simulate_command

        simulate_command(config)
    else:  # pragma: no cover
        raise ValueError(f"not a metarec command: {name}")


# -- what the recipe commands share (used by metarec.lightning_cli) -----------------------

def resolved_recipe(parser: Any, config: Any) -> dict[str, Any]:
    """The recipe as resolved (config files, overrides and defaults), a plain dict without
    ``config`` and the subcommand's own arguments (``ckpt_path``, ``weights_only``, ...): what
    ``metarec fit --config`` (or any other subcommand) would rerun."""
    recipe = yaml.safe_load(parser.dump(config, skip_none=False))
    for key in ("config", "ckpt_path", "weights_only", "allow_train_users", "verbose",
                "return_predictions", "predictions", "out"):
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
    from metarec import contract

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
            plugin = dotted.removesuffix("_args")
            if dotted.endswith("_args") and plugin in given and dotted not in given and not inner \
                    and contract.plain((current.get(section) or {}).get(key[:-5])) != \
                    contract.plain(saved.get(key[:-5])):
                continue  # another plugin on the command line: not the saved one's arguments
            if dotted in given:
                if dotted in ARCHITECTURE_KEYS and not _same_plugin_args(now, value):
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
            elif now is not None and now != value and not _filled_defaults_only(now, value):
                notices.append(f"{dotted} = {value!r} from the checkpoint (the recipe says "
                               f"{now!r}; pass --{dotted} to override)")
            values[section][key] = value
    return values, notices, problems


def _same_plugin_args(now: Any, saved: Any) -> bool:
    return now == saved or _filled_defaults_only(now, saved)


def _filled_defaults_only(now: Any, saved: Any) -> bool:
    """True when two plugin-argument dicts differ only by keys one of them leaves out (the
    plugin's defaults, which the CLI fills in since plugin defaults are resolved)."""
    if not isinstance(now, dict) or not isinstance(saved, dict):
        return False
    return all(now[k] == saved[k] for k in set(now) & set(saved))


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

# EpisodeDataModule arguments with a range (its signature types them as plain ints).
DATA_RANGES = (("batch_size", 1), ("eval_batch_size", 1), ("num_workers", 0))


YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def validate_recipe(config: Any, raw_strings: dict[str, str] | None = None) -> list[str]:
    """What is wrong with a parsed recipe (one line each, naming the key), before instantiation.

    jsonargparse has already checked what the signatures of MetaLearner, EpisodeDataModule and
    ``data.tasks`` (:class:`~metarec.data.tasks.TaskConfig`) type. This adds what it cannot see:
    the plugin argument dicts (``model.algorithm_args`` and the others, checked against the
    plugin's signature by :func:`metarec.registry.validate_args`), the rules that span several
    ``data.tasks`` fields, ``data.batch_size >= 1`` (and ``eval_batch_size``, ``num_workers >=
    0``), ``model.optimizer``'s ``lr > 0``, and an optimiser that accepts sparse gradients when
    the backbone produces them. Nothing is instantiated.

    ``raw_strings`` maps dotted plugin-argument keys to the strings a recipe file wrote (``"3"``
    quoted): the parser reads such a string as the number it spells, so they are checked as
    written (a quoted number for an ``int`` argument is an error).
    """
    from metarec.data.tasks import TaskConfig

    raw_strings = raw_strings or {}
    problems: list[str] = []
    for section, field, kind in PLUGIN_KEYS:
        part = config.get(section)
        name = part.get(field) if part is not None else None
        if name is None:
            continue
        key = f"{section}.{field}_args"
        # PyYAML (YAML 1.1) reads an unquoted exponent without a dot (`1e6`) as a string;
        # YAML 1.2 and every user read it as a number. Quoted strings come from raw_strings.
        args = {k: float(v) if isinstance(v, str) and YAML11_FLOAT.fullmatch(v) else v
                for k, v in dict(part.get(f"{field}_args") or {}).items()}
        args.update({k[len(key) + 1:]: v for k, v in raw_strings.items()
                     if k.startswith(key + ".") and k[len(key) + 1:] in args})
        try:
            registry.validate_args(kind, name, args, key=key)
        except registry.PluginArgumentError as err:
            problems.extend(str(err).splitlines())
        except registry.PluginError as err:
            problems.append(f"{section}.{field}: {err}")
    data = config.get("data")
    if data is not None:
        for key, low in DATA_RANGES:
            value = data.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value < low:
                problems.append(f"data.{key} = {value!r} is invalid: must be an int >= {low}")
    tasks = config.get("data.tasks") if data is not None else None
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


def fill_plugin_defaults(config: Any) -> None:
    """Put every plugin's defaults into its argument dict (``model.algorithm_args`` and the
    others), so that ``--print_config``, the saved config.yaml, the W&B config and the
    checkpoint's recipe all show the values the run uses. Call after :func:`validate_recipe`."""
    for section, field, kind in PLUGIN_KEYS:
        part = config.get(section)
        name = part.get(field) if part is not None else None
        if name is None:
            continue
        try:
            part[f"{field}_args"] = registry.resolved_args(kind, name, part.get(f"{field}_args"))
        except registry.PluginError:
            pass  # reported by validate_recipe


def raw_plugin_strings(args: Sequence[str]) -> dict[str, str]:
    """The plugin arguments (``model.algorithm_args.inner_steps``, ...) that the recipe files in
    ``args`` (``--config FILE``) or a dict-valued command-line argument write as strings."""
    from omegaconf import OmegaConf

    wanted = {f"{section}.{field}_args" for section, field, _ in PLUGIN_KEYS}
    found: dict[str, str] = {}

    def scan(tree: Any, prefix: str) -> None:
        if not isinstance(tree, dict):
            return
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            if dotted in wanted and isinstance(value, dict):
                for arg, v in value.items():
                    # `1e6` unquoted is a string to PyYAML (YAML 1.1): a number, not quoted.
                    if isinstance(v, str) and "${" not in v and not YAML11_FLOAT.fullmatch(v):
                        found[f"{dotted}.{arg}"] = v
                    else:
                        found.pop(f"{dotted}.{arg}", None)
            elif isinstance(value, dict):
                scan(value, dotted + ".")

    tokens = list(args)
    for i, token in enumerate(tokens):
        key, _, inline = token.partition("=")
        value = inline if inline else (tokens[i + 1] if i + 1 < len(tokens) else None)
        if value is None:
            continue
        if key in ("-c", "--config") and os.path.isfile(value):
            try:
                tree = OmegaConf.to_container(OmegaConf.load(value), resolve=False)
            except Exception:  # noqa: BLE001 - the parser reports unreadable files itself
                continue
            scan(tree, "")
        elif key.startswith("--") and key[2:] in wanted:
            try:
                scan({key[2:]: yaml.safe_load(value)}, "")
            except yaml.YAMLError:
                continue
        elif key.startswith("--") and key[2:].rsplit(".", 1)[0] in wanted:
            found.pop(key[2:], None)  # a command-line value: parsed as given
    return found


# -- metarec plugins ----------------------------------------------------------------------

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
    console.print("metarec plugins NAME: a plugin's arguments, defaults and rules")


def describe_plugins(name: str) -> str:
    """``metarec plugins NAME``: the plugin(s) of that alias (or class path) in any group, or
    every plugin of a group when ``name`` is one (``algorithms``)."""
    if name in registry.GROUPS:
        return "\n\n".join(registry.plugin_help(name, info.alias)
                           for info in registry.available(name))
    kinds = [k for k in registry.GROUPS if any(i.alias == name for i in registry.available(k))]
    if not kinds and ("." in name or ":" in name):
        kinds = [k for k in registry.GROUPS if _resolves(k, name)]
    if not kinds:
        every = sorted({i.alias for k in registry.GROUPS for i in registry.available(k)})
        guess = difflib.get_close_matches(name, every, n=3)
        raise registry.PluginError(
            f"no plugin named {name!r}" + (f" (did you mean {', '.join(guess)}?)" if guess
                                           else "") + "; `metarec plugins` lists them")
    return "\n\n".join(registry.plugin_help(k, name) for k in kinds)


def _resolves(kind: str, name: str) -> bool:
    try:
        registry.resolve(kind, name)
    except registry.PluginError:
        return False
    return True


# -- warnings and errors ------------------------------------------------------------------

#: Warnings hidden by default (regular expressions matched against the start of the message).
QUIET_WARNINGS = (
    # metarec's own range types are dumped as the number they hold: that is the intent.
    r"\s*Dump of a value that does not round-trip: a (PositiveInt|NonNegativeInt|"
    r"PositiveFloat|NonNegativeFloat|PositiveFloat_finite|NonNegativeFloat_finite|UnitFraction|"
    r"ClosedUnitInterval|OpenUnitInterval)\b",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    r".*The dirpath has changed from",
    # metrics are synced by torchmetrics (every rank's tasks counted once: tests/test_ddp.py)
    r".*It is recommended to use `self\.log\(.*sync_dist=True",
    r".*LightningCLI's args parameter is intended to run from within Python",
    r".*Checkpoint directory .* exists and is not empty",
    r"\s*Unable to serialize instance DataSchema",
    r".*DataSchema.*(serializ|not JSON)",
    r".*does not have many workers",
)
QUIET_LOG_LINES = ("💡 Tip:",)


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(p) for p in QUIET_LOG_LINES)


def verbose() -> bool:
    return os.environ.get("METAREC_VERBOSE", "") not in ("", "0", "false")


def quiet_warnings() -> None:
    """Hide the warnings that say nothing to a metarec user (see :data:`QUIET_WARNINGS`)."""
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines())


def user_error_types() -> tuple[type, ...]:
    """The errors a user can fix (input, settings, plugins, checkpoints): one line, exit 2."""
    from metarec.data.errors import ConfigError, DataError

    types: list[type] = [DataError, ConfigError, registry.PluginError]
    try:
        import pickle

        types.append(pickle.UnpicklingError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _subcommand(args: list[str]) -> str | None:
    """The subcommand of an argument list: the first token that is not an option (or the
    value of ``-c/--config``)."""
    skip = False
    for token in args:
        if skip:
            skip = False
            continue
        if token in ("-c", "--config"):
            skip = True
        elif not token.startswith("-"):
            return token
    return None


def _deprecated(command: str | None, args: list[str]) -> list[str]:
    renames = DEPRECATED_FLAGS.get(command or "", {})
    out = []
    for token in args:
        flag, eq, value = token.partition("=")
        if flag in renames:
            print(f"metarec {command}: note: {flag} is deprecated; use {renames[flag]}",
                  file=sys.stderr)
            token = renames[flag] + (eq + value if eq else "")
            if flag == "--include-seen" and not eq:
                out += [token, "true"]
                continue
        out.append(token)
    return out


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    command = _subcommand(args)
    head = args[:args.index(command)] if command in args else args
    if "-v" in head or "--verbose" in head:  # metarec --verbose COMMAND ...
        os.environ["METAREC_VERBOSE"] = "1"
        os.environ["METAREC_TRACEBACK"] = "1"
        args = [a for a in head if a not in ("-v", "--verbose")] + args[len(head):]
    if not verbose():
        quiet_warnings()
    args = _deprecated(command, args)
    try:
        if command in RECIPE_COMMANDS:
            from metarec.lightning_cli import MetarecCLI

            # None (the console script): LightningCLI reads sys.argv itself (DDP re-runs it)
            MetarecCLI(args=None if argv is None and args == sys.argv[1:] else args)
            return
        config = top_parser().parse_args(args)
        run_command(config.subcommand, config[config.subcommand])
    except BrokenPipeError:  # metarec plugins | head
        sys.stderr.close()
    except Exception as err:
        if os.environ.get("METAREC_TRACEBACK") or not isinstance(err, user_error_types()):
            raise
        where = command if command in COMMANDS else "fit"
        lines = str(err).strip().splitlines() or [type(err).__name__]
        print(f"metarec {where}: error: " + "\n  ".join(lines[:4]), file=sys.stderr)
        raise SystemExit(2) from None


def __getattr__(name: str) -> Any:
    # The Lightning parts, imported on first use: `from metarec.cli import MetarecCLI` works.
    if name in ("MetarecCLI", "RecipeToLoggers", "MetarecLightningParser"):
        from metarec import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module 'metarec.cli' has no attribute {name!r}")


if __name__ == "__main__":
    main()
