"""The runner of a release dies during its canary (SIGKILL of ``robotics-cd serve`` and its
flow processes): production ends restored, the lease free, the run Crashed, without a human
and without Prefect's automations.

Two ways back, as an operator would meet them:
- ``restart``: ``robotics-cd serve`` is started again within 10 s; it reconciles at start;
- ``reconciler``: only ``robotics-cd reconcile`` runs, from a separate process.

The kill lands at a known point (the release's first canary commit is in git) and death is
detected by pid, not by waiting for heartbeats to stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.schemas.objects import StateType

from sandbox.procs import spawn, stop_pid, wait_until
from tests.e2e.releases import (
    CLI,
    FAST,
    ROOT,
    approve_run,
    deployed,
    is_crashed,
    manifests_git,
    overlay_tree,
    production_images,
    read_run,
    start_release,
    state_of,
)
from tests.matrix import full_matrix

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
LONG_CANARY = {
    # Long enough for the kill to land in the canary, whatever the machine's load.
    "ROBOTICS_CD_CANARY_STEPS": "[10, 25, 50, 100]",
    "ROBOTICS_CD_CANARY_ANALYSES": "3",
}
LEASE_REF = "refs/leases/api-gateway-production"


@pytest.fixture
def runner_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, **FAST, **LONG_CANARY}


def _serve(runner_env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return spawn([CLI, "serve", "--only", "release"], log=log, env=runner_env, cwd=ROOT)


@pytest.fixture
def runner(runner_env: dict[str, str], tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [_serve(runner_env, tmp_path / "runner-1.log")]
    wait_until(lambda: deployed("release/release"), timeout=120, what="served release")
    try:
        yield procs
    finally:
        for proc in procs:
            stop_pid(proc.pid)


def _reconcile(env: dict[str, str]) -> str:
    """One ``robotics-cd reconcile`` pass from a separate process; what it printed."""
    done = subprocess.run(
        [CLI, "reconcile"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _lease_held(sandbox) -> bool:
    return bool(manifests_git(sandbox, "for-each-ref", "--format=%(refname)", LEASE_REF).strip())


@pytest.mark.parametrize("recovery", ["restart", "reconciler"])
def test_a_killed_release_is_restored(
    sandbox, env, build, runner, runner_env, tmp_path, recovery
) -> None:
    before_tree = overlay_tree(sandbox)
    stable_before = production_images(sandbox)["api-gateway"][0]
    image, sha = build(
        {"www/faults.txt": f"killed, {recovery}\n"}, f"faults: runner dies ({recovery})"
    )
    run = start_release(image, sha)
    approve_run(run, runner_env)
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
    assert _lease_held(sandbox)
    killed_at = time.monotonic()
    os.killpg(runner[0].pid, signal.SIGKILL)
    runner[0].wait(timeout=30)  # reaped: the kill is done

    if recovery == "restart":
        runner.append(_serve(runner_env, tmp_path / "runner-2.log"))
    else:
        # One pass restores: revert, Argo CD sync, rollout, smoke (minutes on a loaded machine).
        said = _reconcile(runner_env)
        assert "api-gateway: restore" in said, said

    wait_until(
        lambda: overlay_tree(sandbox) == before_tree and not _lease_held(sandbox),
        timeout=300,
        what="production's overlay restored and the lease free",
    )
    wait_until(
        lambda: production_images(sandbox)["api-gateway"][0] == stable_before,
        timeout=180,
        what="production back on the stable image",
    )
    recovered_in = time.monotonic() - killed_at
    log = manifests_git(
        sandbox, "log", "-1", "--format=%s%n%b", "--", "serving/api-gateway/overlays/production"
    )
    assert "rollback(production)" in log and str(run.id) in log
    wait_until(
        lambda: is_crashed(read_run(run.id)),
        timeout=60,
        what="the dead release marked Crashed",
    )
    message = state_of(read_run(run.id)).message or ""
    assert "reconciler restored production" in message, message
    print(f"recovery ({recovery}): {recovered_in:.0f} s from the kill to production restored")


STAGING_OVERLAY = "serving/api-gateway/overlays/staging"
PRODUCTION_OVERLAY = "serving/api-gateway/overlays/production"


def _task_started(run_id: object, name_part: str) -> bool:
    import anyio
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> bool:
        async with get_client() as client:
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
            )
        return any(name_part in t.name for t in tasks)

    return anyio.run(read)


def _wrote(sandbox, run_id: object, overlay: str, subject: str = "") -> bool:
    log = manifests_git(sandbox, "log", "-5", "--format=%s%n%b", "--", overlay)
    return str(run_id) in log and subject in log


@full_matrix
@pytest.mark.parametrize(
    ("phase", "recovery"),
    # half with the runner restarted at once, half with only the reconciler (issue #15)
    [
        ("staging", "restart"),
        ("promotion", "reconciler"),
        ("watch", "restart"),
        ("rollback", "reconciler"),
    ],
)
def test_a_release_killed_at_any_phase_ends_as_the_table_says(
    sandbox, env, build, tmp_path, phase, recovery
) -> None:
    """docs/recovery.md's table, beyond the canary (CI's case above): a runner killed in
    staging leaves production untouched and the run Crashed; killed after the promotion
    commit (before its sync is verified) or in the post-release watch, production is
    restored; killed right after its rollback commit, the rollback completes. After the
    kill, either ``serve`` starts again (it reconciles at start) or only ``reconcile`` runs
    from a separate process: either is the only way back."""
    # The e2e's compact canary (50 → 100, enough traffic at each step to pass) and a long
    # watch, so the kill lands in it.
    phase_env = {**env, **FAST, "ROBOTICS_CD_POST_RELEASE_WATCH": "90s"}
    proc = _serve(phase_env, tmp_path / "runner.log")
    wait_until(lambda: deployed("release/release"), timeout=120, what="served release")
    before_tree = overlay_tree(sandbox)
    stable_before = production_images(sandbox)["api-gateway"][0]
    files = {"www/faults.txt": f"killed in {phase}\n"}
    if phase == "rollback":  # a canary that fails, so the release rolls back
        files["config/fail_rate.production"] = "30\n"
    image, sha = build(files, f"faults: dies in {phase}")
    try:
        run = start_release(image, sha)
        if phase == "staging":
            reached = lambda: _wrote(sandbox, run.id, STAGING_OVERLAY)  # noqa: E731
        elif phase == "promotion":
            approve_run(run, phase_env)
            reached = lambda: _wrote(sandbox, run.id, PRODUCTION_OVERLAY, "promote(")  # noqa: E731
        elif phase == "rollback":
            approve_run(run, phase_env)
            reached = lambda: _wrote(sandbox, run.id, PRODUCTION_OVERLAY, "rollback(")  # noqa: E731
        else:
            approve_run(run, phase_env)
            reached = lambda: (  # noqa: E731
                _wrote(sandbox, run.id, PRODUCTION_OVERLAY, "promote(")
                and _task_started(run.id, "api-gateway-production at the window's start")
            )
        wait_until(reached, timeout=600, what=f"the release in its {phase}")
        os.killpg(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(timeout=30)
    finally:
        stop_pid(proc.pid)

    restarted = None
    if recovery == "restart":
        log = tmp_path / "runner-2.log"
        restarted = _serve({**phase_env, "PYTHONUNBUFFERED": "1"}, log)
        # its reconcile at start prints one line per action once the whole pass is done
        expected = "end-run" if phase == "staging" else "restore"
        wait_until(
            lambda: any(
                line in log.read_text(errors="replace")
                for line in (f"reconcile: api-gateway: {expected}", "reconcile at start failed")
            ),
            timeout=600,
            what="the restarted runner's reconcile at start",
        )
        said = log.read_text(errors="replace")
    else:
        said = _reconcile(phase_env)
    try:
        _ends_as_the_table_says(sandbox, run, phase, said, before_tree, stable_before)
    finally:
        if restarted is not None:
            stop_pid(restarted.pid)
    print(
        f"recovery (killed in {phase}, {recovery}): {time.monotonic() - killed_at:.0f} s "
        "from the kill to production on the stable image with the lease free"
    )


def _ends_as_the_table_says(
    sandbox, run, phase: str, said: str, before_tree: str, stable_before: str
) -> None:
    ended = state_of(read_run(run.id))
    finished_first = (
        phase == "rollback"
        and ended.type == StateType.FAILED
        and (ended.message or "").startswith("rolled back:")
    )  # the rollback's own sync and smoke won the race with the kill: nothing left to do
    if not finished_first:
        wait_until(
            lambda: is_crashed(read_run(run.id)),
            timeout=60,
            what="the dead release marked Crashed",
        )
    message = state_of(read_run(run.id)).message or ""
    print(f"killed in {phase}: reconcile said {said.strip()[-400:]!r}; the run: {message!r}")
    if finished_first:
        pass
    elif phase == "staging":
        assert "api-gateway: end-run" in said, said
        assert "production untouched" in message, message
    else:
        assert "api-gateway: restore" in said, said
        assert "reconciler restored production" in message, message
    wait_until(
        lambda: overlay_tree(sandbox) == before_tree and not _lease_held(sandbox),
        timeout=300,
        what="production's overlay as before the release and the lease free",
    )
    wait_until(
        lambda: production_images(sandbox)["api-gateway"][0] == stable_before,
        timeout=180,
        what="production on the stable image",
    )
