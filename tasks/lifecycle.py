"""A release's life as Prefect sees it: its events, and the rollback started for it when
its run is cancelled or crashes."""

from __future__ import annotations

from typing import Any

from prefect import get_client
from prefect.client.schemas.objects import Flow, FlowRun, State
from prefect.deployments.flow_runs import arun_deployment
from prefect.events import emit_event
from prefect.logging import get_logger
from prefect.states import Running

from core.release import ReleasePlan
from core.settings import get_settings

log = get_logger("robotics_cd.lifecycle")

RELEASE_EVENTS = ("started", "awaiting-approval", "promoted", "rolled-back", "rejected")


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
            "`robotics-cd rollback %s --env production`",
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
