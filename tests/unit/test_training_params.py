"""The train flow's parameters and the PyTorchJob builder (pure: no services)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.errors import InvalidInput
from core.training import (
    PYTORCHJOB,
    NamespaceLimits,
    TrainingProgress,
    TrainParams,
    build_pytorchjob,
    build_trainjob,
    check_limits,
    checkpoint_location,
    cpu_millis,
    epoch_progress,
    job_duration_seconds,
    job_name,
    job_state,
    memory_bytes,
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


# --- Kubeflow Trainer v2 TrainJob (issue 23) ----------------------------------------------------


def test_trainjob_three_nodes_golden():
    params = TrainParams(
        experiment="resnet50-baseline",
        api="trainjob",
        workers=2,
        cpu="1",
        memory="512Mi",
        args=["--epochs", "3"],
        env={"WANDB_API_KEY": {"secret": "wandb", "key": "api-key"}, "WANDB_MODE": "offline"},
    )
    name = job_name(params.experiment, RUN_ID)
    job = build_trainjob(params, IMAGE, name, "training", flow_run_id=RUN_ID)
    check_golden("trainjob-basic.yaml", job)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["spec"]["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    assert job["spec"]["trainer"]["numNodes"] == 3
    env = {e["name"]: e for e in job["spec"]["trainer"]["env"]}
    assert env["WANDB_API_KEY"] == {
        "name": "WANDB_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}},
    }


def test_trainjob_gpus_volumes_resume_golden():
    params = TrainParams(
        experiment="vit-large",
        api="trainjob",
        runtime="torch-distributed-gpu",
        workers=3,
        gpus_per_node=8,
        nproc_per_node="8",
        cpu="32",
        memory="256Gi",
        volumes=[
            {"claim": "cpfs-datasets", "mount_path": "/data"},
            {"claim": "oss-checkpoints", "mount_path": "/checkpoints", "read_only": False},
        ],
        deadline="12h",
    )
    job = build_trainjob(
        params,
        IMAGE,
        "vit-large-0f1e2d3c",
        "training",
        flow_run_id=RUN_ID,
        resume_from="/checkpoints/vit-large/epoch-7.ckpt",
        runtime="torch-distributed-gpu",
    )
    check_golden("trainjob-gpu-volumes-resume.yaml", job)
    assert job["spec"]["trainer"]["numProcPerNode"] == 8
    assert job["spec"]["activeDeadlineSeconds"] == 12 * 3600
    env = {e["name"]: e.get("value") for e in job["spec"]["trainer"]["env"]}
    assert env["RESUME_FROM"] == "/checkpoints/vit-large/epoch-7.ckpt"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"workers": 2, "elastic_min": 1, "elastic_max": 4}, "elastic_min/elastic_max"),
        ({"nproc_per_node": "gpu", "gpus_per_node": 1}, "nproc_per_node"),
        ({"backoff_limit": 0}, "backoff_limit"),
        ({"restart_policy": "Never"}, "restart_policy"),
        ({"cleanup": "All"}, "cleanup"),
        ({"env": {"PET_NNODES": "4"}}, "PET_NNODES"),
        ({"env": {"RESUME_FROM": "/x"}}, "RESUME_FROM"),
    ],
)
def test_trainjob_refuses_what_it_cannot_express(overrides, field):
    with pytest.raises(InvalidInput) as raised:
        parse_train_params({"experiment": "x", "api": "trainjob", **overrides})
    assert field in str(raised.value)


def test_runtime_is_only_for_a_trainjob():
    with pytest.raises(InvalidInput, match="runtime"):
        parse_train_params({"experiment": "x", "api": "pytorchjob", "runtime": "torch-distributed"})


def test_trainjob_state_reads_trainer_v2_conditions():
    job: dict[str, Any] = {
        "kind": "TrainJob",
        "metadata": {"creationTimestamp": "2026-12-07T03:00:00Z"},
        "status": {"jobsStatus": [{"name": "node", "active": 1, "ready": 0, "succeeded": 0}]},
    }
    assert job_state(job).phase == "Running"
    job["status"]["conditions"] = [
        {
            "type": "Suspended",
            "status": "False",
            "reason": "Resumed",
            "message": "TrainJob is resumed",
        },
        {
            "type": "Failed",
            "status": "True",
            "reason": "FailedJobs",
            "message": "jobset failed due to one or more job failures",
            "lastTransitionTime": "2026-12-07T03:00:42Z",
        },
    ]
    state = job_state(job)
    assert (state.phase, state.reason, state.finished, state.succeeded) == (
        "Failed",
        "FailedJobs",
        True,
        False,
    )
    assert job_duration_seconds(state) == 42.0
    job["status"]["conditions"] = [
        {"type": "Complete", "status": "True", "reason": "AllJobsCompleted", "message": "ok"}
    ]
    assert job_state(job).succeeded


# --- progress: epoch, step, ETA ------------------------------------------------------------------


def test_progress_reads_epochs_and_steps_and_estimates_the_time_left():
    progress = TrainingProgress()
    assert not progress.feed("vision-train: rank=0 world_size=3", 0.0)
    assert progress.feed("epoch 1/4 step 1/2 rank=0", 10.0)
    assert progress.fraction == pytest.approx(1 / 8)
    assert progress.eta_seconds() is None  # one point gives no speed yet
    progress.feed("epoch 1/4 loss=0.5 rank=0", 20.0)
    assert progress.fraction == pytest.approx(1 / 4)
    # 1/8 of the work in 10 s: 3/4 left takes 60 s.
    assert progress.eta_seconds() == pytest.approx(60.0)
    assert progress.describe() == "epoch 1/4 done, ETA 1m00s"
    progress.feed("epoch 2/4 step 1/2 rank=0", 30.0)
    assert progress.describe().startswith("epoch 2/4, step 1/2, ETA ")


def test_progress_after_a_resume_measures_only_this_attempt():
    progress = TrainingProgress()
    progress.feed("resuming from checkpoint /checkpoints/x/epoch-2.ckpt (epoch 2)", 0.0)
    progress.feed("epoch 3/4 loss=0.25", 100.0)
    progress.feed("epoch 4/4 step 1/2", 110.0)
    assert progress.resumed_epoch == 2
    # From 3/4 to 7/8 in 10 s: the last 1/8 takes 10 s more (not 110 s).
    assert progress.eta_seconds() == pytest.approx(10.0)
    assert "resumed after epoch 2" in progress.describe()
    assert progress_percent(job_state({"status": {}}), progress) == round(10 + 85 * 7 / 8, 1)


# --- secrets in env (issue 24 item 6) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("WANDB_API_KEY", "0123456789abcdef", "name contains API_KEY"),
        ("HF_TOKEN", "whatever", "name contains TOKEN"),
        ("DB_PASSWORD", "hunter2", "name contains PASSWORD"),
        ("S3_KEY_ID", "AKIAIOSFODNN7EXAMPLE", "an AWS access key"),
        ("OSS_ID", "LTAI5tQ8pXo3mZz9aBcDeFgH", "an Alibaba Cloud AccessKey"),
        ("REPO", "ghp_0123456789abcdefghijABCDEFGHIJ012345", "a GitHub token"),
        ("DATA_URL", "https://ml:s3cr3t@data.example.com/imagenet", "a URL with a password"),
        ("KEY", "-----BEGIN OPENSSH PRIVATE KEY-----\nabc", "a private key"),
    ],
)
def test_plain_values_that_look_like_credentials_are_refused(name, value, why):
    with pytest.raises(InvalidInput) as raised:
        parse_train_params({"experiment": "x", "env": {name: value}})
    text = str(raised.value)
    assert f"env.{name}" in text and why in text and "--env-secret" in text
    assert value not in text  # the refusal never repeats the credential


def test_a_secret_reference_or_an_explicit_allowance_is_accepted():
    params = parse_train_params(
        {
            "experiment": "x",
            "env": {
                "WANDB_API_KEY": {"secret": "wandb", "key": "api-key"},
                "TOKENIZER": "bpe-32k",
            },
            "allow_plain_env": ["TOKENIZER"],
        }
    )
    env = {
        e["name"]: e
        for e in build_pytorchjob(params, IMAGE, "x-1", "training")["spec"]["pytorchReplicaSpecs"][
            "Master"
        ]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["WANDB_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "wandb", "key": "api-key"}
    }
    assert "value" not in env["WANDB_API_KEY"]
    assert env["TOKENIZER"]["value"] == "bpe-32k"
    # Ordinary values pass without any allowance.
    parse_train_params({"experiment": "x", "env": {"WANDB_MODE": "offline", "LR": "0.1"}})


def test_a_secret_reference_needs_a_valid_secret_name():
    with pytest.raises(InvalidInput, match="Secret name"):
        parse_train_params({"experiment": "x", "env": {"K": {"secret": "Bad/Name", "key": "k"}}})


# --- per-namespace limits (issue 24 item 2) -------------------------------------------------------

LIMITS = NamespaceLimits(
    max_gpus_total=64, max_cpu_per_replica="32", max_memory_per_replica="256Gi", max_replicas=16
)


def test_runs_at_the_limits_are_accepted():
    at_limit = TrainParams(experiment="x", workers=7, gpus_per_node=8, cpu="32", memory="256Gi")
    check_limits(at_limit, LIMITS, "training")  # 8 nodes x 8 GPUs = 64, 32 CPU, 256Gi
    check_limits(TrainParams(experiment="x", workers=15), LIMITS, "training")  # 16 replicas
    check_limits(TrainParams(experiment="x", workers=256, gpus_per_node=16), None, "training")


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        # The issue's example: 257 nodes x 16 GPUs = 4,112 GPUs.
        ({"workers": 256, "gpus_per_node": 16}, "limits.training.max_gpus_total = 64"),
        ({"workers": 256, "gpus_per_node": 16}, "limits.training.max_replicas = 16"),
        ({"workers": 7, "gpus_per_node": 8, "nproc_per_node": "8", "cpu": "4"}, None),
        ({"workers": 8, "gpus_per_node": 8}, "72 GPUs in total"),
        ({"workers": 16}, "17 nodes exceed limits.training.max_replicas = 16"),
        ({"cpu": "32001m"}, "limits.training.max_cpu_per_replica = 32"),
        ({"memory": "257Gi"}, "limits.training.max_memory_per_replica = 256Gi"),
        ({"memory": "300G"}, "max_memory_per_replica"),
        ({"workers": 10, "elastic_min": 8, "elastic_max": 20}, "21 nodes exceed"),
    ],
)
def test_runs_over_a_limit_are_refused_naming_it(overrides, named):
    params = TrainParams(experiment="x", **overrides)
    if named is None:
        check_limits(params, LIMITS, "training")
        return
    with pytest.raises(InvalidInput) as raised:
        check_limits(params, LIMITS, "training")
    assert named in str(raised.value)


def test_quantities():
    assert memory_bytes("256Gi") == 256 * 2**30 and memory_bytes("300G") == 300 * 10**9
    assert cpu_millis("500m") == 500 and cpu_millis("2.5") == 2500
