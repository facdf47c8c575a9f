"""Discovery documents of the Kubernetes twin, built from ``RESOURCE_TYPES``.

Only the legacy (unaggregated) discovery is served: kubectl asks for the aggregated form
first and falls back to ``/api/v1`` and ``/apis/<group>/<version>`` when the answer is plain
``application/json``, which is what these are.
"""

from __future__ import annotations

from typing import Any

from sandbox.kube.store import RESOURCE_TYPES, ResourceType

JSON = dict[str, Any]

# The server version reported by /version: the kubectl shipped in the venv is 1.37.
VERSION: JSON = {
    "major": "1",
    "minor": "37",
    "gitVersion": "v1.37.1-robotics-twin",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.25",
    "compiler": "gc",
    "platform": "linux/amd64",
}

_OBJECT_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def group_versions() -> dict[str, list[str]]:
    """Named groups (not the core group) and their versions, in registration order."""
    groups: dict[str, list[str]] = {}
    for rt in RESOURCE_TYPES:
        if rt.group and rt.version not in groups.setdefault(rt.group, []):
            groups[rt.group].append(rt.version)
    return groups


def api_versions(server_address: str) -> JSON:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def _group_doc(group: str, versions: list[str]) -> JSON:
    listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": listed, "preferredVersion": listed[0]}


def api_group_list() -> JSON:
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_group_doc(g, vs) for g, vs in group_versions().items()],
    }


def api_group(group: str) -> JSON | None:
    versions = group_versions().get(group)
    if not versions:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group_doc(group, versions)}


def _resource_entries(rt: ResourceType) -> list[JSON]:
    entry: JSON = {
        "name": rt.plural,
        "singularName": rt.singular,
        "namespaced": rt.namespaced,
        "kind": rt.kind,
        "verbs": _OBJECT_VERBS,
    }
    if rt.short_names:
        entry["shortNames"] = list(rt.short_names)
    if rt.categories:
        entry["categories"] = list(rt.categories)
    entries = [entry]
    for sub in rt.subresources:
        entry = {
            "name": f"{rt.plural}/{sub}",
            "singularName": "",
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": ["get", "patch", "update"],
        }
        if sub == "log":
            entry.update(kind="Pod", verbs=["get"])
        if sub == "scale":
            entry.update(kind="Scale", group="autoscaling", version="v1")
        entries.append(entry)
    return entries


def api_resource_list(group: str, version: str) -> JSON | None:
    types = [rt for rt in RESOURCE_TYPES if rt.group == group and rt.version == version]
    if not types:
        return None
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": [entry for rt in types for entry in _resource_entries(rt)],
    }


# -- OpenAPI v3 ------------------------------------------------------------------------------
# kubectl create/replace first asks /openapi/v3 whether the server validates fields itself
# (the ``fieldValidation`` query parameter on each kind's PATCH operation); when it does,
# kubectl sends ``fieldValidation=Strict`` instead of downloading schemas to validate
# client-side. The twin publishes just that: operations and parameters, no schemas.

_FIELD_VALIDATION = {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def openapi_v3_index() -> JSON:
    versions = [("", "v1")] + [(g, v) for g, vs in group_versions().items() for v in vs]
    return {
        "paths": {
            _gv_path(g, v): {"serverRelativeURL": f"/openapi/v3/{_gv_path(g, v)}?hash=twin"}
            for g, v in versions
        }
    }


def openapi_v3_group_version(group: str, version: str) -> JSON | None:
    types = [rt for rt in RESOURCE_TYPES if rt.group == group and rt.version == version]
    if not types:
        return None
    paths: JSON = {}
    for rt in types:
        prefix = f"/{_gv_path(group, version)}"
        scope = "/namespaces/{namespace}" if rt.namespaced else ""
        gvk = {"group": group, "version": version, "kind": rt.kind}
        operation = {
            "x-kubernetes-group-version-kind": gvk,
            "parameters": [_FIELD_VALIDATION],
            "responses": {"200": {"description": "OK"}},
        }
        paths[f"{prefix}{scope}/{rt.plural}/{{name}}"] = {
            "put": {**operation, "operationId": f"replace{rt.kind}"},
            "patch": {**operation, "operationId": f"patch{rt.kind}"},
        }
        paths[f"{prefix}{scope}/{rt.plural}"] = {
            "post": {**operation, "operationId": f"create{rt.kind}"},
        }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (robotics twin)", "version": VERSION["gitVersion"]},
        "paths": paths,
        "components": {},
    }
