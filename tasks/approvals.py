"""The Prefect API side of approvals and operator commands.

The approval form is a ``RunInput`` built per service, so the approver field is a choice
from that service's allowlist in the Prefect UI, and nothing else. Operator commands (abort,
promote now) reach a running release as flow run inputs under the ``command-`` prefix; the
release reads them between analyses.

An overdue approval has its own way in, which the form does not show: the expiry flow
writes the flow run input ``approval-expired`` and moves the suspended run to
``Scheduled/Resuming`` (what the resume endpoint does, without the form's validation). The
resumed run finds that input before it would suspend again and ends "rejected: timed out"
by itself, so its record, event and chat message are written the usual way.
"""

from __future__ import annotations

import json
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
from core.settings import get_settings

COMMAND_PREFIX = "command-"
APPROVAL_KEY = "approval"
EXPIRY_KEY = "approval-expired"
Command = Literal["abort", "promote"]


class ApprovalForm(RunInput):
    """Base of the per-service approval form (fields are added per service)."""

    decision: Literal["approve", "reject"] = pydantic.Field(
        description="Approve to start the production canary; reject to end the release."
    )
    comment: str = pydantic.Field(default="", description="Why; kept in the release record.")


def approval_form(approvers: list[str], description: str) -> type[ApprovalForm]:
    """The form for one service: ``approver`` is a choice from its allowlist, and only that
    (the server validates a resume against this schema, so other names are refused)."""
    choices = tuple(approvers)
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
    if allowed is not None:
        check_approver(approver, allowed)
    await aresume_flow_run(
        flow_run_id, run_input={"decision": decision, "approver": approver, "comment": comment}
    )


async def send_command(
    flow_run_id: UUID, command: Command, reason: str, sender: str, os_user: str = ""
) -> str:
    """``sender`` is the name the operator gave (checked against the allowlist by the
    caller); ``os_user`` the account the command ran under, kept beside it."""
    key = f"{COMMAND_PREFIX}{uuid4().hex}"
    value = {
        "command": command,
        "reason": reason,
        "sender": sender,
        "os_user": os_user,
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


def _response_key() -> str:
    from prefect.input.run_input import keyset_from_paused_state
    from prefect.states import Suspended

    return keyset_from_paused_state(Suspended(pause_key=APPROVAL_KEY))["response"]


async def expiry_decision(flow_run_id: UUID) -> ApprovalDecision | None:
    """The timeout decision if the expiry path resumed this run, else None.

    A person's answer in the form wins over a racing expiry."""
    async with get_client() as client:
        expiry = await _read_input(client, flow_run_id, EXPIRY_KEY)
        if expiry is None or await _read_input(client, flow_run_id, _response_key()) is not None:
            return None
    reason = str(json.loads(expiry).get("reason", ""))
    return ApprovalDecision(decision="reject", approver=TIMEOUT_APPROVER, comment=reason)


async def _read_input(client: Any, flow_run_id: UUID, key: str) -> str | None:
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    try:
        value: str = await client.read_flow_run_input(flow_run_id, key)
    except ObjectNotFound:
        return None
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code == 404:
            return None
        raise
    return value


async def wait_for_decision(approvers: list[str], description: str) -> ApprovalDecision:
    """Suspend the current (deployment) run with the approval form until someone decides,
    or until the expiry flow ends the wait (see the module's docstring)."""
    from prefect.flow_runs import suspend_flow_run
    from prefect.runtime import flow_run

    expired = await expiry_decision(UUID(str(flow_run.id)))
    if expired is not None:
        return expired
    form = await suspend_flow_run(  # type: ignore[misc]
        wait_for_input=approval_form(approvers, description), key=APPROVAL_KEY
    )
    return to_decision(form)


async def expire_run(flow_run_id: UUID, reason: str) -> bool:
    """Resume a suspended release through the expiry key; False if it no longer waits
    (someone decided first), in which case nothing is left behind."""
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.states import Scheduled

    value = {"reason": reason, "at": datetime.now(UTC).isoformat()}
    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        if run.state is None or not run.state.is_paused():
            return False
        try:
            await client.create_flow_run_input(flow_run_id, EXPIRY_KEY, json.dumps(value))
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code == 409:  # an earlier expiry is under way
                return False
            raise
        result: Any = await client.set_flow_run_state(
            flow_run_id, Scheduled(name="Resuming", scheduled_time=datetime.now(UTC))
        )
        if result.status != SetStateStatus.ACCEPT:
            await client.delete_flow_run_input(flow_run_id, EXPIRY_KEY)
            return False
    return True


@task(name="expire-overdue-approvals")
async def expire_overdue(
    deployment_name: str, timeouts: dict[str, timedelta], default_timeout: timedelta
) -> list[str]:
    """End overdue approvals through the expiry key: each release ends "rejected: timed out"."""
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
        if await expire_run(run.id, f"no decision within {limit}"):
            expired.append(str(run.id))
        else:
            logger.info("release %s (%s) was decided meanwhile", run.id, service)
    return expired


async def waiting_releases(service: str, *, exclude: str) -> list[FlowRun]:
    """The releases of ``service`` (runs of the release deployment) waiting for approval."""
    deployment = get_settings().release_deployment.split("/")[-1]
    return [
        run
        for run in await paused_release_runs(deployment)
        if str(run.parameters.get("service", "")) == service and str(run.id) != exclude
    ]


async def supersede_run(run: FlowRun, why: str) -> bool:
    """End a release that waits for approval in the terminal state ``Superseded``, through
    the API (a suspended run has no process to do it); False if it no longer waits."""
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Failed

    async with get_client() as client:
        current = await client.read_flow_run(run.id)
        if current.state is None or not current.state.is_paused():
            return False
        result: Any = await client.set_flow_run_state(
            run.id, Failed(name="Superseded", message=f"superseded: {why}")
        )
    return bool(result.status == SetStateStatus.ACCEPT)
