"""``robotics-cd train`` refuses bad parameters before starting anything."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli import train as cli_train
from cli.app import app


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--workers", "0", "--elastic-min", "2"], "workers"),
        (["--gpus", "-1"], "gpus_per_node"),
        (["--volume", "datasets/imagenet"], "claim"),
        (["--env", "NOEQUALS"], "env"),
        (["--env", "RANK=3"], "env"),
        (["--deadline", "soon"], "deadline"),
    ],
)
def test_invalid_parameters_exit_2_naming_the_field(monkeypatch, args, field):
    started = []
    monkeypatch.setattr(cli_train, "start_train_run", lambda params: started.append(params))
    result = CliRunner().invoke(app, ["train", "--experiment", "exp", *args])
    assert result.exit_code == 2, result.output
    assert field in result.output
    assert not started


def test_volume_syntax():
    assert cli_train._split_volume("cpfs-data") == {"claim": "cpfs-data"}
    assert cli_train._split_volume("ckpt:/checkpoints:rw") == {
        "claim": "ckpt",
        "mount_path": "/checkpoints",
        "read_only": False,
    }
