"""GitHub REST client edge cases over httpx.MockTransport."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from core.errors import GitHubError, InvalidInput
from tasks.github import (
    GitHubClient,
    create_deployment,
    set_commit_status,
    set_deployment_status,
)

SHA = "a" * 40
REPO = "robotics/robotics-api"


class FakeGitHub:
    """Records requests; answers from a script of (status, body) or a default."""

    def __init__(self, script: list[tuple[int, object]] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[httpx.Request] = []
        self.deployments: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            status, body = self.script.pop(0)
            if isinstance(body, Exception):
                raise body
            return httpx.Response(status, json=body)
        path = request.url.path
        if request.method == "GET" and path.endswith("/deployments"):
            ref = request.url.params["ref"]
            env = request.url.params["environment"]
            found = [d for d in self.deployments if d["ref"] == ref and d["environment"] == env]
            return httpx.Response(200, json=found)
        if request.method == "POST" and path.endswith("/deployments"):
            body = json.loads(request.content)
            item = {"id": len(self.deployments) + 1, **body}
            self.deployments.append(item)
            return httpx.Response(201, json=item)
        return httpx.Response(201, json={"state": json.loads(request.content)["state"]})

    def client(self, retries: int = 3) -> GitHubClient:
        return GitHubClient(
            base_url="https://gh.example/api/v3",
            token="ghp_secret",
            transport=httpx.MockTransport(self),
            retries=retries,
            backoff_seconds=0,
        )


def test_commit_status_sends_github_headers_and_body():
    gh = FakeGitHub()
    ok = set_commit_status.fn(
        REPO, SHA, "success", "robotics-cd/ci", "x" * 200, "http://ui/runs/1", client=gh.client()
    )
    assert ok
    req = gh.requests[0]
    assert req.url.path == f"/api/v3/repos/{REPO}/statuses/{SHA}"
    assert req.headers["Accept"] == "application/vnd.github+json"
    assert req.headers["X-GitHub-Api-Version"] == "2022-11-28"
    assert req.headers["Authorization"] == "Bearer ghp_secret"
    body = json.loads(req.content)
    assert body["state"] == "success" and body["target_url"] == "http://ui/runs/1"
    assert len(body["description"]) == 140


def test_retries_5xx_then_succeeds():
    gh = FakeGitHub([(502, {"message": "bad gateway"}), (503, {}), (201, {"state": "pending"})])
    assert set_commit_status.fn(REPO, SHA, "pending", "ci", client=gh.client())
    assert len(gh.requests) == 3


def test_connection_errors_are_retried():
    gh = FakeGitHub([(0, httpx.ConnectError("refused")), (201, {"state": "success"})])
    assert set_commit_status.fn(REPO, SHA, "success", "ci", client=gh.client())


def test_outage_is_a_warning_by_default(caplog: pytest.LogCaptureFixture):
    gh = FakeGitHub([(503, {})] * 4)
    with caplog.at_level(logging.WARNING):
        assert set_commit_status.fn(REPO, SHA, "success", "ci", client=gh.client()) is False
    assert "the release goes on without it" in caplog.text
    assert "ghp_secret" not in caplog.text
    assert len(gh.requests) == 4  # 1 + 3 retries


def test_outage_fails_when_required():
    gh = FakeGitHub([(503, {"message": "unavailable"})] * 2)
    with pytest.raises(GitHubError, match="HTTP 503 after 2 tries"):
        set_commit_status.fn(REPO, SHA, "success", "ci", required=True, client=gh.client(retries=1))


def test_4xx_is_not_retried_and_explained():
    gh = FakeGitHub([(401, {"message": "Bad credentials"})])
    with pytest.raises(GitHubError, match=r"Bad credentials.*Secret block"):
        set_commit_status.fn(REPO, SHA, "success", "ci", required=True, client=gh.client())
    assert len(gh.requests) == 1


def test_bad_input_is_refused_before_any_request():
    gh = FakeGitHub()
    with pytest.raises(InvalidInput):
        set_commit_status.fn("not a repo", SHA, "success", "ci", client=gh.client())
    with pytest.raises(InvalidInput):
        set_commit_status.fn(REPO, "abc", "success", "ci", client=gh.client())
    with pytest.raises(InvalidInput):
        set_commit_status.fn(REPO, SHA, "done", "ci", client=gh.client())  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="run_id"):
        create_deployment.fn(REPO, SHA, "staging", "d", {}, client=gh.client())
    assert gh.requests == []


def test_create_deployment_is_idempotent_per_run():
    gh = FakeGitHub()
    payload = {"run_id": "run-1", "image": "x@sha256:1"}
    first = create_deployment.fn(REPO, SHA, "staging", "staging", payload, client=gh.client())
    again = create_deployment.fn(REPO, SHA, "staging", "staging", payload, client=gh.client())
    other = create_deployment.fn(
        REPO, SHA, "staging", "staging", {"run_id": "run-2"}, client=gh.client()
    )
    prod = create_deployment.fn(REPO, SHA, "production", "prod", payload, client=gh.client())
    assert first == again == 1
    assert other == 2 and prod == 3
    assert len(gh.deployments) == 3
    created = json.loads(gh.requests[1].content)
    assert created["required_contexts"] == [] and created["auto_merge"] is False
    assert gh.deployments[2]["production_environment"] is True


def test_deployment_status_carries_log_url():
    gh = FakeGitHub()
    assert set_deployment_status.fn(
        REPO,
        7,
        "in_progress",
        log_url="http://ui/runs/flow-run/1",
        environment_url="https://api.staging",
        description="syncing",
        client=gh.client(),
    )
    req = gh.requests[0]
    assert req.url.path.endswith(f"/repos/{REPO}/deployments/7/statuses")
    body = json.loads(req.content)
    assert body == {
        "state": "in_progress",
        "description": "syncing",
        "log_url": "http://ui/runs/flow-run/1",
        "environment_url": "https://api.staging",
    }


def test_status_of_a_missing_deployment_is_skipped_with_a_warning(caplog):
    gh = FakeGitHub()
    with caplog.at_level(logging.WARNING):
        assert set_deployment_status.fn(REPO, None, "success", client=gh.client()) is False
    assert gh.requests == []
    assert "not created" in caplog.text


def test_flow_run_id_in_the_payload_also_makes_it_idempotent():
    gh = FakeGitHub()
    payload = {"flow_run_id": "run-9"}
    first = create_deployment.fn(REPO, SHA, "staging", "s", payload, client=gh.client())
    again = create_deployment.fn(REPO, SHA, "staging", "s", payload, client=gh.client())
    assert first == again and len(gh.deployments) == 1
