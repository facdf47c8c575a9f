"""The twin's Gateway API rules on plain objects: match precedence, weighted choice, the
clusters Envoy Gateway would make, the statuses it writes, and Envoy's metric text."""

from __future__ import annotations

from typing import Any

from sandbox.runtime import gateway as gw

NS = "production"


def svc(name: str, port: int = 8000) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"ports": [{"port": port}]}}


def a_gateway(listeners: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "gw", "namespace": NS, "generation": 1},
        "spec": {
            "gatewayClassName": "eg",
            "listeners": listeners or [{"name": "http", "protocol": "HTTP", "port": 80}],
        },
    }


CLASSES = {"eg": {"metadata": {"name": "eg"}, "spec": {"controllerName": gw.CONTROLLER}}}


def route(rules: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "r", "namespace": NS, "generation": 3, "creationTimestamp": "t"},
        "spec": {
            "parentRefs": [{"name": "gw"}],
            "hostnames": ["a.example"],
            "rules": rules,
            **spec,
        },
    }


def ref(name: str, weight: int | None = None, *, filters: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "port": 8000}
    if weight is not None:
        out["weight"] = weight
    if filters:
        out["filters"] = [
            {
                "type": "RequestHeaderModifier",
                "requestHeaderModifier": {"set": [{"name": "x-track", "value": name}]},
            }
        ]
    return out


SERVICES = {"s": svc("s"), "c": svc("c")}


def gateways() -> dict[str, Any]:
    return gw.accepting_gateways([a_gateway()], CLASSES)


def best(r: dict[str, Any], *, headers: dict[str, str] | None = None, path: str = "/x"):
    candidates = gw.build_candidates([r], gateways(), SERVICES)
    return gw.best_candidate(candidates, "a.example", path, "GET", headers or {}, {})


def test_more_header_matches_win_over_rule_order():
    r = route(
        [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "backendRefs": [ref("s")],
            },
            {
                "matches": [
                    {
                        "path": {"type": "PathPrefix", "value": "/"},
                        "headers": [{"name": "x-canary", "value": "always"}],
                    }
                ],
                "backendRefs": [ref("c")],
            },
        ]
    )
    assert best(r).rule_index == 0
    assert best(r, headers={"x-canary": "always"}).rule_index == 1
    assert best(r, headers={"x-canary": "never"}).rule_index == 0


def test_exact_and_longer_prefixes_win():
    r = route(
        [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}]},
            {"matches": [{"path": {"type": "Exact", "value": "/v1/status"}}]},
        ]
    )
    assert best(r, path="/v1/status").rule_index == 2
    assert best(r, path="/v1/other").rule_index == 1
    assert best(r, path="/v10").rule_index == 0  # prefixes match whole path elements


def test_weights_split_in_proportion_and_zero_takes_nothing():
    r = route([{"backendRefs": [ref("s", 90), ref("c", 10)]}])
    chosen = best(r)
    points = [i / 1000 for i in range(1000)]
    picks = [chosen.pick(lambda p=p: p).service for p in points]
    assert picks.count("c") == 100
    zero = best(route([{"backendRefs": [ref("s", 100), ref("c", 0)]}]))
    assert {zero.pick(lambda p=p: p).service for p in points} == {"s"}
    assert best(route([{"backendRefs": [ref("s", 0)]}])).pick(lambda: 0.5) is None


def test_clusters_are_per_rule_unless_backend_refs_carry_filters():
    plain = best(route([{"backendRefs": [ref("s", 90), ref("c", 10)]}]))
    assert {b.cluster for b in plain.backends} == {"httproute/production/r/rule/0"}
    split = best(route([{"backendRefs": [ref("s", 90, filters=True), ref("c", 10, filters=True)]}]))
    assert [b.cluster for b in split.backends] == [
        "httproute/production/r/rule/0/backend/0",
        "httproute/production/r/rule/0/backend/1",
    ]
    assert gw.apply_header_filters({"a": "1"}, split.backends[1].header_filters) == {
        "a": "1",
        "x-track": "c",
    }


def test_route_status_as_envoy_gateway_writes_it():
    ok = gw.route_status(route([{"backendRefs": [ref("s")]}]), gateways(), SERVICES)
    (parent,) = ok["parents"]
    assert parent["parentRef"] == {"group": gw.GROUP, "kind": "Gateway", "name": "gw"}
    assert parent["controllerName"] == "gateway.envoyproxy.io/gatewayclass-controller"
    accepted, resolved = parent["conditions"]
    assert (accepted["type"], accepted["status"], accepted["reason"]) == (
        "Accepted",
        "True",
        "Accepted",
    )
    assert (resolved["type"], resolved["status"]) == ("ResolvedRefs", "True")
    assert accepted["observedGeneration"] == 3

    missing = gw.route_status(
        route([{"backendRefs": [ref("s"), ref("gone")]}]), gateways(), SERVICES
    )
    resolved = missing["parents"][0]["conditions"][1]
    assert (resolved["status"], resolved["reason"]) == ("False", "BackendNotFound")
    assert resolved["message"] == (
        "Failed to process route rule 0 backendRef 1: service production/gone not found."
    )


def test_a_route_to_an_unknown_gateway_gets_no_status_from_us():
    other = {
        "controllerName": "example.net/other",
        "parentRef": {"name": "x"},
        "conditions": [],
    }
    r = route([{"backendRefs": [ref("s")]}], parentRefs=[{"name": "nope"}])
    r["status"] = {"parents": [other]}
    assert gw.route_status(r, gateways(), SERVICES) == {"parents": [other]}


def test_a_hostname_outside_the_listener_is_not_accepted():
    gws = gw.accepting_gateways(
        [a_gateway([{"name": "http", "protocol": "HTTP", "port": 80, "hostname": "b.example"}])],
        CLASSES,
    )
    status = gw.route_status(route([{"backendRefs": [ref("s")]}]), gws, SERVICES)
    accepted = status["parents"][0]["conditions"][0]
    assert (accepted["status"], accepted["reason"]) == ("False", "NoMatchingListenerHostname")
    assert gw.build_candidates([route([{"backendRefs": [ref("s")]}])], gws, SERVICES) == []


def test_gateway_status_counts_attached_routes():
    g = a_gateway()
    status = gw.gateway_status(g, [route([{"backendRefs": [ref("s")]}])], gateways())
    assert status["addresses"] == [{"type": "IPAddress", "value": "127.0.0.1"}]
    assert [c["type"] for c in status["conditions"]] == ["Accepted", "Programmed"]
    assert status["listeners"][0]["attachedRoutes"] == 1


def test_envoy_metric_text():
    metrics = gw.EnvoyMetrics()
    metrics.observe("httproute/p/r/rule/0/backend/1", 503, 0.12)
    metrics.observe("httproute/p/r/rule/0/backend/1", 200, 0.02)
    text = "\n".join(metrics.render())
    name = 'envoy_cluster_name="httproute/p/r/rule/0/backend/1"'
    assert f"envoy_cluster_upstream_rq_total{{{name}}} 2" in text
    assert f'envoy_cluster_upstream_rq_xx{{envoy_response_code_class="5",{name}}} 1' in text
    assert f'envoy_cluster_upstream_rq{{envoy_response_code="200",{name}}} 1' in text
    assert f'envoy_cluster_upstream_rq_time_bucket{{{name},le="150"}} 2' in text
    assert f'envoy_cluster_upstream_rq_time_bucket{{{name},le="100"}} 1' in text
