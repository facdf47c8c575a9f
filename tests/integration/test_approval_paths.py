"""Approvals on the real Prefect server, through a served stand-in release.

- The form a person sees offers the service's approvers and nothing else: the schema the UI
  renders is the stored ``suspended-approval-schema`` input, and the server refuses any other
  name (``system:timeout`` included) when resuming.
- An overdue approval has its own way in (the ``approval-expired`` key): the run resumes and
  ends "rejected: timed out" by itself.
- ``robotics-cd reject`` says what it did, in words.
"""

from __future__ import annotations

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
from prefect.flow_runs import aresume_flow_run
from typer.testing import CliRunner

from cli.app import app
from core.approval import TIMEOUT_APPROVER
from sandbox.procs import stop_pid, wait_until
from tasks.approvals import EXPIRY_KEY, expire_run
from tests.integration.approval_probe import APPROVERS, DEPLOYMENT

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


async def _start() -> FlowRun:
    run: FlowRun = await arun_deployment(
        DEPLOYMENT,
        parameters={"service": "api-gateway", "image": f"probe-{uuid.uuid4().hex[:6]}"},
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


def _paused(run: FlowRun) -> bool:
    return run.state is not None and run.state.type == StateType.PAUSED


def _final(run: FlowRun) -> bool:
    return run.state is not None and run.state.is_final()


async def test_a_person_can_choose_only_the_services_approvers(served_probe):
    run = await _start()
    await _wait(run.id, _paused, "probe waiting for approval")
    async with get_client() as client:
        schema = json.loads(await client.read_flow_run_input(run.id, SCHEMA_KEY))
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
        result = await anyio.to_thread.run_sync(lambda a=args: runner.invoke(app, a))
        assert result.exit_code == 2, result.output
        assert "allowlist" in result.output or "reason is required" in result.output
    async with get_client() as client:
        sent = await client.filter_flow_run_input(run.id, "command-", 10, set())
    assert sent == []
    await aresume_flow_run(
        run.id, run_input={"decision": "reject", "approver": "alice", "comment": "cleanup"}
    )
