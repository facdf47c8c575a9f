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
        # Issue 24: the catalog's limits for the training namespace, and plain credentials.
        (["--workers", "256", "--gpus", "16"], "limits.training.max_gpus_total = 64"),
        (["--workers", "16"], "limits.training.max_replicas = 16"),
        (["--cpu", "33"], "limits.training.max_cpu_per_replica = 32"),
        (["--memory", "300Gi"], "limits.training.max_memory_per_replica = 256Gi"),
        (["--env", "HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz0123456789"], "env.HF_TOKEN"),
        (["--env-secret", "WANDB_API_KEY=wandb"], "NAME=SECRET:KEY"),
        # Issue 23: what a Trainer v2.3 TrainJob cannot express.
        (["--api", "trainjob", "--workers", "2", "--elastic-max", "4"], "elastic_min"),
        (["--api", "trainjob", "--backoff-limit", "0"], "backoff_limit"),
        (["--api", "volcano"], "api"),
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


def test_env_secret_and_allowance_reach_the_run(monkeypatch):
    started = []

    async def start(params):
        started.append(params)
        return "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"

    monkeypatch.setattr(cli_train, "start_train_run", start)
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--experiment",
            "exp",
            "--api",
            "trainjob",
            "--env-secret",
            "WANDB_API_KEY=wandb:api-key",
            "--env",
            "TOKENIZER=bpe",
            "--allow-plain-env",
            "TOKENIZER",
            "--detach",
        ],
    )
    assert result.exit_code == 0, result.output
    (params,) = started
    assert params.api == "trainjob"
    assert params.env["WANDB_API_KEY"].secret == "wandb"
    assert params.env["WANDB_API_KEY"].key == "api-key"
    assert params.env["TOKENIZER"] == "bpe"
