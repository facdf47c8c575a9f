"""The kube twin's HTTP surface in-process (httpx over ASGI): the shapes clients parse.

Watches and TLS are exercised against a real twin process in
tests/integration/test_kube_twin.py; here: discovery, tables, subresources, patches, logs and
error Status objects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox.kube.api import KubeApi
from sandbox.kube.store import ApiError, ObjectStore

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TABLE = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
MERGE = {"Content-Type": "application/merge-patch+json"}


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


def pod(name: str = "p", containers: tuple[str, ...] = ("main",)) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "staging"},
        "spec": {"containers": [{"name": c, "image": "x"} for c in containers]},
    }


async def test_discovery_lists_groups_and_resources(client: httpx.AsyncClient):
    groups = (await client.get("/apis")).json()
    names = {g["name"] for g in groups["groups"]}
    assert {"apps", "batch", "networking.k8s.io", "kubeflow.org", "argoproj.io"} <= names
    core = (await client.get("/api/v1")).json()
    pods = next(r for r in core["resources"] if r["name"] == "pods")
    assert pods["namespaced"] and "watch" in pods["verbs"] and pods["shortNames"] == ["po"]
    assert any(r["name"] == "pods/log" for r in core["resources"])
    apps = (await client.get("/apis/apps/v1")).json()
    assert next(r for r in apps["resources"] if r["name"] == "deployments/scale")["kind"] == "Scale"
    assert (await client.get("/version")).json()["major"] == "1"
    index = (await client.get("/openapi/v3")).json()
    assert "apis/kubeflow.org/v1" in index["paths"]


async def test_requests_without_the_token_are_401_statuses(store: ObjectStore):
    app = KubeApi(store, TOKEN).app()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://twin"
    ) as anon:
        refused = await anon.get("/api/v1/namespaces")
        assert refused.status_code == 401 and refused.json()["reason"] == "Unauthorized"
        assert (await anon.get("/version")).status_code == 200


async def test_errors_are_status_objects_with_the_real_codes(client: httpx.AsyncClient):
    missing = await client.get("/apis/apps/v1/namespaces/staging/deployments/nope")
    assert missing.status_code == 404
    assert missing.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'deployments.apps "nope" not found',
        "reason": "NotFound",
        "code": 404,
        "details": {"name": "nope", "group": "apps", "kind": "deployments"},
    }
    wrong_ns = await client.post("/api/v1/namespaces/default/pods", json=pod())
    assert wrong_ns.status_code == 400 and wrong_ns.json()["reason"] == "BadRequest"
    unknown = await client.get("/apis/example.com/v1/widgets")
    assert unknown.status_code == 404
    protobuf = await client.post(
        "/api/v1/namespaces",
        content=b"k8s\x00",
        headers={"Content-Type": "application/vnd.kubernetes.protobuf"},
    )
    assert protobuf.status_code == 415
    custom_without_version = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "j"},
        "spec": {},
    }
    assert (
        await client.post(
            "/apis/kubeflow.org/v1/namespaces/staging/pytorchjobs", json=custom_without_version
        )
    ).status_code == 201
    replace = await client.put(
        "/apis/kubeflow.org/v1/namespaces/staging/pytorchjobs/j", json=custom_without_version
    )
    assert (
        replace.status_code == 422
        and replace.json()["details"]["causes"][0]["field"] == "metadata.resourceVersion"
    )


async def test_lists_paginate_and_render_as_tables(client: httpx.AsyncClient):
    for name in ("a", "b", "c"):
        assert (
            await client.post("/api/v1/namespaces/staging/pods", json=pod(name))
        ).status_code == 201
    first = (await client.get("/api/v1/namespaces/staging/pods", params={"limit": 2})).json()
    assert first["kind"] == "PodList" and [p["metadata"]["name"] for p in first["items"]] == [
        "a",
        "b",
    ]
    rest = (
        await client.get(
            "/api/v1/namespaces/staging/pods",
            params={"limit": 2, "continue": first["metadata"]["continue"]},
        )
    ).json()
    assert [p["metadata"]["name"] for p in rest["items"]] == ["c"] and "continue" not in rest[
        "metadata"
    ]

    table = (await client.get("/api/v1/namespaces/staging/pods", headers=TABLE)).json()
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]][:4] == [
        "Name",
        "Ready",
        "Status",
        "Restarts",
    ]
    assert table["rows"][0]["cells"][:4] == ["a", "0/1", "Pending", 0]
    assert table["rows"][0]["object"]["metadata"]["name"] == "a"


async def test_status_and_scale_subresources(client: httpx.AsyncClient):
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "api"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "api"}}},
    }
    base = "/apis/apps/v1/namespaces/staging/deployments"
    assert (await client.post(base, json=deployment)).status_code == 201
    ignored = await client.patch(f"{base}/api", json={"status": {"replicas": 7}}, headers=MERGE)
    assert "status" not in ignored.json()  # the main resource does not write status

    status = await client.patch(
        f"{base}/api/status", json={"status": {"readyReplicas": 1}}, headers=MERGE
    )
    assert (
        status.json()["status"] == {"readyReplicas": 1}
        and status.json()["metadata"]["generation"] == 1
    )

    scale = (await client.get(f"{base}/api/scale")).json()
    assert (
        scale["kind"] == "Scale"
        and scale["spec"]["replicas"] == 1
        and scale["status"]["selector"] == "app=api"
    )
    scaled = await client.patch(f"{base}/api/scale", json={"spec": {"replicas": 4}}, headers=MERGE)
    assert scaled.json()["spec"]["replicas"] == 4
    after = (await client.get(f"{base}/api")).json()
    assert after["spec"]["replicas"] == 4 and after["metadata"]["generation"] == 2


async def test_json_patch_and_dry_run(client: httpx.AsyncClient, store: ObjectStore):
    assert (await client.post("/api/v1/namespaces/staging/pods", json=pod())).status_code == 201
    patched = await client.patch(
        "/api/v1/namespaces/staging/pods/p",
        json=[{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}],
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert patched.json()["metadata"]["labels"] == {"a": "b"}
    dry = await client.post(
        "/api/v1/namespaces/staging/pods", params={"dryRun": "All"}, json=pod("q")
    )
    assert dry.status_code == 201
    with pytest.raises(ApiError):
        store.get("v1", "Pod", "staging", "q")


async def test_pod_logs_come_from_the_runtime_source_or_are_empty(
    client: httpx.AsyncClient, store: ObjectStore
):
    assert (
        await client.post("/api/v1/namespaces/staging/pods", json=pod(containers=("main", "side")))
    ).status_code == 201
    log_url = "/api/v1/namespaces/staging/pods/p/log"

    ambiguous = await client.get(log_url)
    assert (
        ambiguous.status_code == 400 and "choose one of: [main side]" in ambiguous.json()["message"]
    )
    empty = await client.get(log_url, params={"container": "main"})
    assert empty.status_code == 200 and empty.content == b""  # no runtime: no output, no fake text

    calls: list[tuple[Any, ...]] = []

    async def source(
        ns: str, name: str, container: str | None, tail: int | None, follow: bool
    ) -> AsyncIterator[bytes]:
        calls.append((ns, name, container, tail, follow))
        if container == "side":
            raise ApiError(400, "BadRequest", 'container "side" in pod "p" is waiting to start')
        yield b"epoch 1\n"
        yield b"epoch 2\n"

    store.log_source = source
    logs = await client.get(
        log_url, params={"container": "main", "tailLines": "2", "follow": "true"}
    )
    assert logs.status_code == 200 and logs.text == "epoch 1\nepoch 2\n"
    assert calls == [("staging", "p", "main", 2, True)]
    waiting = await client.get(log_url, params={"container": "side"})
    assert waiting.status_code == 400 and "waiting to start" in waiting.json()["message"]
    assert (await client.get("/api/v1/namespaces/staging/pods/nope/log")).status_code == 404
