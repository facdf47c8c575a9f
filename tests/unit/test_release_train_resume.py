"""Where a re-executed release train carries on, from what its first lease records, and the
train's resolved configuration (leases in dependency order, one TTL for all)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from core.catalog import load_catalog
from core.release import LeaseRecord, LeaseStep, StepKind
from core.settings import get_settings
from core.train import bundle_from_args, plan_train
from flows.release_train import Train, start_index

GW = "127.0.0.1:5000/robotics-serving/api-gateway:20261207-abc1234@sha256:" + "a9" * 32
FP = "127.0.0.1:5000/robotics-fleet/fleet-planner:20261207-def5678@sha256:" + "f1" * 32
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.fixture
def train(monkeypatch: pytest.MonkeyPatch) -> Iterator[Train]:
    for var in ("ROBOTICS_CD_CATALOG", "ROBOTICS_CD_CANARY_STEPS", "ROBOTICS_CD_CANARY_INTERVAL"):
        monkeypatch.delenv(var, raising=False)
    settings = get_settings()
    catalog = load_catalog(settings.catalog)
    bundle = bundle_from_args("fleet-v2", [f"api-gateway={GW}", f"fleet-planner={FP}"], "v2")
    yield Train(plan_train(catalog, bundle), catalog, settings)


def lease(step: LeaseStep | None, commits: int = 1) -> LeaseRecord:
    return LeaseRecord(
        holder="run-1",
        taken_at=NOW,
        expires_at=NOW + timedelta(minutes=5),
        step=step,
        commits=["c" * 40] * commits,
    )


def test_the_train_takes_its_leases_in_dependency_order_with_one_ttl(train: Train) -> None:
    assert train.leases == ["fleet-planner-production", "api-gateway-production"]
    assert [m.service for m in train.members] == ["fleet-planner", "api-gateway"]
    # The train's steps (shipped catalog: gateway 10/25/50/100, planner 20/50/100) start at
    # the largest first step.
    assert train.plan.steps == [20, 25, 50, 100]
    assert train.plan.weights(1) == {"fleet-planner": 20, "api-gateway": 25}


@pytest.mark.parametrize(
    ("step", "commits", "index"),
    [
        (None, 0, 0),  # a fresh lease: from the first step
        (LeaseStep(kind=StepKind.CANARY, weight=20, commit="c" * 40), 0, 0),  # nothing written
        # The planner (the first lease) at 20 % is the train's steps 20 and 25: carry on at
        # the first of them, never below what production runs.
        (LeaseStep(kind=StepKind.CANARY, weight=20, commit="c" * 40), 1, 0),
        (LeaseStep(kind=StepKind.CANARY, weight=50, commit="c" * 40), 2, 2),
        (LeaseStep(kind=StepKind.CANARY, weight=100, commit="c" * 40), 3, 3),
        (LeaseStep(kind=StepKind.PROMOTE, commit="c" * 40), 4, 0),  # promote: not a canary
    ],
)
def test_a_re_executed_train_carries_on_where_its_lease_says(
    train: Train, step: LeaseStep | None, commits: int, index: int
) -> None:
    assert start_index(train, lease(step, commits)) == index
