"""The Kubernetes API twin against real clients: kubectl, and prefect-kubernetes over
kubernetes_asyncio, talking to a real twin process over HTTPS with a bearer token."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes_asyncio import watch
from kubernetes_asyncio.client.exceptions import ApiException
from prefect import flow
from prefect.cache_policies import NO_CACHE
from prefect_kubernetes import custom_objects
from prefect_kubernetes.credentials import KubernetesClusterConfig, KubernetesCredentials

from tests.fixtures_kube import KubeTwin, start_kube_twin

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# The suite persists results, so Prefect's default cache (inputs + flow run) would hand a
# second identical call inside one run its first result: a read after a write must not be
# cached, nor a create repeated on purpose.
create_namespaced_custom_object = custom_objects.create_namespaced_custom_object.with_options(
    cache_policy=NO_CACHE
)
delete_namespaced_custom_object = custom_objects.delete_namespaced_custom_object.with_options(
    cache_policy=NO_CACHE
)
get_namespaced_custom_object = custom_objects.get_namespaced_custom_object.with_options(
    cache_policy=NO_CACHE
)
list_namespaced_custom_object = custom_objects.list_namespaced_custom_object.with_options(
    cache_policy=NO_CACHE
)
replace_namespaced_custom_object = custom_objects.replace_namespaced_custom_object.with_options(
    cache_policy=NO_CACHE
)

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
WAIT = 15.0  # seconds any single watch event may take to arrive
# kubernetes clients send a dict patch body as JSON patch unless told otherwise, and a real
# API server refuses that: merge patches must say so.
MERGE = {"_content_type": "application/merge-patch+json"}


def pytorchjob(name: str, namespace: str, image: str = "registry.local/train:1") -> dict[str, Any]:
    container = {"name": "pytorch", "image": image, "command": ["python", "train.py"]}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace, "labels": {"team": "vision"}},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "restartPolicy": "OnFailure",
                    "template": {"spec": {"containers": [container]}},
                }
            }
        },
    }


def write_yaml_json(path: Path, *objects: dict[str, Any]) -> Path:
    # One YAML document per object (JSON is YAML). Not a `kind: List`: kubectl validates a
    # List client-side from the protobuf OpenAPI v2 schema, which the twin does not serve.
    path.write_text("\n---\n".join(json.dumps(o) for o in objects))
    return path


def fresh_namespace(twin: KubeTwin, tmp_path: Path, prefix: str = "t") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    manifest = write_yaml_json(
        tmp_path / f"{name}.json",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
    )
    twin.kubectl("create", "-f", str(manifest))
    return name


def credentials(twin: KubeTwin) -> KubernetesCredentials:
    return KubernetesCredentials(cluster_config=KubernetesClusterConfig.from_file(twin.kubeconfig))


# -- kubectl -------------------------------------------------------------------------------


def test_kubectl_lists_namespaces_and_creates_gets_and_deletes_a_deployment(
    kube_twin: KubeTwin, tmp_path: Path
):
    table = kube_twin.kubectl("get", "namespaces").stdout
    assert table.split()[:3] == ["NAME", "STATUS", "AGE"]
    assert any(line.split()[:2] == ["default", "Active"] for line in table.splitlines())

    if "staging" not in kube_twin.kubectl("get", "namespaces", "-o", "name").stdout.split():
        write_yaml_json(
            tmp_path / "ns.json",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "staging"}},
        )
        kube_twin.kubectl("create", "-f", str(tmp_path / "ns.json"))
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "api-gateway",
            "namespace": "staging",
            "labels": {"app": "api-gateway"},
        },
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "api-gateway"}},
            "template": {
                "metadata": {"labels": {"app": "api-gateway"}},
                "spec": {"containers": [{"name": "api", "image": "registry.local/api-gateway:1"}]},
            },
        },
    }
    manifest = write_yaml_json(tmp_path / "deploy.json", deployment)
    created = kube_twin.kubectl("create", "-f", str(manifest))
    assert created.stdout.strip() == "deployment.apps/api-gateway created"

    again = kube_twin.kubectl("create", "-f", str(manifest), check=False)
    assert again.returncode != 0 and "AlreadyExists" in again.stderr

    listed = json.loads(kube_twin.kubectl("get", "deploy", "-n", "staging", "-o", "json").stdout)
    [item] = [i for i in listed["items"] if i["metadata"]["name"] == "api-gateway"]
    assert item["spec"]["replicas"] == 2
    assert item["metadata"]["generation"] == 1 and item["metadata"]["uid"]
    assert int(item["metadata"]["resourceVersion"]) > 0

    printed = kube_twin.kubectl("get", "deploy", "-n", "staging").stdout
    assert printed.split()[:5] == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    assert "api-gateway" in printed and "0/2" in printed

    kube_twin.kubectl("scale", "deploy/api-gateway", "-n", "staging", "--replicas=3")
    scaled = json.loads(
        kube_twin.kubectl("get", "deploy", "api-gateway", "-n", "staging", "-o", "json").stdout
    )
    assert scaled["spec"]["replicas"] == 3 and scaled["metadata"]["generation"] == 2

    deleted = kube_twin.kubectl("delete", "-f", str(manifest))
    assert 'deployment.apps "api-gateway" deleted' in deleted.stdout
    gone = kube_twin.kubectl("get", "deploy", "api-gateway", "-n", "staging", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


async def test_the_product_reads_objects_of_any_api_group(kube_twin: KubeTwin, tmp_path: Path):
    """tasks.kube.read_object (what the demo shows production with): a Deployment and an
    Ingress through the one CustomObjects path; an absent object is None; the core group
    is refused before any call."""
    from core.errors import InvalidInput
    from tasks.kube import read_object

    namespace = fresh_namespace(kube_twin, tmp_path, "read")
    ingress = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": "web-canary",
            "namespace": namespace,
            "annotations": {"nginx.ingress.kubernetes.io/canary-weight": "25"},
        },
        "spec": {"rules": [{"host": "web.local"}]},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace, "labels": {"app": "web"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "registry.local/web:2"}]},
            },
        },
    }
    kube_twin.kubectl(
        "create", "-f", str(write_yaml_json(tmp_path / "o.json", ingress, deployment))
    )
    creds = credentials(kube_twin)

    read = await read_object(creds, "networking.k8s.io/v1", "ingresses", namespace, "web-canary")
    assert read is not None
    assert read["metadata"]["annotations"]["nginx.ingress.kubernetes.io/canary-weight"] == "25"
    web = await read_object(creds, "apps/v1", "deployments", namespace, "web")
    assert web is not None
    assert web["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/web:2"
    assert await read_object(creds, "apps/v1", "deployments", namespace, "absent") is None
    with pytest.raises(InvalidInput, match="core group"):
        await read_object(creds, "v1", "pods", namespace, "x")


def test_kubectl_gets_pytorchjobs_in_training(kube_twin: KubeTwin, tmp_path: Path):
    existing = kube_twin.kubectl("get", "namespaces", "-o", "name").stdout.split()
    objects: list[dict[str, Any]] = []
    if "namespace/training" not in existing:
        objects.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "training"}})
    objects.append(pytorchjob("vision-train-kubectl", "training"))
    kube_twin.kubectl("create", "-f", str(write_yaml_json(tmp_path / "job.json", *objects)))

    printed = kube_twin.kubectl("get", "pytorchjobs", "-n", "training").stdout
    assert printed.split()[:3] == ["NAME", "STATE", "AGE"]
    assert "vision-train-kubectl" in printed

    kube_twin.kubectl("delete", "pytorchjob", "vision-train-kubectl", "-n", "training")
    assert (
        "vision-train-kubectl"
        not in kube_twin.kubectl("get", "pytorchjobs", "-n", "training").stdout
    )


def test_the_api_requires_the_kubeconfig_token(kube_twin: KubeTwin):
    with httpx.Client(verify=str(kube_twin.ca_cert), timeout=5) as client:
        anonymous = client.get(f"{kube_twin.url}/api/v1/namespaces")
        assert anonymous.status_code == 401 and anonymous.json()["kind"] == "Status"
        wrong = client.get(
            f"{kube_twin.url}/api/v1/namespaces", headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        good = client.get(
            f"{kube_twin.url}/api/v1/namespaces",
            headers={"Authorization": f"Bearer {kube_twin.token}"},
        )
        assert good.status_code == 200 and good.json()["kind"] == "NamespaceList"


# -- prefect-kubernetes (custom objects) and kubernetes_asyncio watch ------------------------


async def collect_events(
    creds: KubernetesCredentials,
    namespace: str,
    resource_version: str,
    count: int,
    started: asyncio.Event,
) -> list[tuple[str, str, str]]:
    events: list[tuple[str, str, str]] = []
    async with creds.get_client("custom_objects") as api:
        stream = watch.Watch().stream(
            api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            resource_version=resource_version,
        )
        async with stream:
            started.set()
            async for event in stream:
                obj = event["object"]
                events.append(
                    (event["type"], obj["metadata"]["name"], obj["metadata"]["resourceVersion"])
                )
                if len(events) == count:
                    break
    return events


async def test_prefect_kubernetes_manages_a_pytorchjob(
    kube_twin: KubeTwin, tmp_path: Path, prefect_server
):
    namespace = fresh_namespace(kube_twin, tmp_path, "training")
    creds = credentials(kube_twin)

    @flow
    async def lifecycle() -> dict[str, Any]:
        listed = await list_namespaced_custom_object(
            creds, GROUP, VERSION, PLURAL, namespace=namespace
        )
        started = asyncio.Event()
        watcher = asyncio.create_task(
            collect_events(creds, namespace, listed["metadata"]["resourceVersion"], 3, started)
        )
        await asyncio.wait_for(started.wait(), WAIT)

        body = pytorchjob("vision-train", namespace)
        created = await create_namespaced_custom_object(
            creds, GROUP, VERSION, PLURAL, body, namespace=namespace
        )
        with pytest.raises(ApiException) as already:
            await create_namespaced_custom_object(
                creds, GROUP, VERSION, PLURAL, body, namespace=namespace
            )

        got = await get_namespaced_custom_object(
            creds, GROUP, VERSION, PLURAL, "vision-train", namespace=namespace
        )
        in_list = await list_namespaced_custom_object(
            creds, GROUP, VERSION, PLURAL, namespace=namespace, label_selector="team=vision"
        )

        newer = dict(got, spec={**got["spec"], "runPolicy": {"backoffLimit": 2}})
        replaced = await replace_namespaced_custom_object(
            creds, GROUP, VERSION, PLURAL, "vision-train", newer, namespace=namespace
        )
        with pytest.raises(ApiException) as stale:
            # ``got`` still carries the resourceVersion from before the replace.
            await replace_namespaced_custom_object(
                creds, GROUP, VERSION, PLURAL, "vision-train", got, namespace=namespace
            )

        deleted = await delete_namespaced_custom_object(
            creds, GROUP, VERSION, PLURAL, "vision-train", namespace=namespace
        )
        with pytest.raises(ApiException) as missing:
            await get_namespaced_custom_object(
                creds, GROUP, VERSION, PLURAL, "vision-train", namespace=namespace
            )
        events = await asyncio.wait_for(watcher, WAIT)
        return {
            "created": created,
            "already": already.value,
            "got": got,
            "in_list": in_list,
            "replaced": replaced,
            "stale": stale.value,
            "deleted": deleted,
            "missing": missing.value,
            "events": events,
        }

    out = await lifecycle()
    created = out["created"]
    assert created["metadata"]["uid"] and created["metadata"]["generation"] == 1
    assert (
        out["already"].status == 409
        and json.loads(out["already"].body)["reason"] == "AlreadyExists"
    )
    assert out["got"]["metadata"]["uid"] == created["metadata"]["uid"]
    assert [i["metadata"]["name"] for i in out["in_list"]["items"]] == ["vision-train"]
    assert out["replaced"]["spec"]["runPolicy"] == {"backoffLimit": 2}
    assert out["replaced"]["metadata"]["generation"] == 2
    assert out["stale"].status == 409 and json.loads(out["stale"].body)["reason"] == "Conflict"
    assert out["deleted"]["metadata"]["name"] == "vision-train"
    assert out["missing"].status == 404

    events = out["events"]
    assert [(t, n) for t, n, _ in events] == [
        ("ADDED", "vision-train"),
        ("MODIFIED", "vision-train"),
        ("DELETED", "vision-train"),
    ]
    versions = [int(rv) for _, _, rv in events]
    assert versions == sorted(versions) and len(set(versions)) == 3


async def test_a_resumed_watch_gets_the_events_it_missed(kube_twin: KubeTwin, tmp_path: Path):
    namespace = fresh_namespace(kube_twin, tmp_path, "resume")
    creds = credentials(kube_twin)
    async with creds.get_client("custom_objects") as api:
        before = await api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        await api.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, pytorchjob("a", namespace)
        )
        await api.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "a", {"metadata": {"labels": {"x": "1"}}}, **MERGE
        )
        await api.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, pytorchjob("b", namespace)
        )
    # The watch opens only now, from the version of the list taken before the changes.
    events = await asyncio.wait_for(
        collect_events(creds, namespace, before["metadata"]["resourceVersion"], 3, asyncio.Event()),
        WAIT,
    )
    assert [(t, n) for t, n, _ in events] == [("ADDED", "a"), ("MODIFIED", "a"), ("ADDED", "b")]


@pytest.fixture(scope="module")
def tuned_twin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeTwin]:
    """A private API-only twin with a 20-event history and bookmarks every 0.3 s."""
    with start_kube_twin(
        tmp_path_factory.mktemp("tuned-twin"),
        kube_event_history=20,
        kube_bookmark_seconds=0.3,
        components=["sandbox.kube.api"],
    ) as twin:
        yield twin


async def watch_lines(
    twin: KubeTwin, path: str, params: dict[str, str], count: int, started: asyncio.Event
) -> list[dict[str, Any]]:
    """The first ``count`` events of a raw watch stream (JSON lines)."""
    headers = {"Authorization": f"Bearer {twin.token}"}
    events: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(verify=str(twin.ca_cert), timeout=WAIT) as client,
        client.stream(
            "GET", f"{twin.url}{path}", params={**params, "watch": "true"}, headers=headers
        ) as response,
    ):
        assert response.status_code == 200
        started.set()
        async for line in response.aiter_lines():
            if line.strip():
                events.append(json.loads(line))
            if len(events) == count:
                break
    return events


async def test_watches_send_bookmarks_and_follow_label_selectors(
    tuned_twin: KubeTwin, tmp_path: Path
):
    namespace = fresh_namespace(tuned_twin, tmp_path, "selector")
    creds = credentials(tuned_twin)
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    async with creds.get_client("custom_objects") as api:
        rv = (await api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL))[
            "metadata"
        ]["resourceVersion"]
        started = asyncio.Event()
        params = {
            "resourceVersion": rv,
            "labelSelector": "stage=train",
            "allowWatchBookmarks": "true",
        }
        watcher = asyncio.create_task(watch_lines(tuned_twin, path, params, 4, started))
        await asyncio.wait_for(started.wait(), WAIT)
        job = pytorchjob("sel", namespace)
        job["metadata"]["labels"]["stage"] = "train"
        await api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
        await api.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, pytorchjob("other", namespace)
        )
        # Leaving the selection reads as DELETED to this watcher, coming back as ADDED.
        await api.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            "sel",
            {"metadata": {"labels": {"stage": "done"}}},
            **MERGE,
        )
        await api.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            "sel",
            {"metadata": {"labels": {"stage": "train"}}},
            **MERGE,
        )
        events = await asyncio.wait_for(watcher, WAIT)
    changes = [
        (e["type"], e["object"]["metadata"]["name"]) for e in events if e["type"] != "BOOKMARK"
    ]
    assert changes == [("ADDED", "sel"), ("DELETED", "sel"), ("ADDED", "sel")]

    # An idle watch gets bookmarks carrying the current resourceVersion.
    latest = (
        await asyncio.to_thread(
            tuned_twin.kubectl, "get", "pytorchjob", "sel", "-n", namespace, "-o", "json"
        )
    ).stdout
    bookmarks = await asyncio.wait_for(
        watch_lines(
            tuned_twin,
            path,
            {
                "resourceVersion": json.loads(latest)["metadata"]["resourceVersion"],
                "allowWatchBookmarks": "true",
            },
            2,
            asyncio.Event(),
        ),
        WAIT,
    )
    assert [e["type"] for e in bookmarks] == ["BOOKMARK", "BOOKMARK"]
    assert bookmarks[0]["object"]["kind"] == "PyTorchJob"
    assert int(bookmarks[0]["object"]["metadata"]["resourceVersion"]) >= int(
        json.loads(latest)["metadata"]["resourceVersion"]
    )


async def test_an_expired_watch_is_410_and_the_client_recovers_by_relisting(
    tuned_twin: KubeTwin, tmp_path: Path
):
    twin = tuned_twin
    namespace = fresh_namespace(twin, tmp_path, "expired")
    creds = credentials(twin)
    async with creds.get_client("custom_objects") as api:
        old = (await api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL))[
            "metadata"
        ]["resourceVersion"]
        await api.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, pytorchjob("busy", namespace)
        )
        for i in range(30):  # push the old version out of the 20-event history
            await api.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                "busy",
                {"metadata": {"annotations": {"step": str(i)}}},
                **MERGE,
            )

        with pytest.raises(ApiException) as expired:
            await asyncio.wait_for(collect_events(creds, namespace, old, 1, asyncio.Event()), WAIT)
        assert expired.value.status == 410

        # Recovery as an informer does it: list again, then watch from the list's version.
        relisted = await api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        assert [i["metadata"]["annotations"]["step"] for i in relisted["items"]] == ["29"]
        started = asyncio.Event()
        watcher = asyncio.create_task(
            collect_events(creds, namespace, relisted["metadata"]["resourceVersion"], 1, started)
        )
        await asyncio.wait_for(started.wait(), WAIT)
        await api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "busy")
        assert [(t, n) for t, n, _ in await asyncio.wait_for(watcher, WAIT)] == [
            ("DELETED", "busy")
        ]


async def test_objects_survive_a_twin_restart(tmp_path: Path):
    with start_kube_twin(tmp_path / "twin", components=["sandbox.kube.api"]) as twin:
        namespace = fresh_namespace(twin, tmp_path, "restart")
        creds = credentials(twin)
        async with creds.get_client("custom_objects") as api:
            created = await api.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, pytorchjob("durable", namespace)
            )
        port_before = twin.url

        twin.restart()

        assert twin.url == port_before  # the kubeconfig written before still works
        async with creds.get_client("custom_objects") as api:
            again = await api.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, "durable"
            )
            assert again["metadata"]["uid"] == created["metadata"]["uid"]
            assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
            patched = await api.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                "durable",
                {"metadata": {"labels": {"after": "restart"}}},
                **MERGE,
            )
            # resourceVersions keep counting up across the restart.
            assert int(patched["metadata"]["resourceVersion"]) > int(
                created["metadata"]["resourceVersion"]
            )
        assert "durable" in twin.kubectl("get", "pytorchjobs", "-n", namespace).stdout
