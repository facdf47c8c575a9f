"""The Kubernetes twin's object store: every object of every kind, persisted in SQLite.

Objects are plain JSON dicts keyed by (group, kind, namespace, name). Each change takes the
next ``resourceVersion`` from one counter shared by all kinds (as etcd's revision is), is
written to disk in the same transaction as the counter and a bounded event history, and is
then handed to every subscriber in order. The HTTP API (``sandbox.kube.api``) and the
in-process controllers (runtime, Argo CD twin, PyTorchJob controller) both sit on it.

Thread model: every public method takes one re-entrant lock, so they may be called from the
event loop thread or from worker threads. Subscribers are fed with
``loop.call_soon_threadsafe`` on the loop they subscribed from.

Behaviour follows the real API server where a client can tell the difference: creating in a
missing namespace is 404, a stale ``resourceVersion`` is 409 Conflict, a no-op update bumps
nothing and emits no event, ``generation`` moves only when the desired state (anything but
metadata and status) changes, and deleting an owner (or a namespace) deletes what it owns.
Deletes through the HTTP API are graceful where the API server's are: a Pod bound to a
node (``spec.nodeName``, set by the runtime's kubelet) and not yet terminal is only marked
(``deletionTimestamp``, ``deletionGracePeriodSeconds``); the kubelet stops its containers
(SIGTERM, SIGKILL after the grace period) and then removes it with a grace period of 0.
``propagationPolicy=Foreground`` marks the owner (``deletionTimestamp`` and the
``foregroundDeletion`` finalizer), deletes what it owns, and removes the owner when the last
dependent is gone. Other finalizers are not modelled, and the twin's own controllers delete
at once (``graceful=False``).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import secrets
import sqlite3
import threading
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

JSON = dict[str, Any]
LogSource = Callable[[str, str, str | None, int | None, bool], AsyncIterator[bytes]]

# How many change events are kept for watch resumption; older resourceVersions get 410 Gone.
EVENT_HISTORY = 5000
# A subscriber that falls this far behind is cut off (its next read raises 410 Gone) rather
# than letting an abandoned or stuck watch grow memory without bound.
SUBSCRIBER_BACKLOG = 20000

_HTTP_REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Gone",
    415: "UnsupportedMediaType",
    422: "Invalid",
    500: "InternalError",
}


class ApiError(Exception):
    """An API failure that maps one-to-one onto a Kubernetes ``Status`` object."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        causes: list[JSON] | None = None,
        *,
        details: JSON | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.causes = list(causes or [])
        self.details = dict(details or {})

    def to_status(self) -> JSON:
        details = dict(self.details)
        if self.causes:
            details["causes"] = self.causes
        status: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.status,
        }
        if details:
            status["details"] = details
        return status

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.reason!r}, {self.message!r})"


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{rt.resource_label} "{name}" not found',
        details={"name": name, "group": rt.group, "kind": rt.plural},
    )


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    # kubectl's "get all" expands the "all" category.
    categories: tuple[str, ...] = ()
    # Subresources served besides the object itself ("status", "log").
    subresources: tuple[str, ...] = ("status",)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def resource_label(self) -> str:
        """How the API server names the resource in messages: ``deployments.apps``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


def _rt(
    api_version: str,
    kind: str,
    plural: str,
    *,
    namespaced: bool = True,
    short: tuple[str, ...] = (),
    all_: bool = False,
    sub: tuple[str, ...] = ("status",),
) -> ResourceType:
    group, _, version = api_version.rpartition("/")
    return ResourceType(
        group, version, kind, plural, namespaced, short, ("all",) if all_ else (), sub
    )


RESOURCE_TYPES: list[ResourceType] = [
    _rt("v1", "Namespace", "namespaces", namespaced=False, short=("ns",)),
    _rt("v1", "Node", "nodes", namespaced=False, short=("no",)),
    _rt("v1", "Pod", "pods", short=("po",), all_=True, sub=("status", "log")),
    _rt("v1", "Service", "services", short=("svc",), all_=True),
    _rt("v1", "Endpoints", "endpoints", short=("ep",), sub=()),
    _rt("v1", "ConfigMap", "configmaps", short=("cm",), sub=()),
    _rt("v1", "Secret", "secrets", sub=()),
    _rt("v1", "ServiceAccount", "serviceaccounts", short=("sa",), sub=()),
    _rt("v1", "Event", "events", short=("ev",), sub=()),
    _rt("v1", "PersistentVolumeClaim", "persistentvolumeclaims", short=("pvc",)),
    _rt("v1", "PersistentVolume", "persistentvolumes", namespaced=False, short=("pv",)),
    _rt(
        "apps/v1",
        "Deployment",
        "deployments",
        short=("deploy",),
        all_=True,
        sub=("status", "scale"),
    ),
    _rt("apps/v1", "ReplicaSet", "replicasets", short=("rs",), all_=True, sub=("status", "scale")),
    _rt(
        "apps/v1", "StatefulSet", "statefulsets", short=("sts",), all_=True, sub=("status", "scale")
    ),
    _rt("apps/v1", "DaemonSet", "daemonsets", short=("ds",), all_=True),
    _rt("batch/v1", "Job", "jobs", all_=True),
    _rt("batch/v1", "CronJob", "cronjobs", short=("cj",), all_=True),
    _rt("networking.k8s.io/v1", "Ingress", "ingresses", short=("ing",)),
    _rt("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", short=("netpol",), sub=()),
    _rt(
        "autoscaling/v2",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        short=("hpa",),
        all_=True,
    ),
    _rt("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets", short=("pdb",)),
    _rt("kubeflow.org/v1", "PyTorchJob", "pytorchjobs"),
    # Kubeflow Trainer v2 (v2.3.0) and the JobSet a TrainJob runs as (sandbox/trainjob.py).
    _rt("trainer.kubeflow.org/v1alpha1", "TrainJob", "trainjobs"),
    _rt("trainer.kubeflow.org/v1alpha1", "TrainingRuntime", "trainingruntimes", sub=()),
    _rt(
        "trainer.kubeflow.org/v1alpha1",
        "ClusterTrainingRuntime",
        "clustertrainingruntimes",
        namespaced=False,
        sub=(),
    ),
    _rt("jobset.x-k8s.io/v1alpha2", "JobSet", "jobsets"),
    _rt(
        "gateway.networking.k8s.io/v1",
        "GatewayClass",
        "gatewayclasses",
        namespaced=False,
        short=("gc",),
    ),
    _rt("gateway.networking.k8s.io/v1", "Gateway", "gateways", short=("gtw",)),
    _rt("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes"),
    _rt("argoproj.io/v1alpha1", "Application", "applications", short=("app", "apps")),
    _rt("argoproj.io/v1alpha1", "AppProject", "appprojects", short=("appproj",)),
    _rt("rbac.authorization.k8s.io/v1", "Role", "roles", sub=()),
    _rt("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", sub=()),
    _rt("rbac.authorization.k8s.io/v1", "ClusterRole", "clusterroles", namespaced=False, sub=()),
    _rt(
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        namespaced=False,
        sub=(),
    ),
    _rt("v1", "ResourceQuota", "resourcequotas", short=("quota",)),
    _rt("v1", "LimitRange", "limitranges", short=("limits",), sub=()),
    _rt(
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        namespaced=False,
        short=("crd", "crds"),
    ),
]

NAMESPACE_TYPE = RESOURCE_TYPES[0]
CRD_GROUP_KIND = ("apiextensions.k8s.io", "CustomResourceDefinition")
# Kinds served because a CustomResourceDefinition defines them (removed with it).
_CRD_DEFINED: set[tuple[str, str]] = set()
_TYPES_LOCK = threading.Lock()
# Namespaces a fresh cluster has.
BUILTIN_NAMESPACES = ("default", "kube-system", "kube-public")


def split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def resource_type(api_version: str, kind: str) -> ResourceType:
    group, version = split_api_version(api_version or "")
    for rt in RESOURCE_TYPES:
        if rt.group == group and rt.version == version and rt.kind == kind:
            return rt
    raise ApiError(
        404,
        "NotFound",
        f'the server could not find the requested resource: no kind "{kind}" is registered '
        f'for version "{api_version}"',
    )


def resource_by_plural(group: str, version: str, plural: str) -> ResourceType:
    for rt in RESOURCE_TYPES:
        if rt.group == group and rt.version == version and rt.plural == plural:
            return rt
    raise ApiError(404, "NotFound", "the server could not find the requested resource")


def register_resource_type(rt: ResourceType) -> None:
    """Serve one more kind in this process (idempotent; a CRD's kinds come through here)."""
    with _TYPES_LOCK:
        for i, existing in enumerate(RESOURCE_TYPES):
            if (existing.group, existing.version, existing.kind) == (rt.group, rt.version, rt.kind):
                RESOURCE_TYPES[i] = rt
                return
        RESOURCE_TYPES.append(rt)


def _unregister_crd_kind(group: str, kind: str) -> None:
    with _TYPES_LOCK:
        RESOURCE_TYPES[:] = [rt for rt in RESOURCE_TYPES if (rt.group, rt.kind) != (group, kind)]
        _CRD_DEFINED.discard((group, kind))


def crd_resource_types(crd: JSON) -> list[ResourceType]:
    """The kinds a CustomResourceDefinition serves (422 when it is not a usable one)."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group, kind, plural = spec.get("group"), names.get("kind"), names.get("plural")
    versions = [v.get("name") for v in spec.get("versions") or [] if v.get("served", True)]
    problems = [
        f"spec.{fld}: Required value"
        for fld, value in (("group", group), ("names.kind", kind), ("names.plural", plural))
        if not value
    ]
    if not versions:
        problems.append("spec.versions: must have at least one served version")
    if not problems and crd.get("metadata", {}).get("name") != f"{plural}.{group}":
        problems.append(
            f'metadata.name: Invalid value: must be spec.names.plural+"."+spec.group ({plural}.{group})'
        )
    if (
        not problems
        and (group, kind) not in _CRD_DEFINED
        and any((rt.group, rt.kind) == (group, kind) for rt in RESOURCE_TYPES)
    ):
        problems.append(f"spec.names.kind: {group}/{kind} is already served by the API server")
    if problems:
        raise ApiError(
            422,
            "Invalid",
            f'CustomResourceDefinition.apiextensions.k8s.io "{crd.get("metadata", {}).get("name")}" '
            f"is invalid: {'; '.join(problems)}",
            [
                {"reason": "FieldValueInvalid", "message": p, "field": p.split(":")[0]}
                for p in problems
            ],
        )
    namespaced = spec.get("scope", "Namespaced") == "Namespaced"
    short = tuple(names.get("shortNames") or ())
    return [
        ResourceType(
            str(group),
            str(v),
            str(kind),
            str(plural),
            namespaced,
            short,
            tuple(names.get("categories") or ()),
        )
        for v in versions
    ]


def _serve_crd(crd: JSON) -> None:
    types = crd_resource_types(crd)
    group, kind = types[0].group, types[0].kind
    _unregister_crd_kind(group, kind)
    for rt in types:
        register_resource_type(rt)
    with _TYPES_LOCK:
        _CRD_DEFINED.add((group, kind))


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK
    object: JSON
    resource_version: int = field(default=0, compare=False)


# ---------------------------------------------------------------------------------------
# Label and field selectors


_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SELECTOR_TERM = re.compile(
    r"""^\s*(?:
        (?P<neg>!)\s*(?P<nkey>[^\s!=,()]+) |
        (?P<skey>[^\s!=,()]+)\s+(?P<setop>in|notin)\s*\((?P<values>[^()]*)\) |
        (?P<ekey>[^\s!=,()]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=,()]*) |
        (?P<key>[^\s!=,()]+)
    )\s*$""",
    re.VERBOSE,
)

Requirement = tuple[str, str, frozenset[str]]  # key, operator, values


def _split_terms(selector: str) -> list[str]:
    """Split on commas that are not inside ``( )``."""
    terms: list[str] = []
    current: list[str] = []
    depth = 0
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(char)
    terms.append("".join(current))
    return [t for t in terms if t.strip()]


def parse_selector(selector: str | dict[str, str] | None) -> list[Requirement]:
    """Parse ``a=b,c!=d,e in (x,y),f notin (z),g,!h`` into requirements (400 if malformed)."""
    if selector is None:
        return []
    if isinstance(selector, dict):
        return [(k, "=", frozenset([v])) for k, v in selector.items()]
    requirements: list[Requirement] = []
    for term in _split_terms(selector):
        match = _SELECTOR_TERM.match(term)
        if not match:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term.strip()!r}")
        if match["nkey"]:
            requirements.append((match["nkey"], "!", frozenset()))
        elif match["skey"]:
            values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
            requirements.append((match["skey"], match["setop"], values))
        elif match["ekey"]:
            op = "!=" if match["op"] == "!=" else "="
            requirements.append((match["ekey"], op, frozenset([match["value"]])))
        else:
            requirements.append((match["key"], "exists", frozenset()))
    return requirements


def matches(labels: dict[str, str], requirements: Iterable[Requirement]) -> bool:
    for key, op, values in requirements:
        present = key in labels
        value = labels.get(key)
        if op == "=" and value not in values:
            return False
        if op == "!=" and present and value in values:
            return False
        if op == "in" and value not in values:
            return False
        if op == "notin" and present and value in values:
            return False
        if op == "exists" and not present:
            return False
        if op == "!" and present:
            return False
    return True


def _field_value(obj: JSON, path: str) -> str | None:
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if node is None or isinstance(node, dict | list):
        return None
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def field_matches(obj: JSON, requirements: Iterable[Requirement]) -> bool:
    """Field selectors (``metadata.name=x``, ``status.phase!=Running``) over dotted paths."""
    for path, op, values in requirements:
        value = _field_value(obj, path) or ""
        if op in ("=", "in") and value not in values:
            return False
        if op in ("!=", "notin") and value in values:
            return False
    return True


def selects(
    obj: JSON,
    labels: list[Requirement],
    fields: list[Requirement] | None = None,
) -> bool:
    return matches(obj.get("metadata", {}).get("labels") or {}, labels) and field_matches(
        obj, fields or []
    )


# ---------------------------------------------------------------------------------------
# JSON merge patch (RFC 7386)


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# ---------------------------------------------------------------------------------------
# Subscriptions


class Subscription:
    """An async iterator of every change after ``since``, in resourceVersion order.

    Close it (``aclose()``, or ``async with``) when done; an abandoned subscription is also
    dropped once garbage collected.
    """

    def __init__(self, store: ObjectStore, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self._loop = loop
        self._queue: deque[WatchEvent] = deque()
        self._wakeup = asyncio.Event()
        self._expired = False
        self._closed = False

    # Called on the subscriber's loop (via call_soon_threadsafe) or directly under the lock
    # while registering the backlog.
    def _push(self, event: WatchEvent) -> None:
        if self._closed:
            return
        if len(self._queue) >= SUBSCRIBER_BACKLOG:
            self._expired = True
            self._queue.clear()
        else:
            self._queue.append(event)
        self._wakeup.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> WatchEvent:
        while True:
            if self._expired:
                self.close()
                raise ApiError(
                    410,
                    "Expired",
                    "too old resource version: the watcher fell too far behind",
                )
            if self._queue:
                event = self._queue.popleft()
                # Each reader gets its own copy: events are shared by all subscribers and
                # the history, and a controller may well edit what it receives.
                return WatchEvent(event.type, copy.deepcopy(event.object), event.resource_version)
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._store._unsubscribe(self)
            self._wakeup.set()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# The store


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _desired(obj: JSON) -> JSON:
    """What ``generation`` tracks: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    grp TEXT NOT NULL, kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    uid TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (grp, kind, namespace, name)
);
CREATE TABLE IF NOT EXISTS events (rv INTEGER PRIMARY KEY, type TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

Key = tuple[str, str, str, str]  # group, kind, namespace ("" if cluster-scoped), name
# Aliases: inside ObjectStore the name ``list`` is the method.
Objects = list[JSON]
Changes = list[tuple[str, Key, JSON]]
Owned = list[tuple[Key, JSON]]


class ObjectStore:
    """Every object of the twin cluster, on disk under ``root`` (SQLite, WAL)."""

    def __init__(self, root: Path, *, event_history: int = EVENT_HISTORY) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self._lock = threading.RLock()
        self._db = sqlite3.connect(root / "store.sqlite3", check_same_thread=False)
        self._db.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;" + _SCHEMA)
        self._objects: dict[Key, JSON] = {}
        self._history: deque[WatchEvent] = deque(maxlen=max(1, event_history))
        self._subscribers: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self.log_source: LogSource | None = None
        self._load()
        self._ensure_builtin_namespaces()

    # -- loading and persistence ---------------------------------------------------------

    def _load(self) -> None:
        for grp, kind, namespace, name, body in self._db.execute(
            "SELECT grp, kind, namespace, name, body FROM objects"
        ):
            self._objects[(grp, kind, namespace, name)] = json.loads(body)
            if (grp, kind) == CRD_GROUP_KIND:
                _serve_crd(self._objects[(grp, kind, namespace, name)])
        row = self._db.execute("SELECT value FROM meta WHERE key = 'rv'").fetchone()
        self._rv = int(row[0]) if row else 0
        for rv, type_, body in self._db.execute(
            "SELECT rv, type, body FROM events ORDER BY rv DESC LIMIT ?", (self._history.maxlen,)
        ).fetchall()[::-1]:
            self._history.append(WatchEvent(type_, json.loads(body), rv))
        # Everything after the floor is in the history; older versions are Gone.
        self._floor = self._history[0].resource_version - 1 if self._history else self._rv
        self._trimmed_at = self._rv

    def _ensure_builtin_namespaces(self) -> None:
        for name in BUILTIN_NAMESPACES:
            if ("", "Namespace", "", name) not in self._objects:
                self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def close(self) -> None:
        with self._lock:
            for sub in list(self._subscribers):
                sub.close()
            self._db.close()

    def _commit(self, changes: Changes, dry_run: bool = False) -> Objects:
        """Give each change the next resourceVersion, persist all atomically, notify.

        A dry run (``?dryRun=All``) returns what would be stored and changes nothing.
        """
        if dry_run:
            return [copy.deepcopy(obj) for _, _, obj in changes]
        events: list[WatchEvent] = []
        first_rv = self._rv
        try:
            self._write(changes, events)
        except BaseException:
            self._rv = first_rv  # the transaction rolled back: so does the counter
            raise
        for (type_, key, obj), event in zip(changes, events, strict=True):
            if type_ == "DELETED":
                self._objects.pop(key, None)
            else:
                self._objects[key] = obj
            if len(self._history) == self._history.maxlen:
                self._floor = self._history[0].resource_version
            self._history.append(event)
            self._notify(event)
        return [copy.deepcopy(obj) for _, _, obj in changes]

    def _write(self, changes: Changes, events: list[WatchEvent]) -> None:
        with self._db:
            for type_, key, obj in changes:
                self._rv += 1
                obj["metadata"]["resourceVersion"] = str(self._rv)
                try:
                    body = json.dumps(obj, separators=(",", ":"))
                except (TypeError, ValueError) as exc:
                    raise ApiError(
                        400,
                        "BadRequest",
                        f"the object is not plain JSON ({exc}): send JSON values only",
                    ) from exc
                if type_ == "DELETED":
                    self._db.execute(
                        "DELETE FROM objects WHERE grp=? AND kind=? AND namespace=? AND name=?",
                        key,
                    )
                else:
                    self._db.execute(
                        "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?)",
                        (*key, obj["metadata"]["uid"], body),
                    )
                self._db.execute("INSERT INTO events VALUES (?, ?, ?)", (self._rv, type_, body))
                events.append(WatchEvent(type_, json.loads(body), self._rv))
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('rv', ?)", (str(self._rv),))
            if self._rv - self._trimmed_at >= 500:
                self._db.execute(
                    "DELETE FROM events WHERE rv <= ?",
                    (self._rv - (self._history.maxlen or EVENT_HISTORY),),
                )
                self._trimmed_at = self._rv

    def _notify(self, event: WatchEvent) -> None:
        for sub in list(self._subscribers):
            try:
                sub._loop.call_soon_threadsafe(sub._push, event)
            except RuntimeError:
                # The subscriber's event loop is closed: nobody can read it any more.
                self._subscribers.discard(sub)

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _key(rt: ResourceType, namespace: str | None, name: str) -> Key:
        return (rt.group, rt.kind, (namespace or "") if rt.namespaced else "", name)

    @staticmethod
    def _check_namespace_arg(rt: ResourceType, namespace: str | None) -> None:
        if rt.namespaced and not namespace:
            raise ApiError(
                400, "BadRequest", f"{rt.resource_label} are namespaced: give a namespace"
            )

    def _current(self, rt: ResourceType, namespace: str | None, name: str) -> tuple[Key, JSON]:
        self._check_namespace_arg(rt, namespace)
        key = self._key(rt, namespace, name)
        obj = self._objects.get(key)
        if obj is None:
            raise not_found(rt, name)
        return key, obj

    @staticmethod
    def _check_object(obj: Any) -> tuple[ResourceType, JSON]:
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "the object must be a JSON object")
        if not obj.get("apiVersion") or not obj.get("kind"):
            raise ApiError(400, "BadRequest", "Object 'Kind' or 'apiVersion' is missing: set both")
        rt = resource_type(obj["apiVersion"], obj["kind"])
        metadata = obj.get("metadata")
        if metadata is None:
            metadata = obj["metadata"] = {}
        if not isinstance(metadata, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        return rt, metadata

    @staticmethod
    def _validate_name(rt: ResourceType, metadata: JSON) -> None:
        name = metadata.get("name")
        causes: list[JSON] = []
        if not name:
            causes.append(
                {
                    "reason": "FieldValueRequired",
                    "message": "Required value: name or generateName is required",
                    "field": "metadata.name",
                }
            )
        elif not isinstance(name, str) or len(name) > 253 or not _NAME_RE.match(name):
            causes.append(
                {
                    "reason": "FieldValueInvalid",
                    "message": f"Invalid value: {name!r}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                    "field": "metadata.name",
                }
            )
        for fld in ("labels", "annotations"):
            value = metadata.get(fld)
            if value is not None and (
                not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values())
            ):
                causes.append(
                    {
                        "reason": "FieldValueInvalid",
                        "message": "Invalid value: values must be strings",
                        "field": f"metadata.{fld}",
                    }
                )
        if causes:
            raise ApiError(
                422,
                "Invalid",
                f'{rt.kind}.{rt.group or "core"} "{name}" is invalid: '
                + ", ".join(f"{c['field']}: {c['message']}" for c in causes),
                causes,
                details={"name": name, "group": rt.group, "kind": rt.kind},
            )

    def _require_namespace(self, rt: ResourceType, metadata: JSON) -> None:
        if not rt.namespaced:
            metadata.pop("namespace", None)
            return
        namespace = metadata.get("namespace")
        if not namespace:
            raise ApiError(
                422,
                "Invalid",
                f'{rt.kind} "{metadata.get("name")}" is invalid: metadata.namespace: Required value',
                [
                    {
                        "reason": "FieldValueRequired",
                        "message": "Required value",
                        "field": "metadata.namespace",
                    }
                ],
            )
        if ("", "Namespace", "", namespace) not in self._objects:
            raise ApiError(
                404,
                "NotFound",
                f'namespaces "{namespace}" not found',
                details={"name": namespace, "kind": "namespaces"},
            )

    # -- public API ----------------------------------------------------------------------

    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def create(self, obj: JSON, *, dry_run: bool = False) -> JSON:
        with self._lock:
            obj = copy.deepcopy(obj)
            rt, metadata = self._check_object(obj)
            if not metadata.get("name") and metadata.get("generateName"):
                metadata["name"] = f"{metadata['generateName']}{secrets.token_hex(3)[:5]}"
            self._validate_name(rt, metadata)
            self._require_namespace(rt, metadata)
            key = self._key(rt, metadata.get("namespace"), metadata["name"])
            if key in self._objects:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{rt.resource_label} "{metadata["name"]}" already exists',
                    details={"name": metadata["name"], "group": rt.group, "kind": rt.plural},
                )
            metadata.update(
                uid=str(uuid.uuid4()),
                generation=1,
                creationTimestamp=_now(),
            )
            for transient in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
                metadata.pop(transient, None)
            _fold_string_data((rt.group, rt.kind), obj)
            if rt.kind == "Namespace":
                obj.setdefault("spec", {"finalizers": ["kubernetes"]})
                obj["status"] = {"phase": "Active"}
            if (rt.group, rt.kind) == CRD_GROUP_KIND:
                crd_resource_types(obj)  # refuse a bad definition before storing it
            created = self._commit([("ADDED", key, obj)], dry_run)[0]
            if (rt.group, rt.kind) == CRD_GROUP_KIND and not dry_run:
                _serve_crd(created)
            return created

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> JSON:
        with self._lock:
            rt = resource_type(api_version, kind)
            return copy.deepcopy(self._current(rt, namespace, name)[1])

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        label_selector: str | dict[str, str] | None = None,
        field_selector: str | None = None,
    ) -> Objects:
        return self.list_with_version(api_version, kind, namespace, label_selector, field_selector)[
            0
        ]

    def list_with_version(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        label_selector: str | dict[str, str] | None = None,
        field_selector: str | None = None,
    ) -> tuple[Objects, int]:
        """The list and the resourceVersion it is consistent with (to start a watch from)."""
        labels = parse_selector(label_selector)
        fields = parse_selector(field_selector)
        with self._lock:
            rt = resource_type(api_version, kind)
            found = [
                copy.deepcopy(obj)
                for (grp, knd, ns, _), obj in sorted(self._objects.items())
                if grp == rt.group
                and knd == rt.kind
                and (not namespace or not rt.namespaced or ns == namespace)
                and selects(obj, labels, fields)
            ]
            return found, self._rv

    def replace(self, obj: JSON, *, dry_run: bool = False) -> JSON:
        with self._lock:
            obj = copy.deepcopy(obj)
            rt, metadata = self._check_object(obj)
            self._validate_name(rt, metadata)
            if not rt.namespaced:
                metadata.pop("namespace", None)
            key, current = self._current(rt, metadata.get("namespace"), metadata["name"])
            self._check_version(rt, metadata, current)
            obj["status"] = copy.deepcopy(current.get("status"))
            if obj["status"] is None:
                del obj["status"]
            return self._update(key, current, obj, dry_run=dry_run)

    def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        patch: JSON,
        *,
        dry_run: bool = False,
    ) -> JSON:
        if not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
        with self._lock:
            rt = resource_type(api_version, kind)
            key, current = self._current(rt, namespace, name)
            self._check_version(rt, patch.get("metadata") or {}, current)
            patched = merge_patch(current, patch)
            rt_after, metadata = self._check_object(patched)
            if rt_after != rt:
                raise ApiError(400, "BadRequest", "a patch cannot change apiVersion or kind")
            self._validate_name(rt, metadata)
            return self._update(key, current, patched, dry_run=dry_run)

    def update_status(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        status: JSON,
        *,
        dry_run: bool = False,
    ) -> JSON:
        with self._lock:
            rt = resource_type(api_version, kind)
            key, current = self._current(rt, namespace, name)
            updated = copy.deepcopy(current)
            updated["status"] = copy.deepcopy(status)
            return self._update(key, current, updated, status_only=True, dry_run=dry_run)

    def delete(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        *,
        propagation_policy: str | None = None,
        graceful: bool = False,
        grace_period_seconds: int | None = None,
        dry_run: bool = False,
    ) -> JSON:
        """Delete an object and (unless ``propagation_policy == "Orphan"``) all it owns.

        ``graceful`` (the HTTP API's deletes) marks bound, running pods instead of removing
        them, and honours ``propagation_policy == "Foreground"``; the result is then the
        marked object, still stored. Without it everything goes at once.
        """
        with self._lock:
            rt = resource_type(api_version, kind)
            key, current = self._current(rt, namespace, name)
            changes: Changes = []
            grace = grace_period_seconds if graceful else 0
            if (
                graceful
                and propagation_policy == "Foreground"
                and self._owned_by(current["metadata"]["uid"])
            ):
                self._foreground(key, current, changes, grace)
            else:
                if propagation_policy == "Orphan":
                    changes.extend(self._orphan(current["metadata"]["uid"]))
                self._collect_deletes(
                    key, current, changes, orphan=propagation_policy == "Orphan", grace=grace
                )
            self._release_foreground_owners(changes)
            results = self._commit(changes, dry_run)
            if (rt.group, rt.kind) == CRD_GROUP_KIND and not dry_run:
                spec = current.get("spec") or {}
                _unregister_crd_kind(
                    spec.get("group", ""), (spec.get("names") or {}).get("kind", "")
                )
            return next(
                r
                for (t, k, _), r in reversed(list(zip(changes, results, strict=True)))
                if k == key and t in ("DELETED", "MODIFIED")
            )

    def _foreground(self, key: Key, obj: JSON, changes: Changes, grace: int | None) -> None:
        """Mark the owner, delete its dependents; it goes when the last of them has gone."""
        marked = copy.deepcopy(obj)
        meta = marked["metadata"]
        meta.setdefault("deletionTimestamp", _now())
        meta.setdefault("deletionGracePeriodSeconds", 0)
        finalizers = list(meta.get("finalizers") or [])
        if FOREGROUND_FINALIZER not in finalizers:
            meta["finalizers"] = [*finalizers, FOREGROUND_FINALIZER]
        changes.append(("MODIFIED", key, marked))
        for dep_key, dep in self._owned_by(meta["uid"]):
            self._collect_deletes(dep_key, dep, changes, orphan=False, grace=grace)

    def _release_foreground_owners(self, changes: Changes) -> None:
        """Owners waiting in foreground deletion whose last dependent this change removes."""
        gone = {k for t, k, _ in changes if t == "DELETED"}
        checked: set[Key] = set()
        index = 0
        while index < len(changes):
            type_, _, obj = changes[index]
            index += 1
            if type_ != "DELETED":
                continue
            for ref in obj["metadata"].get("ownerReferences") or []:
                owner = next(
                    (
                        (k, o)
                        for k, o in self._objects.items()
                        if o["metadata"].get("uid") == ref.get("uid")
                    ),
                    None,
                )
                if owner is None or owner[0] in gone or owner[0] in checked:
                    continue
                owner_key, owner_obj = owner
                pending = next((o for t, k, o in changes if k == owner_key), owner_obj)
                if FOREGROUND_FINALIZER not in (pending["metadata"].get("finalizers") or []):
                    continue
                if all(k in gone for k, _ in self._owned_by(ref["uid"])):
                    checked.add(owner_key)
                    gone.add(owner_key)
                    changes.append(("DELETED", owner_key, copy.deepcopy(pending)))

    def subscribe(self, since: int | None = None) -> Subscription:
        """Every change after resourceVersion ``since`` (or from now), across all kinds.

        Raises ApiError 410 Gone at once when ``since`` is older than the kept history.
        Call from a running event loop; the events are delivered on that loop.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            if since is not None and since < self._floor:
                raise ApiError(
                    410,
                    "Expired",
                    f"too old resource version: {since} ({self._floor + 1})",
                )
            sub = Subscription(self, loop)
            if since is not None:
                for event in self._history:
                    if event.resource_version > since:
                        sub._push(event)
            self._subscribers.add(sub)
            return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    # -- internals of updates and deletes ------------------------------------------------

    @staticmethod
    def _check_version(rt: ResourceType, metadata: JSON, current: JSON) -> None:
        wanted = metadata.get("resourceVersion")
        if wanted and str(wanted) != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rt.resource_label} "{current["metadata"]["name"]}": '
                "the object has been modified; please apply your changes to the latest version "
                "and try again",
                details={"name": current["metadata"]["name"], "group": rt.group, "kind": rt.plural},
            )

    def _update(
        self,
        key: Key,
        current: JSON,
        new: JSON,
        *,
        status_only: bool = False,
        dry_run: bool = False,
    ) -> JSON:
        metadata = new["metadata"]
        old_meta = current["metadata"]
        # Fields the server owns: a client cannot change them.
        for owned in (
            "uid",
            "creationTimestamp",
            "generation",
            "name",
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ):
            if owned in old_meta:
                metadata[owned] = old_meta[owned]
        if key[2]:
            metadata["namespace"] = key[2]
        _fold_string_data(key[:2], new)
        if not status_only and _desired(new) != _desired(current):
            metadata["generation"] = int(old_meta.get("generation", 1)) + 1
        if new == current:
            return copy.deepcopy(current)  # a no-op: no new version, no event
        is_crd = key[:2] == CRD_GROUP_KIND
        if is_crd:
            crd_resource_types(new)
        updated = self._commit([("MODIFIED", key, new)], dry_run)[0]
        if is_crd and not dry_run:
            _serve_crd(updated)
        return updated

    def _owned_by(self, uid: str) -> Owned:
        return [
            (key, obj)
            for key, obj in self._objects.items()
            if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])
        ]

    def _orphan(self, uid: str) -> Changes:
        changes = []
        for key, obj in self._owned_by(uid):
            updated = copy.deepcopy(obj)
            refs = [r for r in updated["metadata"]["ownerReferences"] if r.get("uid") != uid]
            if refs:
                updated["metadata"]["ownerReferences"] = refs
            else:
                del updated["metadata"]["ownerReferences"]
            changes.append(("MODIFIED", key, updated))
        return changes

    def _collect_deletes(
        self,
        key: Key,
        obj: JSON,
        changes: Changes,
        *,
        orphan: bool,
        grace: int | None = 0,
    ) -> None:
        """``grace`` (seconds, None for the pod's own period) marks bound, running pods
        terminating instead of removing them; 0 removes everything at once."""
        if any(k == key and t == "DELETED" for t, k, _ in changes):
            return
        is_namespace = key[0] == "" and key[1] == "Namespace"
        if key[:2] == ("", "Pod"):
            period = graceful_period(obj, grace)
            if period > 0:
                changes.append(("MODIFIED", key, terminating(obj, period)))
                return
        if not is_namespace:
            # An owner goes first, then what it owns (background propagation).
            changes.append(("DELETED", key, copy.deepcopy(obj)))
        else:
            # A namespace goes last, after everything in it.
            for other_key, other in list(self._objects.items()):
                if other_key[2] == key[3]:
                    self._collect_deletes(other_key, other, changes, orphan=False)
        if not orphan:
            for dep_key, dep in self._owned_by(obj["metadata"]["uid"]):
                self._collect_deletes(dep_key, dep, changes, orphan=False, grace=grace)
        if key[:2] == CRD_GROUP_KIND:
            # Deleting a CRD deletes every object of its kind.
            spec = obj.get("spec") or {}
            defined = (spec.get("group"), (spec.get("names") or {}).get("kind"))
            for other_key, other in list(self._objects.items()):
                if other_key[:2] == defined:
                    self._collect_deletes(other_key, other, changes, orphan=False)
        if is_namespace:
            changes.append(("DELETED", key, copy.deepcopy(obj)))


def _fold_string_data(group_kind: tuple[str, str], obj: JSON) -> None:
    """A Secret's write-only ``stringData`` is stored base64-encoded in ``data``."""
    if group_kind != ("", "Secret"):
        return
    string_data = obj.pop("stringData", None) or {}
    if string_data:
        data = dict(obj.get("data") or {})
        for k, v in string_data.items():
            data[k] = base64.b64encode(str(v).encode()).decode()
        obj["data"] = data


FOREGROUND_FINALIZER = "foregroundDeletion"
DEFAULT_GRACE_SECONDS = 30


def graceful_period(pod: JSON, requested: int | None) -> int:
    """The grace period a pod delete gets, as the API server computes it: 0 (at once) for a
    pod no node runs (unbound) or one already Succeeded/Failed; else the request's, else the
    pod's ``terminationGracePeriodSeconds``, never longer than a deletion already under way."""
    if requested == 0:
        return 0
    spec = pod.get("spec") or {}
    if not spec.get("nodeName"):
        return 0
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return 0
    period = requested
    if period is None:
        period = int(spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS))
    already = pod["metadata"].get("deletionGracePeriodSeconds")
    if already is not None:
        period = min(period, int(already))
    return max(period, 1) if period > 0 else 0


def terminating(pod: JSON, period: int) -> JSON:
    """The pod marked for graceful deletion (what the kubelet acts on)."""
    marked = copy.deepcopy(pod)
    meta = marked["metadata"]
    if meta.get("deletionGracePeriodSeconds") != period or "deletionTimestamp" not in meta:
        deadline = datetime.now(UTC) + timedelta(seconds=period)
        meta["deletionTimestamp"] = deadline.strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["deletionGracePeriodSeconds"] = period
    return marked
