"""``robotics-cd approve | reject | abort | promote | status | rollback``: the operator's
commands for releases, all through the Prefect API (the same paths as the UI)."""

from __future__ import annotations

import asyncio
import getpass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import typer
from prefect import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments.flow_runs import arun_deployment

from core.approval import OperatorAction, check_operator
from core.catalog import Service, load_catalog
from core.errors import RoboticsCDError
from core.settings import get_settings
from tasks.approvals import resume_with_decision, send_command
from tasks.report import flow_run_url


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(message, fg="red", err=True)
    return typer.Exit(code)


def _run_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise _fail(f"{text!r} is not a flow run id (a UUID, shown in the Prefect UI)") from None


async def _read_release(run_id: UUID) -> FlowRun:
    async with get_client() as client:
        run = await client.read_flow_run(run_id)
    if "service" not in run.parameters:
        raise _fail(f"flow run {run_id} is not a release run")
    return run


def _decide(run_id: str, decision: str, approver: str, comment: str) -> None:
    rid = _run_id(run_id)

    async def go() -> None:
        run = await _read_release(rid)
        if run.state is None or not run.state.is_paused():
            state = run.state.name if run.state else "unknown"
            raise _fail(f"release {rid} is not waiting for approval (state: {state})")
        service = str(run.parameters["service"])
        allowed = load_catalog(get_settings().catalog).service(service).approvers
        await resume_with_decision(rid, decision, approver, comment, allowed=allowed)

    try:
        asyncio.run(go())
    except RoboticsCDError as exc:
        raise _fail(str(exc)) from None
    done = {"approve": "approved", "reject": "rejected"}[decision]
    typer.echo(f"{done} release {rid}: {flow_run_url(rid)}")


async def _runs_of(service: str | None, states: list[StateType]) -> list[FlowRun]:
    """Release runs in these states, of one service (None: of every service)."""
    name = get_settings().release_deployment.split("/")[-1]
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states))
            ),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])),
        )
    return [r for r in runs if service is None or r.parameters.get("service") == service]


OPERATOR_HELP = (
    "Who gives this command: a name on the service's approver allowlist (recorded; "
    "not authentication, see docs/operations.md). Default: $ROBOTICS_CD_OPERATOR."
)


def operator_option() -> Any:
    return typer.Option(None, "--operator", envvar="ROBOTICS_CD_OPERATOR", help=OPERATOR_HELP)


def check_operator_of(service: str, operator: str | None, reason: str | None) -> OperatorAction:
    """The name and reason of a command that skips the analysis, refused (exit 2) before any
    side effect when the name is not on the service's allowlist or the reason is missing."""
    try:
        allowed = load_catalog(get_settings().catalog).service(service).approvers
        return check_operator(operator, reason, allowed)
    except RoboticsCDError as exc:
        raise _fail(str(exc)) from None


async def _reconciler_line() -> str:
    """When the scheduled reconciler last finished, against its period."""
    from tasks.lifecycle import last_run_of

    period = get_settings().reconcile_period
    try:
        last = await last_run_of("reconcile/reconcile")
    except Exception as exc:  # status must still print the rest
        return f"reconciler: unknown ({exc})"
    if last is None or last.end_time is None:
        return "reconciler: has not run yet (is `robotics-cd serve` or a worker running?)"
    ago = datetime.now(UTC) - last.end_time
    late = "  LATE: more than three periods" if ago > 3 * period else ""
    return f"reconciler: last ran {int(ago.total_seconds())} s ago (every {period}){late}"


def _status_lines(service: str, svc: Service, runs: list[FlowRun]) -> list[str]:
    """What runs where for one service: each environment's image and lock, its releases."""
    from tasks.gitops import current_image, lease_holder

    now = datetime.now(UTC)
    lines = [f"{service}"]
    for env, target in svc.environments.items():
        image = current_image.fn(service, env)
        lease = lease_holder.fn(service, env)
        lock = "lock free"
        if lease is not None and lease.record.blocked:
            lock = (
                f"BLOCKED: {lease.record.blocked} (`robotics-cd lease clear {service} "
                "--operator NAME --reason ...`)"
            )
        elif lease is not None and not lease.expired(now):
            lock = f"lock held by release {lease.holder} until {lease.expires_at:%H:%M:%S}"
        shown = image.reference if image else "-"
        lines.append(f"  {env:<11} {shown}  ({target.argocd_app}; {lock})")
    mine = [r for r in runs if r.parameters.get("service") == service]
    for run in mine:
        if run.state is not None and run.state.is_paused():
            lines.append(
                f"  awaiting approval: {run.id} {run.parameters.get('image')} "
                f"{flow_run_url(run.id)}"
            )
    for run in mine:
        if run.state is None or not run.state.is_paused():
            message = run.state.message if run.state and run.state.message else ""
            lines.append(
                f"  {run.state.name if run.state else '?':<10} {run.id} "
                f"{run.parameters.get('image')} {message}"
            )
    if not mine:
        lines.append("  no release in progress")
    return lines


def register(app: typer.Typer) -> None:
    @app.command("approve")
    def approve(
        run_id: str = typer.Argument(..., help="The suspended release's flow run id."),
        approver: str = typer.Option(..., help="Who approves (from the service's approvers)."),
        comment: str = typer.Option("", help="Kept in the release record."),
    ) -> None:
        """Approve a release waiting in staging: its production canary starts."""
        _decide(run_id, "approve", approver, comment)

    @app.command("reject")
    def reject(
        run_id: str = typer.Argument(..., help="The suspended release's flow run id."),
        approver: str = typer.Option(..., help="Who rejects (from the service's approvers)."),
        comment: str = typer.Option("", help="Why; kept in the release record."),
    ) -> None:
        """Reject a release waiting in staging: it ends, production untouched."""
        _decide(run_id, "reject", approver, comment)

    @app.command("abort")
    def abort(
        run_id: str = typer.Argument(..., help="The release's flow run id."),
        operator: str | None = operator_option(),
        reason: str | None = typer.Option(None, help="Why (required, recorded in the release)."),
    ) -> None:
        """Roll a release back now (during its canary or watch), skipping the analysis."""
        rid = _run_id(run_id)
        run = asyncio.run(_read_release(rid))
        action = check_operator_of(str(run.parameters["service"]), operator, reason)
        if run.state and run.state.is_paused():
            raise _fail(
                "this release waits for approval and production is untouched: "
                f"reject it instead (robotics-cd reject {rid} --approver ...)"
            )
        if run.state and run.state.is_final():
            raise _fail(f"release {rid} already ended ({run.state.name})")
        asyncio.run(send_command(rid, "abort", action.reason, action.operator, _os_user()))
        typer.echo(
            f"abort by {action.operator} sent to {rid}; it rolls back at its next check: "
            f"{flow_run_url(rid)}"
        )

    @app.command("promote")
    def promote(
        run_id: str = typer.Argument(..., help="The release's flow run id."),
        now: bool = typer.Option(False, "--now", help="Skip the remaining canary steps."),
        operator: str | None = operator_option(),
        reason: str | None = typer.Option(
            None, help="Why the remaining steps are skipped (required, recorded)."
        ),
    ) -> None:
        """Promote a canary now, skipping its remaining steps (name and reason recorded)."""
        if not now:
            raise _fail("promote needs --now (it skips the remaining canary steps)")
        rid = _run_id(run_id)
        run = asyncio.run(_read_release(rid))
        action = check_operator_of(str(run.parameters["service"]), operator, reason)
        if run.state is None or not run.state.is_running():
            raise _fail(
                f"release {rid} is not in its canary (state: "
                f"{run.state.name if run.state else 'unknown'})"
            )
        asyncio.run(send_command(rid, "promote", action.reason, action.operator, _os_user()))
        typer.echo(f"promote by {action.operator} sent to {rid}: {flow_run_url(rid)}")

    @app.command("status")
    def status(
        service: str | None = typer.Argument(
            None, help="Service name from the catalog (default: every service)."
        ),
    ) -> None:
        """What runs where, and which release waits for whom (every service by default)."""
        catalog = load_catalog(get_settings().catalog)
        try:
            names = sorted(catalog.services)
            if service:
                catalog.service(service)
                names = [service]
        except RoboticsCDError as exc:
            raise _fail(str(exc)) from None
        runs = asyncio.run(
            _runs_of(
                service,
                [StateType.PAUSED, StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED],
            )
        )
        for name in names:
            for line in _status_lines(name, catalog.services[name], runs):
                typer.echo(line)
        typer.echo(asyncio.run(_reconciler_line()))

    @app.command("rollback")
    def rollback(
        service: str = typer.Argument(..., help="Service name from the catalog."),
        env: str = typer.Option("production", help="Environment to roll back."),
        image: str | None = typer.Option(
            None, help="Image to return to (default: the previously deployed one)."
        ),
        operator: str | None = operator_option(),
        reason: str | None = typer.Option(None, help="Why (required, recorded in the commit)."),
    ) -> None:
        """Roll a service back to its previous image by the GitOps path (a rollback run)."""
        action = check_operator_of(service, operator, reason)
        params: dict[str, Any] = {
            "service": service,
            "environment": env,
            "reason": f"manual rollback by {action.describe()}",
        }
        if image:
            params["image"] = image
        run = asyncio.run(
            arun_deployment(
                get_settings().rollback_deployment,
                parameters=params,
                timeout=0,
                as_subflow=False,
                tags=["manual", f"operator:{action.operator}"],
            )
        )
        typer.echo(f"rollback by {action.operator} started: {flow_run_url(run.id)}")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "?"
