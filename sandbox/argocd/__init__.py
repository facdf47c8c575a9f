"""The Argo CD twin: REST API, application controller, repo server.

Config (``twin-config.json``): ``argocd_port``, and ``argocd``: ``{"username", "password",
"token", "namespace", "poll_seconds", "sync_timeout"}``; ``kubectl`` (path) optional.
"""

from __future__ import annotations

import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from sandbox.argocd.api import Sessions, build_app
from sandbox.argocd.controller import Controller, ControllerSettings
from sandbox.argocd.repo import RepoServer
from sandbox.faults import FaultInjector


def kubectl_path(config: dict[str, Any]) -> str:
    venv_bin = str(Path(sys.executable).parent)
    return str(config.get("kubectl") or shutil.which("kubectl", path=venv_bin) or "kubectl")


async def start(ctx: Any) -> None:
    conf: dict[str, Any] = ctx.config.get("argocd", {})
    settings = ControllerSettings(
        namespace=conf.get("namespace", "argocd"),
        poll_seconds=float(conf.get("poll_seconds", 3.0)),
        sync_timeout=float(conf.get("sync_timeout", 300.0)),
    )
    repos = RepoServer(ctx.state_dir / "argocd" / "repos", kubectl=kubectl_path(ctx.config))
    controller = Controller(ctx.store, repos, settings)
    sessions = Sessions(
        username=conf.get("username", "admin"),
        password=conf.get("password", ""),
        token=conf.get("token", ""),
        signing_key=conf.get("signing_key") or secrets.token_hex(16),
    )
    ctx.spawn(controller.watch_store(), "argocd:watch")
    ctx.spawn(controller.poll_loop(), "argocd:poll")
    ctx.spawn(controller.health_loop(), "argocd:health")
    controller.resume_operations()
    app = FaultInjector(build_app(controller, sessions), target="argocd")
    await ctx.serve(app, int(ctx.config["argocd_port"]), "argocd")
