"""``robotics-cd sandbox up | status | down``: the local platform the demo and tests run on."""

from __future__ import annotations

from pathlib import Path

import typer

from sandbox import launcher, prefect_server

STATE_HELP = "State dir of the sandbox (default: .sandbox/ in the repo root)."


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="The local platform: Prefect, Docker, registry, Prometheus, and twins of "
        "Kubernetes, Argo CD and GitHub, all on 127.0.0.1.",
        no_args_is_help=True,
    )

    @group.command("up")
    def up(
        state: Path = typer.Option(launcher.DEFAULT_STATE, "--state", help=STATE_HELP),
        prefect_api_url: str | None = typer.Option(
            None,
            "--prefect-api-url",
            help="Use this running Prefect server instead of starting one.",
        ),
        webhook_url: str | None = typer.Option(
            None,
            "--webhook-url",
            help="Where the GitHub twin sends push webhooks (default: "
            "http://127.0.0.1:$ROBOTICS_CD_WEBHOOK_PORT/github; '' for nowhere).",
        ),
        argocd_poll: float = typer.Option(
            3.0, "--argocd-poll", help="Seconds between Argo CD's polls of the manifests repo."
        ),
        wait: bool = typer.Option(
            True,
            "--wait/--no-wait",
            help="Wait until the Argo CD applications are Synced and Healthy.",
        ),
        db: str = typer.Option(
            "sqlite",
            "--db",
            help="The Prefect server's database: sqlite (embedded, the demo's) or postgres "
            "(Debian's PostgreSQL, a cluster in the state dir).",
        ),
        messaging: str = typer.Option(
            "",
            "--messaging",
            help="Prefect's event broker: memory or redis (Debian's redis-server, "
            "prefect-redis). Default: redis with --db postgres, else memory. postgres + redis "
            "run two API servers (one --no-services) behind one balanced address.",
        ),
    ) -> None:
        """Start the sandbox (idempotent: what runs already is reused)."""
        messaging = messaging or ("redis" if db == "postgres" else "memory")
        if db not in prefect_server.DBS or messaging not in prefect_server.MESSAGING:
            typer.secho(
                f"--db is one of {', '.join(prefect_server.DBS)}; --messaging one of "
                f"{', '.join(prefect_server.MESSAGING)}",
                fg="red",
                err=True,
            )
            raise typer.Exit(2)
        try:
            sb = launcher.up(
                state,
                prefect_api_url=prefect_api_url,
                webhook_url=webhook_url,
                argocd_poll_seconds=argocd_poll,
                wait_healthy=wait,
                echo=typer.echo,
                prefect_db=db,
                prefect_messaging=messaging,
            )
        except (launcher.SandboxError, TimeoutError) as exc:
            typer.secho(f"sandbox up failed: {exc}", fg="red", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"\nsandbox up in {sb.timings.get('total', 0):.1f}s:\n")
        typer.echo(launcher.table(sb))
        typer.secho(f"\nPrefect UI: {sb.prefect_ui_url}", fg="green")

    @group.command("status")
    def status(
        state: Path = typer.Option(launcher.DEFAULT_STATE, "--state", help=STATE_HELP),
    ) -> None:
        """Health of every part; exit code 1 when any part is down."""
        try:
            parts = launcher.status(state)
        except launcher.SandboxError as exc:
            typer.secho(str(exc), fg="red", err=True)
            raise typer.Exit(1) from None
        width = max(len(p.part) for p in parts)
        for part in parts:
            mark = typer.style("ok  ", fg="green") if part.ok else typer.style("DOWN", fg="red")
            typer.echo(f"  {mark}  {part.part:<{width}}  {part.detail}")
        if not all(p.ok for p in parts):
            raise typer.Exit(1)

    @group.command("down")
    def down(
        state: Path = typer.Option(launcher.DEFAULT_STATE, "--state", help=STATE_HELP),
        purge: bool = typer.Option(False, "--purge", help="Also delete the state dir."),
    ) -> None:
        """Stop everything `up` started and remove the sandbox's containers."""
        stopped = launcher.down(state, purge=purge)
        for item in stopped:
            typer.echo(f"  stopped {item}")
        if not stopped:
            typer.echo("  nothing was running")

    app.add_typer(group, name="sandbox")
