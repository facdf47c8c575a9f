"""``robotics-cd quarantine list | lift``: image digests a rollback took out of production."""

from __future__ import annotations

import getpass

import typer

from core.errors import RoboticsCDError
from tasks.quarantine import quarantine_repo


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(message, fg="red", err=True)
    return typer.Exit(code)


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Image digests quarantined by rollbacks (quarantine/<service>.yaml in the "
        "manifests repo): a release of one is refused before staging until it is lifted.",
        no_args_is_help=True,
    )
    app.add_typer(group, name="quarantine")

    @group.command("list")
    def list_(
        service: str | None = typer.Argument(None, help="One service (default: every one)."),
    ) -> None:
        """The quarantined digests: the rollback commit, when, and why."""
        try:
            repo = quarantine_repo()
            names = [service] if service else repo.services()
            found = 0
            for name in names:
                for entry in repo.read(name).quarantined:
                    found += 1
                    release = f" release {entry.release}" if entry.release else ""
                    typer.echo(
                        f"{name}  {entry.digest}  rollback {entry.rollback_commit[:12]}"
                        f"{release}  {entry.at:%Y-%m-%d %H:%M:%S} UTC  {entry.reason.strip()}"
                    )
        except RoboticsCDError as exc:
            raise _fail(str(exc)) from None
        if not found:
            typer.echo(f"nothing quarantined{' for ' + service if service else ''}")

    @group.command("lift")
    def lift(
        service: str = typer.Argument(..., help="The service."),
        digest: str = typer.Argument(..., help="The image digest, sha256:…"),
        reason: str = typer.Option(..., "--reason", help="Why it may be released again."),
        by: str = typer.Option(None, "--by", help="Who lifts it (default: the current user)."),
    ) -> None:
        """Allow the digest again: a commit in the manifests repo recording who and why."""
        who = by or getpass.getuser()
        try:
            sha = quarantine_repo().lift(service, digest, by=who, reason=reason)
        except RoboticsCDError as exc:
            raise _fail(str(exc)) from None
        typer.echo(f"lifted {digest} of {service} (commit {sha[:12]}, by {who}: {reason})")
