"""One parser for every command: ``metarec --help`` lists them all, and the commands that do not
train answer without importing torch or Lightning."""

from __future__ import annotations

import subprocess
import sys

import pytest

from metarec.cli import main

COMMANDS = ("fit", "validate", "test", "predict", "export-split", "plugins", "adapt", "simulate")


def _run(*args: str, probe: bool = False) -> subprocess.CompletedProcess:
    """``metarec ARGS`` in a fresh interpreter; with ``probe``, also print which heavy modules
    the command imported."""
    code = ("import sys\nfrom metarec.cli import main\nsys.argv = ['metarec', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n")
    if probe:
        code += ("print('IMPORTED', *[m for m in ('torch', 'lightning', 'wandb')"
                 " if m in sys.modules])\n")
    code += "sys.exit(code)\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_command_without_loading_lightning():
    done = _run("--help", probe=True)
    assert done.returncode == 0, done.stderr
    for command in COMMANDS:
        assert f"    {command} " in done.stdout, command
    assert done.stdout.strip().splitlines()[-1] == "IMPORTED"  # neither torch nor Lightning


def test_plugins_lists_without_importing_any_plugin():
    done = _run("plugins", probe=True)
    assert done.returncode == 0, done.stderr
    assert "maml" in done.stdout and "finetune" in done.stdout and "synthetic" in done.stdout
    # Issue 13: the item cold-start models and the standard cold-start data sets.
    for name in ("metaemb", "mwuf", "cvar", "lwa", "nlba", "dropoutnet", "movielens-1m",
                 "book-crossing"):
        assert f" {name} " in done.stdout, name
    assert done.stdout.strip().splitlines()[-1] == "IMPORTED"


def test_the_extra_commands_have_their_own_help():
    for command in ("adapt", "simulate", "plugins"):
        done = _run(command, "--help", probe=True)
        assert done.returncode == 0, done.stderr
        assert "--print_config" in done.stdout
        assert "lightning" not in done.stdout.splitlines()[-1]
    assert "--ckpt_path" in _run("adapt", "--help").stdout
    assert "--fit_overrides" in _run("simulate", "--help").stdout


def test_plugins_name_shows_signature_defaults_rules_and_doc(capsys):
    main(["plugins", "maml"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("inner_lr"))
    assert "0.01" in line and "float > 0" in line
    assert "inner_steps" in out and "int >= 0" in out
    assert "Model-Agnostic Meta-Learning" in out  # the docstring
    main(["plugins", "finetune"])
    out = capsys.readouterr().out
    assert "policy finetune" in out and "model.policy_args" in out
    main(["plugins", "melu"])
    assert "given by metarec itself: schema" in capsys.readouterr().out
    main(["plugins", "policies"])  # a whole group
    out = capsys.readouterr().out
    assert "policy online" in out and "policy frozen" in out


def test_plugins_unknown_name_is_a_short_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plugins", "mamll"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "no plugin named 'mamll'" in err and "did you mean maml" in err
    assert len(err.strip().splitlines()) == 1


def test_the_lightning_commands_are_on_the_same_parser(in_tmp, capsys):
    """LightningCLI's parser carries the extra commands too (anomalib's pattern)."""
    from metarec.cli import MetarecCLI

    MetarecCLI(args=["plugins", "maml"])
    assert "inner_lr" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        MetarecCLI(args=["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"    {command} " in out, command
