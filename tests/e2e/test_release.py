"""The release flow on the sandbox, the production way: served deployments, real Argo CD twin
syncs, real containers, real Prometheus, approval through the Prefect API.

Images are built here from real commits of the sandbox's robotics-api repo (docker build +
push to the sandbox registry, tagged by the seed's scheme), then handed to the ``release``
deployment as CI would. The canary policy is compact (steps 50 → 100, one analysis of a few
seconds per step) through the catalog's environment overrides.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from prefect import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments.flow_runs import arun_deployment

from core.images import release_tag
from sandbox.procs import spawn, stop_pid, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "robotics-cd")
SERVICE = "api-gateway"
OVERLAY = "serving/api-gateway/overlays/production"
INTERVAL = 6
FAST = {
    "ROBOTICS_CD_CANARY_STEPS": "[50, 100]",
    "ROBOTICS_CD_CANARY_INTERVAL": f"{INTERVAL}s",
    "ROBOTICS_CD_CANARY_ANALYSES": "1",
    "ROBOTICS_CD_CANARY_MIN_REQUESTS": "10",
    "ROBOTICS_CD_POST_RELEASE_WATCH": f"{INTERVAL}s",
    "PREFECT_RUNNER_POLL_FREQUENCY": "1",
}


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(sandbox: Any) -> Iterator[dict[str, str]]:
    """The sandbox's env with the compact canary policy, in this process too."""
    from core.settings import get_settings

    values = {**sandbox.env, **FAST}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield values
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        get_settings.cache_clear()


@pytest.fixture(scope="module")
def runner(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``robotics-cd serve`` of release and rollback, as the embedded default runs them."""
    logs = tmp_path_factory.mktemp("release-runner")
    served = spawn([CLI, "serve", "--only", "release", "--only", "rollback"],
                   log=logs / "serve.log", env=env, cwd=ROOT)
    try:
        wait_until(lambda: _deployed("release/release", "rollback/rollback"), timeout=120,
                   what=f"served deployments (log: {logs / 'serve.log'})")
        yield logs / "serve.log"
    finally:
        stop_pid(served.pid)


@pytest.fixture(scope="module")
def docker_login(sandbox: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    config = tmp_path_factory.mktemp("docker-config")
    user, password = sandbox.registry_auth
    subprocess.run(["docker", "--config", str(config), "login", "-u", user, "--password-stdin",
                    sandbox.registry], input=password, text=True, check=True,
                   capture_output=True, timeout=60)
    return {"DOCKER_CONFIG": str(config)}


@pytest.fixture(scope="module")
def build(sandbox: Any, docker_login: dict[str, str],
          tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[str, str]]:
    """Commit files to robotics-api, build and push its image; return (image@digest, sha)."""
    work_root = tmp_path_factory.mktemp("builds")

    def make(files: dict[str, str], message: str) -> tuple[str, str]:
        work = work_root / uuid.uuid4().hex[:8]
        sandbox.clone("robotics-api", work)
        for leftover in (work / "config").glob("*.production"):  # earlier scenarios' faults
            leftover.unlink()
        unique = {"www/e2e-build.txt": f"{uuid.uuid4()}\n", **files}  # never an empty commit
        sha = sandbox.commit_and_push(work, message, unique)
        date = datetime.fromtimestamp(
            int(sandbox.git("log", "-1", "--format=%ct", sha, cwd=work)), UTC
        )
        image = f"{sandbox.registry}/robotics-serving/api-gateway:{release_tag(date, sha)}"
        docker_env = {**os.environ, **docker_login}
        for argv in (["docker", "build", "-q", "--rm", "--force-rm", "-t", image,
                      "--build-arg", f"GIT_SHA={sha}", str(work)],
                     ["docker", "push", image]):
            subprocess.run(argv, env=docker_env, check=True, capture_output=True, timeout=300)
        digest = subprocess.run(
            ["docker", "inspect", "--format", "{{index .RepoDigests 0}}", image],
            env=docker_env, check=True, capture_output=True, text=True, timeout=60,
        ).stdout.strip().split("@", 1)[1]
        shutil.rmtree(work, ignore_errors=True)
        return f"{image}@{digest}", sha

    return make


# --- helpers -------------------------------------------------------------------------------


def _deployed(*names: str) -> bool:
    async def read() -> bool:
        async with get_client() as client:
            for name in names:
                await client.read_deployment_by_name(name)
        return True

    try:
        return anyio.run(read)
    except Exception:
        return False


def _start(image: str, sha: str) -> FlowRun:
    async def go() -> FlowRun:
        run: FlowRun = await arun_deployment(
            "release/release", parameters={"service": SERVICE, "image": image, "source_sha": sha},
            timeout=0, as_subflow=False,
        )
        return run

    return anyio.run(go)


def _read(run_id: Any) -> FlowRun:
    async def go() -> FlowRun:
        async with get_client() as client:
            return await client.read_flow_run(run_id)

    return anyio.run(go)


def _wait(run: FlowRun, done: Callable[[FlowRun], bool], *, timeout: float, what: str) -> FlowRun:
    deadline = time.monotonic() + timeout
    current = _read(run.id)
    while not done(current):
        state = current.state
        if state is not None and state.is_final() and not done(current):
            pytest.fail(f"{what}: release ended {state.name}: {state.message}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached in {timeout:.0f}s (state: "
                        f"{state.name if state else None}: {state.message if state else ''})")
        time.sleep(1)
        current = _read(run.id)
    return current


def _paused(run: FlowRun) -> bool:
    return run.state is not None and run.state.type == StateType.PAUSED


def _final(run: FlowRun) -> bool:
    return run.state is not None and run.state.is_final()


def _cli(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([CLI, *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, f"robotics-cd {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def _manifests(sandbox: Any, *args: str) -> str:
    return str(sandbox.git("--git-dir", str(sandbox.git_base / "robotics-k8s-manifests.git"),
                           *args))


def _overlay_tree(sandbox: Any) -> str:
    return _manifests(sandbox, "rev-parse", f"main:{OVERLAY}")


def _production_images(sandbox: Any) -> dict[str, Any]:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "kubectl"), "--kubeconfig", str(sandbox.kubeconfig),
         "get", "deploy", "-n", "production", "-o", "json"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    return {
        d["metadata"]["name"]: (
            d["spec"]["template"]["spec"]["containers"][0]["image"], d["spec"].get("replicas")
        )
        for d in json.loads(out)["items"]
    }


def _approve(run: FlowRun, env: dict[str, str]) -> None:
    _wait(run, _paused, timeout=300, what="release waiting for approval after staging")
    _cli("approve", str(run.id), "--approver", "alice", "--comment", "e2e", env=env)


def _release(image: str, sha: str, env: dict[str, str]) -> FlowRun:
    run = _start(image, sha)
    _approve(run, env)
    return _wait(run, _final, timeout=420, what="release finished")


def _digest(image: str) -> str:
    return image.split("@", 1)[1]


# --- scenarios (one service: they run in order) -------------------------------------------


def test_good_image_is_promoted(sandbox, runner, env, build):
    image, sha = build({"www/release-e2e.txt": "good\n"}, "e2e: a good change")
    run = _start(image, sha)
    _approve(run, env)
    done = _wait(run, _final, timeout=420, what="release finished")

    assert done.state.type == StateType.COMPLETED and done.state.name == "Promoted", done.state
    kustomization = _manifests(sandbox, "show", f"main:{OVERLAY}/kustomization.yaml")
    canary = _manifests(sandbox, "show", f"main:{OVERLAY}/canary.yaml")
    stable_entry = kustomization.split("- name: api-gateway\n", 1)[1].split("- name:", 1)[0]
    assert _digest(image) in stable_entry
    assert "replicas: 0" in canary and 'canary-weight: "0"' in canary
    images = _production_images(sandbox)
    assert _digest(image) in images["api-gateway"][0]
    assert images["api-gateway-canary"][1] == 0
    staging = sandbox.app("api-gateway-staging")
    assert staging["status"]["health"]["status"] == "Healthy"


def test_failing_canary_is_rolled_back(sandbox, runner, env, build):
    before_tree = _overlay_tree(sandbox)
    stable_before = _production_images(sandbox)["api-gateway"][0]
    image, sha = build({"config/fail_rate.production": "30\n"}, "e2e: /v1/status fails 30% in production")
    run = _start(image, sha)
    _approve(run, env)
    done = _wait(run, _final, timeout=420, what="release finished")

    assert done.state.type == StateType.FAILED, done.state
    assert done.state.message.startswith("rolled back:"), done.state.message
    assert _overlay_tree(sandbox) == before_tree  # the folder equals its pre-release tree
    log = _manifests(sandbox, "log", "-3", "--format=%s%n%b", "--", OVERLAY)
    assert "rollback(production)" in log and "Undoes:" in log
    wait_until(lambda: _production_images(sandbox)["api-gateway"][0] == stable_before,
               timeout=60, what="production back on the old image")
    assert _production_images(sandbox)["api-gateway-canary"][1] == 0
    # Rolled back after the failure limit (2 failed intervals), well before the whole canary.
    commits = _manifests(sandbox, "log", "--format=%ct %s", "-5", "--", OVERLAY).splitlines()
    first_canary = min(int(c.split()[0]) for c in commits if "canary(production)" in c)
    rollback = max(int(c.split()[0]) for c in commits if "rollback(production)" in c)
    assert rollback - first_canary <= 3 * INTERVAL + 90


def test_a_slower_canary_is_rolled_back_on_p99(sandbox, runner, env, build):
    before_tree = _overlay_tree(sandbox)
    image, sha = build({"config/latency_ms.production": "300\n"}, "e2e: +300 ms per request in production")
    done = _release(image, sha, env)
    assert done.state.type == StateType.FAILED, done.state
    assert done.state.message.startswith("rolled back:") and "p99" in done.state.message
    assert _overlay_tree(sandbox) == before_tree


def test_no_traffic_is_never_promoted(sandbox, runner, env, build):
    from sandbox.faults import FaultClient

    before_tree = _overlay_tree(sandbox)
    image, sha = build({"www/release-e2e.txt": "nobody calls\n"}, "e2e: no traffic")
    run = _start(image, sha)
    _wait(run, _paused, timeout=300, what="release waiting for approval")
    faults = FaultClient(sandbox.control_url)
    faults.stop_load(namespace="production")
    try:
        _cli("approve", str(run.id), "--approver", "alice", env=env)
        done = _wait(run, _final, timeout=420, what="release finished")
    finally:
        faults.start_load(namespace="production")
        faults.close()
    assert done.state.type == StateType.FAILED, done.state
    assert "inconclusive" in done.state.message, done.state.message
    assert _overlay_tree(sandbox) == before_tree


def test_reject_leaves_production_untouched(sandbox, runner, env, build):
    before_tree = _overlay_tree(sandbox)
    image, sha = build({"www/release-e2e.txt": "rejected\n"}, "e2e: to be rejected")
    run = _start(image, sha)
    _wait(run, _paused, timeout=300, what="release waiting for approval")
    _cli("reject", str(run.id), "--approver", "bob", "--comment", "not today", env=env)
    done = _wait(run, _final, timeout=120, what="release finished")
    assert done.state.name == "Rejected" and "rejected by bob" in done.state.message
    assert _overlay_tree(sandbox) == before_tree


def test_expired_approval_ends_rejected_timed_out(sandbox, runner, env, build, monkeypatch):
    from core.settings import get_settings
    from flows.release import expire_approvals

    before_tree = _overlay_tree(sandbox)
    image, sha = build({"www/release-e2e.txt": "expires\n"}, "e2e: nobody decides")
    run = _start(image, sha)
    _wait(run, _paused, timeout=300, what="release waiting for approval")
    monkeypatch.setenv("ROBOTICS_CD_APPROVAL_TIMEOUT", "1s")
    get_settings.cache_clear()
    expired = anyio.run(expire_approvals)
    assert str(run.id) in expired
    done = _wait(run, _final, timeout=120, what="release finished")
    assert done.state.name == "Rejected" and done.state.message == "rejected: timed out"
    assert _overlay_tree(sandbox) == before_tree


def test_an_older_commit_is_refused_as_superseded(sandbox, runner, env, build):
    old_image, old_sha = build({"www/release-e2e.txt": "older\n"}, "e2e: older")
    new_image, new_sha = build({"www/release-e2e.txt": "newer\n"}, "e2e: newer")
    promoted = _release(new_image, new_sha, env)
    assert promoted.state.name == "Promoted", promoted.state
    before_tree = _overlay_tree(sandbox)
    done = _release(old_image, old_sha, env)
    assert done.state.name == "Superseded" and "superseded" in done.state.message
    assert _overlay_tree(sandbox) == before_tree


def test_a_second_release_waits_for_the_lock(sandbox, runner, env, build):
    from tasks import gitops

    image, sha = build({"www/release-e2e.txt": "waits\n"}, "e2e: waits for the lock")
    holder = f"other-release-{uuid.uuid4().hex[:6]}"
    gitops.take_lease.fn(SERVICE, "production", holder=holder, ttl=600)
    try:
        run = _start(image, sha)
        _approve(run, env)
        waiting = _wait(run, lambda r: bool(r.state and r.state.name == "AwaitingLock"),
                        timeout=180, what="release waiting on the lock")
        assert holder in (waiting.state.message or "")
        status = _cli("status", SERVICE, env=env)
        assert holder in status
    finally:
        gitops.release_lease.fn(SERVICE, "production", holder=holder)
    done = _wait(run, _final, timeout=420, what="release finished after the lock")
    assert done.state.name == "Promoted", done.state
