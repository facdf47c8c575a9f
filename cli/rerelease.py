"""``robotics-cd release SERVICE --image ... --operator NAME --reason TEXT``: the operator's
deliberate release of an image, even of a commit that was released before.

A commit's release is otherwise started once, by CI's hand-off (one per service and commit:
a replayed webhook or a new CI run reuses it). This command is the way to release it again
on purpose; it names who and why, like every command that skips the normal path.
"""

from __future__ import annotations

import asyncio
import getpass

import typer

from cli.release import check_operator_of, operator_option
from core.errors import RoboticsCDError


def register(app: typer.Typer) -> None:
    @app.command("release")
    def release(
        service: str = typer.Argument(..., help="Service name from the catalog."),
        image: str = typer.Option(
            ...,
            "--image",
            help="registry/repository:tag (optionally @digest), in the registry already.",
        ),
        operator: str | None = operator_option(),
        reason: str | None = typer.Option(None, help="Why (required, recorded with the run)."),
        sha: str | None = typer.Option(
            None, "--sha", help="Source commit (default: the image's revision label)."
        ),
    ) -> None:
        """Release an image on purpose (a new release run, even if its commit had one)."""
        from tasks.handoff import start_manual_release

        action = check_operator_of(service, operator, reason)
        try:
            started = asyncio.run(
                start_manual_release(
                    service=service,
                    image=image,
                    operator=action.operator,
                    reason=action.reason,
                    source_sha=sha,
                    os_user=_os_user(),
                )
            )
        except RoboticsCDError as exc:
            typer.secho(str(exc), fg="red", err=True)
            raise typer.Exit(2) from None
        if started.earlier:
            typer.echo(
                f"commit {started.source_sha[:12]} was released before: "
                f"{', '.join(started.earlier)}"
            )
        typer.echo(
            f"release of {started.image} by {action.operator} started: "
            f"{started.flow_run_url or started.flow_run_id}"
        )


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "?"
