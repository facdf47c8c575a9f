"""``robotics-cd dora``: the five DORA delivery metrics from the manifests repo's history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import typer

from core.catalog import load_catalog
from core.dora import dora_report, render_text
from core.errors import RoboticsCDError
from core.settings import get_settings
from tasks.dora import history_from_catalog


def parse_when(text: str) -> datetime:
    """``2026-11-30`` or an ISO datetime; without a zone it is UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a date (2026-11-30 or ISO datetime)") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def register(app: typer.Typer) -> None:
    @app.command("dora")
    def dora(
        service: str | None = typer.Option(None, "--service", "-s", help="One service only."),
        since: str | None = typer.Option(
            None, "--since", help="Window start, a date or ISO datetime (default: 30 days ago)."
        ),
        until: str | None = typer.Option(None, "--until", help="Window end (default: now)."),
        as_json: bool = typer.Option(False, "--json", help="The report as JSON."),
    ) -> None:
        """Change lead time, deployment frequency, change fail rate, failed deployment
        recovery time and deployment rework rate, read from git (see docs/dora.md)."""
        end = parse_when(until) if until else datetime.now(UTC)
        start = parse_when(since) if since else end - timedelta(days=30)
        if start >= end:
            raise typer.BadParameter(f"--since {start.isoformat()} is not before {end.isoformat()}")
        try:
            catalog = load_catalog(get_settings().catalog)
            history = history_from_catalog(catalog, service)
            report = dora_report(
                history.deployments, history.changes, since=start, until=end, service=service
            )
        except RoboticsCDError as exc:
            typer.secho(str(exc), fg="red", err=True)
            raise typer.Exit(2) from None
        typer.echo(report.model_dump_json(indent=2) if as_json else render_text(report))
