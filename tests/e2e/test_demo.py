"""``robotics-cd demo --fast`` on a fresh sandbox: the whole story, judged from the outside.

The demo runs as a subprocess, exactly as a newcomer starts it (no Prefect variables from
the test session: it starts its own sandbox and Prefect server in a fresh state dir). The
assertions never read its printout: they read the Prefect API (the runs of each deployment,
their final states) and the sandbox (the Kubernetes twin's production Deployment and canary
Ingress, the PyTorchJob, the manifests repo's history). Then everything the demo started is
stopped: its served runner and webhook receiver (pid files, in case it was killed) and the
sandbox.

The only full-path replay in CI: budget ~8 minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.objects import FlowRun, StateType

from sandbox import launcher
from sandbox.procs import stop_pidfile

DEMO_TIMEOUT = 600
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(DEMO_TIMEOUT + 180)]

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "robotics-cd")


@dataclass
class DemoRun:
    proc: subprocess.CompletedProcess[str]
    sb: launcher.Sandbox

    @property
    def output_tail(self) -> str:
        return (self.proc.stdout + self.proc.stderr)[-4000:]

    def git_log(self, repo: str, count: int = 20) -> list[tuple[str, str, str]]:
        """(sha, subject, body) of the newest commits on main of a sandbox repo."""
        out = subprocess.run(
            [
                "git",
                "--git-dir",
                str(Path(self.sb.git_base) / f"{repo}.git"),
                "log",
                f"-{count}",
                "--format=%H%x1f%s%x1f%b%x1e",
                "main",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        entries = [e.strip("\n") for e in out.split("\x1e") if e.strip()]
        return [tuple(e.split("\x1f", 2)) for e in entries]  # type: ignore[misc]

    def runs(self, deployment: str, match: Callable[[FlowRun], bool]) -> list[FlowRun]:
        with SyncPrefectClient(self.sb.prefect_api_url) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))
            )
        return [r for r in runs if match(r)]

    def kube(self, path: str) -> dict[str, Any]:
        client = launcher.KubeClient(Path(self.sb.kubeconfig))
        try:
            response = client.client.get(path)
            response.raise_for_status()
            return dict(response.json())
        finally:
            client.close()


def _fresh_shell_env() -> dict[str, str]:
    """The environment of a newcomer's shell: none of the test session's Prefect settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ROBOTICS_CD_"))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    state = tmp_path_factory.mktemp("demo") / "sandbox"
    try:
        try:
            proc = subprocess.run(
                [CLI, "demo", "--fast", "--state", str(state)],
                cwd=ROOT,
                env=_fresh_shell_env(),
                capture_output=True,
                text=True,
                timeout=DEMO_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout
            pytest.fail(f"robotics-cd demo --fast ran over {DEMO_TIMEOUT}s:\n{(out or '')[-4000:]}")
        yield DemoRun(proc, launcher.Sandbox.load(state))
    finally:
        # The demo stops its runner and receiver itself; these pid files outlive a killed demo.
        for name in ("webhook", "serve"):
            stop_pidfile(state / "demo" / f"{name}.pid")
        launcher.down(state, purge=True)


def _with_param(name: str, value: str) -> Callable[[FlowRun], bool]:
    return lambda run: run.parameters.get(name) == value


def _release(demo: DemoRun, source_sha: str) -> FlowRun:
    runs = demo.runs("release", lambda r: r.parameters.get("source_sha") == source_sha)
    assert len(runs) == 1, f"expected one release of {source_sha[:7]}, got {len(runs)}"
    return runs[0]


def test_demo_exits_zero(demo: DemoRun) -> None:
    assert demo.proc.returncode == 0, demo.output_tail


def test_good_release_promoted_and_bad_one_rolled_back(demo: DemoRun) -> None:
    (bad_sha, bad_subject, _), (good_sha, _, _) = demo.git_log("robotics-api", 2)
    assert "fail_rate" in bad_subject, demo.output_tail

    good = _release(demo, good_sha)
    assert good.state is not None and good.state.type == StateType.COMPLETED, good.state
    assert good.state.name == "Promoted", good.state

    bad = _release(demo, bad_sha)
    assert bad.state is not None and bad.state.type == StateType.FAILED, bad.state
    assert "rolled back" in (bad.state.message or ""), bad.state.message

    # Each came from one completed CI run of its commit (the webhook's hand-off).
    for sha in (good_sha, bad_sha):
        ci = demo.runs("ci", _with_param("sha", sha))
        assert [c.state.type for c in ci if c.state] == [StateType.COMPLETED], sha


def test_production_runs_release_one_with_no_canary_traffic(demo: DemoRun) -> None:
    (_, _, _), (good_sha, _, _) = demo.git_log("robotics-api", 2)
    digest = str(_release(demo, good_sha).parameters["image"]).rsplit("@", 1)[1]

    deployment = demo.kube("/apis/apps/v1/namespaces/production/deployments/api-gateway")
    images = [c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    assert images and images[0].endswith(digest), images
    assert deployment["status"].get("readyReplicas") == deployment["spec"]["replicas"]

    canary = demo.kube(
        "/apis/networking.k8s.io/v1/namespaces/production/ingresses/api-gateway-canary"
    )
    assert canary["metadata"]["annotations"]["nginx.ingress.kubernetes.io/canary-weight"] == "0"

    # And it answers: every /v1/status through the production ingress is a 2xx (a request
    # that times out on a busy machine is no answer, so it is not judged).
    codes = []
    with httpx.Client(base_url=demo.sb.ingress["production"], timeout=10) as client:
        for _ in range(20):
            try:
                codes.append(
                    client.get("/v1/status", headers={"Host": "api.robotics.local"}).status_code
                )
            except httpx.TimeoutException:
                continue
    assert codes and all(code < 300 for code in codes), codes


def test_manifests_repo_shows_the_rollback_commit(demo: DemoRun) -> None:
    log = demo.git_log("robotics-k8s-manifests", 40)
    rollbacks = [
        (sha, subject, body)
        for sha, subject, body in log
        if subject.startswith("rollback(production): api-gateway")
    ]
    assert rollbacks, [subject for _, subject, _ in log]
    _, _, body = rollbacks[0]
    assert "rolled back" in body and "Undoes: " in body, body
    # The newest production change is that rollback: nothing moved production after it.
    newest_production = next(s for _, s, _ in log if "production" in s)
    assert newest_production.startswith("rollback(production)"), newest_production


def test_training_image_then_train_one_master_two_workers(demo: DemoRun) -> None:
    ((sha, subject, _),) = demo.git_log("robotics-training", 1)
    assert "configs/" in subject, subject
    images = demo.runs("training-image", lambda r: r.parameters.get("sha") == sha)
    assert [r.state.type for r in images if r.state] == [StateType.COMPLETED]

    experiment = f"demo-{sha[:7]}"
    trains = demo.runs(
        "train", lambda r: (r.parameters.get("params") or {}).get("experiment") == experiment
    )
    assert [r.state.type for r in trains if r.state] == [StateType.COMPLETED]

    short = str(trains[0].id).replace("-", "")[:8]
    job = demo.kube(f"/apis/kubeflow.org/v1/namespaces/training/pytorchjobs/{experiment}-{short}")
    replicas = {k: v["replicas"] for k, v in job["spec"]["pytorchReplicaSpecs"].items()}
    assert replicas == {"Master": 1, "Worker": 2}
    conditions = {c["type"]: c["status"] for c in job["status"]["conditions"]}
    assert conditions.get("Succeeded") == "True", job["status"]["conditions"]
