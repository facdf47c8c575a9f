"""Approvals on the real Prefect server, through a served stand-in release.

- The form a person sees offers the service's approvers and nothing else: the schema the UI
  renders is the stored ``suspended-approval-schema`` input, and the server refuses any other
  name (``system:timeout`` included) when resuming.
- An overdue approval has its own way in (the ``approval-expired`` key): the run resumes and
  ends "rejected: timed out" by itself.
- ``robotics-cd reject`` says what it did, in words.
- A quorum of 2: one authenticated vote leaves the run suspended showing "1 of 2
  approvals", an unauthenticated form answer does not count, a repeated vote changes
  nothing, and a second distinct approver ends the wait approved.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import arun_deployment
from prefect.exceptions import PrefectHTTPStatusError
from prefect.flow_runs import aresume_flow_run
from typer.testing import CliRunner

from cli.app import app
from core.approval import TIMEOUT_APPROVER, Vote
from sandbox.procs import stop_pid, wait_until
from tasks.approvals import EXPIRY_KEY, expire_run, record_vote
from tests.integration.approval_probe import APPROVERS, DEPLOYMENT
from tests.matrix import full_matrix

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_KEY = "suspended-approval-schema"


@pytest.fixture(scope="module")
def served_probe(prefect_server) -> Iterator[None]:
    log = open(prefect_server.home / "approval-probe.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.approval_probe"],
        cwd=ROOT,
        env={**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def deployed() -> bool:
        with get_client(sync_client=True) as client:
            return bool(
                client.read_deployments(
                    deployment_filter=DeploymentFilter(
                        name=DeploymentFilterName(any_=["approval-probe"])
                    )
                )
            )

    try:
        wait_until(deployed, timeout=180, what="served approval probe")
        yield
    finally:
        stop_pid(proc.pid)
        log.close()


async def _start(**extra: Any) -> FlowRun:
    run: FlowRun = await arun_deployment(
        DEPLOYMENT,
        parameters={
            "service": "api-gateway",
            "image": f"probe-{uuid.uuid4().hex[:6]}",
            **extra,
        },
        timeout=0,
        as_subflow=False,
    )
    return run


async def _wait(run_id: uuid.UUID, done: Any, what: str, timeout: float = 90) -> FlowRun:
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(run_id)
            if done(run):
                return run
            if time.monotonic() > deadline:
                state = run.state
                pytest.fail(f"{what} not reached in {timeout:.0f}s (state: {state})")
            await anyio.sleep(0.5)


async def _schema_of(run_id: uuid.UUID, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            try:
                return str(await client.read_flow_run_input(run_id, SCHEMA_KEY))
            except PrefectHTTPStatusError as exc:  # 404 until it is stored
                if exc.response.status_code != 404 or time.monotonic() > deadline:
                    raise
            await anyio.sleep(0.2)


def _paused(run: FlowRun) -> bool:
    return run.state is not None and run.state.type == StateType.PAUSED


def _final(run: FlowRun) -> bool:
    return run.state is not None and run.state.is_final()


async def test_a_person_can_choose_only_the_services_approvers(served_probe):
    run = await _start()
    await _wait(run.id, _paused, "probe waiting for approval")
    # Prefect shows the run Paused, then stores the form's schema (suspend_flow_run's own
    # order, which suspend_as keeps): wait for the schema, not just the state.
    schema = json.loads(await _schema_of(run.id))
    assert schema["properties"]["approver"]["enum"] == APPROVERS
    assert TIMEOUT_APPROVER not in json.dumps(schema)

    with pytest.raises(RuntimeError, match="Cannot resume this run"):
        await aresume_flow_run(
            run.id, run_input={"decision": "reject", "approver": TIMEOUT_APPROVER, "comment": ""}
        )
    with pytest.raises(RuntimeError, match="Cannot resume this run"):
        await aresume_flow_run(
            run.id, run_input={"decision": "approve", "approver": "mallory", "comment": ""}
        )
    still = await _wait(run.id, lambda r: True, "read")
    assert _paused(still)

    # The expiry path: its own key, no form validation; the run ends by itself.
    assert await expire_run(run.id, "no decision within 0:00:01")
    done = await _wait(run.id, _final, "probe ended after the expiry")
    assert done.state is not None
    assert done.state.name == "Rejected" and done.state.message == "rejected: timed out"
    # A run that no longer waits is left alone, and the expiry leaves nothing behind.
    assert not await expire_run(run.id, "again")
    async with get_client() as client:
        keys = {i.key for i in await client.filter_flow_run_input(run.id, "approval", 10, set())}
    assert keys == {EXPIRY_KEY}


async def test_cli_reject_says_rejected_and_refuses_other_names(served_probe):
    run = await _start()
    await _wait(run.id, _paused, "probe waiting for approval")
    runner = CliRunner()
    refused = await anyio.to_thread.run_sync(
        lambda: runner.invoke(app, ["reject", str(run.id), "--approver", TIMEOUT_APPROVER])
    )
    assert refused.exit_code == 2
    assert "not on this service's allowlist" in refused.output
    result = await anyio.to_thread.run_sync(
        lambda: runner.invoke(
            app, ["reject", str(run.id), "--approver", "bob", "--comment", "not today"]
        )
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"rejected release {run.id}")
    assert "rejectd" not in result.output
    done = await _wait(run.id, _final, "probe ended after the rejection")
    assert done.state is not None and done.state.message == "rejected by bob: not today"


async def test_abort_and_promote_refuse_a_name_off_the_list_before_sending(served_probe):
    run = await _start()
    await _wait(run.id, _paused, "probe waiting for approval")
    runner = CliRunner()
    for args in (
        ["abort", str(run.id), "--operator", "mallory", "--reason", "x"],
        ["promote", str(run.id), "--now", "--operator", "mallory", "--reason", "x"],
        ["abort", str(run.id), "--operator", "alice"],
    ):
        result = await anyio.to_thread.run_sync(functools.partial(runner.invoke, app, args))
        assert result.exit_code == 2, result.output
        assert "allowlist" in result.output or "reason is required" in result.output
    async with get_client() as client:
        sent = await client.filter_flow_run_input(run.id, "command-", 10, set())
    assert sent == []
    await aresume_flow_run(
        run.id, run_input={"decision": "reject", "approver": "alice", "comment": "cleanup"}
    )


def _github_vote(approver: str, comment_id: int) -> Vote:
    return Vote(
        decision="approve",
        approver=approver,
        path="github",
        authenticated=True,
        login=f"{approver}-gh",
        comment="lgtm",
        reference=f"https://github.example/c/{comment_id}",
    )


async def test_a_quorum_of_two_waits_for_two_distinct_authenticated_approvers(served_probe):
    run = await _start(required=2)
    await _wait(run.id, _paused, "probe waiting for approval")
    assert await record_vote(run.id, "github-101", _github_vote("alice", 101))

    def one_of_two(r: FlowRun) -> bool:
        return _paused(r) and "1 of 2 approvals" in (r.state.message or "")  # type: ignore[union-attr]

    waiting = await _wait(run.id, one_of_two, "suspended again at 1 of 2")
    # A redelivered comment is the same vote: nothing recorded, nothing resumed.
    assert not await record_vote(run.id, "github-101", _github_vote("alice", 101))
    # The form without an authenticating proxy: recorded, but it does not count toward 2.
    await aresume_flow_run(
        run.id, run_input={"decision": "approve", "approver": "bob", "comment": "via the UI"}
    )
    again = await _wait(
        run.id,
        lambda r: one_of_two(r) and r.state.timestamp != waiting.state.timestamp,  # type: ignore[union-attr]
        "suspended again after the unauthenticated answer",
    )
    assert again.state is not None and again.state.name == "Suspended"
    assert await record_vote(run.id, "github-102", _github_vote("bob", 102))
    done = await _wait(run.id, _final, "probe ended after the second approver")
    assert done.state is not None and done.state.name == "Approved"
    assert done.state.message == "approved by alice, bob"


# --- approvals by GitHub comment: twin → signed webhook → receiver → Prefect → the run --------

COMMENT_CATALOG = """\
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
      github: {alice-gh: alice, bob-gh: bob}
"""
COMMENT_SECRET = "comment-webhook-secret"
REPO = "robotics/robotics-api"


@pytest.fixture(scope="module")
def github_twin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The GitHub twin delivering its webhooks to the real receiver (comments wired to
    Prefect and back to the twin), both served over HTTP."""
    import secrets
    import threading

    import httpx
    import uvicorn

    from core.catalog import parse_catalog
    from deployments.comments import CommentApprovals, PrefectReleaseRuns, RestGitHub
    from deployments.webhook import create_app
    from sandbox.github import GitHubTwin, Store, build_app
    from sandbox.procs import free_port

    base = tmp_path_factory.mktemp("github-approvals")
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
    twin_port, receiver_port = free_port(), free_port()
    token = secrets.token_hex(20)
    twin_url = f"http://127.0.0.1:{twin_port}"
    catalog = parse_catalog(COMMENT_CATALOG, env={})

    async def no_runs(request: Any, idempotency_key: str) -> Any:
        raise AssertionError("comments start no run")

    receiver = create_app(
        secret=COMMENT_SECRET,
        catalog=catalog,
        starter=no_runs,
        comments=CommentApprovals(
            catalog=catalog,
            runs=PrefectReleaseRuns("approval-probe"),
            github=RestGitHub(base_url=twin_url, token=token),
        ),
    )
    twin = GitHubTwin(
        base_url=twin_url,
        git_base=base / "git",
        owner="robotics",
        token=token,
        webhook_url=f"http://127.0.0.1:{receiver_port}/github",
        webhook_secret=COMMENT_SECRET,
        store=Store(base / "recorded.json"),
    )
    servers = []
    for app_, port in ((receiver, receiver_port), (build_app(twin), twin_port)):
        server = uvicorn.Server(
            uvicorn.Config(app_, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_until(
            functools.partial(getattr, server, "started"), timeout=20, what=f"server on {port}"
        )
        servers.append((server, thread))

    def person(login: str, permission: str | None) -> str:
        made = httpx.post(f"{twin_url}/_twin/users", json={"login": login}, timeout=5).json()
        if permission:
            httpx.put(
                f"{twin_url}/repos/{REPO}/collaborators/{login}",
                json={"permission": permission},
                headers={"Authorization": f"Bearer {token}"},
                timeout=5,
            ).raise_for_status()
        return str(made["token"])

    tokens = {
        "alice-gh": person("alice-gh", "push"),
        "bob-gh": person("bob-gh", "maintain"),
        "mallory": person("mallory", "admin"),  # may write, but is not on the allowlist
    }
    try:
        yield {"url": twin_url, "sha": sha, "tokens": tokens, "bot": token}
    finally:
        for server, thread in servers:
            server.should_exit = True
            thread.join(timeout=10)


async def test_comments_approve_with_proof_of_who_and_refuse_others(served_probe, github_twin):
    import httpx

    from core.approval import release_short_id

    twin, sha = github_twin["url"], github_twin["sha"]
    run = await _start(required=2, source_sha=sha)
    await _wait(run.id, _paused, "probe waiting for approval")
    short = release_short_id(str(run.id))

    def comment(login: str, body: str, number: int | None = None) -> dict[str, Any]:
        path = f"issues/{number}/comments" if number else f"commits/{sha}/comments"
        answer = httpx.post(
            f"{twin}/repos/{REPO}/{path}",
            json={"body": body},
            headers={"Authorization": f"Bearer {github_twin['tokens'][login]}"},
            timeout=10,
        )
        answer.raise_for_status()
        return dict(answer.json())

    def recorded() -> dict[str, Any]:
        return dict(httpx.get(f"{twin}/_twin/recorded", timeout=10).json())

    def delivery_of(comment_id: int) -> dict[str, Any] | None:
        for item in recorded()["deliveries"]:
            payload = item["request"]["payload"]
            if payload.get("comment", {}).get("id") == comment_id and "status_code" in item:
                return dict(item)
        return None

    def replies() -> list[str]:
        return [c["body"] for c in recorded()["comments"] if c["user"]["login"] == "robotics-cd"]

    # Someone off the allowlist (with admin rights, even): refused, recorded, answered.
    refused = comment("mallory", f"/approve {short}")
    await anyio.to_thread.run_sync(
        lambda: wait_until(
            lambda: delivery_of(refused["id"]) is not None, timeout=20, what="delivery"
        )
    )
    first = delivery_of(refused["id"])
    assert first is not None and first["status_code"] == 202, first
    assert "not on api-gateway's GitHub approver allowlist" in first["response"]
    assert any(r.startswith("@mallory") and "refused and recorded" in r for r in replies())
    async with get_client() as client:
        kept = await client.read_flow_run_input(run.id, f"refused-github-{refused['id']}")
    assert json.loads(kept)["login"] == "mallory"
    # Its replayed delivery does nothing: no second reply, the run still waits untouched.
    before = len(replies())
    again = httpx.post(f"{twin}/_twin/deliveries/{first['guid']}/redeliver", timeout=15).json()
    assert again["status_code"] == 202 and "recorded already" in again["response"]
    assert len(replies()) == before
    still = await _wait(run.id, lambda r: True, "read")
    assert _paused(still)

    # An allowlisted writer on the source commit: one of two.
    comment("alice-gh", f"Staging looks right.\n/approve {short}")
    await _wait(
        run.id,
        lambda r: _paused(r) and "1 of 2 approvals" in (r.state.message or ""),  # type: ignore[union-attr]
        "suspended at 1 of 2",
    )
    # The second, distinct approver on the pull request that merged the commit.
    pull = httpx.post(
        f"{twin}/_twin/repos/{REPO}/pulls",
        json={"title": "faster planner", "head_sha": sha, "merge_commit_sha": sha},
        timeout=10,
    ).json()
    comment("bob-gh", f"/approve {short}", number=int(pull["number"]))
    done = await _wait(run.id, _final, "probe ended after two GitHub approvals")
    assert done.state is not None and done.state.name == "Approved"
    assert done.state.message == "approved by alice, bob"


# --- freezes, break-glass and reminders: the scheduled approvals flow's pass ------------------


def _glass_vote(approver: str, comment_id: int, reason: str) -> Vote:
    return _github_vote(approver, comment_id).model_copy(
        update={"break_glass": True, "comment": reason}
    )


# Passed under /work/bin/heavy (33 s, mostly the 30 s window): full matrix only, for CI's time.
@full_matrix
async def test_approved_during_a_freeze_waits_frozen_until_the_window_ends(served_probe):
    from datetime import UTC, datetime, timedelta

    from core.freeze import FreezeWindow
    from tasks.approvals import FROZEN, WaitingPolicy, tend_waiting

    end = datetime.now(UTC) + timedelta(seconds=30)
    window = FreezeWindow(
        reason="probe freeze", start=datetime.now(UTC) - timedelta(minutes=1), end=end
    )
    run = await _start(frozen_until=end.isoformat())
    await _wait(run.id, _paused, "probe waiting for approval")

    def policy(timeout: timedelta) -> dict[str, WaitingPolicy]:
        return {
            "api-gateway": WaitingPolicy(
                timeout=timeout,
                remind_after=timedelta(minutes=30),
                approvers=APPROVERS,
                required=1,
                freezes=[("global", window)],
            )
        }

    # Reminders: one per remind_after interval, each sent once however often the flow passes.
    later = datetime.now(UTC) + timedelta(minutes=31)
    first = await tend_waiting("approval-probe", policy(timedelta(hours=1)), now=later)
    mine = [text for run_id, _, text in first.reminders if run_id == str(run.id)]
    assert len(mine) == 1, first.reminders
    assert "has waited 31 min for approval (0 of 1 approval); approvers: alice, bob" in mine[0]
    again = await tend_waiting("approval-probe", policy(timedelta(hours=1)), now=later)
    assert all(run_id != str(run.id) for run_id, _, _ in again.reminders)

    # Approved during the freeze: suspended as Frozen (no process: a rescheduling pause).
    assert await record_vote(run.id, "github-201", _github_vote("alice", 201))
    frozen = await _wait(
        run.id,
        lambda r: _paused(r) and r.state.name == FROZEN,
        "probe Frozen",  # type: ignore[union-attr]
    )
    assert frozen.state is not None
    assert (frozen.state.message or "").startswith("production is frozen until")
    assert frozen.state.state_details.pause_reschedule
    # The scheduled pass leaves it frozen while the window lasts, and never expires it.
    passed = await tend_waiting("approval-probe", policy(timedelta(seconds=1)))
    assert str(run.id) not in passed.thawed + passed.expired
    # After the window the pass resumes it, and it goes on approved.
    deadline = time.monotonic() + 90
    while True:
        tended = await tend_waiting("approval-probe", policy(timedelta(hours=1)))
        if str(run.id) in tended.thawed:
            break
        assert time.monotonic() < deadline, "the freeze never thawed"
        await anyio.sleep(1)
    done = await _wait(run.id, _final, "probe ended after the freeze")
    assert done.state is not None and done.state.name == "Approved"
    assert done.state.message == "approved by alice"


async def test_a_break_glass_by_two_approvers_releases_during_the_freeze(served_probe):
    from datetime import UTC, datetime, timedelta

    end = datetime.now(UTC) + timedelta(hours=1)
    run = await _start(required=2, frozen_until=end.isoformat())
    await _wait(run.id, _paused, "probe waiting for approval")
    assert await record_vote(run.id, "github-301", _glass_vote("alice", 301, "robot fleet down"))
    await _wait(
        run.id,
        lambda r: _paused(r) and "1 of 2 approvals" in (r.state.message or ""),  # type: ignore[union-attr]
        "suspended at 1 of 2",
    )
    assert await record_vote(run.id, "github-302", _glass_vote("bob", 302, "hotfix for the outage"))
    done = await _wait(run.id, _final, "probe ended by break-glass")
    assert done.state is not None and done.state.name == "Approved"
    assert done.state.message == (
        "approved by alice, bob; break-glass by alice, bob: robot fleet down; hotfix for the outage"
    )
