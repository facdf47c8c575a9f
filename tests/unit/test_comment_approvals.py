"""Approvals by GitHub comment, through the webhook receiver (signed deliveries over
httpx's ASGI transport) with the Prefect and GitHub sides faked at their boundary."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from core.approval import Vote
from core.catalog import parse_catalog
from core.webhooks import RunRequest, compute_signature
from deployments.comments import CommentApprovals, WaitingRelease
from deployments.webhook import StartedRun, create_app

SECRET = "s3cret"
REPO = "robotics/robotics-api"
SHA = "a" * 40
RUN = "3f2a9c41-7b0e-4d5e-9a63-0c1b2d3e4f50"
CATALOG = parse_catalog(
    """\
defaults:
  push_registry: registry.example.com
  pull_registry: registry.example.com
  manifests_repo: https://git.example.com/m.git
services:
  api-gateway:
    repo: https://git.example.com/robotics-api.git
    github: robotics/robotics-api
    image: robotics-serving/api-gateway
    environments:
      staging: {path: s, argocd_app: a-s, namespace: staging, host: a.local}
    approvers: [alice, bob]
    approval:
      required: 2
      github: {alice-gh: alice, bob-gh: bob, reader-gh: bob}
""",
    env={},
)


@dataclass
class FakeRuns:
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumed: int = 0

    async def waiting(self, short_id: str, service: str) -> WaitingRelease | None:
        if short_id == RUN[:8] and service == "api-gateway":
            return WaitingRelease(RUN, service, SHA)
        return None

    async def record_vote(self, flow_run_id: str, key: str, vote: Vote) -> bool:
        if f"vote-{key}" in self.inputs:
            return False
        self.inputs[f"vote-{key}"] = vote.model_dump(mode="json")
        self.resumed += 1
        return True

    async def record_refusal(self, flow_run_id: str, key: str, value: dict[str, Any]) -> bool:
        if f"refused-{key}" in self.inputs:
            return False
        self.inputs[f"refused-{key}"] = value
        return True


@dataclass
class FakeGitHub:
    permissions: dict[str, str] = field(
        default_factory=lambda: {"alice-gh": "write", "bob-gh": "admin", "reader-gh": "read"}
    )
    pulls: dict[int, set[str]] = field(default_factory=lambda: {7: {SHA}, 8: {"b" * 40}})
    replies: list[tuple[str, str | int, str]] = field(default_factory=list)

    def permission(self, repo: str, login: str) -> str:
        return self.permissions.get(login, "none")

    def pull_shas(self, repo: str, number: int) -> set[str]:
        return self.pulls.get(number, set())

    def reply(self, repo: str, where: str | int, body: str) -> None:
        self.replies.append((repo, where, body))


class Starter:
    async def __call__(self, request: RunRequest, idempotency_key: str) -> StartedRun:
        raise AssertionError("a comment starts no run")


@pytest.fixture
def sides() -> tuple[FakeRuns, FakeGitHub]:
    return FakeRuns(), FakeGitHub()


def commit_comment(login: str, body: str, comment_id: int = 1, sha: str = SHA) -> dict[str, Any]:
    return {
        "action": "created",
        "comment": {
            "id": comment_id,
            "body": body,
            "user": {"login": login, "type": "User"},
            "html_url": f"https://github.com/{REPO}/commit/{sha}#commitcomment-{comment_id}",
            "commit_id": sha,
        },
        "repository": {"full_name": REPO},
        "sender": {"login": login, "type": "User"},
    }


def pr_comment(login: str, body: str, number: int, comment_id: int) -> dict[str, Any]:
    return {
        "action": "created",
        "issue": {"number": number, "pull_request": {"url": f"https://x/pulls/{number}"}},
        "comment": {"id": comment_id, "body": body, "user": {"login": login}, "html_url": "u"},
        "repository": {"full_name": REPO},
        "sender": {"login": login, "type": "User"},
    }


async def deliver(
    sides: tuple[FakeRuns, FakeGitHub], event: str, payload: dict[str, Any], guid: str = "d-1"
) -> httpx.Response:
    runs, github = sides
    app = create_app(
        secret=SECRET,
        catalog=CATALOG,
        starter=Starter(),
        comments=CommentApprovals(catalog=CATALOG, runs=runs, github=github),
    )
    body = json.dumps(payload).encode()
    headers = {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": guid,
        "X-Hub-Signature-256": compute_signature(SECRET, body),
        "Content-Type": "application/json",
    }
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://receiver"
    ) as client:
        return await client.post("/github", content=body, headers=headers)


async def test_an_allowlisted_writer_approves_on_the_source_commit(sides) -> None:
    runs, github = sides
    answer = await deliver(sides, "commit_comment", commit_comment("alice-gh", "/approve 3f2a9c41"))
    assert answer.status_code == 202
    assert answer.json()["message"] == "recorded: approve by alice (@alice-gh) via github"
    vote = Vote.model_validate(runs.inputs["vote-github-1"])
    assert (vote.approver, vote.login, vote.path, vote.authenticated) == (
        "alice",
        "alice-gh",
        "github",
        True,
    )
    assert runs.resumed == 1
    assert (
        github.replies[-1][1] == SHA and "Recorded for release `3f2a9c41`" in github.replies[-1][2]
    )


async def test_a_redelivered_comment_does_nothing(sides) -> None:
    runs, github = sides
    payload = commit_comment("alice-gh", "/approve 3f2a9c41", comment_id=5)
    await deliver(sides, "commit_comment", payload, guid="d-5")
    again = await deliver(sides, "commit_comment", payload, guid="d-5")
    assert again.status_code == 202 and "recorded already" in again.json()["message"]
    assert runs.resumed == 1 and len(github.replies) == 1


async def test_someone_off_the_allowlist_is_refused_recorded_and_answered_once(sides) -> None:
    runs, github = sides
    payload = commit_comment("mallory", "/approve 3f2a9c41", comment_id=9)
    answer = await deliver(sides, "commit_comment", payload)
    assert answer.status_code == 202
    assert (
        "refused: @mallory is not on api-gateway's GitHub approver allowlist"
        in answer.json()["message"]
    )
    assert runs.inputs["refused-github-9"]["login"] == "mallory"
    assert not any(k.startswith("vote-") for k in runs.inputs)
    assert len(github.replies) == 1 and github.replies[0][2].startswith("@mallory")
    await deliver(sides, "commit_comment", payload)  # redelivered: no second reply
    assert len(github.replies) == 1 and runs.resumed == 0


async def test_an_allowlisted_login_without_write_permission_is_refused(sides) -> None:
    runs, _ = sides
    answer = await deliver(
        sides, "commit_comment", commit_comment("reader-gh", "/approve 3f2a9c41")
    )
    assert "'read' permission" in answer.json()["message"]
    assert runs.resumed == 0


async def test_on_the_merged_pull_request_it_counts_and_elsewhere_it_does_not(sides) -> None:
    runs, github = sides
    ok = await deliver(
        sides, "issue_comment", pr_comment("bob-gh", "/reject 3f2a9c41 p99 up", 7, 20)
    )
    assert ok.json()["message"] == "recorded: reject by bob (@bob-gh) via github: p99 up"
    assert github.replies[-1][1] == 7
    other = await deliver(sides, "issue_comment", pr_comment("bob-gh", "/approve 3f2a9c41", 8, 21))
    assert "not on api-gateway's source commit" in other.json()["message"]
    wrong_commit = commit_comment("alice-gh", "/approve 3f2a9c41", comment_id=22, sha="c" * 40)
    refused = await deliver(sides, "commit_comment", wrong_commit)
    assert "refused" in refused.json()["message"]
    assert set(runs.inputs) == {"vote-github-20", "refused-github-21", "refused-github-22"}


async def test_comments_without_a_command_or_for_no_waiting_release(sides) -> None:
    runs, github = sides
    quiet = await deliver(sides, "commit_comment", commit_comment("alice-gh", "nice work"))
    assert quiet.json()["message"] == "no approval command in the comment"
    unknown = await deliver(
        sides, "commit_comment", commit_comment("alice-gh", "/approve deadbeef", 30)
    )
    assert "no release `deadbeef` of api-gateway is waiting" in unknown.json()["message"]
    malformed = await deliver(
        sides, "commit_comment", commit_comment("alice-gh", "/reject 3f2a9c41", 31)
    )
    assert "needs a reason" in malformed.json()["message"]
    assert runs.inputs == {} and len(github.replies) == 2
    # Our own replies hold commands only inside backticks: they are never read as one.
    for _, _, text in github.replies:
        assert (
            await deliver(sides, "commit_comment", commit_comment("robotics-cd", text, 40))
        ).json()["message"] == "no approval command in the comment"


async def test_an_unsigned_comment_is_refused_before_anything(sides) -> None:
    runs, _ = sides
    app = create_app(
        secret=SECRET,
        catalog=CATALOG,
        starter=Starter(),
        comments=CommentApprovals(catalog=CATALOG, runs=runs, github=sides[1]),
    )
    body = json.dumps(commit_comment("alice-gh", "/approve 3f2a9c41")).encode()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c:
        answer = await c.post(
            "/github",
            content=body,
            headers={
                "X-GitHub-Event": "commit_comment",
                "X-GitHub-Delivery": "d-x",
                "X-Hub-Signature-256": compute_signature("wrong", body),
            },
        )
    assert answer.status_code == 401 and runs.inputs == {}


def test_the_release_record_names_each_approver_its_path_and_a_break_glass() -> None:
    from core.approval import decide
    from core.record_text import render_release_record
    from tests.unit.test_report import Record

    def glass(approver: str, login: str, reason: str) -> Vote:
        return Vote(
            decision="approve",
            approver=approver,
            path="github",
            authenticated=True,
            login=login,
            comment=reason,
            break_glass=True,
        )

    decision = decide(
        [glass("alice", "alice-gh", "fleet down"), glass("bob", "bob-gh", "hotfix")], 2
    )
    assert decision is not None and decision.break_glass is not None
    text = render_release_record(Record(decision=decision))  # type: ignore[arg-type]
    assert "Approval | approved by alice, bob" in text
    assert (
        "Approvals | approve by alice (@alice-gh) via github: fleet down; approve by bob "
        "(@bob-gh) via github: hotfix; **break-glass by alice, bob: fleet down; hotfix**"
    ) in text
