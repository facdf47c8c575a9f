"""The scale-out Prefect server as an operator meets it: PostgreSQL and Redis in the state
dir, two API servers (one ``--no-services``) behind one balanced address, events crossing
from one server to the other's automations through Redis, WebSockets through the balancer,
and ``stop`` leaving nothing running.
"""

from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime

import anyio
import httpx
import pytest
from prefect import flow, get_client
from prefect.automations import AutomationCore, ChangeFlowRunState, EventTrigger
from prefect.client.schemas.objects import StateType
from prefect.events import Event
from prefect.events.clients import PrefectEventsClient, PrefectEventSubscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.settings import PREFECT_API_URL, temporary_settings

from sandbox import prefect_server
from sandbox.procs import pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@flow(name="scaleout-probe")
def probe() -> None:
    return None


@pytest.fixture(scope="module")
def stack(prefect_scaleout):
    with temporary_settings(updates={PREFECT_API_URL: prefect_scaleout.api_url}):
        yield prefect_scaleout


def _backend_url(stack, name: str) -> str:
    port = prefect_server._stack(stack.home)["servers"][name]["port"]
    return f"http://127.0.0.1:{port}/api"


def test_every_part_answers_and_status_says_so(stack):
    parts = {name: (ok, detail) for name, ok, detail in prefect_server.status_parts(stack.home)}
    assert set(parts) == {
        "postgresql",
        "redis",
        "prefect server api",
        "prefect server services",
        "prefect balancer",
    }
    assert all(ok for ok, _ in parts.values()), parts
    assert "--no-services" in parts["prefect server api"][1]
    assert "--no-services" not in parts["prefect server services"][1]
    # The database really is PostgreSQL: the server says so through the balancer.
    version = httpx.get(f"{stack.api_url}/admin/version", timeout=10)
    assert version.status_code == 200


def test_new_connections_are_spread_over_both_servers(stack):
    def served() -> dict[str, int]:
        state = httpx.get(f"{stack.ui_url}/_balancer", timeout=5).json()
        return {f"{b['host']}:{b['port']}": b["connections"] for b in state["backends"]}

    before = served()
    for _ in range(6):  # a fresh client each time: a new connection
        assert httpx.get(f"{stack.api_url}/health", timeout=10).status_code == 200
    after = served()
    assert all(after[k] - before[k] >= 2 for k in before), (before, after)


def test_an_event_sent_to_the_api_server_fires_the_services_servers_automation(stack):
    """The trigger runs only in ``services``; the event goes to ``api`` (over its WebSocket).
    Only Redis can carry it across. A subscriber on the balancer (WebSocket through it)
    sees the event too."""
    marker = f"robotics-cd.test.cancel-{uuid.uuid4().hex[:8]}"

    async def scenario() -> tuple[StateType | None, list[str]]:
        async with get_client() as client:
            run = await client.create_flow_run(probe)
            automation = AutomationCore(
                name=f"scaleout-{marker}",
                trigger=EventTrigger(
                    match={"prefect.resource.id": f"prefect.flow-run.{run.id}"},
                    expect={marker},
                    posture="Reactive",
                    threshold=1,
                ),
                actions=[ChangeFlowRunState(state=StateType.CANCELLED, message=marker)],
            )
            automation_id = await client.create_automation(automation)
            seen: list[str] = []
            try:
                subscriber = PrefectEventSubscriber(
                    api_url=stack.api_url,
                    filter=EventFilter(
                        event=EventNameFilter(name=[marker]),
                        resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"]),
                    ),
                )
                async with subscriber:
                    with anyio.fail_after(120):
                        state = None
                        while state != StateType.CANCELLED:
                            # The triggers service loads a new automation within seconds:
                            # resend until it acts (each event is a fresh id).
                            async with PrefectEventsClient(
                                api_url=_backend_url(stack, "api")
                            ) as events:
                                await events.emit(
                                    Event(
                                        occurred=datetime.now(UTC),
                                        event=marker,
                                        resource={
                                            "prefect.resource.id": f"prefect.flow-run.{run.id}"
                                        },
                                    )
                                )
                            with anyio.move_on_after(3):
                                async for event in subscriber:
                                    seen.append(event.event)
                                    break
                            current = await client.read_flow_run(run.id)
                            state = current.state.type if current.state else None
                return state, seen
            finally:
                await client.delete_automation(automation_id)

    state, seen = anyio.run(scenario)
    assert state == StateType.CANCELLED
    assert marker in seen


def test_stop_leaves_nothing_running(stack):
    pids = [pid for group in prefect_server.pids(stack.home).values() for pid in group]
    stack_file = prefect_server._stack(stack.home)
    ports = [s["port"] for s in stack_file["servers"].values()] + [stack_file["balancer"]["port"]]
    ports += [int((stack.home / part / "port").read_text()) for part in ("postgres", "redis")]
    assert len(pids) >= 5
    stopped = prefect_server.stop_prefect_stack(stack.home)
    assert set(stopped) == {
        "prefect balancer",
        "prefect api",
        "prefect services",
        "redis",
        "postgresql",
    }
    assert not [pid for pid in pids if pid_alive(pid)]
    for port in ports:  # nothing listens any more (closed connections may sit in TIME_WAIT)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
    assert not any(ok for _, ok, _ in prefect_server.status_parts(stack.home)[1:])
