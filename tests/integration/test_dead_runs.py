"""The reconciler ends release runs whose process died while they held no production lease
(a runner killed during staging, or while waiting for the lock): Prefect would show them
Running forever without the heartbeat automation; the reconciler ends them Crashed itself,
judged by the process each run claimed, never by heartbeats."""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any
from uuid import UUID

import pytest
from prefect import flow, get_client
from prefect.states import Cancelled, Running

from flows.reconcile import end_dead_runs
from tasks.lifecycle import running_runs

pytestmark = pytest.mark.integration
SERVICE = "dead-runs-probe"


@flow(name="release")
def _release_stand_in(service: str) -> None:
    """Only its name matters: the runs below are made through the API, never executed."""


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


async def _run(claim: str | None, state_name: str = "Running") -> UUID:
    async with get_client() as client:
        run = await client.create_flow_run(
            _release_stand_in,
            parameters={"service": SERVICE},
            state=Running(name=state_name),
        )
        if claim:
            await client.update_flow_run(run.id, infrastructure_pid=claim)
    return run.id


async def _state(run_id: UUID) -> Any:
    async with get_client() as client:
        return (await client.read_flow_run(run_id)).state


async def test_a_dead_run_without_a_lease_ends_crashed_and_nothing_else_does(
    prefect_server: Any,
) -> None:
    host = socket.gethostname()
    dead = await _run(f"{host}:{_dead_pid()}", state_name="AwaitingLock")
    alive = await _run(f"{host}:{os.getpid()}")
    elsewhere = await _run(f"another-host:{_dead_pid()}")  # cannot be seen: never judged
    unclaimed = await _run(None)
    holder = await _run(f"{host}:{_dead_pid()}")  # the lease pass answers for it
    try:
        listed = {r.run_id: r for r in await running_runs("release")}
        assert listed[str(dead)].pid is not None and listed[str(dead)].service == SERVICE
        assert listed[str(unclaimed)].pid is None

        ended = await end_dead_runs(holders={str(holder)})

        assert [e.holder for e in ended if e.service == SERVICE] == [str(dead)]
        state = await _state(dead)
        assert state.type.value == "CRASHED"
        assert "production untouched" in state.message and "AwaitingLock" in state.message
        for untouched in (alive, elsewhere, unclaimed, holder):
            assert (await _state(untouched)).type.value == "RUNNING"
        assert await end_dead_runs(holders={str(holder)}) == []  # a second pass: nothing
    finally:
        async with get_client() as client:
            for run_id in (dead, alive, elsewhere, unclaimed, holder):
                await client.set_flow_run_state(run_id, Cancelled(), force=True)
