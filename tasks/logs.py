"""One logger for task code: the run's logger inside a flow or task run (its lines go to the
Prefect UI), a plain named logger outside one (the reconciler and the CLI call task
functions directly, with no run)."""

from __future__ import annotations

from typing import Any

from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger


def run_logger(name: str) -> Any:
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger(name)
