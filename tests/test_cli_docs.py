"""The docs cannot drift from the CLI: every ``metarec`` command shown in README.md and
docs/getting-started.md runs (a cheap variant: ``--trainer.fast_dev_run 1``, a tiny
simulation; the DDP, 259M-parameter and pretrain-first commands are parsed and validated with
``--print_config``, their runs are tests/test_ddp.py, test_scale.py and test_init_from.py),
and docs/plugins.md names every built-in plugin."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO
from metarec import registry
from metarec.cli import main

DOCS = [REPO / "README.md", REPO / "docs" / "getting-started.md"]
# Commands whose full run is another test's: here they are parsed and validated only.
PARSE_ONLY = ("--trainer.devices 2", "transformer-large", "mf-pretrain-maml")


def doc_commands(path: Path) -> list[list[str]]:
    """The ``metarec ...`` command lines of a markdown file's bash blocks, as argument lists."""
    commands, block, pending = [], False, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        line = pending + line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        args = shlex.split(line, comments=True)
        if args[:1] == ["metarec"]:
            commands.append(args[1:])
    return commands


COMMANDS = [(path.name, args) for path in DOCS for args in doc_commands(path)]


def test_the_docs_show_commands():
    assert len([c for c in COMMANDS if c[0] == "README.md"]) >= 10
    assert len([c for c in COMMANDS if c[0] == "getting-started.md"]) >= 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    where = tmp_path_factory.mktemp("docs")
    cwd = os.getcwd()
    os.chdir(where)
    try:
        main(["fit", "--config", str(REPO / "recipes" / "quickstart.yaml"),
              "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    finally:
        os.chdir(cwd)
    return next(where.rglob("last.ckpt"))


def _cheap(args: list[str], ckpt: Path, where: Path) -> list[str]:
    out = []
    for token in args:
        if token.endswith(".ckpt") and ("..." in token or "<" in token) or token == "<ckpt>":
            token = str(ckpt)
        elif token == "new_users.csv":
            (where / token).write_text("user,item,label\n0,1,4\n0,2,5\n1,3,2\n")
        elif token.startswith("recipes/"):
            token = str(REPO / token)
        out.append(token)
    command = out[0]
    if any(p in " ".join(args) for p in PARSE_ONLY):
        return out + ["--print_config"]
    if command in ("fit", "validate", "test", "predict") and "--print_config" not in out:
        out += ["--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false"]
    if command == "simulate":  # the recipe's policies, from the fixture's checkpoint
        out += ["--fit_recipe", "null", "--checkpoint", str(ckpt), "--users", "2", "--turns",
                "2", "--negatives", "5", "--output", str(where / "sim"), "--progress", "false"]
    return out


@pytest.mark.parametrize("doc, args", COMMANDS,
                         ids=[f"{d}:{' '.join(a)[:60]}" for d, a in COMMANDS])
def test_every_documented_command_runs(doc, args, checkpoint, in_tmp, monkeypatch, capsys):
    if any("movielens-100k" in a for a in args):
        root = Path(os.environ.get("METAREC_DATA", ""))
        if not (root / "ml-100k" / "u.data").is_file() and not (root / "u.data").is_file():
            pytest.skip("MovieLens-100K files are not in $METAREC_DATA")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("METAREC_RECIPES", str(REPO / "recipes"))
    command = _cheap(args, checkpoint, in_tmp)
    try:
        main(command)
    except SystemExit as exit_:
        assert exit_.code in (0, None), capsys.readouterr().err[-2000:]


def test_plugins_md_names_every_built_in():
    text = (REPO / "docs" / "plugins.md").read_text()
    table = set(re.findall(r"^\| \w+ \| `([\w.-]+)` \| `metarec_plugins", text, re.M))
    built_in = {info.alias for kind in registry.GROUPS for info in registry.available(kind)
                if info.target.startswith("metarec_plugins")}
    assert built_in - table == set(), "add them to docs/plugins.md's table"
    assert table - built_in == set(), "docs/plugins.md lists plugins that are not registered"
