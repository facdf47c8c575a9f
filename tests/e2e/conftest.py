"""Shared by the release e2e modules: the sandbox env with the compact canary policy, and
images built from real commits of the sandbox's robotics-api (``build``) and robotics-fleet
(``build_fleet``) repos."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.images import release_tag
from tests.e2e.releases import FAST
from tests.fixtures_prefect import BACKENDS


def prefect_backend(request: pytest.FixtureRequest) -> str:
    """The Prefect server a module runs on: its ``prefect_backend`` marker (``sqlite`` when
    unmarked), unless ``ROBOTICS_CD_TEST_PREFECT_BACKEND`` says otherwise for the session."""
    marker = request.node.get_closest_marker("prefect_backend")
    backend = os.environ.get("ROBOTICS_CD_TEST_PREFECT_BACKEND") or (
        marker.args[0] if marker else "sqlite"
    )
    if backend not in BACKENDS:
        raise pytest.UsageError(f"prefect backend {backend!r}: one of {sorted(BACKENDS)}")
    return backend


@pytest.fixture(scope="module")
def prefect_for_module(request: pytest.FixtureRequest, sandbox: Any) -> Any:
    """The sandbox's own Prefect server (SQLite), or the scale-out one (PostgreSQL + Redis,
    two API servers behind a balancer) with the sandbox's blocks registered on it too."""
    if prefect_backend(request) == "sqlite":
        return request.getfixturevalue("prefect_server")
    from sandbox import launcher

    server = request.getfixturevalue("prefect_scaleout")
    launcher.register_blocks(dataclasses.replace(sandbox.info, prefect_api_url=server.api_url))
    return server


@pytest.fixture(scope="module")
def env(sandbox: Any, prefect_for_module: Any) -> Iterator[dict[str, str]]:
    """The sandbox's env with the compact canary policy, on the module's Prefect server, in
    this process too (Prefect's settings are read at import: they are overridden here)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    values = {
        **sandbox.env,
        **FAST,
        "PREFECT_API_URL": prefect_for_module.api_url,
        "PREFECT_UI_URL": prefect_for_module.ui_url,
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    settings = temporary_settings(
        updates={
            PREFECT_API_URL: prefect_for_module.api_url,
            PREFECT_UI_URL: prefect_for_module.ui_url,
        }
    )
    settings.__enter__()
    try:
        yield values
    finally:
        settings.__exit__(None, None, None)
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@pytest.fixture(scope="module")
def docker_login(sandbox: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    config = tmp_path_factory.mktemp("docker-config")
    user, password = sandbox.registry_auth
    subprocess.run(
        [
            "docker",
            "--config",
            str(config),
            "login",
            "-u",
            user,
            "--password-stdin",
            sandbox.registry,
        ],
        input=password,
        text=True,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return {"DOCKER_CONFIG": str(config)}


def _builder(
    sandbox: Any, docker_login: dict[str, str], work_root: Path, repo: str, image: str, marker: str
) -> Callable[..., tuple[str, str]]:
    """Commit files to a sandbox repo, build and push its image; (image@digest, sha)."""

    def make(files: dict[str, str], message: str) -> tuple[str, str]:
        work = work_root / uuid.uuid4().hex[:8]
        sandbox.clone(repo, work)
        for leftover in (work / "config").glob("*.production"):  # earlier scenarios' faults
            leftover.unlink()
        unique = {marker: f"{uuid.uuid4()}\n", **files}  # never an empty commit
        sha = sandbox.commit_and_push(work, message, unique)
        date = datetime.fromtimestamp(
            int(sandbox.git("log", "-1", "--format=%ct", sha, cwd=work)), UTC
        )
        ref = f"{sandbox.registry}/{image}:{release_tag(date, sha)}"
        docker_env = {**os.environ, **docker_login}
        build = ["docker", "build", "-q", "--rm", "--force-rm", "-t", ref]
        for argv in ([*build, "--build-arg", f"GIT_SHA={sha}", str(work)], ["docker", "push", ref]):
            subprocess.run(argv, env=docker_env, check=True, capture_output=True, timeout=300)
        inspect = ["docker", "inspect", "--format", "{{index .RepoDigests 0}}", ref]
        out = subprocess.run(
            inspect, env=docker_env, check=True, capture_output=True, text=True, timeout=60
        )
        shutil.rmtree(work, ignore_errors=True)
        return f"{ref}@{out.stdout.strip().split('@', 1)[1]}", sha

    return make


@pytest.fixture(scope="module")
def build(
    sandbox: Any, docker_login: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., tuple[str, str]]:
    """Commit files to robotics-api, build and push its image; return (image@digest, sha)."""
    return _builder(
        sandbox,
        docker_login,
        tmp_path_factory.mktemp("builds"),
        "robotics-api",
        "robotics-serving/api-gateway",
        "www/e2e-build.txt",
    )


@pytest.fixture(scope="module")
def build_fleet(
    sandbox: Any, docker_login: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., tuple[str, str]]:
    """Commit files to robotics-fleet, build and push its image; return (image@digest, sha)."""
    return _builder(
        sandbox,
        docker_login,
        tmp_path_factory.mktemp("fleet-builds"),
        "robotics-fleet",
        "robotics-fleet/fleet-planner",
        "app/e2e-build.txt",
    )
