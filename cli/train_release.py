"""``robotics-cd train-release --service NAME=IMAGE ... --reason TEXT``: release several
services as one train (``release-train`` deployment).

Checked before anything starts: every service in the catalog, no dependency cycle, each
image the service's own and in the registry. The run then shows in the Prefect UI, where
the bundle's one approval is given (or ``robotics-cd approve RUN``).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer

from core.errors import RoboticsCDError
from core.train import Bundle, bundle_from_args

if TYPE_CHECKING:
    from tasks.handoff import StartedTrain


def _steps(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise typer.BadParameter(f"--steps {text!r}: comma-separated percentages") from None


def start_train(bundle: Bundle) -> StartedTrain:
    from tasks.handoff import start_release_train

    return asyncio.run(start_release_train(bundle))


def register(app: typer.Typer) -> None:
    @app.command("train-release")
    def train_release(
        service: list[str] = typer.Option(
            ...,
            "--service",
            help="SERVICE=IMAGE (registry/repo:tag, or registry/repo:tag@sha256:...); repeat it.",
        ),
        reason: str = typer.Option(..., help="Why these services go together (recorded)."),
        name: str | None = typer.Option(None, help="The train's name (default: train-<UTC time>)."),
        steps: str | None = typer.Option(
            None, help="The train's own canary steps, e.g. 20,50,100 (default: merged)."
        ),
    ) -> None:
        """Release several services together: promoted, or rolled back, as one."""
        train_name = name or f"train-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        try:
            bundle = bundle_from_args(train_name, service, reason)
            if steps:
                bundle = Bundle.model_validate({**bundle.model_dump(), "steps": _steps(steps)})
            started = start_train(bundle)
        except (RoboticsCDError, ValueError) as exc:
            typer.secho(str(exc), fg="red", err=True)
            raise typer.Exit(2) from None
        order = " → ".join(started.order)
        typer.echo(
            f"release train {train_name} ({order}) started: "
            f"{started.flow_run_url or started.flow_run_id}"
        )
