"""The ``robotics-cd`` console command.

Each group of subcommands lives in its own module with a ``register(app)`` function, so the
command stays one file per concern and every subcommand has ``--help``.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="robotics-cd",
    help="Release orchestrator on Prefect 3: CI, GitOps staging, approval, canary, rollback, "
    "training jobs.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """robotics-cd: every service from a merge on main to production, on Prefect 3."""


_COMMAND_MODULES = (
    "cli.catalog",
    "cli.sandbox",
    "cli.release",
    "cli.rerelease",
    "cli.train_release",
    "cli.ops",
    "cli.recovery",
    "cli.train",
    "cli.demo",
    "cli.dora",
    "cli.quarantine",
)

for _module in _COMMAND_MODULES:
    try:
        importlib.import_module(_module).register(app)
    except ModuleNotFoundError as exc:
        # A command module not written yet; any other missing import is a real error.
        if exc.name != _module:
            raise
