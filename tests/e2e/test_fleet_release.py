"""The second service, fleet-planner (Python on the Debian base), released on the sandbox:
each regression ends rolled back on the signal that names it, judged from the Prefect API
(the run's final state and message), git (the production overlay restored) and the cluster.

fleet-planner is seeded on the Gateway API (services.yaml ``traffic.router: gateway-api``):
every scenario here is a canary through an HTTPRoute's weights, judged on Envoy Gateway's
statistics and the pods' own metrics.

CI runs two scenarios on one sandbox (the session's): ``business`` and ``restarts``. The
rest (``memory``, ``cpu``, ``5xx``, ``p99``) run with ``ROBOTICS_CD_FULL_MATRIX=1``; the A/A
run (ten good builds in a row, no early abort, no rollback) with ``ROBOTICS_CD_AA_RELEASES=10``.
Full command and recorded results: docs/e2e-matrix.md.

fleet-planner's own policy (services.yaml: steps 20 → 50 → 100, two analyses per step) is
kept; only the interval is shortened (``FAST``, 6 s), so a regression is rolled back after
two failed intervals at 20 % — or sooner, by the early abort, for 5xx and latency.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prefect.client.schemas.objects import FlowRun, StateType

from sandbox.procs import wait_until
from tests.e2e.releases import (
    cli,
    digest_of,
    is_final,
    is_paused,
    manifests_git,
    production_images,
    served_releases,
    start_release,
    wait_run,
)
from tests.e2e.routers import live_weights
from tests.matrix import full_matrix

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

SERVICE = "fleet-planner"
OVERLAY = "serving/fleet-planner/overlays/production"
AA_RELEASES = int(os.environ.get("ROBOTICS_CD_AA_RELEASES", "0") or 0)

# name -> (production-only config files, the words the rollback reason must carry, in CI?)
SCENARIOS: dict[str, tuple[dict[str, str], tuple[str, ...], bool]] = {
    "business": ({"config/task_fail_percent.production": "40\n"}, ("business",), True),
    "restarts": (
        {"config/crash_after_seconds.production": "3\n"},
        ("restarts", "Degraded", "health"),
        True,
    ),
    "memory": ({"config/leak_mb_per_second.production": "8\n"}, ("memory",), False),
    "cpu": ({"config/burn_cpu_workers.production": "1\n"}, ("cpu",), False),
    "5xx": ({"config/fail_rate.production": "30\n"}, ("error_ratio",), False),
    "p99": ({"config/status_delay_ms.production": "300\n"}, ("p99_latency_seconds",), False),
}
# Signals that must not be the reason when another is named (first to fail).
OTHER = {"business", "restarts", "memory", "cpu", "error_ratio", "p99_latency_seconds"}


@pytest.fixture(scope="module")
def runner(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with served_releases(env, tmp_path_factory.mktemp("fleet-runner")) as log:
        yield log


def _release(image: str, sha: str, env: dict[str, str]) -> FlowRun:
    run = start_release(image, sha, service=SERVICE)
    wait_run(run, is_paused, timeout=420, what="fleet release waiting for approval")
    cli("approve", str(run.id), "--approver", "carol", "--comment", "e2e", env=env)
    return wait_run(run, is_final, timeout=600, what="fleet release finished")


def _tree(sandbox: Any) -> str:
    return manifests_git(sandbox, "rev-parse", f"main:{OVERLAY}")


def _scenarios() -> list[Any]:
    return [
        pytest.param(name, marks=[] if in_ci else [full_matrix])
        for name, (_, _, in_ci) in SCENARIOS.items()
    ]


@pytest.mark.parametrize("scenario", _scenarios())
def test_a_regression_is_rolled_back_on_its_signal(
    scenario: str, sandbox: Any, runner: Path, env: dict[str, str], build_fleet: Any
) -> None:
    files, words, _ = SCENARIOS[scenario]
    before = _tree(sandbox)
    stable_before = production_images(sandbox)[SERVICE][0]
    image, sha = build_fleet(files, f"e2e: fleet-planner {scenario} regression in production")
    started = datetime.now(UTC)
    done = _release(image, sha, env)

    assert done.state is not None
    message = done.state.message or ""
    assert done.state.type == StateType.FAILED, done.state
    assert message.startswith("rolled back:"), message
    assert any(w in message for w in words), f"{scenario}: {message}"
    # The named signal came first: the reason names no signal of another scenario unless it
    # also names this one (a CPU burn may slow requests in the same interval; a crash-looping
    # canary's requests fail, and the stop names its restarts first).
    named = {s for s in OTHER if f"{s}:" in message or f"on {s}" in message}
    assert not named or any(w in named for w in words), f"{scenario}: {message}"
    assert _tree(sandbox) == before  # the overlay equals its pre-release tree
    rollback = manifests_git(sandbox, "log", "-1", "--format=%H%n%s%n%b", "--", OVERLAY)
    assert "rollback(production)" in rollback and "Undoes:" in rollback, rollback
    # Its digest is quarantined in git, naming the rollback commit.
    quarantine = manifests_git(sandbox, "show", f"main:quarantine/{SERVICE}.yaml")
    assert digest_of(image) in quarantine and rollback.split()[0] in quarantine, quarantine
    wait_until(
        lambda: production_images(sandbox)[SERVICE][0] == stable_before,
        timeout=90,
        what="production back on the old image",
    )
    assert production_images(sandbox)[f"{SERVICE}-canary"][1] == 0
    wait_until(
        lambda: live_weights(sandbox, SERVICE) == {SERVICE: 100, f"{SERVICE}-canary": 0},
        timeout=60,
        what="the production HTTPRoute back at stable 100 / canary 0",
    )
    elapsed = (datetime.now(UTC) - started).total_seconds()
    print(f"\nRESULT {scenario}: {message[:300]} (release {elapsed:.0f} s)")


@pytest.mark.skipif(AA_RELEASES <= 0, reason="ROBOTICS_CD_AA_RELEASES=10 runs the A/A run")
def test_aa_good_builds_are_all_promoted_without_early_abort(
    sandbox: Any, runner: Path, env: dict[str, str], build_fleet: Any
) -> None:
    results = []
    for i in range(AA_RELEASES):
        image, sha = build_fleet({"app/aa.txt": f"{i}\n"}, f"e2e: A/A good build {i}")
        done = _release(image, sha, env)
        assert done.state is not None
        results.append((done.state.name, done.state.message))
        print(f"\nRESULT A/A {i + 1}/{AA_RELEASES}: {done.state.name}: {done.state.message}")
        assert done.state.type == StateType.COMPLETED and done.state.name == "Promoted", results
        assert "early abort" not in (done.state.message or "")
