"""Concurrent releases of one service through staging (issue #16), on the sandbox, the
production way: served deployments, the Argo CD twin, real containers, real Prometheus.

Commits are pushed to robotics-api one after the other (each a child of the last) and their
releases started a second apart, as two merges in a row would hand them over. Staging must
end on the newest image; every older release ends ``Superseded`` naming a newer one (at its
staging write, after its measurement, or through the API while it waits); the newest one's
record shows that only pods of its digest were measured.

All three run with ``ROBOTICS_CD_FULL_MATRIX=1`` (recorded in docs/e2e-matrix.md): CI's 45
minutes went to the second service's scenarios. CI keeps the ordering rule on real git and kustomize with
racing writers (tests/integration/test_staging_order.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.releases import (
    cli,
    digest_of,
    is_final,
    is_paused,
    record_of,
    served_releases,
    staging_image,
    start_release,
    wait_run,
)
from tests.matrix import full_matrix

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

# The pushes of the scenario: a merge, then another one a second later.
PUSH_GAP_SECONDS = 1.0


@pytest.fixture(scope="module")
def runner(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with served_releases(env, tmp_path_factory.mktemp("order-runner")) as log:
        yield log


def _race(build: Any, env: dict[str, str], labels: list[str], start_order: list[int]) -> Any:
    """Build one commit per label (in that order: each a child of the previous), start their
    releases in ``start_order`` a second apart; return (images, shas, runs by index)."""
    built = [build({"www/release-e2e.txt": f"{label}\n"}, f"e2e: {label}") for label in labels]
    runs: dict[int, Any] = {}
    for n, i in enumerate(start_order):
        if n:
            time.sleep(PUSH_GAP_SECONDS)  # the scenario's gap between the two hand-overs
        runs[i] = start_release(*built[i])
    return [b[0] for b in built], [b[1] for b in built], runs


def _settle(runs: dict[int, Any], newest: int, env: dict[str, str]) -> dict[int, Any]:
    """Wait until the newest waits for approval and every older one has ended; then reject
    the newest, so that every release of the scenario has ended."""
    ended = {}
    for i, run in runs.items():
        if i != newest:
            ended[i] = wait_run(run, is_final, timeout=600, what=f"older release {i} ended")
    wait_run(runs[newest], is_paused, timeout=600, what="newest release waiting for approval")
    return ended


def _reject(run: Any, env: dict[str, str]) -> Any:
    cli("reject", str(run.id), "--approver", "bob", "--comment", "e2e: ordering done", env=env)
    return wait_run(run, is_final, timeout=180, what="rejected release ended")


def _assert_staging_measured_only(record: str, digest: str) -> None:
    """The record's measured-pods table: staging rows, every one on this release's digest."""
    rows = [line for line in record.splitlines() if line.startswith("| staging ")]
    assert rows, record
    assert all("this digest" in row for row in rows), rows
    assert any("| start |" in row for row in rows) and any("| end |" in row for row in rows)
    assert "**other**" not in record


def _check(
    sandbox: Any, env: dict[str, str], images: list[str], runs: dict[int, Any], newest: int
) -> None:
    ended = _settle(runs, newest, env)
    newest_image = images[newest]
    staging = staging_image(sandbox)
    assert digest_of(newest_image) in staging, staging
    for i, run in ended.items():
        assert run.state.name == "Superseded", (i, run.state.name, run.state.message)
        assert "superseded" in (run.state.message or "")
        later = [images[j].split("@")[0].rsplit(":", 1)[1] for j in runs if j > i]
        assert any(tag in (run.state.message or "") for tag in later) or str(runs[newest].id) in (
            run.state.message or ""
        ), run.state.message
        assert digest_of(images[i]) not in staging
    done = _reject(runs[newest], env)
    assert done.state.name == "Rejected"
    _assert_staging_measured_only(record_of(runs[newest].id), digest_of(newest_image))
    # Exactly one terminal state per commit: each run ended once, none still waits.
    assert all(is_final(r) for r in [*ended.values(), done])


@full_matrix
def test_two_commits_a_second_apart_staging_ends_on_the_newer(sandbox, runner, env, build):
    images, _, runs = _race(build, env, ["order A", "order B"], start_order=[0, 1])
    _check(sandbox, env, images, runs, newest=1)


@full_matrix
def test_the_newer_commit_handed_over_first_wins_too(sandbox, runner, env, build):
    images, _, runs = _race(build, env, ["order A2", "order B2"], start_order=[1, 0])
    _check(sandbox, env, images, runs, newest=1)


@full_matrix
def test_three_commits_in_a_burst_staging_ends_on_the_newest(sandbox, runner, env, build):
    images, _, runs = _race(build, env, ["burst A", "burst B", "burst C"], start_order=[0, 1, 2])
    _check(sandbox, env, images, runs, newest=2)
