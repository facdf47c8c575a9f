"""The kube twin's object store: the API-server behaviour clients and controllers rely on."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest

from sandbox.kube.store import (
    ApiError,
    ObjectStore,
    WatchEvent,
    merge_patch,
    parse_selector,
    resource_by_plural,
    resource_type,
)


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    s = ObjectStore(tmp_path / "kube")
    s.create(namespace("staging"))
    return s


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def deployment(name: str = "api", ns: str = "staging", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"replicas": 1},
    }


def reason(exc: pytest.ExceptionInfo[ApiError]) -> tuple[int, str]:
    return exc.value.status, exc.value.reason


def test_resource_types_resolve_by_kind_and_by_plural():
    rt = resource_type("kubeflow.org/v1", "PyTorchJob")
    assert (rt.plural, rt.namespaced, rt.api_version) == ("pytorchjobs", True, "kubeflow.org/v1")
    assert resource_by_plural("", "v1", "namespaces").namespaced is False
    assert resource_type("v1", "Pod").api_version == "v1"
    with pytest.raises(ApiError) as unknown:
        resource_type("example.com/v1", "Widget")
    assert unknown.value.status == 404


def test_create_fills_server_fields_and_the_built_in_namespaces_exist(store: ObjectStore):
    created = store.create(deployment())
    meta = created["metadata"]
    assert meta["uid"] and meta["generation"] == 1 and meta["creationTimestamp"].endswith("Z")
    assert int(meta["resourceVersion"]) == store.resource_version()
    names = [n["metadata"]["name"] for n in store.list("v1", "Namespace")]
    assert {"default", "kube-system", "kube-public", "staging"} <= set(names)
    assert store.get("v1", "Namespace", None, "staging")["status"] == {"phase": "Active"}


def test_create_refuses_duplicates_bad_names_and_missing_namespaces(store: ObjectStore):
    store.create(deployment())
    with pytest.raises(ApiError) as dup:
        store.create(deployment())
    assert reason(dup) == (409, "AlreadyExists")
    assert dup.value.to_status()["details"]["name"] == "api"

    with pytest.raises(ApiError) as bad:
        store.create(deployment(name="Not_A_Name"))
    assert reason(bad) == (422, "Invalid")
    assert bad.value.to_status()["details"]["causes"][0]["field"] == "metadata.name"

    no_ns = deployment()
    del no_ns["metadata"]["namespace"]
    with pytest.raises(ApiError) as missing:
        store.create(no_ns)
    assert reason(missing) == (422, "Invalid")

    with pytest.raises(ApiError) as absent:
        store.create(deployment(ns="nowhere"))
    assert reason(absent) == (404, "NotFound")
    assert 'namespaces "nowhere" not found' in absent.value.message


def test_generate_name_and_cluster_scoped_objects(store: ObjectStore):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "job-", "namespace": "staging"},
    }
    created = store.create(pod)
    assert created["metadata"]["name"].startswith("job-") and len(created["metadata"]["name"]) == 9
    ns = store.create({**namespace("other"), "metadata": {"name": "other", "namespace": "staging"}})
    assert "namespace" not in ns["metadata"]


def test_returned_objects_are_copies(store: ObjectStore):
    created = store.create(deployment())
    created["spec"]["replicas"] = 99
    fetched = store.get("apps/v1", "Deployment", "staging", "api")
    fetched["metadata"]["labels"]["x"] = "y"
    assert store.get("apps/v1", "Deployment", "staging", "api")["spec"]["replicas"] == 1
    assert "x" not in store.get("apps/v1", "Deployment", "staging", "api")["metadata"]["labels"]


def test_get_of_a_missing_object_is_not_found(store: ObjectStore):
    with pytest.raises(ApiError) as missing:
        store.get("apps/v1", "Deployment", "staging", "nope")
    assert reason(missing) == (404, "NotFound")
    assert missing.value.message == 'deployments.apps "nope" not found'


def test_label_and_field_selectors(store: ObjectStore):
    store.create(deployment("a", app="web", tier="front"))
    store.create(deployment("b", app="web", tier="back"))
    store.create(deployment("c", app="db"))

    def names(selector: Any = None, fields: str | None = None) -> list[str]:
        found = store.list("apps/v1", "Deployment", "staging", selector, fields)
        return [d["metadata"]["name"] for d in found]

    assert names("app=web") == ["a", "b"]
    assert names("app==web,tier!=back") == ["a"]
    assert names("tier in (front, back)") == ["a", "b"]
    assert names("tier notin (front)") == ["b", "c"]
    assert names("tier") == ["a", "b"]
    assert names("!tier") == ["c"]
    assert names({"app": "db"}) == ["c"]
    assert names(fields="metadata.name=b") == ["b"]
    assert names(fields="metadata.name!=b") == ["a", "c"]
    assert store.list("apps/v1", "Deployment", "default") == []
    with pytest.raises(ApiError) as bad:
        parse_selector("app=(web")
    assert reason(bad) == (400, "BadRequest")


def test_replace_checks_the_version_keeps_status_and_counts_generations(store: ObjectStore):
    created = store.create(deployment())
    store.update_status("apps/v1", "Deployment", "staging", "api", {"readyReplicas": 1})

    changed = dict(created, spec={"replicas": 3})
    with pytest.raises(ApiError) as stale:
        store.replace(changed)  # carries the version from before the status update
    assert reason(stale) == (409, "Conflict")

    changed["metadata"] = {**created["metadata"], "resourceVersion": None}
    replaced = store.replace(changed)
    assert replaced["spec"] == {"replicas": 3}
    assert replaced["status"] == {"readyReplicas": 1}  # status is not the client's to replace
    assert replaced["metadata"]["generation"] == 2
    assert replaced["metadata"]["uid"] == created["metadata"]["uid"]

    relabelled = dict(replaced, metadata={**replaced["metadata"], "labels": {"new": "1"}})
    after_labels = store.replace(relabelled)
    assert after_labels["metadata"]["generation"] == 2  # metadata is not desired state

    before = store.resource_version()
    assert store.replace(after_labels)["metadata"]["resourceVersion"] == str(before)
    assert store.resource_version() == before  # a no-op writes nothing


def test_merge_patch_follows_rfc_7386(store: ObjectStore):
    assert merge_patch({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"b": None, "e": 3}, "d": [2]}) == {
        "a": {"c": 2, "e": 3},
        "d": [2],
    }
    store.create(deployment(app="web"))
    patched = store.patch(
        "apps/v1",
        "Deployment",
        "staging",
        "api",
        {"metadata": {"labels": {"app": None, "x": "1"}}, "spec": {"replicas": 2}},
    )
    assert patched["metadata"]["labels"] == {"x": "1"}
    assert patched["spec"]["replicas"] == 2 and patched["metadata"]["generation"] == 2
    with pytest.raises(ApiError) as stale:
        store.patch(
            "apps/v1", "Deployment", "staging", "api", {"metadata": {"resourceVersion": "1"}}
        )
    assert reason(stale) == (409, "Conflict")


def test_status_updates_move_the_version_not_the_generation(store: ObjectStore):
    created = store.create(deployment())
    updated = store.update_status("apps/v1", "Deployment", "staging", "api", {"replicas": 1})
    assert updated["metadata"]["generation"] == 1
    assert int(updated["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])


def owned(kind: str, api_version: str, name: str, owner: dict[str, Any]) -> dict[str, Any]:
    ref = {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
    }
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": name, "namespace": "staging", "ownerReferences": [ref]},
    }


def test_delete_cascades_through_owner_references(store: ObjectStore):
    dep = store.create(deployment())
    rs = store.create(owned("ReplicaSet", "apps/v1", "api-1", dep))
    store.create(owned("Pod", "v1", "api-1-x", rs))
    store.create(deployment("other"))

    deleted = store.delete("apps/v1", "Deployment", "staging", "api")
    assert deleted["metadata"]["name"] == "api"
    assert store.list("apps/v1", "ReplicaSet", "staging") == []
    assert store.list("v1", "Pod", "staging") == []
    assert [d["metadata"]["name"] for d in store.list("apps/v1", "Deployment")] == ["other"]


def test_orphan_deletion_keeps_dependents_without_the_reference(store: ObjectStore):
    dep = store.create(deployment())
    store.create(owned("ReplicaSet", "apps/v1", "api-1", dep))
    store.delete("apps/v1", "Deployment", "staging", "api", propagation_policy="Orphan")
    [rs] = store.list("apps/v1", "ReplicaSet", "staging")
    assert "ownerReferences" not in rs["metadata"]


def test_deleting_a_namespace_deletes_everything_in_it(store: ObjectStore):
    store.create(deployment())
    store.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "staging"}}
    )
    store.delete("v1", "Namespace", None, "staging")
    assert store.list("apps/v1", "Deployment") == []
    assert store.list("v1", "ConfigMap") == []


def test_dry_runs_change_nothing(store: ObjectStore):
    before = store.resource_version()
    preview = store.create(deployment(), dry_run=True)
    assert preview["metadata"]["name"] == "api"
    with pytest.raises(ApiError):
        store.get("apps/v1", "Deployment", "staging", "api")
    store.create(deployment())
    store.delete("apps/v1", "Deployment", "staging", "api", dry_run=True)
    assert store.get("apps/v1", "Deployment", "staging", "api")
    assert store.resource_version() == before + 1


async def next_events(sub: Any, count: int) -> list[WatchEvent]:
    return [await asyncio.wait_for(sub.__anext__(), 5) for _ in range(count)]


async def test_subscribers_get_every_change_in_order_including_from_threads(store: ObjectStore):
    sub = store.subscribe()
    store.create(deployment())
    worker = threading.Thread(
        target=store.patch,
        args=("apps/v1", "Deployment", "staging", "api", {"spec": {"replicas": 2}}),
    )
    worker.start()
    worker.join()
    store.delete("apps/v1", "Deployment", "staging", "api")
    events = await next_events(sub, 3)
    assert [e.type for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    versions = [e.resource_version for e in events]
    assert versions == sorted(versions)
    assert events[2].object["metadata"]["resourceVersion"] == str(versions[2])
    await sub.aclose()


async def test_subscribing_from_an_old_version_replays_or_is_gone(tmp_path: Path):
    store = ObjectStore(tmp_path / "kube", event_history=10)
    store.create(namespace("staging"))
    start = store.resource_version()
    store.create(deployment())
    replay = store.subscribe(since=start)
    assert [e.type for e in await next_events(replay, 1)] == ["ADDED"]
    replay.close()

    for i in range(12):
        store.patch(
            "apps/v1", "Deployment", "staging", "api", {"metadata": {"labels": {"i": str(i)}}}
        )
    with pytest.raises(ApiError) as gone:
        store.subscribe(since=start)
    assert gone.value.status == 410 and gone.value.reason == "Expired"


async def test_state_and_history_survive_reopening(tmp_path: Path):
    first = ObjectStore(tmp_path / "kube")
    first.create(namespace("staging"))
    created = first.create(deployment())
    mark = first.resource_version()
    first.patch("apps/v1", "Deployment", "staging", "api", {"spec": {"replicas": 5}})
    first.close()

    second = ObjectStore(tmp_path / "kube")
    again = second.get("apps/v1", "Deployment", "staging", "api")
    assert again["metadata"]["uid"] == created["metadata"]["uid"] and again["spec"]["replicas"] == 5
    assert second.resource_version() == mark + 1
    resumed = second.subscribe(since=mark)  # a watch from before the restart resumes
    [event] = await next_events(resumed, 1)
    assert event.type == "MODIFIED" and event.object["spec"]["replicas"] == 5
    assert int(second.create(deployment("b"))["metadata"]["resourceVersion"]) == mark + 2


def widget_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"kind": "Widget", "plural": "widgets", "shortNames": ["wd"]},
            "versions": [{"name": "v1", "served": True, "storage": True}],
        },
    }


def test_a_crd_makes_its_kind_servable_until_it_is_deleted(tmp_path: Path):
    store = ObjectStore(tmp_path / "kube")
    widget = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w", "namespace": "default"},
    }
    try:
        store.create(widget_crd())
        assert resource_by_plural("example.com", "v1", "widgets").short_names == ("wd",)
        store.create(widget)
        ObjectStore(tmp_path / "kube")  # a restarted store serves the kind again from the CRD
        store.delete(
            "apiextensions.k8s.io/v1", "CustomResourceDefinition", None, "widgets.example.com"
        )
        with pytest.raises(ApiError) as gone:
            resource_type("example.com/v1", "Widget")
        assert gone.value.status == 404
    finally:
        with contextlib.suppress(ApiError):
            store.delete(
                "apiextensions.k8s.io/v1", "CustomResourceDefinition", None, "widgets.example.com"
            )

    bad = widget_crd()
    bad["spec"]["group"] = "apps"
    bad["spec"]["names"]["kind"] = "Deployment"
    bad["metadata"]["name"] = "widgets.apps"
    with pytest.raises(ApiError) as refused:
        store.create(bad)
    assert refused.value.status == 422 and "already served" in refused.value.message
