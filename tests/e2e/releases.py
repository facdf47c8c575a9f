"""Helpers of the release e2e modules: start, wait, approve, read git and the cluster."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from prefect import get_client
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.deployments.flow_runs import arun_deployment

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


@contextlib.contextmanager
def served_releases(
    env: dict[str, str], logs: Path, *, also: tuple[str, ...] = ()
) -> Iterator[Path]:
    """``robotics-cd serve`` of release and rollback (and the flows named in ``also``, e.g.
    ``release-train``), as the embedded default runs them; yields its log."""
    from sandbox.procs import spawn, stop_pid, wait_until

    flows = ["release", "rollback", *also]
    served = spawn(
        [CLI, "serve", *(arg for name in flows for arg in ("--only", name))],
        log=logs / "serve.log",
        env=env,
        cwd=ROOT,
    )
    try:
        wait_until(
            lambda: deployed(*(f"{name}/{name}" for name in flows)),
            timeout=120,
            what=f"served deployments (log: {logs / 'serve.log'})",
        )
        yield logs / "serve.log"
    finally:
        stop_pid(served.pid)


def deployed(*names: str) -> bool:
    async def read() -> bool:
        async with get_client() as client:
            for name in names:
                await client.read_deployment_by_name(name)
        return True

    try:
        return anyio.run(read)
    except Exception:
        return False


def start_release(image: str, sha: str, *, service: str = SERVICE) -> FlowRun:
    async def go() -> FlowRun:
        run: FlowRun = await arun_deployment(
            "release/release",
            parameters={
                "service": service,
                "image": image,
                "source_sha": sha,
                # built here with `docker build`, not by a ci run (issue #24, item 1)
                "provenance_override_reason": "e2e: image built by the test, not by ci",
            },
            timeout=0,
            as_subflow=False,
        )
        return run

    return anyio.run(go)


def read_run(run_id: Any) -> FlowRun:
    async def go() -> FlowRun:
        async with get_client() as client:
            return await client.read_flow_run(run_id)

    return anyio.run(go)


def wait_run(
    run: FlowRun, done: Callable[[FlowRun], bool], *, timeout: float, what: str
) -> FlowRun:
    deadline = time.monotonic() + timeout
    current = read_run(run.id)
    while not done(current):
        state = current.state
        if state is not None and state.is_final() and not done(current):
            pytest.fail(f"{what}: release ended {state.name}: {state.message}")
        if time.monotonic() > deadline:
            pytest.fail(
                f"{what} not reached in {timeout:.0f}s (state: "
                f"{state.name if state else None}: {state.message if state else ''})"
            )
        time.sleep(1)
        current = read_run(run.id)
    return current


def state_of(run: FlowRun) -> State:
    """A run's state: every run read back from the server has one."""
    assert run.state is not None, f"flow run {run.id} has no state"
    return run.state


def is_crashed(run: FlowRun) -> bool:
    return run.state is not None and run.state.type == StateType.CRASHED


def is_paused(run: FlowRun) -> bool:
    return run.state is not None and run.state.type == StateType.PAUSED


def is_final(run: FlowRun) -> bool:
    return run.state is not None and run.state.is_final()


def cli(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [CLI, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"robotics-cd {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def manifests_git(sandbox: Any, *args: str) -> str:
    return str(
        sandbox.git("--git-dir", str(sandbox.git_base / "robotics-k8s-manifests.git"), *args)
    )


def overlay_tree(sandbox: Any) -> str:
    return manifests_git(sandbox, "rev-parse", f"main:{OVERLAY}")


def production_images(sandbox: Any) -> dict[str, Any]:
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "kubectl"),
            "--kubeconfig",
            str(sandbox.kubeconfig),
            "get",
            "deploy",
            "-n",
            "production",
            "-o",
            "json",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return {
        d["metadata"]["name"]: (
            d["spec"]["template"]["spec"]["containers"][0]["image"],
            d["spec"].get("replicas"),
        )
        for d in json.loads(out)["items"]
    }


def approve_run(run: FlowRun, env: dict[str, str]) -> None:
    wait_run(run, is_paused, timeout=300, what="release waiting for approval after staging")
    cli("approve", str(run.id), "--approver", "alice", "--comment", "e2e", env=env)


def release_approved(image: str, sha: str, env: dict[str, str]) -> FlowRun:
    run = start_release(image, sha)
    approve_run(run, env)
    return wait_run(run, is_final, timeout=420, what="release finished")


def digest_of(image: str) -> str:
    return image.split("@", 1)[1]


def events_named(name: str, since: Any) -> list[Any]:
    """Every event of this name on the Prefect server since ``since`` (the server pages by 50
    at most)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    async def read() -> list[Any]:
        async with get_client() as client:
            page = await client.read_events(
                filter=EventFilter(
                    occurred=EventOccurredFilter(since=since),
                    event=EventNameFilter(name=[name]),
                ),
                limit=50,
            )
            events = list(page.events)
            while page.next_page:
                page = await client.read_events_page(str(page.next_page))
                events.extend(page.events)
        return events

    return anyio.run(read)


def release_runs_since(since: Any) -> list[FlowRun]:
    """Every run of the release deployment created since ``since``."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
    )

    async def read() -> list[FlowRun]:
        async with get_client() as client:
            runs: list[FlowRun] = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)),
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["release"])),
            )
            return runs

    return anyio.run(read)


def record_of(run_id: Any) -> str:
    """The release record (markdown) a run published, '' when none yet."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read() -> str:
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
            )
        return "\n".join(str(a.data) for a in artifacts if (a.key or "").startswith("release-"))

    return anyio.run(read)


def staging_image(sandbox: Any) -> str:
    """The staging overlay's kustomization on the manifests branch."""
    return manifests_git(
        sandbox, "show", "main:serving/api-gateway/overlays/staging/kustomization.yaml"
    )


class ArgvWatch:
    """Samples every process's argv while a release runs: does ``secret`` ever show?"""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.git_seen = 0
        self.leaks: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes() if pid.isdigit() else b""
                except OSError:
                    continue
                self.git_seen += argv.startswith(b"git\0")
                if self.secret in argv:
                    self.leaks.append(argv.decode(errors="replace"))
            time.sleep(0.01)

    def __enter__(self) -> ArgvWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
