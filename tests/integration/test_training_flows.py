"""The training flows on real parts: the session Prefect server, dockerd, a registry with
htpasswd auth, Trivy, and a twin process (Kubernetes API, runtime running pods as
containers, the PyTorchJob controller, the chat sink) — against the seed training repo in a
local bare repo.

The ``train`` runs are started in-process (the fastest way to a flow run); cancellation is
shown on a served ``train`` deployment, where Prefect's runner cancels and runs the hook.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import git
import httpx
import pytest
import yaml
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterName,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import State
from prefect.client.schemas.sorting import ArtifactSort
from prefect.logging.handlers import APILogHandler
from prefect.states import Cancelling
from prefect.variables import Variable
from prefect_kubernetes.credentials import KubernetesClusterConfig, KubernetesCredentials

from core.training import Api, TrainParams, job_name
from flows.training import READY_TITLE, latest_variable, train, training_image
from sandbox.procs import free_port, stop_pid, wait_until
from sandbox.runtime import cleanup, state_label
from tests.conftest import SESSION_DIR
from tests.fixtures_kube import KubeTwin, start_kube_twin
from tests.matrix import full_matrix

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.asyncio(loop_scope="session"),
]

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "sandbox" / "seed" / "robotics-training"
COMMIT_DATE = "2026-11-21T09:00:00+00:00"
NAMESPACE = "training"
LABEL_JOB = "training.kubeflow.org/job-name"
LABEL_JOBSET = "jobset.sigs.k8s.io/jobset-name"


@dataclass
class TrainingPlatform:
    twin: KubeTwin
    github_url: str
    bare: Path
    work: Path
    image: str  # repository path, unique per module run
    env: dict[str, str]

    def kubectl_json(self, *args: str) -> dict[str, Any]:
        return dict(json.loads(self.twin.kubectl(*args, "-o", "json").stdout))

    def pods(self, job: str, label: str = LABEL_JOB) -> list[dict[str, Any]]:
        items = self.kubectl_json("get", "pods", "-n", NAMESPACE, "-l", f"{label}={job}")
        return list(items["items"])

    def jobs(self, plural: str = "pytorchjobs") -> list[str]:
        items = self.kubectl_json("get", plural, "-n", NAMESPACE)["items"]
        return [i["metadata"]["name"] for i in items]

    def chat(self, channel: str) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.github_url}/chat/{channel}", timeout=5).json())

    def commit(self, files: dict[str, str], message: str) -> str:
        """A new commit on main of the training repo, pushed to the bare repo."""
        repo = git.Repo(self.work)
        for name, text in files.items():
            (self.work / name).write_text(text)
        repo.git.add(A=True)
        env = {"GIT_AUTHOR_DATE": COMMIT_DATE, "GIT_COMMITTER_DATE": COMMIT_DATE}
        with repo.git.custom_environment(**env):
            repo.git.commit("-q", "-m", message)
        repo.git.push("-q", "origin", "main")
        return repo.head.commit.hexsha


def _seed_repo(root: Path) -> tuple[Path, Path]:
    work = root / "work"
    shutil.copytree(SEED, work)
    bare = root / "robotics-training.git"
    git.Repo.init(bare, bare=True, initial_branch="main")
    repo = git.Repo.init(work, initial_branch="main")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "ML Dev")
        cw.set_value("user", "email", "ml@robotics.example")
    repo.create_remote("origin", str(bare))
    return work, bare


def _first_commit(work: Path) -> None:
    repo = git.Repo(work)
    repo.git.add(A=True)
    env = {"GIT_AUTHOR_DATE": COMMIT_DATE, "GIT_COMMITTER_DATE": COMMIT_DATE}
    with repo.git.custom_environment(**env):
        repo.git.commit("-q", "-m", "robotics-training: seed")
    repo.git.push("-q", "origin", "main")


@pytest.fixture(scope="module")
async def platform(registry: Any, prefect_server: Any) -> Any:
    uid = uuid.uuid4().hex[:6]
    root = SESSION_DIR / f"training-{uid}"
    work, bare = _seed_repo(root)
    _first_commit(work)
    image = f"robotics-training/vision-train-{uid}"
    catalog = {
        "defaults": {
            "push_registry": registry.host,
            "pull_registry": registry.host,
            "manifests_repo": str(root / "manifests.git"),
            "scan": {"fail_on": ["CRITICAL", "HIGH"], "allow_missing_vuln_db": True},
        },
        "training": {
            "vision-train": {
                "repo": f"file://{bare}",
                "github": "robotics/robotics-training",
                "image": image,
                "namespace": NAMESPACE,
                "notify": ["feishu", "dingtalk"],
            }
        },
        "limits": {NAMESPACE: {"max_gpus_total": 64, "max_replicas": 16}},
    }
    (root / "services.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    github_port = free_port()
    config = {
        "registry": {
            "url": registry.url,
            "username": registry.username,
            "password": registry.password,
        },
        "restart_backoff": {"initial": 0.5, "max": 2},
        "resync_seconds": 1,
        "control_port": free_port(),
        "argocd_port": free_port(),
        "github_port": github_port,
        "git_base": str(root / "git"),
        "load": {"enabled": False},
    }
    env = {
        "ROBOTICS_CD_CATALOG": str(root / "services.yaml"),
        "ROBOTICS_CD_KUBERNETES_BLOCK": f"training-kube-{uid}",
        "ROBOTICS_CD_CHAT_WEBHOOKS_BLOCK": f"training-chat-{uid}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    state = root / "twin"
    try:
        with start_kube_twin(state, **config) as twin:
            manifest = root / "namespace.json"
            manifest.write_text(
                json.dumps(
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
                )
            )
            twin.kubectl("create", "-f", str(manifest))
            await KubernetesCredentials(
                cluster_config=KubernetesClusterConfig.from_file(twin.kubeconfig)
            ).asave(env["ROBOTICS_CD_KUBERNETES_BLOCK"], overwrite=True)
            hooks = {
                p: f"http://127.0.0.1:{github_port}/chat/{p}/hook" for p in ("feishu", "dingtalk")
            }
            await Secret(value=hooks).asave(env["ROBOTICS_CD_CHAT_WEBHOOKS_BLOCK"], overwrite=True)
            yield TrainingPlatform(twin, f"http://127.0.0.1:{github_port}", bare, work, image, env)
    finally:
        cleanup(state_label(state))
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
async def first_image(platform: TrainingPlatform) -> tuple[str, Any]:
    """The training repo's first commit, built and announced by the training-image flow."""
    # The change: run the trainer as non-root (the scan gate refuses root: DS-0002 HIGH),
    # with the default checkpoint directory writable by that user.
    dockerfile = (
        (platform.work / "Dockerfile")
        .read_text()
        .replace(
            "ENTRYPOINT",
            "RUN mkdir -p /checkpoints && chown 65534:65534 /checkpoints\nUSER 65534:65534\nENTRYPOINT",
        )
    )
    sha = platform.commit({"Dockerfile": dockerfile}, "vision-train: run as non-root")
    state = await training_image(sha=sha, ref="refs/heads/main", return_state=True)
    return sha, state


def run_id_of(state: State[Any]) -> UUID:
    """The flow run a flow call's ``return_state=True`` state belongs to: always set."""
    assert state.state_details.flow_run_id is not None, state
    return state.state_details.flow_run_id


async def logs_of(flow_run_id: UUID) -> str:
    await APILogHandler.aflush()
    lines: list[str] = []
    async with get_client() as client:
        while True:
            batch = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                offset=len(lines),
                limit=200,
            )
            lines += [entry.message for entry in batch]
            if len(batch) < 200:
                return "\n".join(lines)


async def artifacts_of(flow_run_id: UUID) -> dict[str, Any]:
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found if a.key}


# --- training-image ----------------------------------------------------------------------------


async def test_training_repo_change_pushes_image_and_notifies(
    platform: TrainingPlatform, first_image: tuple[str, Any]
):
    sha, state = first_image
    assert state.is_completed(), state.message
    record = await state.aresult()
    assert record.tag == f"20261121-{sha[:7]}"
    assert record.ref.startswith(
        f"{get_settings_registry(platform)}/{platform.image}:{record.tag}@sha256:"
    )
    stored = await Variable.aget(latest_variable("vision-train"))
    assert isinstance(stored, dict), stored
    assert stored["digest"] == record.digest and stored["notified"] is True

    for channel in ("feishu", "dingtalk"):
        posts = platform.chat(channel)
        assert len(posts) == 1, posts
        assert READY_TITLE in json.dumps(posts[0]["body"], ensure_ascii=False)
        assert record.tag in json.dumps(posts[0]["body"], ensure_ascii=False)

    # A rerun for the same commit builds, pushes and announces nothing again.
    again = await training_image(sha=sha, return_state=True)
    assert again.is_completed()
    assert (await again.aresult()).digest == record.digest
    assert len(platform.chat("feishu")) == 1
    logs = await logs_of(run_id_of(again))
    assert "already in the registry" in logs


def get_settings_registry(platform: TrainingPlatform) -> str:
    from core.catalog import load_catalog

    return load_catalog(platform.env["ROBOTICS_CD_CATALOG"]).defaults.push_registry


# --- train -------------------------------------------------------------------------------------


async def test_one_master_two_workers_succeed_with_epochs_and_summary(
    platform: TrainingPlatform, first_image: tuple[str, Any]
):
    params = TrainParams(experiment="resnet-ok", workers=2, cpu="100m", memory="64Mi")
    state = await train(params=params, return_state=True)
    run_id = run_id_of(state)
    logs = await logs_of(run_id)
    assert state.is_completed(), f"{state.message}\n{logs[-3000:]}"
    result = await state.aresult()
    assert result.phase == "Succeeded"
    assert result.checkpoint == "/checkpoints/resnet-ok/epoch-3.ckpt"
    for epoch in ("epoch 1/3", "epoch 2/3", "epoch 3/3"):
        assert epoch in logs
    artifacts = await artifacts_of(run_id)
    summary = artifacts["train-resnet-ok-summary"].data
    assert "Succeeded" in summary and "1 master + 2 worker(s)" in summary
    assert "sha256:" in summary and "epoch-3.ckpt" in summary
    assert artifacts["train-resnet-ok"].data == 100.0
    name = job_name("resnet-ok", str(run_id))
    assert result.job == f"{NAMESPACE}/{name}"
    # A rerun of the same flow run adopts its job instead of submitting another one.
    assert platform.jobs().count(name) == 1


async def test_trainer_exit_1_fails_the_run_with_the_job_reason(
    platform: TrainingPlatform, first_image: tuple[str, Any]
):
    params = TrainParams(
        experiment="resnet-nan",
        workers=0,
        config="configs/fail.yaml",
        backoff_limit=1,
        cleanup="All",
        cpu="100m",
        memory="64Mi",
    )
    state = await train(params=params, return_state=True)
    assert state.is_failed()
    message = state.message or ""
    with pytest.raises(Exception) as raised:
        await state.aresult()
    text = str(raised.value)
    assert type(raised.value).__name__ == "TrainingFailed", text
    assert "reached the specified backoff limit" in text
    assert "loss diverged" in text or "loss=nan" in text, text
    name = job_name("resnet-nan", str(run_id_of(state)))
    # cleanPodPolicy All: the pods are gone, the failed job stays for inspection.
    wait_until(lambda: not platform.pods(name), timeout=30, what="pods cleaned up")
    assert name in platform.jobs()
    assert "TrainingFailed" in message or "backoff" in message


async def test_deadline_fails_the_run_and_stops_the_pods(
    platform: TrainingPlatform, first_image: tuple[str, Any]
):
    params = TrainParams(
        experiment="resnet-slow",
        workers=0,
        args=["--epochs", "120"],
        deadline="4s",
        cleanup="Running",
        cpu="100m",
        memory="64Mi",
    )
    state = await train(params=params, return_state=True)
    assert state.is_failed()
    assert "active longer than specified deadline" in (state.message or ""), state.message
    name = job_name("resnet-slow", str(run_id_of(state)))
    wait_until(lambda: not platform.pods(name), timeout=30, what="running pods deleted")


# --- Kubeflow Trainer v2 TrainJob (issue 23) ----------------------------------------------------


async def test_trainjob_of_three_nodes_succeeds_with_torchrun_env_and_its_log_kept(
    platform: TrainingPlatform, first_image: tuple[str, Any]
):
    params = TrainParams(experiment="tj-ok", api="trainjob", workers=2, cpu="100m", memory="64Mi")
    state = await train(params=params, return_state=True)
    run_id = run_id_of(state)
    logs = await logs_of(run_id)
    assert state.is_completed(), f"{state.message}\n{logs[-3000:]}"
    result = await state.aresult()
    name = job_name("tj-ok", str(run_id))
    assert (result.kind, result.phase, result.job) == (
        "TrainJob",
        "Complete",
        f"{NAMESPACE}/{name}",
    )
    assert "AllJobsCompleted" in result.condition
    assert result.checkpoint == "/checkpoints/tj-ok/epoch-3.ckpt"
    # Three JobSet-named pods met at node 0 through torchrun's env.
    assert "rendezvous: " in logs and "(3/3)" in logs, logs[-3000:]
    pods = sorted(platform.pods(name, LABEL_JOBSET), key=lambda p: p["spec"]["hostname"])
    assert [p["spec"]["hostname"] for p in pods] == [f"{name}-node-0-{i}" for i in range(3)]
    for index, pod in enumerate(pods):
        assert pod["metadata"]["name"].startswith(f"{name}-node-0-{index}-")
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["PET_NNODES"]["value"] == "3"
        assert env["PET_MASTER_ADDR"]["value"] == f"{name}-node-0-0.{name}"
        assert env["PET_MASTER_PORT"]["value"] == "29500"
        assert "fieldRef" in env["PET_NODE_RANK"]["valueFrom"]
    # kubectl get trainjobs -A, answered by the twin with the CRD's columns.
    table = platform.twin.kubectl("get", "trainjobs", "-A").stdout
    assert "STATE" in table and name in table and "Complete" in table, table
    artifacts = await artifacts_of(run_id)
    assert artifacts["train-tj-ok"].data == 100.0
    assert "epoch 3/3 done" in (artifacts["train-tj-ok"].description or "")
    assert "3 node(s)" in artifacts["train-tj-ok-summary"].data
    # The node-0 log outlives the pods.
    platform.twin.kubectl("delete", "trainjob", name, "-n", NAMESPACE)
    wait_until(lambda: not platform.pods(name, LABEL_JOBSET), timeout=30, what="pods deleted")
    kept = (await artifacts_of(run_id))["train-tj-ok-log"].data
    assert "training finished: 3 epochs" in kept and "rank=0 world_size=3" in kept


async def test_failing_trainjob_fails_the_run_and_keeps_its_log(
    platform: TrainingPlatform, first_image: tuple[str, Any]
):
    params = TrainParams(
        experiment="tj-nan",
        api="trainjob",
        workers=0,
        config="configs/fail.yaml",
        cpu="100m",
        memory="64Mi",
    )
    state = await train(params=params, return_state=True)
    assert state.is_failed()
    run_id = run_id_of(state)
    with pytest.raises(Exception) as raised:
        await state.aresult()
    text = str(raised.value)
    assert type(raised.value).__name__ == "TrainingFailed", text
    assert "FailedJobs" in text and "loss=nan" in text, text
    assert "/checkpoints/tj-nan/epoch-1.ckpt is not on a writable volume" in text
    name = job_name("tj-nan", str(run_id))
    assert name in platform.jobs("trainjobs")
    platform.twin.kubectl("delete", "trainjob", name, "-n", NAMESPACE)
    wait_until(lambda: not platform.pods(name, LABEL_JOBSET), timeout=30, what="pods deleted")
    artifacts = await artifacts_of(run_id)
    kept = artifacts["train-tj-nan-log"].data
    assert "epoch 2/3 loss=nan" in kept and "loss diverged" in kept, kept
    assert "Failed" in artifacts["train-tj-nan-summary"].data


# CI resumes a TrainJob; the PyTorchJob path (same flow code, its own controller) is
# full matrix, and the demo trains a PyTorchJob to its end.
@pytest.mark.parametrize("api", ["trainjob", pytest.param("pytorchjob", marks=full_matrix)])
async def test_a_retried_train_resumes_from_its_last_checkpoint(
    platform: TrainingPlatform, first_image: tuple[str, Any], api: Api
):
    """Node 0 is lost at epoch 2 (exit 137) once; the retry of the same flow run deletes the
    failed job and starts a new one that resumes from the epoch-1 checkpoint on the PVC."""
    experiment = f"resume-{api[:5]}-{uuid.uuid4().hex[:4]}"
    fail_fast: dict[str, Any] = (
        {} if api == "trainjob" else {"restart_policy": "Never", "backoff_limit": 0}
    )
    params = TrainParams(
        experiment=experiment,
        api=api,
        workers=0,
        config="configs/preempt.yaml",
        volumes=[
            {"claim": "training-checkpoints", "mount_path": "/checkpoints", "read_only": False}
        ],
        cpu="100m",
        memory="64Mi",
        **fail_fast,
    )
    retried = train.with_options(retries=1, retry_delay_seconds=0)
    state = await retried(params=params, return_state=True)
    run_id = run_id_of(state)
    logs = await logs_of(run_id)
    assert state.is_completed(), f"{state.message}\n{logs[-3000:]}"
    result = await state.aresult()
    checkpoint = f"/checkpoints/{experiment}/epoch-1.ckpt"
    assert result.resumed_from == checkpoint
    assert "simulated preemption at epoch 2/3" in logs, logs[-3000:]
    assert f"attempt 2 resumes from checkpoint {checkpoint}" in logs
    assert f"resuming from checkpoint {checkpoint} (epoch 1)" in logs
    assert result.checkpoint == f"/checkpoints/{experiment}/epoch-3.ckpt"
    # The second attempt did not train epoch 1 again.
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
                key=ArtifactFilterKey(any_=[f"train-{experiment}-log"]),
            ),
            sort=ArtifactSort.CREATED_DESC,
        )
    assert len(found) == 2, [a.data for a in found]
    assert "epoch 1/3 loss" not in str(found[0].data) and "epoch 3/3 loss" in str(found[0].data)
    assert "epoch 1/3 loss" in str(found[1].data)
    plural = "trainjobs" if api == "trainjob" else "pytorchjobs"
    assert platform.jobs(plural).count(job_name(experiment, str(run_id))) == 1


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"experiment": "bad", "workers": 0, "elastic_min": 2}, "workers"),
        ({"experiment": "bad", "gpus_per_node": -1}, "gpus_per_node"),
        ({"experiment": "bad", "volumes": [{"claim": "datasets/imagenet"}]}, "claim"),
        ({"experiment": "bad", "image_tag": "19990101-0000000"}, "image_tag"),
        # Issue 24: the namespace's limits, and a credential in plain env.
        ({"experiment": "bad", "workers": 256, "gpus_per_node": 16}, "max_gpus_total = 64"),
        ({"experiment": "bad", "api": "trainjob", "workers": 16}, "max_replicas = 16"),
        ({"experiment": "bad", "env": {"HF_TOKEN": "hf_x"}}, "env.HF_TOKEN"),
    ],
)
async def test_invalid_parameters_are_refused_before_submission(
    platform: TrainingPlatform, first_image: tuple[str, Any], params: dict[str, Any], field: str
):
    before = platform.jobs()
    state = await train(params=params, return_state=True)
    assert state.is_failed()
    assert field in (state.message or ""), state.message
    assert platform.jobs() == before


# --- cancellation on a served deployment -------------------------------------------------------


@pytest.fixture(scope="module")
def served_train(platform: TrainingPlatform, prefect_server: Any) -> Iterator[None]:
    log = open(prefect_server.home / "served-train.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flows.training import train; train.serve(name='train')"],
        cwd=ROOT,
        env={**os.environ, **platform.env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def deployed() -> bool:
        with get_client(sync_client=True) as client:
            return bool(
                client.read_deployments(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["train"]))
                )
            )

    try:
        wait_until(deployed, timeout=60, what="served train deployment")
        yield
    finally:
        stop_pid(proc.pid)
        log.close()


def robotics_cd(platform: TrainingPlatform, *args: str, timeout: float = 120) -> str:
    """The ``robotics-cd`` command, as a person runs it (its own process)."""
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "robotics-cd"), *args],
        env={**os.environ, **platform.env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# CI follows one API through the CLI; both APIs run to the end in the resume test.
@pytest.mark.parametrize(
    ("api", "ended"),
    [pytest.param("pytorchjob", "Succeeded", marks=full_matrix), ("trainjob", "Complete")],
)
async def test_cli_starts_the_deployment_and_follows_it_to_the_end(
    platform: TrainingPlatform,
    first_image: tuple[str, Any],
    served_train: None,
    api: str,
    ended: str,
):
    out = robotics_cd(
        platform,
        "train",
        "--api",
        api,
        "--experiment",
        f"cli-{api}",
        "--workers",
        "1",
        "--cpu",
        "100m",
        "--memory",
        "64Mi",
    )
    assert "train run started: http" in out
    assert "epoch 3/3" in out and ended in out
    assert "train run completed" in out


@pytest.mark.parametrize(
    ("api", "plural", "label"),
    [
        pytest.param("pytorchjob", "pytorchjobs", LABEL_JOB, marks=full_matrix),
        ("trainjob", "trainjobs", LABEL_JOBSET),
    ],
)
async def test_cancelling_the_run_deletes_the_job_and_its_pods(
    platform: TrainingPlatform,
    first_image: tuple[str, Any],
    served_train: None,
    api: str,
    plural: str,
    label: str,
):
    experiment = f"cancel-{api}"
    out = robotics_cd(
        platform,
        "train",
        "--api",
        api,
        "--experiment",
        experiment,
        "--workers",
        "1",
        "--arg=--epochs",
        "--arg=120",
        "--cpu",
        "100m",
        "--memory",
        "64Mi",
        "--detach",
    )
    url = out.strip().splitlines()[-1]
    assert "/runs/flow-run/" in url, out
    run_id = UUID(url.rsplit("/", 1)[-1])
    name = job_name(experiment, str(run_id))
    wait_until(
        lambda: (
            len([p for p in platform.pods(name, label) if p["status"].get("phase") == "Running"])
            == 2
        ),
        timeout=90,
        what="the job's pods running",
    )
    async with get_client() as client:
        await client.set_flow_run_state(run_id, Cancelling(), force=True)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if name not in platform.jobs(plural) and not platform.pods(name, label):
            break
        await asyncio.sleep(0.5)
    assert name not in platform.jobs(plural), "the job outlived its cancelled run"
    assert not platform.pods(name, label)
    # What ran is reported, and the master's log is kept.
    artifacts: dict[str, Any] = {}
    for _ in range(20):
        artifacts = await artifacts_of(run_id)
        if f"train-{experiment}-cancelled" in artifacts:
            break
        await asyncio.sleep(0.5)
    report = artifacts[f"train-{experiment}-cancelled"].data
    assert "deleted, with its pods" in report and name in report, report
    assert "vision-train: rank=0" in artifacts[f"train-{experiment}-log"].data
    async with get_client() as client:
        final = await client.read_flow_run(run_id)
    assert final.state is not None and final.state.type.value in ("CANCELLED", "CANCELLING")
