"""A real Prometheus behind basic auth (bcrypt-hashed password in its web config file) and
TLS from a private CA: the client takes its credentials from a Prefect Secret block and
verifies the certificate (issue #24, item 9)."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prefect.blocks.system import Secret

from core.errors import MetricsError
from sandbox.kube.tls import ensure_tls
from sandbox.procs import free_port, spawn, stop_pidfile, wait_until
from tasks.prometheus import prometheus

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

USER = "robotics-cd"


def _bcrypt(password: str) -> str:
    htpasswd = shutil.which("htpasswd")
    if htpasswd is None:
        pytest.fail("htpasswd is missing; install it: apt-get install apache2-utils")
    line = subprocess.run(
        [htpasswd, "-nBiC", "10", USER], input=password, text=True, capture_output=True, check=True
    ).stdout.strip()
    return line.split(":", 1)[1]


@pytest.fixture(scope="module")
def secured_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home: Path = tmp_path_factory.mktemp("prometheus-auth")
    password = secrets.token_urlsafe(18)
    tls = ensure_tls(home / "tls")
    web = home / "web.yml"
    web.write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {"cert_file": str(tls.cert), "key_file": str(tls.key)},
                "basic_auth_users": {USER: _bcrypt(password)},
            }
        )
    )
    port = free_port()
    config = home / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "self",
                        "scheme": "https",
                        "tls_config": {"ca_file": str(tls.ca_cert)},
                        "basic_auth": {"username": USER, "password": password},
                        "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
                    }
                ],
            }
        )
    )
    pidfile = home / "prometheus.pid"
    spawn(
        [
            "prometheus",
            f"--config.file={config}",
            f"--web.config.file={web}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        log=home / "prometheus.log",
        pidfile=pidfile,
    )
    url = f"https://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: httpx.get(f"{url}/-/ready", verify=str(tls.ca_cert)).status_code == 401,
            timeout=60,
            what=f"Prometheus with auth (log: {home / 'prometheus.log'})",
        )
        yield {"url": url, "password": password, "ca": tls.ca_cert}
    finally:
        stop_pidfile(pidfile)


@pytest.fixture
def auth_settings(
    prefect_server: Any, secured_prometheus: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    block = f"prom-auth-{secrets.token_hex(4)}"
    monkeypatch.setenv("ROBOTICS_CD_PROMETHEUS_AUTH_BLOCK", block)
    monkeypatch.setenv("ROBOTICS_CD_PROMETHEUS_CA_BUNDLE", str(secured_prometheus["ca"]))
    yield block


def test_prometheus_with_basic_auth_and_tls(
    secured_prometheus: dict[str, Any], auth_settings: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = secured_prometheus["url"]

    # No Secret block: Prometheus refuses, and the message says what to set.
    with prometheus(url) as client, pytest.raises(MetricsError, match="refused the credentials"):
        client.query("up")

    # Wrong password: refused, and the password is in no message.
    Secret(value={"username": USER, "password": "not-the-password"}).save(
        auth_settings, overwrite=True
    )
    with prometheus(url) as client, pytest.raises(MetricsError) as wrong:
        client.query("up")
    assert "not-the-password" not in str(wrong.value)

    # The right one, from the block: Prometheus answers (it scrapes itself through the same
    # auth, so `up` turns 1 once the first scrape is in).
    Secret(value={"username": USER, "password": secured_prometheus["password"]}).save(
        auth_settings, overwrite=True
    )
    with prometheus(url) as client:
        wait_until(
            lambda: client.scalar('up{job="self"}') == 1.0,
            timeout=30,
            what="Prometheus to scrape itself",
        )

    # TLS is verified: without the private CA the same credentials go nowhere.
    monkeypatch.delenv("ROBOTICS_CD_PROMETHEUS_CA_BUNDLE")
    with prometheus(url) as client, pytest.raises(MetricsError, match="CERTIFICATE_VERIFY_FAILED"):
        client.query("up")
