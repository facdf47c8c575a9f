"""``robotics-cd train-release`` refuses a bad train before anything starts, and a good one
becomes the run's parameters: images pinned to their digests, commits from their labels."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from cli.app import app
from core.errors import InvalidInput
from core.train import bundle_from_args
from tasks import handoff

GW = "127.0.0.1:5000/robotics-serving/api-gateway:20261207-abc1234"
FP = "127.0.0.1:5000/robotics-fleet/fleet-planner:20261207-def5678"
DIGEST = "sha256:" + "cd" * 32


@dataclass
class Found:
    digest: str
    revision: str


@pytest.fixture(autouse=True)
def shipped_catalog(monkeypatch):

    for var in ("ROBOTICS_CD_CATALOG", "ROBOTICS_CD_PUSH_REGISTRY", "ROBOTICS_CD_PULL_REGISTRY"):
        monkeypatch.delenv(var, raising=False)
    yield


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--service", f"ghost={GW}"], "ghost not in the catalog"),
        (["--service", "api-gateway"], "SERVICE=IMAGE"),
        (["--service", f"api-gateway={FP}"], "not api-gateway's repository"),
        (["--service", f"api-gateway={GW}", "--steps", "10,100"], "below the first step"),
    ],
)
def test_a_bad_train_exits_2_and_starts_nothing(monkeypatch, args, message):
    started = []

    async def fake_start(*a, **k):
        started.append(a)

    monkeypatch.setattr(handoff, "create_deployment_run", fake_start)
    result = CliRunner().invoke(
        app, ["train-release", *args, "--service", f"fleet-planner={FP}", "--reason", "v2"]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not started


def test_the_parameters_pin_digests_and_order_dependencies_first():
    async def lookup(registry: str, repository: str, tag: str) -> Found:
        return Found(digest=DIGEST, revision=("a" if "gateway" in repository else "b") * 40)

    bundle = bundle_from_args("fleet-v2", [f"api-gateway={GW}", f"fleet-planner={FP}"], "v2")
    plan, params = asyncio.run(handoff.train_parameters(bundle, lookup=lookup))
    assert plan.order == ["fleet-planner", "api-gateway"]  # the gateway depends on the planner
    assert params["services"] == {
        "api-gateway": f"{GW}@{DIGEST}",
        "fleet-planner": f"{FP}@{DIGEST}",
    }
    assert params["source_shas"] == {"api-gateway": "a" * 40, "fleet-planner": "b" * 40}
    assert params["name"] == "fleet-v2" and params["steps"] is None


def test_an_image_missing_from_the_registry_is_refused():
    async def lookup(registry: str, repository: str, tag: str) -> None:
        return None

    bundle = bundle_from_args("fleet-v2", [f"api-gateway={GW}"], "v2")
    with pytest.raises(InvalidInput, match="not in the registry"):
        asyncio.run(handoff.train_parameters(bundle, lookup=lookup))
