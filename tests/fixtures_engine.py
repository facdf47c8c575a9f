"""Fixtures: the Docker Engine, the local base images, a real registry, sample service repos.

* ``docker_engine``: the running dockerd (its version), or a clear failure.
* ``base_images``: ``robotics-cd/busybox`` and ``robotics-cd/check-runner``, made locally.
* ``registry``: a ``docker-registry`` with htpasswd auth on 127.0.0.1, plus the Prefect
  blocks ``DockerHost`` and ``DockerRegistryCredentials`` saved on the session Prefect
  server under the names in ``core/settings.py``.
* ``engine_settings``: workspace and Trivy cache in the session temp dir.
* ``sample_service_repo``: a factory making a bare git repo from
  ``sandbox/seed/robotics-api`` (optionally with files changed) and a catalog file whose
  ``api-gateway`` service points at it, with its own image repository per call.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import git
import pytest
import yaml

from core.catalog import Catalog, load_catalog
from core.settings import get_settings
from sandbox.engine import ensure_base_images, ensure_docker
from sandbox.registry import Registry, start_registry, stop_registry
from tests.conftest import SESSION_DIR

SEED = Path(__file__).resolve().parent.parent / "sandbox" / "seed" / "robotics-api"
# A fixed committer date: the release tag's date comes from the commit, not the clock.
COMMIT_DATE = "2026-11-20T10:00:00+00:00"
SERVICE = "api-gateway"


@pytest.fixture(scope="session")
def engine_settings() -> Iterator[None]:
    """Checkouts and the Trivy cache in the session temp dir (fresh: no vuln DB)."""
    saved = {k: os.environ.get(k) for k in ("ROBOTICS_CD_WORKSPACE", "ROBOTICS_CD_TRIVY_CACHE_DIR")}
    os.environ["ROBOTICS_CD_WORKSPACE"] = str(SESSION_DIR / "work")
    os.environ["ROBOTICS_CD_TRIVY_CACHE_DIR"] = str(SESSION_DIR / "trivy-cache")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def docker_engine() -> str:
    return ensure_docker()


@pytest.fixture(scope="session")
def base_images(docker_engine: str) -> list[str]:
    ensure_base_images()
    return ["robotics-cd/busybox:latest", "robotics-cd/check-runner:latest"]


def _remove_images_of(host: str) -> None:
    """Remove the images this session built for its registry (tagged <host>/...)."""
    client = docker.from_env()
    try:
        for image in client.images.list():
            for tag in image.tags:
                if tag.startswith(f"{host}/"):
                    client.images.remove(tag, force=True, noprune=False)
    finally:
        client.close()


async def save_blocks(reg: Registry) -> None:
    """The DockerHost and DockerRegistryCredentials blocks, under the names in settings."""
    from prefect_docker import DockerHost, DockerRegistryCredentials

    settings = get_settings()
    await DockerHost().asave(settings.docker_host_block, overwrite=True)
    await DockerRegistryCredentials(
        username=reg.username, password=reg.password, registry_url=reg.host, reauth=True
    ).asave(settings.registry_block, overwrite=True)


@pytest.fixture(scope="session")
async def registry(prefect_server: Any, base_images: list[str], engine_settings: None) -> Any:
    home = SESSION_DIR / "registry"
    reg = start_registry(home)
    await save_blocks(reg)
    yield reg
    _remove_images_of(reg.host)
    stop_registry(home)


@dataclass
class SampleService:
    """A bare repo holding one commit of the sample service, and a catalog for it."""

    bare: Path
    sha: str
    catalog_path: Path
    catalog: Catalog
    image: str  # repository path, unique per sample
    registry: Registry

    @property
    def service(self) -> str:
        return SERVICE


def _commit_tree(work: Path, files: dict[str, str | None]) -> str:
    for name, content in files.items():
        target = work / name
        if content is None:
            target.unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
            if name.endswith(".sh"):
                target.chmod(0o755)
    repo = git.Repo.init(work, initial_branch="main")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "Robotics Dev")
        cw.set_value("user", "email", "dev@robotics.example")
    repo.git.add(A=True)
    env = {"GIT_AUTHOR_DATE": COMMIT_DATE, "GIT_COMMITTER_DATE": COMMIT_DATE}
    with repo.git.custom_environment(**env):
        repo.git.commit("-q", "-m", "robotics-api: sample service")
    return repo.head.commit.hexsha


@pytest.fixture
async def sample_service_repo(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., SampleService]]:
    """``make(files={path: text or None}, checks={...}, scan={...})`` → :class:`SampleService`.

    The catalog file is made the active one (``ROBOTICS_CD_CATALOG``) for the test.
    """
    # Saved again per test: another fixture (the sandbox launcher) may have pointed the
    # same block names at its own registry meanwhile.
    await save_blocks(registry)

    def make(
        *,
        files: dict[str, str | None] | None = None,
        checks: dict[str, Any] | None = None,
        scan: dict[str, Any] | None = None,
    ) -> SampleService:
        uid = uuid.uuid4().hex[:8]
        root = SESSION_DIR / "samples" / uid
        work = root / "work"
        shutil.copytree(SEED, work)
        sha = _commit_tree(work, files or {})
        bare = root / "robotics-api.git"
        git.Repo.clone_from(str(work), str(bare), bare=True)
        image = f"robotics-serving/api-{uid}"
        catalog = {
            "defaults": {
                "push_registry": registry.host,
                "pull_registry": registry.host,
                "manifests_repo": str(root / "manifests.git"),
                "scan": {"fail_on": ["CRITICAL", "HIGH"], "allow_missing_vuln_db": True},
            },
            "services": {
                SERVICE: {
                    "repo": f"file://{bare}",
                    "github": "robotics/robotics-api",
                    "branch": "main",
                    "image": image,
                    "checks": {
                        "lint": ["sh scripts/lint.sh"],
                        "unit": ["sh scripts/test.sh unit"],
                        "integration": ["sh scripts/test.sh integration"],
                        "image": "robotics-cd/check-runner:latest",
                        "timeout": "60s",
                        **(checks or {}),
                    },
                    "environments": {
                        "staging": {
                            "path": "serving/api-gateway/overlays/staging",
                            "argocd_app": "api-gateway-staging",
                            "namespace": "staging",
                            "host": "api.robotics.local",
                        }
                    },
                    "approvers": ["alice"],
                    **({"scan": scan} if scan else {}),
                }
            },
        }
        catalog_path = root / "services.yaml"
        catalog_path.write_text(yaml.safe_dump(catalog, sort_keys=False))
        monkeypatch.setenv("ROBOTICS_CD_CATALOG", str(catalog_path))
        return SampleService(bare, sha, catalog_path, load_catalog(catalog_path), image, registry)

    yield make
