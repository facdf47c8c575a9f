"""The release train on the sandbox (issue 22, "must be shown"): api-gateway and fleet-planner
released as one through the served ``release-train`` deployment, on the real Argo CD twin,
real containers and real Prometheus, approved with ``robotics-cd approve`` by one approver of each service.

- Both good: promoted, with exactly one promotion commit covering both production overlays;
  production runs both new images, both canaries at 0.
- fleet-planner (the second service on the command line) regressed in production only: both
  rolled back in ONE restoring commit naming every commit of the train it undoes; production
  runs both old images, both overlays equal their trees from before the train.
- A train and a single release of the same api-gateway build, started together: the single
  release waits for the train (``AwaitingLock``, its state message and its log naming the
  train), never both in production; the train promotes the build, the single ends Superseded.
- A dependency cycle in the catalog, or a service not in it, given to
  ``robotics-cd train-release``: refused (exit 2), no ref, commit or flow run written.

The promoted train also runs the bundle smoke test (services.yaml: api-gateway's
``bundle_smoke``, the gateway's endpoint that calls fleet-planner) on staging.

Judged from the Prefect API (the run's final state, the train's record), git (the manifests
repo's history and trees) and the cluster. The images are built here (``build``,
``build_fleet``), not by a CI run, so the run carries ``provenance_override_reason`` as the
single-release e2e does; otherwise it is started as ``robotics-cd train-release`` starts it
(``tasks.handoff.train_parameters``: catalog, cycle, each image's digest in the registry).

The compact policy: the env's ``FAST`` (6 s interval, 6 s watch); fleet-planner keeps its two
analyses per step, so the train's own steps 50 → 100 take two windows each.

Full matrix only (``ROBOTICS_CD_FULL_MATRIX=1``): three trains, about fifteen minutes with
the builds; CI has no minutes left. docs/e2e-matrix.md has the command and the recorded result.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from prefect import get_client
from prefect.client.schemas.objects import Artifact, FlowRun, StateType

from core.kustomize import CanarySettings, parse_canary
from sandbox.procs import wait_until
from tests.e2e.releases import (
    CLI,
    ROOT,
    cli,
    digest_of,
    is_final,
    is_paused,
    manifests_git,
    production_images,
    read_run,
    served_releases,
    start_release,
    wait_run,
)
from tests.e2e.routers import live_weights
from tests.matrix import full_matrix

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500), full_matrix]

ORDER = ["fleet-planner", "api-gateway"]  # the gateway depends on the planner (services.yaml)
STEPS = [50, 100]  # the train's own steps (fleet-planner's 20 is below the gateway's first)
OVERRIDE = "e2e: images built by the test, not by ci"


def overlay(service: str) -> str:
    return f"serving/{service}/overlays/production"


@pytest.fixture(scope="module")
def runner(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``robotics-cd serve`` of release, rollback and release-train."""
    logs = tmp_path_factory.mktemp("train-runner")
    with served_releases(env, logs, also=("release-train",)) as log:
        yield log


def start_train(name: str, images: dict[str, tuple[str, str]]) -> FlowRun:
    """What ``robotics-cd train-release --steps 50,100`` does (the checks, then a run of the
    release-train deployment), with the provenance override for test-built images."""
    from core.settings import get_settings
    from core.train import Bundle, BundleService
    from tasks.handoff import create_deployment_run, train_parameters

    bundle = Bundle(
        name=name,
        services={s: BundleService(image=i, source_sha=sha) for s, (i, sha) in images.items()},
        reason="e2e: the planner and the gateway that calls it",
        steps=STEPS,
    )

    async def go() -> FlowRun:
        plan, parameters = await train_parameters(bundle)
        assert plan.order == ORDER, plan.order  # dependency order, whatever the given order
        async with get_client() as client:
            run, created = await create_deployment_run(
                client,
                get_settings().release_train_deployment,
                parameters={**parameters, "provenance_override_reason": OVERRIDE},
                idempotency_key=f"release-train-{name}",
                tags=["train", f"train:{name}"],
            )
        assert created
        result: FlowRun = run
        return result

    return anyio.run(go)


def run_train(
    name: str, images: dict[str, tuple[str, str]], approvers: list[str], env: Any
) -> FlowRun:
    """Start the train; one approver of each service approves it, one after the other (the
    bundle's approval needs an approver of every service)."""
    run = start_train(name, images)
    for count, approver in enumerate(approvers):
        wait_run(
            run,
            lambda r, n=count: is_paused(r) and f"{n} of " in (r.state.message or ""),  # type: ignore[misc]
            timeout=900,
            what=f"train {name} waiting for approval {count + 1}",
        )
        out = cli("approve", str(run.id), "--approver", approver, "--comment", "e2e", env=env)
        assert out.startswith(f"approved release train {run.id}"), out
    return wait_run(run, is_final, timeout=900, what=f"train {name} finished")


def train_commits(sandbox: Any, base: str, name: str) -> list[tuple[str, str]]:
    """(sha, subject) of the train's production commits (steps, promotion, rollback) on the
    manifests branch after ``base``, oldest first."""
    out = manifests_git(sandbox, "log", "--reverse", "--format=%H %s", f"{base}..main")
    kinds = ("canary(production)", "promote(production)", "rollback(production)")
    return [
        (line[:40], line[41:])
        for line in out.splitlines()
        if line[41:].startswith(kinds) and f" train {name}" in line
    ]


def touched(sandbox: Any, sha: str) -> set[str]:
    """The production overlays a commit changes."""
    files = manifests_git(sandbox, "show", "--name-only", "--format=", sha).split()
    return {s for s in ORDER for f in files if f.startswith(overlay(s) + "/")}


def tree(sandbox: Any, service: str) -> str:
    return manifests_git(sandbox, "rev-parse", f"main:{overlay(service)}")


def canary_in_git(sandbox: Any, service: str) -> CanarySettings:
    return parse_canary(
        manifests_git(sandbox, "show", f"main:{overlay(service)}/canary.yaml"), service
    )


def record_of(name: str) -> str:
    """The train's one record (markdown), '' when none."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read() -> str:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"train-{name}"]))
            )
        return str(sorted(found, key=created_at)[-1].data) if found else ""

    return anyio.run(read)


def created_at(artifact: Artifact) -> datetime:
    assert artifact.created is not None  # the server stamps every artifact it stores
    return artifact.created


def running(sandbox: Any, images: dict[str, str]) -> bool:
    """Production's stable Deployments run exactly these images (by digest), canaries at 0."""
    now = production_images(sandbox)
    return all(
        digest_of(image) in now[s][0] and now[f"{s}-canary"][1] == 0 for s, image in images.items()
    )


def test_two_services_released_together_are_promoted_in_one_commit(
    sandbox: Any, runner: Path, env: dict[str, str], build: Any, build_fleet: Any
) -> None:
    name = f"e2e-promote-{uuid.uuid4().hex[:6]}"
    images = {
        "api-gateway": build({"www/train-e2e.txt": "good\n"}, f"e2e: {name}: gateway"),
        "fleet-planner": build_fleet({"app/train-e2e.txt": "good\n"}, f"e2e: {name}: planner"),
    }
    head = manifests_git(sandbox, "rev-parse", "main")
    started = time.monotonic()
    done = run_train(name, images, ["alice", "carol"], env)  # one approver of each service
    took = time.monotonic() - started

    assert done.state is not None
    assert done.state.type == StateType.COMPLETED and done.state.name == "Promoted", done.state
    mine = train_commits(sandbox, head, name)
    promotions = [(sha, s) for sha, s in mine if s.startswith("promote(production)")]
    assert len(promotions) == 1, mine
    assert touched(sandbox, promotions[0][0]) == set(ORDER), promotions
    assert not [s for _, s in mine if s.startswith("rollback(production)")], mine
    # Every train step is one commit covering both overlays; the promotion is the last.
    for sha, subject in mine:
        assert touched(sandbox, sha) == set(ORDER), subject
    assert mine[-1] == promotions[0], mine
    for service, (image, _) in images.items():
        kustomization = manifests_git(
            sandbox, "show", f"main:{overlay(service)}/kustomization.yaml"
        )
        assert digest_of(image) in kustomization, kustomization
        assert canary_in_git(sandbox, service) == CanarySettings(replicas=0, weight=0)
    wait_until(
        lambda: running(sandbox, {s: i for s, (i, _) in images.items()}),
        timeout=120,
        what="production on both new images, both canaries at 0 replicas",
    )
    assert live_weights(sandbox, "fleet-planner") == {
        "fleet-planner": 100,
        "fleet-planner-canary": 0,
    }
    record = record_of(name)
    assert f"# Release train {name}: promoted" in record, record
    assert "fleet-planner → api-gateway" in record, record
    # The bundle smoke test (services.yaml: api-gateway's bundle_smoke) ran on staging once
    # both were there: the gateway's endpoint that calls fleet-planner answered 200.
    assert "Bundle smoke test (staging): 1/1 passed" in record, record
    smoked = [ln for ln in record.splitlines() if "/v1/fleet/plan?robot=bundle-smoke" in ln]
    assert smoked and "→ 200 ok" in smoked[0], record
    print(
        f"\nRESULT promote: {done.state.type.value}/{done.state.name}: {done.state.message} "
        f"(train {took:.0f} s, builds not counted)"
    )
    for sha, subject in mine:
        print(f"  {sha[:12]} {subject}")
    print(f"  bundle smoke:{smoked[0]}")


def test_a_regression_in_the_second_service_rolls_both_back_in_one_commit(
    sandbox: Any, runner: Path, env: dict[str, str], build: Any, build_fleet: Any
) -> None:
    name = f"e2e-rollback-{uuid.uuid4().hex[:6]}"
    before = {s: tree(sandbox, s) for s in ORDER}
    stable = {s: production_images(sandbox)[s][0] for s in ORDER}
    images = {
        "api-gateway": build({"www/train-e2e.txt": "good again\n"}, f"e2e: {name}: gateway"),
        # 40 % of planned tasks fail, in production only: still HTTP 200, same latency.
        "fleet-planner": build_fleet(
            {"config/task_fail_percent.production": "40\n"}, f"e2e: {name}: planner regressed"
        ),
    }
    head = manifests_git(sandbox, "rev-parse", "main")
    started = time.monotonic()
    done = run_train(name, images, ["carol", "alice"], env)  # one approver of each service
    took = time.monotonic() - started

    assert done.state is not None
    message = done.state.message or ""
    assert done.state.type == StateType.FAILED, done.state
    assert message.startswith("rolled back:") and "fleet-planner" in message, message
    mine = train_commits(sandbox, head, name)
    rollbacks = [(sha, s) for sha, s in mine if s.startswith("rollback(production)")]
    production = [sha for sha, s in mine if not s.startswith("rollback(production)")]
    assert len(rollbacks) == 1 and mine[-1] == rollbacks[0], mine
    assert production and not [s for _, s in mine if s.startswith("promote(")], mine
    rollback_sha, subject = rollbacks[0]
    assert f"train {name} (api-gateway, fleet-planner)" in subject, subject  # reverse order
    assert touched(sandbox, rollback_sha) == set(ORDER), subject
    body = manifests_git(sandbox, "log", "-1", "--format=%b", rollback_sha)
    undone = [ln.removeprefix("Undoes: ") for ln in body.splitlines() if ln.startswith("Undoes: ")]
    assert sorted(undone) == sorted(production), body  # every commit of the train, named
    # Both overlays as before the train; production on both old images, canaries at 0.
    assert {s: tree(sandbox, s) for s in ORDER} == before
    for service in ORDER:
        assert canary_in_git(sandbox, service) == CanarySettings(replicas=0, weight=0)
    wait_until(
        lambda: (
            {s: production_images(sandbox)[s][0] for s in ORDER} == stable
            and all(production_images(sandbox)[f"{s}-canary"][1] == 0 for s in ORDER)
        ),
        timeout=120,
        what="production back on both old images, both canaries at 0 replicas",
    )
    assert live_weights(sandbox, "fleet-planner") == {
        "fleet-planner": 100,
        "fleet-planner-canary": 0,
    }
    # Only the service that failed carries the blame: its digest is quarantined, not the other.
    quarantine = manifests_git(sandbox, "show", "main:quarantine/fleet-planner.yaml")
    assert digest_of(images["fleet-planner"][0]) in quarantine, quarantine
    listed = manifests_git(sandbox, "ls-tree", "--name-only", "main", "quarantine/")
    if "quarantine/api-gateway.yaml" in listed.split():
        gateway = manifests_git(sandbox, "show", "main:quarantine/api-gateway.yaml")
        assert digest_of(images["api-gateway"][0]) not in gateway, gateway
    record = record_of(name)
    assert "Failed: fleet-planner" in record and "Rollback commit (one" in record, record
    print(
        f"\nRESULT rollback: {done.state.type.value}/{done.state.name}: {message[:400]} "
        f"(train {took:.0f} s, builds not counted)"
    )
    for sha, subject in mine:
        print(f"  {sha[:12]} {subject}")
    print(f"  undoes: {', '.join(u[:12] for u in undone)}")


def lease_refs(sandbox: Any) -> str:
    """Every ref of the manifests remote (the branch and each lease), with its commit."""
    return manifests_git(sandbox, "for-each-ref", "--format=%(refname) %(objectname)")


def run_logs(run_id: Any) -> list[str]:
    """The run's latest log lines on the Prefect server (newest first, 200 at most)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    async def read() -> list[str]:
        async with get_client() as client:
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                limit=200,
                sort=LogSort.TIMESTAMP_DESC,
            )
        return [log.message for log in logs]

    return anyio.run(read)


def test_a_train_and_a_single_release_of_its_service_never_both_reach_production(
    sandbox: Any, runner: Path, env: dict[str, str], build: Any, build_fleet: Any
) -> None:
    """Started together: a train (fleet-planner + api-gateway) and a single release of the
    same api-gateway build. The train is approved first and takes both leases; the single
    release, approved while the train is in production, waits for it, and its state and its
    log name the train; it never writes to production while the train holds it. When the
    train has promoted that build, the single release has nothing left to do: Superseded,
    production untouched by it. (The same build, so that neither is refused at staging as
    older than the other: staging follows commit order, issue 16.)"""
    name = f"e2e-lock-{uuid.uuid4().hex[:6]}"
    images = {
        "api-gateway": build({"www/train-e2e.txt": "with a single release\n"}, f"e2e: {name}"),
        "fleet-planner": build_fleet({"app/train-e2e.txt": "lock\n"}, f"e2e: {name}: planner"),
    }
    head = manifests_git(sandbox, "rev-parse", "main")
    started = time.monotonic()
    train = start_train(name, images)
    single = start_release(*images["api-gateway"])  # the same build, released alone
    for count, approver in enumerate(["alice", "carol"]):
        wait_run(
            train,
            lambda r, n=count: is_paused(r) and f"{n} of " in (r.state.message or ""),  # type: ignore[misc]
            timeout=900,
            what=f"train {name} waiting for approval {count + 1}",
        )
        cli("approve", str(train.id), "--approver", approver, "--comment", "e2e", env=env)
    wait_run(single, is_paused, timeout=600, what="the single release waiting for approval")
    # The train holds production (its first step is in git) before the single is approved.
    wait_until(
        lambda: bool(train_commits(sandbox, head, name)),
        timeout=600,
        what=f"train {name}'s first production commit",
    )
    cli("approve", str(single.id), "--approver", "bob", "--comment", "e2e", env=env)
    waiting = wait_run(
        single,
        lambda r: bool(r.state and r.state.name == "AwaitingLock"),
        timeout=180,
        what="the single release waiting for the production lock",
    )
    assert waiting.state is not None
    said = waiting.state.message or ""
    assert f"held by release train {name} (run {train.id}; " in said, said
    assert "api-gateway" in said and "fleet-planner" in said, said
    assert not is_final(read_run(train.id)), "the train must still hold production"

    # Its log says it too (the runner sends log lines in batches: wait for the line).
    def waiting_lines() -> list[str]:
        return [m for m in run_logs(single.id) if f"release train {name}" in m]

    wait_until(
        lambda: bool(waiting_lines()),
        timeout=60,
        what=f"the single release's log line naming train {name}",
    )
    logged = waiting_lines()
    status = cli("status", "api-gateway", env=env)  # what an operator asks
    assert f"lock held by release train {name} (run {train.id}; " in status, status

    done = wait_run(train, is_final, timeout=900, what=f"train {name} finished")
    other = wait_run(single, is_final, timeout=600, what="the single release finished")
    took = time.monotonic() - started
    assert done.state is not None and other.state is not None
    assert done.state.name == "Promoted", done.state
    assert other.state.name == "Superseded", other.state
    # Never both: every production commit since the start is the train's.
    changed = manifests_git(
        sandbox, "log", "--format=%H %s", f"{head}..main", "--", overlay("api-gateway")
    ).splitlines()
    foreign = [ln for ln in changed if f" train {name}" not in ln]
    assert not foreign, changed
    held = [ln for ln in lease_refs(sandbox).splitlines() if ln.startswith("refs/leases/")]
    assert not [ln for ln in held if "-production " in ln], held  # every lease given back
    print(
        f"\nRESULT lock: train {done.state.name}: {done.state.message}; single release "
        f"waited ({said[:200]}) then {other.state.name}: {(other.state.message or '')[:200]} "
        f"(both {took:.0f} s, builds not counted)"
    )
    print(f"  log line: {logged[0][:200]}")


def test_a_dependency_cycle_or_an_unknown_service_is_refused_before_any_write(
    sandbox: Any, env: dict[str, str], tmp_path: Path
) -> None:
    """``robotics-cd train-release`` against the running sandbox, with images that are in
    its registry: a catalog whose depends_on has a cycle, and a service the catalog does not
    have, are each refused (exit 2, the reason on stderr) with no commit or ref on the
    manifests remote and no flow run on the Prefect server."""
    from datetime import UTC, datetime, timedelta

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterExpectedStartTime

    text = (ROOT / "services.yaml").read_text()
    cyclic = text.replace(
        "    approvers: [carol, dave]\n",
        "    approvers: [carol, dave]\n    depends_on: [api-gateway]\n",
    )
    assert cyclic != text
    (tmp_path / "services.yaml").write_text(cyclic)
    running = production_images(sandbox)
    given = [f"--service={s}={running[s][0]}" for s in ORDER]

    def train_release(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLI, "train-release", *args, "--reason", "e2e: refused"],
            env={**os.environ, **env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )

    async def runs_since(since: datetime) -> list[FlowRun]:
        """Every flow run created (to start now or later) since ``since``."""
        async with get_client() as client:
            found: list[FlowRun] = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    expected_start_time=FlowRunFilterExpectedStartTime(after_=since)
                )
            )
        return found

    refs = lease_refs(sandbox)
    since = datetime.now(UTC) - timedelta(seconds=1)
    started = time.monotonic()
    cycle = train_release(*given, ROBOTICS_CD_CATALOG=str(tmp_path / "services.yaml"))
    unknown = train_release(*given, f"--service=ghost={running['api-gateway'][0]}")
    took = time.monotonic() - started

    assert cycle.returncode == 2, cycle.stdout + cycle.stderr
    assert "dependency cycle in depends_on: " in cycle.stderr, cycle.stderr
    assert "api-gateway -> fleet-planner -> api-gateway" in cycle.stderr or (
        "fleet-planner -> api-gateway -> fleet-planner" in cycle.stderr
    ), cycle.stderr
    assert unknown.returncode == 2, unknown.stdout + unknown.stderr
    assert "ghost not in the catalog" in unknown.stderr, unknown.stderr
    assert "nothing written" in unknown.stderr, unknown.stderr
    assert "started" not in cycle.stdout + unknown.stdout
    # No write anywhere: the manifests remote's refs (main and every lease) as they were,
    # and no flow run on the Prefect server.
    assert lease_refs(sandbox) == refs
    created = anyio.run(runs_since, since)
    assert not created, [(r.name, r.flow_id, r.created) for r in created]
    print(
        f"\nRESULT refused: cycle: {cycle.stderr.strip()}; unknown: {unknown.stderr.strip()} "
        f"({took:.1f} s for both)"
    )
