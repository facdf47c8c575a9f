"""The release flow on the sandbox, the production way: served deployments, real Argo CD twin
syncs, real containers, real Prometheus, approval through the Prefect API.

Images are built from real commits of the sandbox's robotics-api repo (docker build + push to
the sandbox registry, tagged by the seed's scheme; fixture ``build`` in conftest.py), then
handed to the ``release`` deployment as CI would. The canary policy is compact (steps
50 → 100, one analysis of a few seconds per step) through the catalog's environment overrides.

Every scenario runs on ingress-nginx; with ``ROBOTICS_CD_FULL_MATRIX=1`` the module runs again
with the service on the Gateway API (tests/e2e/routers.py). CI runs the Prefect server killed
mid-canary and DORA here; promote and rollback run in CI through the demo (ingress-nginx) and
tests/e2e/test_release_gateway.py (the Gateway API, with the token and quarantine checks).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict

import anyio
import pytest
from prefect.client.schemas.objects import Artifact, FlowRun, StateType

from core.kustomize import CanarySettings, parse_canary
from sandbox.procs import pid_alive, wait_until
from tests.e2e.releases import (
    OVERLAY,
    SERVICE,
    ArgvWatch,
    approve_run,
    cli,
    digest_of,
    events_named,
    is_final,
    is_paused,
    manifests_git,
    overlay_tree,
    production_images,
    release_approved,
    release_runs_since,
    served_releases,
    start_release,
    wait_run,
)
from tests.e2e.routers import ROUTERS, use_router
from tests.matrix import full_matrix

# On the scale-out Prefect server (PostgreSQL + Redis, two API servers behind a balancer):
# the demo replay (test_demo.py) and the other e2e modules keep the embedded SQLite one.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(900),
    pytest.mark.prefect_backend("postgres+redis"),
]

MODULE_START = datetime.now(UTC)


@pytest.fixture(scope="module", params=ROUTERS)
def env(
    request: pytest.FixtureRequest,
    env: dict[str, str],
    sandbox: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, str]]:
    """The sandbox env, with the service on each router of the matrix in turn."""

    extra, undo = use_router(sandbox, request.param, tmp_path_factory.mktemp("router"))
    os.environ.update(extra)
    try:
        yield {**env, **extra}
    finally:
        for key in extra:
            os.environ.pop(key, None)
        undo()


@pytest.fixture(scope="module")
def runner(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``robotics-cd serve`` of release and rollback, as the embedded default runs them."""
    with served_releases(env, tmp_path_factory.mktemp("release-runner")) as log:
        yield log


ROLLED_BACK: dict[str, str] = {}  # the image test_failing_canary_is_rolled_back rolled back


# --- scenarios (one service: they run in order) -------------------------------------------


@full_matrix  # CI: the demo promotes on ingress-nginx; test_release_gateway on the gateway
def test_good_image_is_promoted(sandbox, runner, env, build):
    # The manifests and service repos are reached over the twin's HTTP git with the token.
    assert env["ROBOTICS_CD_GIT_BASE"].startswith("http://"), env["ROBOTICS_CD_GIT_BASE"]
    image, sha = build({"www/release-e2e.txt": "good\n"}, "e2e: a good change")
    with ArgvWatch(sandbox.github_token) as watch:
        run = start_release(image, sha)
        approve_run(run, env)
        done = wait_run(run, is_final, timeout=420, what="release finished")
    # The token was in no process's argv, and is in no file under the work directory.
    assert watch.git_seen > 0 and watch.leaks == [], watch.leaks
    workspace = Path(env["ROBOTICS_CD_WORKSPACE"])
    leaked = subprocess.run(
        ["grep", "-rl", "--", sandbox.github_token, str(workspace)], capture_output=True, text=True
    )
    assert leaked.stdout == "", leaked.stdout

    assert done.state is not None
    assert done.state.type == StateType.COMPLETED and done.state.name == "Promoted", done.state
    kustomization = manifests_git(sandbox, "show", f"main:{OVERLAY}/kustomization.yaml")
    canary = manifests_git(sandbox, "show", f"main:{OVERLAY}/canary.yaml")
    stable_entry = kustomization.split("- name: api-gateway\n", 1)[1].split("- name:", 1)[0]
    assert digest_of(image) in stable_entry
    assert parse_canary(canary, SERVICE) == CanarySettings(replicas=0, weight=0)
    images = production_images(sandbox)
    assert digest_of(image) in images["api-gateway"][0]
    assert images["api-gateway-canary"][1] == 0
    staging = sandbox.app("api-gateway-staging")
    assert staging["status"]["health"]["status"] == "Healthy"


@full_matrix  # CI: the demo rolls back on ingress-nginx; test_release_gateway on the gateway
def test_failing_canary_is_rolled_back(sandbox, runner, env, build):
    before_tree = overlay_tree(sandbox)
    stable_before = production_images(sandbox)["api-gateway"][0]
    image, sha = build(
        {"config/fail_rate.production": "30\n"}, "e2e: /v1/status fails 30% in production"
    )
    run = start_release(image, sha)
    approve_run(run, env)
    done = wait_run(run, is_final, timeout=420, what="release finished")

    assert done.state is not None and done.state.message is not None, done.state
    assert done.state.type == StateType.FAILED, done.state
    assert done.state.message.startswith("rolled back:"), done.state.message
    rollback_sha = manifests_git(sandbox, "log", "-1", "--format=%H", "--", OVERLAY)
    ROLLED_BACK.update(image=image, sha=sha, rollback=rollback_sha)
    assert overlay_tree(sandbox) == before_tree  # the folder equals its pre-release tree
    log = manifests_git(sandbox, "log", "-3", "--format=%s%n%b", "--", OVERLAY)
    assert "rollback(production)" in log and "Undoes:" in log
    wait_until(
        lambda: production_images(sandbox)["api-gateway"][0] == stable_before,
        timeout=60,
        what="production back on the old image",
    )
    assert production_images(sandbox)["api-gateway-canary"][1] == 0
    # Rolled back at its first step (early abort or the failure limit), never advanced.
    # Counted in commits, not seconds: wall time on a shared machine says nothing of the rule.
    mine = manifests_git(
        sandbox, "log", "--format=%s", f"--grep={done.id}", "--", OVERLAY
    ).splitlines()
    canary_steps = [subject for subject in mine if subject.startswith("canary(production)")]
    assert len(canary_steps) == 1 and "weight=100" not in canary_steps[0], mine
    # Its digest is quarantined in git, naming the rollback commit.
    quarantine = manifests_git(sandbox, "show", f"main:quarantine/{SERVICE}.yaml")
    assert digest_of(image) in quarantine and rollback_sha in quarantine


@full_matrix
def test_a_rolled_back_digest_is_refused_until_lifted(sandbox, runner, env):
    if not ROLLED_BACK:
        pytest.skip("needs test_failing_canary_is_rolled_back's image")
    image, sha, rollback = ROLLED_BACK["image"], ROLLED_BACK["sha"], ROLLED_BACK["rollback"]
    head = manifests_git(sandbox, "rev-parse", "main")
    refused = wait_run(start_release(image, sha), is_final, timeout=120, what="release refused")
    assert refused.state is not None and refused.state.message is not None, refused.state
    assert refused.state.name == "Quarantined", refused.state
    assert rollback[:12] in refused.state.message and digest_of(image) in refused.state.message
    assert manifests_git(sandbox, "rev-parse", "main") == head  # refused before staging
    listed = cli("quarantine", "list", SERVICE, env=env)
    assert digest_of(image) in listed and rollback[:12] in listed

    cli(
        "quarantine",
        "lift",
        SERVICE,
        digest_of(image),
        "--reason",
        "e2e: fault injected",
        "--by",
        "alice",
        env=env,
    )
    lift = manifests_git(sandbox, "log", "-1", "--format=%an|%s%n%b", "--", "quarantine/")
    assert lift.startswith(f"alice|quarantine({SERVICE}): lift {digest_of(image)}")
    assert "e2e: fault injected" in lift
    assert digest_of(image) not in cli("quarantine", "list", SERVICE, env=env)
    accepted = start_release(image, sha)  # accepted: on to staging and the approval
    at = wait_run(
        accepted,
        lambda r: is_paused(r) or is_final(r),
        timeout=300,
        what="release of the lifted digest past the quarantine check",
    )
    assert at.state is not None
    assert at.state.name != "Quarantined" and "quarantined" not in (at.state.message or "")
    if is_paused(at):
        cli("reject", str(accepted.id), "--approver", "bob", "--comment", "e2e: enough", env=env)
        wait_run(accepted, is_final, timeout=120, what="release finished")


@full_matrix
def test_a_slower_canary_is_rolled_back_on_p99(sandbox, runner, env, build):
    before_tree = overlay_tree(sandbox)
    image, sha = build(
        {"config/status_delay_ms.production": "300\n"}, "e2e: +300 ms per request in production"
    )
    done = release_approved(image, sha, env)
    assert done.state is not None and done.state.message is not None, done.state
    assert done.state.type == StateType.FAILED, done.state
    assert done.state.message.startswith("rolled back:") and "p99" in done.state.message
    assert overlay_tree(sandbox) == before_tree


@full_matrix
def test_no_traffic_is_never_promoted(sandbox, runner, env, build):
    from sandbox.faults import FaultClient

    before_tree = overlay_tree(sandbox)
    image, sha = build({"www/release-e2e.txt": "nobody calls\n"}, "e2e: no traffic")
    run = start_release(image, sha)
    wait_run(run, is_paused, timeout=300, what="release waiting for approval")
    faults = FaultClient(sandbox.control_url)
    faults.stop_load(namespace="production")
    try:
        cli("approve", str(run.id), "--approver", "alice", env=env)
        done = wait_run(run, is_final, timeout=420, what="release finished")
    finally:
        faults.start_load(namespace="production")
        faults.close()
    assert done.state is not None and done.state.message is not None, done.state
    assert done.state.type == StateType.FAILED, done.state
    assert "inconclusive" in done.state.message, done.state.message
    assert overlay_tree(sandbox) == before_tree


@full_matrix
def test_reject_leaves_production_untouched(sandbox, runner, env, build):
    before_tree = overlay_tree(sandbox)
    image, sha = build({"www/release-e2e.txt": "rejected\n"}, "e2e: to be rejected")
    run = start_release(image, sha)
    wait_run(run, is_paused, timeout=300, what="release waiting for approval")
    said = cli("reject", str(run.id), "--approver", "bob", "--comment", "not today", env=env)
    assert said.startswith(f"rejected release {run.id}")
    done = wait_run(run, is_final, timeout=120, what="release finished")
    assert done.state is not None and done.state.message is not None, done.state
    assert done.state.name == "Rejected" and "rejected by bob" in done.state.message
    assert overlay_tree(sandbox) == before_tree


@full_matrix
def test_a_rerun_makes_no_new_commit_and_no_new_sync(sandbox, runner, env, build):
    image, sha = build({"www/release-e2e.txt": "rerun\n"}, "e2e: released twice")
    first = start_release(image, sha)
    wait_run(first, is_paused, timeout=300, what="first release waiting for approval")
    cli("reject", str(first.id), "--approver", "bob", env=env)
    wait_run(first, is_final, timeout=120, what="first release finished")
    head = manifests_git(sandbox, "rev-parse", "main")
    last_sync = _last_sync(sandbox)

    again = start_release(image, sha)  # the same parameters, a new run from the top
    wait_run(again, is_paused, timeout=300, what="second release waiting for approval")
    assert manifests_git(sandbox, "rev-parse", "main") == head  # no new commit
    assert _last_sync(sandbox) == last_sync  # no new sync
    cli("reject", str(again.id), "--approver", "bob", env=env)
    wait_run(again, is_final, timeout=120, what="second release finished")


def _last_sync(sandbox) -> tuple[object, object]:
    status = sandbox.app("api-gateway-staging")["status"]
    history = status.get("history") or [{}]
    return history[-1].get("id"), (status.get("operationState") or {}).get("startedAt")


@full_matrix
def test_expired_approval_ends_rejected_timed_out(sandbox, runner, env, build, monkeypatch):
    from flows.release import expire_approvals

    before_tree = overlay_tree(sandbox)
    image, sha = build({"www/release-e2e.txt": "expires\n"}, "e2e: nobody decides")
    run = start_release(image, sha)
    wait_run(run, is_paused, timeout=300, what="release waiting for approval")
    monkeypatch.setenv("ROBOTICS_CD_APPROVAL_TIMEOUT", "1s")
    time.sleep(1.5)  # older than the 1 s limit, whatever the clocks' rounding
    expired = anyio.run(expire_approvals)
    assert str(run.id) in expired
    done = wait_run(run, is_final, timeout=120, what="release finished")
    assert done.state is not None
    assert done.state.name == "Rejected" and done.state.message == "rejected: timed out"
    assert overlay_tree(sandbox) == before_tree


@full_matrix
def test_an_older_commit_is_refused_as_superseded(sandbox, runner, env, build):
    old_image, old_sha = build({"www/release-e2e.txt": "older\n"}, "e2e: older")
    new_image, new_sha = build({"www/release-e2e.txt": "newer\n"}, "e2e: newer")
    promoted = release_approved(new_image, new_sha, env)
    assert promoted.state is not None
    assert promoted.state.name == "Promoted", promoted.state
    before_tree = overlay_tree(sandbox)
    # Issue #16: staging already runs the newer commit, so the older release is refused at
    # staging, before any approval is asked for, and writes nothing anywhere.
    done = wait_run(
        start_release(old_image, old_sha), is_final, timeout=420, what="older release ended"
    )
    assert done.state is not None and done.state.message is not None, done.state
    assert done.state.name == "Superseded", done.state
    assert new_sha[:12] in done.state.message and "writes nothing" in done.state.message
    assert overlay_tree(sandbox) == before_tree


@full_matrix
def test_a_second_release_waits_for_the_lock(sandbox, runner, env, build):
    from tasks import gitops

    image, sha = build({"www/release-e2e.txt": "waits\n"}, "e2e: waits for the lock")
    holder = f"other-release-{uuid.uuid4().hex[:6]}"
    gitops.take_lease.fn(SERVICE, "production", holder=holder, ttl=600)
    try:
        run = start_release(image, sha)
        approve_run(run, env)
        waiting = wait_run(
            run,
            lambda r: bool(r.state and r.state.name == "AwaitingLock"),
            timeout=180,
            what="release waiting on the lock",
        )
        assert waiting.state is not None
        assert holder in (waiting.state.message or "")
        status = cli("status", SERVICE, env=env)
        assert holder in status
    finally:
        gitops.release_lease.fn(SERVICE, "production", holder=holder)
    done = wait_run(run, is_final, timeout=420, what="release finished after the lock")
    assert done.state is not None
    assert done.state.name == "Promoted", done.state


@full_matrix
def test_operators_can_promote_now_or_abort(sandbox, runner, env, build):
    """`robotics-cd promote RUN --now` skips the remaining steps (reason recorded);
    `robotics-cd abort RUN` rolls back at its next check. Both reach the run as flow run
    inputs; the compact canary leaves about 25 s between the first canary commit and the end."""
    image, sha = build({"www/release-e2e.txt": "promote now\n"}, "e2e: promoted by hand")
    run = start_release(image, sha)
    approve_run(run, env)
    _wait_canary_commit(sandbox, str(run.id))
    cli(
        "promote",
        str(run.id),
        "--now",
        "--operator",
        "alice",
        "--reason",
        "hotfix, metrics look fine",
        env=env,
    )
    done = wait_run(run, is_final, timeout=300, what="release promoted by hand")
    assert done.state is not None
    assert done.state.name == "Promoted", done.state
    subject = manifests_git(sandbox, "log", "-1", "--format=%s", "--", OVERLAY)
    assert subject.startswith("promote(production)")
    record = _latest_release_record()
    assert "hotfix, metrics look fine" in record and "alice" in record

    before_tree = overlay_tree(sandbox)
    image, sha = build({"www/release-e2e.txt": "abort\n"}, "e2e: aborted by hand")
    run = start_release(image, sha)
    approve_run(run, env)
    _wait_canary_commit(sandbox, str(run.id))
    cli("abort", str(run.id), "--operator", "bob", "--reason", "wrong build", env=env)
    done = wait_run(run, is_final, timeout=300, what="release aborted")
    assert done.state is not None and done.state.message is not None, done.state
    assert done.state.type == StateType.FAILED and "aborted by bob" in done.state.message
    assert "wrong build" in done.state.message
    assert overlay_tree(sandbox) == before_tree


def test_a_prefect_server_killed_mid_canary_loses_nothing(
    sandbox, runner, env, build, prefect_for_module
):
    """SIGKILL of the Prefect server that runs the loop services (triggers, event persister,
    task-run recorder), in the middle of a canary, then a restart: the release goes on
    through the other server, ends Promoted, its record (states, task runs, events, the
    release record's commits) is whole, and no automation fires on it (no Crashed state, no
    rollback run) even after the zombie automation's silence limit has passed."""
    from prefect.client.schemas.objects import StateType as ST

    from sandbox import prefect_server
    from tests.e2e.releases import read_run, state_of

    home = prefect_for_module.home
    servers = prefect_server._stack(home).get("servers", {})
    victim = "services" if "services" in servers else "server"
    image, sha = build({"www/release-e2e.txt": "server restart\n"}, "e2e: Prefect restarts")
    run = start_release(image, sha)
    approve_run(run, env)
    _wait_canary_commit(sandbox, str(run.id))
    killed_at = datetime.now(UTC)
    pid = prefect_server.part_pid(home, victim)
    assert pid is not None, f"no pid of the Prefect {victim} to kill"
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: _reaped(pid), timeout=30, what=f"Prefect {victim} gone")
    prefect_server.start_part(home, victim, timeout=300)
    restarted = time.monotonic()
    restarted_at = datetime.now(UTC)

    done = wait_run(run, is_final, timeout=420, what="release finished after the restart")
    assert done.state is not None
    assert done.state.type == ST.COMPLETED and done.state.name == "Promoted", done.state

    record = anyio.run(_run_record, run.id, killed_at, restarted_at)
    assert not record["bad_states"], record["bad_states"]
    assert record["task_runs"] and not record["unfinished_tasks"], record["unfinished_tasks"]
    assert record["outage_events"], "no event of the run from the outage was persisted"
    ours = manifests_git(sandbox, "log", "--format=%H", f"--grep={run.id}", "--", OVERLAY).split()
    assert ours and all(c[:7] in record["release_record"] for c in ours), (ours, record)

    # The zombie automation expects a heartbeat (every 30 s) within its limit: wait past it,
    # measured from the restart, and the run must still be Promoted with no rollback run.
    zombie_after = float(env.get("ROBOTICS_CD_ZOMBIE_AFTER_SECONDS", "90"))
    while time.monotonic() < restarted + zombie_after + 15:
        time.sleep(5)
        assert state_of(read_run(run.id)).name == "Promoted"
    record = anyio.run(_run_record, run.id, killed_at, restarted_at)
    assert not record["bad_states"], record["bad_states"]
    assert not record["rollback_runs"], record["rollback_runs"]


def _reaped(pid: int) -> bool:
    """Gone, and reaped if it was our child (the fixture started it: a zombie is alive to
    ``kill(pid, 0)``)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return not pid_alive(pid)


class RunRecord(TypedDict):
    bad_states: list[str | None]
    task_runs: int
    unfinished_tasks: list[tuple[str, str | None]]
    outage_events: list[str]
    release_record: str
    rollback_runs: list[uuid.UUID]


async def _run_record(run_id, since, until) -> RunRecord:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventOccurredFilter

    async with get_client() as client:
        states = await client.read_flow_run_states(run_id)
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
        rollbacks = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["rollback"]))
        )
        response = await client._client.post(
            "/events/filter",
            json={
                "filter": EventFilter(
                    occurred=EventOccurredFilter(since=since, until=until),
                    any_resource=EventAnyResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
                ).model_dump(mode="json"),
                "limit": 50,
            },
        )
        response.raise_for_status()
    return {
        "bad_states": [s.name for s in states if s.type.value in ("CRASHED", "FAILED")],
        "task_runs": len(task_runs),
        "unfinished_tasks": [
            (t.name, t.state.name if t.state else None)
            for t in task_runs
            if t.state is None or not t.state.is_final()
        ],
        "outage_events": [e["event"] for e in response.json()["events"]],
        "release_record": "\n".join(str(a.data) for a in artifacts),
        "rollback_runs": [
            r.id
            for r in rollbacks
            if str(run_id) in {str(v) for v in (r.parameters or {}).values()}
        ],
    }


def _created(artifact: Artifact) -> datetime:
    assert artifact.created is not None  # the server stamps every artifact it stores
    return artifact.created


def _latest_release_record() -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read() -> str:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"release-{SERVICE}"]))
            )
        latest = max(found, key=_created)
        return str(latest.data)

    return anyio.run(read)


def _wait_canary_commit(sandbox, run_id: str) -> None:
    wait_until(
        lambda: run_id in manifests_git(sandbox, "log", "-3", "--format=%b", "--", OVERLAY),
        timeout=300,
        what="the release's first canary commit",
    )


def _duration(run: FlowRun) -> float:
    assert run.start_time is not None and run.end_time is not None, run  # a run that ended
    return (run.end_time - run.start_time).total_seconds()


def test_dora_counts_the_releases_that_happened(sandbox, runner, env):
    """`robotics-cd dora` over this module's window: every release that reached production
    is there, promoted or failed as Prefect saw it end; rejected and superseded ones are not."""
    runs = [r for r in release_runs_since(MODULE_START) if r.parameters.get("service") == SERVICE]
    runs = [r for r in runs if r.state and r.state.is_final()]
    expected = {}
    for run in runs:
        assert run.state is not None
        if run.state.name == "Promoted":
            expected[str(run.id)] = "promoted"
        elif (run.state.message or "").startswith("rolled back:"):
            expected[str(run.id)] = "failed"
    out = cli("dora", "--service", SERVICE, "--since", MODULE_START.isoformat(), "--json", env=env)
    report = json.loads(out)
    seen = {r["release_id"]: r["status"] for r in report["releases"]}
    assert seen == expected
    promoted = sum(1 for v in expected.values() if v == "promoted")
    failed = len(expected) - promoted
    assert (report["deployments"], report["promoted"], report["failed"]) == (
        len(expected),
        promoted,
        failed,
    )
    assert report["in_progress"] == []
    assert report["lead_time"]["count"] >= promoted  # each ships at least its own commit
    assert report["recovery_time"]["count"] == failed
    durations = {str(r.id): _duration(r) for r in runs}
    for release in report["releases"]:
        if release["status"] == "failed":
            recovery = (
                datetime.fromisoformat(release["failed_at"])
                - datetime.fromisoformat(release["deployed_at"])
            ).total_seconds()
            assert 0 < recovery < durations[release["release_id"]]
    ordered = sorted(report["releases"], key=lambda r: r["deployed_at"])
    for before, after in itertools.pairwise(ordered):
        assert after["rework"] == (before["status"] == "failed")
    if expected:
        text = cli("dora", "--service", SERVICE, "--since", MODULE_START.isoformat(), env=env)
        assert f"deployments                      {len(expected)} " in text


@full_matrix
def test_no_automation_action_failed_after_rejected_and_promoted_releases(sandbox, runner, env):
    """The zombie automation counts any event of a run as a sign of life, so runs that ended
    in a custom-named state (Rejected, Promoted, Superseded ...) are not "marked Crashed"
    after they ended (which the server refuses: `action.failed ... terminal state`).

    Runs last in this module: its releases above ended Rejected and Promoted; the window
    checked is the zombie window after the last of them, mostly spent by the tests above."""
    from deployments.register import ZOMBIE_AFTER

    ended = [
        r
        for r in release_runs_since(MODULE_START)
        if r.state and r.state.name in ("Rejected", "Promoted")
    ]
    assert {r.state.name for r in ended if r.state} == {"Rejected", "Promoted"}
    last = max(r.state.timestamp for r in ended if r.state)
    settled = last + ZOMBIE_AFTER + timedelta(seconds=20)
    wait_until(
        lambda: datetime.now(UTC) > settled,
        timeout=ZOMBIE_AFTER.total_seconds() + 60,
        what="the zombie window after the last release",
    )
    failed = events_named("prefect.automation.action.failed", MODULE_START)
    assert failed == [], [(e.resource.get("prefect.resource.name"), e.payload) for e in failed]
