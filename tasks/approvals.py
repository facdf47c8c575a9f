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

Votes (issue #20). Every answer is a *vote*, read back from the run's inputs each time the
release re-executes: answers to the form (``suspended-approval…-response``, one per round,
path ``ui``, authenticated when ``ROBOTICS_CD_UI_AUTHENTICATED`` says a proxy proves who
people are) and votes the comment handler writes (``vote-github-<comment id>``, path
``github``, authenticated). Until the votes decide (:func:`core.approval.decide`), the run
suspends again under a fresh pause key (``approval``, ``approval-1``, …) with the quorum's
progress as its state message ("1 of 2 approvals"). A run approved during a freeze suspends
in a state named ``Frozen`` (no lease is taken before it) and the scheduled approvals flow
resumes it when the window ends. Resuming from outside (a comment, the scheduler, the
expiry) is :func:`reschedule`: ``Scheduled/Resuming``, as the resume endpoint does, without
touching the form.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID, uuid4

import pydantic
from prefect import get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
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

from core.approval import (
    TIMEOUT_APPROVER,
    ApprovalDecision,
    Vote,
    check_approver,
    decide,
    reminder_due,
    reminder_text,
    tally,
)
from core.errors import InvalidInput
from core.freeze import Freeze, FreezeWindow, active_freeze
from core.settings import get_settings

COMMAND_PREFIX = "command-"
APPROVAL_KEY = "approval"
EXPIRY_KEY = "approval-expired"
VOTE_PREFIX = "vote-"
REFUSED_PREFIX = "refused-"
REMINDER_PREFIX = "reminder-"
RESPONSE_PREFIX = f"suspended-{APPROVAL_KEY}"
FROZEN = "Frozen"
WAITING = "Suspended"
Command = Literal["abort", "promote"]


class ApprovalForm(RunInput):
    """Base of the per-service approval form (fields are added per service)."""

    decision: Literal["approve", "reject"] = pydantic.Field(
        description="Approve to start the production canary; reject to end the release."
    )
    comment: str = pydantic.Field(default="", description="Why; kept in the release record.")
    break_glass: bool = pydantic.Field(
        default=False,
        description="Release during a freeze (break-glass): needs a reason in the comment "
        "and at least two authenticated approvers asking for it.",
    )


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


async def expiry_decision(
    flow_run_id: UUID, answered: bool | None = None
) -> ApprovalDecision | None:
    """The timeout decision if the expiry path resumed this run, else None.

    A person's answer in the form wins over a racing expiry (``answered``: the caller knows
    the votes did not decide; None: look at the first round's answer)."""
    async with get_client() as client:
        expiry = await _read_input(client, flow_run_id, EXPIRY_KEY)
        if expiry is None:
            return None
        if answered is None and await _read_input(client, flow_run_id, _response_key()) is not None:
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
    """One approver decides (the quorum of 1): :func:`wait_for_votes` with its defaults."""
    return await wait_for_votes(approvers, description)


async def expire_run(flow_run_id: UUID, reason: str) -> bool:
    """Resume a suspended release through the expiry key; False if it no longer waits
    (someone decided first), in which case nothing is left behind."""
    from prefect.exceptions import PrefectHTTPStatusError

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
        if not await reschedule(client, flow_run_id):
            await client.delete_flow_run_input(flow_run_id, EXPIRY_KEY)
            return False
    return True


async def reschedule(client: Any, flow_run_id: UUID) -> bool:
    """Resume a suspended run from outside (``Scheduled/Resuming``, what the resume
    endpoint does, without the form); False when it is not paused any more."""
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Scheduled

    run = await client.read_flow_run(flow_run_id)
    if run.state is None or not run.state.is_paused():
        return False
    result: Any = await client.set_flow_run_state(
        flow_run_id, Scheduled(name="Resuming", scheduled_time=datetime.now(UTC))
    )
    return bool(result.status == SetStateStatus.ACCEPT)


# --- votes -----------------------------------------------------------------------------------


def round_key(n: int) -> str:
    return APPROVAL_KEY if n == 0 else f"{APPROVAL_KEY}-{n}"


async def read_votes(flow_run_id: UUID, *, ui_authenticated: bool) -> list[Vote]:
    """Every answer the run has, oldest first: the form's (one per round) and the recorded
    ``vote-`` inputs (GitHub comments)."""
    async with get_client() as client:
        answers = await client.filter_flow_run_input(
            flow_run_id=flow_run_id, key_prefix=RESPONSE_PREFIX, limit=200, exclude_keys=set()
        )
        recorded = await client.filter_flow_run_input(
            flow_run_id=flow_run_id, key_prefix=VOTE_PREFIX, limit=200, exclude_keys=set()
        )
    votes: list[Vote] = []
    for item in answers:
        if not item.key.endswith("-response"):
            continue
        value = dict(item.decoded_value)
        votes.append(
            Vote(
                decision=value.get("decision", "reject"),
                approver=str(value.get("approver", "")),
                path="ui",
                authenticated=ui_authenticated,
                comment=str(value.get("comment", "")),
                break_glass=bool(value.get("break_glass", False)),
                at=item.created,
            )
        )
    for item in recorded:
        vote = Vote.model_validate(item.decoded_value)
        votes.append(vote if vote.at else vote.model_copy(update={"at": item.created}))
    return sorted(votes, key=lambda v: v.at or datetime.min.replace(tzinfo=UTC))


async def record_input_once(flow_run_id: UUID, key: str, value: dict[str, Any]) -> bool:
    """Write a run input under ``key`` unless it is there: False for a repeat (a redelivered
    webhook), which then changes nothing."""
    from prefect.exceptions import PrefectHTTPStatusError

    async with get_client() as client:
        try:
            await client.create_flow_run_input(flow_run_id, key, json.dumps(value, default=str))
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code == 409:
                return False
            raise
    return True


async def refused_attempts(flow_run_id: UUID) -> list[str]:
    """The comments refused on this run (``refused-`` inputs), one line each for the record:
    who tried, what, why it was refused, and where."""
    async with get_client() as client:
        items = await client.filter_flow_run_input(
            flow_run_id=flow_run_id, key_prefix=REFUSED_PREFIX, limit=200, exclude_keys=set()
        )
    ordered = sorted(items, key=lambda i: i.created or datetime.min.replace(tzinfo=UTC))
    lines = []
    for item in ordered:
        value = dict(item.decoded_value)
        lines.append(
            f"refused {value.get('command', '?')} by @{value.get('login', '?')}: "
            f"{value.get('reason', '')} ({value.get('comment', '')})"
        )
    return lines


async def record_vote(flow_run_id: UUID, key: str, vote: Vote) -> bool:
    """Record a vote and resume the run so it counts it; False when already recorded."""
    if not await record_input_once(flow_run_id, VOTE_PREFIX + key, vote.model_dump(mode="json")):
        return False
    async with get_client() as client:
        await reschedule(client, flow_run_id)
    return True


async def _unused_round(flow_run_id: UUID) -> str:
    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
    used = set(getattr(run.empirical_policy, "pause_keys", None) or ())
    n = 0
    while round_key(n) in used:
        n += 1
    return round_key(n)


async def suspend_as(
    form: type[ApprovalForm], *, name: str, message: str, key: str | None = None
) -> ApprovalForm:
    """``suspend_flow_run(wait_for_input=form)`` with the state's name and message ours
    (``Frozen``; "1 of 2 approvals"): the process exits; the run re-executes from the top
    when resumed. A key answered before returns its answer instead."""
    from prefect._flow_run_suspension import mark_flow_run_suspension_requested
    from prefect.context import FlowRunContext
    from prefect.exceptions import Pause
    from prefect.input.run_input import keyset_from_paused_state
    from prefect.states import Paused
    from prefect.utilities.engine import propose_state

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("only a flow run can suspend itself")
    run_id = context.flow_run.id
    state: Any = Paused(
        name=name,
        message=message,
        reschedule=True,
        timeout_seconds=None,
        pause_key=key or await _unused_round(run_id),
    )
    keyset = keyset_from_paused_state(state)
    state.state_details.run_input_keyset = dict(keyset)
    async with get_client() as client:
        proposed = await propose_state(client=client, state=state, flow_run_id=run_id)
    if proposed.is_running():
        answer: ApprovalForm = await form.aload(keyset)
        return answer
    if not proposed.is_paused():
        raise RuntimeError(f"the run could not suspend: the server answered {proposed}")
    await form.asave(keyset)
    mark_flow_run_suspension_requested(run_id, proposed)
    raise Pause(state=proposed)


async def wait_for_votes(
    approvers: list[str],
    description: str,
    *,
    required: int = 1,
    ui_authenticated: bool = False,
    cover: Mapping[str, Collection[str]] | None = None,
) -> ApprovalDecision:
    """Suspend (fresh round each time) until the votes decide, or the expiry ends the wait.
    ``cover``: groups that each need an approver of their own (a train's services)."""
    from prefect.runtime import flow_run

    run_id = UUID(str(flow_run.id))
    votes = await read_votes(run_id, ui_authenticated=ui_authenticated)
    decided = decide(votes, required, cover)
    if decided is not None:
        return decided
    expired = await expiry_decision(run_id, answered=False)
    if expired is not None:
        return expired
    progress = tally(votes, required, cover).progress()
    text = (
        description if required == 1 and not cover else f"**{progress}** so far.\n\n{description}"
    )
    form = approval_form(approvers, text)
    answer = await suspend_as(form, name=WAITING, message=f"waiting for approval: {progress}")
    # Only reached when the round had been answered before (not a fresh key): count again.
    votes.append(
        Vote(
            decision=answer.decision,
            approver=str(getattr(answer, "approver")),  # noqa: B009 - a field added per service
            path="ui",
            authenticated=ui_authenticated,
            comment=answer.comment,
            break_glass=answer.break_glass,
        )
    )
    return decide(votes, required, cover) or ApprovalDecision(
        decision="reject", approver=TIMEOUT_APPROVER, comment="no decision"
    )


async def hold_for_freeze(approvers: list[str], freeze: Freeze, description: str) -> None:
    """Suspend, approved, in the state ``Frozen`` until the scheduler resumes the run at the
    window's end (or two approvers break the glass in the form or by comment)."""
    form = approval_form(approvers, f"**Frozen**: {freeze.describe()}\n\n{description}")
    await suspend_as(form, name=FROZEN, message=freeze.describe())


@dataclass(frozen=True)
class WaitingPolicy:
    """What the scheduled approvals flow needs of one service (resolved once by the flow)."""

    timeout: timedelta
    remind_after: timedelta | None
    approvers: list[str]
    required: int
    freezes: list[tuple[str, FreezeWindow]]


@dataclass
class Tended:
    expired: list[str] = field(default_factory=list)
    thawed: list[str] = field(default_factory=list)
    reminders: list[tuple[str, str, str]] = field(default_factory=list)  # run id, service, text


async def _waiting_since(client: Any, run: FlowRun) -> datetime | None:
    """When the approval was first asked for (the first round's form), else the state's time."""
    first = await client.filter_flow_run_input(
        flow_run_id=run.id, key_prefix=f"{RESPONSE_PREFIX}-schema", limit=1, exclude_keys=set()
    )
    if first and first[0].created is not None:
        created: datetime = first[0].created
        return created
    return run.state.timestamp if run.state is not None else None


@task(name="tend-waiting-releases", cache_policy=NO_CACHE)  # a pass reads the clock
async def tend_waiting(
    deployment_name: str,
    policies: dict[str, WaitingPolicy],
    *,
    ui_authenticated: bool = False,
    now: datetime | None = None,
) -> Tended:
    """One pass over the releases that wait: resume each ``Frozen`` one whose freeze is
    over, remind approvers once per ``remind_after`` (recorded, so two passes never send one
    reminder twice), and expire overdue approvals (never a ``Frozen`` run: it was approved)."""
    logger = get_run_logger()
    now = now or datetime.now(UTC)
    done = Tended()
    for run in await paused_release_runs(deployment_name):
        if run.state is None or run.state.timestamp is None:
            continue
        service = str(run.parameters.get("service", ""))
        policy = policies.get(service)
        if policy is None:
            logger.warning("release %s waits for unknown service %r", run.id, service)
            continue
        if run.state.name == FROZEN:
            freeze = active_freeze(policy.freezes, now)
            if freeze is None:
                async with get_client() as client:
                    if await reschedule(client, run.id):
                        done.thawed.append(str(run.id))
            else:
                logger.info("release %s stays frozen: %s", run.id, freeze.describe())
            continue
        async with get_client() as client:
            since = await _waiting_since(client, run)
        waited = now - (since or run.state.timestamp)
        due = reminder_due(now - waited, now, policy.remind_after, 0)
        if due is not None and await record_input_once(
            run.id, f"{REMINDER_PREFIX}{due}", {"at": now.isoformat()}
        ):
            votes = await read_votes(run.id, ui_authenticated=ui_authenticated)
            image = str(run.parameters.get("image", ""))
            tag = image.rsplit("@", 1)[0].rsplit(":", 1)[-1] if ":" in image else image
            text = reminder_text(
                service, tag, policy.approvers, waited, tally(votes, policy.required).progress()
            )
            done.reminders.append((str(run.id), service, text))
        # The timeout counts from the request, not from the latest round (each vote that
        # leaves the quorum short suspends the run again).
        if (since or run.state.timestamp) + policy.timeout <= now and await expire_run(
            run.id, f"no decision within {policy.timeout}"
        ):
            done.expired.append(str(run.id))
    return done


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
