"""Fixtures: the whole sandbox (``robotics-cd sandbox up``), once per test session.

``sandbox`` (session) runs the launcher into a temp state dir, reusing the session's Prefect
server (``prefect_server``), and yields a :class:`SandboxHandle`: every URL, port, token,
the env dict the product reads (``handle.env``), the kubeconfig, the git base, and helpers
(git clone/commit/push, Argo CD and GitHub twin calls, waits with deadlines). ``down`` (with
purge) runs at session end.

``sandbox_env`` (function) applies ``handle.env`` to ``os.environ`` for one test and clears
the product's settings cache, so ``core.settings.get_settings()`` sees the sandbox.

Set ``ROBOTICS_CD_TEST_SANDBOX_STATE=<dir>`` to reuse a sandbox already up in ``<dir>``
(``robotics-cd sandbox up --state <dir>``): the session then neither starts nor stops it.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox import launcher
from sandbox.prefect_server import PrefectServer
from tests.conftest import SESSION_DIR

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Sandbox Tester",
    "GIT_AUTHOR_EMAIL": "tester@robotics.local",
    "GIT_COMMITTER_NAME": "Sandbox Tester",
    "GIT_COMMITTER_EMAIL": "tester@robotics.local",
}


@dataclass
class SandboxHandle:
    info: launcher.Sandbox

    # -- where things are ----------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return Path(self.info.state_dir)

    @property
    def env(self) -> dict[str, str]:
        return self.info.env()

    @property
    def kubeconfig(self) -> Path:
        return Path(self.info.kubeconfig)

    @property
    def git_base(self) -> Path:
        return Path(self.info.git_base)

    @property
    def git_base_url(self) -> str:
        return self.info.git_base_url

    @property
    def registry(self) -> str:
        return self.info.registry

    @property
    def registry_auth(self) -> tuple[str, str]:
        return (self.info.registry_username, self.info.registry_password)

    @property
    def argocd_url(self) -> str:
        return self.info.argocd_url

    @property
    def argocd_token(self) -> str:
        return self.info.argocd_token

    @property
    def github_url(self) -> str:
        return self.info.github_url

    @property
    def github_token(self) -> str:
        return self.info.github_token

    @property
    def webhook_secret(self) -> str:
        return self.info.webhook_secret

    @property
    def prometheus_url(self) -> str:
        return self.info.prometheus_url

    @property
    def control_url(self) -> str:
        return self.info.control_url

    @property
    def ingress(self) -> dict[str, str]:
        return self.info.ingress

    @property
    def seed_tag(self) -> str:
        return self.info.seed_tag

    def repo_url(self, repo: str) -> str:
        return self.info.repo_url(repo)

    # -- git -----------------------------------------------------------------------------

    def git(self, *args: str, cwd: Path | None = None) -> str:
        proc = subprocess.run(
            ["git", *args],
            cwd=cwd,
            env={**os.environ, **GIT_IDENTITY},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout.strip()

    def clone(self, repo: str, dest: Path, branch: str = "main") -> Path:
        self.git("clone", "-q", "-b", branch, self.repo_url(repo), str(dest))
        return dest

    def commit_and_push(
        self, work: Path, message: str, files: dict[str, str], *, ref: str = "HEAD:main"
    ) -> str:
        """Write ``files`` (path -> text) in a clone, commit, push ``ref``; return the sha."""
        for rel, text in files.items():
            path = work / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.git("add", "-A", cwd=work)
        self.git("commit", "-q", "-m", message, cwd=work)
        self.git("push", "-q", "origin", ref, cwd=work)
        return self.git("rev-parse", "HEAD", cwd=work)

    # -- Argo CD twin --------------------------------------------------------------------

    def argocd(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.argocd_url,
            headers={"Authorization": f"Bearer {self.argocd_token}"},
            timeout=30,
        )

    def app(self, name: str, *, refresh: bool = False) -> dict[str, Any]:
        with self.argocd() as client:
            params = {"refresh": "normal"} if refresh else {}
            response = client.get(f"/api/v1/applications/{name}", params=params)
            response.raise_for_status()
            return dict(response.json())

    def wait_app(
        self,
        name: str,
        condition: Callable[[dict[str, Any]], bool],
        *,
        timeout: float = 120.0,
        what: str = "",
    ) -> dict[str, Any]:
        """Poll the app until ``condition(app)``; fail with its last status at the deadline."""
        deadline = time.monotonic() + timeout
        app = self.app(name)
        while not condition(app):
            if time.monotonic() > deadline:
                status = app.get("status", {})
                pytest.fail(
                    f"{name}: {what or 'condition'} not met in {timeout:.0f}s; "
                    f"sync={status.get('sync')}, health={status.get('health')}, "
                    f"operationState={status.get('operationState')}"
                )
            time.sleep(0.5)
            app = self.app(name)
        return app

    def wait_synced(self, name: str, revision: str, *, timeout: float = 120.0) -> dict[str, Any]:
        """What ``argocd app wait`` checks, at ``revision``: op done, Synced, Healthy."""

        def done(app: dict[str, Any]) -> bool:
            status = app.get("status", {})
            state = status.get("operationState") or {}
            return (
                not app.get("operation")
                and state.get("phase") == "Succeeded"
                and (state.get("syncResult") or {}).get("revision") == revision
                and status.get("sync", {}).get("status") == "Synced"
                and status.get("health", {}).get("status") == "Healthy"
                and status.get("reconciledAt", "") >= state.get("finishedAt", "~")
            )

        return self.wait_app(name, done, timeout=timeout, what=f"synced+healthy at {revision[:7]}")

    def wait_operation_done(self, name: str, *, timeout: float = 120.0) -> dict[str, Any]:
        def done(app: dict[str, Any]) -> bool:
            phase = (app.get("status", {}).get("operationState") or {}).get("phase")
            return not app.get("operation") and phase in ("Succeeded", "Failed", "Error")

        return self.wait_app(name, done, timeout=timeout, what="operation finished")

    # -- GitHub twin ---------------------------------------------------------------------

    def github(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.github_url,
            headers={
                "Authorization": f"token {self.github_token}",
                "Accept": "application/vnd.github+json",
            },
            timeout=30,
        )

    def recorded(self) -> dict[str, Any]:
        """Everything the GitHub twin and chat sink received (statuses, deployments, ...)."""
        response = httpx.get(f"{self.github_url}/_twin/recorded", timeout=10)
        response.raise_for_status()
        return dict(response.json())

    def chat(self, channel: str) -> list[dict[str, Any]]:
        return [c for c in self.recorded()["chat"] if c["channel"] == channel]


@pytest.fixture(scope="session")
def sandbox(prefect_server: PrefectServer) -> Iterator[SandboxHandle]:
    reuse = os.environ.get("ROBOTICS_CD_TEST_SANDBOX_STATE")
    if reuse:
        yield SandboxHandle(launcher.Sandbox.load(Path(reuse)))
        return
    state = SESSION_DIR / f"sandbox-{uuid.uuid4().hex[:6]}"
    try:
        info = launcher.up(
            state,
            prefect_api_url=prefect_server.api_url,
            argocd_poll_seconds=1.0,
            echo=lambda _line: None,
        )
    except BaseException:
        launcher.down(state, purge=False)
        raise
    try:
        yield SandboxHandle(info)
    finally:
        launcher.down(state, purge=True)


@pytest.fixture
def sandbox_env(
    sandbox: SandboxHandle, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """The sandbox's env applied to ``os.environ`` for one test (settings cache cleared)."""

    for key, value in sandbox.env.items():
        monkeypatch.setenv(key, value)
    yield sandbox.env
