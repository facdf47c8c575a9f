"""The twin's PyTorchJob controller on the real object store, with pod phases played by
the test (what the runtime component does with real containers in the integration test)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal, TypeVar

import pytest

from core.training import TrainParams, build_pytorchjob, job_state
from sandbox.kube.store import ObjectStore
from sandbox.pytorchjob import LABEL_JOB, PyTorchJobController

pytestmark = pytest.mark.asyncio(loop_scope="session")

NS = "training"
IMAGE = "127.0.0.1:5000/robotics-training/vision-train:20261127-1a2b3c4"
T = TypeVar("T")


@pytest.fixture
async def cluster(tmp_path) -> AsyncIterator[ObjectStore]:
    store = ObjectStore(tmp_path / "kube")
    store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    controller = PyTorchJobController(store, resync=0.05)
    task = asyncio.create_task(controller.run())
    yield store
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def eventually(
    check: Callable[[], T | Literal[False] | None], what: str, timeout: float = 5.0
) -> T:
    """The first truthy result of ``check`` (typed without its falsy None or False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def submit(store: ObjectStore, name: str, **overrides) -> dict:
    params = TrainParams(experiment="exp", **overrides)
    return store.create(build_pytorchjob(params, IMAGE, name, NS))


def pods(store: ObjectStore, job: str) -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in store.list("v1", "Pod", NS, {LABEL_JOB: job})}


def set_pod(
    store: ObjectStore, name: str, phase: str, *, exit_code: int | None = None, restarts: int = 0
):
    state: dict = {"running": {"startedAt": "2026-11-27T12:00:00Z"}}
    if exit_code is not None:
        state = {
            "terminated": {"exitCode": exit_code, "reason": "Error" if exit_code else "Completed"}
        }
    store.update_status(
        "v1",
        "Pod",
        NS,
        name,
        {
            "phase": phase,
            "containerStatuses": [{"name": "pytorch", "restartCount": restarts, "state": state}],
        },
    )


def job(store: ObjectStore, name: str) -> dict:
    return store.get("kubeflow.org/v1", "PyTorchJob", NS, name)


def env_of(pod: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}


async def test_pods_services_env_and_success(cluster):
    store = cluster
    submit(store, "ok", workers=2, nproc_per_node="2", cleanup="All")
    found = await eventually(lambda: len(pods(store, "ok")) == 3 and pods(store, "ok"), "3 pods")
    assert set(found) == {"ok-master-0", "ok-worker-0", "ok-worker-1"}
    master, worker1 = found["ok-master-0"], found["ok-worker-1"]
    assert master["metadata"]["labels"]["training.kubeflow.org/job-role"] == "master"
    assert worker1["metadata"]["labels"]["training.kubeflow.org/replica-type"] == "worker"
    assert worker1["metadata"]["labels"]["training.kubeflow.org/replica-index"] == "1"
    assert worker1["metadata"]["ownerReferences"][0]["kind"] == "PyTorchJob"
    env = env_of(worker1)
    assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "ok-master-0"
    assert env["MASTER_PORT"] == "23456"
    assert env["WORLD_SIZE"] == "6"  # 3 nodes x nprocPerNode 2: processes, not pods
    assert env["RANK"] == env["PET_NODE_RANK"] == "2"
    assert env["PET_NNODES"] == "3" and env["PET_NPROC_PER_NODE"] == "2"
    assert env["TRAIN_CONFIG"] == "configs/default.yaml"
    services = {s["metadata"]["name"]: s for s in store.list("v1", "Service", NS)}
    assert services["ok-master-0"]["spec"]["clusterIP"] == "None"
    assert services["ok-master-0"]["spec"]["selector"][LABEL_JOB] == "ok"

    for name in found:
        set_pod(store, name, "Running")
    await eventually(lambda: job_state(job(store, "ok")).phase == "Running", "Running")
    assert job(store, "ok")["status"]["replicaStatuses"]["Worker"] == {"active": 2}

    set_pod(store, "ok-master-0", "Succeeded", exit_code=0)
    state = await eventually(lambda: (s := job_state(job(store, "ok"))).finished and s, "Succeeded")
    assert state.phase == "Succeeded" and state.reason == "PyTorchJobSucceeded"
    assert state.start_time and state.completion_time
    # cleanPodPolicy All: pods and their services go; the job stays for inspection.
    await eventually(lambda: not pods(store, "ok"), "pods cleaned up")
    assert not store.list("v1", "Service", NS, {LABEL_JOB: "ok"})
    types = [c["type"] for c in job(store, "ok")["status"]["conditions"]]
    assert types == ["Created", "Running", "Succeeded"]


async def test_backoff_limit_fails_and_cleans_running_pods(cluster):
    store = cluster
    submit(store, "crash", workers=1, backoff_limit=2, cleanup="Running")
    await eventually(lambda: len(pods(store, "crash")) == 2, "2 pods")
    set_pod(store, "crash-worker-0", "Running")
    set_pod(store, "crash-master-0", "Running")
    await eventually(lambda: job_state(job(store, "crash")).phase == "Running", "Running")
    seen: list[str] = []
    watch = store.subscribe()

    async def record() -> None:
        async for event in watch:
            if event.object["kind"] == "PyTorchJob":
                seen.append(job_state(event.object).phase)

    recorder = asyncio.create_task(record())
    set_pod(store, "crash-master-0", "Running", restarts=1)
    await eventually(lambda: "Restarting" in seen, "Restarting")
    recorder.cancel()
    watch.close()
    set_pod(store, "crash-master-0", "Running", restarts=2)
    state = await eventually(lambda: (s := job_state(job(store, "crash"))).finished and s, "Failed")
    assert state.phase == "Failed"
    assert "backoff limit" in state.message
    await eventually(lambda: not pods(store, "crash"), "running pods deleted")


async def test_never_policy_fails_on_exit_1_and_keeps_pods_with_cleanup_none(cluster):
    store = cluster
    submit(store, "never", workers=0, restart_policy="Never", cleanup="None")
    await eventually(lambda: pods(store, "never"), "pod")
    set_pod(store, "never-master-0", "Failed", exit_code=1)
    state = await eventually(lambda: (s := job_state(job(store, "never"))).finished and s, "Failed")
    assert state.reason == "PyTorchJobFailed"
    assert "1 Master replica(s) failed" in state.message
    await asyncio.sleep(0.2)
    assert "never-master-0" in pods(store, "never")


async def test_exit_code_policy_recreates_on_signal_fails_on_error(cluster):
    store = cluster
    submit(store, "ec", workers=0, restart_policy="ExitCode", backoff_limit=5)
    first = await eventually(lambda: pods(store, "ec").get("ec-master-0"), "pod")
    assert first["spec"]["restartPolicy"] == "Never"
    set_pod(store, "ec-master-0", "Failed", exit_code=137)
    await eventually(
        lambda: (
            (p := pods(store, "ec").get("ec-master-0"))
            and p["metadata"]["uid"] != first["metadata"]["uid"]
        ),
        "pod recreated",
    )
    assert any(c["type"] == "Restarting" for c in job(store, "ec")["status"]["conditions"])
    set_pod(store, "ec-master-0", "Failed", exit_code=2)
    state = await eventually(lambda: (s := job_state(job(store, "ec"))).finished and s, "Failed")
    assert state.phase == "Failed"


async def test_active_deadline_fails_the_job(cluster):
    store = cluster
    submit(store, "slow", workers=0, deadline="1s", cleanup="All")
    await eventually(lambda: pods(store, "slow"), "pod")
    set_pod(store, "slow-master-0", "Running")
    state = await eventually(
        lambda: (s := job_state(job(store, "slow"))).finished and s, "deadline", timeout=6
    )
    assert "active longer than specified deadline" in state.message
    await eventually(lambda: not pods(store, "slow"), "pods deleted")


async def test_deleting_the_job_deletes_its_pods(cluster):
    store = cluster
    submit(store, "gone", workers=1)
    await eventually(lambda: len(pods(store, "gone")) == 2, "pods")
    store.delete("kubeflow.org/v1", "PyTorchJob", NS, "gone")
    assert not pods(store, "gone")
    assert not store.list("v1", "Service", NS, {LABEL_JOB: "gone"})
    await asyncio.sleep(0.2)  # and the controller does not bring them back
    assert not pods(store, "gone")


async def test_invalid_spec_is_failed_with_validation_reason(cluster):
    store = cluster
    body = build_pytorchjob(TrainParams(experiment="exp"), IMAGE, "bad", NS)
    body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"] = "x"
    store.create(body)
    state = await eventually(lambda: (s := job_state(job(store, "bad"))).finished and s, "Failed")
    assert state.reason == "PyTorchJobFailedValidation"
    assert not pods(store, "bad")
