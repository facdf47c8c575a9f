"""A real Prefect server on 127.0.0.1 with SQLite under a state dir."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from sandbox.procs import free_port, http_ok, remembered_port, spawn, stop_pidfile, wait_until


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    ui_url: str
    home: Path

    @property
    def env(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.api_url, "PREFECT_UI_URL": self.ui_url}


def prefect_env(home: Path, port: int) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_UI_URL": f"http://127.0.0.1:{port}",
        # The zombie-run pattern: runs send heartbeats; an automation marks silent ones Crashed.
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
    }


def start_prefect_server(
    home: Path, *, port: int | None = None, timeout: float = 120.0
) -> PrefectServer:
    """Start (or reuse, if its pid file answers) a Prefect server whose state is in ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    portfile = home / "server.port"
    if portfile.exists():
        old = int(portfile.read_text())
        if http_ok(f"http://127.0.0.1:{old}/api/health"):
            return PrefectServer(f"http://127.0.0.1:{old}/api", f"http://127.0.0.1:{old}", home)
    port = port or remembered_port(portfile) or free_port()
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    spawn(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        log=home / "server.log",
        env=prefect_env(home, port),
        pidfile=home / "server.pid",
    )
    portfile.write_text(str(port))
    url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: http_ok(f"{url}/api/health"),
        timeout=timeout,
        what=f"Prefect server (log: {home / 'server.log'})",
    )
    return PrefectServer(f"{url}/api", url, home)


def stop_prefect_server(home: Path) -> bool:
    (home / "server.port").unlink(missing_ok=True)
    return stop_pidfile(home / "server.pid")
