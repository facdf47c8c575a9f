"""Traffic routers chosen per service (issue 23): the Gateway API canary edit (golden file),
the catalog's ``traffic`` section and its one-router-per-host rule, and the PromQL each router
gets. Regenerate the golden file with ``ROBOTICS_CD_UPDATE_GOLDEN=1``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from core.catalog import parse_catalog
from core.errors import CatalogError, InvalidInput
from core.kustomize import (
    CanarySettings,
    FieldChange,
    canary_fields,
    parse_canary,
    render_canary,
    route_weight,
    set_route_weights,
    unexpected_changes,
)
from core.traffic import QUERIES, envoy_cluster
from tasks.metrics import Target, buckets_from_samples, render

GOLDEN = Path(__file__).parent / "golden" / "kustomize"
SVC = "fleet-planner"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("ROBOTICS_CD_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs; regenerate with ROBOTICS_CD_UPDATE_GOLDEN=1"


def gateway_canary() -> str:
    return (GOLDEN / "input-canary-gateway.yaml").read_text()


# --- the canary step on an HTTPRoute ---------------------------------------------------------


def test_a_canary_step_edits_only_the_weights_and_the_replicas():
    out = render_canary(SVC, CanarySettings(replicas=2, weight=10), previous=gateway_canary())
    check_golden("step-canary-gateway.yaml", out)
    before = gateway_canary().splitlines()
    after = out.splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert changed == [
        ("  replicas: 0", "  replicas: 2"),
        ("      weight: 100", "      weight: 90"),
        ("      weight: 0", "      weight: 10"),
    ]
    assert parse_canary(out, SVC) == CanarySettings(replicas=2, weight=10)


@pytest.mark.parametrize("weight", [0, 10, 25, 50, 100])
def test_the_weights_always_add_up_to_100(weight):
    out = set_route_weights(gateway_canary(), SVC, weight)
    route = next(d for d in yaml.safe_load_all(out) if d["kind"] == "HTTPRoute")
    refs = {r["name"]: r["weight"] for r in route["spec"]["rules"][0]["backendRefs"]}
    assert refs == {SVC: 100 - weight, f"{SVC}-canary": weight}
    assert route_weight(route, SVC) == weight


def test_the_weight_is_the_canary_share_whatever_the_scale():
    route = {
        "spec": {
            "rules": [
                {"backendRefs": [{"name": SVC, "weight": 9}, {"name": f"{SVC}-canary"}]},
            ]
        }
    }
    assert route_weight(route, SVC) == 10  # 1 of 10: Gateway API's default weight is 1


def test_a_route_without_both_tracks_is_refused():
    text = gateway_canary().replace(f"name: {SVC}-canary\n      port", "name: other\n      port")
    with pytest.raises(InvalidInput, match="both fleet-planner and fleet-planner-canary"):
        parse_canary(text, SVC)


def test_the_ingress_form_is_unchanged_for_ingress_nginx():
    out = render_canary("api-gateway", CanarySettings(1, 25))
    assert "canary-weight" in out and "HTTPRoute" not in out
    assert parse_canary(out, "api-gateway") == CanarySettings(1, 25)


def test_route_weight_changes_are_the_intended_fields():
    key = f"HTTPRoute/production/{SVC}"
    weight = FieldChange(key, ("spec", "rules", "0", "backendRefs", "1", "weight"), 0, 10)
    matches = FieldChange(key, ("spec", "rules", "1", "matches", "0", "path", "value"), "/", "/x")
    assert unexpected_changes([weight, matches], canary_fields(SVC)) == [matches]


# --- the catalog ----------------------------------------------------------------------------

CATALOG = """\
defaults:
  push_registry: registry.example.com
  pull_registry: registry-vpc.example.com
  manifests_repo: https://git.example.com/m.git
services:
  api-gateway:
    repo: r
    github: robotics/robotics-api
    image: robotics-serving/api-gateway
    environments:
      production: {path: p, argocd_app: a-prod, namespace: production, host: api.robotics.local}
    approvers: [alice]
  fleet-planner:
    repo: r
    github: robotics/fleet-planner
    image: robotics-serving/fleet-planner
    traffic: {router: gateway-api}
    environments:
      production: {path: q, argocd_app: f-prod, namespace: production, host: HOST}
    approvers: [alice]
"""


def test_each_service_names_its_router_and_ingress_nginx_is_the_default():
    catalog = parse_catalog(CATALOG.replace("HOST", "fleet.robotics.local"), env={})
    assert catalog.service("api-gateway").traffic.router == "ingress-nginx"
    assert catalog.service("fleet-planner").traffic.router == "gateway-api"


def test_one_host_given_to_both_routers_is_refused_with_the_reason():
    with pytest.raises(CatalogError) as caught:
        parse_catalog(CATALOG.replace("HOST", "API.robotics.local"), env={})
    message = str(caught.value)
    assert "'API.robotics.local' in production is given to both routers" in message
    assert "api-gateway uses ingress-nginx, fleet-planner uses gateway-api" in message
    assert "resolves to one load balancer" in message


def test_the_same_host_in_another_environment_is_not_a_conflict():
    text = CATALOG.replace("HOST", "api.robotics.local").replace(
        "production: {path: q, argocd_app: f-prod, namespace: production",
        "staging: {path: q, argocd_app: f-stg, namespace: staging",
    )
    assert parse_catalog(text, env={}).service("fleet-planner").traffic.router == "gateway-api"


def test_an_unknown_router_is_refused():
    with pytest.raises(CatalogError, match=r"traffic\.router"):
        parse_catalog(CATALOG.replace("HOST", "f.local").replace("gateway-api", "traefik"), env={})


# --- PromQL per router ----------------------------------------------------------------------


def test_gateway_api_queries_read_envoy_gateway_cluster_stats():
    target = Target(service=SVC, namespace="production", router="gateway-api")
    canary = target.placeholders("canary", "30s")
    stable = target.placeholders("stable", "30s")
    assert render(target.templates["errors"], stable) == (
        "sum(increase(envoy_cluster_upstream_rq_xx{"
        'envoy_cluster_name="httproute/production/fleet-planner/rule/0/backend/0",'
        'envoy_response_code_class="5"}[30s]))'
    )
    assert render(target.templates["requests"], canary) == (
        "sum(increase(envoy_cluster_upstream_rq_total{"
        'envoy_cluster_name=~"httproute/production/fleet-planner/rule/[0-9]+/backend/[0-9]+",'
        'envoy_cluster_name!="httproute/production/fleet-planner/rule/0/backend/0"}[30s]))'
    )
    assert "envoy_cluster_upstream_rq_time_bucket" in render(
        target.templates["latency_buckets"], canary
    )
    # Pod metrics do not depend on the router.
    assert 'pod=~"fleet-planner-canary-' in render(target.templates["cpu"], canary)


def test_envoy_latency_buckets_in_milliseconds_become_seconds():
    from tasks.prometheus import Sample

    samples = [Sample(labels={"le": "250"}, value=3.0), Sample(labels={"le": "+Inf"}, value=4.0)]
    assert buckets_from_samples(samples, QUERIES["gateway-api"].le_seconds) == [
        (0.25, 3.0),
        (float("inf"), 4.0),
    ]


def test_envoy_cluster_names_follow_envoy_gateway():
    assert envoy_cluster("production", SVC, 0) == "httproute/production/fleet-planner/rule/0"
    assert envoy_cluster("production", SVC, 1, 0) == (
        "httproute/production/fleet-planner/rule/1/backend/0"
    )
