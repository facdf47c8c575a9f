"""The GitHub twin's comments, pull requests, collaborator permissions and comment
webhooks, spoken to over HTTP by the product's client; deliveries checked as a receiver
would check them (signature, event, payload model)."""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core.approval import parse_command
from core.webhooks import CommitCommentEvent, IssueCommentEvent, parse_payload, verify_signature
from sandbox.github import GitHubTwin, Store, build_app
from sandbox.procs import free_port, wait_until
from tasks.github import GitHubClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
REPO = "robotics/robotics-api"
SECRET = "It's a Secret to Everybody"


@dataclass
class Received:
    deliveries: list[dict[str, Any]] = field(default_factory=list)


def _serve(app: Any, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=20, what=f"server on {port}")
    return server, thread


@dataclass
class Twin:
    url: str
    token: str
    sha: str
    received: Received

    def client(self, token: str | None = None) -> GitHubClient:
        return GitHubClient(base_url=self.url, token=token or self.token, retries=0)

    def person(self, login: str) -> str:
        answer = httpx.post(f"{self.url}/_twin/users", json={"login": login}, timeout=5)
        answer.raise_for_status()
        return str(answer.json()["token"])

    def deliveries(self, event: str) -> list[dict[str, Any]]:
        return [d for d in self.received.deliveries if d["event"] == event]


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twin]:
    base = tmp_path_factory.mktemp("github-comments")
    bare, work = base / "git" / "robotics-api.git", base / "work"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "README").write_text("hi\n")
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    subprocess.run([*git, "push", "-q", str(bare), "main"], check=True)
    sha = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()

    received = Received()

    async def hook(request: Request) -> JSONResponse:
        body = await request.body()
        received.deliveries.append(
            {
                "event": request.headers.get("x-github-event"),
                "guid": request.headers.get("x-github-delivery"),
                "signed": verify_signature(
                    SECRET, body, request.headers.get("x-hub-signature-256")
                ),
                "payload": json.loads(body),
            }
        )
        return JSONResponse({"ok": True}, status_code=202)

    hook_port, port = free_port(), free_port()
    receiver = _serve(Starlette(routes=[Route("/github", hook, methods=["POST"])]), hook_port)
    token = secrets.token_hex(20)
    app = GitHubTwin(
        base_url=f"http://127.0.0.1:{port}",
        git_base=base / "git",
        owner="robotics",
        token=token,
        webhook_url=f"http://127.0.0.1:{hook_port}/github",
        webhook_secret=SECRET,
        store=Store(base / "recorded.json"),
    )
    server = _serve(build_app(app), port)
    yield Twin(f"http://127.0.0.1:{port}", token, sha, received)
    for srv, thread in (server, receiver):
        srv.should_exit = True
        thread.join(timeout=10)


def test_collaborator_permissions_read_through_the_permission_api(twin: Twin) -> None:
    twin.person("alice-gh")
    twin.person("reader")
    with twin.client() as gh:
        put = gh.request(
            "PUT", f"/repos/{REPO}/collaborators/alice-gh", json={"permission": "push"}
        )
        assert put["invitee"]["login"] == "alice-gh"
        gh.request("PUT", f"/repos/{REPO}/collaborators/reader", json={"permission": "triage"})
        assert gh.collaborator_permission(REPO, "alice-gh") == "write"
        assert gh.collaborator_permission(REPO, "ALICE-GH") == "write"
        assert gh.collaborator_permission(REPO, "reader") == "read"
        assert gh.collaborator_permission(REPO, "nobody-here") == "none"
        assert gh.collaborator_permission(REPO, "robotics-cd") == "admin"
        raw = gh.request("GET", f"/repos/{REPO}/collaborators/reader/permission")
        assert raw["role_name"] == "triage" and raw["user"]["permissions"]["pull"] is True
        assert raw["user"]["permissions"]["push"] is False


def test_a_commit_comment_is_authored_by_its_token_and_delivered_signed(twin: Twin) -> None:
    alice = twin.person("alice-gh")
    with twin.client(alice) as gh:
        comment = gh.create_commit_comment(REPO, twin.sha, "LGTM\n/approve 3f2a9c41")
    assert comment["user"]["login"] == "alice-gh" and comment["commit_id"] == twin.sha
    wait_until(
        lambda: any(
            d["payload"]["comment"]["id"] == comment["id"]
            for d in twin.deliveries("commit_comment")
        ),
        timeout=10,
        what="commit_comment delivery",
    )
    delivery = next(
        d
        for d in twin.deliveries("commit_comment")
        if d["payload"]["comment"]["id"] == comment["id"]
    )
    assert delivery["signed"]
    event = parse_payload("commit_comment", delivery["payload"])
    assert isinstance(event, CommitCommentEvent)
    assert (event.action, event.sender.login, event.comment.commit_id) == (
        "created",
        "alice-gh",
        twin.sha,
    )
    assert event.repository.full_name == REPO
    command = parse_command(event.comment.body)
    assert command is not None and command.release == "3f2a9c41"
    with twin.client() as gh:
        listed = gh.request("GET", f"/repos/{REPO}/commits/{twin.sha}/comments")
    assert [c["id"] for c in listed][-1] == comment["id"]


def test_a_comment_on_a_merged_pull_request_is_an_issue_comment(twin: Twin) -> None:
    recorded = httpx.post(
        f"{twin.url}/_twin/repos/{REPO}/pulls",
        json={"title": "faster planner", "head_sha": twin.sha, "merge_commit_sha": twin.sha},
        timeout=5,
    )
    number = recorded.json()["number"]
    mallory = twin.person("mallory")
    with twin.client(mallory) as gh:
        comment = gh.create_issue_comment(REPO, number, "/approve 3f2a9c41")
    assert comment["user"]["login"] == "mallory" and comment["author_association"] == "NONE"
    wait_until(
        lambda: any(
            d["payload"]["comment"]["id"] == comment["id"] for d in twin.deliveries("issue_comment")
        ),
        timeout=10,
        what="issue_comment delivery",
    )
    delivery = next(
        d
        for d in twin.deliveries("issue_comment")
        if d["payload"]["comment"]["id"] == comment["id"]
    )
    event = parse_payload("issue_comment", delivery["payload"])
    assert isinstance(event, IssueCommentEvent) and delivery["signed"]
    assert event.issue.number == number and event.issue.pull_request is not None
    with twin.client() as gh:
        pull = gh.pull_request(REPO, number)
        assert pull is not None and pull["merged"] and pull["merge_commit_sha"] == twin.sha
        assert gh.pull_request(REPO, 99999) is None
        pulls = gh.request("GET", f"/repos/{REPO}/commits/{twin.sha}/pulls")
        assert number in [p["number"] for p in pulls]
        reply = gh.create_issue_comment(REPO, number, "@mallory may not approve api-gateway")
    assert reply["user"]["login"] == "robotics-cd"


def test_bad_requests_answer_as_github_does(twin: Twin) -> None:
    with httpx.Client(base_url=twin.url, headers={"Authorization": f"Bearer {twin.token}"}) as http:
        assert (
            http.post(f"/repos/{REPO}/commits/{'0' * 40}/comments", json={"body": "x"}).status_code
            == 422
        )
        assert http.post(f"/repos/{REPO}/commits/{twin.sha}/comments", json={}).status_code == 422
        assert (
            http.post(f"/repos/{REPO}/issues/424242/comments", json={"body": "x"}).status_code
            == 404
        )
        bad = http.put(f"/repos/{REPO}/collaborators/robotics-cd", json={"permission": "owner"})
        assert bad.status_code == 422
    anonymous = httpx.post(
        f"{twin.url}/repos/{REPO}/commits/{twin.sha}/comments", json={"body": "x"}
    )
    assert anonymous.status_code == 401


def test_recorded_shows_comments_and_users_but_no_tokens(twin: Twin) -> None:
    token = twin.person("alice-gh")
    recorded = httpx.get(f"{twin.url}/_twin/recorded", timeout=5).json()
    assert recorded["comments"] and "alice-gh" in recorded["users"]
    assert token not in json.dumps(recorded)
