"""A release whose runner is killed with SIGKILL during the canary is rolled back without a
human: its heartbeats stop, the zombie automation marks it Crashed, the rollback automation
starts the ``rollback`` deployment (served by another runner), and production ends on the
old image with git saying so.

Full matrix only: CI shows recovery without automations in tests/faults (the reconciler).

Own runners (not test_release.py's): one serving ``release`` that gets killed, one serving
``rollback``; heartbeats every 30 s (Prefect's minimum) and a 50 s silence limit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.objects import FlowRun, StateType

from sandbox.procs import spawn, stop_pid, wait_until
from tests.e2e.releases import (
    CLI,
    FAST,
    ROOT,
    approve_run,
    deployed,
    is_final,
    manifests_git,
    overlay_tree,
    production_images,
    read_run,
    start_release,
    state_of,
    wait_run,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(900),
    # The automations are the fast path; tests/faults shows recovery without them in CI.
    pytest.mark.skipif(
        os.environ.get("ROBOTICS_CD_FULL_MATRIX") != "1",
        reason="full matrix only (ROBOTICS_CD_FULL_MATRIX=1): the automation fast path",
    ),
]

CRASH = {
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",  # Prefect's minimum
    "ROBOTICS_CD_ZOMBIE_AFTER_SECONDS": "50",
    # A canary long enough for the kill to land in it.
    "ROBOTICS_CD_CANARY_STEPS": "[10, 25, 50, 100]",
    "ROBOTICS_CD_CANARY_ANALYSES": "3",
}


@pytest.fixture
def runners(env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    crash_env = {**env, **FAST, **CRASH}
    rollback = spawn(
        [CLI, "serve", "--only", "release", "--only", "rollback"],
        log=tmp_path / "rollback-runner.log",
        env=crash_env,
        cwd=ROOT,
    )
    wait_until(
        lambda: deployed("release/release", "rollback/rollback"),
        timeout=120,
        what="served deployments and automations",
    )
    stop_pid(rollback.pid)  # registered (with the automations); now split the roles
    release = spawn(
        [CLI, "serve", "--only", "release"],
        log=tmp_path / "release-runner.log",
        env=crash_env,
        cwd=ROOT,
    )
    rollback = spawn(
        [CLI, "serve", "--only", "rollback"], log=tmp_path / "rollback.log", env=crash_env, cwd=ROOT
    )
    try:
        yield release
    finally:
        stop_pid(release.pid)
        stop_pid(rollback.pid)


def _rollback_runs(release_id: str) -> list[FlowRun]:
    async def read() -> list[FlowRun]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["rollback"]))
            )
        return [r for r in runs if r.parameters.get("release_run_id") == release_id]

    return anyio.run(read)


def test_a_killed_release_is_rolled_back_without_a_human(sandbox, env, build, runners):
    before_tree = overlay_tree(sandbox)
    stable_before = production_images(sandbox)["api-gateway"][0]
    image, sha = build({"www/release-e2e.txt": "killed\n"}, "e2e: its runner dies")
    run = start_release(image, sha)
    approve_run(run, {**env, **CRASH})
    wait_until(
        lambda: (
            str(run.id)
            in manifests_git(
                sandbox, "log", "-5", "--format=%b", "--", "serving/api-gateway/overlays/production"
            )
        ),
        timeout=300,
        what="the release's first canary commit",
    )
    os.killpg(runners.pid, signal.SIGKILL)

    crashed = wait_run(
        run,
        lambda r: bool(r.state and r.state.type == StateType.CRASHED),
        timeout=180,
        what="release marked Crashed",
    )
    assert crashed.state is not None
    deadline = time.monotonic() + 300
    while True:
        done = [r for r in _rollback_runs(str(run.id)) if is_final(r)]
        if done:
            break
        assert time.monotonic() < deadline, "no rollback run finished for the killed release"
        time.sleep(2)
    assert done[0].state is not None
    assert done[0].state.type == StateType.COMPLETED, done[0].state
    assert len(_rollback_runs(str(run.id))) == 1  # one rollback per release
    assert overlay_tree(sandbox) == before_tree
    log = manifests_git(
        sandbox, "log", "-1", "--format=%s%n%b", "--", "serving/api-gateway/overlays/production"
    )
    assert "rollback(production)" in log and str(run.id) in log
    wait_until(
        lambda: production_images(sandbox)["api-gateway"][0] == stable_before,
        timeout=60,
        what="production back on the old image",
    )
    assert state_of(read_run(run.id)).type == StateType.CRASHED
    # The recovery quarantines the killed release's digest, naming its restoring commit.
    restore = manifests_git(
        sandbox, "log", "-1", "--format=%H", "--", "serving/api-gateway/overlays/production"
    )
    quarantine = manifests_git(sandbox, "show", "main:quarantine/api-gateway.yaml")
    assert image.split("@", 1)[1] in quarantine and restore in quarantine
