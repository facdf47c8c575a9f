"""One credentials object per outside system builds its client, and never shows its secret."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import SecretStr

from core.errors import MetricsError
from tasks.argocd import ArgoCDCredentials
from tasks.github import GitHubCredentials
from tasks.prometheus import PrometheusCredentials

TOKEN = "ghp_not-in-any-log-0123456789"


def test_github_credentials_build_a_client_that_sends_the_token() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        return httpx.Response(200, json={"permission": "write"})

    creds = GitHubCredentials(base_url="http://github.test/api/v3", token=SecretStr(TOKEN))
    assert TOKEN not in repr(creds) and TOKEN not in str(creds.model_dump())
    with creds.get_client(transport=httpx.MockTransport(handler), retries=0) as gh:
        assert gh.request("GET", "/repos/o/r/collaborators/alice/permission")
    assert seen == [f"Bearer {TOKEN}"]


def test_argocd_credentials_keep_the_token_or_the_login_secret() -> None:
    by_token = ArgoCDCredentials(base_url="https://argocd.test", token=SecretStr(TOKEN))
    by_login = ArgoCDCredentials(
        base_url="https://argocd.test", username="admin", password=SecretStr(TOKEN)
    )
    for creds in (by_token, by_login):
        assert TOKEN not in repr(creds)
        assert creds.get_client().base_url == "https://argocd.test"


def test_prometheus_credentials_basic_bearer_or_none() -> None:
    base = "http://127.0.0.1:9090"
    assert PrometheusCredentials(base_url=base).get_client()._http.auth is None
    basic = PrometheusCredentials(
        base_url=base,
        auth_value=SecretStr(json.dumps({"username": "cd", "password": TOKEN})),
    )
    assert TOKEN not in repr(basic)
    assert isinstance(basic.get_client()._http.auth, httpx.BasicAuth)


def test_prometheus_credentials_with_a_malformed_block_say_which_block() -> None:
    creds = PrometheusCredentials(
        base_url="http://127.0.0.1:9090",
        auth_block="prom-auth",
        auth_value=SecretStr(json.dumps({"user": "cd", "pass": TOKEN})),
    )
    with pytest.raises(MetricsError, match="prom-auth") as raised:
        creds.get_client()
    assert TOKEN not in str(raised.value)
