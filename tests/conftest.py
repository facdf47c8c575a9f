"""Test session setup.

The Prefect API URL is fixed before anything imports Prefect (its settings are read at
import), so every test, served runner and flow-run subprocess talks to the one server the
``prefect_server`` fixture starts for the session. Fixture families live in their own
modules, listed in ``pytest_plugins``.
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from sandbox.prefect_server import prefect_env
from sandbox.procs import free_port

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="robotics-cd-tests-"))
_PREFECT_PORT = free_port()
if "ROBOTICS_CD_TEST_PREFECT_API_URL" in os.environ:  # reuse an already running server
    os.environ["PREFECT_API_URL"] = os.environ["ROBOTICS_CD_TEST_PREFECT_API_URL"]
else:
    os.environ.update(prefect_env(_SESSION_DIR / "prefect", _PREFECT_PORT))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
os.environ["PREFECT_RUNNER_POLL_FREQUENCY"] = "1"
os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_SESSION_DIR / "results")

SESSION_DIR = _SESSION_DIR
PREFECT_PORT = _PREFECT_PORT

pytest_plugins = [
    "tests.fixtures_prefect",
    "tests.fixtures_engine",
    "tests.fixtures_kube",
    "tests.fixtures_sandbox",
    "tests.fixtures_runtime",
]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Time spent per test module (setup, call and teardown together), slowest first: what
    to trim or gate when CI nears its 45-minute budget (tests/matrix.py)."""
    by_module: dict[str, float] = defaultdict(float)
    for reports in terminalreporter.stats.values():
        for report in reports:
            nodeid = getattr(report, "nodeid", "")
            duration = getattr(report, "duration", None)
            if nodeid and isinstance(duration, float):
                by_module[nodeid.split("::", 1)[0]] += duration
    if not by_module:
        return
    terminalreporter.section("time per module")
    for module, seconds in sorted(by_module.items(), key=lambda kv: -kv[1])[:30]:
        terminalreporter.write_line(f"{seconds:8.1f}s  {module}")
    terminalreporter.write_line(f"{sum(by_module.values()):8.1f}s  total")
