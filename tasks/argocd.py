"""Argo CD over its REST API (httpx), and the Prefect tasks the release uses.

The client retries what is transient the way the seed's Argo CD retry policy does (3 retries,
5 s, factor 2, at most 3 min between tries): 5xx answers, connection trouble, and "another
operation is already in progress". Every other 4xx is Argo CD saying no; it is raised at once
as :class:`ArgoCDRefused` with Argo CD's own message.

:meth:`ArgoCDClient.wait_synced` ends when the app is done and good at *our* commit or a
descendant of it (the conditions ``argocd app wait`` checks), and fails fast with a message
naming the resource when the app turns Degraded or a hook fails.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import anyio
import anyio.to_thread
import httpx
from prefect import task
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from core.analysis import canary_pod_trouble
from core.backoff import Backoff
from core.durations import parse_duration
from core.errors import ArgoCDRefused, ArgoCDUnavailable, InvalidInput, SyncFailed
from core.freeze import FreezeWindow, argocd_freezes
from core.ordering import MeasuredPod
from core.settings import get_settings
from tasks.logs import run_logger

IN_PROGRESS = "another operation is already in progress"
FAILED_PHASES = ("Failed", "Error")
IsDescendant = Callable[[str, str], bool]
"""``is_descendant(revision, commit)``: True when ``revision`` is ``commit`` or comes after it."""


class RetryPolicy(Backoff):
    """The seed's Argo CD retry policy: ``limit: 3``, ``backoff: {5s, factor 2, max 3m}``."""

    base_delay: float = Field(default=5.0, ge=0, description="Seconds before the first retry.")


class AppState(BaseModel):
    """What the release reads of an Application's status."""

    model_config = ConfigDict(frozen=True)
    name: str
    sync_status: str = Field(description="Synced | OutOfSync | Unknown")
    health: str = Field(
        description="Healthy | Progressing | Degraded | Suspended | Missing | Unknown"
    )
    health_message: str = ""
    revision: str = Field(default="", description="status.sync.revision")
    operation_running: bool = False
    phase: str = Field(default="", description="operationState.phase")
    phase_message: str = ""
    synced_revision: str = Field(default="", description="operationState.syncResult.revision")
    finished_at: datetime | None = None
    reconciled_at: datetime | None = None
    history_ids: list[int] = []

    @classmethod
    def from_app(cls, app: Mapping[str, Any]) -> AppState:
        status = app.get("status") or {}
        sync = status.get("sync") or {}
        health = status.get("health") or {}
        op_state = status.get("operationState") or {}
        result = op_state.get("syncResult") or {}
        return cls(
            name=str((app.get("metadata") or {}).get("name", "")),
            sync_status=str(sync.get("status", "Unknown")),
            health=str(health.get("status", "Unknown")),
            health_message=str(health.get("message", "")),
            revision=str(sync.get("revision", "")),
            operation_running=bool(app.get("operation")),
            phase=str(op_state.get("phase", "")),
            phase_message=str(op_state.get("message", "")),
            # syncResult.revision is the resolved commit; operation.sync.revision may be a branch.
            synced_revision=str(result.get("revision") or ""),
            finished_at=_time(op_state.get("finishedAt")),
            reconciled_at=_time(status.get("reconciledAt")),
            history_ids=[int(h["id"]) for h in status.get("history") or [] if "id" in h],
        )

    def summary(self) -> str:
        op = (
            "an operation running"
            if self.operation_running
            else f"last operation {self.phase or 'none'}"
        )
        return f"{self.sync_status}/{self.health} at {self.revision[:12] or '?'}, {op}" + (
            f" ({self.phase_message})" if self.phase_message else ""
        )


def _time(value: object) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _argo_message(response: httpx.Response) -> str:
    """Argo CD's error text (grpc-gateway's ``{"error", "code", "message"}``), else the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body)[:500]
    return str(body)[:500]


class SyncOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)
    app: str
    commit: str = Field(description="The commit we waited for.")
    revision: str = Field(description="The revision Argo CD synced (ours or a descendant).")
    synced_now: bool = Field(description="False when the app was already there (no new sync).")
    health: str


class SyncWindows(BaseModel):
    """What an app's Argo CD sync windows say at one moment."""

    model_config = ConfigDict(frozen=True)
    app: str
    freezes: list[FreezeWindow] = Field(
        default=[], description="The deny windows (and the wait for an allow window) as freezes."
    )
    can_sync: bool = Field(
        default=True,
        description="Argo CD lets a manual sync of the app run now (``canSync``): when False, "
        "no release can write to the app, break-glass or not.",
    )

    def scoped(self) -> list[tuple[str, FreezeWindow]]:
        return [("argocd", w) for w in self.freezes]


class ArgoCDClient:
    """A small async Argo CD client: applications get/sync/refresh/rollback/terminate."""

    def __init__(
        self,
        *,
        base_url: str,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        verify_tls: bool = True,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise InvalidInput(f"Argo CD URL {base_url!r} must start with http:// or https://")
        if not token and not (username and password):
            raise InvalidInput(
                "Argo CD needs a token or a username and password; store one in the Secret "
                "block named by ROBOTICS_CD_ARGOCD_TOKEN_BLOCK"
            )
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._login = (username, password) if username and password else None
        self.retry = retry or RetryPolicy()
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            base_url=self.base_url, verify=verify_tls, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> ArgoCDClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    # -- transport

    async def _session_token(self) -> str:
        if self._token:
            return self._token
        if self._login is None:  # excluded by the constructor; kept for the type checker
            raise InvalidInput("no Argo CD credentials")
        username, password = self._login
        response = await self._send(
            "POST", "/api/v1/session", json={"username": username, "password": password}, auth=False
        )
        token = response.json().get("token")
        if not token:
            raise ArgoCDRefused("Argo CD session login returned no token; check the credentials")
        self._token = str(token)
        return self._token

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        auth: bool = True,
    ) -> httpx.Response:
        """One request, with the retry policy for transient trouble."""
        last = ""
        for attempt in range(self.retry.retries + 1):
            headers = {"Authorization": f"Bearer {await self._session_token()}"} if auth else {}
            try:
                response = await self._client.request(
                    method, f"{self.base_url}{path}", params=params, json=json, headers=headers
                )
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    return response
                message = _argo_message(response)
                if response.status_code < 500 and IN_PROGRESS not in message:
                    raise ArgoCDRefused(self._refusal(method, path, response.status_code, message))
                last = f"HTTP {response.status_code}: {message}"
            if attempt < self.retry.retries:
                await asyncio.sleep(self.retry.delay(attempt))
        if IN_PROGRESS in last:
            raise ArgoCDRefused(
                f"{method} {path}: {last} (still, after {self.retry.retries} retries); "
                "wait for the running operation or terminate it"
            )
        raise ArgoCDUnavailable(
            f"Argo CD at {self.base_url} did not answer {method} {path} after "
            f"{self.retry.retries} retries ({last}); check that it is up and reachable"
        )

    @staticmethod
    def _refusal(method: str, path: str, status: int, message: str) -> str:
        hint = ""
        if status in (401, 403):
            hint = "; check the Argo CD token (Secret block) and its RBAC"
        elif status == 404:
            hint = "; check argocd_app in the catalog"
        return f"Argo CD refused {method} {path} (HTTP {status}): {message}{hint}"

    # -- applications

    async def get(
        self, app: str, refresh: Literal["normal", "hard"] | None = None
    ) -> dict[str, Any]:
        params = {"refresh": refresh} if refresh else None
        return dict((await self._send("GET", f"/api/v1/applications/{app}", params=params)).json())

    async def refresh(self, app: str, hard: bool = False) -> dict[str, Any]:
        return await self.get(app, refresh="hard" if hard else "normal")

    async def sync(
        self, app: str, revision: str | None = None, prune: bool = False
    ) -> dict[str, Any]:
        """Start a sync. For an automated app pass no revision (Argo CD refuses one)."""
        body: dict[str, Any] = {"prune": prune}
        if revision:
            body["revision"] = revision
        return dict(
            (await self._send("POST", f"/api/v1/applications/{app}/sync", json=body)).json()
        )

    async def rollback(self, app: str, id: int, prune: bool = False) -> dict[str, Any]:
        """Roll back to history entry ``id`` (refused by Argo CD while auto-sync is on)."""
        body = {"id": id, "prune": prune}
        return dict(
            (await self._send("POST", f"/api/v1/applications/{app}/rollback", json=body)).json()
        )

    async def sync_windows(self, app: str) -> dict[str, Any]:
        """``GET .../syncwindows`` (``ApplicationSyncWindowsResponse``): the windows Argo CD
        assigns to the app (``assignedWindows``), those open now (``activeWindows``), each
        with ``kind``, ``schedule``, ``duration``, ``manualSync``, and ``canSync`` (whether
        a manual sync may run now)."""
        response = await self._send("GET", f"/api/v1/applications/{app}/syncwindows")
        return dict(response.json())

    async def project(self, name: str) -> dict[str, Any]:
        """``GET /api/v1/projects/{name}``: the AppProject (its ``spec.syncWindows`` carry
        the ``timeZone`` and ``description`` the sync windows answer leaves out)."""
        return dict((await self._send("GET", f"/api/v1/projects/{name}")).json())

    async def freezes(self, app: str, now: datetime) -> SyncWindows:
        """What the app's sync windows say now: its freezes (``core.freeze.argocd_freezes``)
        and whether Argo CD lets a manual sync run (``canSync``)."""
        answer = await self.sync_windows(app)
        windows: list[dict[str, Any]] = []
        if answer.get("assignedWindows"):
            project = str(((await self.get(app)).get("spec") or {}).get("project") or "default")
            spec = (await self.project(project)).get("spec") or {}
            windows = [dict(w) for w in spec.get("syncWindows") or []]
        return SyncWindows(
            app=app,
            freezes=argocd_freezes(app, answer, windows, now),
            can_sync=answer.get("canSync") is not False,
        )

    async def terminate(self, app: str) -> None:
        await self._send("DELETE", f"/api/v1/applications/{app}/operation")

    async def live_resource(self, app: str, resource: Mapping[str, Any]) -> dict[str, Any] | None:
        """The live manifest of one of the app's resources, or None when Argo CD cannot say."""
        params = {
            "namespace": str(resource.get("namespace", "")),
            "resourceName": str(resource.get("name", "")),
            "version": str(resource.get("version", "")),
            "kind": str(resource.get("kind", "")),
            "group": str(resource.get("group", "")),
        }
        try:
            response = await self._send(
                "GET", f"/api/v1/applications/{app}/resource", params=params
            )
            manifest = response.json().get("manifest")
            return dict(json.loads(manifest)) if manifest else None
        except (ArgoCDRefused, ValueError):
            return None  # an older Argo CD or a twin without the endpoint: the health text stays

    async def resource_tree(self, app: str) -> dict[str, Any]:
        """``GET .../resource-tree``: the app's objects and what they own, as nodes."""
        response = await self._send("GET", f"/api/v1/applications/{app}/resource-tree")
        return dict(response.json())

    async def pods(self, app: str, *, track: str | None = None) -> list[dict[str, Any]]:
        """The live Pods of the app (optionally of one ``track`` label), without those being
        deleted: the resource tree's Pod nodes, each read through ``.../resource``."""
        tree = await self.resource_tree(app)
        found = []
        for node in tree.get("nodes") or []:
            if node.get("kind") != "Pod" or node.get("group"):
                continue
            live = await self.live_resource(app, {**node, "version": node.get("version", "v1")})
            if live is None:
                continue  # gone between the tree and the read
            meta = live.get("metadata") or {}
            if meta.get("deletionTimestamp"):
                continue
            if track is not None and (meta.get("labels") or {}).get("track") != track:
                continue
            found.append(live)
        return found

    # -- waiting

    async def wait_operation_done(
        self, app: str, *, deadline: float, poll_interval: float = 2.0
    ) -> dict[str, Any]:
        """Wait until ``app`` has no operation running; the app as it then is."""
        ends = time.monotonic() + deadline
        while True:
            current = await self.get(app)
            if not current.get("operation"):
                return current
            remaining = ends - time.monotonic()
            if remaining <= 0:
                raise SyncFailed(
                    f"{app}: an operation is still running after {deadline:.0f}s: "
                    f"{AppState.from_app(current).summary()}; terminate it or wait"
                )
            await asyncio.sleep(min(poll_interval, remaining))

    async def sync_and_wait(
        self,
        app: str,
        commit: str,
        *,
        automated: bool,
        deadline: float,
        is_descendant: IsDescendant | None = None,
        branch: str = "main",
        poll_interval: float = 2.0,
        log: Callable[..., None] = lambda *args: None,
    ) -> SyncOutcome:
        """Sync ``app`` unless it already runs ``commit`` (or a descendant); wait until good.

        An operation already running (the auto-sync of our commit, or an older one) is let
        end first; then, unless the app is at our revision, a sync starts: without a revision
        for an automated app (Argo CD refuses one), the branch head for a manual one.
        """
        check = is_descendant or (lambda revision, target: revision == target)
        ends = time.monotonic() + deadline

        def left() -> float:
            return max(0.0, ends - time.monotonic())

        current = await (self.refresh(app) if automated else self.get(app))
        if current.get("operation"):
            log("%s: an operation is already running; waiting for it to end", app)
            current = await self.wait_operation_done(
                app, deadline=left(), poll_interval=poll_interval
            )
        synced_now = False
        revision = AppState.from_app(current).synced_revision
        at_ours = bool(revision) and await anyio.to_thread.run_sync(check, revision, commit)
        if await anyio.to_thread.run_sync(is_done_and_good, current, commit, check):
            log("%s already runs %s: no sync", app, commit[:12])
        elif not at_ours:
            try:
                await self.sync(app, revision=None if automated else branch)
                synced_now = True
            except ArgoCDRefused as exc:
                if IN_PROGRESS not in str(exc):
                    raise
                # The auto-sync (or a person) started one meanwhile: wait for it instead.
                log("%s: %s; waiting for that operation", app, IN_PROGRESS)
        state = await self.wait_synced(
            app, commit, is_descendant=check, deadline=left(), poll_interval=poll_interval
        )
        log("%s Synced and Healthy at %s", app, state.synced_revision[:12])
        return SyncOutcome(
            app=app,
            commit=commit,
            revision=state.synced_revision,
            synced_now=synced_now,
            health=state.health,
        )

    async def wait_synced(
        self,
        app: str,
        commit: str,
        *,
        is_descendant: IsDescendant,
        deadline: float,
        poll_interval: float = 2.0,
    ) -> AppState:
        """Wait until ``app`` is done and good at ``commit`` or a descendant, or fail fast.

        Good: no operation running, the last one Succeeded at our revision (or a later one),
        ``reconciledAt >= finishedAt``, Synced and Healthy. Fails (SyncFailed) when the app
        turns Degraded at our revision, our operation fails (naming the failed hook or
        resource), or ``deadline`` seconds pass.
        """
        known: dict[str, bool] = {}

        async def ours(revision: str) -> bool:
            if not revision:
                return False
            if revision == commit:
                return True
            if revision not in known:
                # The check speaks git: keep it off the event loop.
                known[revision] = await anyio.to_thread.run_sync(is_descendant, revision, commit)
            return known[revision]

        ends = time.monotonic() + deadline
        state: AppState | None = None
        while True:
            raw = await self.get(app)
            state = AppState.from_app(raw)
            if await ours(state.synced_revision):
                await self._fail_fast(app, raw, state, commit)
                if _done_and_good(state):
                    return state
            remaining = ends - time.monotonic()
            if remaining <= 0:
                raise SyncFailed(
                    f"{app} did not become Synced and Healthy at {commit[:12]} (or a later "
                    f"commit) within {deadline:.0f}s: {state.summary()}"
                )
            await asyncio.sleep(min(poll_interval, remaining))

    async def _fail_fast(
        self, app: str, raw: Mapping[str, Any], state: AppState, commit: str
    ) -> None:
        status = raw.get("status") or {}
        results = ((status.get("operationState") or {}).get("syncResult") or {}).get(
            "resources"
        ) or []
        failed = [
            r for r in results if r.get("hookPhase") == "Failed" or r.get("status") == "SyncFailed"
        ]
        if failed or (not state.operation_running and state.phase in FAILED_PHASES):
            details = [await self._describe(app, r, hook=bool(r.get("hookType"))) for r in failed]
            raise SyncFailed(
                f"{app} sync of {state.synced_revision[:12]} (for {commit[:12]}) failed: "
                + ("; ".join(details) or state.phase_message or state.phase)
                + _next_step(app)
            )
        if not state.operation_running and state.health == "Degraded":
            degraded = [
                r
                for r in status.get("resources") or []
                if (r.get("health") or {}).get("status") == "Degraded"
            ]
            details = [await self._describe(app, r) for r in degraded]
            raise SyncFailed(
                f"{app} is Degraded at {state.synced_revision[:12]} (for {commit[:12]}): "
                + ("; ".join(details) or state.health_message or "no resource named")
                + _next_step(app)
            )

    async def _describe(self, app: str, resource: Mapping[str, Any], *, hook: bool = False) -> str:
        """``<hook >Kind ns/name: message (reason from the live object's conditions)``."""
        where = f"{resource.get('kind', '?')} {resource.get('namespace', '')}/{resource.get('name', '?')}"
        message = str(
            resource.get("message") or (resource.get("health") or {}).get("message") or ""
        )
        reason = ""
        if resource.get("kind") == "Deployment":
            live = await self.live_resource(app, resource)
            reason = _deployment_reason(live) if live else _reason_from_health(message)
        text = f"{'hook ' if hook else ''}{where}: {message or 'failed'}"
        return f"{text} ({reason})" if reason and reason not in text else text


def _deployment_reason(live: Mapping[str, Any]) -> str:
    for cond in (live.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            return f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    return ""


def _reason_from_health(message: str) -> str:
    # Argo CD's Deployment health check says exactly this for reason ProgressDeadlineExceeded.
    return "ProgressDeadlineExceeded" if "exceeded its progress deadline" in message else ""


def _next_step(app: str) -> str:
    return f"; see `argocd app get {app}` (or the Argo CD UI) and the pods' logs"


def _done_and_good(state: AppState) -> bool:
    return (
        not state.operation_running
        and state.phase == "Succeeded"
        and state.sync_status == "Synced"
        and state.health == "Healthy"
        and state.finished_at is not None
        and state.reconciled_at is not None
        and state.reconciled_at >= state.finished_at
    )


def is_done_and_good(app: Mapping[str, Any], commit: str, is_descendant: IsDescendant) -> bool:
    """True when the app already runs ``commit`` (or a descendant) Synced and Healthy."""
    state = AppState.from_app(app)
    revision = state.synced_revision
    return (
        bool(revision)
        and (revision == commit or is_descendant(revision, commit))
        and _done_and_good(state)
    )


# --- from settings ------------------------------------------------------------------------


class ArgoCDCredentials(BaseModel):
    """Where Argo CD is and how to log in (a token, or a username and password for a
    session): the one way the product builds an :class:`ArgoCDClient` (``get_client``).
    Secrets are ``SecretStr``: a logged credentials object never shows them."""

    model_config = ConfigDict(frozen=True)
    base_url: str
    token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    verify_tls: bool = True

    @classmethod
    async def aload(cls, block_name: str | None = None) -> ArgoCDCredentials:
        """From settings: the URL, TLS verification, and the Secret block (a token string,
        or ``{"username": ..., "password": ...}``)."""
        settings = get_settings()
        name = block_name or settings.argocd_token_block
        try:
            secret: Secret[Any] = await Secret.aload(name)
        except ValueError as exc:
            raise InvalidInput(
                f"no Secret block {name!r} with the Argo CD token; create it "
                '(a token string, or {"username": ..., "password": ...})'
            ) from exc
        value: object = secret.get()
        where = {"base_url": settings.argocd_url, "verify_tls": settings.argocd_verify_tls}
        if isinstance(value, Mapping):
            return cls(
                **where,
                username=str(value.get("username", "")),
                password=SecretStr(str(value.get("password", ""))),
            )
        return cls(**where, token=SecretStr(str(value)))

    def get_client(self, *, retry: RetryPolicy | None = None) -> ArgoCDClient:
        return ArgoCDClient(
            base_url=self.base_url,
            token=self.token.get_secret_value() if self.token else None,
            username=self.username,
            password=self.password.get_secret_value() if self.password else None,
            verify_tls=self.verify_tls,
            retry=retry,
        )


async def client_from_settings(*, retry: RetryPolicy | None = None) -> ArgoCDClient:
    """The client of settings' credentials."""
    return (await ArgoCDCredentials.aload()).get_client(retry=retry)


def _seconds(value: float | str) -> float:
    return float(value) if isinstance(value, int | float) else parse_duration(value).total_seconds()


# --- Prefect tasks ------------------------------------------------------------------------


@task(name="argocd-sync-and-wait")
async def argocd_sync_and_wait(
    app: str,
    commit: str,
    automated: bool,
    deadline: float | str = "10m",
    *,
    is_descendant: IsDescendant | None = None,
    branch: str = "main",
    poll_interval: float = 2.0,
    retry: RetryPolicy | None = None,
) -> SyncOutcome:
    """Sync ``app`` and wait until it is Synced and Healthy at ``commit`` or a descendant.

    Automated app: refresh, then sync without a revision (Argo CD refuses one); when the
    auto-sync already runs, just wait for it. Manual app: sync the branch head. An app
    already done and good at our commit is left alone: a rerun makes no new sync.
    """
    async with await client_from_settings(retry=retry) as argo:
        outcome = await argo.sync_and_wait(
            app,
            commit,
            automated=automated,
            deadline=_seconds(deadline),
            is_descendant=is_descendant,
            branch=branch,
            poll_interval=poll_interval,
            log=run_logger("robotics_cd.argocd").info,
        )
    return outcome


@task(name="argocd-get")
async def argocd_get(app: str) -> AppState:
    async with await client_from_settings() as argo:
        return AppState.from_app(await argo.get(app))


@task(name="argocd-sync-windows", cache_policy=NO_CACHE)  # the client retries what is transient
async def argocd_sync_windows(app: str) -> SyncWindows:
    """The app's Argo CD sync windows as freezes, read now (never cached: a resumed run must
    see the windows of its own moment)."""
    async with await client_from_settings() as argo:
        return await argo.freezes(app, datetime.now(UTC))


@task(name="argocd-rollback")
async def argocd_rollback(app: str, history_id: int) -> AppState:
    async with await client_from_settings() as argo:
        return AppState.from_app(await argo.rollback(app, history_id))


@task(name="argocd-terminate")
async def argocd_terminate(app: str) -> None:
    async with await client_from_settings() as argo:
        await argo.terminate(app)


def measured_pod(pod: Mapping[str, Any], seen: str) -> MeasuredPod:
    """A live Pod as the measurement rules see it: its containers' imageIDs and start time."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    return MeasuredPod(
        name=str(meta.get("name", "")),
        track=(meta.get("labels") or {}).get("track"),
        image_ids=tuple(str(c.get("imageID", "")) for c in status.get("containerStatuses") or []),
        started_at=_time(status.get("startTime")),
        seen=seen,
    )


@task(name="argocd-measured-pods", task_run_name="pods of {app} at the window's {seen}")
async def measured_pods(app: str, seen: str, *, track: str | None = "stable") -> list[MeasuredPod]:
    """The app's pods (of ``track``), as listed now: the evidence of what a window measured."""
    async with await client_from_settings() as argo:
        return [measured_pod(p, seen) for p in await argo.pods(app, track=track)]


async def canary_trouble(app: str) -> str | None:
    """Restarts and exits of the app's canary pods, for a stop's reason (not a task: called
    once, when the early abort or an interval's verdict stops the canary). None when Argo CD
    cannot say: the stop stands on its own evidence."""
    try:
        async with await client_from_settings() as argo:
            return canary_pod_trouble(await argo.pods(app, track="canary"))
    except Exception as exc:  # only an explanation: never in the way of the stop
        run_logger("robotics_cd.argocd").warning("could not read %s's canary pods: %s", app, exc)
        return None
