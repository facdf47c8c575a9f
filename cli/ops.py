"""``robotics-cd deploy | serve | webhook serve``: how runs start.

- ``serve``: every flow as a deployment served by this process (Prefect's runner, no work
  pool, no worker): the embedded default, the demo and the tests.
- ``deploy``: the same deployments registered against a work pool (process by default,
  ``--pool-type kubernetes`` for Jobs through prefect-kubernetes), plus the two automations
  (zombie runs → Crashed; crashed or cancelled release → rollback). Re-running it changes
  only what differs: an unchanged automation is left alone (updating one drops its trigger
  state). It creates no concurrency limit: the production lease is the release lock (see
  docs/triggers.md), and the ``release-<service>-<env>`` limits of earlier versions, never
  used, are removed.
- ``webhook serve``: the GitHub webhook receiver.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import anyio
import typer

from core.catalog import load_catalog
from core.errors import CatalogError, InvalidInput, RoboticsCDError
from core.settings import get_settings
from deployments import register as reg

log = logging.getLogger("robotics_cd.ops")


@dataclass
class DeployReport:
    pool: str
    deployments: dict[str, str] = field(default_factory=dict)  # full name → id
    limits_removed: list[str] = field(default_factory=list)
    automations: dict[str, str] = field(default_factory=dict)
    changes: dict[str, reg.Change] = field(default_factory=dict)  # name → created/updated/...
    skipped: list[str] = field(default_factory=list)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(message, fg="red", err=True)
    return typer.Exit(code)


async def deploy_all(
    *,
    pool_type: reg.PoolType = "process",
    pool_name: str | None = None,
    kube: reg.KubernetesPoolOptions | None = None,
    only: set[str] | None = None,
    name_suffix: str = "",
) -> DeployReport:
    """Register every present flow against a work pool, with limits and automations.

    ``name_suffix`` deploys a side-by-side copy (``ci/ci-test``): the automations then watch
    that copy's release deployment."""
    from prefect import get_client

    catalog = load_catalog(get_settings().catalog)
    pool = pool_name or reg.DEFAULT_POOL[pool_type]
    template = (
        reg.kubernetes_base_job_template(kube or reg.KubernetesPoolOptions())
        if pool_type == "kubernetes"
        else reg.process_base_job_template()
    )
    report = DeployReport(pool=pool)
    async with get_client() as client:
        await reg.ensure_work_pool(client, pool, pool_type, template)
        deployments = reg.runner_deployments(
            only=only, work_pool_name=pool, name_suffix=name_suffix
        )
        present = {d.flow_name for d in deployments}
        report.skipped = [
            s.full_name
            for s in reg.SPECS
            if s.flow_name not in present and (only is None or s.flow_name in only)
        ]
        for deployment in deployments:
            name = f"{deployment.flow_name}/{deployment.name}"
            deployment_id, change = await reg.apply_deployment(client, deployment, pool)
            report.deployments[name] = str(deployment_id)
            report.changes[name] = change
        report.limits_removed = await reg.remove_unused_concurrency_limits(catalog, client)
        report.automations = await _ensure_automations(
            client, report.deployments, name_suffix, report.changes
        )
    return report


async def _ensure_automations(
    client: Any,
    deployed: dict[str, str],
    name_suffix: str = "",
    changes: dict[str, reg.Change] | None = None,
) -> dict[str, str]:
    from uuid import UUID

    settings = get_settings()
    changes = changes if changes is not None else {}
    zombie = reg.ZOMBIE_AUTOMATION + name_suffix
    rollback_name = reg.ROLLBACK_AUTOMATION + name_suffix
    zombie_id, changes[zombie] = await reg.upsert_automation(client, reg.zombie_automation(zombie))
    made = {zombie: str(zombie_id)}
    reconcile = deployed.get(reg.RECONCILE_DEPLOYMENT + name_suffix)
    if reconcile:
        late = reg.RECONCILER_LATE_AUTOMATION + name_suffix
        automation = reg.reconciler_late_automation(
            UUID(reconcile), settings.reconcile_period, name=late
        )
        late_id, changes[late] = await reg.upsert_automation(client, automation)
        made[late] = str(late_id)
    release = deployed.get(settings.release_deployment + name_suffix)
    rollback = deployed.get(settings.rollback_deployment + name_suffix)
    if not (release and rollback):
        log.warning("release or rollback deployment missing: %r not created", rollback_name)
        return made
    # Pass only the parameters the rollback flow accepts, read from its deployment's schema.
    rollback_deployment = await client.read_deployment(UUID(rollback))
    accepted = set((rollback_deployment.parameter_openapi_schema or {}).get("properties", {}))
    automation = reg.rollback_automation(
        UUID(release), UUID(rollback), accepted, name=rollback_name
    )
    rollback_id, changes[rollback_name] = await reg.upsert_automation(client, automation)
    made[rollback_name] = str(rollback_id)
    return made


def serve_all(*, only: set[str] | None = None, limit: int | None = None) -> None:
    """Serve every present flow from this process until interrupted (no worker needed)."""
    from prefect import serve

    deployments = reg.runner_deployments(only=only)
    if not deployments:
        raise RoboticsCDError("no flow module is present: nothing to serve")
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
    # The zombie automation expects a heartbeat every 30 s; Prefect's default is 180 s, so
    # without this every served run longer than the automation's window is marked Crashed.
    # The runner's flow-run processes inherit this environment.
    for key, value in reg.HEARTBEAT_ENV.items():
        os.environ.setdefault(key, value)
    made = anyio.run(_serve_automations, deployments)
    if made:
        typer.echo(f"automations: {', '.join(sorted(made))}")
    typer.echo(f"serving {len(deployments)} deployments: {names}")
    # A runner that starts may be the one that died: recover what it left before serving.
    threading.Thread(target=_reconcile_at_start, name="reconcile-at-start", daemon=True).start()
    serve(*deployments, limit=limit, print_starting_message=False)


def _reconcile_at_start() -> None:
    from flows.reconcile import reconcile_once

    try:
        for done in anyio.run(reconcile_once):
            typer.echo(f"reconcile: {done.service}: {done.action.value} ({done.reason})")
    except Exception as exc:  # the scheduled reconciler runs again within its period
        typer.echo(f"reconcile at start failed (the scheduled one will retry): {exc}", err=True)


async def _serve_automations(deployments: list[Any]) -> dict[str, str]:
    """A served embedded default gets the same safety net as ``deploy``: silent runs are
    marked Crashed and a crashed or cancelled release is rolled back without a human.

    Deployments are registered here only where they differ (the automations need their
    ids); unchanged automations are left alone, so a restarted ``serve`` keeps their
    trigger state. (Prefect's ``serve`` itself then re-applies its deployments, which does
    not touch automations.)"""
    from prefect import get_client

    names = {f"{d.flow_name}/{d.name}" for d in deployments}
    settings = get_settings()
    if not {settings.release_deployment, settings.rollback_deployment} <= names:
        return {}
    async with get_client() as client:
        applied = {
            f"{d.flow_name}/{d.name}": str((await reg.apply_deployment(client, d))[0])
            for d in deployments
        }
        return await _ensure_automations(client, applied)


def parse_job_env(pairs: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` pairs of ``--job-env`` into a dict; a pair without ``=`` is refused."""
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise InvalidInput(f"--job-env takes NAME=VALUE, not {pair!r}")
        env[name.strip()] = value
    return env


def register(app: typer.Typer) -> None:
    @app.command("deploy")
    def deploy(
        pool_type: str = typer.Option(
            "process", "--pool-type", help="Work pool type: process or kubernetes."
        ),
        pool: str | None = typer.Option(None, "--pool", help="Work pool name."),
        image: str = typer.Option(
            reg.KubernetesPoolOptions.image,
            "--image",
            help="Kubernetes variant: image of this project the flow-run Jobs run.",
        ),
        namespace: str = typer.Option(
            reg.KubernetesPoolOptions.namespace, "--namespace", help="Kubernetes namespace."
        ),
        service_account: str = typer.Option(
            reg.KubernetesPoolOptions.service_account,
            "--service-account",
            help="Kubernetes service account of the flow-run Jobs.",
        ),
        host_network: bool = typer.Option(
            False,
            "--host-network",
            help="Kubernetes variant: run flow-run pods on their node's network, so they "
            "reach services on its 127.0.0.1 (the sandbox).",
        ),
        job_env: list[str] = typer.Option(
            [],
            "--job-env",
            help="Kubernetes variant: NAME=VALUE (repeatable) of a non-secret setting every "
            "flow-run Job gets, e.g. ROBOTICS_CD_ARGOCD_URL=...; credentials are refused.",
        ),
        results_claim: str | None = typer.Option(
            None,
            "--results-claim",
            help="Kubernetes variant: PersistentVolumeClaim every flow-run Job mounts as "
            "Prefect's result storage (ReadWriteMany), so a release resumed in a new Job "
            "finds what its first Job persisted.",
        ),
        only: list[str] = typer.Option(
            [], "--only", help="Deploy only these flows (repeatable), e.g. --only ci."
        ),
    ) -> None:
        """Register every flow as a deployment on a work pool, with the automations; only
        what differs changes. Start a worker for the pool afterwards (`prefect worker start
        --pool`; for a Kubernetes pool with
        PREFECT_INTEGRATIONS_KUBERNETES_WORKER_STORE_ENV_AS_SECRET=true)."""
        if pool_type not in ("process", "kubernetes"):
            raise _fail(f"--pool-type must be process or kubernetes, not {pool_type!r}")
        try:
            kube = reg.KubernetesPoolOptions(
                namespace=namespace,
                service_account=service_account,
                image=image,
                host_network=host_network,
                env=parse_job_env(job_env),
                results_claim=results_claim,
            )
            if pool_type == "kubernetes":
                reg.kubernetes_base_job_template(kube)  # refuse credentials before any call
        except RoboticsCDError as exc:
            raise _fail(str(exc)) from None
        try:
            report = asyncio.run(
                deploy_all(
                    pool_type=pool_type,  # type: ignore[arg-type]
                    pool_name=pool,
                    kube=kube,
                    only=set(only) or None,
                )
            )
        except (CatalogError, RoboticsCDError) as exc:
            raise _fail(str(exc)) from None
        typer.echo(f"work pool {report.pool} ({pool_type})")
        for name, deployment_id in report.deployments.items():
            typer.echo(f"deployment {name:<34} {deployment_id} ({report.changes[name]})")
        for name in report.skipped:
            typer.secho(f"skipped    {name} (flow module not present)", fg="yellow")
        for name in report.limits_removed:
            typer.echo(f"concurrency limit {name} removed (unused: the lease is the lock)")
        for name, automation_id in report.automations.items():
            typer.echo(f"automation {name!r} {automation_id} ({report.changes[name]})")

    @app.command("serve")
    def serve_cmd(
        only: list[str] = typer.Option(
            [], "--only", help="Serve only these flows (repeatable), e.g. --only ci."
        ),
        limit: int | None = typer.Option(
            None, "--limit", help="At most this many concurrent flow runs."
        ),
    ) -> None:
        """Serve every flow as a deployment from this process (no work pool, no worker)."""
        try:
            serve_all(only=set(only) or None, limit=limit)
        except RoboticsCDError as exc:
            raise _fail(str(exc)) from None

    webhook_app = typer.Typer(help="The GitHub webhook receiver.", no_args_is_help=True)

    @webhook_app.command("serve")
    def webhook_serve(
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
        port: int = typer.Option(8787, "--port", help="Port to listen on."),
        max_body: int = typer.Option(
            2 * 1024 * 1024, "--max-body", help="Largest delivery body accepted, in bytes."
        ),
    ) -> None:
        """Receive GitHub webhooks (POST /github) and start the matching deployments."""
        from deployments.webhook import serve

        try:
            serve(host, port, max_body=max_body)
        except RoboticsCDError as exc:
            raise _fail(str(exc)) from None

    app.add_typer(webhook_app, name="webhook")
