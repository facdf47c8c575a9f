"""Gateway API on the twin (issue 23): Gateway and HTTPRoute served by the Kubernetes API
(discovery, CRUD, watch, ``kubectl get httproutes -A``), their status written as Envoy
Gateway writes it, the router honouring weights and header matches, and Envoy's cluster
statistics scraped by a real Prometheus and read back through the analysis' own queries."""

from __future__ import annotations

import functools
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from core.catalog import MetricRules
from tasks.metrics import PrometheusSource, Target
from tasks.prometheus import PrometheusClient
from tests.fixtures_runtime import RuntimeTwin, namespace, service, web_deployment

pytestmark = pytest.mark.integration

NS = "production"
HOST = "fleet.example.test"
GW = "gateway.networking.k8s.io/v1"


def gateway(name: str) -> dict[str, Any]:
    return {
        "apiVersion": GW,
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "gatewayClassName": "eg",
            "listeners": [{"name": "http", "protocol": "HTTP", "port": 80}],
        },
    }


def track_filter(track: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "RequestHeaderModifier",
            "requestHeaderModifier": {"set": [{"name": "x-robotics-track", "value": track}]},
        }
    ]


def http_route(weight: int, *, canary_service: str = "fleet-canary") -> dict[str, Any]:
    return {
        "apiVersion": GW,
        "kind": "HTTPRoute",
        "metadata": {
            "name": "fleet",
            "namespace": NS,
            "annotations": {
                "sandbox.robotics.dev/load": "20",
                "sandbox.robotics.dev/load-paths": "/cgi-bin/status",
            },
        },
        "spec": {
            "parentRefs": [{"name": "fleet"}],
            "hostnames": [HOST],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [
                        {
                            "name": "fleet",
                            "port": 80,
                            "weight": 100 - weight,
                            "filters": track_filter("stable"),
                        },
                        {
                            "name": canary_service,
                            "port": 80,
                            "weight": weight,
                            "filters": track_filter("canary"),
                        },
                    ],
                },
                {
                    "matches": [
                        {
                            "path": {"type": "PathPrefix", "value": "/"},
                            "headers": [{"name": "x-canary", "value": "always"}],
                        }
                    ],
                    "backendRefs": [
                        {"name": canary_service, "port": 80, "filters": track_filter("canary")}
                    ],
                },
            ],
        },
    }


def _cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in obj.get("conditions") or [] if c["type"] == type_), {})


def _route_parent(rt: RuntimeTwin) -> dict[str, Any] | None:
    route = rt.get("httproute", "fleet", NS)
    parents = (route.get("status") or {}).get("parents") or []
    gen = route["metadata"]["generation"]
    if parents and all(c.get("observedGeneration") == gen for c in parents[0]["conditions"]):
        return dict(parents[0])
    return None


def _available(rt: RuntimeTwin, name: str) -> bool:
    status = rt.get("deployment", name, NS).get("status") or {}
    return status.get("availableReplicas", 0) >= 1


def test_weighted_httproute_status_routing_and_envoy_metrics(runtime_twin: RuntimeTwin) -> None:
    rt = runtime_twin
    stable, canary = {"app": "fleet", "track": "stable"}, {"app": "fleet", "track": "canary"}
    rt.apply(
        namespace(NS),
        web_deployment("fleet", NS, rt.images.web_v1, labels=stable),
        web_deployment("fleet-canary", NS, rt.images.web_v2, labels=canary),
        service("fleet", NS, stable),
        service("fleet-canary", NS, canary),
        gateway("fleet"),
        http_route(20, canary_service="fleet-missing"),
    )
    # A backendRef to a Service that does not exist: accepted, but ResolvedRefs False.
    parent = rt.wait_for("route status", lambda: _route_parent(rt), timeout=20)
    assert parent["controllerName"] == "gateway.envoyproxy.io/gatewayclass-controller"
    assert parent["parentRef"] == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": "fleet",
    }
    assert _cond(parent, "Accepted")["status"] == "True"
    resolved = _cond(parent, "ResolvedRefs")
    assert (resolved["status"], resolved["reason"]) == ("False", "BackendNotFound")
    assert "rule 0 backendRef 1: service production/fleet-missing not found" in resolved["message"]

    rt.apply(http_route(20))
    rt.wait_for(
        "ResolvedRefs True",
        lambda: (p := _route_parent(rt)) and _cond(p, "ResolvedRefs")["status"] == "True",
        timeout=20,
    )
    gw = rt.get("gateway", "fleet", NS)
    assert _cond(gw["status"], "Programmed")["status"] == "True"
    assert gw["status"]["addresses"] == [{"type": "IPAddress", "value": "127.0.0.1"}]
    assert gw["status"]["listeners"][0]["attachedRoutes"] == 1
    for name in ("fleet", "fleet-canary"):
        rt.wait_for(f"{name} available", functools.partial(_available, rt, name), timeout=60)

    url = f"{rt.router(NS)}/cgi-bin/status"
    with httpx.Client(timeout=10) as client:
        with ThreadPoolExecutor(max_workers=8) as pool:
            versions = list(
                pool.map(
                    lambda _: client.get(url, headers={"Host": HOST}).text.split()[0], range(500)
                )
            )
        share = versions.count("version=v2") / len(versions)
        assert 0.15 <= share <= 0.25, f"canary got {share:.1%} of 500 requests at weight 20"
        # The header match wins over the weighted rule.
        assert all(
            client.get(url, headers={"Host": HOST, "X-Canary": "always"}).text.startswith(
                "version=v2"
            )
            for _ in range(10)
        )

    # kubectl get httproutes -A, answered by the twin with the CRD's columns.
    out = rt.kube.kubectl("get", "httproutes", "-A").stdout
    assert out.split("\n")[0].split() == ["NAMESPACE", "NAME", "HOSTNAMES", "AGE"]
    assert f'["{HOST}"]' in out and "fleet" in out
    listed = json.loads(rt.kube.kubectl("get", "gateways", "-n", NS, "-o", "json").stdout)
    assert [g["metadata"]["name"] for g in listed["items"]] == ["fleet"]

    # Envoy Gateway's per-backend clusters, in Prometheus, read by the analysis' queries.
    metrics = httpx.get(f"{rt.control_url}/metrics", timeout=10).text
    assert 'envoy_cluster_name="httproute/production/fleet/rule/0/backend/1"' in metrics
    assert "envoy_cluster_upstream_rq_time_bucket{" in metrics
    target = Target(service="fleet", namespace=NS, route="fleet", router="gateway-api")
    with PrometheusClient(base_url=rt.prometheus.url) as prom:
        source = PrometheusSource(prom, target, MetricRules(cpu=None, memory=None))
        # increase() needs two scrapes of each cluster inside the window; await the
        # observation the analysis would make rather than the first sample of one series.
        seen = rt.wait_for(
            "both tracks observed in Prometheus",
            lambda: (
                (o := source.observe(datetime.now(UTC), 30)).canary.requests
                and o.stable.requests
                and o
            ),
            timeout=30,
        )
    assert (seen.stable.requests or 0) > (seen.canary.requests or 0) > 0
    assert seen.canary.values["error_ratio"] == 0
    assert 0 < (seen.stable.values["p99_latency_seconds"] or 0) < 5

    # Weight 0: the canary gets nothing from the weighted rule.
    rt.apply(http_route(0))
    rt.wait_for("weight 0 routed", lambda: _route_parent(rt), timeout=20)
    with httpx.Client(timeout=10) as client:
        assert all(
            client.get(url, headers={"Host": HOST}).text.startswith("version=v1") for _ in range(40)
        )
