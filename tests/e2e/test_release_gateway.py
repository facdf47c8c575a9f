"""A promote and a rollback through the Gateway API (issue 23), on the sandbox, the
production way (served deployments, Argo CD twin, real containers, real Prometheus).

The sample service moves to ``traffic.router: gateway-api`` first (tests/e2e/routers.py: a
manifests commit swapping its Ingresses for a Gateway and a weighted HTTPRoute, and a
catalog saying so); canary steps then edit the HTTPRoute's weights, the twin's router splits
by them, and the analysis reads Envoy Gateway's cluster statistics. The module moves the
service back at the end. CI runs the promote (the demo drives ingress-nginx); every other release
scenario on gateway-api: ``ROBOTICS_CD_FULL_MATRIX=1`` (tests/e2e/test_release.py).

fleet-planner is seeded on the Gateway API (services.yaml): its release scenarios
(tests/e2e/test_fleet_release.py) are rollbacks through the gateway, two of them in CI.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.schemas.objects import StateType

from core.kustomize import CanarySettings, parse_canary
from sandbox.procs import wait_until
from tests.e2e.releases import (
    OVERLAY,
    SERVICE,
    ArgvWatch,
    digest_of,
    manifests_git,
    overlay_tree,
    production_images,
    release_approved,
    served_releases,
)
from tests.e2e.routers import live_weights, use_router
from tests.matrix import full_matrix

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

STABLE = f"httproute/production/{SERVICE}/rule/0/backend/0"
CANARY = f"httproute/production/{SERVICE}/rule/0/backend/1"


@pytest.fixture(scope="module")
def env(
    env: dict[str, str], sandbox: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The sandbox env with api-gateway on the Gateway API (and back at the end)."""

    extra, undo = use_router(sandbox, "gateway-api", tmp_path_factory.mktemp("router"))
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
    with served_releases(env, tmp_path_factory.mktemp("release-runner-gateway")) as log:
        yield log


def _envoy(sandbox: Any, promql: str) -> float:
    response = httpx.get(
        f"{sandbox.prometheus_url}/api/v1/query", params={"query": promql}, timeout=10
    )
    response.raise_for_status()
    result = response.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def test_good_image_is_promoted_through_the_gateway(sandbox, runner, env, build):
    canary_before = _envoy(
        sandbox, f'sum(envoy_cluster_upstream_rq_total{{envoy_cluster_name="{CANARY}"}})'
    )
    image, sha = build(
        {"www/release-e2e.txt": "good via gateway\n"}, "e2e: a good change (gateway-api)"
    )
    with ArgvWatch(sandbox.github_token) as watch:
        done = release_approved(image, sha, env)
    # The token was in no process's argv, and is in no file under the work directory.
    assert watch.git_seen > 0 and watch.leaks == [], watch.leaks
    leaked = subprocess.run(
        ["grep", "-rl", "--", sandbox.github_token, env["ROBOTICS_CD_WORKSPACE"]],
        capture_output=True,
        text=True,
    )
    assert leaked.stdout == "", leaked.stdout

    assert done.state is not None
    assert done.state.type == StateType.COMPLETED and done.state.name == "Promoted", done.state
    canary = manifests_git(sandbox, "show", f"main:{OVERLAY}/canary.yaml")
    assert "kind: HTTPRoute" in canary and "canary-weight" not in canary
    assert parse_canary(canary, SERVICE) == CanarySettings(replicas=0, weight=0)
    # Each canary step was a commit that edited the route's weights.
    steps = manifests_git(sandbox, "log", "-p", "--format=%s", "-6", "--", f"{OVERLAY}/canary.yaml")
    assert "+      weight: 50" in steps and "+      weight: 100" in steps
    images = production_images(sandbox)
    assert digest_of(image) in images[SERVICE][0]
    assert images[f"{SERVICE}-canary"][1] == 0
    wait_until(
        lambda: live_weights(sandbox, SERVICE) == {SERVICE: 100, f"{SERVICE}-canary": 0},
        timeout=60,
        what="production HTTPRoute back at stable 100 / canary 0",
    )
    # The canary's traffic went through its own Envoy Gateway cluster, as the analysis read it.
    canary_after = _envoy(
        sandbox, f'sum(envoy_cluster_upstream_rq_total{{envoy_cluster_name="{CANARY}"}})'
    )
    assert canary_after > canary_before
    assert (
        _envoy(sandbox, f'sum(envoy_cluster_upstream_rq_total{{envoy_cluster_name="{STABLE}"}})')
        > 0
    )


# CI's rollbacks through the Gateway API are fleet-planner's (seeded on gateway-api:
# tests/e2e/test_fleet_release.py); this one, of the migrated api-gateway, is full matrix.
@full_matrix
def test_failing_canary_is_rolled_back_through_the_gateway(sandbox, runner, env, build):
    before_tree = overlay_tree(sandbox)
    stable_before = production_images(sandbox)[SERVICE][0]
    image, sha = build(
        {"config/fail_rate.production": "30\n"},
        "e2e: /v1/status fails 30% in production (gateway-api)",
    )
    done = release_approved(image, sha, env)

    assert done.state is not None and done.state.message is not None, done.state
    assert done.state.type == StateType.FAILED, done.state
    assert done.state.message.startswith("rolled back:"), done.state.message
    assert overlay_tree(sandbox) == before_tree
    log = manifests_git(sandbox, "log", "-3", "--format=%s%n%b", "--", OVERLAY)
    assert "rollback(production)" in log and "Undoes:" in log
    # Its digest is quarantined in git, naming the rollback commit.
    rollback_sha = manifests_git(sandbox, "log", "-1", "--format=%H", "--", OVERLAY)
    quarantine = manifests_git(sandbox, "show", f"main:quarantine/{SERVICE}.yaml")
    assert digest_of(image) in quarantine and rollback_sha in quarantine
    wait_until(
        lambda: production_images(sandbox)[SERVICE][0] == stable_before,
        timeout=60,
        what="production back on the old image",
    )
    wait_until(
        lambda: live_weights(sandbox, SERVICE) == {SERVICE: 100, f"{SERVICE}-canary": 0},
        timeout=60,
        what="production HTTPRoute back at stable 100 / canary 0",
    )
    # What the analysis saw: 5xx on the canary's Envoy cluster.
    errors = _envoy(
        sandbox,
        "sum(envoy_cluster_upstream_rq_xx{"
        f'envoy_cluster_name="{CANARY}",envoy_response_code_class="5"}})',
    )
    assert errors > 0
