"""Steady synthetic traffic per Ingress host, through the namespace's router, so every
release has requests to judge.

A host gets load when its main Ingress (or its HTTPRoute, for ``spec.hostnames``) carries ``sandbox.robotics.dev/load: "<rps>"``
(paths from ``sandbox.robotics.dev/load-paths: "/v1/status,/healthz"``, default the
config's ``load.paths``), or when ``twin-config.json`` lists it under
``load.hosts["<namespace>/<host>"]``. ``load.enabled: false`` turns all of it off; the
fault admin can stop and restart it per host.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass

import aiohttp

from sandbox.faults import FaultRegistry
from sandbox.runtime.config import LoadConfig
from sandbox.runtime.objects import JSON, annotations_of
from sandbox.runtime.router import CANARY

log = logging.getLogger("sandbox.runtime.load")

LOAD_ANNOTATION = "sandbox.robotics.dev/load"
PATHS_ANNOTATION = "sandbox.robotics.dev/load-paths"
MAX_IN_FLIGHT = 64


@dataclass(frozen=True)
class LoadPlan:
    namespace: str
    host: str
    rps: float
    paths: tuple[str, ...]


def plans_for(namespace: str, ingresses: list[JSON], config: LoadConfig) -> list[LoadPlan]:
    if not config.enabled:
        return []
    plans: dict[str, LoadPlan] = {}
    for ingress in ingresses:
        ann = annotations_of(ingress)
        if ann.get(CANARY, "").lower() == "true" or LOAD_ANNOTATION not in ann:
            continue
        try:
            rps = float(ann[LOAD_ANNOTATION])
        except ValueError:
            log.warning(
                "ingress %s/%s: %s is not a number",
                namespace,
                ingress["metadata"]["name"],
                LOAD_ANNOTATION,
            )
            continue
        paths = tuple(
            p.strip() for p in ann.get(PATHS_ANNOTATION, "").split(",") if p.strip()
        ) or tuple(config.paths)
        spec = ingress.get("spec") or {}
        hosts = (
            spec.get("hostnames") or []
            if ingress.get("kind") == "HTTPRoute"
            else [rule.get("host", "") for rule in spec.get("rules") or []]
        )
        for host in hosts:
            if host and rps > 0:
                plans[host] = LoadPlan(namespace, host, rps, paths)
    for key, item in config.hosts.items():
        ns, _, host = key.partition("/")
        if ns == namespace and host:
            rps = float(item.get("rps", config.rps))
            paths = tuple(item.get("paths") or config.paths)
            if rps > 0:
                plans[host] = LoadPlan(namespace, host, rps, paths)
    return list(plans.values())


class LoadGenerator:
    """One task per planned host; re-planned whenever the namespace's Ingresses change."""

    def __init__(self, faults: FaultRegistry) -> None:
        self.faults = faults
        self.tasks: dict[tuple[str, str], tuple[LoadPlan, asyncio.Task[None]]] = {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    def apply(self, namespace: str, router_port: int, plans: list[LoadPlan]) -> None:
        wanted = {(p.namespace, p.host): p for p in plans}
        for key, (plan, task) in list(self.tasks.items()):
            if key[0] == namespace and wanted.get(key) != plan:
                task.cancel()
                del self.tasks[key]
        for key, plan in wanted.items():
            if key not in self.tasks:
                task = asyncio.create_task(
                    self._drive(plan, router_port), name=f"load:{key[0]}/{key[1]}"
                )
                self.tasks[key] = (plan, task)
                log.info(
                    "load on %s/%s: %.1f rps over %s",
                    plan.namespace,
                    plan.host,
                    plan.rps,
                    list(plan.paths),
                )

    async def _drive(self, plan: LoadPlan, port: int) -> None:
        interval = 1.0 / plan.rps
        paths = itertools.cycle(plan.paths)
        in_flight: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += interval
            if (
                self.faults.load_running(plan.namespace, plan.host)
                and len(in_flight) < MAX_IN_FLIGHT
            ):
                task = asyncio.create_task(self._one(port, plan.host, next(paths)))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            delay = next_at - loop.time()
            if delay < -1.0:  # fell behind (machine busy): do not burst to catch up
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(max(0.0, delay))

    async def _one(self, port: int, host: str, path: str) -> None:
        try:
            async with self.session.get(
                f"http://127.0.0.1:{port}{path}", headers={"Host": host}
            ) as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("load request to %s%s failed: %s", host, path, exc)

    async def close(self) -> None:
        for _, task in self.tasks.values():
            task.cancel()
        for _, task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()
        if self._session is not None:
            await self._session.close()
