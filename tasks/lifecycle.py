"""A release's life as Prefect sees it: its events, and the rollback started for it when
its run is cancelled or crashes."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import Flow, FlowRun, State, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments.flow_runs import arun_deployment
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_logger
from prefect.states import Crashed, Running

from core.recovery import RunPhase, phase_of
from core.release import ReleasePlan
from core.settings import get_settings
from tasks.logs import run_logger

log = get_logger("robotics_cd.lifecycle")

RELEASE_EVENTS = (
    "started",
    "staging-failed",
    "awaiting-approval",
    "promoted",
    "rolled-back",
    "rollback-failed",
    "rejected",
    "frozen",
    "break-glass",
)


def emit_release_event(
    name: str,
    plan: ReleasePlan,
    payload: dict[str, Any] | None = None,
    flow_run_id: str | None = None,
) -> None:
    """``robotics.release.<name>`` with the service as resource, for automations."""
    if name not in RELEASE_EVENTS:
        raise ValueError(f"unknown release event {name!r}")
    from prefect.runtime import flow_run

    run_id = flow_run_id or str(flow_run.id)
    emit_event(
        event=f"robotics.release.{name}",
        resource={
            "prefect.resource.id": f"robotics.service.{plan.service}",
            "prefect.resource.name": plan.service,
        },
        related=[
            {
                "prefect.resource.id": f"prefect.flow-run.{run_id}",
                "prefect.resource.role": "flow-run",
            }
        ],
        payload={
            "image": plan.image,
            "tag": plan.tag,
            "digest": plan.digest,
            "source_sha": plan.source_sha,
            **(payload or {}),
        },
    )


TRAIN_EVENTS = (
    "started",
    "staging-failed",
    "awaiting-approval",
    "step",
    "promoted",
    "rolled-back",
    "rollback-failed",
    "rejected",
    "frozen",
    "superseded",
)


def emit_train_event(
    name: str, train: str, services: dict[str, str], payload: dict[str, Any] | None = None
) -> None:
    """``robotics.train.<name>``: the train as resource, each service (and the run) related.
    ``services``: each service and its image."""
    if name not in TRAIN_EVENTS:
        raise ValueError(f"unknown train event {name!r}")
    from prefect.runtime import flow_run

    emit_event(
        event=f"robotics.train.{name}",
        resource={"prefect.resource.id": f"robotics.train.{train}", "prefect.resource.name": train},
        related=[
            {
                "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
                "prefect.resource.role": "flow-run",
            },
            *(
                {
                    "prefect.resource.id": f"robotics.service.{svc}",
                    "prefect.resource.role": "service",
                }
                for svc in services
            ),
        ],
        payload={"services": services, **(payload or {})},
    )


async def start_rollback(service: str, release_run_id: str, reason: str) -> str:
    """Start the ``rollback`` deployment for a release, at most once per release."""
    run = await arun_deployment(
        get_settings().rollback_deployment,
        parameters={
            "service": service,
            "environment": "production",
            "release_run_id": release_run_id,
            "reason": reason,
        },
        timeout=0,
        as_subflow=False,
        idempotency_key=f"rollback-{release_run_id}",
    )
    return str(run.id)


async def start_rollback_for(flow: Flow, flow_run: FlowRun, state: State[Any]) -> None:
    """State hook of the release flow: a cancelled or crashed release is rolled back by a
    rollback run (the automation registered by ``robotics-cd deploy`` does the same for
    runs whose process died without running hooks; the idempotency key keeps it to one)."""
    service = str(flow_run.parameters.get("service", ""))
    if not service:
        return
    try:
        run_id = await start_rollback(
            service,
            str(flow_run.id),
            f"release {(state.name or state.type.value).lower()}: {state.message or ''}",
        )
    except Exception as exc:
        log.error(
            "could not start the rollback of release %s: %s; run "
            "`robotics-cd rollback %s --env production --operator NAME --reason ...` "
            "(or `robotics-cd reconcile`)",
            flow_run.id,
            exc,
            service,
        )
        return
    log.warning("release %s %s: rollback run %s started", flow_run.id, state.name, run_id)


async def mark_waiting(message: str | None) -> None:
    """Say in the run's own state what it waits for (``None``: back to plain Running), so
    the Prefect UI's run list and ``robotics-cd status`` show who holds the lock."""
    from prefect.runtime import flow_run

    state: State[Any] = Running(name="AwaitingLock", message=message) if message else Running()
    async with get_client() as client:
        await client.set_flow_run_state(flow_run.id, state, force=True)
    # The run's log says it too (the state message is replaced once the wait ends).
    run_logger("robotics_cd.lifecycle").info("%s", message or "no longer waiting: lock taken")


async def run_phase(run_id: str) -> RunPhase:
    """What Prefect says of ``run_id``; ``UNKNOWN`` when the API does not answer (never
    read as silence), ``MISSING`` when it has no such run."""
    try:
        async with get_client() as client:
            run = await client.read_flow_run(UUID(run_id))
    except ObjectNotFound:
        return RunPhase.MISSING
    except ValueError:  # not a flow run id: a one-shot reconciler's own holder name
        return RunPhase.MISSING
    except Exception as exc:  # the control plane, not the run
        log.warning("Prefect API did not answer about run %s: %s", run_id, exc)
        return RunPhase.UNKNOWN
    state = run.state
    return phase_of(state.type.value if state else None, state.name if state else None)


async def mark_crashed(run_id: str, message: str) -> bool:
    """End a run that Prefect still shows alive as ``Crashed``, with what was done for it.
    False when it had ended already or the API did not answer."""
    try:
        async with get_client() as client:
            run = await client.read_flow_run(UUID(run_id))
            if run.state is not None and run.state.is_final():
                return False
            await client.set_flow_run_state(UUID(run_id), Crashed(message=message), force=True)
            return True
    except Exception as exc:
        log.warning("could not mark run %s Crashed: %s", run_id, exc)
        return False


async def last_run_of(deployment_name: str) -> FlowRun | None:
    """The latest finished run of a deployment (``flow/deployment``), or None."""
    async with get_client() as client:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))
            ),
            sort=FlowRunSort.END_TIME_DESC,
            limit=1,
        )
    return runs[0] if runs else None


@dataclass(frozen=True)
class RunningRun:
    """A run Prefect shows Running, and the process that claimed it (None: not claimed)."""

    run_id: str
    service: str
    state_name: str
    host: str | None
    pid: int | None


async def claim_process() -> None:
    """Record this flow process as the run's ``infrastructure_pid`` (``host:pid``, the
    process worker's format), so a reconciler on the same host can tell a dead run from a
    slow one without trusting heartbeats. A run that already names its infrastructure (a
    worker's Job) is left as it is. Best effort: the release does not depend on it."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    try:
        async with get_client() as client:
            run = await client.read_flow_run(UUID(flow_run.id))
            claimed = f"{socket.gethostname()}:{os.getpid()}"
            if run.infrastructure_pid and not _is_process_claim(run.infrastructure_pid):
                return
            await client.update_flow_run(UUID(flow_run.id), infrastructure_pid=claimed)
    except Exception as exc:
        log.warning("could not record this run's process: %s", exc)


def _is_process_claim(value: str) -> bool:
    host, _, pid = value.rpartition(":")
    return bool(host) and pid.isdigit()


async def running_runs(flow_name: str) -> list[RunningRun]:
    """The runs of ``flow_name`` that Prefect shows Running (AwaitingLock included), with
    the process each claimed. Raises when the API does not answer: no answer is no proof."""
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
            ),
        )
    found: list[RunningRun] = []
    for run in runs:
        claim = run.infrastructure_pid or ""
        host: str | None = None
        pid: int | None = None
        if _is_process_claim(claim):
            host, _, number = claim.rpartition(":")
            pid = int(number)
        name = (run.state.name if run.state else None) or "Running"
        service = str((run.parameters or {}).get("service", "?"))
        found.append(
            RunningRun(run_id=str(run.id), service=service, state_name=name, host=host, pid=pid)
        )
    return found
