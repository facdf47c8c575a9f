"""Deletion as the API server does it, through the twin's HTTP surface (in-process ASGI):
graceful pod deletion, Foreground/Background propagation, what each DELETE answers.

The kubelet's half (SIGTERM, SIGKILL after the grace period, then removing the pod) runs on
real containers in tests/integration/test_kube_jobs_twin.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox.kube.api import KubeApi
from sandbox.kube.store import ObjectStore

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JOBS = "/apis/batch/v1/namespaces/staging/jobs"
PODS = "/api/v1/namespaces/staging/pods"


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    s = ObjectStore(tmp_path / "kube")
    s.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "staging"}})
    return s


@pytest.fixture
async def client(store: ObjectStore) -> AsyncIterator[httpx.AsyncClient]:
    app = KubeApi(store, TOKEN).app()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://twin", headers=AUTH
    ) as c:
        yield c


def job(store: ObjectStore, name: str = "run") -> dict[str, Any]:
    return store.create(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": "staging"},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}},
        }
    )


def pod_of(
    store: ObjectStore,
    owner: dict[str, Any],
    name: str,
    *,
    node: str | None = "twin-node",
    phase: str = "Running",
    grace: int | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "x"}]}
    if node:
        spec["nodeName"] = node
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    meta = owner["metadata"]
    return store.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": "staging",
                "ownerReferences": [
                    {
                        "apiVersion": owner["apiVersion"],
                        "kind": owner["kind"],
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": spec,
            "status": {"phase": phase},
        }
    )


def names(store: ObjectStore, api_version: str, kind: str) -> list[str]:
    return [o["metadata"]["name"] for o in store.list(api_version, kind, "staging")]


async def test_a_running_bound_pod_is_marked_with_its_grace_period_not_removed(
    client: httpx.AsyncClient, store: ObjectStore
) -> None:
    owner = job(store)
    pod_of(store, owner, "bound", grace=7)
    response = await client.delete(f"{PODS}/bound")
    assert response.status_code == 200
    meta = response.json()["metadata"]
    assert meta["deletionGracePeriodSeconds"] == 7
    assert "deletionTimestamp" in meta
    assert names(store, "v1", "Pod") == ["bound"]

    # A second delete may shorten the period, never lengthen it; 0 removes at once.
    again = await client.delete(f"{PODS}/bound", params={"gracePeriodSeconds": "60"})
    assert again.json()["metadata"]["deletionGracePeriodSeconds"] == 7
    shorter = await client.delete(f"{PODS}/bound", params={"gracePeriodSeconds": "2"})
    assert shorter.json()["metadata"]["deletionGracePeriodSeconds"] == 2
    assert (await client.delete(f"{PODS}/bound", params={"gracePeriodSeconds": "0"})).is_success
    assert names(store, "v1", "Pod") == []


async def test_unbound_and_finished_pods_go_at_once(
    client: httpx.AsyncClient, store: ObjectStore
) -> None:
    owner = job(store)
    pod_of(store, owner, "pending", node=None)
    pod_of(store, owner, "done", phase="Succeeded")
    assert (await client.delete(f"{PODS}/pending")).is_success
    assert (await client.delete(f"{PODS}/done")).is_success
    assert names(store, "v1", "Pod") == []


async def test_a_server_owned_deletion_mark_cannot_be_patched_away(
    client: httpx.AsyncClient, store: ObjectStore
) -> None:
    pod_of(store, job(store), "bound")
    await client.delete(f"{PODS}/bound")
    patched = await client.patch(
        f"{PODS}/bound",
        json={"metadata": {"deletionTimestamp": None, "labels": {"a": "b"}}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert patched.is_success
    assert "deletionTimestamp" in patched.json()["metadata"]


async def test_foreground_job_delete_waits_for_its_pods_then_goes(
    client: httpx.AsyncClient, store: ObjectStore
) -> None:
    """What the prefect-kubernetes worker sends to cancel a run: the Job stays (marked, with
    the foregroundDeletion finalizer) while its running pod terminates, then goes with it."""
    owner = job(store)
    pod_of(store, owner, "run-a", grace=5)
    pod_of(store, owner, "run-b", phase="Failed")
    response = await client.delete(
        f"{JOBS}/run", params={"propagationPolicy": "Foreground", "gracePeriodSeconds": "3"}
    )
    assert response.status_code == 202
    meta = response.json()["metadata"]
    assert meta["finalizers"] == ["foregroundDeletion"]
    assert "deletionTimestamp" in meta
    assert names(store, "batch/v1", "Job") == ["run"]
    # The finished pod went at once; the running one terminates with the request's period.
    [running] = store.list("v1", "Pod", "staging")
    assert running["metadata"]["name"] == "run-a"
    assert running["metadata"]["deletionGracePeriodSeconds"] == 3

    # The kubelet removes the pod once its containers stopped: the Job goes with it.
    store.delete("v1", "Pod", "staging", "run-a")
    assert names(store, "batch/v1", "Job") == []


async def test_background_job_delete_removes_the_job_and_terminates_its_pods(
    client: httpx.AsyncClient, store: ObjectStore
) -> None:
    owner = job(store)
    pod_of(store, owner, "run-a", grace=4)
    response = await client.delete(f"{JOBS}/run", params={"propagationPolicy": "Background"})
    assert response.status_code == 200
    assert response.json()["kind"] == "Status"
    assert names(store, "batch/v1", "Job") == []
    [running] = store.list("v1", "Pod", "staging")
    assert running["metadata"]["deletionGracePeriodSeconds"] == 4


async def test_a_foreground_delete_of_an_object_without_dependents_is_immediate(
    client: httpx.AsyncClient, store: ObjectStore
) -> None:
    job(store)
    response = await client.delete(f"{JOBS}/run", params={"propagationPolicy": "Foreground"})
    assert response.status_code == 200
    assert names(store, "batch/v1", "Job") == []


def test_in_process_controllers_still_delete_at_once(store: ObjectStore) -> None:
    owner = job(store)
    pod_of(store, owner, "run-a")
    store.delete("batch/v1", "Job", "staging", "run")
    assert names(store, "v1", "Pod") == []


async def test_a_secrets_string_data_is_stored_base64_encoded_in_data(
    client: httpx.AsyncClient,
) -> None:
    """The worker's ``store_env_as_secret`` writes ``stringData``; readers see ``data``."""
    created = await client.post(
        "/api/v1/namespaces/staging/secrets",
        json={
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "env"},
            "stringData": {"PREFECT_API_URL": "http://127.0.0.1:4200/api"},
        },
    )
    assert created.status_code == 201
    body = created.json()
    assert "stringData" not in body
    assert body["data"] == {"PREFECT_API_URL": "aHR0cDovLzEyNy4wLjAuMTo0MjAwL2FwaQ=="}
