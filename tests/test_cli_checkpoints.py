"""A checkpoint is read with ``torch.load(weights_only=True)``: a file carrying a pickle payload
never runs it, through any entry point, and each says clearly what is wrong."""

from __future__ import annotations

import builtins

import pytest
import torch

from metarec.checkpoint import CheckpointError
from metarec.cli import main


class _Payload:
    """Unpickling this runs code: it writes the file ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {"backbone": "melu", "schema": None},
                "state_dict": {}, "payload": _Payload(str(marker))}, path)
    return path, marker


def test_the_payload_is_real(evil):
    path, marker = evil
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.is_file()


@pytest.mark.parametrize("command", ["adapt", "test", "validate", "predict", "simulate",
                                     "export-split"])
def test_no_command_runs_the_payload(command, evil, in_tmp, capsys):
    path, marker = evil
    events = in_tmp / "events.csv"
    events.write_text("user,item,label\n1,2,3\n")
    args = {"adapt": ["adapt", "--ckpt_path", str(path), "--interactions", str(events)],
            "simulate": ["simulate", "--checkpoint", str(path), "--policies", "[frozen]",
                         "--progress", "false"],
            "export-split": ["export-split", "--out", "split.json", "--ckpt_path", str(path)]
            }.get(command, [command, "--ckpt_path", str(path)])
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{path} is not a metarec checkpoint" in err, err
    assert "Traceback" not in err
    assert not marker.exists()


def test_the_python_api_refuses_it_too(evil):
    from metarec import Adapter, load_backbone

    path, marker = evil
    for load in (Adapter.from_checkpoint, load_backbone):
        with pytest.raises(CheckpointError, match="is not a metarec checkpoint"):
            load(path)
    assert not marker.exists()
