"""The Prefect API side of approvals and operator commands.

The approval form is a ``RunInput`` built per service, so the approver field is a choice
from that service's allowlist in the Prefect UI. Operator commands (abort, promote now)
reach a running release as flow run inputs under the ``command-`` prefix; the release reads
them between analyses.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID, uuid4

import pydantic
from prefect import get_client, get_run_logger, task
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.flow_runs import aresume_flow_run
from prefect.input import RunInput
from prefect.input.actions import acreate_flow_run_input

from core.approval import TIMEOUT_APPROVER, ApprovalDecision, check_approver
from core.errors import InvalidInput

COMMAND_PREFIX = "command-"
Command = Literal["abort", "promote"]


class ApprovalForm(RunInput):
    """Base of the per-service approval form (fields are added per service)."""

    decision: Literal["approve", "reject"] = pydantic.Field(
        description="Approve to start the production canary; reject to end the release."
    )
    comment: str = pydantic.Field(default="", description="Why; kept in the release record.")


def approval_form(approvers: list[str], description: str) -> type[ApprovalForm]:
    """The form for one service: ``approver`` is a choice from its allowlist.

    ``system:timeout`` is in the schema so the expiry flow can resume the run through the
    same validated path; a decision by it is always treated as a rejection.
    """
    choices = tuple([*approvers, TIMEOUT_APPROVER])
    model = pydantic.create_model(
        "ApprovalForm",
        __base__=ApprovalForm,
        approver=(  # type: ignore[arg-type]
            Literal[choices],  # type: ignore[valid-type]
            pydantic.Field(description="Who decides (from the service's approvers)."),
        ),
    )
    form: type[ApprovalForm] = model.with_initial_data(description=description)
    return form


def to_decision(form: ApprovalForm) -> ApprovalDecision:
    return ApprovalDecision(
        decision=form.decision,
        approver=str(getattr(form, "approver")),  # noqa: B009 - a field added per service
        comment=form.comment,
    )


async def resume_with_decision(
    flow_run_id: UUID, decision: str, approver: str, comment: str, allowed: list[str] | None = None
) -> None:
    """Resume a suspended release with a decision (what the UI's Resume form does)."""
    if decision not in ("approve", "reject"):
        raise InvalidInput(f"decision must be approve or reject, not {decision!r}")
    if allowed is not None and approver != TIMEOUT_APPROVER:
        check_approver(approver, allowed)
    await aresume_flow_run(
        flow_run_id, run_input={"decision": decision, "approver": approver, "comment": comment}
    )


async def send_command(flow_run_id: UUID, command: Command, reason: str, sender: str) -> str:
    key = f"{COMMAND_PREFIX}{uuid4().hex}"
    value = {
        "command": command,
        "reason": reason,
        "sender": sender,
        "at": datetime.now(UTC).isoformat(),
    }
    await acreate_flow_run_input(key=key, value=value, flow_run_id=flow_run_id)
    return key


async def pending_commands(flow_run_id: UUID, seen: set[str]) -> list[tuple[str, dict[str, Any]]]:
    async with get_client() as client:
        inputs = await client.filter_flow_run_input(
            flow_run_id=flow_run_id, key_prefix=COMMAND_PREFIX, limit=50, exclude_keys=seen
        )
    ordered = sorted(inputs, key=lambda i: i.created or datetime.min.replace(tzinfo=UTC))
    return [(item.key, dict(item.decoded_value)) for item in ordered]


async def paused_release_runs(deployment_name: str) -> list[FlowRun]:
    async with get_client() as client:
        return await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
            ),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name])),
        )


@task(name="expire-overdue-approvals")
async def expire_overdue(
    deployment_name: str, timeouts: dict[str, timedelta], default_timeout: timedelta
) -> list[str]:
    """Resume overdue approvals with a reject decision from ``system:timeout``."""
    logger = get_run_logger()
    now = datetime.now(UTC)
    expired: list[str] = []
    waiting = await paused_release_runs(deployment_name)
    logger.info("%d release(s) of %r wait for approval", len(waiting), deployment_name)
    for run in waiting:
        if run.state is None or run.state.timestamp is None:
            continue
        service = str(run.parameters.get("service", ""))
        limit = timeouts.get(service, default_timeout)
        waited = now - run.state.timestamp
        if waited < limit:
            logger.info("release %s (%s) waited %s of %s", run.id, service, waited, limit)
            continue
        await resume_with_decision(
            run.id, "reject", TIMEOUT_APPROVER, f"no decision within {limit}"
        )
        expired.append(str(run.id))
    return expired
