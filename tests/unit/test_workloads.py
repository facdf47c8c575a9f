"""The workload controllers on a real object store, with the kubelet's part (pods becoming
ready or finishing) played by the test: rolling-update bounds, Recreate, Jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sandbox.kube.store import ObjectStore
from sandbox.runtime.objects import pod_active
from sandbox.runtime.workloads import Controllers

NS = "default"


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "kube")


def _deployment(
    image: str, replicas: int = 3, strategy: dict[str, Any] | None = None
) -> dict[str, Any]:
    labels = {"app": "web"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "strategy": strategy
            or {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": image}]},
            },
        },
    }


def _pods(store: ObjectStore) -> list[dict[str, Any]]:
    return [p for p in store.list("v1", "Pod", NS) if pod_active(p)]


def _make_ready(store: ObjectStore) -> None:
    """What the kubelet would do: every pending pod starts and passes its probe."""
    for pod in _pods(store):
        if (pod.get("status") or {}).get("phase") != "Running":
            store.update_status(
                "v1",
                "Pod",
                NS,
                pod["metadata"]["name"],
                {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
            )


def _image_of(pod: dict[str, Any]) -> str:
    return str(pod["spec"]["containers"][0]["image"])


def _settle(
    controllers: Controllers, store: ObjectStore, *, ready: bool, rounds: int = 40
) -> list[list[str]]:
    """Reconcile until nothing changes; return the pods' images after every pass."""
    history = []
    for _ in range(rounds):
        before = store.resource_version()
        controllers.reconcile_all()
        history.append(sorted(_image_of(p) for p in _pods(store)))
        if ready:
            _make_ready(store)
        if store.resource_version() == before:
            break
    return history


def test_rolling_update_stays_within_surge_and_unavailability(store: ObjectStore) -> None:
    controllers = Controllers(store)
    store.create(_deployment("web:v1"))
    _settle(controllers, store, ready=True)
    assert [_image_of(p) for p in _pods(store)] == ["web:v1"] * 3

    dep = store.get("apps/v1", "Deployment", NS, "web")
    dep["spec"]["template"]["spec"]["containers"][0]["image"] = "web:v2"
    store.replace(dep)
    history = _settle(controllers, store, ready=True)
    # maxSurge 1: never more than 4 pods; maxUnavailable 0: never fewer than 3.
    assert all(3 <= len(images) <= 4 for images in history), history
    assert sorted(_image_of(p) for p in _pods(store)) == ["web:v2"] * 3
    status = store.get("apps/v1", "Deployment", NS, "web")["status"]
    assert status["updatedReplicas"] == status["availableReplicas"] == status["replicas"] == 3
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Progressing"]["reason"] == "NewReplicaSetAvailable"
    replica_sets = store.list("apps/v1", "ReplicaSet", NS)
    assert sorted(
        rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"] for rs in replica_sets
    ) == ["1", "2"]


def test_an_unready_new_version_never_takes_the_old_pods_down(store: ObjectStore) -> None:
    controllers = Controllers(store)
    store.create(_deployment("web:v1"))
    _settle(controllers, store, ready=True)
    dep = store.get("apps/v1", "Deployment", NS, "web")
    dep["spec"]["template"]["spec"]["containers"][0]["image"] = "web:broken"
    store.replace(dep)
    _settle(controllers, store, ready=False)
    images = sorted(_image_of(p) for p in _pods(store))
    assert images == ["web:broken", "web:v1", "web:v1", "web:v1"]


def test_recreate_removes_old_pods_before_new_ones(store: ObjectStore) -> None:
    controllers = Controllers(store)
    store.create(_deployment("web:v1", replicas=2, strategy={"type": "Recreate"}))
    _settle(controllers, store, ready=True)
    dep = store.get("apps/v1", "Deployment", NS, "web")
    dep["spec"]["template"]["spec"]["containers"][0]["image"] = "web:v2"
    store.replace(dep)
    history = _settle(controllers, store, ready=True)
    assert not any("web:v1" in images and "web:v2" in images for images in history), history
    assert sorted(_image_of(p) for p in _pods(store)) == ["web:v2"] * 2


def test_zero_replicas_is_available(store: ObjectStore) -> None:
    controllers = Controllers(store)
    store.create(_deployment("web:v1", replicas=0))
    _settle(controllers, store, ready=True)
    status = store.get("apps/v1", "Deployment", NS, "web")["status"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Available"]["status"] == "True"
    assert conditions["Progressing"]["reason"] == "NewReplicaSetAvailable"
    assert not _pods(store)


def test_job_with_parallelism_runs_to_its_completions(store: ObjectStore) -> None:
    controllers = Controllers(store)
    store.create(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "batch", "namespace": NS},
            "spec": {
                "completions": 3,
                "parallelism": 2,
                "template": {
                    "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}
                },
            },
        }
    )
    peak = 0
    for _ in range(10):
        controllers.reconcile_all()
        active = _pods(store)
        peak = max(peak, len(active))
        for pod in active:  # each pod finishes well
            store.update_status("v1", "Pod", NS, pod["metadata"]["name"], {"phase": "Succeeded"})
    job = store.get("batch/v1", "Job", NS, "batch")
    assert peak == 2
    assert job["status"]["succeeded"] == 3
    assert {c["type"] for c in job["status"]["conditions"]} >= {"Complete", "SuccessCriteriaMet"}


@pytest.mark.parametrize("graceful", [True, False])
def test_a_jobs_deleted_pod_counts_as_failed_and_backoff_limit_0_fails_the_job(
    store: ObjectStore, graceful: bool
) -> None:
    """As the job controller counts them (finalizer accounting, no podFailurePolicy): a pod
    deleted before it succeeded is a failure, from its deletionTimestamp on, and stays
    counted once it is gone; with backoffLimit 0 the Job fails and no second pod starts
    (a flow-run Job whose pod is deleted must not run the flow twice)."""
    controllers = Controllers(store)
    store.create(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "flow-run", "namespace": NS},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}
                },
            },
        }
    )
    controllers.reconcile_all()
    [pod] = _pods(store)
    name = pod["metadata"]["name"]
    store.update_status("v1", "Pod", NS, name, {"phase": "Running"})
    if graceful:  # bound to a node: marked, the kubelet stops it and removes it later
        current = store.get("v1", "Pod", NS, name)
        store.replace({**current, "spec": {**current["spec"], "nodeName": "n"}})
    store.delete("v1", "Pod", NS, name, graceful=graceful, grace_period_seconds=30)
    for _ in range(3):
        controllers.reconcile_all()
    job = store.get("batch/v1", "Job", NS, "flow-run")
    assert job["status"]["failed"] == 1
    assert "Failed" in {c["type"] for c in job["status"]["conditions"]}
    assert [p["metadata"]["name"] for p in store.list("v1", "Pod", NS)] in ([], [name])
