"""Webhook → CI run Running, on the process pool and on the Kubernetes pool, in one run.

On one sandbox (its own Prefect server; the twin deletes pods gracefully), with the
webhook receiver (``robotics-cd webhook serve``) and the flow-run image pushed to the
sandbox registry, for each pool type in turn:

1. ``robotics-cd deploy --pool-type <type> --only ci`` (the same ``ci/ci`` deployment moved
   to that pool; the Kubernetes one as tests/e2e/test_kubernetes_pool.py deploys it: host
   network, the sandbox's plain settings as job env);
2. ``prefect worker start --type <type>`` polling every second
   (``PREFECT_WORKER_QUERY_SECONDS=1``);
3. ``--pushes`` commits to robotics-api, one at a time: from the start of ``git push`` (the
   GitHub twin delivers the signed webhook from the post-receive hook) to the CI run's
   ``start_time`` (the flow engine's Running); then the run is cancelled (the Kubernetes
   worker deletes its Job) and the next push waits for it to end, so each push meets an
   idle machine.

Process pool: worker poll + a ``python -m prefect.engine`` process on the host. Kubernetes
pool: worker poll + Secret and Job creation + the twin's pod (a container of the 1.3 GB
image, already pulled after the first) + the same engine start inside it.

``--write`` replaces the section "Webhook → CI run Running: process pool vs Kubernetes pool"
of docs/benchmarks.md. Run (slow: a sandbox, the image): ``/work/bin/heavy
.venv/bin/python -m bench.bench_pools [--pushes 3] [--write]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Webhook → CI run Running: process pool vs Kubernetes pool"
CLI = str(Path(sys.executable).parent / "robotics-cd")
KUBECTL = str(Path(sys.executable).parent / "kubectl")
NAMESPACE = "robotics-cd"
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


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def kubectl(sb: Any, *args: str) -> None:
    subprocess.run(
        [KUBECTL, f"--kubeconfig={sb.kubeconfig}", *args],
        check=True,
        capture_output=True,
        timeout=60,
    )


def push(sb: Any, work_root: Path, marker: str) -> str:
    work = work_root / marker
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@robotics.local"]
    subprocess.run(
        [*git, "clone", "-q", sb.repo_url("robotics-api"), str(work)], check=True, timeout=60
    )
    (work / "www").mkdir(exist_ok=True)
    (work / "www" / "bench-pools.txt").write_text(f"{marker}\n")
    subprocess.run([*git, "-C", str(work), "add", "-A"], check=True, timeout=60)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", f"bench {marker}"], check=True)
    sha = subprocess.run(
        [*git, "-C", str(work), "rev-parse", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    subprocess.run([*git, "-C", str(work), "push", "-q", "origin", "HEAD:main"], check=True)
    shutil.rmtree(work, ignore_errors=True)
    return sha


def ci_run_of(sha: str) -> Any:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["ci"]))
        )
    found = [r for r in runs if r.parameters.get("sha") == sha]
    return found[0] if found else None


def cancel_and_wait(run_id: Any, timeout: float = 180) -> str:
    from prefect import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelling(), force=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_final():
                return str(state.name)
            time.sleep(1)
    return "still cancelling"


def measure(sb: Any, pool_type: str, pushes: int, env: dict[str, str], work: Path) -> list[float]:
    from sandbox.procs import spawn, stop_pid

    pool = f"bench-{pool_type}"
    deploy = [CLI, "deploy", "--pool-type", pool_type, "--pool", pool, "--only", "ci"]
    if pool_type == "kubernetes":
        pod_env = {k: v for k, v in sb.env().items() if k not in HOST_ONLY}
        deploy += ["--image", env["BENCH_IMAGE"], "--namespace", NAMESPACE, "--host-network"]
        deploy += [a for k, v in sorted(pod_env.items()) for a in ("--job-env", f"{k}={v}")]
    subprocess.run(deploy, env=env, check=True, capture_output=True, timeout=300, cwd=REPO)
    worker_env = {
        **env,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "KUBECONFIG": sb.kubeconfig,
        "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_STORE_ENV_AS_SECRET": "true",
    }
    worker = spawn(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", pool_type],
        log=work / f"worker-{pool_type}.log",
        env=worker_env,
        cwd=REPO,
    )
    latencies = []
    try:
        time.sleep(10)  # the worker's first poll and (Kubernetes) its observer's start
        for i in range(pushes):
            marker = f"{pool_type}-{i}-{uuid.uuid4().hex[:6]}"
            started_wall = datetime.now(UTC)
            sha = push(sb, work, marker)
            deadline = time.monotonic() + 300
            run = None
            while time.monotonic() < deadline:
                run = ci_run_of(sha)
                if run is not None and run.start_time is not None:
                    break
                time.sleep(0.2)
            if run is None or run.start_time is None:
                raise RuntimeError(f"{pool_type}: no Running CI run of {sha[:7]} in 300 s")
            seconds = (run.start_time - started_wall).total_seconds()
            latencies.append(seconds)
            ended = cancel_and_wait(run.id)
            print(f"{pool_type} push {i + 1}: Running after {seconds:.2f}s (then {ended})")
            time.sleep(3)
    finally:
        stop_pid(worker.pid)
    return latencies


def report(results: dict[str, list[float]], extra: dict[str, Any]) -> str:
    lines = [
        f"`python -m bench.bench_pools --pushes {extra['pushes']}`, {extra['date']}, "
        f"{extra['machine']}, load average at the start {extra['load']}. From the start of "
        "`git push` to robotics-api (the GitHub twin's signed delivery from the post-receive "
        "hook, the receiver's `create_flow_run`) to the CI run's `start_time` (Running); each "
        "run then cancelled and ended before the next push. Both workers poll every second.",
        "",
        "| pool | pushes | each (s) | median (s) | max (s) |",
        "|---|---:|---|---:|---:|",
    ]
    for pool_type, values in results.items():
        each = ", ".join(f"{v:.1f}" for v in values)
        lines.append(
            f"| {pool_type} | {len(values)} | {each} | {quantile(values, 0.5):.1f} | "
            f"{max(values):.1f} |"
        )
    lines += [
        "",
        "What the Kubernetes pool adds: the worker's Secret and Job, the twin's Job "
        "controller and kubelet (a container of the flow-run image, already in the engine), "
        "and the flow engine's start inside the new "
        f"container. Image: `{extra['image']}`.",
    ]
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{SECTION}\n\n{text}"
    if SECTION in doc:
        start = doc.index(SECTION)
        end = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + block.rstrip("\n") + "\n" + (doc[end:] if end != -1 else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    DOC.write_text(doc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    from sandbox import launcher
    from sandbox.flowrun_image import default_cache, ensure_flow_run_image, push_flow_run_image
    from sandbox.procs import http_ok, spawn, stop_pid, wait_until
    from sandbox.registry import Registry

    work = Path(tempfile.mkdtemp(prefix="bench-pools-"))
    state = work / "sandbox"
    load = os.getloadavg()[0]
    sb = launcher.up(state, graceful_deletion=True, echo=print)
    receiver = None
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Prefect read its settings when the launcher imported it: point this process at the
    # sandbox's server explicitly.
    settings = temporary_settings(updates={PREFECT_API_URL: sb.prefect_api_url})
    settings.__enter__()
    try:
        env = {**os.environ, **sb.env(), "PREFECT_API_URL": sb.prefect_api_url}
        built = ensure_flow_run_image(default_cache())
        registry = Registry(sb.registry, sb.registry_username, sb.registry_password, state)
        image = push_flow_run_image(registry, built.image)
        env["BENCH_IMAGE"] = image
        ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        (work / "ns.json").write_text(json.dumps(ns))
        kubectl(sb, "apply", "--validate=false", "-f", str(work / "ns.json"))
        port = str(sb.ports["webhook"])
        receiver = spawn(
            [CLI, "webhook", "serve", "--port", port],
            log=work / "webhook.log",
            env=env,
            cwd=REPO,
        )
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=60, what="hook")
        results = {
            pool_type: measure(sb, pool_type, args.pushes, env, work)
            for pool_type in ("process", "kubernetes")
        }
    finally:
        settings.__exit__(None, None, None)
        if receiver is not None:
            stop_pid(receiver.pid)
        launcher.down(state, purge=True)
    text = report(
        results,
        {
            "pushes": args.pushes,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{os.cpu_count()} cores, {platform.python_version()}",
            "load": f"{load:.1f}",
            "image": image,
        },
    )
    print(text)
    if args.write:
        write_section(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
