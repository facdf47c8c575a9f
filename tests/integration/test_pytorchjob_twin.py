"""The twin's PyTorchJob controller on real parts: the Kubernetes API twin, the runtime
running every pod as a container, a registry, and the sample trainer image. The product's
own Kubernetes helpers (tasks/kube.py) watch the job and stream the master's log."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest
from prefect_kubernetes.credentials import KubernetesClusterConfig, KubernetesCredentials

from core.training import TrainParams, build_pytorchjob, job_state
from sandbox.engine import BUSYBOX_IMAGE
from sandbox.registry import push_image
from tasks.kube import delete_job, read_job, stream_pod_log, watch_job
from tests.fixtures_runtime import RuntimeTwin

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SEED = Path(__file__).resolve().parents[2] / "sandbox" / "seed" / "robotics-training"
LABEL_JOB = "training.kubeflow.org/job-name"


@pytest.fixture(scope="module")
def trainer_image(runtime_twin: RuntimeTwin) -> str:
    """The seed trainer, built locally and pushed to the twin's registry."""
    client = docker.from_env(timeout=120)
    try:
        local = "robotics-cd-test/vision-train:it"
        client.images.build(
            path=str(SEED), tag=local, buildargs={"BASE": BUSYBOX_IMAGE}, rm=True, pull=False
        )
        registry = runtime_twin.images.registry
        push_image(registry, local, "test/vision-train", "it")
        return f"{registry.host}/test/vision-train:it"
    finally:
        client.close()


@pytest.fixture
def namespace(runtime_twin: RuntimeTwin) -> str:
    name = f"train-{uuid.uuid4().hex[:6]}"
    runtime_twin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


def creds(twin: RuntimeTwin) -> KubernetesCredentials:
    return KubernetesCredentials(
        cluster_config=KubernetesClusterConfig.from_file(twin.kube.kubeconfig)
    )


def pods(twin: RuntimeTwin, namespace: str, job: str) -> list[dict[str, Any]]:
    import json

    out = twin.kube.kubectl(
        "get", "pods", "-n", namespace, "-l", f"{LABEL_JOB}={job}", "-o", "json"
    )
    return list(json.loads(out.stdout)["items"])


async def run_job(
    twin: RuntimeTwin, namespace: str, body: dict[str, Any], timeout: float = 90
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Apply the job, follow it with the product's watch and log stream to its end."""
    twin.apply(body)
    credentials = creds(twin)
    phases: list[str] = []
    lines: list[str] = []

    async def on_change(job: dict[str, Any]) -> None:
        phase = job_state(job).phase
        if not phases or phases[-1] != phase:
            phases.append(phase)

    stop = asyncio.Event()
    name = body["metadata"]["name"]
    logs = asyncio.create_task(
        stream_pod_log(credentials, f"{name}-master-0", namespace, lines.append, stop)
    )
    try:
        final = await asyncio.wait_for(watch_job(credentials, name, namespace, on_change), timeout)
    finally:
        stop.set()
        await asyncio.wait_for(logs, 15)
    return final, phases, lines


@pytest.mark.usefixtures("prefect_server")
async def test_master_and_two_workers_meet_by_name_and_succeed(
    runtime_twin: RuntimeTwin, trainer_image: str, namespace: str
):
    params = TrainParams(experiment="it", workers=2, cpu="100m", memory="64Mi", cleanup="None")
    body = build_pytorchjob(params, trainer_image, "meet", namespace)
    final, phases, lines = await run_job(runtime_twin, namespace, body)

    state = job_state(final)
    assert state.phase == "Succeeded", (state, lines)
    assert phases[-1] == "Succeeded" and "Running" in phases
    assert final["status"]["replicaStatuses"]["Master"] == {"succeeded": 1}
    assert final["status"]["startTime"] and final["status"]["completionTime"]
    log = "\n".join(lines)
    # The workers reached the master by its Service name: rank 0 saw all three ranks.
    assert "rendezvous: rank 2 joined" in log or "(3/3)" in log, log
    assert "epoch 3/3" in log and "checkpoint saved to /checkpoints/it/epoch-3.ckpt" in log
    found = {p["metadata"]["name"]: p for p in pods(runtime_twin, namespace, "meet")}
    assert set(found) == {"meet-master-0", "meet-worker-0", "meet-worker-1"}
    worker = found["meet-worker-1"]
    assert worker["metadata"]["labels"]["training.kubeflow.org/replica-type"] == "worker"
    env = {e["name"]: e.get("value") for e in worker["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == "meet-master-0" and env["RANK"] == "2"
    assert env["WORLD_SIZE"] == "3" and env["PET_NNODES"] == "3"


@pytest.mark.usefixtures("prefect_server")
async def test_failing_trainer_fails_after_backoff_and_is_cleaned_up(
    runtime_twin: RuntimeTwin, trainer_image: str, namespace: str
):
    params = TrainParams(
        experiment="it",
        workers=0,
        config="configs/fail.yaml",
        backoff_limit=1,
        cleanup="All",
        cpu="100m",
        memory="64Mi",
    )
    body = build_pytorchjob(params, trainer_image, "diverge", namespace)
    final, _, lines = await run_job(runtime_twin, namespace, body)

    state = job_state(final)
    assert state.phase == "Failed", (state, lines)
    assert "backoff limit" in state.message
    assert any("loss diverged" in line or "loss=nan" in line for line in lines), lines
    runtime_twin.wait_for(
        "pods deleted (cleanPodPolicy All)",
        lambda: not pods(runtime_twin, namespace, "diverge"),
        timeout=30,
    )


@pytest.mark.usefixtures("prefect_server")
async def test_deleting_a_running_job_deletes_its_pods(
    runtime_twin: RuntimeTwin, trainer_image: str, namespace: str
):
    params = TrainParams(
        experiment="it", workers=1, args=["--epochs", "60"], cpu="100m", memory="64Mi"
    )
    body = build_pytorchjob(params, trainer_image, "stop", namespace)
    runtime_twin.apply(body)
    credentials = creds(runtime_twin)
    runtime_twin.wait_for(
        "the job running",
        lambda: (
            len(pods(runtime_twin, namespace, "stop")) == 2
            and job_state(runtime_twin.get("pytorchjobs", "stop", namespace)).phase == "Running"
        ),
    )
    assert await delete_job(credentials, "stop", namespace)
    assert await read_job(credentials, "stop", namespace) is None
    runtime_twin.wait_for(
        "pods gone", lambda: not pods(runtime_twin, namespace, "stop"), timeout=30
    )
    assert not await delete_job(credentials, "stop", namespace)


async def test_submit_adopts_its_own_job_and_refuses_another_runs(
    runtime_twin: RuntimeTwin, namespace: str, prefect_server
):
    from prefect import flow

    from core.errors import KubeError
    from tasks.kube import submit_training_job

    block = f"pj-twin-{uuid.uuid4().hex[:6]}"
    await creds(runtime_twin).asave(block, overwrite=True)
    params = TrainParams(
        experiment="it", workers=0, args=["--epochs", "60"], cpu="100m", memory="64Mi"
    )
    mine = build_pytorchjob(params, "127.0.0.1:1/none/none:1", "twice", namespace, "run-a")
    theirs = build_pytorchjob(params, "127.0.0.1:1/none/none:1", "twice", namespace, "run-b")

    @flow
    async def submit_twice() -> tuple[str, str, str]:
        first = await submit_training_job(mine, credentials_block=block)
        again = await submit_training_job(mine, credentials_block=block)
        try:
            await submit_training_job(theirs, credentials_block=block)
        except KubeError as exc:
            return first["metadata"]["uid"], again["metadata"]["uid"], str(exc)
        return first["metadata"]["uid"], again["metadata"]["uid"], ""

    first, again, refused = await submit_twice()
    assert first == again
    assert "belongs to flow run run-a" in refused
    assert await delete_job(creds(runtime_twin), "twice", namespace)


async def test_watch_survives_an_api_server_restart(tmp_path: Path, prefect_server):
    """The watch re-lists after its connection drops and sees the change made meanwhile."""
    import json

    from tests.fixtures_kube import start_kube_twin

    with start_kube_twin(
        tmp_path / "twin", components=["sandbox.kube.api", "sandbox.pytorchjob"]
    ) as twin:
        ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "train-restart"}}
        body = build_pytorchjob(
            TrainParams(experiment="it"), "127.0.0.1:1/x/y:1", "survive", "train-restart"
        )
        (tmp_path / "objs.json").write_text(json.dumps(ns) + "\n---\n" + json.dumps(body))
        twin.kubectl("create", "-f", str(tmp_path / "objs.json"))
        credentials = KubernetesCredentials(
            cluster_config=KubernetesClusterConfig.from_file(twin.kubeconfig)
        )
        seen: list[str] = []
        created = asyncio.Event()

        async def on_change(job: dict[str, Any]) -> None:
            seen.append(job_state(job).phase)
            if job_state(job).phase == "Created":
                created.set()

        watching = asyncio.create_task(
            watch_job(credentials, "survive", "train-restart", on_change)
        )
        await asyncio.wait_for(created.wait(), 15)
        await asyncio.to_thread(twin.restart)
        done = {
            "conditions": [
                {"type": "Created", "status": "True", "reason": "PyTorchJobCreated"},
                {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"},
            ]
        }
        twin.kubectl(
            "patch",
            "pytorchjob",
            "survive",
            "-n",
            "train-restart",
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": done}),
        )
        final = await asyncio.wait_for(watching, 30)
        assert job_state(final).phase == "Succeeded"
        assert seen[0] in ("Pending", "Created") and seen[-1] == "Succeeded"
