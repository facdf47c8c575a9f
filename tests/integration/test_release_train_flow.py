"""The ``release-train`` flow on a real Prefect server (the session's) and real git (a bare
manifests repo seeded from the sandbox's, edited with the real ``kubectl kustomize``).

Argo CD, Prometheus, staging and the approval form are the only stand-ins: each sync is
recorded (which app, which commit, in which order) and answered Synced; each analysis
interval answers the verdict the scenario gives the service. What is checked is what a user
sees afterwards: the run's final state, the manifests repo's history (one commit per train
step over every overlay, one promotion commit, or one restoring commit naming everything it
undoes), the production overlays, the leases, and the train's record on the server.

The sandbox version (real Argo CD twin, real containers and Prometheus; promoted, and rolled
back on a regression of one service) is tests/e2e/test_release_train.py (full matrix only).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.objects import Artifact

import tasks.lifecycle as lifecycle_tasks
from core.analysis import IntervalVerdict, Verdict
from core.approval import ApprovalDecision
from core.errors import Superseded, VerificationFailed
from core.release import commits_to_revert
from tasks.argocd import SyncWindows
from tasks.smoke import SmokeResult
from tests.integration.test_gitops import git, push_from_other_clone, seed_manifests
from tests.matrix import full_matrix

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ORDER = ["fleet-planner", "api-gateway"]  # the gateway depends on the planner
REGISTRY = "127.0.0.1:5000"
DIGEST = {"fleet-planner": "sha256:" + "f1" * 32, "api-gateway": "sha256:" + "a9" * 32}
REPO = {
    "fleet-planner": "robotics-fleet/fleet-planner",
    "api-gateway": "robotics-serving/api-gateway",
}
TAG = "20261207-abc1234"
FAST = {
    "ROBOTICS_CD_CANARY_STEPS": "[50, 100]",
    "ROBOTICS_CD_CANARY_INTERVAL": "1s",
    "ROBOTICS_CD_CANARY_ANALYSES": "1",
    "ROBOTICS_CD_CANARY_MIN_REQUESTS": "10",
    "ROBOTICS_CD_POST_RELEASE_WATCH": "1s",
}


def overlay(service: str) -> str:
    return f"serving/{service}/overlays/production"


def image(service: str) -> str:
    return f"{REGISTRY}/{REPO[service]}:{TAG}@{DIGEST[service]}"


@dataclass
class World:
    """What the stand-ins saw, and the verdicts they give."""

    bare: Path
    failing: set[str] = field(default_factory=set)
    failing_staging: set[str] = field(default_factory=set)
    staged: list[str] = field(default_factory=list)
    syncs: list[tuple[str, str]] = field(default_factory=list)
    judged: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    chat: list[str] = field(default_factory=list)
    forms: list[str] = field(default_factory=list)
    bundle_smoke_status: int = 200  # what the gateway's call to the planner answers
    superseded: set[str] = field(default_factory=set)  # production already runs newer
    bundle_smoked: list[str] = field(default_factory=list)

    def log(self, *args: str) -> str:
        return git(self.bare, "log", *args, "main")


def _verdict(world: World, service: str, end: datetime | None) -> IntervalVerdict:
    fails = service in world.failing
    return IntervalVerdict(
        end=end or datetime.now(UTC),
        window_seconds=1.0,
        verdict=Verdict.FAIL if fails else Verdict.PASS,
        reason=f"{service}: error_ratio 0.4 > 0.05" if fails else f"{service}: all signals pass",
        metrics=[],
        canary_requests=500.0,
        stable_requests=500.0,
    )


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_server: Any) -> Iterator[World]:
    from types import SimpleNamespace

    from flows import release_train as flow_module

    url = seed_manifests(tmp_path)
    env = {
        **FAST,
        "ROBOTICS_CD_GIT_BASE": f"file://{tmp_path}",
        "ROBOTICS_CD_WORKSPACE": str(tmp_path / "workspace"),
        "ROBOTICS_CD_PULL_REGISTRY": REGISTRY,
        "ROBOTICS_CD_PUSH_REGISTRY": REGISTRY,
    }
    for key in ("ROBOTICS_CD_CATALOG",):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    w = World(bare=Path(url.removeprefix("file://")))

    async def staging(plan: Any, cfg: Any, record: Any) -> None:
        w.staged.append(plan.service)
        if plan.service in w.failing_staging:
            raise VerificationFailed(f"staging metrics: {plan.service}: error_ratio 0.4 > 0.05")
        record.staging_commit = "5" * 40

    async def no_refusal(service: str, image: str) -> None:
        return None

    async def verified(*args: Any, **kwargs: Any) -> str:
        return "provenance: checked by the test's stand-in"

    async def quarantine(service: str, *args: Any, **kwargs: Any) -> None:
        w.quarantined.append(service)

    async def approve(
        approvers: list[str],
        description: str,
        *,
        required: int,
        ui_authenticated: bool,
        cover: dict[str, list[str]],
    ) -> ApprovalDecision:
        assert all(s in description for s in ORDER)
        # The bundle's approval needs an approver of each service (their own lists).
        assert set(cover) == set(ORDER) and all(cover.values()), cover
        w.forms.append(description)
        return ApprovalDecision("approve", approvers[0], "train test")

    async def sync(app: str, revision: str, *args: Any, **kwargs: Any) -> Any:
        w.syncs.append((app.removesuffix("-production"), revision))
        return SimpleNamespace(revision=revision)

    def analyse(service: str, *args: Any, end_time: datetime | None = None, **kw: Any) -> Any:
        w.judged.append(service)
        return SimpleNamespace(
            analysis=_verdict(w, service, end_time),
            observation=SimpleNamespace(stable=SimpleNamespace(requests=500.0)),
        )

    def check(service: str, *args: Any, end_time: datetime | None = None, **kw: Any) -> Any:
        v = _verdict(w, service, end_time)
        return SimpleNamespace(analysis=v, verdict=v.verdict)

    async def no_sync_windows(cfg: Any) -> Any:  # Argo CD's sync windows: none here
        return SyncWindows(app=cfg.svc.environments["production"].argocd_app)

    def chat(title: str, *args: Any, **kwargs: Any) -> list[str]:
        w.chat.append(title)
        return []

    monkeypatch.setattr(flow_module, "deploy_staging", staging)
    monkeypatch.setattr(flow_module, "wait_for_votes", approve)
    monkeypatch.setattr("tasks.quarantine.quarantine_refusal", no_refusal)
    monkeypatch.setattr("tasks.quarantine.quarantine_image", quarantine)
    monkeypatch.setattr("tasks.images.verify_release_image", verified)
    monkeypatch.setattr("tasks.argocd.argocd_sync_and_wait", sync)
    monkeypatch.setattr(flow_module, "argocd_windows", no_sync_windows)
    monkeypatch.setattr("tasks.metrics.analyse_interval", analyse)
    monkeypatch.setattr("tasks.metrics.post_release_watch", check)
    monkeypatch.setattr("tasks.smoke.smoke_test", lambda *a, **k: [])

    def bundle_smoke(target: Any, paths: list[str], **kwargs: Any) -> list[Any]:
        w.bundle_smoked += paths
        status = w.bundle_smoke_status
        error = None if status == 200 else "fleet-planner did not answer 2xx"
        return [
            SmokeResult(
                path=p,
                status=status,
                latency_ms=3.0,
                attempts=1 if error is None else 5,
                error=error,
            )
            for p in paths
        ]

    monkeypatch.setattr("tasks.smoke.bundle_smoke_test", bundle_smoke)

    async def superseded(plan: Any, cfg: Any) -> None:
        # The real check reads the service's source repo; here production's tag says it.
        if plan.service in w.superseded:
            raise Superseded(
                f"production already runs {plan.service}:20261207-fffffff, which contains "
                f"{plan.source_sha[:12]}; nothing to release"
            )

    monkeypatch.setattr(flow_module, "refuse_if_superseded", superseded)
    monkeypatch.setattr("tasks.notify.send_chat", chat)
    yield w


def created_at(artifact: Artifact) -> datetime:
    assert artifact.created is not None  # the server stamps every artifact it stores
    return artifact.created


def run_train(name: str) -> Any:
    from flows.release_train import release_train

    return release_train(
        services={s: image(s) for s in ORDER},
        source_shas={s: "c" * 40 for s in ORDER},
        reason="planner v2 and the gateway that calls it",
        name=name,
        return_state=True,
    )


def tree(world: World, service: str) -> str:
    return git(world.bare, "rev-parse", f"main:{overlay(service)}")


def leases(world: World) -> str:
    return git(world.bare, "for-each-ref", "--format=%(refname)", "refs/leases/")


def record_of(name: str) -> str:
    async def read() -> str:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"train-{name}"]))
            )
        return str(sorted(found, key=created_at)[-1].data) if found else ""

    return anyio.run(read)


def test_two_services_are_released_together_and_promoted_in_one_commit(world: World) -> None:
    before = world.log("--format=%H")
    state = anyio.run(lambda: run_train("fleet-v2"))

    assert state.is_completed() and state.name == "Promoted", state
    assert world.staged == ORDER  # staging in dependency order
    subjects = world.log("--format=%s", f"{before.split()[0]}..").splitlines()[::-1]
    steps = [s for s in subjects if s.startswith("canary(production): train fleet-v2")]
    promotions = [s for s in subjects if s.startswith("promote(production): train fleet-v2")]
    # The train's steps: every service's own merged, from the largest first step (the
    # gateway's 50): fleet-planner's 20 is skipped, no service is ever below its first step.
    assert steps == [
        "canary(production): train fleet-v2: fleet-planner=50 api-gateway=50",
        "canary(production): train fleet-v2: fleet-planner=100 api-gateway=100",
    ], subjects
    assert len(promotions) == 1 and len(subjects) == 3, subjects
    promotion = world.log("-1", "--format=%H").strip()
    touched = git(world.bare, "show", "--name-only", "--format=", promotion).split()
    assert {f.split("/overlays/")[0] for f in touched} == {f"serving/{s}" for s in ORDER}
    for service in ORDER:
        text = git(world.bare, "show", f"main:{overlay(service)}/kustomization.yaml")
        assert DIGEST[service] in text, text
    # Every step synced in dependency order, the same commit for every app.
    for i in range(0, len(world.syncs), 2):
        (first, c1), (second, c2) = world.syncs[i], world.syncs[i + 1]
        assert (first, second) == ("fleet-planner", "api-gateway") and c1 == c2
    assert leases(world) == ""  # every lease given back
    record = record_of("fleet-v2")
    assert "# Release train fleet-v2: promoted" in record
    assert "fleet-planner → api-gateway" in record
    assert "| 50% | fleet-planner 50%, api-gateway 50% |" in record
    # The bundle smoke test ran once both were staged, and the record shows it.
    assert world.bundle_smoked == ["/v1/fleet/plan?robot=bundle-smoke"]
    assert "Bundle smoke test (staging): 1/1 passed" in record
    assert not world.quarantined


def test_a_regression_in_the_second_service_rolls_both_back_in_one_commit(world: World) -> None:
    world.failing = {"api-gateway"}
    before = {s: tree(world, s) for s in ORDER}
    head = world.log("-1", "--format=%H").strip()
    state = anyio.run(lambda: run_train("fleet-v3"))

    assert state.is_failed() and state.message.startswith("rolled back:"), state
    assert "api-gateway" in state.message
    subjects = world.log("--format=%s", f"{head}..").splitlines()[::-1]
    assert subjects[0] == "canary(production): train fleet-v3: fleet-planner=50 api-gateway=50"
    rollbacks = [s for s in subjects if s.startswith("rollback(production)")]
    assert len(rollbacks) == 1 and subjects[-1] == rollbacks[0], subjects
    assert "train fleet-v3 (api-gateway, fleet-planner), reverting 1 commit" in rollbacks[0]
    # The one restoring commit names every commit it undoes, and production is as before.
    body = world.log("-1", "--format=%b")
    step_commits = world.log("--format=%H", f"{head}..").split()[1:]
    assert sorted(
        line.removeprefix("Undoes: ") for line in body.splitlines() if line.startswith("Undoes: ")
    ) == sorted(commits_to_revert(step_commits, set()))
    assert {s: tree(world, s) for s in ORDER} == before
    # Rolled back in reverse dependency order; only the failing service is quarantined.
    restore = world.log("-1", "--format=%H").strip()
    assert [app for app, c in world.syncs if c == restore] == ["api-gateway", "fleet-planner"]
    assert world.quarantined == ["api-gateway"]
    assert leases(world) == ""
    record = record_of("fleet-v3")
    assert "rolled back" in record and "Failed: api-gateway" in record
    assert "Rollback commit (one, for every service)" in record


def test_a_service_failing_staging_ends_the_train_before_production(world: World) -> None:
    world.failing_staging = {"fleet-planner"}
    head = world.log("-1", "--format=%H").strip()
    state = anyio.run(lambda: run_train("fleet-v5"))

    assert state.is_failed() and state.name == "StagingFailed", state
    assert "fleet-planner: staging metrics" in str(state.message)
    assert world.staged == ["fleet-planner"]  # the gateway was never staged
    assert world.log("-1", "--format=%H").strip() == head and leases(world) == ""
    assert not world.syncs
    assert "staging failed, production untouched" in record_of("fleet-v5")


def test_a_failing_bundle_smoke_test_ends_the_train_before_its_approval(world: World) -> None:
    """Both services pass their own staging, but the gateway's call to the planner (the
    catalog's ``bundle_smoke``) answers 502: the train ends StagingFailed with the URL and
    status, before any approval, with nothing written to production."""
    world.bundle_smoke_status = 502
    head = world.log("-1", "--format=%H").strip()
    state = anyio.run(lambda: run_train("fleet-v5b"))

    assert state.is_failed() and state.name == "StagingFailed", state
    message = str(state.message)
    assert "bundle smoke test failed on staging: api-gateway: GET " in message, message
    assert "/v1/fleet/plan?robot=bundle-smoke (Host: api.robotics.local) → 502" in message
    assert world.staged == ORDER and world.bundle_smoked == ["/v1/fleet/plan?robot=bundle-smoke"]
    assert not world.forms  # no approval was asked for
    assert world.log("-1", "--format=%H").strip() == head and leases(world) == ""
    assert not world.syncs
    record = record_of("fleet-v5b")
    assert "staging failed, production untouched" in record
    assert "Bundle smoke test (staging): 0/1 passed" in record and "→ 502 FAILED" in record


def test_a_train_whose_service_production_already_runs_newer_is_refused_whole(
    world: World,
) -> None:
    """While the train waited for its approval (or a lock), a single release promoted a newer
    api-gateway: under its leases, before any production write, the whole train is refused
    (Superseded, naming the service) and gives its leases back; production untouched."""
    world.superseded = {"api-gateway"}
    head = world.log("-1", "--format=%H").strip()
    before = {s: tree(world, s) for s in ORDER}
    state = anyio.run(lambda: run_train("fleet-v5c"))

    assert state.is_failed() and state.name == "Superseded", state
    message = str(state.message)
    assert message.startswith("superseded, production untouched: api-gateway: "), message
    assert "the train releases nothing" in message, message
    assert world.forms, "refused after its approval, under its leases"
    assert world.log("-1", "--format=%H").strip() == head and leases(world) == ""
    assert {s: tree(world, s) for s in ORDER} == before
    assert not world.syncs and not world.quarantined
    assert "superseded, production untouched" in record_of("fleet-v5c")


def test_a_train_waits_for_a_single_release_and_takes_nothing_meanwhile(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single release of the gateway holds its production lease: the train, past staging
    and approval, waits (its state says for whom), holds none of its leases meanwhile, and
    goes on once the release is done."""
    from datetime import timedelta

    from flows import release_train as flow_module
    from tasks.gitops.train import TrainRepo
    from tests.integration.test_gitops import KUBECTL

    single = TrainRepo(url=f"file://{world.bare}", workdir=tmp_path / "single", kubectl=KUBECTL)
    single.take_lease("api-gateway-production", "release-9", timedelta(minutes=5))
    monkeypatch.setattr(flow_module, "LOCK_POLL_SECONDS", 0.2)
    waits: list[str | None] = []
    held_meanwhile: list[str] = []
    real = lifecycle_tasks.mark_waiting

    async def mark_waiting(message: str | None) -> None:
        waits.append(message)
        await real(message)
        if message:  # the train waits: nothing of it is taken; then the release ends
            held_meanwhile.extend(leases(world).split())
            await anyio.to_thread.run_sync(
                single.release_lease, "api-gateway-production", "release-9"
            )

    monkeypatch.setattr("tasks.lifecycle.mark_waiting", mark_waiting)
    state = anyio.run(lambda: run_train("fleet-v6"))

    assert state.is_completed() and state.name == "Promoted", state
    assert waits[0] is not None and "api-gateway-production is held by release-9" in waits[0]
    assert waits[-1] is None  # back to plain Running once every lease was taken
    assert held_meanwhile == ["refs/leases/api-gateway-production"]  # the single release's
    assert leases(world) == ""


def test_an_approved_train_in_a_freeze_is_not_released(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    catalog = tmp_path / "services.yaml"
    shipped = (Path(__file__).resolve().parents[2] / "services.yaml").read_text()
    catalog.write_text(
        shipped
        + "\nfreeze:\n  - reason: year-end freeze\n"
        + "    start: 2020-01-01T00:00:00Z\n    end: 2099-01-01T00:00:00Z\n"
    )
    monkeypatch.setenv("ROBOTICS_CD_CATALOG", str(catalog))
    head = world.log("-1", "--format=%H").strip()
    state = anyio.run(lambda: run_train("fleet-v7"))

    assert state.is_completed() and state.name == "Frozen", state
    assert "year-end freeze" in str(state.message)
    assert "year-end freeze" in world.forms[0]  # the one form said so before anyone approved
    assert world.log("-1", "--format=%H").strip() == head and leases(world) == ""
    assert not world.syncs


# --- a bundle file pushed to the manifests repo (what the webhook starts) ---------------------


@dataclass
class Found:
    digest: str
    revision: str


def push_bundle(world: World, tmp_path: Path, name: str, text: str) -> str:
    def write(clone: Path) -> None:
        (clone / "bundles").mkdir(exist_ok=True)
        (clone / "bundles" / f"{name}.yaml").write_text(text)

    return push_from_other_clone(tmp_path, f"file://{world.bare}", write).strip()


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The registry as the bundle's check sees it: every tag there, at its service's digest."""
    from tasks import handoff

    asked: list[str] = []

    async def lookup(registry: str, repository: str, tag: str) -> Found:
        asked.append(repository)
        service = repository.rsplit("/", 1)[-1]
        return Found(digest=DIGEST[service], revision="c" * 40)

    monkeypatch.setattr(handoff, "_lookup_in_registry", lookup)
    return asked


def run_bundle(path: str, sha: str) -> Any:
    from flows.release_train import release_train

    return release_train(bundle_file=path, manifests_sha=sha, return_state=True)


@full_matrix  # a third full canary (~15 s); CI keeps the refused bundle, which reads one too
def test_a_pushed_bundle_file_is_released_as_a_train(
    world: World, registry: list[str], tmp_path: Path
) -> None:
    text = (
        "reason: the planner's v2 API and the gateway that calls it\n"
        "services:\n"
        + "".join(f"  {s}: {REGISTRY}/{REPO[s]}:{TAG}\n" for s in ORDER)  # tags, no digests
    )
    sha = push_bundle(world, tmp_path, "fleet-v4", text)
    state = anyio.run(lambda: run_bundle("bundles/fleet-v4.yaml", sha))

    assert state.is_completed() and state.name == "Promoted", state
    assert sorted(registry) == sorted(REPO.values())  # every image pinned from the registry
    assert world.log("-1", "--format=%s").startswith("promote(production): train fleet-v4: ")
    for service in ORDER:  # production runs the digests the registry holds for the tags
        text = git(world.bare, "show", f"main:{overlay(service)}/kustomization.yaml")
        assert DIGEST[service] in text, text
    assert "the planner's v2 API" in record_of("fleet-v4")


def test_a_bundle_naming_an_unknown_service_is_refused_before_any_write(
    world: World, registry: list[str], tmp_path: Path
) -> None:
    sha = push_bundle(
        world, tmp_path, "bad", f"services:\n  ghost: {REGISTRY}/robotics-serving/ghost:{TAG}\n"
    )
    state = anyio.run(lambda: run_bundle("bundles/bad.yaml", sha))

    assert state.is_failed() and "ghost not in the catalog" in str(state.message), state
    assert world.log("-1", "--format=%H").strip() == sha  # nothing written after the push
    assert leases(world) == "" and not world.staged and not registry
