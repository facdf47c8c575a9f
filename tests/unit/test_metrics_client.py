"""The Prometheus client's edge cases, over httpx.MockTransport."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest

from core.errors import InvalidInput, MetricsError
from tasks.metrics import TEMPLATES, Target, prom_duration, render
from tasks.prometheus import PrometheusClient


def client(handler) -> PrometheusClient:
    return PrometheusClient(base_url="http://prom:9090/", transport=httpx.MockTransport(handler))


def answer(body: object, status: int = 200):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=json.dumps(body).encode())

    return handler


def test_vector_values_are_parsed_and_time_is_sent():
    seen: list[httpx.Request] = []

    def handler(request):
        seen.append(request)
        return httpx.Response(
            200,
            json={
                "status": "success",
                "data": {
                    "resultType": "vector",
                    "result": [
                        {"metric": {"le": "0.1"}, "value": [1764244800, "1.5"]},
                        {"metric": {"le": "+Inf"}, "value": [1764244800, "+Inf"]},
                    ],
                },
            },
        )

    end = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    samples = client(handler).query("up", end)
    assert [s.value for s in samples] == [1.5, float("inf")]
    assert samples[0].labels == {"le": "0.1"}
    assert seen[0].url.path == "/api/v1/query"
    assert seen[0].url.params["time"] == f"{end.timestamp():.3f}"


def test_scalar_nan_and_empty_are_no_data():
    nan = {"status": "success", "data": {"resultType": "scalar", "result": [1, "NaN"]}}
    assert client(answer(nan)).scalar("1") is None
    empty = {"status": "success", "data": {"resultType": "vector", "result": []}}
    assert client(answer(empty)).scalar("up") is None


def test_several_series_for_a_scalar_is_an_error():
    two = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"a": "1"}, "value": [1, "1"]},
                {"metric": {}, "value": [1, "2"]},
            ],
        },
    }
    with pytest.raises(MetricsError, match="2 series, expected one"):
        client(answer(two)).scalar("up")


def test_error_body_carries_the_error_type():
    bad = {"status": "error", "errorType": "bad_data", "error": "parse error at char 4"}
    with pytest.raises(MetricsError, match=r"refused the query \(bad_data\): parse error"):
        client(answer(bad, 400)).query("sum(")


def test_non_json_answer_is_explained():
    def handler(request):
        return httpx.Response(502, text="<html>bad gateway</html>")

    with pytest.raises(MetricsError, match="HTTP 502 without a JSON body"):
        client(handler).query("up")


def test_unreachable_prometheus_says_what_to_check():
    def handler(request):
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(MetricsError, match=r"unreachable.*ROBOTICS_CD_PROMETHEUS_URL"):
        client(handler).query("up")


def test_matrix_from_query_range():
    body = {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [{"metric": {}, "values": [[1, "0.1"], [2, "NaN"]]}],
        },
    }
    series = client(answer(body)).query_range("x", 0, 10, 1)
    assert series[0].points[0] == (1.0, 0.1)


def test_range_vector_from_an_instant_query_is_refused():
    body = {"status": "success", "data": {"resultType": "matrix", "result": []}}
    with pytest.raises(MetricsError, match="wrap range selectors"):
        client(answer(body)).query("up[1m]")


def test_naive_time_is_refused():
    with pytest.raises(InvalidInput, match="no timezone"):
        client(answer({})).query("up", datetime(2026, 1, 1))


def test_templates_keep_promql_braces_and_fill_placeholders():
    values = Target(service="api-gateway", namespace="production").placeholders("canary", "30s")
    promql = render(TEMPLATES["errors"], values)
    assert promql == (
        'sum(increase(nginx_ingress_controller_requests{namespace="production",'
        'ingress=~"api-gateway|api-gateway-canary",canary!="",status=~"5.."}[30s]))'
    )
    stable = Target(service="api-gateway", namespace="production").placeholders("stable", "30s")
    assert 'pod=~"api-gateway-[a-z0-9]+-[a-z0-9]+"' in render(TEMPLATES["restarts"], stable)
    assert "{" not in render("{window}{service}{track}", stable)


def test_windows_render_as_prometheus_durations():
    assert prom_duration(30) == "30s"
    assert prom_duration(2.5) == "2500ms"
    with pytest.raises(InvalidInput):
        prom_duration(0)
