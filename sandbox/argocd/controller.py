"""The Argo CD application controller of the twin.

Applications are ``argoproj.io/v1alpha1`` objects in the Kubernetes twin's store. The
controller compares each app's rendered manifests (at the resolved target revision) with the
live objects, writes ``status`` (sync, health, resources, reconciledAt), auto-syncs and
self-heals automated apps, and runs sync operations: apply in Argo CD's order, prune,
wait for health, run PostSync hooks, record ``operationState`` and ``history``.

Everything runs on the twin's event loop; the store's calls are synchronous and atomic, so a
read-modify-write of an app's status with no ``await`` in between never loses an update.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sandbox.argocd import health as h
from sandbox.argocd.repo import RepoError, RepoServer
from sandbox.argocd.resources import (
    INSTANCE_LABEL,
    JSON,
    ResourceKey,
    hook_delete_policies,
    hook_types,
    images_of,
    in_sync,
    key_of,
    merged_for_apply,
    prepare,
    sort_key,
    with_last_applied,
)
from sandbox.argocd.windows import WindowError, can_sync, matches, sync_windows_answer
from sandbox.kube.store import RESOURCE_TYPES, ApiError, ObjectStore

log = logging.getLogger("sandbox.argocd")

APP_API_VERSION = "argoproj.io/v1alpha1"
APP_KIND = "Application"
PROJECT_KIND = "AppProject"

# gRPC codes, as grpc-gateway puts them in Argo CD's error bodies, and their HTTP statuses.
INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION = 3, 5, 7, 9
INTERNAL, UNAUTHENTICATED = 13, 16
HTTP_STATUS = {3: 400, 5: 404, 7: 403, 9: 400, 13: 500, 14: 503, 16: 401}

FAILED_TASKS = "one or more synchronization tasks completed unsuccessfully"
SUCCEEDED = "successfully synced (all tasks run)"
TERMINATED = "Operation terminated"
# Kinds never managed directly (controllers own them).
_SKIP_KINDS = {"Event", "Endpoints", "ReplicaSet", "Application", "AppProject", "Node"}


class ArgoError(Exception):
    """An API error in Argo CD's shape: ``{"error", "code", "message"}`` (grpc-gateway)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def body(self) -> JSON:
        return {"error": self.message, "code": self.code, "message": self.message}


class _Terminated(Exception):
    pass


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ControllerSettings:
    namespace: str = "argocd"
    poll_seconds: float = 3.0
    sync_timeout: float = 300.0
    history_limit: int = 10


@dataclass
class _Comparison:
    revision: str
    desired: list[JSON]
    hooks: list[JSON]
    extras: list[JSON]
    resources: list[JSON]
    sync_status: str
    health: h.Health


@dataclass
class _Op:
    """One running operation's in-memory bookkeeping."""

    results: list[JSON] = field(default_factory=list)
    terminate: bool = False


class Controller:
    def __init__(self, store: ObjectStore, repos: RepoServer, settings: ControllerSettings) -> None:
        self.store = store
        self.repos = repos
        self.settings = settings
        self._targets: dict[str, str] = {}
        self._ops: dict[str, _Op] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changed = asyncio.Condition()
        self._dirty = asyncio.Event()
        self._locks: dict[str, asyncio.Lock] = {}
        self._healed: dict[str, float] = {}

    # -- the app objects ---------------------------------------------------------------

    def get_app(self, name: str) -> JSON:
        try:
            return self.store.get(APP_API_VERSION, APP_KIND, self.settings.namespace, name)
        except ApiError as exc:
            if exc.status == 404:
                raise ArgoError(NOT_FOUND, f'applications.argoproj.io "{name}" not found') from exc
            raise

    def list_apps(self) -> list[JSON]:
        return self.store.list(APP_API_VERSION, APP_KIND, self.settings.namespace)

    def get_project(self, name: str) -> JSON:
        """The AppProject ``name`` (``default`` exists even when nobody stored it)."""
        try:
            return self.store.get(APP_API_VERSION, PROJECT_KIND, self.settings.namespace, name)
        except ApiError as exc:
            if exc.status != 404:
                raise
        if name == "default":
            return {
                "apiVersion": APP_API_VERSION,
                "kind": PROJECT_KIND,
                "metadata": {"name": "default", "namespace": self.settings.namespace},
                "spec": {"sourceRepos": ["*"], "destinations": [{"server": "*", "namespace": "*"}]},
            }
        raise ArgoError(NOT_FOUND, f'appprojects.argoproj.io "{name}" not found')

    def _blocked_by_window(self, app: JSON, *, manual: bool) -> bool:
        """Argo CD refuses a sync in a deny window (unless it lets manual syncs through) and
        outside every allow window; auto-sync is skipped then."""
        project = self.get_project(str((app.get("spec") or {}).get("project") or "default"))
        windows = [dict(w) for w in (project.get("spec") or {}).get("syncWindows") or []]
        assigned = [w for w in windows if matches(w, app)]
        try:
            return not can_sync(assigned, datetime.now(UTC), manual=manual)
        except WindowError as exc:
            raise ArgoError(INVALID_ARGUMENT, str(exc)) from exc

    def sync_windows(self, name: str) -> JSON:
        """``GET .../syncwindows``: the windows of the app's project that match it."""
        app = self.get_app(name)
        project = self.get_project(str((app.get("spec") or {}).get("project") or "default"))
        try:
            return sync_windows_answer(project, app)
        except WindowError as exc:
            raise ArgoError(INVALID_ARGUMENT, str(exc)) from exc

    def live_resource(self, name: str, query: dict[str, str]) -> JSON:
        """A live object of the app's resource tree (``GET .../resource``), as Argo CD gives it:
        managed by the app, or owned by something in its destination namespace."""
        app = self.get_app(name)
        group, version, kind = query.get("group", ""), query.get("version", ""), query.get("kind")
        namespace = query.get("namespace") or ""
        resource_name = query.get("resourceName") or ""
        if not kind or not resource_name or not version:
            raise ArgoError(INVALID_ARGUMENT, "kind, version and resourceName are required")
        key = ResourceKey(group, version, kind, namespace, resource_name)
        try:
            live = self._live(key)
        except ApiError as exc:
            raise ArgoError(INVALID_ARGUMENT, exc.message) from exc
        destination = (app["spec"].get("destination") or {}).get("namespace", "")
        meta = (live or {}).get("metadata", {})
        managed = (meta.get("labels") or {}).get(INSTANCE_LABEL) == name
        child = bool(meta.get("ownerReferences")) and meta.get("namespace") == destination
        if live is None or not (managed or child):
            raise ArgoError(
                NOT_FOUND,
                f"{group or 'v1'} {kind} {resource_name} not found as part of application {name}",
            )
        return live

    def resource_tree(self, name: str) -> JSON:
        """``GET .../resource-tree``: the app's managed objects and, in its destination
        namespace, what they own (ReplicaSets, Pods), as ``ResourceNode``s."""
        app = self.get_app(name)
        destination = (app["spec"].get("destination") or {}).get("namespace", "")
        nodes = [_tree_node(obj) for obj in self._tracked(name)]
        parents = {n["uid"]: n for n in nodes}
        for api_version, kind in (("apps/v1", "ReplicaSet"), ("v1", "Pod")):
            for obj in self.store.list(api_version, kind, destination or None):
                refs = (obj.get("metadata") or {}).get("ownerReferences") or []
                if any(r.get("uid") in parents for r in refs):
                    node = _tree_node(obj)
                    nodes.append(node)
                    parents[node["uid"]] = node
        return {"nodes": nodes, "orphanedNodes": [], "hosts": []}

    def _write_status(self, name: str, update: Callable[[JSON], None]) -> JSON:
        """Read, modify and write an app's status in one synchronous step."""
        app = self.get_app(name)
        status = copy.deepcopy(app.get("status") or {})
        update(status)
        if status == app.get("status"):
            return app
        return self.store.update_status(
            APP_API_VERSION, APP_KIND, self.settings.namespace, name, status
        )

    def _live(self, key: ResourceKey) -> JSON | None:
        try:
            return self.store.get(key.api_version, key.kind, key.namespace or None, key.name)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # -- comparison ----------------------------------------------------------------------

    def _tracked(self, app_name: str) -> list[JSON]:
        """Live top-level objects labelled as managed by the app (hooks excluded)."""
        found: list[JSON] = []
        for rt in RESOURCE_TYPES:
            if rt.kind in _SKIP_KINDS:
                continue
            for obj in self.store.list(rt.api_version, rt.kind, None, {INSTANCE_LABEL: app_name}):
                meta = obj.get("metadata", {})
                if meta.get("ownerReferences") or hook_types(obj):
                    continue
                found.append(obj)
        return found

    async def _render(self, app: JSON, sha: str) -> tuple[list[JSON], list[JSON]]:
        source = app["spec"]["source"]
        docs = await self.repos.render(source["repoURL"], sha, source.get("path", "."))
        name = app["metadata"]["name"]
        namespace = app["spec"].get("destination", {}).get("namespace") or "default"
        prepared = [prepare(d, app=name, namespace=namespace) for d in docs]
        desired = sorted((d for d in prepared if not hook_types(d)), key=sort_key)
        hooks = sorted((d for d in prepared if hook_types(d)), key=sort_key)
        return desired, hooks

    async def _compare(self, app: JSON, sha: str) -> _Comparison:
        desired, hooks = await self._render(app, sha)
        wanted = {key_of(d) for d in desired}
        extras = [o for o in self._tracked(app["metadata"]["name"]) if key_of(o) not in wanted]
        resources: list[JSON] = []
        healths: list[str] = []
        for obj, prune in [(d, False) for d in desired] + [(e, True) for e in extras]:
            key = key_of(obj)
            live = obj if prune else self._live(key)
            entry: JSON = {
                **key.as_dict(),
                "status": "OutOfSync" if prune or not in_sync(obj, live) else "Synced",
            }
            if prune:
                entry["requiresPruning"] = True
            health = h.resource_health(key.group, key.kind, live)
            if health is not None:
                entry["health"] = health.as_dict()
                healths.append(health.status)
            resources.append(entry)
        sync_status = "Synced" if all(r["status"] == "Synced" for r in resources) else "OutOfSync"
        app_health = h.aggregate(healths)
        message = next(
            (
                r["health"].get("message", "")
                for r in resources
                if r.get("health", {}).get("status") == app_health and app_health != h.HEALTHY
            ),
            "",
        )
        return _Comparison(
            sha, desired, hooks, extras, resources, sync_status, h.Health(app_health, message)
        )

    async def reconcile(self, name: str, *, fetch: bool, max_age: float = 0.0) -> JSON:
        """Compare the app with git and the cluster, write its status, maybe auto-sync.

        ``fetch``: read git again (a fetch younger than ``max_age`` seconds is reused).
        """
        app = self.get_app(name)
        source = app["spec"]["source"]
        try:
            if fetch or name not in self._targets:
                self._targets[name] = await self.repos.resolve(
                    source["repoURL"],
                    source.get("targetRevision") or "HEAD",
                    max_age=max_age if fetch else float("inf"),
                )
            comparison = await self._compare(app, self._targets[name])
        except RepoError as exc:
            error = str(exc)
            return self._write_status(name, lambda s: _comparison_error(s, error))

        def update(status: JSON) -> None:
            status.pop("conditions", None)
            status["sync"] = {
                "status": comparison.sync_status,
                "revision": comparison.revision,
                "comparedTo": {
                    "source": copy.deepcopy(source),
                    "destination": copy.deepcopy(app["spec"].get("destination", {})),
                },
            }
            status["health"] = comparison.health.as_dict()
            status["resources"] = comparison.resources
            status["summary"] = {"images": images_of(comparison.desired)}
            status["sourceType"] = "Kustomize"
            status.setdefault("history", [])
            if fetch or "reconciledAt" not in status:
                status["reconciledAt"] = now()

        app = self._write_status(name, update)
        self._maybe_auto_sync(app, comparison)
        return app

    def _maybe_auto_sync(self, app: JSON, comparison: _Comparison) -> None:
        automated = (app["spec"].get("syncPolicy") or {}).get("automated")
        name = app["metadata"]["name"]
        if not automated or app.get("operation") or name in self._tasks:
            return
        if comparison.sync_status == "Synced":
            return
        if self._blocked_by_window(app, manual=False):
            return  # as Argo CD: auto-sync waits for the sync window
        last = (app.get("status") or {}).get("operationState") or {}
        last_revision = (last.get("syncResult") or {}).get("revision") or (
            (last.get("operation") or {}).get("sync") or {}
        ).get("revision")
        if last_revision == comparison.revision:
            if last.get("phase") != "Succeeded":
                # As Argo CD: "Skipping auto-sync: failed previous sync attempt to <rev>".
                return
            if not automated.get("selfHeal"):
                return
            prune = bool(automated.get("prune"))
            drift = [
                r
                for r in comparison.resources
                if r["status"] == "OutOfSync" and (prune or not r.get("requiresPruning"))
            ]
            loop_time = asyncio.get_event_loop().time()
            if not drift or loop_time - self._healed.get(name, 0.0) < self.settings.poll_seconds:
                return
            self._healed[name] = loop_time
        retry = (app["spec"].get("syncPolicy") or {}).get("retry")
        sync = {
            "revision": comparison.revision,
            "prune": bool(automated.get("prune")),
            "syncOptions": list((app["spec"].get("syncPolicy") or {}).get("syncOptions") or []),
        }
        log.info("auto-sync of %s to %s", name, comparison.revision[:7])
        self._start(name, sync, {"username": "automated-sync", "automated": True}, retry)

    # -- requests from the API -----------------------------------------------------------

    def request_sync(self, name: str, body: JSON, username: str) -> JSON:
        app = self.get_app(name)
        revision = str(body.get("revision") or "")
        source = app["spec"]["source"]
        target = source.get("targetRevision") or "HEAD"
        automated = (app["spec"].get("syncPolicy") or {}).get("automated")
        if automated and not body.get("dryRun") and revision and revision != target:
            raise ArgoError(
                FAILED_PRECONDITION,
                f"Cannot sync to {revision}: auto-sync currently set to {target}",
            )
        if app.get("operation"):
            raise ArgoError(FAILED_PRECONDITION, "another operation is already in progress")
        if self._blocked_by_window(app, manual=True):
            raise ArgoError(PERMISSION_DENIED, "cannot sync: blocked by sync window")
        options = body.get("syncOptions") or {}
        items = options.get("items", []) if isinstance(options, dict) else list(options)
        sync: JSON = {
            "revision": revision or target,
            "prune": bool(body.get("prune")),
            "dryRun": bool(body.get("dryRun")),
            "syncOptions": [
                *items,
                *((app["spec"].get("syncPolicy") or {}).get("syncOptions") or []),
            ],
        }
        if body.get("strategy"):
            sync["syncStrategy"] = body["strategy"]
        if body.get("resources"):
            sync["resources"] = body["resources"]
        return self._start(name, sync, {"username": username}, body.get("retryStrategy"))

    def request_rollback(self, name: str, body: JSON, username: str) -> JSON:
        app = self.get_app(name)
        if (app["spec"].get("syncPolicy") or {}).get("automated"):
            raise ArgoError(
                FAILED_PRECONDITION, "rollback cannot be initiated when auto-sync is enabled"
            )
        if app.get("operation"):
            raise ArgoError(FAILED_PRECONDITION, "another operation is already in progress")
        if self._blocked_by_window(app, manual=True):
            raise ArgoError(PERMISSION_DENIED, "cannot sync: blocked by sync window")
        wanted = body.get("id")
        history = (app.get("status") or {}).get("history") or []
        entry = next((e for e in history if str(e.get("id")) == str(wanted)), None)
        if entry is None:
            raise ArgoError(
                INVALID_ARGUMENT,
                f"application {name} does not have deployment with id {wanted}",
            )
        sync = {
            "revision": entry["revision"],
            "prune": bool(body.get("prune")),
            "dryRun": bool(body.get("dryRun")),
            "source": entry.get("source") or app["spec"]["source"],
            "syncOptions": list((app["spec"].get("syncPolicy") or {}).get("syncOptions") or []),
        }
        return self._start(name, sync, {"username": username}, None)

    def terminate(self, name: str) -> None:
        app = self.get_app(name)
        if not app.get("operation"):
            raise ArgoError(
                INVALID_ARGUMENT, "Unable to terminate operation. No operation is in progress"
            )
        if name in self._ops:
            self._ops[name].terminate = True

        def update(status: JSON) -> None:
            status.setdefault("operationState", {})["phase"] = "Terminating"

        self._write_status(name, update)
        self._kick()

    def _start(self, name: str, sync: JSON, initiated_by: JSON, retry: JSON | None) -> JSON:
        operation: JSON = {"sync": sync, "initiatedBy": initiated_by}
        if retry:
            operation["retry"] = retry
        self.store.patch(
            APP_API_VERSION, APP_KIND, self.settings.namespace, name, {"operation": operation}
        )

        def update(status: JSON) -> None:
            status["operationState"] = {
                "operation": operation,
                "phase": "Running",
                "message": "",
                "startedAt": now(),
            }

        app = self._write_status(name, update)
        self._spawn(name)
        return app

    def _spawn(self, name: str) -> None:
        self._ops[name] = _Op()
        task = asyncio.create_task(self._run(name), name=f"argocd-op:{name}")
        self._tasks[name] = task
        task.add_done_callback(lambda _t: self._tasks.pop(name, None))

    # -- running an operation ------------------------------------------------------------

    async def _run(self, name: str) -> None:
        op = self._ops[name]
        phase, message = "Error", ""
        revision = ""
        try:
            app = self.get_app(name)
        except ArgoError:
            self._ops.pop(name, None)
            log.warning("application %s was deleted before its operation started", name)
            return
        operation = app.get("operation") or {}
        retry = operation.get("retry") or {}
        limit = int(retry.get("limit", 0) or 0)
        backoff = retry.get("backoff") or {}
        delay = _seconds(backoff.get("duration", "5s"))
        attempt = 0
        try:
            while True:
                op.results = []
                try:
                    revision = await self._sync_once(name, operation, op)
                    phase, message = "Succeeded", SUCCEEDED
                except _Terminated:
                    phase, message = "Failed", TERMINATED
                except _SyncFailure as exc:
                    phase, message, revision = "Failed", str(exc), exc.revision
                except (RepoError, ApiError) as exc:
                    phase, message = "Error", str(exc)
                if phase == "Succeeded" or op.terminate or attempt >= limit:
                    break
                attempt += 1
                retry_message = f"{message}. Retrying attempt #{attempt} at {now()}"
                self._update_op_state(name, message=retry_message, retryCount=attempt)
                await self._sleep_unless_terminated(op, delay)
                if op.terminate:
                    phase, message = "Failed", TERMINATED
                    break
                delay = min(
                    delay * float(backoff.get("factor", 2) or 2),
                    _seconds(backoff.get("maxDuration", "3m")),
                )
        except Exception as exc:  # the op must end with a phase even on a bug
            log.exception("operation on %s crashed", name)
            phase, message = "Error", f"{type(exc).__name__}: {exc}"
        finally:
            await self._finish(name, operation, phase, message, revision, op)

    async def _sleep_unless_terminated(self, op: _Op, seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        while not op.terminate and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)

    def _update_op_state(self, name: str, **fields: Any) -> None:
        op = self._ops.get(name)

        def update(status: JSON) -> None:
            state = status.setdefault("operationState", {})
            state.update(fields)
            if op is not None and op.results and "syncResult" in state:
                state["syncResult"]["resources"] = copy.deepcopy(op.results)

        with contextlib.suppress(ArgoError):
            self._write_status(name, update)

    async def _sync_once(self, name: str, operation: JSON, op: _Op) -> str:
        app = self.get_app(name)
        sync = operation.get("sync") or {}
        source = sync.get("source") or app["spec"]["source"]
        sha = await self.repos.resolve(source["repoURL"], sync.get("revision") or "HEAD")
        self._update_op_state(
            name,
            syncResult={"revision": sha, "source": copy.deepcopy(source), "resources": []},
            message="",
        )
        app_at_source = copy.deepcopy(app)
        app_at_source["spec"]["source"] = source
        desired, hooks = await self._render(app_at_source, sha)
        selected = _selector(sync.get("resources"))
        if selected is not None:
            desired = [d for d in desired if selected(key_of(d))]
            hooks = []
        namespace = app["spec"].get("destination", {}).get("namespace") or "default"
        options = set(sync.get("syncOptions") or [])
        dry_run = bool(sync.get("dryRun"))
        if "CreateNamespace=true" in options and not dry_run:
            self._ensure_namespace(namespace)
        await self._run_hooks(name, "PreSync", hooks, op, sha, dry_run)
        applied = self._apply(name, desired, op, dry_run)
        if selected is None:
            self._prune(name, desired, op, prune=bool(sync.get("prune")), dry_run=dry_run)
        self._publish(name, op)
        failed = [r for r in op.results if r["status"] == "SyncFailed"]
        if failed:
            raise _SyncFailure(
                f"one or more objects failed to apply, reason: {failed[0]['message']}", sha
            )
        post = [hk for hk in hooks if "PostSync" in hook_types(hk)]
        if post and not dry_run:
            await self._wait_healthy(name, applied, op, sha)
            await self._run_hooks(name, "PostSync", hooks, op, sha, dry_run)
        return sha

    def _ensure_namespace(self, namespace: str) -> None:
        if self._live(ResourceKey("", "v1", "Namespace", "", namespace)) is None:
            try:
                self.store.create(
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
                )
            except ApiError as exc:
                if exc.status != 409:  # created meanwhile: fine
                    raise

    def _apply(self, name: str, desired: list[JSON], op: _Op, dry_run: bool) -> list[JSON]:
        applied: list[JSON] = []
        suffix = " (dry run)" if dry_run else ""
        for obj in desired:
            key = key_of(obj)
            result: JSON = {
                **key.as_dict(),
                "status": "Synced",
                "hookPhase": "Running",
                "syncPhase": "Sync",
            }
            try:
                live = self._live(key)
                if live is None:
                    if not dry_run:
                        self.store.create(with_last_applied(obj))
                    result["message"] = f"{key.label()} created{suffix}"
                elif in_sync(obj, live):
                    result["message"] = f"{key.label()} unchanged{suffix}"
                else:
                    if not dry_run:
                        self.store.replace(merged_for_apply(live, obj))
                    result["message"] = f"{key.label()} configured{suffix}"
                applied.append(obj)
            except ApiError as exc:
                result.update(status="SyncFailed", hookPhase="Failed", message=exc.message)
            op.results.append(result)
        return applied

    def _prune(
        self, name: str, desired: list[JSON], op: _Op, *, prune: bool, dry_run: bool
    ) -> None:
        wanted = {key_of(d) for d in desired}
        for obj in self._tracked(name):
            key = key_of(obj)
            if key in wanted:
                continue
            result: JSON = {**key.as_dict(), "hookPhase": "Running", "syncPhase": "Sync"}
            if not prune:
                result.update(status="PruneSkipped", message="ignored (requires pruning)")
            else:
                if not dry_run:
                    self._delete_quietly(key)
                result.update(status="Pruned", message="pruned" + (" (dry run)" if dry_run else ""))
            op.results.append(result)

    def _publish(self, name: str, op: _Op, message: str | None = None) -> None:
        def update(status: JSON) -> None:
            state = status.setdefault("operationState", {})
            state.setdefault("syncResult", {})["resources"] = copy.deepcopy(op.results)
            if message is not None:
                state["message"] = message

        with contextlib.suppress(ArgoError):
            self._write_status(name, update)

    async def _wait(self, op: _Op, check: Callable[[], bool], what: str) -> None:
        """Re-test ``check`` on every cluster change until true, terminated or deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.sync_timeout
        while not check():
            if op.terminate:
                raise _Terminated
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _SyncFailure(f"timed out after {self.settings.sync_timeout:.0f}s {what}")
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(1.0, remaining))

    async def _wait_healthy(self, name: str, applied: list[JSON], op: _Op, sha: str) -> None:
        by_key = {
            (r["group"], r["kind"], r["namespace"], r["name"]): r
            for r in op.results
            if r.get("syncPhase") == "Sync"
        }

        def check() -> bool:
            pending: list[str] = []
            for obj in applied:
                key = key_of(obj)
                health = h.resource_health(key.group, key.kind, self._live(key))
                result = by_key.get((key.group, key.kind, key.namespace, key.name))
                if health is None or health.status == h.HEALTHY:
                    if result is not None:
                        result["hookPhase"] = "Succeeded"
                    continue
                if health.status == h.DEGRADED:
                    if result is not None:
                        result.update(hookPhase="Failed", message=health.message)
                    self._publish(name, op)
                    raise _SyncFailure(FAILED_TASKS, sha)
                pending.append(f"{key.group or 'v1'}/{key.kind}/{key.name}")
            if pending:
                self._publish(name, op, f"waiting for healthy state of {pending[0]}")
            return not pending

        await self._wait(op, check, "waiting for healthy resources")
        self._publish(name, op, "")

    async def _run_hooks(
        self, name: str, phase: str, hooks: list[JSON], op: _Op, sha: str, dry_run: bool
    ) -> None:
        mine = [hk for hk in hooks if phase in hook_types(hk)]
        if not mine or dry_run:
            return
        started: list[tuple[JSON, JSON]] = []
        for hook in mine:
            key = key_of(hook)
            if "BeforeHookCreation" in hook_delete_policies(hook):
                self._delete_quietly(key)
            result: JSON = {
                **key.as_dict(),
                "status": "Synced",
                "hookType": phase,
                "hookPhase": "Running",
                "syncPhase": phase,
                "message": "",
            }
            try:
                self.store.create(hook)
            except ApiError as exc:
                result.update(status="SyncFailed", hookPhase="Failed", message=exc.message)
            op.results.append(result)
            started.append((hook, result))
        self._publish(name, op, f"waiting for completion of hook {_hook_label(mine[0])}")

        def check() -> bool:
            done = True
            for hook, result in started:
                if result["hookPhase"] != "Running":
                    continue
                key = key_of(hook)
                health = h.resource_health(key.group, key.kind, self._live(key))
                if health is None or health.status == h.HEALTHY:
                    result.update(hookPhase="Succeeded", message=health.message if health else "")
                elif health.status == h.DEGRADED:
                    result.update(hookPhase="Failed", message=health.message)
                else:
                    done = False
            self._publish(name, op)
            return done

        await self._wait(op, check, f"waiting for {phase} hooks")
        for hook, result in started:
            policies = hook_delete_policies(hook)
            succeeded = result["hookPhase"] == "Succeeded"
            if ("HookSucceeded" in policies and succeeded) or (
                "HookFailed" in policies and not succeeded
            ):
                self._delete_quietly(key_of(hook))
        self._publish(name, op, "")
        if any(r["hookPhase"] != "Succeeded" for _, r in started):
            raise _SyncFailure(FAILED_TASKS, sha)

    def _delete_quietly(self, key: ResourceKey) -> None:
        """Delete with what it owns; already gone is fine."""
        try:
            self.store.delete(
                key.api_version,
                key.kind,
                key.namespace or None,
                key.name,
                propagation_policy="Background",
            )
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def _finish(
        self, name: str, operation: JSON, phase: str, message: str, revision: str, op: _Op
    ) -> None:
        finished = now()
        sync = operation.get("sync") or {}

        def update(status: JSON) -> None:
            state = status.setdefault("operationState", {})
            state.update(phase=phase, message=message, finishedAt=finished)
            result = state.setdefault("syncResult", {"resources": []})
            result["resources"] = copy.deepcopy(op.results)
            if revision:
                result["revision"] = revision
            if phase == "Succeeded" and not sync.get("dryRun") and revision:
                history = status.setdefault("history", [])
                history.append(
                    {
                        "id": (history[-1]["id"] + 1) if history else 0,
                        "revision": revision,
                        "deployedAt": finished,
                        "deployStartedAt": state.get("startedAt", finished),
                        "source": copy.deepcopy(result.get("source") or {}),
                        "initiatedBy": operation.get("initiatedBy", {}),
                    }
                )
                del history[: -self.settings.history_limit]

        try:
            self._write_status(name, update)
            with contextlib.suppress(RepoError, ApiError):
                await self.reconcile(name, fetch=True)
            self.store.patch(
                APP_API_VERSION, APP_KIND, self.settings.namespace, name, {"operation": None}
            )
        except ArgoError:
            log.warning("application %s vanished during its operation", name)
        finally:
            self._ops.pop(name, None)
        log.info("operation on %s ended %s: %s", name, phase, message)

    # -- background loops ----------------------------------------------------------------

    def _kick(self) -> None:
        self._dirty.set()

    async def watch_store(self) -> None:
        """Wake waiters and the health loop on every change in the cluster."""
        while True:
            try:
                async with self.store.subscribe() as events:
                    async for event in events:
                        if event.object.get("kind") == APP_KIND:
                            continue
                        async with self._changed:
                            self._changed.notify_all()
                        self._dirty.set()
            except ApiError:
                await asyncio.sleep(0.1)  # 410: fell behind; resubscribe

    async def poll_loop(self) -> None:
        """Refresh every app from git every ``poll_seconds`` (auto-sync, self-heal)."""
        while True:
            for app in self.list_apps():
                name = app["metadata"]["name"]
                async with self._lock(name):
                    try:
                        await self.reconcile(
                            name, fetch=True, max_age=self.settings.poll_seconds / 2
                        )
                    except ArgoError:
                        continue
                    except Exception:
                        log.exception("reconcile of %s failed", name)
            await asyncio.sleep(self.settings.poll_seconds)

    async def health_loop(self) -> None:
        """Re-compare apps (without fetching) soon after the cluster changes."""
        while True:
            await self._dirty.wait()
            await asyncio.sleep(0.3)  # debounce a burst of changes
            self._dirty.clear()
            for app in self.list_apps():
                name = app["metadata"]["name"]
                if self._lock(name).locked():
                    continue
                async with self._lock(name):
                    try:
                        await self.reconcile(name, fetch=False)
                    except ArgoError:
                        continue
                    except Exception:
                        log.exception("health update of %s failed", name)

    def resume_operations(self) -> None:
        """After a twin restart, finish what was running (Argo CD's controller does too)."""
        for app in self.list_apps():
            name = app["metadata"]["name"]
            if app.get("operation") and name not in self._tasks:
                self._spawn(name)
                phase = ((app.get("status") or {}).get("operationState") or {}).get("phase")
                if phase == "Terminating":
                    self._ops[name].terminate = True


class _SyncFailure(Exception):
    def __init__(self, message: str, revision: str = "") -> None:
        super().__init__(message)
        self.revision = revision


def _comparison_error(status: JSON, message: str) -> None:
    status["conditions"] = [
        {"type": "ComparisonError", "message": message, "lastTransitionTime": now()}
    ]
    status["sync"] = {**(status.get("sync") or {}), "status": "Unknown"}
    status["reconciledAt"] = now()


def _hook_label(hook: JSON) -> str:
    key = key_of(hook)
    return f"{key.group or 'v1'}/{key.kind}/{key.name}"


def _selector(resources: list[JSON] | None) -> Callable[[ResourceKey], bool] | None:
    if not resources:
        return None
    wanted = [
        (r.get("group", ""), r.get("kind", ""), r.get("namespace", ""), r.get("name", ""))
        for r in resources
    ]

    def select(key: ResourceKey) -> bool:
        return any(
            g == key.group and k == key.kind and n == key.name and (not ns or ns == key.namespace)
            for g, k, ns, n in wanted
        )

    return select


def _seconds(duration: Any) -> float:
    """``"5s"``, ``"3m"``, ``"1h"`` or a number of seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    text = str(duration).strip()
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text or 0)


def _tree_node(obj: JSON) -> JSON:
    """An object as a ``ResourceNode`` of Argo CD's application tree."""
    api_version = obj.get("apiVersion", "v1")
    group, _, version = api_version.rpartition("/")
    meta = obj.get("metadata") or {}
    node: JSON = {
        "group": group,
        "version": version,
        "kind": obj.get("kind", ""),
        "namespace": meta.get("namespace", ""),
        "name": meta.get("name", ""),
        "uid": meta.get("uid", ""),
        "resourceVersion": meta.get("resourceVersion", ""),
        "createdAt": meta.get("creationTimestamp"),
        "parentRefs": [
            {
                "group": r.get("apiVersion", "").rpartition("/")[0],
                "kind": r.get("kind", ""),
                "namespace": meta.get("namespace", ""),
                "name": r.get("name", ""),
                "uid": r.get("uid", ""),
            }
            for r in meta.get("ownerReferences") or []
        ],
    }
    if obj.get("kind") == "Pod":
        spec = obj.get("spec") or {}
        node["images"] = [c.get("image", "") for c in spec.get("containers") or []]
        node["info"] = [{"name": "Status Reason", "value": (obj.get("status") or {}).get("phase")}]
    return node
