"""The whole path on the Kubernetes work pool: every flow run a Job on the Kubernetes twin.

On a sandbox of its own (the twin deletes pods gracefully, as a node does), the flow-run
image (sandbox/flowrun_image.py) is pushed to the sandbox registry, ``robotics-cd deploy
--pool-type kubernetes`` registers ci, release, rollback and reconcile on a Kubernetes pool
(host network, the sandbox's plain settings as job env, a results claim), and a real
``prefect worker start --type kubernetes`` (env stored as a Secret) runs every flow run as a
Job. The webhook receiver turns a ``git push`` into a CI run, as in production. Nothing here
runs a flow in the test's process or a served runner.

1. a push runs ``ci`` as a Job (its Docker builds through the DockerHost block's TCP URL, no
   docker.sock in the pod) and ``ci`` hands off a ``release`` Job;
2. the release suspends for its approval, its Job completes, and no pod of it is left
   running;
3. the approval's resume makes a NEW Job for the same flow run, which runs the canary and
   promotes: production runs the new digest;
4. (``test_a_deleted_flow_run_pod_mid_canary``) the release's pod is deleted through the
   Kubernetes API in the middle of its canary: production ends restored or promoted, never
   half, the lease free; what did it is printed (the worker's rescheduling or a crash
   followed by the rollback or the reconciler).

Full matrix only (the image and a whole sandbox: minutes). Results: docs/e2e-matrix.md.
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
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.objects import FlowRun, StateType

from deployments import register as reg
from sandbox import launcher
from sandbox.flowrun_image import default_cache, ensure_flow_run_image, push_flow_run_image
from sandbox.procs import http_ok, spawn, stop_pid, wait_until
from sandbox.registry import Registry
from tests.conftest import SESSION_DIR
from tests.e2e.releases import (
    CLI,
    FAST,
    OVERLAY,
    ROOT,
    cli,
    deployed,
    digest_of,
    manifests_git,
    overlay_tree,
    production_images,
    read_run,
)
from tests.fixtures_sandbox import SandboxHandle
from tests.matrix import full_matrix

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400), full_matrix]

NAMESPACE = "robotics-cd"
POOL = "robotics-cd-kubernetes-e2e"
RESULTS_CLAIM = "robotics-cd-results"
LEASE_REF = "refs/leases/api-gateway-production"
KUBECTL = str(Path(sys.executable).parent / "kubectl")
DEPLOYED = ("ci", "release", "rollback", "reconcile")
# Settings a flow-run pod must not inherit from the test's host: paths on this machine (the
# pod has its own filesystem and tools on PATH) and the API URL (the worker sets it).
HOST_ONLY = (
    "PREFECT_API_URL",
    "KUBECONFIG",
    "ROBOTICS_CD_SANDBOX_STATE",
    "ROBOTICS_CD_TRIVY",
    "ROBOTICS_CD_KUBECTL",
    "ROBOTICS_CD_WORKSPACE",
    "ARGOCD_SERVER",
    "ARGOCD_OPTS",
)
# A canary long enough for the pod deletion to land inside it.
LONG_CANARY = {"ROBOTICS_CD_CANARY_STEPS": "[25, 50, 100]", "ROBOTICS_CD_CANARY_ANALYSES": "2"}
# The reconciler is a scheduled deployment: each pass is a Job (a pod of the 1.3 GB image).
# Every 30 s (the default) would keep one of the two cores busy with pods starting.
RECONCILE = {"ROBOTICS_CD_RECONCILE_PERIOD": "120s"}


@pytest.fixture(scope="module")
def sandbox(prefect_server: Any) -> Iterator[SandboxHandle]:
    """This module's own sandbox: the session's Prefect server, pods deleted gracefully."""
    state = SESSION_DIR / f"kube-pool-sandbox-{uuid.uuid4().hex[:6]}"
    try:
        info = launcher.up(
            state,
            prefect_api_url=prefect_server.api_url,
            argocd_poll_seconds=1.0,
            echo=lambda _line: None,
            graceful_deletion=True,
        )
    except BaseException:
        launcher.down(state, purge=False)
        raise
    try:
        yield SandboxHandle(info)
    finally:
        launcher.down(state, purge=True)


def kubectl(sandbox: SandboxHandle, *args: str) -> str:
    done = subprocess.run(
        [KUBECTL, f"--kubeconfig={sandbox.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {done.stderr}")
    return done.stdout


def items(sandbox: SandboxHandle, kind: str) -> list[dict[str, Any]]:
    return list(json.loads(kubectl(sandbox, "get", kind, "-n", NAMESPACE, "-o", "json"))["items"])


def of_run(objects: list[dict[str, Any]], run_id: Any) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if (o["metadata"].get("labels") or {}).get("prefect.io/flow-run-id") == str(run_id)
    ]


def pod_env(sandbox: SandboxHandle) -> dict[str, str]:
    """The plain settings every flow-run Job gets (no credential: those are in blocks)."""
    env = {k: v for k, v in sandbox.env.items() if k not in HOST_ONLY}
    return {**env, **FAST, **LONG_CANARY, **RECONCILE}


@pytest.fixture(scope="module")
def flow_run_image(sandbox: SandboxHandle) -> str:
    built = ensure_flow_run_image(default_cache())
    user, password = sandbox.registry_auth
    registry = Registry(sandbox.registry, user, password, sandbox.state_dir / "registry")
    return push_flow_run_image(registry, built.image)


@pytest.fixture(scope="module")
def pool(
    sandbox: SandboxHandle,
    env: dict[str, str],
    flow_run_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Path]:
    """deploy --pool-type kubernetes, the worker and the webhook receiver; yields the logs."""
    logs = tmp_path_factory.mktemp("kube-pool")
    for path, obj in (
        (
            "namespace.json",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        ),
        (
            "claim.json",
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": RESULTS_CLAIM, "namespace": NAMESPACE},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        ),
    ):
        (logs / path).write_text(json.dumps(obj))
        kubectl(sandbox, "apply", "--validate=false", "-f", str(logs / path))
    host_env = {**os.environ, **env, **RECONCILE}
    deploy = [CLI, "deploy", "--pool-type", "kubernetes", "--pool", POOL]
    deploy += ["--image", flow_run_image, "--namespace", NAMESPACE, "--host-network"]
    deploy += ["--results-claim", RESULTS_CLAIM]
    deploy += [arg for name in DEPLOYED for arg in ("--only", name)]
    deploy += [
        arg for k, v in sorted(pod_env(sandbox).items()) for arg in ("--job-env", f"{k}={v}")
    ]
    done = subprocess.run(
        deploy, env=host_env, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (logs / "deploy.log").write_text(done.stdout + done.stderr)
    worker = spawn(
        [
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            "--pool",
            POOL,
            "--type",
            "kubernetes",
        ],
        log=logs / "worker.log",
        env={
            **host_env,
            **reg.KUBERNETES_WORKER_ENV,
            "KUBECONFIG": str(sandbox.kubeconfig),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        },
        cwd=ROOT,
    )
    port = sandbox.env["ROBOTICS_CD_WEBHOOK_PORT"]
    receiver = spawn(
        [CLI, "webhook", "serve", "--port", port], log=logs / "webhook.log", env=host_env, cwd=ROOT
    )
    try:
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{port}/healthz"),
            timeout=60,
            what=f"webhook receiver (log: {logs / 'webhook.log'})",
        )
        wait_until(lambda: deployed(*(f"{n}/{n}" for n in DEPLOYED)), timeout=60, what="deployed")
        yield logs
    finally:
        stop_pid(receiver.pid)
        stop_pid(worker.pid)
        print(f"logs: {logs}")


def runs_of(deployment: str, match: Callable[[FlowRun], bool]) -> list[FlowRun]:
    async def read() -> list[FlowRun]:
        async with get_client() as client:
            found: list[FlowRun] = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))
            )
        return [r for r in found if match(r)]

    return anyio.run(read)


def wait_for(
    what: str, probe: Callable[[], Any], *, timeout: float, logs: Path | None = None
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with the worker's log tail."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = (logs / "worker.log").read_text()[-4000:] if logs else ""
            pytest.fail(f"{what}: not within {timeout:.0f}s\n{tail}")
        time.sleep(2)


def state_of(run_id: Any) -> tuple[StateType | None, str, str]:
    state = read_run(run_id).state
    return (state.type, state.name or "", state.message or "") if state else (None, "", "")


def not_failed(run_id: Any, what: str) -> bool:
    """Fail the test at once if the run ended badly; else False, so that
    ``not_failed(run) or <condition>`` reads as the condition."""
    kind, name, message = state_of(run_id)
    if kind in (StateType.FAILED, StateType.CRASHED, StateType.CANCELLED):
        pytest.fail(f"{what}: the run ended {name}: {message}")
    return False


def finished(run_id: Any) -> bool:
    state = read_run(run_id).state
    return state is not None and state.is_final()


def push_commit(sandbox: SandboxHandle, tmp: Path, marker: str) -> str:
    work = tmp / f"robotics-api-{uuid.uuid4().hex[:6]}"
    sandbox.clone("robotics-api", work)
    try:
        return str(
            sandbox.commit_and_push(
                work, f"e2e: kubernetes pool {marker}", {"www/e2e-kube.txt": f"{marker}\n"}
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def lease_held(sandbox: SandboxHandle) -> bool:
    return bool(manifests_git(sandbox, "for-each-ref", "--format=%(refname)", LEASE_REF).strip())


def running_pods_of(sandbox: SandboxHandle, run_id: Any) -> list[str]:
    return [
        p["metadata"]["name"]
        for p in of_run(items(sandbox, "pods"), run_id)
        if (p.get("status") or {}).get("phase") in ("Pending", "Running")
    ]


def approvals_requested(sandbox: SandboxHandle, image: str) -> int:
    """'Approval needed' chat messages naming this image's tag (one per suspension)."""
    tag = image.split("@")[0].rsplit(":", 1)[1]
    return sum(
        1
        for c in sandbox.chat("slack")
        if "Approval needed" in json.dumps(c) and tag in json.dumps(c)
    )


def push_to_suspended_release(
    sandbox: SandboxHandle, tmp: Path, logs: Path, marker: str
) -> tuple[FlowRun, FlowRun, float]:
    """Push a commit; the CI run (a Job) builds and hands off a release (a Job) that
    suspends for approval. (ci run, release run, seconds from push to CI Running)."""
    pushed_wall = datetime.now(UTC)
    sha = push_commit(sandbox, tmp, marker)
    [ci] = wait_for(
        "a CI run of the push",
        lambda: runs_of("ci", lambda r: r.parameters.get("sha") == sha),
        timeout=120,
        logs=logs,
    )
    started = wait_for(
        "the CI run Running",
        lambda: not_failed(ci.id, "ci") or read_run(ci.id).start_time,
        timeout=300,
        logs=logs,
    )
    wait_for(
        "CI completed",
        lambda: not_failed(ci.id, "ci") or state_of(ci.id)[0] == StateType.COMPLETED,
        timeout=900,
        logs=logs,
    )
    [release] = wait_for(
        "the release handed off by CI",
        lambda: runs_of("release", lambda r: r.parameters.get("source_sha") == sha),
        timeout=120,
        logs=logs,
    )
    wait_for(
        "the release suspended for approval",
        lambda: not_failed(release.id, "release") or state_of(release.id)[0] == StateType.PAUSED,
        timeout=900,
        logs=logs,
    )
    return ci, release, (started - pushed_wall).total_seconds()


def test_a_push_runs_ci_then_release_as_jobs_and_the_resume_is_a_new_job(
    sandbox: SandboxHandle, env: dict[str, str], pool: Path, tmp_path: Path
) -> None:
    pushed_at = time.monotonic()
    ci, release, to_running = push_to_suspended_release(
        sandbox, tmp_path, pool, uuid.uuid4().hex[:8]
    )
    print(f"webhook → CI run Running on the Kubernetes pool: {to_running:.1f}s")

    # 1. CI ran as a Job with no docker.sock (its builds went through the DockerHost block's
    # TCP URL), and handed off a top-level release, which ran as its own Job.
    [ci_job] = of_run(items(sandbox, "jobs"), ci.id)
    pod_spec = ci_job["spec"]["template"]["spec"]
    assert pod_spec["hostNetwork"] is True
    assert not [v for v in pod_spec.get("volumes") or [] if "hostPath" in v], pod_spec["volumes"]
    assert (ci_job.get("status") or {}).get("succeeded") == 1, ci_job.get("status")
    assert release.parent_task_run_id is None
    image = str(release.parameters["image"])

    # 2. Suspended for approval: its Job completed; no pod of it is left running.
    [first_job] = wait_for(
        "the suspended release's Job complete",
        lambda: [
            j
            for j in of_run(items(sandbox, "jobs"), release.id)
            if (j.get("status") or {}).get("succeeded")
        ],
        timeout=120,
    )
    wait_for(
        "no pod of the suspended release running",
        lambda: not running_pods_of(sandbox, release.id),
        timeout=120,
    )
    everything = [
        (p["metadata"]["name"], (p.get("status") or {}).get("phase"))
        for p in items(sandbox, "pods")
    ]
    print(f"pods while the release waits for approval: {everything}")

    # 3. The approval resumes it in a new Job, which runs the canary and promotes; nothing
    # before the approval runs again (its results are on the results claim).
    approved_at = time.monotonic()
    cli("approve", str(release.id), "--approver", "alice", "--comment", "e2e k8s", env=env)
    wait_for(
        "a second Job for the resumed release",
        lambda: len(of_run(items(sandbox, "jobs"), release.id)) >= 2,
        timeout=180,
        logs=pool,
    )
    wait_for(
        "the resumed release finished",
        lambda: finished(release.id),
        timeout=900,
        logs=pool,
    )
    kind, name, message = state_of(release.id)
    assert (kind, name) == (StateType.COMPLETED, "Promoted"), f"{name}: {message}"
    jobs = of_run(items(sandbox, "jobs"), release.id)
    assert len(jobs) == 2, [j["metadata"]["name"] for j in jobs]
    assert first_job["metadata"]["uid"] in {j["metadata"]["uid"] for j in jobs}
    running = production_images(sandbox)["api-gateway"][0]
    assert running.endswith(digest_of(image)), (running, image)
    assert not lease_held(sandbox)
    assert approvals_requested(sandbox, image) == 1
    print(
        f"resume → Promoted in a new Job: {time.monotonic() - approved_at:.0f}s; "
        f"push → Promoted: {time.monotonic() - pushed_at:.0f}s"
    )


def test_a_deleted_flow_run_pod_mid_canary_ends_with_production_restored(
    sandbox: SandboxHandle, env: dict[str, str], pool: Path, tmp_path: Path
) -> None:
    before_tree = overlay_tree(sandbox)
    stable_before = production_images(sandbox)["api-gateway"][0]
    _, run, _ = push_to_suspended_release(sandbox, tmp_path, pool, uuid.uuid4().hex[:8])
    image = str(run.parameters["image"])
    cli("approve", str(run.id), "--approver", "alice", "--comment", "e2e k8s", env=env)
    wait_for(
        "the release's first canary commit",
        lambda: str(run.id) in manifests_git(sandbox, "log", "-3", "--format=%b", "--", OVERLAY),
        timeout=600,
        logs=pool,
    )
    assert lease_held(sandbox)
    [pod] = wait_for(
        "the release's running pod", lambda: running_pods_of(sandbox, run.id), timeout=60
    )
    deleted_at = time.monotonic()
    kubectl(sandbox, "delete", "pod", pod, "-n", NAMESPACE, "--wait=false")

    def settled() -> bool:
        if lease_held(sandbox):
            return False
        running = production_images(sandbox)["api-gateway"][0]
        restored = overlay_tree(sandbox) == before_tree and running == stable_before
        return restored or running.endswith(digest_of(image))

    wait_for("production restored or promoted, lease free", settled, timeout=900, logs=pool)
    recovered = time.monotonic() - deleted_at
    wait_for("the release's final state", lambda: finished(run.id), timeout=300)
    kind, name, message = state_of(run.id)
    running = production_images(sandbox)["api-gateway"][0]
    jobs = [j["metadata"]["name"] for j in of_run(items(sandbox, "jobs"), run.id)]
    states = [f"{s.type.value}/{s.name}" for s in run_states(run.id)]
    rollbacks = runs_of("rollback", lambda r: str(run.id) in json.dumps(r.parameters, default=str))
    if running == stable_before:
        assert overlay_tree(sandbox) == before_tree
        assert kind in (StateType.CRASHED, StateType.FAILED, StateType.CANCELLED), name
        outcome = "restored"
    else:
        assert (kind, name) == (StateType.COMPLETED, "Promoted"), f"{name}: {message}"
        outcome = "promoted"
    # The deleted pod's Job failed (backoffLimit 0); no second pod of it ever ran the flow.
    for job in of_run(items(sandbox, "jobs"), run.id):
        assert int((job.get("status") or {}).get("failed", 0)) <= 1, job["status"]
    # However it ended, the approval was asked for once: nothing before it ran again.
    assert approvals_requested(sandbox, image) == 1
    print(
        f"pod deleted mid-canary: release ended {name}: {message!r}; states {states}; "
        f"jobs {jobs}; rollback runs {[r.name for r in rollbacks]}; production {outcome} "
        f"{recovered:.0f}s after the deletion"
    )


def run_states(run_id: Any) -> list[Any]:
    async def read() -> list[Any]:
        async with get_client() as client:
            return list(await client.read_flow_run_states(run_id))

    return anyio.run(read)
