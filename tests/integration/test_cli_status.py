"""``robotics-cd status`` with and without a service, on a real manifests repo (a bare git
repo seeded like the sandbox's) and the session's Prefect server."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.app import app
from tests.integration.test_gitops import SEED_TAG, seed_manifests

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def two_services(tmp_path, monkeypatch, prefect_server) -> Iterator[Path]:
    """A catalog of api-gateway and a copy named nav-planner, over a seeded manifests repo."""

    seed_manifests(tmp_path, services=("api-gateway", "nav-planner"))
    data = yaml.safe_load((ROOT / "services.yaml").read_text())
    second = copy.deepcopy(data["services"]["api-gateway"])
    text = yaml.safe_dump(second).replace("api-gateway", "nav-planner")
    data["services"]["nav-planner"] = yaml.safe_load(text)
    catalog = tmp_path / "services.yaml"
    catalog.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("ROBOTICS_CD_CATALOG", str(catalog))
    monkeypatch.setenv("ROBOTICS_CD_GIT_BASE", f"file://{tmp_path}")
    monkeypatch.setenv("ROBOTICS_CD_WORKSPACE", str(tmp_path / "workspace"))
    yield catalog
    monkeypatch.undo()


def test_status_without_a_service_lists_every_service(two_services):
    from tasks import gitops

    holder = f"release-{uuid.uuid4().hex[:6]}"
    gitops.take_lease.fn("nav-planner", "production", holder=holder, ttl=600)
    try:
        result = CliRunner().invoke(app, ["status"])
        one = CliRunner().invoke(app, ["status", "api-gateway"])
    finally:
        gitops.release_lease.fn("nav-planner", "production", holder=holder)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "api-gateway" in lines and "nav-planner" in lines
    for service in ("api-gateway", "nav-planner"):
        block = "\n".join(lines[lines.index(service) :])
        assert f"{service}-staging" in block and f"{service}-production" in block
        assert SEED_TAG in block
    # Per service: the session's Prefect server may hold other tests' runs of the shipped
    # services, but no test releases nav-planner, and its lease is this test's.
    start = lines.index("nav-planner") + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith(" ")), len(lines))
    nav = "\n".join(lines[start:end])
    assert f"lock held by release {holder}" in nav
    assert "no release in progress" in nav
    # The one-service form shows the same block, for that service only.
    assert one.exit_code == 0, one.output
    assert "nav-planner" not in one.output and "api-gateway-production" in one.output


def test_status_of_an_unknown_service_names_it(two_services):
    result = CliRunner().invoke(app, ["status", "no-such-service"])
    assert result.exit_code == 2
    assert "no-such-service" in result.output


def test_status_names_the_release_train_that_holds_a_lease(two_services):
    """A lease a release train took shows as the train's (name, run, services), not as a
    single release's: a single release waiting on it waits for the train."""
    from tasks.gitops import train as train_git

    holder = f"train-run-{uuid.uuid4().hex[:6]}"
    leases = ["api-gateway-production", "nav-planner-production"]
    train_git.take_train_leases(leases, "nav-v2", 600, holder)
    try:
        result = CliRunner().invoke(app, ["status", "nav-planner"])
    finally:
        train_git.release_train_leases(leases, holder)
    assert result.exit_code == 0, result.output
    assert (
        f"lock held by release train nav-v2 (run {holder}; api-gateway, nav-planner)"
        in result.output
    ), result.output
