"""A real Prometheus on 127.0.0.1, scraping the given targets every second."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from sandbox.procs import (
    free_port,
    http_ok,
    pid_alive,
    remembered_port,
    spawn,
    stop_pidfile,
    wait_until,
)


@dataclass(frozen=True)
class PrometheusServer:
    url: str
    home: Path


def write_config(home: Path, targets: Sequence[str]) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {"job_name": "sandbox", "static_configs": [{"targets": list(targets)}]},
        ],
    }
    path = home / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_prometheus(
    home: Path, targets: Sequence[str], *, port: int | None = None, timeout: float = 60.0
) -> PrometheusServer:
    """Start (or reuse, if already running from ``home``) Prometheus scraping ``targets``."""
    home.mkdir(parents=True, exist_ok=True)
    pidfile, portfile = home / "prometheus.pid", home / "prometheus.port"
    config = write_config(home, targets)
    if pidfile.exists() and portfile.exists() and pid_alive(int(pidfile.read_text())):
        old = int(portfile.read_text())
        url = f"http://127.0.0.1:{old}"
        # Pick up changed targets without a restart.
        httpx.post(f"{url}/-/reload", timeout=5)
        return PrometheusServer(url, home)
    port = port or remembered_port(portfile) or free_port()
    spawn(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=1d",
        ],
        log=home / "prometheus.log",
        pidfile=pidfile,
    )
    portfile.write_text(str(port))
    url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: http_ok(f"{url}/-/ready"),
        timeout=timeout,
        what=f"Prometheus (log: {home / 'prometheus.log'})",
    )
    return PrometheusServer(url, home)


def stop_prometheus(home: Path) -> bool:
    (home / "prometheus.port").unlink(missing_ok=True)
    return stop_pidfile(home / "prometheus.pid")
