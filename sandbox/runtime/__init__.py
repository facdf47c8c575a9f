"""The twin's runtime: pods as real containers, workload controllers, ingress routers,
synthetic load, metrics and faults (issue 4).

``start(ctx)`` wires it into the twin process: it subscribes to the object store and
reacts to every change (plus a periodic resync), serves ``/metrics`` and ``/admin/*`` on the
control port, and one ingress router per namespace. ``cleanup(label)`` removes every
container, network and volume a sandbox made (for ``sandbox down``); ``state_label(dir)``
gives the label of the sandbox living in ``dir``.

What the other twin components can rely on:
- every Pod object runs (whoever created it), its status written as the kubelet does;
- pods resolve each other by pod name, hostname[.subdomain] and the names of the Services
  selecting them, on the Docker network ``twin-<namespace>``;
- ``ctx.served["control"]`` and ``ctx.served["ingress:<namespace>"]`` are the ports;
- ``ctx.store.log_source`` streams container logs for ``kubectl logs``;
- ``sandbox.faults.FaultInjector`` + ``FAULTS`` for HTTP faults on any twin server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from sandbox.faults import FAULTS, FaultRegistry, admin_routes
from sandbox.kube.prometheus_sd import target_groups
from sandbox.procs import free_port, port_free
from sandbox.runtime import events
from sandbox.runtime import gateway as gw
from sandbox.runtime.config import RuntimeConfig
from sandbox.runtime.engine import Engine, cleanup, in_thread, state_label
from sandbox.runtime.kubelet import Kubelet
from sandbox.runtime.load import LoadGenerator, plans_for
from sandbox.runtime.metrics import ContainerStats, RequestMetrics, restart_metrics
from sandbox.runtime.router import NamespaceRouter
from sandbox.runtime.workloads import Controllers

__all__ = ["Runtime", "cleanup", "start", "state_label"]

log = logging.getLogger("sandbox.runtime")

WORKLOAD_KINDS = {"Deployment", "ReplicaSet", "Job", "Pod"}
GATEWAY_KINDS = {"Gateway", "HTTPRoute"}


class Runtime:
    def __init__(self, ctx: Any, config: RuntimeConfig, faults: FaultRegistry = FAULTS) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.config = config
        self.faults = faults
        self.label = state_label(ctx.state_dir)
        self.engine: Engine | None = None
        self.kubelet: Kubelet | None = None
        self.controllers = Controllers(self.store, config.backoff_initial, config.backoff_max)
        self.metrics = RequestMetrics()
        self.envoy = gw.EnvoyMetrics()
        self.stats: ContainerStats | None = None
        self.load = LoadGenerator(faults)
        self.routers: dict[str, NamespaceRouter] = {}
        self.router_ports: dict[str, int] = {}
        self._dirty = asyncio.Event()
        self._ports_file = Path(ctx.state_dir) / "runtime" / "ingress-ports.json"

    # -- start -----------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            engine = Engine(self.label, self.config.registry)
            await in_thread(engine.client.ping)
            self.engine = engine
        except Exception as exc:  # no dockerd: the API and controllers still work
            log.warning("no Docker Engine (%s): pods will stay Pending", exc)
        if self.engine is not None:
            self.kubelet = Kubelet(self.store, self.engine, self.config, self.faults)
            self.kubelet.start_events()
            self.stats = ContainerStats(self.engine)
            self.store.log_source = self.kubelet.logs
            self.ctx.spawn(self.stats.run(), "runtime:stats")
        subscription = self.store.subscribe()
        control_port = self.config.control_port or free_port()
        await self.ctx.serve(self.control_app(), control_port, "control")
        self._load_ports()
        for namespace in self.config.ingress_ports:
            await self.ensure_router(namespace)
        for ingress in self.store.list("networking.k8s.io/v1", "Ingress"):
            await self.ensure_router(ingress["metadata"]["namespace"])
        self._ensure_gateway_class()
        for kind in GATEWAY_KINDS:
            for obj in self.store.list(gw.API_VERSION, kind):
                await self.ensure_router(obj["metadata"]["namespace"])
        self.ctx.spawn(self.watch(subscription), "runtime:watch")
        self.ctx.spawn(self.control_loop(), "runtime:controllers")
        self.ctx.spawn(self.resync_loop(), "runtime:resync")
        self.ctx.spawn(self._close_on_stop(), "runtime:close")
        self._dirty.set()

    async def _close_on_stop(self) -> None:
        """Wait for the twin to stop (it cancels every task), then close HTTP sessions.
        Containers keep running: a twin restart adopts them."""
        try:
            await asyncio.Event().wait()
        finally:
            await self.load.close()
            for router in self.routers.values():
                await router.close()
            if self.kubelet is not None:
                await self.kubelet.close()
            if self.engine is not None:
                self.engine.close()

    def _ensure_gateway_class(self) -> None:
        """The GatewayClass of the Envoy Gateway the twin plays, as its quickstart makes it."""
        from sandbox.kube.store import ApiError

        with contextlib.suppress(ApiError):  # already there
            self.store.create(
                {
                    "apiVersion": gw.API_VERSION,
                    "kind": "GatewayClass",
                    "metadata": {"name": gw.DEFAULT_CLASS},
                    "spec": {"controllerName": gw.CONTROLLER},
                }
            )

    def _load_ports(self) -> None:
        if self._ports_file.exists():
            with contextlib.suppress(ValueError):
                self.router_ports.update(json.loads(self._ports_file.read_text()))
        self.router_ports.update(self.config.ingress_ports)

    def _save_ports(self) -> None:
        self._ports_file.parent.mkdir(parents=True, exist_ok=True)
        self._ports_file.write_text(json.dumps(self.router_ports, indent=2, sort_keys=True))

    async def ensure_router(self, namespace: str) -> NamespaceRouter:
        router = self.routers.get(namespace)
        if router is not None:
            return router
        endpoints = self.kubelet.endpoints if self.kubelet else {}
        router = NamespaceRouter(
            namespace, self.store, endpoints, self.metrics, self.faults, self.envoy
        )
        port = self.router_ports.get(namespace)
        if not port or (namespace not in self.config.ingress_ports and not port_free(port)):
            port = free_port()
        await self.ctx.serve(router, port, f"ingress:{namespace}")
        self.routers[namespace] = router
        self.router_ports[namespace] = port
        self._save_ports()
        log.info("ingress router for namespace %s on 127.0.0.1:%d", namespace, port)
        self.refresh_namespace(namespace)
        return router

    # -- reacting to the store ---------------------------------------------------------------

    async def watch(self, subscription: Any) -> None:
        """React to every change; if the store cuts us off (410, fell behind), subscribe
        again and let the resync catch up on what was missed."""
        from sandbox.kube.store import ApiError

        while True:
            try:
                async for event in subscription:
                    if event.type == "BOOKMARK":
                        continue
                    try:
                        await self.handle(event.type, event.object)
                    except Exception:
                        log.exception(
                            "runtime: handling %s %s failed", event.type, event.object.get("kind")
                        )
            except ApiError as exc:
                log.warning("runtime: store subscription ended (%s); subscribing again", exc)
            subscription = self.store.subscribe()
            self._dirty.set()
            for namespace in list(self.routers):
                self.refresh_namespace(namespace)

    async def handle(self, type_: str, obj: dict[str, Any]) -> None:
        kind = obj.get("kind")
        namespace = (obj.get("metadata") or {}).get("namespace", "")
        if kind in WORKLOAD_KINDS:
            self._dirty.set()
        if kind == "Pod" and self.kubelet is not None:
            if type_ == "DELETED":
                self.kubelet.pod_deleted(obj)
            else:
                self.kubelet.pod_changed(obj)
        elif kind == "Service":
            if self.kubelet is not None:
                self.kubelet.namespace_changed(namespace)
            if namespace in self.routers:
                self.refresh_namespace(namespace)  # routes' ResolvedRefs may change
        elif kind == "Namespace" and type_ == "DELETED" and self.kubelet is not None:
            self.ctx.spawn(self._drop_network(obj["metadata"]["name"]), "runtime:drop-network")
        elif kind == "GatewayClass":
            for ns in list(self.routers):
                self.refresh_namespace(ns)
        elif kind == "Ingress" or kind in GATEWAY_KINDS:
            if type_ != "DELETED" and namespace not in self.routers:
                await self.ensure_router(namespace)
            if namespace in self.routers:
                self.refresh_namespace(namespace)

    async def _drop_network(self, namespace: str, timeout: float = 60.0) -> None:
        """Once a deleted namespace's pods are gone, remove its Docker network."""
        if self.kubelet is None or self.engine is None:
            return
        deadline = asyncio.get_running_loop().time() + timeout
        while any(ns == namespace for ns, _ in self.kubelet.workers):
            if asyncio.get_running_loop().time() > deadline:
                log.warning("namespace %s: pods still running; its network stays", namespace)
                return
            await asyncio.sleep(0.5)
        await in_thread(self.engine.remove_network, self.engine.network_name(namespace))

    def refresh_namespace(self, namespace: str) -> None:
        """Routes, Ingress status and load plans of one namespace, from the store."""
        router = self.routers[namespace]
        router.refresh()
        port = self.router_ports[namespace]
        ingresses = self.store.list("networking.k8s.io/v1", "Ingress", namespace)
        served = {"ingress": [{"ip": "127.0.0.1", "ports": [{"port": port, "protocol": "TCP"}]}]}
        for ingress in ingresses:
            status = {**(ingress.get("status") or {}), "loadBalancer": served}
            if status != ingress.get("status"):
                meta = ingress["metadata"]
                with contextlib.suppress(Exception):
                    self.store.update_status(
                        "networking.k8s.io/v1", "Ingress", namespace, meta["name"], status
                    )
        routes = self.store.list(gw.API_VERSION, "HTTPRoute", namespace)
        self._write_gateway_status(namespace, routes)
        self.load.apply(namespace, port, plans_for(namespace, ingresses + routes, self.config.load))

    def _write_gateway_status(self, namespace: str, routes: list[dict[str, Any]]) -> None:
        """Status of the GatewayClass, the namespace's Gateways and HTTPRoutes, as Envoy
        Gateway writes them (only when something changed: a write is a watch event)."""
        classes = {
            c["metadata"]["name"]: c for c in self.store.list(gw.API_VERSION, "GatewayClass")
        }
        writes: list[tuple[str, str | None, str, dict[str, Any], dict[str, Any]]] = []
        for name, gc in classes.items():
            if (gc.get("spec") or {}).get("controllerName") == gw.CONTROLLER:
                writes.append(("GatewayClass", None, name, gc, gw.gateway_class_status(gc)))
        gateways = gw.accepting_gateways(
            self.store.list(gw.API_VERSION, "Gateway", namespace), classes
        )
        router = self.routers[namespace]
        for name, gateway in gateways.items():
            writes.append(
                ("Gateway", namespace, name, gateway, gw.gateway_status(gateway, routes, gateways))
            )
        for route in routes:
            new = gw.route_status(route, gateways, router.services)
            writes.append(("HTTPRoute", namespace, route["metadata"]["name"], route, new))
        for kind, ns, name, obj, status in writes:
            if status != (obj.get("status") or {}):
                with contextlib.suppress(Exception):
                    self.store.update_status(gw.API_VERSION, kind, ns, name, status)

    async def control_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout=self.config.resync_seconds)
            self._dirty.clear()
            await asyncio.sleep(0.05)  # let a burst of events land in one pass
            try:
                self.controllers.reconcile_all()
            except Exception:
                log.exception("workload controllers failed; retrying")

    async def resync_loop(self) -> None:
        expired_at = 0.0
        while True:
            try:
                if time.monotonic() - expired_at > 60:
                    events.expire(self.store)
                    expired_at = time.monotonic()
                if self.kubelet is not None:
                    await self.kubelet.resync()
                for namespace in list(self.routers):
                    self.refresh_namespace(namespace)
            except Exception:
                log.exception("runtime resync failed; retrying")
            await asyncio.sleep(max(self.config.resync_seconds, 2.0))

    # -- control port ------------------------------------------------------------------------

    def render_metrics(self) -> str:
        lines = self.metrics.render()
        lines += self.envoy.render()
        lines += restart_metrics(self.store.list("v1", "Pod"))
        if self.stats is not None:
            lines += self.stats.render()
        return "\n".join(lines) + "\n"

    def control_app(self) -> Starlette:
        async def metrics(request: Request) -> Response:
            return PlainTextResponse(self.render_metrics(), media_type="text/plain; version=0.0.4")

        async def health(request: Request) -> Response:
            return PlainTextResponse("ok\n")

        async def endpoints(request: Request) -> Response:
            eps = self.kubelet.endpoints if self.kubelet else {}
            return JSONResponse(
                {
                    "routers": self.router_ports,
                    "pods": [
                        {
                            "namespace": ep.namespace,
                            "name": ep.name,
                            "ready": ep.ready,
                            "ports": {str(k): v for k, v in ep.ports.items()},
                        }
                        for ep in list(eps.values())
                    ],
                }
            )

        async def pod_discovery(request: Request) -> Response:
            # Prometheus' HTTP SD: the target groups its Kubernetes discovery would make.
            namespaces = request.query_params.getlist("namespace")
            return JSONResponse(target_groups(self.store.list("v1", "Pod"), namespaces))

        routes = [
            Route("/metrics", metrics),
            Route("/sd/kubernetes/pods", pod_discovery),
            Route("/healthz", health),
            Route("/admin/endpoints", endpoints),
            *admin_routes(self.faults),
        ]
        return Starlette(routes=routes)


async def start(ctx: Any) -> None:
    # Probes and the router speak HTTP all the time; one log line per request is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = RuntimeConfig.from_twin(ctx.config)
    runtime = Runtime(ctx, config)
    await runtime.start()
    ctx.runtime = runtime
