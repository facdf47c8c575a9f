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

from core.catalog import load_catalog
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
    typer.echo(f"{decision}d release {rid}: {flow_run_url(rid)}")


async def _runs_of(service: str, states: list[StateType]) -> list[FlowRun]:
    name = get_settings().release_deployment.split("/")[-1]
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states))
            ),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])),
        )
    return [r for r in runs if r.parameters.get("service") == service]


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
        reason: str = typer.Option("aborted by operator", help="Recorded in the release."),
    ) -> None:
        """Roll a release back now (during its canary or watch)."""
        rid = _run_id(run_id)
        sender = getpass.getuser()
        run = asyncio.run(_read_release(rid))
        if run.state and run.state.is_paused():
            raise _fail(
                "this release waits for approval and production is untouched: "
                f"reject it instead (robotics-cd reject {rid} --approver ...)"
            )
        if run.state and run.state.is_final():
            raise _fail(f"release {rid} already ended ({run.state.name})")
        asyncio.run(send_command(rid, "abort", reason, sender))
        typer.echo(f"abort sent to {rid}; it rolls back at its next check: {flow_run_url(rid)}")

    @app.command("promote")
    def promote(
        run_id: str = typer.Argument(..., help="The release's flow run id."),
        now: bool = typer.Option(False, "--now", help="Skip the remaining canary steps."),
        reason: str = typer.Option(..., help="Why the remaining steps are skipped (recorded)."),
    ) -> None:
        """Promote a canary now, skipping its remaining steps (the reason is recorded)."""
        if not now:
            raise _fail("promote needs --now (it skips the remaining canary steps)")
        rid = _run_id(run_id)
        run = asyncio.run(_read_release(rid))
        if run.state is None or not run.state.is_running():
            raise _fail(
                f"release {rid} is not in its canary (state: "
                f"{run.state.name if run.state else 'unknown'})"
            )
        asyncio.run(send_command(rid, "promote", reason, getpass.getuser()))
        typer.echo(f"promote sent to {rid}: {flow_run_url(rid)}")

    @app.command("status")
    def status(service: str = typer.Argument(..., help="Service name from the catalog.")) -> None:
        """What runs where, and which release waits for whom."""
        from tasks.gitops import current_image, lease_holder

        catalog = load_catalog(get_settings().catalog)
        try:
            svc = catalog.service(service)
        except RoboticsCDError as exc:
            raise _fail(str(exc)) from None
        now = datetime.now(UTC)
        for env, target in svc.environments.items():
            image = current_image.fn(service, env)
            lease = lease_holder.fn(service, env)
            lock = "lock free"
            if lease is not None and not lease.expired(now):
                lock = f"lock held by release {lease.holder} until {lease.expires_at:%H:%M:%S}"
            shown = image.reference if image else "-"
            typer.echo(f"{env:<11} {shown}  ({target.argocd_app}; {lock})")
        waiting = asyncio.run(_runs_of(service, [StateType.PAUSED]))
        running = asyncio.run(
            _runs_of(service, [StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED])
        )
        for run in waiting:
            typer.echo(
                f"awaiting approval: {run.id} {run.parameters.get('image')} {flow_run_url(run.id)}"
            )
        for run in running:
            message = run.state.message if run.state and run.state.message else ""
            typer.echo(
                f"{run.state.name if run.state else '?':<10} {run.id} "
                f"{run.parameters.get('image')} {message}"
            )
        if not waiting and not running:
            typer.echo("no release in progress")

    @app.command("rollback")
    def rollback(
        service: str = typer.Argument(..., help="Service name from the catalog."),
        env: str = typer.Option("production", help="Environment to roll back."),
        image: str | None = typer.Option(
            None, help="Image to return to (default: the previously deployed one)."
        ),
        reason: str = typer.Option("manual rollback", help="Recorded in the commit."),
    ) -> None:
        """Roll a service back to its previous image by the GitOps path (a rollback run)."""
        load_catalog(get_settings().catalog).service(service)
        params: dict[str, Any] = {"service": service, "environment": env, "reason": reason}
        if image:
            params["image"] = image
        run = asyncio.run(
            arun_deployment(
                get_settings().rollback_deployment, parameters=params, timeout=0, as_subflow=False
            )
        )
        typer.echo(f"rollback started: {flow_run_url(run.id)}")
