"""``robotics-cd reconcile`` and ``robotics-cd lease clear``: recovery by an operator.

``reconcile`` runs one pass of the reconciler here and now; it needs git and Argo CD, not
the Prefect API (it judges by leases alone while Prefect does not answer). ``lease clear``
unblocks a production lease an unverified restore left blocked (recording who and why), then
reconciles it: production is restored from the lease's record.
"""

from __future__ import annotations

import anyio
import typer

from core.catalog import load_catalog
from core.errors import RoboticsCDError
from core.settings import get_settings


def register(app: typer.Typer) -> None:
    @app.command("reconcile")
    def reconcile_cmd() -> None:
        """Restore production wherever a release died or stopped renewing its lease (one pass)."""
        from flows.reconcile import reconcile_once

        results = anyio.run(reconcile_once)
        if not results:
            typer.echo("reconcile: no production lease is held and no release run is dead")
        for done in results:
            commit = f", commit {done.commit[:12]}" if done.commit else ""
            typer.echo(f"{done.service}: {done.action.value} ({done.reason}){commit}")

    lease = typer.Typer(help="The release locks (leases) in the manifests repo.")
    app.add_typer(lease, name="lease")

    @lease.command("clear")
    def clear(
        service: str = typer.Argument(..., help="Service name from the catalog."),
        operator: str = typer.Option(..., help="Who clears it (an approver of the service)."),
        reason: str = typer.Option(..., help="Why: recorded in git with the cleared lease."),
        env: str = typer.Option("production", help="Environment of the lease."),
    ) -> None:
        """Unblock a lease after fixing what blocked it; the reconciler then restores
        production from the lease's record (run here at once)."""
        from tasks.gitops import clear_lease

        catalog = load_catalog(get_settings().catalog)
        try:
            svc = catalog.service(service)
            if operator not in svc.approvers:
                raise RoboticsCDError(
                    f"{operator!r} is not an approver of {service} ({', '.join(svc.approvers)})"
                )
            if env not in ("staging", "production"):
                raise RoboticsCDError(f"unknown environment {env!r}")
            cleared = clear_lease(
                service,
                "production" if env == "production" else "staging",
                operator,
                reason,
                repo_url=catalog.defaults.manifests_repo,
                branch=catalog.defaults.manifests_branch,
            )
        except RoboticsCDError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        if cleared is None:
            typer.echo(f"{service} {env}: no lease held; nothing to clear")
            return
        typer.echo(
            f"{service} {env}: lease of {cleared.holder} cleared by {operator} "
            f"(was blocked: {cleared.record.blocked or 'no'}); reason kept under "
            "refs/leases-cleared/"
        )
        if env == "production":
            from flows.reconcile import reconcile_once

            for done in anyio.run(reconcile_once):
                if done.service == service:
                    commit = f", commit {done.commit[:12]}" if done.commit else ""
                    typer.echo(f"reconcile: {done.action.value} ({done.reason}){commit}")
