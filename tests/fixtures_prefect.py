"""One real Prefect server per test session (SQLite in the session's temp dir)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sandbox.prefect_server import PrefectServer, start_prefect_server, stop_prefect_server
from tests.conftest import PREFECT_PORT, SESSION_DIR


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[PrefectServer]:
    if "ROBOTICS_CD_TEST_PREFECT_API_URL" in os.environ:
        url = os.environ["ROBOTICS_CD_TEST_PREFECT_API_URL"]
        yield PrefectServer(url, url.removesuffix("/api"), SESSION_DIR)
        return
    home = SESSION_DIR / "prefect"
    server = start_prefect_server(home, port=PREFECT_PORT)
    try:
        yield server
    finally:
        _drain_prefect_workers()
        stop_prefect_server(home)


def _drain_prefect_workers() -> None:
    """Send queued logs and events while the server still answers; otherwise the exit-time
    flush retries against a stopped server for a minute or more."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
