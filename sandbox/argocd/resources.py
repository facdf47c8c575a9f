"""What Argo CD does to manifests between rendering and applying: tracking, ordering, hooks,
and the live-versus-desired comparison. Pure functions over JSON dicts."""

from __future__ import annotations

import copy
import json
import secrets
from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]

# Argo CD's tracking: the label (``application.instanceLabelKey`` set to this key) lets the
# controller list what an app manages; the annotation is Argo CD 3's default tracking id.
INSTANCE_LABEL = "argocd.argoproj.io/instance"
TRACKING_ANNOTATION = "argocd.argoproj.io/tracking-id"
HOOK_ANNOTATION = "argocd.argoproj.io/hook"
HOOK_DELETE_POLICY = "argocd.argoproj.io/hook-delete-policy"
SYNC_WAVE = "argocd.argoproj.io/sync-wave"
# What ``kubectl apply`` (Argo CD's client-side apply) records for its three-way merge.
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

# gitops-engine's kind order within a wave (kinds not listed go after, by name).
KIND_ORDER = [
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodSecurityPolicy",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "StorageClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicationController",
    "ReplicaSet",
    "Deployment",
    "HorizontalPodAutoscaler",
    "StatefulSet",
    "Job",
    "CronJob",
    "IngressClass",
    "Ingress",
    "APIService",
]

CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "Node"}


@dataclass(frozen=True)
class ResourceKey:
    group: str
    version: str
    kind: str
    namespace: str
    name: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def as_dict(self) -> JSON:
        return {
            "group": self.group,
            "version": self.version,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
        }

    def label(self) -> str:
        """``deployment.apps/api-gateway``, as kubectl prints it."""
        kind = self.kind.lower()
        return f"{kind}.{self.group}/{self.name}" if self.group else f"{kind}/{self.name}"


def key_of(obj: JSON) -> ResourceKey:
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    meta = obj.get("metadata", {})
    return ResourceKey(group, version, obj.get("kind", ""), meta.get("namespace", ""), meta["name"])


def hook_types(obj: JSON) -> list[str]:
    """The Argo CD hook phases of a manifest (``[]`` for a normal resource)."""
    value = obj.get("metadata", {}).get("annotations", {}).get(HOOK_ANNOTATION, "")
    return [h.strip() for h in value.split(",") if h.strip()]


def hook_delete_policies(obj: JSON) -> set[str]:
    value = obj.get("metadata", {}).get("annotations", {}).get(HOOK_DELETE_POLICY, "")
    policies = {p.strip() for p in value.split(",") if p.strip()}
    # Argo CD's default when none is given.
    return policies or {"BeforeHookCreation"}


def sync_wave(obj: JSON) -> int:
    value = obj.get("metadata", {}).get("annotations", {}).get(SYNC_WAVE, "0")
    try:
        return int(value)
    except ValueError:
        return 0


def sort_key(obj: JSON) -> tuple[int, int, str, str]:
    kind = obj.get("kind", "")
    order = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
    return (sync_wave(obj), order, kind, obj.get("metadata", {}).get("name", ""))


def prepare(obj: JSON, *, app: str, namespace: str) -> JSON:
    """A rendered manifest as Argo CD applies it: in the app's namespace, tracked."""
    out = copy.deepcopy(obj)
    meta = out.setdefault("metadata", {})
    if not meta.get("name") and meta.get("generateName"):
        # A hook with generateName gets a fresh name per sync, as the API server would give.
        meta["name"] = f"{meta.pop('generateName')}{secrets.token_hex(3)[:5]}"
    if out.get("kind") not in CLUSTER_SCOPED and not meta.get("namespace"):
        meta["namespace"] = namespace
    key = key_of(out)
    meta.setdefault("labels", {})[INSTANCE_LABEL] = app
    meta.setdefault("annotations", {})[TRACKING_ANNOTATION] = (
        f"{app}:{key.group}/{key.kind}:{key.namespace}/{key.name}"
    )
    return out


def with_last_applied(desired: JSON) -> JSON:
    out = copy.deepcopy(desired)
    plain = copy.deepcopy(desired)
    plain["metadata"].get("annotations", {}).pop(LAST_APPLIED, None)
    out["metadata"]["annotations"][LAST_APPLIED] = json.dumps(
        plain, sort_keys=True, separators=(",", ":")
    )
    return out


def _three_way(live: Any, last: Any, desired: Any) -> Any:
    if not (isinstance(live, dict) and isinstance(desired, dict)):
        return copy.deepcopy(desired)
    last = last if isinstance(last, dict) else {}
    merged = {k: _three_way(live.get(k), last.get(k), v) for k, v in desired.items()}
    for key, value in live.items():
        # Keep what someone else set (a controller's annotation); drop what we set before
        # and no longer want.
        if key not in desired and key not in last:
            merged[key] = copy.deepcopy(value)
    return merged


def merged_for_apply(live: JSON, desired: JSON) -> JSON:
    """``kubectl apply``'s three-way merge, simplified: lists are replaced, not merged."""
    body = {k: v for k, v in live.items() if k != "status"}
    merged = _three_way(body, last_applied(live), with_last_applied(desired))
    merged["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
    return dict(merged)


def is_subset(desired: Any, live: Any) -> bool:
    """True when every field of ``desired`` has the same value in ``live``.

    This is the comparison the twin uses for sync status: fields the server or controllers
    add (status, defaults, uid) never make a resource OutOfSync; a changed field does.
    """
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return False
        return all(is_subset(v, live.get(k)) for k, v in desired.items() if v is not None)
    if isinstance(desired, list):
        if not isinstance(live, list) or len(desired) != len(live):
            return False
        return all(is_subset(d, lv) for d, lv in zip(desired, live, strict=True))
    if isinstance(desired, int | float) and not isinstance(desired, bool):
        return isinstance(live, int | float) and not isinstance(live, bool) and desired == live
    return bool(desired == live)


def _dropped(last: Any, desired: Any) -> bool:
    """True when ``last`` (what we applied before) has a field ``desired`` no longer has."""
    if isinstance(last, dict) and isinstance(desired, dict):
        return any(k not in desired or _dropped(v, desired[k]) for k, v in last.items())
    if isinstance(last, list) and isinstance(desired, list) and len(last) == len(desired):
        return any(_dropped(a, b) for a, b in zip(last, desired, strict=True))
    return False


def last_applied(live: JSON) -> JSON:
    annotations = live.get("metadata", {}).get("annotations") or {}
    try:
        value = json.loads(annotations.get(LAST_APPLIED, "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def in_sync(desired: JSON, live: JSON | None) -> bool:
    """Live has every desired field, and nothing we applied before and removed since."""
    if live is None:
        return False
    body = {k: v for k, v in desired.items() if k != "status"}
    return is_subset(body, live) and not _dropped(last_applied(live), body)


def images_of(objects: list[JSON]) -> list[str]:
    images: set[str] = set()
    for obj in objects:
        spec = obj.get("spec", {})
        template = spec.get("template", {}).get("spec", {}) if isinstance(spec, dict) else {}
        for container in template.get("containers", []) + template.get("initContainers", []):
            if container.get("image"):
                images.add(container["image"])
    return sorted(images)
