"""User errors are short: the message (and a "did you mean"), exit status 2, no usage dump, no
traceback. Nothing is built before a recipe error is reported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from metarec.cli import main

QUICK = str(REPO / "recipes" / "quickstart.yaml")


def _error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    # (pytest's capture can leave Lightning's log handler on a closed stream: its complaint,
    # "--- Logging error ---" and a traceback of the logging module, is not ours)
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("metarec "))
    err = "\n".join(lines[start:]) + "\n"
    assert "usage:" not in err and "Traceback" not in err, err
    return err


def test_a_mistyped_option_is_one_line_with_a_suggestion(in_tmp, capsys):
    err = _error(["fit", "--config", QUICK, "--model.algoritm", "maml"], capsys)
    assert "unrecognized arguments: --model.algoritm" in err
    assert "did you mean --model.algorithm?" in err
    assert len(err.strip().splitlines()) <= 2
    assert list(in_tmp.iterdir()) == []


def test_a_mistyped_key_in_a_recipe_file(in_tmp, capsys):
    (in_tmp / "typo.yaml").write_text("model:\n  algoritm: maml\n")
    err = _error(["fit", "--config", QUICK, "--config", "typo.yaml"], capsys)
    assert "model.algoritm" in err and "did you mean --model.algorithm?" in err
    assert len(err.strip().splitlines()) <= 2


def test_options_are_never_abbreviated(in_tmp, capsys):
    err = _error(["fit", "--config", QUICK, "--trainer.max_epoch", "2"], capsys)
    assert "--trainer.max_epoch" in err and "did you mean --trainer.max_epochs?" in err


def test_batch_size_must_be_positive(in_tmp, capsys):
    err = _error(["fit", "--config", QUICK, "--data.batch_size", "-4"], capsys)
    assert "data.batch_size = -4 is invalid: must be an int >= 1" in err
    assert list(in_tmp.iterdir()) == []


def test_a_quoted_number_in_a_recipe_is_a_string(in_tmp, capsys):
    """docs/recipes.md: `inner_steps: "3"` is an error (the parser alone reads it as 3)."""
    (in_tmp / "quoted.yaml").write_text('model:\n  algorithm_args: {inner_steps: "3"}\n')
    err = _error(["fit", "--config", QUICK, "--config", "quoted.yaml"], capsys)
    assert "model.algorithm_args.inner_steps = '3' is invalid for algorithm 'maml'" in err
    assert "expected int, got a string" in err
    # given on the command line, 3 is the number
    from metarec.cli import raw_plugin_strings

    assert raw_plugin_strings(["--config", "quoted.yaml",
                               "--model.algorithm_args.inner_steps", "3"]) == {}
    (in_tmp / "interpolated.yaml").write_text(
        "model:\n  algorithm_args: {inner_steps: '${data.seed}'}\n")
    assert raw_plugin_strings(["--config", "interpolated.yaml"]) == {}


def test_a_file_that_is_not_a_checkpoint(in_tmp, capsys, tmp_path):
    fake = tmp_path / "model.ckpt"
    fake.write_text("user,item,label\n1,2,3\n")
    csv = tmp_path / "events.csv"
    csv.write_text("user,item,label\n1,2,3\n")
    err = _error(["adapt", "--ckpt_path", str(fake), "--interactions", str(csv)], capsys)
    assert f"{fake} is not a metarec checkpoint" in err
    assert len(err.strip().splitlines()) == 1
    err = _error(["test", "--ckpt_path", str(fake)], capsys)
    assert f"{fake} is not a metarec checkpoint" in err
    err = _error(["test", "--ckpt_path", str(tmp_path / "missing.ckpt")], capsys)
    assert "checkpoint not found" in err


def test_a_bad_rating_in_a_csv_exits_2_with_file_line_and_field(tmp_path):
    rows = ["user,item,rating"] + [f"{u},{i},{1 + (u + i) % 5}" for u in range(20)
                                   for i in range(16)]
    rows[37] = "2,4,abc"  # line 38 of the file
    (tmp_path / "ratings.csv").write_text("\n".join(rows) + "\n")
    command = Path(sys.executable).parent / "metarec"
    done = subprocess.run(
        [str(command), "fit", "--config", QUICK, "--data.dataset", "interactions",
         "--data.dataset_args", "{path: ratings.csv, user_col: user, item_col: item, "
                                "label_col: rating, timestamp_col: null}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) <= 5, done.stderr
    assert "Traceback" not in done.stderr
    error = next(line for line in lines if "error" in line)
    assert "ratings.csv:38" in error and "'rating'" in error, error
