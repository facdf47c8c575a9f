"""The train flow's parameters and the PyTorchJob builder (pure: no services)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from core.errors import InvalidInput
from core.training import (
    PYTORCHJOB,
    TrainParams,
    build_pytorchjob,
    checkpoint_location,
    epoch_progress,
    job_name,
    job_state,
    parse_train_params,
    progress_percent,
    summary_markdown,
)

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("ROBOTICS_CD_REGEN_GOLDEN") == "1"
IMAGE = "127.0.0.1:5000/robotics-training/vision-train:20261127-1a2b3c4"
RUN_ID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def check_golden(name: str, rendered: dict) -> None:
    """Compare with tests/unit/golden/<name>; ROBOTICS_CD_REGEN_GOLDEN=1 rewrites it."""
    path = GOLDEN / name
    text = yaml.safe_dump(rendered, sort_keys=False, allow_unicode=True)
    if REGEN or not path.exists():
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; rerun with ROBOTICS_CD_REGEN_GOLDEN=1"


def test_one_master_two_workers_golden():
    params = TrainParams(experiment="resnet50-baseline", workers=2, cpu="1", memory="512Mi")
    name = job_name(params.experiment, RUN_ID)
    job = build_pytorchjob(params, IMAGE, name, "training", flow_run_id=RUN_ID)
    check_golden("pytorchjob-basic.yaml", job)
    assert name == "resnet50-baseline-0f1e2d3c"
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}


def test_gpu_volumes_elastic_golden():
    params = TrainParams(
        experiment="vit-large",
        image_tag="20261127-1a2b3c4",
        config="configs/vit-large.yaml",
        workers=3,
        gpus_per_node=8,
        nproc_per_node="8",
        cpu="32",
        memory="256Gi",
        volumes=[
            {"claim": "cpfs-datasets", "mount_path": "/data"},
            {"claim": "oss-checkpoints", "mount_path": "/checkpoints", "read_only": False},
        ],
        env={"NCCL_DEBUG": "INFO"},
        command=["torchrun"],
        args=["src/train.py", "--epochs", "90"],
        deadline="12h",
        backoff_limit=5,
        restart_policy="ExitCode",
        cleanup="All",
        elastic_min=2,
        elastic_max=4,
    )
    job = build_pytorchjob(params, IMAGE, job_name("vit-large", RUN_ID), "training", RUN_ID)
    check_golden("pytorchjob-gpu-elastic.yaml", job)
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert master["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert job["spec"]["runPolicy"] == {
        "cleanPodPolicy": "All",
        "backoffLimit": 5,
        "activeDeadlineSeconds": 43200,
    }


def test_zero_workers_renders_master_only():
    params = TrainParams(experiment="smoke", workers=0)
    job = build_pytorchjob(params, IMAGE, "smoke-0f1e2d3c", "training")
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    assert job["apiVersion"] == PYTORCHJOB.api_version


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"workers": 0, "elastic_min": 2}, "workers"),
        ({"gpus_per_node": -1}, "gpus_per_node"),
        ({"volumes": [{"claim": "datasets/imagenet"}]}, "volumes.0.claim"),
        ({"workers": -2}, "workers"),
        ({"experiment": "Bad_Name"}, "experiment"),
        ({"image_tag": "bad tag!"}, "image_tag"),
        ({"config": "/etc/passwd"}, "config"),
        ({"cpu": "lots"}, "cpu"),
        ({"memory": "16 GB"}, "memory"),
        ({"deadline": "soon"}, "deadline"),
        ({"nproc_per_node": "0"}, "nproc_per_node"),
        ({"gpus_per_node": 2, "nproc_per_node": "4"}, "nproc_per_node"),
        ({"env": {"RANK": "3"}}, "env"),
        ({"cleanup": "Sometimes"}, "cleanup"),
        ({"workers": 2, "elastic_min": 3, "elastic_max": 2}, "elastic_min"),
        ({"wrokers": 2}, "wrokers"),
    ],
)
def test_invalid_parameters_are_refused_naming_the_field(raw, field):
    with pytest.raises(InvalidInput) as info:
        parse_train_params({"experiment": "exp", **raw})
    assert field in str(info.value)


def test_defaults_are_a_valid_run():
    params = parse_train_params({"experiment": "exp"})
    assert params.nodes == 2
    assert params.deadline_seconds == 7200
    assert params.elastic is None


def test_job_name_is_derived_from_the_flow_run():
    assert job_name("exp", RUN_ID) == job_name("exp", RUN_ID)
    assert job_name("exp", RUN_ID) != job_name("exp", "1" + RUN_ID[1:])
    longest = job_name("a" * 40, RUN_ID)
    assert len(f"{longest}-worker-255") <= 63


def test_job_state_reads_conditions_like_the_operator_writes_them():
    job = {
        "status": {
            "conditions": [
                {"type": "Created", "status": "True", "reason": "PyTorchJobCreated"},
                {"type": "Running", "status": "False", "reason": "PyTorchJobRunning"},
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "PyTorchJobFailed",
                    "message": "PyTorchJob x has failed because it has reached the specified backoff limit",
                },
            ],
            "replicaStatuses": {"Master": {"failed": 1}},
            "startTime": "2026-11-27T12:00:00Z",
            "completionTime": "2026-11-27T12:01:30Z",
        }
    }
    state = job_state(job)
    assert state.finished and state.phase == "Failed"
    assert "backoff limit" in state.condition
    assert job_state({}).phase == "Pending"
    running = job_state(
        {
            "status": {
                "conditions": [
                    {"type": "Created", "status": "True"},
                    {"type": "Running", "status": "True"},
                ]
            }
        }
    )
    assert running.phase == "Running" and not running.finished


def test_log_lines_give_epochs_and_checkpoint():
    assert epoch_progress("epoch 3/10 loss=0.41") == (3, 10)
    assert epoch_progress("Epoch 2 of 5: loss 1.2") == (2, 5)
    assert epoch_progress("loss=0.3") is None
    assert checkpoint_location("checkpoint saved to /checkpoints/exp/model.pt") == (
        "/checkpoints/exp/model.pt"
    )
    assert (
        checkpoint_location("wrote checkpoint: oss://bucket/exp/ep5.pt.")
        == "oss://bucket/exp/ep5.pt"
    )
    state = job_state({"status": {"conditions": [{"type": "Running", "status": "True"}]}})
    assert progress_percent(state, (5, 10)) == 52.5


def test_summary_names_duration_replicas_condition_digest_and_checkpoint():
    params = TrainParams(experiment="exp", workers=2)
    state = job_state(
        {
            "status": {
                "conditions": [
                    {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"}
                ],
                "startTime": "2026-11-27T12:00:00Z",
                "completionTime": "2026-11-27T12:00:42Z",
            }
        }
    )
    text = summary_markdown(
        name="exp-0f1e2d3c",
        namespace="training",
        params=params,
        image_ref=IMAGE,
        image_digest="sha256:" + "a" * 64,
        state=state,
        checkpoint="/checkpoints/exp/final.pt",
    )
    for expected in (
        "42s",
        "1 master + 2 worker(s)",
        "Succeeded (PyTorchJobSucceeded)",
        "sha256:aaa",
        "/checkpoints/exp/final.pt",
    ):
        assert expected in text
