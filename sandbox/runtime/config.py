"""The runtime's settings, read once from ``twin-config.json``.

Keys (all optional but ``kube_port`` of the twin itself):

- ``registry``: ``{"url", "username", "password"}`` of the sandbox registry;
- ``control_port``: where ``/metrics`` and ``/admin/*`` are served (a free port if absent);
- ``ingress_ports``: ``{"<namespace>": <port>}`` for the per-namespace routers;
- ``load``: ``{"enabled": true, "rps": 5, "paths": ["/v1/status"],
  "hosts": {"<namespace>/<host>": {"rps": 5, "paths": [...]}}}``;
- ``restart_backoff``: ``{"initial": 1, "max": 10, "reset_after": 60}`` seconds;
- ``resync_seconds``: how often every controller re-checks everything (default 2);
- ``graceful_deletion``: the kubelet binds the pods it runs to its node (``spec.nodeName``),
  so API deletes are graceful (SIGTERM, SIGKILL after the grace period, the pod object gone
  last, a Foreground owner after its pods). Off by default for now: the suite's other twin
  tests were written against at-once deletion and have not run with it on (a PID-1 process
  without a SIGTERM handler, e.g. busybox httpd, then takes its full grace period to go).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sandbox.runtime.engine import RegistryAuth


@dataclass
class LoadConfig:
    enabled: bool = True
    rps: float = 5.0
    paths: list[str] = field(default_factory=lambda: ["/v1/status"])
    # "<namespace>/<host>" -> {"rps": float, "paths": [...]}; these run even without annotation
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class RuntimeConfig:
    registry: RegistryAuth | None = None
    control_port: int | None = None
    ingress_ports: dict[str, int] = field(default_factory=dict)
    load: LoadConfig = field(default_factory=LoadConfig)
    backoff_initial: float = 1.0
    backoff_max: float = 10.0
    backoff_reset_after: float = 60.0
    resync_seconds: float = 2.0
    graceful_deletion: bool = False

    @classmethod
    def from_twin(cls, raw: dict[str, Any]) -> RuntimeConfig:
        reg = raw.get("registry") or None
        registry = None
        if reg:
            if not isinstance(reg, dict) or not reg.get("url"):
                raise ValueError('twin-config "registry" needs at least {"url": ...}')
            registry = RegistryAuth(
                url=str(reg["url"]),
                username=str(reg.get("username") or ""),
                password=str(reg.get("password") or ""),
            )
        load_raw = raw.get("load") or {}
        load = LoadConfig(
            enabled=bool(load_raw.get("enabled", True)),
            rps=float(load_raw.get("rps", 5.0)),
            paths=list(load_raw.get("paths") or ["/v1/status"]),
            hosts=dict(load_raw.get("hosts") or {}),
        )
        backoff = raw.get("restart_backoff") or {}
        return cls(
            registry=registry,
            control_port=int(raw["control_port"]) if raw.get("control_port") else None,
            ingress_ports={str(k): int(v) for k, v in (raw.get("ingress_ports") or {}).items()},
            load=load,
            backoff_initial=float(backoff.get("initial", 1.0)),
            backoff_max=float(backoff.get("max", 10.0)),
            backoff_reset_after=float(backoff.get("reset_after", 60.0)),
            resync_seconds=float(raw.get("resync_seconds", 2.0)),
            graceful_deletion=bool(raw.get("graceful_deletion", False)),
        )

    def next_backoff(self, previous: float, ran_seconds: float) -> float:
        """Kubelet-style doubling back-off, reset after a container ran long enough."""
        if previous <= 0 or ran_seconds >= self.backoff_reset_after:
            return self.backoff_initial
        return min(previous * 2, self.backoff_max)
