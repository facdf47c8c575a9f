"""A release train that died mid-canary, recovered by the reconciler against real git and
the real ``kubectl kustomize``: every lease of the train taken over at once, one restoring
commit naming the train and every commit it undoes, syncs in reverse dependency order.

Argo CD, the smoke test and the Prefect API are stand-ins (the reconciler needs no Prefect
API by design; the dead run is one Prefect does not know)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from core.images import parse_reference
from core.recovery import Action, RunPhase
from tasks.gitops.train import TrainMember, TrainRepo
from tests.integration.test_gitops import KUBECTL, git, seed_manifests

pytestmark = pytest.mark.integration

ORDER = ["fleet-planner", "api-gateway"]
LEASES = [f"{s}-production" for s in ORDER]
IMAGE = {
    "fleet-planner": "127.0.0.1:5000/robotics-fleet/fleet-planner:20261207-def5678@sha256:"
    + "f1" * 32,
    "api-gateway": "127.0.0.1:5000/robotics-serving/api-gateway:20261207-abc1234@sha256:"
    + "a9" * 32,
}


synced: list[tuple[str, str]] = []


def overlay(service: str) -> str:
    return f"serving/{service}/overlays/production"


@pytest.fixture
def bare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from flows import reconcile
    from tasks import argocd, lifecycle, smoke  # the modules reconcile calls through

    url = seed_manifests(tmp_path)
    monkeypatch.delenv("ROBOTICS_CD_CATALOG", raising=False)
    monkeypatch.setenv("ROBOTICS_CD_GIT_BASE", f"file://{tmp_path}")
    monkeypatch.setenv("ROBOTICS_CD_WORKSPACE", str(tmp_path / "workspace"))

    async def phase(run_id: str) -> RunPhase:
        return RunPhase.MISSING

    async def crashed(run_id: str, message: str) -> bool:
        return True

    async def sync(app: str, revision: str, *args: Any, **kwargs: Any) -> Any:
        synced.append((app, revision))
        return SimpleNamespace(revision=revision)

    monkeypatch.setattr(lifecycle, "run_phase", phase)
    monkeypatch.setattr(lifecycle, "mark_crashed", crashed)
    monkeypatch.setattr(argocd, "argocd_sync_and_wait", SimpleNamespace(fn=sync))
    monkeypatch.setattr(smoke, "smoke_test", SimpleNamespace(fn=lambda *a, **k: []))
    monkeypatch.setattr(reconcile, "_quarantine", lambda *a, **k: None)
    yield Path(url.removeprefix("file://"))


def die_mid_canary(bare: Path, tmp_path: Path) -> tuple[TrainRepo, str]:
    """A train that took its leases and wrote its first step, then died."""
    dead = TrainRepo(url=f"file://{bare}", workdir=tmp_path / "dead", kubectl=KUBECTL)
    dead.take_train(LEASES, "train-run-dead", timedelta(seconds=1), "fleet-v2")
    members = [
        TrainMember(
            service=s,
            overlay=overlay(s),
            lease=f"{s}-production",
            image=parse_reference(IMAGE[s]),
            replicas=2,
        )
        for s in ORDER
    ]
    step = dead.train_canary(
        train="fleet-v2",
        members=members,
        weights={"fleet-planner": 50, "api-gateway": 50},
        holder="train-run-dead",
    )
    assert step.changed
    deadline = time.monotonic() + 30
    while not all(
        lease is not None and lease.expired(datetime.now(UTC))
        for lease in dead.read_leases(LEASES).values()
    ):
        assert time.monotonic() < deadline, "the dead train's leases never expired"
        time.sleep(0.2)
    return dead, step.sha


def test_a_dead_train_mid_canary_is_restored_whole_in_one_commit(
    bare: Path, tmp_path: Path
) -> None:
    from flows.reconcile import reconcile_once

    synced.clear()

    before = {s: git(bare, "rev-parse", f"main:{overlay(s)}") for s in ORDER}
    _, step_sha = die_mid_canary(bare, tmp_path)
    step = SimpleNamespace(sha=step_sha)

    done = anyio.run(lambda: reconcile_once(me="reconciler-test"))

    # The first service of the catalog met the train's lease; the train was restored whole,
    # so the second found nothing left to do.
    assert [(r.service, r.action) for r in done] == [("api-gateway", Action.RESTORE)], done
    # Production runs what it ran before the train, and every lease is free.
    assert {s: git(bare, "rev-parse", f"main:{overlay(s)}") for s in ORDER} == before
    assert git(bare, "for-each-ref", "refs/leases/") == ""
    after = git(bare, "log", "--format=%H %s", f"{step.sha}..main").splitlines()
    assert len(after) == 1, after
    sha, subject = after[0].split(" ", 1)
    assert subject == (
        "rollback(production): train fleet-v2 (api-gateway, fleet-planner), reverting 1 commit"
    )
    assert f"Undoes: {step.sha}" in git(bare, "log", "-1", "--format=%b", sha)
    assert done[0].commit == sha
    # Synced in reverse dependency order: the caller first.
    assert synced == [("api-gateway-production", sha), ("fleet-planner-production", sha)]
    # A second pass finds nothing to do.
    assert anyio.run(lambda: reconcile_once(me="reconciler-test")) == []


def test_a_dead_train_missing_a_lease_is_restored_service_by_service(
    bare: Path, tmp_path: Path
) -> None:
    """One of its leases was freed by hand: the train is not taken over whole; the service
    whose lease is left is restored as a single release is (its revert covers both
    overlays: the train's commits do)."""
    from flows.reconcile import reconcile_once

    before = {s: git(bare, "rev-parse", f"main:{overlay(s)}") for s in ORDER}
    dead, _ = die_mid_canary(bare, tmp_path)
    assert dead.release_lease("fleet-planner-production", "train-run-dead")

    done = anyio.run(lambda: reconcile_once(me="reconciler-test"))

    assert [(r.service, r.action) for r in done] == [("api-gateway", Action.RESTORE)], done
    assert {s: git(bare, "rev-parse", f"main:{overlay(s)}") for s in ORDER} == before
    assert git(bare, "for-each-ref", "refs/leases/") == ""
    assert git(bare, "log", "-1", "--format=%s", "main").startswith(
        "rollback(production): api-gateway, reverting 1 commit"
    )
