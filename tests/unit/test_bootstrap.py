"""What a fresh machine's first run installs: bootstrap decides on the programs it runs.

The machine image ships a static docker *client* and no daemon; bootstrap once looked for
``docker``, found the client, and never installed ``docker.io``. These tests run its
``--dry-run`` with a PATH built for the case, so the decision is checked without installing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "scripts" / "bootstrap.sh"
# What bootstrap itself calls besides the programs it checks for.
TOOLS = ("dirname", "id")
CHECKED = ("dockerd", "containerd", "docker-registry", "prometheus", "htpasswd", "busybox",
           "chromium", "git", "redis-server", "debootstrap")  # fmt: skip


def _plan(bin_dir: Path) -> dict[str, str]:
    out = subprocess.run(
        ["/bin/bash", str(BOOTSTRAP), "--dry-run"],
        env={"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/root")},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return dict(line.split(": ", 1) for line in out.splitlines())


def _bin_dir(tmp_path: Path, programs: tuple[str, ...]) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} is needed by bootstrap"
        (bin_dir / tool).symlink_to(found)
    for name in programs:
        stub = bin_dir / name
        # A client that answers nothing: `docker info` fails as it does with no daemon.
        stub.write_text("#!/bin/sh\nexit 1\n")
        stub.chmod(0o755)
    return bin_dir


def test_a_docker_client_without_dockerd_plans_the_docker_io_install(tmp_path: Path) -> None:
    others = tuple(p for p in CHECKED if p not in ("dockerd", "containerd"))
    plan = _plan(_bin_dir(tmp_path, ("docker", *others)))
    assert plan["install"].split() == ["docker.io"]
    assert plan["dockerd"] == "start"


def test_everything_present_plans_no_install(tmp_path: Path) -> None:
    if not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
        pytest.skip("PostgreSQL's server is not installed on this machine")
    plan = _plan(_bin_dir(tmp_path, ("docker", *CHECKED)))
    assert plan["install"] == "nothing"


def test_each_missing_program_names_its_debian_package(tmp_path: Path) -> None:
    plan = _plan(_bin_dir(tmp_path, ()))
    assert set(plan["install"].split()) >= {
        "docker.io", "docker-registry", "prometheus", "apache2-utils", "busybox-static",
        "chromium", "git", "redis-server", "debootstrap",
    }  # fmt: skip
