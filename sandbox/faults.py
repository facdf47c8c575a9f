"""Fault injection for the sandbox: break things on purpose, only when asked.

One ``FaultRegistry`` per twin process (``FAULTS``) holds every fault currently armed:

- **HTTP faults** on a twin server (Argo CD, GitHub, the Kubernetes API, ...): requests whose
  path starts with ``path_prefix`` answer ``status`` (e.g. 503) and/or hang ``hang_seconds``
  first, for the next ``count`` requests (or until cleared). A server opts in by wrapping its
  ASGI app: ``FaultInjector(app, target="argocd")``.
- **Pod faults**, read by the runtime: crash-loop a pod (its containers are killed whenever
  they run), add latency to the router's responses from some pods (by pod, service or
  ``track`` label), stop or restart the synthetic load.

The admin endpoints (``admin_routes``) are served on the twin's control port; tests and the
demo drive them with ``FaultClient(control_url)``. Nothing is armed unless asked for.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_ids = itertools.count(1)


@dataclass
class HttpFault:
    """Requests to ``target`` under ``path_prefix`` answer ``status`` and/or hang first."""

    target: str
    path_prefix: str = "/"
    status: int | None = None
    hang_seconds: float = 0.0
    count: int | None = None  # None: until cleared
    method: str | None = None
    # With ``status``: answer this body verbatim (e.g. malformed JSON with a 200).
    body: str | None = None
    id: int = field(default_factory=lambda: next(_ids))
    hits: int = 0


@dataclass
class PodCrash:
    """Kill the containers of ``namespace/pod`` each time they run (``count`` kills, or all)."""

    namespace: str
    pod: str
    count: int | None = None
    id: int = field(default_factory=lambda: next(_ids))
    kills: int = 0


@dataclass
class Latency:
    """Delay the router's responses from matching pods by ``seconds``."""

    namespace: str
    seconds: float
    pod: str | None = None
    service: str | None = None
    track: str | None = None
    id: int = field(default_factory=lambda: next(_ids))

    def applies(self, namespace: str, pod: str, labels: dict[str, str], service: str) -> bool:
        return (
            namespace == self.namespace
            and (self.pod is None or self.pod == pod)
            and (self.service is None or self.service == service)
            and (self.track is None or labels.get("track") == self.track)
        )


class FaultError(ValueError):
    """An admin request that does not describe a fault; the message says what is missing."""


class FaultRegistry:
    """Every armed fault. Thread-safe: the runtime reads it from worker threads too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.http: list[HttpFault] = []
        self.crashes: list[PodCrash] = []
        self.latencies: list[Latency] = []
        # (namespace, host) pairs whose synthetic load is stopped; ("*", "*") stops all.
        self.load_stopped: set[tuple[str, str]] = set()

    # -- HTTP faults -------------------------------------------------------------------

    def add_http(self, fault: HttpFault) -> HttpFault:
        if fault.status is None and fault.hang_seconds <= 0:
            raise FaultError("give a status (e.g. 503) or hang_seconds > 0")
        if fault.status is not None and not 100 <= fault.status <= 599:
            raise FaultError(f"status {fault.status} is not an HTTP status")
        if not fault.path_prefix.startswith("/"):
            raise FaultError("path_prefix must start with '/'")
        with self._lock:
            self.http.append(fault)
        return fault

    def take_http(self, target: str, method: str, path: str) -> HttpFault | None:
        """The fault that applies to this request, consuming one of its ``count``."""
        with self._lock:
            for fault in self.http:
                if (
                    fault.target == target
                    and path.startswith(fault.path_prefix)
                    and (fault.method is None or fault.method.upper() == method.upper())
                ):
                    fault.hits += 1
                    if fault.count is not None and fault.hits >= fault.count:
                        self.http.remove(fault)
                    return fault
        return None

    def clear_http(self, target: str | None = None) -> int:
        with self._lock:
            before = len(self.http)
            self.http = [f for f in self.http if target is not None and f.target != target]
            return before - len(self.http)

    # -- pod faults --------------------------------------------------------------------

    def add_crash(self, crash: PodCrash) -> PodCrash:
        with self._lock:
            self.crashes.append(crash)
        return crash

    def take_crash(self, namespace: str, pod: str) -> bool:
        """True when a running container of this pod is to be killed now (counts the kill)."""
        with self._lock:
            for crash in self.crashes:
                if crash.namespace == namespace and crash.pod == pod:
                    crash.kills += 1
                    if crash.count is not None and crash.kills >= crash.count:
                        self.crashes.remove(crash)
                    return True
        return False

    def stop_crash(self, namespace: str, pod: str) -> None:
        with self._lock:
            self.crashes = [
                c for c in self.crashes if not (c.namespace == namespace and c.pod == pod)
            ]

    def clear_latencies(self) -> None:
        with self._lock:
            self.latencies.clear()

    def add_latency(self, latency: Latency) -> Latency:
        if latency.seconds < 0:
            raise FaultError("latency seconds must be >= 0")
        with self._lock:
            self.latencies.append(latency)
        return latency

    def latency_for(self, namespace: str, pod: str, labels: dict[str, str], service: str) -> float:
        with self._lock:
            return sum(
                lat.seconds
                for lat in self.latencies
                if lat.applies(namespace, pod, labels, service)
            )

    def stop_load(self, namespace: str = "*", host: str = "*") -> None:
        with self._lock:
            self.load_stopped.add((namespace, host))

    def start_load(self, namespace: str = "*", host: str = "*") -> None:
        with self._lock:
            if namespace == "*" and host == "*":
                self.load_stopped.clear()
            else:
                self.load_stopped.discard((namespace, host))

    def load_running(self, namespace: str, host: str) -> bool:
        with self._lock:
            return not any(
                ns in ("*", namespace) and h in ("*", host) for ns, h in self.load_stopped
            )

    def clear_pods(self) -> None:
        with self._lock:
            self.crashes.clear()
            self.latencies.clear()
            self.load_stopped.clear()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "http": [asdict(f) for f in self.http],
                "crashes": [asdict(c) for c in self.crashes],
                "latencies": [asdict(lat) for lat in self.latencies],
                "load_stopped": sorted([list(p) for p in self.load_stopped]),
            }


FAULTS = FaultRegistry()


class FaultInjector:
    """ASGI middleware: requests matching an armed HTTP fault for ``target`` misbehave."""

    def __init__(self, app: ASGIApp, *, target: str, registry: FaultRegistry | None = None):
        self.app = app
        self.target = target
        self.registry = registry or FAULTS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fault = self.registry.take_http(self.target, scope["method"], scope["path"])
        if fault is None:
            await self.app(scope, receive, send)
            return
        if fault.hang_seconds > 0:
            await asyncio.sleep(fault.hang_seconds)
        if fault.status is None:
            await self.app(scope, receive, send)
            return
        body = (
            fault.body.encode()
            if fault.body is not None
            else json.dumps(
                {"error": f"fault injected by the sandbox (id {fault.id})", "code": fault.status}
            ).encode()
        )
        await send(
            {
                "type": "http.response.start",
                "status": fault.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# -- admin endpoints -----------------------------------------------------------------------


async def _json(request: Request) -> dict[str, Any]:
    try:
        data = await request.json() if await request.body() else {}
    except ValueError as exc:
        raise FaultError(f"the body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise FaultError("the body must be a JSON object")
    return data


def _opt_float(data: dict[str, Any], key: str, default: float = 0.0) -> float:
    value = data.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise FaultError(f"{key} must be a number, got {value!r}") from exc


def _opt_int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or value < 1:
        raise FaultError(f"{key} must be a positive integer, got {value!r}")
    return value


def _required(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise FaultError(f"{key} is required (a non-empty string)")
    return value


def _handles_errors(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except FaultError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    return wrapped


def admin_routes(registry: FaultRegistry | None = None) -> list[Route]:
    """Routes for the control port: ``/admin/faults``, ``/admin/pods/crash``,
    ``/admin/latency``, ``/admin/load``."""
    reg = registry or FAULTS

    @_handles_errors
    async def faults(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(reg.snapshot())
        if request.method == "DELETE":
            target = request.query_params.get("target")
            removed = reg.clear_http(target)
            if target is None:
                reg.clear_pods()
            return JSONResponse({"removed": removed})
        data = await _json(request)
        status = data.get("status")
        if status is not None and not isinstance(status, int):
            raise FaultError(f"status must be an integer, got {status!r}")
        fault = reg.add_http(
            HttpFault(
                target=_required(data, "target"),
                path_prefix=str(data.get("path_prefix", "/")),
                status=status,
                hang_seconds=_opt_float(data, "hang_seconds"),
                count=_opt_int(data, "count"),
                method=data.get("method"),
                body=None if data.get("body") is None else str(data["body"]),
            )
        )
        return JSONResponse(asdict(fault), status_code=201)

    @_handles_errors
    async def crash(request: Request) -> Response:
        data = await _json(request)
        if request.method == "DELETE":
            reg.stop_crash(_required(data, "namespace"), _required(data, "pod"))
            return JSONResponse({})
        item = reg.add_crash(
            PodCrash(
                namespace=_required(data, "namespace"),
                pod=_required(data, "pod"),
                count=_opt_int(data, "count"),
            )
        )
        return JSONResponse(asdict(item), status_code=201)

    @_handles_errors
    async def latency(request: Request) -> Response:
        if request.method == "DELETE":
            reg.clear_latencies()
            return JSONResponse({})
        data = await _json(request)
        item = reg.add_latency(
            Latency(
                namespace=_required(data, "namespace"),
                seconds=_opt_float(data, "seconds"),
                pod=data.get("pod"),
                service=data.get("service"),
                track=data.get("track"),
            )
        )
        return JSONResponse(asdict(item), status_code=201)

    @_handles_errors
    async def load(request: Request) -> Response:
        data = await _json(request)
        action = data.get("action")
        namespace, host = str(data.get("namespace", "*")), str(data.get("host", "*"))
        if action == "stop":
            reg.stop_load(namespace, host)
        elif action == "start":
            reg.start_load(namespace, host)
        else:
            raise FaultError('action must be "stop" or "start"')
        return JSONResponse({"action": action, "namespace": namespace, "host": host})

    return [
        Route("/admin/faults", faults, methods=["GET", "POST", "DELETE"]),
        Route("/admin/pods/crash", crash, methods=["POST", "DELETE"]),
        Route("/admin/latency", latency, methods=["POST", "DELETE"]),
        Route("/admin/load", load, methods=["POST"]),
    ]


# -- client for tests and the demo ---------------------------------------------------------


class FaultClient:
    """Arms and clears faults through the twin's control port."""

    def __init__(self, control_url: str, *, transport: httpx.BaseTransport | None = None):
        self._http = httpx.Client(base_url=control_url, timeout=10, transport=transport)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._http.request(method, path, json=body)
        if response.status_code >= 400:
            raise FaultError(f"{method} {path} refused ({response.status_code}): {response.text}")
        return response.json()

    def http_fault(
        self,
        target: str,
        *,
        path_prefix: str = "/",
        status: int | None = None,
        hang_seconds: float = 0.0,
        count: int | None = None,
        method: str | None = None,
        body: str | None = None,
    ) -> int:
        """Arm an HTTP fault on a twin server; returns its id."""
        request = {
            "target": target,
            "path_prefix": path_prefix,
            "status": status,
            "hang_seconds": hang_seconds,
            "count": count,
            "method": method,
            "body": body,
        }
        return int(self._call("POST", "/admin/faults", request)["id"])

    def clear(self, target: str | None = None) -> None:
        """Disarm HTTP faults of ``target``; with no target, every fault of every kind."""
        suffix = f"?target={target}" if target else ""
        self._call("DELETE", f"/admin/faults{suffix}")

    def crash_pod(self, namespace: str, pod: str, *, count: int | None = None) -> int:
        body = {"namespace": namespace, "pod": pod, "count": count}
        return int(self._call("POST", "/admin/pods/crash", body)["id"])

    def stop_crashing(self, namespace: str, pod: str) -> None:
        self._call("DELETE", "/admin/pods/crash", {"namespace": namespace, "pod": pod})

    def add_latency(
        self,
        namespace: str,
        seconds: float,
        *,
        pod: str | None = None,
        service: str | None = None,
        track: str | None = None,
    ) -> int:
        body = {
            "namespace": namespace,
            "seconds": seconds,
            "pod": pod,
            "service": service,
            "track": track,
        }
        return int(self._call("POST", "/admin/latency", body)["id"])

    def clear_latency(self) -> None:
        self._call("DELETE", "/admin/latency")

    def stop_load(self, namespace: str = "*", host: str = "*") -> None:
        self._call("POST", "/admin/load", {"action": "stop", "namespace": namespace, "host": host})

    def start_load(self, namespace: str = "*", host: str = "*") -> None:
        body = {"action": "start", "namespace": namespace, "host": host}
        self._call("POST", "/admin/load", body)

    def snapshot(self) -> dict[str, Any]:
        return dict(self._call("GET", "/admin/faults"))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FaultClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
