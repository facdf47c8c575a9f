"""``git push`` → webhook → CI → release reaches staging, on the sandbox, the production way.

The sandbox's GitHub twin turns a real ``git push`` into a signed ``push`` delivery to
``robotics-cd webhook serve`` (a subprocess on the sandbox's webhook port); ``robotics-cd
serve`` runs the deployments. The CI run builds, scans and pushes the image, reports its
commit status (with its Prefect URL) to the twin, and hands over to a top-level release run
that deploys staging and suspends for approval. A redelivery of the same delivery (the
twin's "Redeliver") starts no second CI run. A push to the training repo that only touches
README.md starts nothing; one touching configs/ starts ``training-image``.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.objects import FlowRun, StateType

from sandbox.procs import http_ok, spawn, stop_pid, wait_until
from tests.e2e.releases import deployed
from tests.matrix import full_matrix

# The demo (tests/e2e/test_demo.py) drives the same path in CI: push, webhook, CI, release,
# and a training push. This module's finer checks run with the full matrix.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200), full_matrix]

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "robotics-cd")
SERVED = ("ci", "release", "rollback")


def _missing_flows() -> list[str]:
    return [m for m in ("flows.ci", "flows.release") if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def triggers(sandbox: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``robotics-cd serve`` (ci, release, rollback) and ``robotics-cd webhook serve``."""
    missing = _missing_flows()
    if missing:
        pytest.skip(f"flow modules not in the tree yet: {', '.join(missing)}")
    logs = tmp_path_factory.mktemp("triggers")
    env = {**sandbox.env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    only = [arg for name in SERVED for arg in ("--only", name)]
    served = spawn([CLI, "serve", *only], log=logs / "serve.log", env=env, cwd=ROOT)
    port = sandbox.env["ROBOTICS_CD_WEBHOOK_PORT"]
    receiver = spawn(
        [CLI, "webhook", "serve", "--port", port],
        log=logs / "webhook.log",
        env=env,
        cwd=ROOT,
    )
    try:
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{port}/healthz"),
            timeout=60,
            what=f"webhook receiver (log: {logs / 'webhook.log'})",
        )
        wait_until(
            lambda: deployed(*[f"{n}/{n}" for n in SERVED]),
            timeout=90,
            what=f"served deployments (log: {logs / 'serve.log'})",
        )
        yield logs
    finally:
        stop_pid(receiver.pid)
        stop_pid(served.pid)


def _runs(deployment: str, match: Callable[[FlowRun], bool]) -> list[FlowRun]:
    flow_name, name = deployment.split("/")

    async def read() -> list[FlowRun]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name]))
            )
            flows = {f.id: f.name for f in await client.read_flows()}
        return [r for r in runs if flows.get(r.flow_id) == flow_name and match(r)]

    import anyio

    return anyio.run(read)


def _wait_run(
    deployment: str,
    match: Callable[[FlowRun], bool],
    done: Callable[[FlowRun], bool],
    *,
    timeout: float,
    what: str,
) -> FlowRun:
    deadline = time.monotonic() + timeout
    last: list[FlowRun] = []
    while time.monotonic() < deadline:
        last = _runs(deployment, match)
        if last and done(last[0]):
            return last[0]
        if last and last[0].state and last[0].state.type in (StateType.FAILED, StateType.CRASHED):
            pytest.fail(
                f"{what}: run {last[0].name} ended {last[0].state.name}: {last[0].state.message}"
            )
        time.sleep(1)
    state = last[0].state if last else None
    pytest.fail(f"{what} not reached in {timeout:.0f}s (last state: {state and state.name})")


def _push(sandbox: Any, tmp: Path, repo: str, files: dict[str, str], message: str) -> str:
    work = tmp / f"{repo}-{uuid.uuid4().hex[:6]}"
    sandbox.clone(repo, work)
    try:
        return str(sandbox.commit_and_push(work, message, files))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _deliveries(sandbox: Any, sha: str) -> list[dict[str, Any]]:
    return [
        d
        for d in sandbox.recorded()["deliveries"]
        if d["event"] == "push" and d["request"]["payload"].get("after") == sha
    ]


def _answered(sandbox: Any, sha: str, status: int) -> Callable[[], bool]:
    return lambda: any(d.get("status_code") == status for d in _deliveries(sandbox, sha))


def test_git_push_to_robotics_api_reaches_staging(sandbox, triggers, tmp_path):
    marker = uuid.uuid4().hex[:8]
    sha = _push(
        sandbox,
        tmp_path,
        "robotics-api",
        {"www/e2e-marker.txt": f"e2e {marker}\n"},
        f"e2e: push {marker}",
    )
    wait_until(_answered(sandbox, sha, 202), timeout=30, what="push delivery answered 202")
    ci_run = _wait_run(
        "ci/ci",
        lambda r: r.parameters.get("sha") == sha,
        lambda r: r.state is not None and r.state.type == StateType.COMPLETED,
        timeout=600,
        what="CI completed",
    )
    assert ci_run.parameters["event"] == "push" and ci_run.parameters["fork"] is False

    # The twin's "Redeliver" sends the same X-GitHub-Delivery: no second CI run.
    (delivery,) = _deliveries(sandbox, sha)[:1]
    redelivered = httpx.post(
        f"{sandbox.github_url}/_twin/deliveries/{delivery['guid']}/redeliver", timeout=30
    )
    assert redelivered.status_code < 300
    again = [d for d in _deliveries(sandbox, sha) if d.get("redelivery")]
    assert again and again[-1]["guid"] == delivery["guid"] and again[-1]["status_code"] == 202
    assert len(_runs("ci/ci", lambda r: r.parameters.get("sha") == sha)) == 1

    release = _wait_run(
        "release/release",
        lambda r: r.parameters.get("source_sha") == sha,
        lambda r: True,
        timeout=120,
        what="release started by the hand-off",
    )
    assert release.parent_task_run_id is None  # a top-level run, not CI's subflow
    assert release.parameters["service"] == "api-gateway"
    tag = release.parameters["image"].split("@")[0].rsplit(":", 1)[1]
    assert sha[:7] in tag

    # Staging runs the new image: Argo CD synced the release's commit and it is Healthy.
    sandbox.wait_app(
        "api-gateway-staging",
        lambda app: (
            any(tag in image for image in app["status"].get("summary", {}).get("images", []))
            and app["status"].get("health", {}).get("status") == "Healthy"
        ),
        timeout=600,
        what=f"staging running {tag}",
    )
    release = _wait_release_decided(release)
    waiting = release.state is not None and release.state.type == StateType.PAUSED
    if not waiting:
        # The release's own staging gate (smoke + staging metrics) said no; that gate is the
        # release flow's, tested there. Staging was reached, which is what is checked here.
        message = (release.state and release.state.message) or ""
        assert "staging" in message, f"release failed before/after staging: {message}"
        warnings.warn(
            f"release reached staging but its verification failed: {message}", stacklevel=1
        )

    statuses = [s for s in sandbox.recorded()["statuses"] if s["sha"] == sha]
    ci_statuses = [s for s in statuses if s["context"] == "robotics-cd/ci"]
    assert [s["state"] for s in ci_statuses][:1] == ["pending"]
    assert ci_statuses[-1]["state"] == "success"
    assert all(f"/runs/flow-run/{ci_run.id}" in (s["target_url"] or "") for s in ci_statuses)
    handoff = [s for s in statuses if s["context"] == "robotics-cd/release"]
    assert handoff and f"/runs/flow-run/{release.id}" in handoff[-1]["target_url"]

    if waiting:
        _reject(release)


def _wait_release_decided(release: FlowRun) -> FlowRun:
    """Wait until the release suspends for approval or ends (whatever its verdict)."""
    deadline = time.monotonic() + 300
    while True:
        (run,) = _runs("release/release", lambda r: r.id == release.id)
        state = run.state
        if state is not None and (state.type == StateType.PAUSED or state.is_final()):
            return run
        if time.monotonic() > deadline:
            pytest.fail(f"release neither suspended nor ended in 300s: {state and state.name}")
        time.sleep(1)


def _reject(release: FlowRun) -> None:
    """End the release (no production change): what a person's Reject does."""
    import anyio

    try:
        from tasks.approvals import resume_with_decision
    except ImportError:
        return
    anyio.run(resume_with_decision, release.id, "reject", "alice", "e2e test: done at staging")
    _wait_run(
        "release/release",
        lambda r: r.id == release.id,
        lambda r: r.state is not None and r.state.is_final(),
        timeout=180,
        what="rejected release finished",
    )


def test_training_push_builds_only_when_its_paths_change(sandbox, triggers, tmp_path):
    from deployments.register import runner_deployments

    # Registered, not served: the test checks which runs the pushes create, not the build.
    for deployment in runner_deployments(only={"training-image"}):
        deployment.apply()
    readme = _push(sandbox, tmp_path, "robotics-training", {"README.md": "e2e\n"}, "docs only")
    configs = _push(
        sandbox, tmp_path, "robotics-training", {"configs/e2e.yaml": "lr: 0.1\n"}, "new config"
    )
    for sha in (readme, configs):
        wait_until(_answered(sandbox, sha, 202), timeout=30, what=f"delivery of {sha[:7]} answered")
    runs = _runs(
        "training-image/training-image", lambda r: r.parameters.get("sha") in (readme, configs)
    )
    assert [r.parameters["sha"] for r in runs] == [configs]
    assert runs[0].parameters["image"] == "vision-train"
    _cancel(runs)


def _cancel(runs: list[FlowRun]) -> None:
    import anyio
    from prefect.states import Cancelled

    async def cancel() -> None:
        async with get_client() as client:
            for run in runs:
                await client.set_flow_run_state(
                    run.id, Cancelled(message="e2e cleanup"), force=True
                )

    anyio.run(cancel)
