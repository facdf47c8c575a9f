"""The twin's TrainJob controller (Kubeflow Trainer v2.3.0 + JobSet) on the real object store,
with pod phases played by the test (the runtime component plays them with real containers in
the integration tests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from core.training import TrainParams, build_trainjob, job_state
from sandbox.kube.store import ObjectStore
from sandbox.trainjob import (
    API_VERSION,
    JOBSET_API,
    LABEL_COMPLETION,
    LABEL_JOBSET,
    TrainJobController,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

NS = "training"
IMAGE = "127.0.0.1:5000/robotics-training/vision-train:20261127-1a2b3c4"


@pytest.fixture
async def cluster(tmp_path) -> AsyncIterator[ObjectStore]:
    store = ObjectStore(tmp_path / "kube")
    store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    controller = TrainJobController(store, resync=0.05)
    controller.install_default_runtime()
    task = asyncio.create_task(controller.run())
    yield store
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def eventually(check: Callable[[], object], what: str, timeout: float = 5.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def submit(store: ObjectStore, name: str, **overrides) -> dict:
    params = TrainParams(experiment="exp", api="trainjob", **overrides)
    return store.create(build_trainjob(params, IMAGE, name, NS))


def pods(store: ObjectStore, job: str) -> list[dict]:
    found = store.list("v1", "Pod", NS, {LABEL_JOBSET: job})
    return sorted(found, key=lambda p: p["metadata"]["labels"][LABEL_COMPLETION])


def set_pod(store: ObjectStore, pod: dict, phase: str, *, exit_code: int | None = None) -> None:
    state: dict = {"running": {"startedAt": "2026-11-27T12:00:00Z"}}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code}}
    store.update_status(
        "v1",
        "Pod",
        NS,
        pod["metadata"]["name"],
        {"phase": phase, "containerStatuses": [{"name": "node", "state": state}]},
    )


def trainjob(store: ObjectStore, name: str) -> dict:
    return store.get(API_VERSION, "TrainJob", NS, name)


def env_of(pod: dict) -> dict[str, object]:
    return {
        e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]
    }


async def test_three_nodes_run_as_a_jobset_with_torchrun_env_and_complete(cluster):
    submit(cluster, "tj", workers=2, cpu="2", memory="1Gi", env={"WANDB_MODE": "offline"})
    found = await eventually(lambda: len(pods(cluster, "tj")) == 3 and pods(cluster, "tj"), "pods")
    assert isinstance(found, list)
    names = [p["metadata"]["name"] for p in found]
    assert all(
        n.startswith(f"tj-node-0-{i}-") and len(n) == len(f"tj-node-0-{i}-") + 5
        for i, n in enumerate(names)
    )
    for index, pod in enumerate(found):
        assert pod["spec"]["hostname"] == f"tj-node-0-{index}"
        assert pod["spec"]["subdomain"] == "tj"
        assert pod["spec"]["restartPolicy"] == "Never"  # the runtime's template
        container = pod["spec"]["containers"][0]
        assert container["name"] == "node" and container["image"] == IMAGE
        assert container["resources"]["limits"] == {"cpu": "2", "memory": "1Gi"}
        env = env_of(pod)
        assert env["PET_NNODES"] == "3"
        assert env["PET_NPROC_PER_NODE"] == "2"  # auto without GPUs: the CPUs per node
        assert env["PET_MASTER_ADDR"] == "tj-node-0-0.tj"
        assert env["PET_MASTER_PORT"] == "29500"
        assert env["PET_NODE_RANK"] == {
            "fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
            }
        }
        assert pod["metadata"]["annotations"][LABEL_COMPLETION] == str(index)
        assert env["WANDB_MODE"] == "offline" and env["EXPERIMENT"] == "exp"
        assert pod["metadata"]["labels"]["robotics-cd/experiment"] == "exp"  # runtimePatches
    service = cluster.get("v1", "Service", NS, "tj")
    assert service["spec"]["clusterIP"] == "None"
    jobset = cluster.get(JOBSET_API, "JobSet", NS, "tj")
    assert jobset["metadata"]["ownerReferences"][0]["kind"] == "TrainJob"

    for pod in found:
        set_pod(cluster, pod, "Running")
    await eventually(lambda: job_state(trainjob(cluster, "tj")).phase == "Running", "Running")
    for pod in found:
        set_pod(cluster, pod, "Succeeded", exit_code=0)
    await eventually(lambda: job_state(trainjob(cluster, "tj")).finished, "finished")
    state = job_state(trainjob(cluster, "tj"))
    assert state.phase == "Complete" and state.succeeded
    assert state.reason == "AllJobsCompleted" and state.message == "jobset completed successfully"
    assert state.replicas == {"node": {"succeeded": 1}}


async def test_a_failed_node_fails_the_jobset_and_stops_the_others(cluster):
    submit(cluster, "tjf", workers=1)
    found = await eventually(
        lambda: len(pods(cluster, "tjf")) == 2 and pods(cluster, "tjf"), "pods"
    )
    assert isinstance(found, list)
    set_pod(cluster, found[1], "Running")
    set_pod(cluster, found[0], "Failed", exit_code=1)
    await eventually(lambda: job_state(trainjob(cluster, "tjf")).finished, "finished")
    state = job_state(trainjob(cluster, "tjf"))
    assert state.phase == "Failed" and state.reason == "FailedJobs"
    # backoffLimit 0: no replacement pod; the running node is stopped.
    await eventually(
        lambda: (
            [p["metadata"]["name"] for p in pods(cluster, "tjf")] == [found[0]["metadata"]["name"]]
        ),
        "the other node stopped",
    )


async def test_suspend_deletes_the_pods_and_resume_brings_them_back(cluster):
    submit(cluster, "tjs", workers=1)
    await eventually(lambda: len(pods(cluster, "tjs")) == 2, "pods")
    cluster.patch(API_VERSION, "TrainJob", NS, "tjs", {"spec": {"suspend": True}})
    await eventually(lambda: job_state(trainjob(cluster, "tjs")).phase == "Suspended", "Suspended")
    await eventually(lambda: not pods(cluster, "tjs"), "pods deleted")
    cond = trainjob(cluster, "tjs")["status"]["conditions"][0]
    assert (cond["type"], cond["reason"], cond["message"]) == (
        "Suspended",
        "Suspended",
        "TrainJob is suspended",
    )
    cluster.patch(API_VERSION, "TrainJob", NS, "tjs", {"spec": {"suspend": False}})
    await eventually(lambda: len(pods(cluster, "tjs")) == 2, "pods back")
    cond = trainjob(cluster, "tjs")["status"]["conditions"][0]
    assert (cond["status"], cond["reason"]) == ("False", "Resumed")


async def test_deadline_fails_with_deadline_exceeded_and_deletes_the_jobset(cluster):
    submit(cluster, "tjd", workers=0, deadline="1s")
    await eventually(lambda: len(pods(cluster, "tjd")) == 1, "pod")
    await eventually(lambda: job_state(trainjob(cluster, "tjd")).finished, "deadline", timeout=8)
    state = job_state(trainjob(cluster, "tjd"))
    assert (state.phase, state.reason) == ("Failed", "DeadlineExceeded")
    await eventually(lambda: not pods(cluster, "tjd"), "pods gone with the JobSet")


async def test_deleting_the_trainjob_removes_jobset_service_and_pods(cluster):
    submit(cluster, "tjx", workers=1)
    await eventually(lambda: len(pods(cluster, "tjx")) == 2, "pods")
    cluster.delete(API_VERSION, "TrainJob", NS, "tjx")
    await eventually(lambda: not pods(cluster, "tjx"), "pods deleted")
    assert not cluster.list(JOBSET_API, "JobSet", NS)
    assert not [s for s in cluster.list("v1", "Service", NS) if s["metadata"]["name"] == "tjx"]


async def test_an_unsupported_runtime_kind_fails_the_job(cluster):
    body = build_trainjob(TrainParams(experiment="exp", api="trainjob"), IMAGE, "tju", NS)
    body["spec"]["runtimeRef"]["kind"] = "SomethingElse"
    cluster.create(body)
    await eventually(lambda: job_state(trainjob(cluster, "tju")).finished, "failed")
    assert job_state(trainjob(cluster, "tju")).reason == "TrainingRuntimeNotSupported"
