"""The ingress router: one per namespace, behaving as ingress-nginx for what releases use.

A request is matched by ``Host`` (exact, then ``*.wildcard``, then rules without host) and
path (``Exact``, ``Prefix`` by path elements, ``ImplementationSpecific`` as a string prefix;
the longest wins) to the *main* Ingress of that host/path. A canary Ingress
(``nginx.ingress.kubernetes.io/canary: "true"``) with the same host and path takes the
request when ``canary-by-header`` says so (``always``, or the ``canary-by-header-value``),
else when ``canary-by-cookie`` says ``always``, else with probability
``canary-weight / canary-weight-total``; a canary without ready endpoints falls back to the
main backend, as ingress-nginx's balancer does. The request is proxied to a ready pod of the
backend Service (round robin) through the pod's port published on 127.0.0.1; no ready pod
is ``503``, a refused connection ``502``, an upstream timeout ``504``.

Every proxied response is recorded in ``RequestMetrics`` with ingress-nginx's labels.

Hosts routed by a Gateway API ``HTTPRoute`` of the namespace (``sandbox.runtime.gateway``:
weights, matches, Envoy Gateway's statuses and cluster statistics) are served by the same
router, on the same port; a host is routed by one or the other (the catalog refuses a host
given to both).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl

import aiohttp

from sandbox.faults import FaultRegistry
from sandbox.runtime import gateway as gw
from sandbox.runtime.kubelet import PodEndpoint
from sandbox.runtime.metrics import RequestMetrics
from sandbox.runtime.objects import JSON, annotations_of, service_selects

log = logging.getLogger("sandbox.runtime.router")

CANARY = "nginx.ingress.kubernetes.io/canary"
PREFIX = "nginx.ingress.kubernetes.io/"
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
UPSTREAM_TIMEOUT = 60.0

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Backend:
    ingress: str
    service: str
    port: int | str  # the Service port (number or name)


@dataclass
class Route:
    host: str  # "" = any host
    path: str
    path_type: str
    main: Backend | None = None
    canary: Backend | None = None
    canary_annotations: dict[str, str] = field(default_factory=dict)

    def matches_path(self, path: str) -> bool:
        if self.path_type == "Exact":
            return path == self.path
        if self.path_type == "Prefix":
            if self.path in ("", "/"):
                return True
            base = self.path.rstrip("/")
            return path == base or path.startswith(base + "/")
        return path.startswith(self.path or "/")

    def host_rank(self, host: str) -> int:
        """0 exact, 1 wildcard, 2 any host, -1 no match."""
        if self.host == host:
            return 0
        if (
            self.host.startswith("*.")
            and host.endswith(self.host[1:])
            and host.count(".") == self.host.count(".")
        ):
            return 1
        if not self.host:
            return 2
        return -1


def build_routes(ingresses: list[JSON]) -> list[Route]:
    """Group every (host, path) of the namespace's Ingresses into main + canary routes."""
    routes: dict[tuple[str, str], Route] = {}
    for ingress in sorted(ingresses, key=lambda i: i["metadata"].get("creationTimestamp", "")):
        ann = annotations_of(ingress)
        is_canary = ann.get(CANARY, "").lower() == "true"
        spec = ingress.get("spec") or {}
        name = ingress["metadata"]["name"]
        default = (spec.get("defaultBackend") or {}).get("service")
        rules = spec.get("rules") or []
        entries: list[tuple[str, str, str, JSON]] = []
        for rule in rules:
            for p in (rule.get("http") or {}).get("paths") or []:
                svc = (p.get("backend") or {}).get("service")
                if svc:
                    entries.append(
                        (rule.get("host", ""), p.get("path", "/"), p.get("pathType", "Prefix"), svc)
                    )
        if default and not entries:
            entries.append(("", "/", "Prefix", default))
        for host, path, path_type, svc in entries:
            port = (
                (svc.get("port") or {}).get("number") or (svc.get("port") or {}).get("name") or 80
            )
            backend = Backend(name, svc["name"], port)
            route = routes.setdefault((host, path), Route(host, path, path_type))
            if is_canary:
                if route.canary is None:  # one canary per host+path, the oldest wins
                    route.canary = backend
                    route.canary_annotations = {
                        k[len(PREFIX) :]: v for k, v in ann.items() if k.startswith(PREFIX)
                    }
            elif route.main is None:
                route.main = backend
                route.path_type = path_type
    return [r for r in routes.values() if r.main is not None]


def choose_canary(route: Route, headers: dict[str, str], rand: Callable[[], float]) -> bool:
    """ingress-nginx's order: header, then cookie, then weight."""
    ann = route.canary_annotations
    header = ann.get("canary-by-header")
    if header:
        value = headers.get(header.lower())
        wanted = ann.get("canary-by-header-value")
        if value is not None:
            if wanted:
                if value == wanted:
                    return True
            elif value == "always":
                return True
            elif value == "never":
                return False
    cookie_name = ann.get("canary-by-cookie")
    if cookie_name and "cookie" in headers:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(headers["cookie"])
        except Exception:  # malformed cookie header: ignored, as nginx would
            jar = SimpleCookie()
        if cookie_name in jar:
            if jar[cookie_name].value == "always":
                return True
            if jar[cookie_name].value == "never":
                return False
    try:
        weight = float(ann.get("canary-weight", "0") or 0)
        total = float(ann.get("canary-weight-total", "100") or 100)
    except ValueError:
        return False
    if weight <= 0 or total <= 0:
        return False
    return rand() * total < weight


class NamespaceRouter:
    """The ASGI app serving one namespace's Ingresses."""

    def __init__(
        self,
        namespace: str,
        store: Any,
        endpoints: dict[tuple[str, str], PodEndpoint],
        metrics: RequestMetrics,
        faults: FaultRegistry,
        envoy: gw.EnvoyMetrics | None = None,
    ) -> None:
        self.namespace = namespace
        self.envoy = envoy or gw.EnvoyMetrics()
        self.http_routes: list[gw.Candidate] = []
        self.store = store
        self.endpoints = endpoints
        self.metrics = metrics
        self.faults = faults
        self.routes: list[Route] = []
        self.services: dict[str, JSON] = {}
        self._rr: dict[str, itertools.count[int]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.rand = random.random
        self.refresh()

    def refresh(self) -> None:
        """Re-read Ingresses and Services of the namespace (called on their changes)."""
        self.routes = build_routes(
            self.store.list("networking.k8s.io/v1", "Ingress", self.namespace)
        )
        self.services = {
            s["metadata"]["name"]: s for s in self.store.list("v1", "Service", self.namespace)
        }
        classes = {
            c["metadata"]["name"]: c for c in self.store.list(gw.API_VERSION, "GatewayClass")
        }
        gateways = gw.accepting_gateways(
            self.store.list(gw.API_VERSION, "Gateway", self.namespace), classes
        )
        self.http_routes = gw.build_candidates(
            self.store.list(gw.API_VERSION, "HTTPRoute", self.namespace), gateways, self.services
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, force_close=True),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def match(self, host: str, path: str) -> Route | None:
        best: tuple[int, int, Route] | None = None
        for route in self.routes:
            rank = route.host_rank(host)
            if rank < 0 or not route.matches_path(path):
                continue
            candidate = (rank, -len(route.path), route)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return best[2] if best else None

    def ready_endpoints(self, backend: Backend) -> list[tuple[PodEndpoint, int, int]]:
        """(pod, container port, 127.0.0.1 port) of every ready pod behind the Service."""
        service = self.services.get(backend.service)
        if service is None:
            return []
        target: int | str | None = None
        service_port = 0
        for p in (service.get("spec") or {}).get("ports") or []:
            if backend.port in (p.get("port"), p.get("name")) or str(backend.port) == str(
                p.get("port")
            ):
                target = p.get("targetPort", p.get("port"))
                service_port = int(p.get("port", 0))
                break
        if target is None:
            return []
        found = []
        for (ns, _), ep in list(self.endpoints.items()):
            if ns != self.namespace or not ep.ready or not service_selects(service, ep.labels):
                continue
            container_port = target if isinstance(target, int) else ep.port_names.get(str(target))
            if isinstance(target, str) and target.isdigit():
                container_port = int(target)
            if container_port is None:
                continue
            host_port = ep.ports.get(int(container_port))
            if host_port is not None:
                found.append((ep, service_port, host_port))
        return found

    def pick(
        self, backend: Backend, candidates: list[tuple[PodEndpoint, int, int]]
    ) -> tuple[PodEndpoint, int, int]:
        counter = self._rr.setdefault(backend.service, itertools.count())
        return candidates[next(counter) % len(candidates)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "").split(":", 1)[0].lower()
        path = scope["path"]
        if self.http_routes:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            chosen = gw.best_candidate(
                self.http_routes, host, path, scope["method"], headers, query
            )
            if chosen is not None:
                await self.serve_http_route(chosen, scope, receive, send, headers)
                return
        route = self.match(host, path)
        if route is None or route.main is None:
            await _respond(
                send,
                404,
                b"404 Not Found: no Ingress in namespace "
                + self.namespace.encode()
                + b" for this host and path\n",
            )
            return
        main = route.main
        backend, canary_label = main, ""
        candidates: list[tuple[PodEndpoint, int, int]] = []
        if route.canary is not None and choose_canary(route, headers, self.rand):
            candidates = self.ready_endpoints(route.canary)
            if candidates:
                backend = route.canary
                canary_label = f"{self.namespace}-{route.canary.service}-{candidates[0][1]}"
        if not candidates:
            candidates = self.ready_endpoints(main)
        labels = {
            "namespace": self.namespace,
            "ingress": main.ingress,
            "service": main.service,
            "canary": canary_label,
            "host": route.host or host,
            "method": scope["method"],
            "path": route.path,
        }
        if not candidates:
            status = 503
            await _respond(send, status, b"503 Service Temporarily Unavailable\n")
        else:
            endpoint, _, port = self.pick(backend, candidates)
            status = await self.proxy(scope, receive, send, headers, endpoint, port, backend)
        labels["status"] = str(status)
        self.metrics.observe(labels, time.perf_counter() - started)

    async def serve_http_route(
        self,
        chosen: gw.Candidate,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
    ) -> None:
        """One request through an HTTPRoute rule: a weighted backendRef, its filters, and
        Envoy's cluster statistics for it."""
        started = time.perf_counter()
        choice = chosen.pick(self.rand)
        if choice is None or not choice.valid:
            # Every weight 0, or the share of a backendRef that does not resolve.
            await _respond(send, 500, b"Internal Server Error\n")
            return
        backend = Backend(chosen.route, choice.service, choice.port)
        candidates = self.ready_endpoints(backend)
        if not candidates:
            self.envoy.no_healthy_upstream(choice.cluster)
            await _respond(send, 503, b"no healthy upstream")
            return
        forward = gw.apply_header_filters(headers, [*chosen.rule_filters, *choice.header_filters])
        endpoint, _, port = self.pick(backend, candidates)
        status = await self.proxy(scope, receive, send, forward, endpoint, port, backend)
        self.envoy.observe(choice.cluster, status, time.perf_counter() - started)

    async def proxy(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        endpoint: PodEndpoint,
        port: int,
        backend: Backend,
    ) -> int:
        delay = self.faults.latency_for(
            self.namespace, endpoint.name, endpoint.labels, backend.service
        )
        if delay > 0:
            await asyncio.sleep(delay)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        forward = {k: v for k, v in headers.items() if k not in HOP_BY_HOP}
        client = scope.get("client") or ("127.0.0.1", 0)
        forward["x-forwarded-for"] = client[0]
        forward["x-real-ip"] = client[0]
        forward["x-forwarded-host"] = headers.get("host", "")
        forward["x-forwarded-proto"] = "http"
        query = scope.get("query_string", b"").decode("latin-1")
        raw_path = scope.get("raw_path") or scope["path"].encode()
        url = f"http://127.0.0.1:{port}{raw_path.decode('latin-1')}"
        if query:
            url += f"?{query}"
        try:
            async with self.session.request(
                scope["method"], url, headers=forward, data=body or None, allow_redirects=False
            ) as response:
                payload = await response.read()
                out_headers = [
                    (k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in response.headers.items()
                    if k.lower() not in HOP_BY_HOP
                ]
                out_headers.append((b"content-length", str(len(payload)).encode()))
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status,
                        "headers": out_headers,
                    }
                )
                await send({"type": "http.response.body", "body": payload})
                return int(response.status)
        except TimeoutError:
            await _respond(send, 504, b"504 Gateway Time-out\n")
            return 504
        except aiohttp.ClientError as exc:
            log.debug("upstream %s:%s failed: %s", endpoint.name, port, exc)
            await _respond(send, 502, b"502 Bad Gateway\n")
            return 502


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
