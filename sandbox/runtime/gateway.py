"""Gateway API in the twin, behaving as **Envoy Gateway** does for what releases use.

The twin plays the controller ``gateway.envoyproxy.io/gatewayclass-controller`` of the
GatewayClass ``eg`` (created at start, as Envoy Gateway's quickstart does). For each
namespace it:

- writes ``status`` of its ``GatewayClass``, of each ``Gateway`` of that class (address
  127.0.0.1, conditions ``Accepted`` and ``Programmed``, per-listener ``attachedRoutes``) and
  of each ``HTTPRoute`` attached to one (``status.parents[]``: ``parentRef``,
  ``controllerName`` and the conditions ``Accepted`` and ``ResolvedRefs`` with
  ``observedGeneration``, reasons and messages as Envoy Gateway words them). Parents of other
  controllers are left alone, and a route whose Gateway does not exist gets no status, as
  no controller owns it.
- routes requests: ``hostnames`` (exact before ``*.`` wildcard), then the Gateway API's
  precedence of matches (Exact path, longest PathPrefix, method, most header matches, most
  query matches, oldest route, rule order); the chosen rule picks a backendRef at random in
  proportion to ``weight`` (default 1; 0 takes nothing). A backendRef to a missing Service
  or port answers 500 for its share (Envoy Gateway's ``invalid-backend-cluster``); a valid one
  without ready endpoints answers 503 ("no healthy upstream"). ``RequestHeaderModifier``
  filters (rule or backendRef) are applied; other filter types are not modelled.
- exports Envoy's cluster statistics per Envoy Gateway cluster: the rule's
  ``httproute/<ns>/<route>/rule/<i>``, or one ``.../backend/<j>`` per backendRef when any
  backendRef carries filters or is invalid (``NeedsClusterPerSetting``).

The Gateway's listeners are served on the namespace's router port (the same port as the
namespace's Ingresses): its ``port`` is what a real load balancer would listen on.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sandbox.runtime.objects import JSON, now_iso

GROUP = "gateway.networking.k8s.io"
API_VERSION = f"{GROUP}/v1"
CONTROLLER = "gateway.envoyproxy.io/gatewayclass-controller"
DEFAULT_CLASS = "eg"
ROUTE_KINDS = [{"group": GROUP, "kind": "HTTPRoute"}, {"group": GROUP, "kind": "GRPCRoute"}]

# Envoy's default histogram buckets (milliseconds) plus finer ones between 100 ms and 1 s, as
# ``stats_config.histogram_bucket_settings`` in the EnvoyProxy bootstrap allows: the same
# resolution the sandbox's ingress-nginx has, so the two routers judge alike.
BUCKETS_MS = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    150,
    200,
    250,
    300,
    400,
    500,
    750,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)


# --- routing table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendChoice:
    service: str
    port: int | str
    weight: int
    cluster: str
    valid: bool
    header_filters: tuple[JSON, ...] = ()


@dataclass
class Candidate:
    """One ``matches`` entry of one rule of one attached route."""

    namespace: str
    route: str
    created: str
    rule_index: int
    hostnames: list[str]
    match: JSON
    backends: list[BackendChoice]
    rule_filters: tuple[JSON, ...] = ()

    def host_rank(self, host: str) -> int:
        """0 exact, 1 wildcard, 2 route without hostnames, -1 no match."""
        if not self.hostnames:
            return 2
        best = -1
        for name in self.hostnames:
            name = name.lower()
            if name == host:
                return 0
            if name.startswith("*.") and host.endswith(name[1:]) and len(host) > len(name) - 1:
                best = 1
        return best

    def matches(
        self, path: str, method: str, headers: dict[str, str], query: dict[str, str]
    ) -> bool:
        m = self.match
        p = m.get("path") or {"type": "PathPrefix", "value": "/"}
        kind, value = p.get("type", "PathPrefix"), p.get("value", "/")
        if kind == "Exact" and path != value:
            return False
        if kind == "PathPrefix":
            base = value.rstrip("/")
            if base and not (path == base or path.startswith(base + "/")):
                return False
        if kind == "RegularExpression" and not re.fullmatch(value, path):
            return False
        if m.get("method") and m["method"].upper() != method.upper():
            return False
        for h in m.get("headers") or []:
            got = headers.get(str(h.get("name", "")).lower())
            if got is None:
                return False
            if h.get("type") == "RegularExpression":
                if not re.fullmatch(h.get("value", ""), got):
                    return False
            elif got != h.get("value"):
                return False
        for q in m.get("queryParams") or []:
            got = query.get(str(q.get("name", "")))
            if got is None:
                return False
            if q.get("type") == "RegularExpression":
                if not re.fullmatch(q.get("value", ""), got):
                    return False
            elif got != q.get("value"):
                return False
        return True

    def precedence(self) -> tuple[Any, ...]:
        """Smaller sorts first (wins), per the HTTPRoute spec's rule precedence."""
        p = self.match.get("path") or {"type": "PathPrefix", "value": "/"}
        exact = 0 if p.get("type") == "Exact" else 1
        return (
            exact,
            -len(p.get("value", "/")),
            0 if self.match.get("method") else 1,
            -len(self.match.get("headers") or []),
            -len(self.match.get("queryParams") or []),
            self.created,
            f"{self.namespace}/{self.route}",
            self.rule_index,
        )

    def pick(self, rand: Callable[[], float]) -> BackendChoice | None:
        """A backendRef in proportion to its weight; None when every weight is 0."""
        total = sum(b.weight for b in self.backends)
        if total <= 0:
            return None
        point = rand() * total
        for backend in self.backends:
            if point < backend.weight:
                return backend
            point -= backend.weight
        return next(b for b in reversed(self.backends) if b.weight > 0)


def _ref_is_gateway(ref: JSON) -> bool:
    return bool(ref.get("group", GROUP) == GROUP and ref.get("kind", "Gateway") == "Gateway")


def _service_port(service: JSON | None, port: Any) -> bool:
    if service is None:
        return False
    ports = (service.get("spec") or {}).get("ports") or []
    return any(str(p.get("port")) == str(port) for p in ports)


def _backend_problem(
    ref: JSON, namespace: str, services: dict[str, JSON]
) -> tuple[str, str] | None:
    """(reason, message) when a backendRef does not resolve, as Envoy Gateway says it."""
    if ref.get("group", "") != "" or ref.get("kind", "Service") != "Service":
        return (
            "InvalidKind",
            f"Group is invalid, only the core API group (specified by omitting the group field or setting it to an empty string) and Kind Service are supported: {ref.get('kind')}",
        )
    if ref.get("namespace", namespace) != namespace:
        return (
            "RefNotPermitted",
            f"Backend ref to Service {ref.get('namespace')}/{ref.get('name')} not permitted by any ReferenceGrant.",
        )
    if ref.get("port") is None:
        return (
            "UnsupportedValue",
            "A valid port number corresponding to a port on the Service must be specified.",
        )
    name = ref.get("name", "")
    if name not in services:
        return "BackendNotFound", f"service {namespace}/{name} not found"
    if not _service_port(services[name], ref.get("port")):
        return "UnsupportedValue", f"port {ref.get('port')} not found on service {namespace}/{name}"
    return None


def _header_filters(filters: Iterable[JSON] | None) -> tuple[JSON, ...]:
    return tuple(
        f.get("requestHeaderModifier") or {}
        for f in filters or []
        if f.get("type") == "RequestHeaderModifier"
    )


def apply_header_filters(headers: dict[str, str], filters: Iterable[JSON]) -> dict[str, str]:
    out = dict(headers)
    for f in filters:
        for h in f.get("set") or []:
            out[str(h["name"]).lower()] = str(h["value"])
        for h in f.get("add") or []:
            key = str(h["name"]).lower()
            out[key] = f"{out[key]},{h['value']}" if key in out else str(h["value"])
        for name in f.get("remove") or []:
            out.pop(str(name).lower(), None)
    return out


def accepting_gateways(gateways: list[JSON], classes: dict[str, JSON]) -> dict[str, JSON]:
    """Gateways of this namespace whose class is ours."""
    ours = {
        name
        for name, gc in classes.items()
        if (gc.get("spec") or {}).get("controllerName") == CONTROLLER
    }
    return {
        g["metadata"]["name"]: g
        for g in gateways
        if (g.get("spec") or {}).get("gatewayClassName") in ours
    }


def _listener_allows(listener: JSON, route: JSON) -> bool:
    if listener.get("protocol", "HTTP") not in ("HTTP", "HTTPS"):
        return False
    allowed = ((listener.get("allowedRoutes") or {}).get("namespaces") or {}).get("from", "Same")
    return allowed in ("Same", "All")  # the router serves routes of the Gateway's namespace


def _hostnames_intersect(listener: JSON, route: JSON) -> bool:
    host = listener.get("hostname")
    names = (route.get("spec") or {}).get("hostnames") or []
    if not host or not names:
        return True
    for name in names:
        if name == host:
            return True
        if host.startswith("*.") and name.endswith(host[1:]):
            return True
        if name.startswith("*.") and host.endswith(name[1:]):
            return True
    return False


@dataclass
class Attachment:
    """How one parentRef of a route fared: accepted, and on which listeners."""

    ref: JSON
    gateway: str
    accepted: bool
    reason: str
    message: str


def attachments(route: JSON, gateways: dict[str, JSON]) -> list[Attachment]:
    namespace = route["metadata"]["namespace"]
    out = []
    for ref in (route.get("spec") or {}).get("parentRefs") or []:
        if not _ref_is_gateway(ref) or ref.get("namespace", namespace) != namespace:
            continue
        gateway = gateways.get(ref.get("name", ""))
        if gateway is None:
            continue  # not ours (or missing): no controller writes this parent's status
        listeners = (gateway.get("spec") or {}).get("listeners") or []
        section = ref.get("sectionName")
        if section:
            listeners = [lst for lst in listeners if lst.get("name") == section]
        allowed = [lst for lst in listeners if _listener_allows(lst, route)]
        if not allowed:
            out.append(
                Attachment(
                    ref,
                    gateway["metadata"]["name"],
                    False,
                    "NotAllowedByListeners",
                    "No listeners included by this parent ref allowed this attachment.",
                )
            )
            continue
        if not any(_hostnames_intersect(lst, route) for lst in allowed):
            out.append(
                Attachment(
                    ref,
                    gateway["metadata"]["name"],
                    False,
                    "NoMatchingListenerHostname",
                    "There were no hostname intersections between the HTTPRoute and this parent ref's Listener(s).",
                )
            )
            continue
        out.append(
            Attachment(ref, gateway["metadata"]["name"], True, "Accepted", "Route is accepted")
        )
    return out


def build_candidates(
    routes: list[JSON], gateways: dict[str, JSON], services: dict[str, JSON]
) -> list[Candidate]:
    """Every match of every rule of the routes accepted by one of ``gateways``."""
    found: list[Candidate] = []
    for route in routes:
        if not any(a.accepted for a in attachments(route, gateways)):
            continue
        meta = route["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        spec = route.get("spec") or {}
        for index, rule in enumerate(spec.get("rules") or [{}]):
            refs = rule.get("backendRefs") or []
            problems = [_backend_problem(r, namespace, services) for r in refs]
            per_backend = any(r.get("filters") for r in refs) or any(problems)
            rule_cluster = f"httproute/{namespace}/{name}/rule/{index}"
            backends = [
                BackendChoice(
                    service=str(r.get("name", "")),
                    port=r.get("port", 0),
                    weight=int(r.get("weight", 1)),
                    cluster=f"{rule_cluster}/backend/{j}" if per_backend else rule_cluster,
                    valid=problems[j] is None,
                    header_filters=_header_filters(r.get("filters")),
                )
                for j, r in enumerate(refs)
            ]
            for match in rule.get("matches") or [{"path": {"type": "PathPrefix", "value": "/"}}]:
                found.append(
                    Candidate(
                        namespace=namespace,
                        route=name,
                        created=meta.get("creationTimestamp", ""),
                        rule_index=index,
                        hostnames=[h.lower() for h in spec.get("hostnames") or []],
                        match=match,
                        backends=backends,
                        rule_filters=_header_filters(rule.get("filters")),
                    )
                )
    return found


def best_candidate(
    candidates: list[Candidate],
    host: str,
    path: str,
    method: str,
    headers: dict[str, str],
    query: dict[str, str],
) -> Candidate | None:
    ranked = []
    for c in candidates:
        rank = c.host_rank(host)
        if rank >= 0 and c.matches(path, method, headers, query):
            ranked.append(((rank, *c.precedence()), c))
    if not ranked:
        return None
    ranked.sort(key=lambda item: item[0])
    return ranked[0][1]


# --- status, as the controller writes it ------------------------------------------------------


def _condition(
    old: list[JSON], type_: str, status: str, reason: str, message: str, generation: int
) -> JSON:
    before = next((c for c in old if c.get("type") == type_), None)
    same = before is not None and before.get("status") == status
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": before.get("lastTransitionTime", now_iso())
        if same and before
        else now_iso(),
    }


def gateway_class_status(gc: JSON) -> JSON:
    gen = int(gc["metadata"].get("generation", 1))
    old = (gc.get("status") or {}).get("conditions") or []
    return {
        **(gc.get("status") or {}),
        "conditions": [_condition(old, "Accepted", "True", "Accepted", "Valid GatewayClass", gen)],
    }


def gateway_status(gateway: JSON, routes: list[JSON], gateways: dict[str, JSON]) -> JSON:
    gen = int(gateway["metadata"].get("generation", 1))
    status = gateway.get("status") or {}
    old = status.get("conditions") or []
    name = gateway["metadata"]["name"]
    listeners = []
    old_listeners = {lst.get("name"): lst for lst in status.get("listeners") or []}
    for lst in (gateway.get("spec") or {}).get("listeners") or []:
        prev = (old_listeners.get(lst.get("name")) or {}).get("conditions") or []
        supported = lst.get("protocol", "HTTP") in ("HTTP", "HTTPS")
        attached = sum(
            1
            for r in routes
            for a in attachments(r, gateways)
            if a.accepted
            and a.gateway == name
            and a.ref.get("sectionName") in (None, lst.get("name"))
        )
        if supported:
            conds = [
                _condition(
                    prev,
                    "Programmed",
                    "True",
                    "Programmed",
                    "Sending translated listener configuration to the data plane",
                    gen,
                ),
                _condition(
                    prev,
                    "Accepted",
                    "True",
                    "Accepted",
                    "Listener has been successfully translated",
                    gen,
                ),
                _condition(
                    prev,
                    "ResolvedRefs",
                    "True",
                    "ResolvedRefs",
                    "Listener has been successfully translated",
                    gen,
                ),
            ]
        else:
            conds = [
                _condition(
                    prev,
                    "Accepted",
                    "False",
                    "UnsupportedProtocol",
                    f"Protocol {lst.get('protocol')} is unsupported.",
                    gen,
                ),
                _condition(
                    prev,
                    "Programmed",
                    "False",
                    "Invalid",
                    "Listener is invalid, see other Conditions for details.",
                    gen,
                ),
            ]
        listeners.append(
            {
                "name": lst.get("name"),
                "supportedKinds": ROUTE_KINDS if supported else [],
                "attachedRoutes": attached,
                "conditions": conds,
            }
        )
    return {
        **status,
        "addresses": [{"type": "IPAddress", "value": "127.0.0.1"}],
        "conditions": [
            _condition(
                old,
                "Accepted",
                "True",
                "Accepted",
                "The Gateway has been scheduled by Envoy Gateway",
                gen,
            ),
            _condition(
                old,
                "Programmed",
                "True",
                "Programmed",
                "Address assigned to the Gateway, 1/1 envoy replicas available",
                gen,
            ),
        ],
        "listeners": listeners,
    }


def route_status(route: JSON, gateways: dict[str, JSON], services: dict[str, JSON]) -> JSON:
    """``status.parents`` of an HTTPRoute: ours recomputed, other controllers' kept."""
    gen = int(route["metadata"].get("generation", 1))
    namespace = route["metadata"]["namespace"]
    status = route.get("status") or {}
    previous = status.get("parents") or []
    others = [p for p in previous if p.get("controllerName") != CONTROLLER]
    problem: tuple[str, str] | None = None
    for i, rule in enumerate((route.get("spec") or {}).get("rules") or []):
        for j, ref in enumerate(rule.get("backendRefs") or []):
            found = _backend_problem(ref, namespace, services)
            if found and problem is None:
                problem = (
                    found[0],
                    f"Failed to process route rule {i} backendRef {j}: {found[1]}.",
                )
    ours = []
    for a in attachments(route, gateways):
        parent_ref = {"group": GROUP, "kind": "Gateway", **a.ref}
        prev = next(
            (
                p.get("conditions") or []
                for p in previous
                if p.get("controllerName") == CONTROLLER and p.get("parentRef") == parent_ref
            ),
            [],
        )
        resolved = (
            _condition(prev, "ResolvedRefs", "False", problem[0], problem[1], gen)
            if problem
            else _condition(
                prev,
                "ResolvedRefs",
                "True",
                "ResolvedRefs",
                "Resolved all the Object references for the Route",
                gen,
            )
        )
        accepted = _condition(
            prev, "Accepted", "True" if a.accepted else "False", a.reason, a.message, gen
        )
        ours.append(
            {
                "parentRef": parent_ref,
                "controllerName": CONTROLLER,
                "conditions": [accepted, resolved],
            }
        )
    return {**status, "parents": others + ours}


# --- Envoy cluster statistics -------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _bound(ms: float) -> str:
    return str(int(ms)) if ms == int(ms) else repr(ms)


@dataclass
class _Cluster:
    total: int = 0
    codes: dict[int, int] = field(default_factory=dict)
    none_healthy: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS_MS))
    time_sum: float = 0.0
    time_count: int = 0


class EnvoyMetrics:
    """Envoy's ``cluster.<name>.*`` statistics as its Prometheus endpoint names them:
    ``envoy_cluster_upstream_rq_total``, ``envoy_cluster_upstream_rq{envoy_response_code}``,
    ``envoy_cluster_upstream_rq_xx{envoy_response_code_class}``,
    ``envoy_cluster_upstream_rq_time`` (histogram, milliseconds) and
    ``envoy_cluster_upstream_cx_none_healthy``; the one label is ``envoy_cluster_name``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clusters: dict[str, _Cluster] = {}

    def _get(self, cluster: str) -> _Cluster:
        found = self.clusters.get(cluster)
        if found is None:
            found = self.clusters[cluster] = _Cluster()
        return found

    def observe(self, cluster: str, code: int, seconds: float) -> None:
        """An upstream request that got ``code`` (from the upstream, or Envoy's own 503/504
        on a connection failure or timeout, which Envoy charges to the cluster too)."""
        ms = seconds * 1000
        with self._lock:
            c = self._get(cluster)
            c.total += 1
            c.codes[code] = c.codes.get(code, 0) + 1
            for i, bound in enumerate(BUCKETS_MS):
                if ms <= bound:
                    c.buckets[i] += 1
            c.time_sum += ms
            c.time_count += 1

    def no_healthy_upstream(self, cluster: str) -> None:
        with self._lock:
            self._get(cluster).none_healthy += 1

    def render(self) -> list[str]:
        with self._lock:
            clusters = {
                k: _Cluster(
                    v.total,
                    dict(v.codes),
                    v.none_healthy,
                    list(v.buckets),
                    v.time_sum,
                    v.time_count,
                )
                for k, v in self.clusters.items()
            }
        out = ["# TYPE envoy_cluster_upstream_rq_total counter"]
        for name, c in sorted(clusters.items()):
            out.append(
                f'envoy_cluster_upstream_rq_total{{envoy_cluster_name="{_escape(name)}"}} {c.total}'
            )
        out.append("# TYPE envoy_cluster_upstream_rq counter")
        for name, c in sorted(clusters.items()):
            for code, n in sorted(c.codes.items()):
                out.append(
                    f'envoy_cluster_upstream_rq{{envoy_response_code="{code}",envoy_cluster_name="{_escape(name)}"}} {n}'
                )
        out.append("# TYPE envoy_cluster_upstream_rq_xx counter")
        for name, c in sorted(clusters.items()):
            classes: dict[int, int] = {}
            for code, n in c.codes.items():
                classes[code // 100] = classes.get(code // 100, 0) + n
            for cls, n in sorted(classes.items()):
                out.append(
                    f'envoy_cluster_upstream_rq_xx{{envoy_response_code_class="{cls}",envoy_cluster_name="{_escape(name)}"}} {n}'
                )
        out.append("# TYPE envoy_cluster_upstream_cx_none_healthy counter")
        for name, c in sorted(clusters.items()):
            out.append(
                f'envoy_cluster_upstream_cx_none_healthy{{envoy_cluster_name="{_escape(name)}"}} {c.none_healthy}'
            )
        out.append("# TYPE envoy_cluster_upstream_rq_time histogram")
        for name, c in sorted(clusters.items()):
            label = f'envoy_cluster_name="{_escape(name)}"'
            for bound, n in zip(BUCKETS_MS, c.buckets, strict=True):
                out.append(
                    f'envoy_cluster_upstream_rq_time_bucket{{{label},le="{_bound(bound)}"}} {n}'
                )
            out.append(f'envoy_cluster_upstream_rq_time_bucket{{{label},le="+Inf"}} {c.time_count}')
            out.append(f"envoy_cluster_upstream_rq_time_sum{{{label}}} {c.time_sum!r}")
            out.append(f"envoy_cluster_upstream_rq_time_count{{{label}}} {c.time_count}")
        return out
