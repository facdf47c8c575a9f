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


def approvers_of(parameters: dict[str, Any]) -> list[str] | None:
    """Who may decide a waiting run: a release's service's approvers; a release train's, every
    approver of its services (its one form offers them all: ``core.train.plan_train``). None
    for a train started from a bundle file (its services are in git, not in the parameters):
    the server still refuses a name its form does not offer."""
    catalog = load_catalog(get_settings().catalog)
    if "service" in parameters:
        return catalog.service(str(parameters["service"])).approvers
    services = parameters.get("services")
    if isinstance(services, dict) and services:
        allowed: list[str] = []
        for name in services:
            allowed += [a for a in catalog.service(str(name)).approvers if a not in allowed]
        return allowed
    if parameters.get("bundle_file"):
        return None
    raise _fail("this flow run is neither a release nor a release train")


def _decide(run_id: str, decision: str, approver: str, comment: str) -> None:
    rid = _run_id(run_id)
    what = "release"

    async def go() -> None:
        nonlocal what
        async with get_client() as client:
            run = await client.read_flow_run(rid)
        if "service" not in run.parameters:
            what = "release train"
        allowed = approvers_of(run.parameters)
        if run.state is None or not run.state.is_paused():
            state = run.state.name if run.state else "unknown"
            raise _fail(f"{what} {rid} is not waiting for approval (state: {state})")
        await resume_with_decision(rid, decision, approver, comment, allowed=allowed)

    try:
        asyncio.run(go())
    except RoboticsCDError as exc:
        raise _fail(str(exc)) from None
    done = {"approve": "approved", "reject": "rejected"}[decision]
    typer.echo(f"{done} {what} {rid}: {flow_run_url(rid)}")


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
    from core.release import describe_holder
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
            lock = f"lock held by {describe_holder(lease.record)} until {lease.expires_at:%H:%M:%S}"
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
        approver: str = typer.Option(
            ..., help="Who approves (from the service's approvers; a train's: any service's)."
        ),
        comment: str = typer.Option("", help="Kept in the release record."),
    ) -> None:
        """Approve a release (or a release train) waiting in staging: its canary starts."""
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
        service = str(run.parameters["service"])
        dead = _dead_holder(service, str(rid))
        if dead is not None:
            _restore_dead_release(service, str(rid), dead, action.describe(), action.reason)
            return
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
        """Undo the release holding production; with none in progress, roll the stable
        track back to the previous pinned image (a rollback run, by the GitOps path)."""
        action = check_operator_of(service, operator, reason)
        params: dict[str, Any] = {
            "service": service,
            "environment": env,
            "reason": f"manual rollback by {action.describe()}",
        }
        typer.echo(_rollback_preview(service, env, image, params))
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


def _dead_holder(service: str, run_id: str) -> str | None:
    """Why the release ``run_id`` holding production is dead (its process gone on this host,
    or its lease not renewed), or None when it does not hold it or may be alive."""
    from flows.reconcile import process_alive
    from tasks.gitops import lease_holder

    lease = lease_holder.fn(service, "production")
    if lease is None or lease.holder != run_id or lease.record.blocked:
        return None
    if process_alive(lease.record.host, lease.record.pid) is False:
        return f"its process {lease.record.pid} on {lease.record.host} is gone"
    if lease.expired(datetime.now(UTC)):
        return f"its lease expired at {lease.expires_at:%H:%M:%S} UTC without renewal"
    return None


def _restore_dead_release(service: str, run_id: str, why: str, who: str, reason: str) -> None:
    """``abort`` of a release whose process is gone: nobody would read the command, so the
    CLI takes the lease over and restores production itself, saying what first."""
    from flows.reconcile import commits_to_undo, reconciler_id, restore_release
    from tasks.lifecycle import mark_crashed

    catalog = load_catalog(get_settings().catalog)
    svc = catalog.service(service)
    undo = commits_to_undo(service, svc, catalog, run_id)
    typer.echo(f"release {run_id} is dead ({why}): restoring production here.")
    typer.echo(
        f"will revert {len(undo)} commit(s) of it in {svc.environments['production'].path}: "
        + (", ".join(c[:12] for c in undo) or "none")
    )
    try:
        commit = asyncio.run(
            restore_release(
                service,
                svc,
                catalog,
                run_id,
                me=reconciler_id(),
                reason=f"aborted by {who}: {reason}",
            )
        )
    except RoboticsCDError as exc:
        raise _fail(f"restore failed: {exc}") from None
    asyncio.run(mark_crashed(run_id, f"aborted by {who} after its process died: {reason}"))
    done = f"commit {commit[:12]}" if commit else "nothing left to revert"
    typer.echo(f"production of {service} restored ({done}); lease free; run marked Crashed")


def _rollback_preview(service: str, env: str, image: str | None, params: dict[str, Any]) -> str:
    """Say what ``rollback`` will change before it starts, and pick its mode: undo the
    release holding production, or move stable to a pinned image."""
    from core.images import parse_reference
    from tasks.gitops import current_image, lease_holder, previous_image

    if env == "production" and not image:
        lease = lease_holder.fn(service, "production")
        if lease is not None and lease.commits and not lease.record.blocked:
            params["release_run_id"] = lease.record.owner
            return (
                f"release {lease.record.owner} holds production: will revert its "
                f"{len(lease.commits)} commit(s) ({', '.join(c[:12] for c in lease.commits)})"
            )
    running = current_image.fn(service, env)  # type: ignore[arg-type]
    wanted = image
    if wanted is None:
        wanted = previous_image.fn(service, env)  # type: ignore[arg-type]
        if wanted is None:
            raise _fail(f"no earlier {service} image in {env}'s history: pass --image")
    ref = parse_reference(wanted)
    if not ref.digest:
        raise _fail(
            f"the previous {service} image in {env} is {wanted}, which is not pinned to a "
            "digest: pass --image name:tag@sha256:..."
        )
    params["image"] = wanted
    shown = running.reference if running else "-"
    return f"will set {service} {env} to {wanted} (now {shown}), canary weight 0"


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "?"
