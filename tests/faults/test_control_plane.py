"""Outside systems fail during a canary; the release restores production itself.

- Argo CD answers 503 past the client's retries: the canary step fails, the restore's own
  syncs are refused too and retried with backoff; when Argo CD is back, the restore is
  verified and the release ends rolled back.
- Argo CD never comes back within the rollback deadline: the release ends RollbackFailed,
  the lease is blocked (no release may take production), ``status`` says BLOCKED; once Argo
  CD is back, ``robotics-cd lease clear`` unblocks it and the reconciler restores.
- Argo CD answers malformed JSON (a failure that is not one of ours): restored as well.

Full matrix only (``ROBOTICS_CD_FULL_MATRIX=1``), beside the 503 case above:
- Argo CD hangs (answers nothing) mid-canary: the client's timeout turns it into a failed
  step; the restore is retried until Argo CD answers again, then verified.
- Prometheus dies mid-analysis: the intervals are inconclusive, never a pass; past the
  inconclusive limit the release rolls back; production is restored.
- The HTTP git remote hangs on a canary commit's push: the push is killed at the git
  timeout; the release ends promoted or restored, never half.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.schemas.objects import StateType

from sandbox.faults import FaultClient
from sandbox.procs import http_ok, spawn, stop_pid, wait_until
from tests.e2e.releases import (
    CLI,
    FAST,
    ROOT,
    approve_run,
    cli,
    deployed,
    is_final,
    manifests_git,
    overlay_tree,
    production_images,
    start_release,
    wait_run,
)
from tests.matrix import full_matrix

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
APP = "/api/v1/applications/api-gateway-production"
LEASE_REF = "refs/leases/api-gateway-production"
LONG_CANARY = {"ROBOTICS_CD_CANARY_STEPS": "[10, 25, 50, 100]", "ROBOTICS_CD_CANARY_ANALYSES": "2"}


@pytest.fixture
def faults(sandbox) -> Iterator[FaultClient]:
    client = FaultClient(sandbox.control_url)
    try:
        yield client
    finally:
        client.clear("argocd")
        client.close()


def _runner(env: dict[str, str], log: Path, **extra: str) -> object:
    proc = spawn(
        [CLI, "serve", "--only", "release"],
        log=log,
        env={**env, **FAST, **LONG_CANARY, **extra},
        cwd=ROOT,
    )
    wait_until(lambda: deployed("release/release"), timeout=120, what="served release")
    return proc


def _into_canary(sandbox, env, build, note: str):
    image, sha = build({"www/faults.txt": f"{note}\n"}, f"faults: {note}")
    run = start_release(image, sha)
    approve_run(run, {**env, **FAST, **LONG_CANARY})
    wait_until(
        lambda: (
            str(run.id)
            in manifests_git(
                sandbox, "log", "-3", "--format=%b", "--", "serving/api-gateway/overlays/production"
            )
        ),
        timeout=420,
        what="the release's first canary commit",
    )
    return run


def _lease(sandbox) -> dict | None:
    if not manifests_git(sandbox, "for-each-ref", "--format=%(refname)", LEASE_REF).strip():
        return None
    body = manifests_git(sandbox, "log", "-1", "--format=%B", LEASE_REF)
    return json.loads(body.split("\n\n", 1)[1])


def _hits(faults: FaultClient, fault_id: int) -> int:
    for fault in faults.snapshot().get("http", []):
        if fault.get("id") == fault_id:
            return int(fault.get("hits", 0))
    return 0


def _restored(sandbox, before_tree: str, stable: str) -> None:
    wait_until(
        lambda: overlay_tree(sandbox) == before_tree and _lease(sandbox) is None,
        timeout=300,
        what="production's overlay restored and the lease free",
    )
    wait_until(
        lambda: production_images(sandbox)["api-gateway"][0] == stable,
        timeout=180,
        what="production back on the stable image",
    )


def _recovery(case: str, fault_at: float, cleared_at: float | None = None) -> None:
    """Print how long production took to be healthy again (restored or promoted, lease
    free), from the fault and from its end: docs/benchmarks.md records these lines."""
    healthy = time.monotonic()
    since_clear = f"; fault cleared -> healthy {healthy - cleared_at:.0f} s" if cleared_at else ""
    print(f"\nRECOVERY {case}: fault -> healthy {healthy - fault_at:.0f} s{since_clear}")


@full_matrix
def test_argocd_down_then_back_the_restore_is_retried_until_verified(
    sandbox, env, build, faults, tmp_path
) -> None:
    before_tree = overlay_tree(sandbox)
    stable = production_images(sandbox)["api-gateway"][0]
    runner = _runner(env, tmp_path / "runner.log", ROBOTICS_CD_ROLLBACK_DEADLINE="600s")
    try:
        run = _into_canary(sandbox, env, build, "argocd down then back")
        down = faults.http_fault("argocd", path_prefix=APP, status=503)
        fault_at = time.monotonic()
        wait_until(
            lambda: (
                "rollback(production)" in manifests_git(sandbox, "log", "-1", "--format=%s", "main")
            ),
            timeout=300,
            what="the restoring commit written while Argo CD is down",
        )
        refused = _hits(faults, down)
        wait_until(
            lambda: _hits(faults, down) > refused + 2,
            timeout=120,
            what="the restore's sync refused by Argo CD",
        )
        faults.clear("argocd")
        cleared_at = time.monotonic()
        done = wait_run(run, is_final, timeout=420, what="release finished")
    finally:
        stop_pid(runner.pid)  # type: ignore[attr-defined]
    assert done.state is not None and done.state.message is not None, done.state
    assert done.state.type == StateType.FAILED and done.state.name != "RollbackFailed"
    assert done.state.message.startswith("rolled back:"), done.state.message
    _restored(sandbox, before_tree, stable)
    _recovery("argocd 503 then back", fault_at, cleared_at)


def test_a_restore_that_never_verifies_blocks_production_until_cleared(
    sandbox, env, build, faults, tmp_path
) -> None:
    before_tree = overlay_tree(sandbox)
    stable = production_images(sandbox)["api-gateway"][0]
    runner = _runner(env, tmp_path / "runner.log", ROBOTICS_CD_ROLLBACK_DEADLINE="20s")
    try:
        run = _into_canary(sandbox, env, build, "argocd down for good")
        faults.http_fault("argocd", path_prefix=APP, status=503)
        fault_at = time.monotonic()
        done = wait_run(run, is_final, timeout=600, what="release finished")
    finally:
        stop_pid(runner.pid)  # type: ignore[attr-defined]
    assert done.state is not None
    assert done.state.name == "RollbackFailed", (done.state.name, done.state.message)
    lease = _lease(sandbox)
    assert lease is not None and lease["blocked"], lease
    status = cli("status", "api-gateway", env=env)
    assert "BLOCKED" in status, status
    # Nothing else may take production while it is blocked.
    out = cli("reconcile", env=env)
    assert "api-gateway: leave (blocked" in out, out
    faults.clear("argocd")
    cleared_at = time.monotonic()
    # Clearing reconciles at once: revert, sync, rollout, smoke (minutes under load).
    cleared = subprocess.run(
        [CLI, "lease", "clear", "api-gateway", "--operator", "alice",
         "--reason", "Argo CD is back; restore it"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert cleared.returncode == 0, cleared.stdout + cleared.stderr
    assert "reconcile: restore" in cleared.stdout, cleared.stdout
    _restored(sandbox, before_tree, stable)
    _recovery("argocd down past the rollback deadline, then lease clear", fault_at, cleared_at)


def test_a_foreign_exception_in_a_canary_step_restores_production(
    sandbox, env, build, faults, tmp_path
) -> None:
    before_tree = overlay_tree(sandbox)
    stable = production_images(sandbox)["api-gateway"][0]
    runner = _runner(env, tmp_path / "runner.log")
    try:
        run = _into_canary(sandbox, env, build, "argocd answers garbage")
        # Every answer about the app is malformed JSON with a 200 for a while: the next
        # canary step's sync meets it.
        garbage = faults.http_fault(
            "argocd", path_prefix=APP, method="GET", status=200, body="{not json"
        )
        fault_at = time.monotonic()
        wait_until(lambda: _hits(faults, garbage) >= 1, timeout=300, what="garbage served")
        faults.clear("argocd")
        cleared_at = time.monotonic()
        done = wait_run(run, is_final, timeout=420, what="release finished")
    finally:
        stop_pid(runner.pid)  # type: ignore[attr-defined]
    assert done.state is not None and done.state.message is not None, done.state
    assert done.state.type == StateType.FAILED, done.state
    assert done.state.message.startswith("rolled back:"), done.state.message
    _restored(sandbox, before_tree, stable)
    _recovery("argocd answers malformed JSON", fault_at, cleared_at)


def _rolled_back_and_restored(done, sandbox, before_tree: str, stable: str) -> None:
    assert done.state.type == StateType.FAILED and done.state.name != "RollbackFailed", (
        done.state.name,
        done.state.message,
    )
    assert done.state.message.startswith("rolled back:"), done.state.message
    _restored(sandbox, before_tree, stable)


@full_matrix
def test_argocd_hanging_mid_canary_is_a_failed_step_and_production_is_restored(
    sandbox, env, build, faults, tmp_path
) -> None:
    before_tree = overlay_tree(sandbox)
    stable = production_images(sandbox)["api-gateway"][0]
    runner = _runner(
        env,
        tmp_path / "runner.log",
        ROBOTICS_CD_ROLLBACK_DEADLINE="900s",
    )
    try:
        run = _into_canary(sandbox, env, build, "argocd hangs")
        hang = faults.http_fault("argocd", path_prefix=APP, hang_seconds=120)
        fault_at = time.monotonic()
        wait_until(
            lambda: (
                "rollback(production)" in manifests_git(sandbox, "log", "-1", "--format=%s", "main")
            ),
            timeout=600,
            what="the restoring commit written while Argo CD hangs",
        )
        assert _hits(faults, hang) >= 1
        faults.clear("argocd")
        cleared_at = time.monotonic()
        done = wait_run(run, is_final, timeout=600, what="release finished")
    finally:
        stop_pid(runner.pid)  # type: ignore[attr-defined]
    _rolled_back_and_restored(done, sandbox, before_tree, stable)
    _recovery("argocd hanging", fault_at, cleared_at)


def _kill_prometheus(sandbox) -> list[str]:
    """SIGKILL the sandbox's Prometheus; returns its command line, to start it again."""
    home = sandbox.state_dir / "prometheus"
    pid = int((home / "prometheus.pid").read_text())
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    os.kill(pid, signal.SIGKILL)
    ready = f"{sandbox.prometheus_url}/-/ready"
    wait_until(lambda: not http_ok(ready), timeout=30, what="Prometheus not answering")
    return argv


def _start_prometheus_again(sandbox, argv: list[str]) -> None:
    home = sandbox.state_dir / "prometheus"
    spawn(argv, log=home / "prometheus.log", pidfile=home / "prometheus.pid")
    wait_until(
        lambda: http_ok(f"{sandbox.prometheus_url}/-/ready"), timeout=120, what="Prometheus up"
    )


@full_matrix
def test_prometheus_down_mid_analysis_is_never_a_pass(sandbox, env, build, tmp_path) -> None:
    before_tree = overlay_tree(sandbox)
    stable = production_images(sandbox)["api-gateway"][0]
    runner = _runner(env, tmp_path / "runner.log")
    argv: list[str] = []
    try:
        run = _into_canary(sandbox, env, build, "prometheus dies")
        argv = _kill_prometheus(sandbox)
        fault_at = time.monotonic()
        done = wait_run(run, is_final, timeout=600, what="release finished")
    finally:
        stop_pid(runner.pid)  # type: ignore[attr-defined]
        if argv:
            _start_prometheus_again(sandbox, argv)
    _rolled_back_and_restored(done, sandbox, before_tree, stable)
    assert done.state is not None and done.state.message is not None, done.state
    assert "inconclusive" in done.state.message, done.state.message
    _recovery("prometheus killed mid-analysis", fault_at)


@full_matrix
def test_git_remote_hanging_on_a_canary_push_never_leaves_production_half(
    sandbox, env, build, faults, tmp_path
) -> None:
    before_tree = overlay_tree(sandbox)
    stable = production_images(sandbox)["api-gateway"][0]
    runner = _runner(env, tmp_path / "runner.log", ROBOTICS_CD_GIT_TIMEOUT="15")
    try:
        run = _into_canary(sandbox, env, build, "git remote hangs")
        hang = faults.http_fault(
            "git",
            path_prefix="/robotics/robotics-k8s-manifests.git/git-receive-pack",
            method="POST",
            hang_seconds=45,
        )
        fault_at = time.monotonic()
        # (A fault with a count leaves the registry once spent: clear it by hand instead.)
        wait_until(lambda: _hits(faults, hang) >= 1, timeout=300, what="a push hung")
        faults.clear("git")
        cleared_at = time.monotonic()
        done = wait_run(run, is_final, timeout=900, what="release finished")
    finally:
        faults.clear("git")
        stop_pid(runner.pid)  # type: ignore[attr-defined]
    assert _lease(sandbox) is None
    assert done.state is not None
    assert done.state.name in ("Promoted", "Failed"), (done.state.name, done.state.message)
    if done.state.name == "Promoted":
        wait_until(
            lambda: production_images(sandbox)["api-gateway"][0] != stable,
            timeout=180,
            what="production on the released image",
        )
        assert production_images(sandbox)["api-gateway-canary"][1] == 0
    else:
        _rolled_back_and_restored(done, sandbox, before_tree, stable)
    print(f"git hang: release ended {done.state.name}: {done.state.message}")
    _recovery(f"git remote hanging ({done.state.name})", fault_at, cleared_at)
