"""``/metrics`` of the twin, in the Prometheus text format, named as the real exporters name
them so the product's PromQL is the PromQL of a real cluster:

- ``nginx_ingress_controller_requests`` (counter) and
  ``nginx_ingress_controller_request_duration_seconds`` (histogram), from every response the
  ingress router proxies. Labels as ingress-nginx: ``ingress`` and ``service`` name the
  *main* Ingress of the host/path and its Service; ``canary`` is the upstream the request
  was routed to when it went to the canary (``<namespace>-<service>-<port>``, ingress-nginx's
  ``proxy_alternative_upstream_name``) and ``""`` otherwise. So ``canary!=""`` selects the
  canary's traffic and ``canary=""`` the stable one.
- ``kube_pod_container_status_restarts_total`` (kube-state-metrics), from pod status.
- ``container_cpu_usage_seconds_total`` and ``container_memory_working_set_bytes``
  (cAdvisor), from Docker's stats of each running container.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sandbox.runtime.engine import (
    CONTAINER_LABEL,
    POD_NAME_LABEL,
    POD_NS_LABEL,
    Engine,
    in_thread,
)

log = logging.getLogger("sandbox.runtime.metrics")

# ingress-nginx's default buckets (prometheus.DefBuckets) plus finer ones between 0.1 s and
# 1 s, as `--time-buckets` allows: with the defaults a +300 ms canary and a ~250 ms stable
# land in the same 0.25-0.5 bucket and their interpolated P99s look alike.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_LABELS = ("namespace", "ingress", "service", "canary", "host", "method", "path", "status")
DURATION_LABELS = ("namespace", "ingress", "service", "canary", "host", "method", "path", "status")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Iterable[str], values: Iterable[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}"


def _num(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


@dataclass
class _Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    count: int = 0


class RequestMetrics:
    """What the router observed: one counter and one histogram, keyed by label values."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, ...], int] = {}
        self.durations: dict[tuple[str, ...], _Histogram] = {}

    def observe(self, labels: dict[str, str], seconds: float) -> None:
        key = tuple(labels.get(n, "") for n in REQUEST_LABELS)
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1
            hist = self.durations.get(key)
            if hist is None:
                hist = self.durations[key] = _Histogram()
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    hist.buckets[i] += 1
            hist.total += seconds
            hist.count += 1

    def render(self) -> list[str]:
        with self._lock:
            requests = dict(self.requests)
            durations = {k: (list(v.buckets), v.total, v.count) for k, v in self.durations.items()}
        out = [
            "# HELP nginx_ingress_controller_requests The total number of client requests",
            "# TYPE nginx_ingress_controller_requests counter",
        ]
        for key, count in sorted(requests.items()):
            out.append(f"nginx_ingress_controller_requests{_labels(REQUEST_LABELS, key)} {count}")
        name = "nginx_ingress_controller_request_duration_seconds"
        out += [
            f"# HELP {name} The request processing time in milliseconds",
            f"# TYPE {name} histogram",
        ]
        for key, (buckets, total, count) in sorted(durations.items()):
            plain = _labels(DURATION_LABELS, key)
            for bound, n in zip(BUCKETS, buckets, strict=True):
                le = 'le="' + str(bound) + '"'
                out.append(f"{name}_bucket{_labels(DURATION_LABELS, key, le)} {n}")
            inf = _labels(DURATION_LABELS, key, 'le="+Inf"')
            out.append(f"{name}_bucket{inf} {count}")
            out.append(f"{name}_sum{plain} {total!r}")
            out.append(f"{name}_count{plain} {count}")
        return out


class ContainerStats:
    """cAdvisor-style usage of each running container, refreshed in the background."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # (namespace, pod, container) -> (cpu seconds, working set bytes)
        self.values: dict[tuple[str, str, str], tuple[float, float]] = {}

    def _collect(self) -> dict[tuple[str, str, str], tuple[float, float]]:
        values = {}
        for container in self.engine.ours():
            if container.state != "running":
                continue
            labels = container.labels
            key = (
                labels.get(POD_NS_LABEL, ""),
                labels.get(POD_NAME_LABEL, ""),
                labels.get(CONTAINER_LABEL, ""),
            )
            if not key[1]:
                continue
            try:
                stats = self.engine.stats(container.id)
            except Exception as exc:  # the container exited between list and stats
                log.debug("no stats for %s: %s", container.name, exc)
                continue
            if not stats:
                continue
            cpu = (
                float(((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage", 0))
                / 1e9
            )
            mem = stats.get("memory_stats") or {}
            detail = mem.get("stats") or {}
            inactive = detail.get("total_inactive_file", detail.get("inactive_file", 0))
            working = max(0.0, float(mem.get("usage", 0)) - float(inactive))
            values[key] = (cpu, working)
        return values

    async def run(self, interval: float = 2.0) -> None:
        while True:
            try:
                self.values = await in_thread(self._collect)
            except Exception as exc:  # dockerd hiccup: keep the last values, try again
                log.warning("docker stats failed: %s", exc)
            await asyncio.sleep(interval)

    def render(self) -> list[str]:
        keys = ("namespace", "pod", "container")
        out = [
            "# HELP container_cpu_usage_seconds_total Cumulative cpu time consumed in seconds.",
            "# TYPE container_cpu_usage_seconds_total counter",
        ]
        values = dict(self.values)
        for key, (cpu, _) in sorted(values.items()):
            out.append(f"container_cpu_usage_seconds_total{_labels(keys, key)} {cpu!r}")
        out += [
            "# HELP container_memory_working_set_bytes Current working set in bytes.",
            "# TYPE container_memory_working_set_bytes gauge",
        ]
        for key, (_, mem) in sorted(values.items()):
            out.append(f"container_memory_working_set_bytes{_labels(keys, key)} {_num(mem)}")
        return out


def restart_metrics(pods: list[dict[str, Any]]) -> list[str]:
    """kube-state-metrics' restart counter, from each pod's containerStatuses."""
    keys = ("namespace", "pod", "container")
    out = [
        "# HELP kube_pod_container_status_restarts_total The number of container restarts per container.",
        "# TYPE kube_pod_container_status_restarts_total counter",
    ]
    for pod in pods:
        meta = pod["metadata"]
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            values = (meta["namespace"], meta["name"], cs.get("name", ""))
            out.append(
                f"kube_pod_container_status_restarts_total{_labels(keys, values)} {int(cs.get('restartCount', 0))}"
            )
    return out
