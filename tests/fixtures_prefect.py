"""Real Prefect servers for the test session.

``prefect_server``: the embedded default, one server on SQLite in the session's temp dir;
every test talks to it unless it asks for another.

``prefect_scaleout`` (per module): the scale-out variant: Debian's PostgreSQL
and Redis, two API servers (one ``--no-services``) behind the sandbox's balancer. The e2e
modules choose it with ``pytest.mark.prefect_backend("postgres+redis")`` (see
``tests/e2e/conftest.py``); ``ROBOTICS_CD_TEST_PREFECT_BACKEND=sqlite`` sends them back to
SQLite for a quick local run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sandbox.prefect_server import (
    PrefectServer,
    start_prefect_server,
    stop_prefect_server,
    stop_prefect_stack,
)
from tests.conftest import PREFECT_PORT, SESSION_DIR

BACKENDS = {"sqlite": ("sqlite", "memory"), "postgres+redis": ("postgres", "redis")}


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[PrefectServer]:
    if "ROBOTICS_CD_TEST_PREFECT_API_URL" in os.environ:
        url = os.environ["ROBOTICS_CD_TEST_PREFECT_API_URL"]
        yield PrefectServer(url, url.removesuffix("/api"), SESSION_DIR)
        return
    home = SESSION_DIR / "prefect"
    # A generous deadline: on a loaded two-core machine the server takes minutes to boot.
    server = start_prefect_server(home, port=PREFECT_PORT, timeout=300)
    try:
        yield server
    finally:
        _drain_prefect_workers()
        stop_prefect_server(home)


@pytest.fixture(scope="module")
def prefect_scaleout(request: pytest.FixtureRequest) -> Iterator[PrefectServer]:
    # Per module, not per session: its two servers' loop services would otherwise keep
    # polling beside every later module on a two-core machine.
    home = SESSION_DIR / f"prefect-scaleout-{request.module.__name__.rsplit('.', 1)[-1]}"
    try:
        server = start_prefect_server(home, db="postgres", messaging="redis", timeout=300)
    except BaseException:
        stop_prefect_stack(home)
        raise
    try:
        yield server
    finally:
        _drain_prefect_workers()
        stop_prefect_stack(home)


def _drain_prefect_workers() -> None:
    """Send queued logs and events while the server still answers; otherwise the exit-time
    flush retries against a stopped server for a minute or more."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
