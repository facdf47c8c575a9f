"""The sandbox's Docker pieces: base images made locally, the registry with auth, reuse."""

from __future__ import annotations

import docker
import httpx
import pytest

from sandbox.engine import (
    BUSYBOX_IMAGE,
    CHECK_RUNNER_IMAGE,
    PYTHON_BASE_IMAGE,
    ensure_base_images,
)
from sandbox.registry import Registry, start_registry

pytestmark = pytest.mark.integration


def test_base_images_exist_and_a_second_call_makes_nothing(base_images: list[str]) -> None:
    assert ensure_base_images() == []
    client = docker.from_env()
    try:
        out = client.containers.run(
            CHECK_RUNNER_IMAGE,
            ["sh", "-c", "id -u; pwd; wget --help >/dev/null 2>&1 && echo wget"],
            remove=True,
            network_mode="none",
        ).decode()
        assert out.split() == ["65534", "/workspace", "wget"]
        assert (
            "httpd"
            in client.containers.run(
                BUSYBOX_IMAGE,
                ["sh", "-c", "ls /usr/sbin /bin /usr/bin"],
                remove=True,
                network_mode="none",
            ).decode()
        )
    finally:
        client.close()


def test_the_debian_python_base_runs_python_offline(base_images: list[str]) -> None:
    client = docker.from_env()
    try:
        out = client.containers.run(
            PYTHON_BASE_IMAGE,
            ["python3", "-c", "import sys, ssl, http.server; print(sys.version_info[:2])"],
            remove=True,
            network_mode="none",
        ).decode()
    finally:
        client.close()
    assert out.strip() == "(3, 11)"


def test_the_registry_demands_credentials_and_is_reused(registry: Registry) -> None:
    assert httpx.get(f"{registry.url}/v2/").status_code == 401
    assert httpx.get(f"{registry.url}/v2/", auth=(registry.username, "nope")).status_code == 401
    assert (
        httpx.get(f"{registry.url}/v2/", auth=(registry.username, registry.password)).status_code
        == 200
    )
    again = start_registry(registry.home)
    assert again.host == registry.host and again.password == registry.password
    assert registry.password not in repr(registry)
