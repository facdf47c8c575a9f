"""Test session setup.

The Prefect API URL is fixed before anything imports Prefect (its settings are read at
import), so every test, served runner and flow-run subprocess talks to the one server the
``prefect_server`` fixture starts for the session. Fixture families live in their own
modules, listed in ``pytest_plugins``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
