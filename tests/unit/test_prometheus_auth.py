"""Prometheus credentials from a Secret block's value (issue #24, item 9), over MockTransport."""

from __future__ import annotations

import httpx
import pytest

from core.errors import MetricsError
from tasks.prometheus import PrometheusClient, prometheus_auth

OK = {"status": "success", "data": {"resultType": "vector", "result": []}}


def _seen_authorization(value: object, url: str = "https://prom.example:9090") -> str:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        return httpx.Response(200, json=OK)

    auth = prometheus_auth(value, block="b")
    with PrometheusClient(base_url=url, auth=auth, transport=httpx.MockTransport(handler)) as c:
        c.query("up")
    return seen[0]


def test_basic_and_bearer_credentials_reach_prometheus() -> None:
    assert _seen_authorization({"username": "cd", "password": "pw"}) == "Basic Y2Q6cHc="
    assert _seen_authorization({"bearer_token": "tok-1"}) == "Bearer tok-1"
    assert _seen_authorization("tok-2") == "Bearer tok-2"


def test_a_malformed_block_is_refused_without_echoing_it() -> None:
    with pytest.raises(MetricsError, match="must hold") as caught:
        prometheus_auth({"user": "cd", "pass": "hunter2-secret"}, block="prom")
    assert "hunter2" not in str(caught.value)


def test_credentials_never_go_over_plain_http_off_this_host() -> None:
    auth = prometheus_auth("tok", block="b")
    with pytest.raises(MetricsError, match="plain HTTP"):
        PrometheusClient(base_url="http://prometheus.monitoring:9090", auth=auth)
    PrometheusClient(base_url="http://127.0.0.1:9090", auth=auth).close()  # loopback: fine


def test_refused_credentials_say_which_setting_to_check() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, text="Unauthorized")

    auth = prometheus_auth("wrong", block="b")
    with (
        PrometheusClient(
            base_url="https://prom.example", auth=auth, transport=httpx.MockTransport(handler)
        ) as c,
        pytest.raises(MetricsError, match=r"refused the credentials.*PROMETHEUS_AUTH_BLOCK"),
    ):
        c.query("up")
