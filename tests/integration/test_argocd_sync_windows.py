"""Argo CD sync windows over HTTP: the Argo CD twin serves ``GET
/api/v1/applications/{name}/syncwindows`` and ``GET /api/v1/projects/{name}`` from the
AppProject's ``spec.syncWindows`` in its store, and the product's client turns them into
freezes (``ArgoCDClient.freezes``). Fast (the twin's API alone, no sandbox): in CI."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import uvicorn

from core.errors import ArgoCDRefused
from core.freeze import active_freeze
from sandbox.argocd.api import Sessions, build_app
from sandbox.argocd.controller import Controller, ControllerSettings
from sandbox.argocd.repo import RepoServer
from sandbox.kube.store import ObjectStore
from sandbox.procs import free_port, wait_until
from tasks.argocd import ArgoCDClient, RetryPolicy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SHANGHAI = ZoneInfo("Asia/Shanghai")


def _app(name: str, project: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {"name": name, "namespace": "argocd"},
        "spec": {
            "project": project,
            "source": {"repoURL": "file:///nowhere.git", "path": ".", "targetRevision": "main"},
            "destination": {"server": "https://kubernetes.default.svc", "namespace": namespace},
        },
    }


@pytest.fixture(scope="module")
def argo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, datetime]]:
    """The twin's Argo CD API over a store holding a project with a deny window that opened
    ten minutes ago (local time of Shanghai) and an allow window for staging only."""
    root: Path = tmp_path_factory.mktemp("argocd-windows")
    store = ObjectStore(root / "kube")
    store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "argocd"}})
    opened = (datetime.now(UTC) - timedelta(minutes=10)).astimezone(SHANGHAI)
    opened = opened.replace(second=0, microsecond=0)
    store.create(
        {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "AppProject",
            "metadata": {"name": "serving", "namespace": "argocd"},
            "spec": {
                "syncWindows": [
                    {
                        "kind": "deny",
                        "schedule": f"{opened.minute} {opened.hour} * * *",
                        "duration": "1h30m",
                        "applications": ["*-production"],
                        "timeZone": "Asia/Shanghai",
                        "description": "release freeze: robot fleet upgrade",
                    },
                    {
                        "kind": "allow",
                        "schedule": "0 3 * * *",
                        "duration": "1m",
                        "namespaces": ["staging"],
                        "manualSync": True,
                    },
                ]
            },
        }
    )
    store.create(_app("api-gateway-production", "serving", "production"))
    store.create(_app("api-gateway-staging", "serving", "staging"))
    store.create(_app("fleet-planner-production", "default", "production"))
    token = secrets.token_hex(16)
    controller = Controller(store, RepoServer(root / "repos"), ControllerSettings())
    sessions = Sessions(username="admin", password="pw", token=token, signing_key="k")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(controller, sessions),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=20, what="the Argo CD twin's API")
    try:
        yield f"http://127.0.0.1:{port}", token, opened
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _client(url: str, token: str) -> ArgoCDClient:
    return ArgoCDClient(base_url=url, token=token, retry=RetryPolicy(retries=0))


async def test_a_deny_window_of_the_production_app_is_a_freeze_until_its_end(argo):
    url, token, opened = argo
    async with _client(url, token) as client:
        answer = await client.sync_windows("api-gateway-production")
        deny = {
            "kind": "deny",
            "schedule": f"{opened.minute} {opened.hour} * * *",
            "duration": "1h30m",
            "manualSync": False,
        }
        assert answer == {"canSync": False, "activeWindows": [deny], "assignedWindows": [deny]}
        now = datetime.now(UTC)
        read = await client.freezes("api-gateway-production", now)
        freeze = active_freeze(read.freezes, now)
        # As Argo CD: a manual sync in a deny window without manualSync is refused.
        with pytest.raises(ArgoCDRefused, match="blocked by sync window"):
            await client.sync("api-gateway-production", "main")
    assert read.can_sync is False
    assert freeze is not None
    # Read in the project's time zone (the answer has none): it ends 90 min after it opened.
    assert freeze.until == opened.astimezone(UTC) + timedelta(minutes=90)
    assert freeze.reasons == ("release freeze: robot fleet upgrade",)


async def test_other_apps_get_their_own_windows(argo):
    url, token, _ = argo
    async with _client(url, token) as client:
        # Staging: only the allow window (closed now, except at 03:00); manualSync lets a
        # manual sync through, and staging is never frozen by us anyway.
        staging = await client.sync_windows("api-gateway-staging")
        assert staging["assignedWindows"][0]["kind"] == "allow"
        assert staging["canSync"] is True
        # An app of the default project (nobody stored it): no windows at all.
        assert await client.sync_windows("fleet-planner-production") == {"canSync": True}
        free = await client.freezes("fleet-planner-production", datetime.now(UTC))
        assert free.freezes == [] and free.can_sync
        project = await client.project("serving")
        assert len(project["spec"]["syncWindows"]) == 2
        with pytest.raises(ArgoCDRefused, match="HTTP 404"):
            await client.sync_windows("no-such-app")
        with pytest.raises(ArgoCDRefused, match="HTTP 404"):
            await client.project("no-such-project")
