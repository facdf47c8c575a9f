"""What each traffic router exports, as PromQL templates: the analysis asks the same
questions (requests, 5xx, the latency histogram) of either, so only these strings differ.

- ``ingress-nginx``: ``nginx_ingress_controller_requests`` and
  ``nginx_ingress_controller_request_duration_seconds`` (seconds). Canary requests carry a
  non-empty ``canary`` label, stable ones ``canary=""``.
- ``gateway-api``, as **Envoy Gateway** exports it: the Envoy proxy's cluster statistics
  ``envoy_cluster_upstream_rq_total``, ``envoy_cluster_upstream_rq_xx``
  (``envoy_response_code_class="5"``) and the ``envoy_cluster_upstream_rq_time`` histogram
  (milliseconds). Envoy Gateway names the cluster of an HTTPRoute rule
  ``httproute/<namespace>/<route>/rule/<i>``, and gives each backendRef its own cluster
  ``.../rule/<i>/backend/<j>`` only when the backendRefs carry filters; the manifests give
  each track a ``RequestHeaderModifier`` so the tracks are told apart. Stable is backendRef 0
  of rule 0; every other backend cluster of the route is the canary (the weighted canary
  backend and the header-routed rule).

Placeholders are filled by ``tasks.metrics.Target.placeholders``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Router = Literal["ingress-nginx", "gateway-api"]
ROUTERS: tuple[Router, ...] = ("ingress-nginx", "gateway-api")


@dataclass(frozen=True)
class RouterQueries:
    """The router-specific PromQL templates and the unit of the histogram's ``le``."""

    requests: str
    errors: str
    latency_buckets: str
    p99_rate: str
    le_seconds: float = 1.0  # multiply an ``le`` bound by this to get seconds

    def templates(self) -> dict[str, str]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "latency_buckets": self.latency_buckets,
            "p99_rate": self.p99_rate,
        }


# Canary-routed requests carry the main Ingress's name in real ingress-nginx; accept the
# canary Ingress's name too, in case an exporter labels them with it.
_INGRESS = 'namespace="{namespace}",ingress=~"{ingress}|{canary_ingress}",{canary_matcher}'
_NGINX_REQUESTS = "nginx_ingress_controller_requests{" + _INGRESS
_NGINX_BUCKETS = "nginx_ingress_controller_request_duration_seconds_bucket{" + _INGRESS + "}"

_CLUSTER = "{cluster_matcher}"
_ENVOY_BUCKETS = "envoy_cluster_upstream_rq_time_bucket{" + _CLUSTER + "}"

QUERIES: dict[Router, RouterQueries] = {
    "ingress-nginx": RouterQueries(
        requests=f"sum(increase({_NGINX_REQUESTS}}}[{{window}}]))",
        errors=f'sum(increase({_NGINX_REQUESTS},status=~"5.."}}[{{window}}]))',
        latency_buckets=f"sum by (le) (increase({_NGINX_BUCKETS}[{{window}}]))",
        p99_rate=f"histogram_quantile(0.99, sum by (le) (rate({_NGINX_BUCKETS}[{{window}}])))",
    ),
    "gateway-api": RouterQueries(
        requests=f"sum(increase(envoy_cluster_upstream_rq_total{{{_CLUSTER}}}[{{window}}]))",
        errors=(
            "sum(increase(envoy_cluster_upstream_rq_xx{"
            + _CLUSTER
            + ',envoy_response_code_class="5"}[{window}]))'
        ),
        latency_buckets=f"sum by (le) (increase({_ENVOY_BUCKETS}[{{window}}]))",
        p99_rate=(
            f"histogram_quantile(0.99, sum by (le) (rate({_ENVOY_BUCKETS}[{{window}}]))) / 1000"
        ),
        le_seconds=0.001,
    ),
}


def envoy_cluster(namespace: str, route: str, rule: int, backend: int | None = None) -> str:
    """Envoy Gateway's cluster name of an HTTPRoute rule (or of one backendRef of it)."""
    name = f"httproute/{namespace}/{route}/rule/{rule}"
    return name if backend is None else f"{name}/backend/{backend}"


def cluster_matcher(namespace: str, route: str, track: Literal["canary", "stable"]) -> str:
    """The ``envoy_cluster_name`` matcher of one track of ``route`` (see the module doc)."""
    stable = envoy_cluster(namespace, route, 0, 0)
    if track == "stable":
        return f'envoy_cluster_name="{stable}"'
    every = f"httproute/{namespace}/{route}/rule/[0-9]+/backend/[0-9]+"
    return f'envoy_cluster_name=~"{every}",envoy_cluster_name!="{stable}"'
