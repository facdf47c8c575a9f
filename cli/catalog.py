"""``robotics-cd catalog``: check and show the service catalog."""

from __future__ import annotations

from pathlib import Path

import typer

from core.catalog import load_catalog
from core.errors import CatalogError


def register(app: typer.Typer) -> None:
    @app.command("catalog")
    def catalog(
        path: Path | None = typer.Option(
            None,
            "--file",
            "-f",
            help="Catalog file (default: $ROBOTICS_CD_CATALOG or services.yaml).",
        ),
    ) -> None:
        """Validate the service catalog and list its services and training images."""
        try:
            cat = load_catalog(path)
        except CatalogError as exc:
            typer.secho(str(exc), fg="red", err=True)
            raise typer.Exit(2) from None
        for name, svc in sorted(cat.services.items()):
            envs = ", ".join(f"{e}={t.argocd_app}" for e, t in svc.environments.items())
            typer.echo(f"service  {name:<20} {svc.image}  [{envs}]")
        for name, img in sorted(cat.training.items()):
            typer.echo(f"training {name:<20} {img.image}")
