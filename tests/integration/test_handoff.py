"""The CI → release hand-off on the real Prefect server.

A served stand-in release (``handoff_probe.py``) suspends for approval exactly as the real
release does; the hand-off starts it as a top-level run, once per CI run, and it can be
approved. When the release deployment cannot be started, CI says so: a log line, an
artifact with the exact command, and a commit status (to a small GitHub REST recorder).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from prefect import flow, get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import aresume_flow_run
from prefect.runtime import flow_run as current_run
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sandbox.procs import free_port, stop_pid, wait_until
from tasks.handoff import RELEASE_CONTEXT, Handoff, hand_off, with_ci_statuses
from tests.integration.handoff_probe import DEPLOYMENT

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHA = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
IMAGE = "127.0.0.1:5000/robotics-serving/api-gateway:20261127-6113728@sha256:" + "a" * 64


@pytest.fixture(scope="module")
def github_recorder() -> Iterator[tuple[list[dict[str, Any]], int]]:
    """GitHub's commit-status endpoint on a loopback port, recording what it receives."""
    received: list[dict[str, Any]] = []

    async def statuses(request: Request) -> JSONResponse:
        body = await request.json()
        received.append(
            {
                "path": request.url.path,
                "auth": request.headers.get("authorization"),
                **body,
            }
        )
        return JSONResponse({"id": len(received), **body}, status_code=201)

    app = Starlette(
        routes=[Route("/repos/{owner}/{repo}/statuses/{sha}", statuses, methods=["POST"])]
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=10, what="GitHub recorder")
    yield received, port
    server.should_exit = True
    thread.join(timeout=10)
    received.clear()


@pytest.fixture
def github_settings(github_recorder, prefect_server, monkeypatch) -> Iterator[list[dict[str, Any]]]:
    from prefect.blocks.system import Secret

    block = f"handoff-test-token-{uuid.uuid4().hex[:6]}"
    Secret(value="test-token").save(block)
    received, port = github_recorder
    monkeypatch.setenv("ROBOTICS_CD_GITHUB_API_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("ROBOTICS_CD_GITHUB_TOKEN_BLOCK", block)
    received.clear()
    yield received
    monkeypatch.undo()


@pytest.fixture(scope="module")
def served_probe_release(prefect_server) -> Iterator[None]:
    """``python -m tests.integration.handoff_probe``: a runner serving the stand-in release."""
    log = open(prefect_server.home / "handoff-probe.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.handoff_probe"],
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
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["probe"]))
                )
            )

    try:
        wait_until(deployed, timeout=60, what="served probe release")
        yield
    finally:
        stop_pid(proc.pid)
        log.close()


@flow(name="handoff-test-ci")
async def ci_stand_in(deployment: str, sha: str = SHA) -> Handoff:
    """The end of the ci flow: an image shipped for a push, then the hand-off."""
    return await hand_off(
        service="api-gateway",
        image=IMAGE,
        source_sha=sha,
        ci_run_id=current_run.id,
        deployment=deployment,
    )


async def wait_for_state(run_id: uuid.UUID, *types: StateType, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(run_id)
            if run.state and run.state.type in types:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {run_id} still {run.state and run.state.name}")
            await _sleep(0.5)


async def _sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)


async def test_hand_off_starts_a_top_level_release_that_suspends_and_can_be_approved(
    served_probe_release, github_settings
):
    sha = _new_sha()
    result = await ci_stand_in(DEPLOYMENT, sha)
    assert result.started and not result.reused, result.error
    assert result.flow_run_url and result.flow_run_id
    assert result.flow_run_id in result.flow_run_url
    release_id = uuid.UUID(result.flow_run_id)

    run = await wait_for_state(release_id, StateType.PAUSED)
    assert run.state.name == "Suspended"
    assert run.parent_task_run_id is None  # not a subflow: it could suspend
    assert run.parameters == {"service": "api-gateway", "image": IMAGE, "source_sha": sha}
    assert run.idempotency_key == f"release-api-gateway-{sha}"

    # The release's commit status points at the release run.
    (status,) = [s for s in github_settings if s["context"] == RELEASE_CONTEXT]
    assert status["path"] == f"/repos/robotics/robotics-api/statuses/{sha}"
    assert status["state"] == "pending"
    assert status["target_url"] == result.flow_run_url
    assert status["auth"] == "Bearer test-token"

    await aresume_flow_run(release_id, run_input={"approve": True})
    done = await wait_for_state(release_id, StateType.COMPLETED, StateType.FAILED, timeout=90)
    assert done.state.type == StateType.COMPLETED


@flow(name="handoff-test-retried-ci")
async def retried_ci_stand_in(ci_run: str, sha: str) -> tuple[Handoff, Handoff]:
    """A CI run whose hand-off step runs twice (a retry, a resume): same CI run id."""
    first = await hand_off(
        service="api-gateway", image=IMAGE, source_sha=sha, ci_run_id=ci_run, deployment=DEPLOYMENT
    )
    again = await hand_off(
        service="api-gateway", image=IMAGE, source_sha=sha, ci_run_id=ci_run, deployment=DEPLOYMENT
    )
    return first, again


def _new_sha() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex[:8]


async def _release_runs_of(sha: str) -> list[Any]:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["probe"]))
        )
    return [r for r in runs if r.parameters.get("source_sha") == sha]


async def test_a_commit_gets_one_release_whichever_ci_run_hands_it_over(
    served_probe_release, github_settings
):
    """A retried CI run, and a new CI run of the same commit (a replayed webhook body with a
    fresh delivery id starts one), reuse the commit's release, live or finished."""
    sha = _new_sha()
    first, again = await retried_ci_stand_in(str(uuid.uuid4()), sha)
    assert first.started and not first.reused
    assert again.flow_run_id == first.flow_run_id  # the same CI run: its hand-off, cached

    def statuses() -> list[dict[str, Any]]:
        return [
            s
            for s in github_settings
            if s["context"] == RELEASE_CONTEXT and s["path"].endswith(sha)
        ]

    reported = len(statuses())
    replayed = await ci_stand_in(DEPLOYMENT, sha)  # another CI run of the same commit
    assert replayed.reused and replayed.flow_run_id == first.flow_run_id
    async with get_client() as client:
        await client.set_flow_run_state(
            uuid.UUID(first.flow_run_id), state=_cancelled(), force=True
        )
    finished = await ci_stand_in(DEPLOYMENT, sha)  # the release has ended: still kept
    assert finished.reused and finished.flow_run_id == first.flow_run_id
    assert [str(r.id) for r in await _release_runs_of(sha)] == [first.flow_run_id]
    # The other CI runs report no second "release started" on the commit.
    assert len(statuses()) == reported


def _cancelled() -> Any:
    from prefect.states import Cancelled

    return Cancelled(message="test cleanup")


async def test_release_that_cannot_start_is_reported_and_nothing_is_lost(github_settings):
    result = await ci_stand_in("release/not-deployed-here")
    assert not result.started
    assert "not-deployed-here" in (result.error or "")
    assert result.command.startswith("prefect deployment run release/not-deployed-here --params")
    assert IMAGE in result.command

    (status,) = [s for s in github_settings if s["context"] == RELEASE_CONTEXT]
    assert status["state"] == "error"
    assert status["description"].startswith("release not started; run: prefect deployment run")

    async with get_client() as client:
        artifact = await client.read_latest_artifacts()  # newest per key
    texts = [a.data for a in artifact if a.key == "release-handoff-api-gateway"]
    assert texts and result.command in str(texts[0]) and IMAGE in str(texts[0])


async def test_ci_status_hooks_report_pending_then_success_with_the_run_url(github_settings):
    @flow(name="status-hooks-ci")
    def plain_ci(service: str, sha: str) -> str:
        return "ok"

    @flow(name="status-hooks-ci-failing")
    def plain_failing_ci(service: str, sha: str) -> str:
        raise RuntimeError("lint failed (exit code 1)")

    fake_ci = with_ci_statuses(plain_ci)
    failing_ci = with_ci_statuses(plain_failing_ci)

    fake_ci("api-gateway", SHA)
    with pytest.raises(RuntimeError):
        failing_ci("api-gateway", SHA)
    ci = [
        (s["state"], s["description"]) for s in github_settings if s["context"] == "robotics-cd/ci"
    ]
    assert [state for state, _ in ci] == ["pending", "success", "pending", "failure"]
    assert "lint failed" in ci[-1][1]
    assert all("/runs/flow-run/" in s["target_url"] for s in github_settings)


async def test_an_operator_releases_a_commit_again_on_purpose(served_probe_release):
    """`robotics-cd release`: a second release of a commit, by name and with a reason; the
    image is checked in the registry first (a stand-in lookup here: the registry itself is
    exercised by the images tests), and a refused one starts nothing."""
    from core.errors import InvalidInput
    from tasks.handoff import MANUAL_RELEASE_KEY, start_manual_release
    from tasks.images import PushedImage

    sha = _new_sha()
    first = await ci_stand_in(DEPLOYMENT, sha)
    assert first.flow_run_id is not None  # CI's hand-off started a release
    tagged, digest = IMAGE.split("@")
    tag = tagged.rsplit(":", 1)[1]

    async def lookup(registry: str, repository: str, asked: str) -> PushedImage | None:
        assert (registry, repository) == ("127.0.0.1:5000", "robotics-serving/api-gateway")
        if asked != tag:
            return None
        return PushedImage(ref=IMAGE, tag=tag, digest=digest, revision=sha)

    manual = await start_manual_release(
        service="api-gateway",
        image=tagged,
        operator="alice",
        reason="redo after the cluster upgrade",
        os_user="ci",
        deployment=DEPLOYMENT,
        lookup=lookup,
    )
    assert manual.flow_run_id != first.flow_run_id
    assert manual.earlier == [first.flow_run_id]
    assert (manual.image, manual.source_sha) == (IMAGE, sha)
    async with get_client() as client:
        run = await client.read_flow_run(uuid.UUID(manual.flow_run_id))
        record = json.loads(await client.read_flow_run_input(run.id, MANUAL_RELEASE_KEY))
    assert {"manual", "operator:alice"} <= set(run.tags)
    assert run.idempotency_key is None
    assert record["operator"] == "alice" and record["reason"] == "redo after the cluster upgrade"

    for image, message in (
        (tagged.replace(tag, "20990101-0000000"), "is not in the registry 127.0.0.1:5000"),
        (f"{tagged}@sha256:{'b' * 64}", "in the registry 127.0.0.1:5000, not sha256:bbb"),
        ("127.0.0.1:5000/robotics-serving/other:1", "is not api-gateway's repository"),
    ):
        with pytest.raises(InvalidInput, match=message):
            await start_manual_release(
                service="api-gateway",
                image=image,
                operator="alice",
                reason="x",
                deployment=DEPLOYMENT,
                lookup=lookup,
            )
    runs = await _release_runs_of(sha)
    assert sorted(str(r.id) for r in runs) == sorted([first.flow_run_id, manual.flow_run_id])
    async with get_client() as client:
        for r in runs:
            await client.set_flow_run_state(r.id, state=_cancelled(), force=True)
