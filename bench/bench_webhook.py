"""Webhook receipt: how fast a signed GitHub delivery becomes a Running flow run, and how many
signed requests per second the receiver answers. Loopback only, bounded in count and time.

Setup: a Prefect server (a private one, or ``$PREFECT_API_URL`` with ``--reuse``), a probe
flow served as a deployment by a runner subprocess (``PREFECT_RUNNER_POLL_FREQUENCY`` =
``--poll``), and the receiver (``deployments.webhook.create_app``) under uvicorn on
127.0.0.1, with a catalog whose service is octokit's example repository.

1. **Latency**: ``--deliveries`` (50) pushes, one at a time (the next once the previous run
   is Running), each with a new ``X-GitHub-Delivery``; per delivery: sent → 202 (the
   receiver, Prefect API call included) and sent → the run's Running state timestamp
   (runner poll + flow-run process start). p50/p95.
2. **Throughput**: closed-loop clients posting signed deliveries for ``--seconds`` each (at
   most ``--max-requests``): ``ignored`` (a push to another branch: size cap, HMAC, JSON,
   payload model, routing — no Prefect call), ``redelivered`` (the same delivery again:
   one idempotent ``create_flow_run`` per request), and ``bad-signature`` (401).

``--write`` puts the tables into docs/benchmarks.md, section "Webhook receipt" (only that
section is replaced). Run: ``.venv/bin/python -m bench.bench_webhook [--deliveries 50]
[--gap 0.2] [--poll 1] [--levels 1,4,16] [--seconds 5] [--write]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Webhook receipt"
OCTOKIT = REPO / "tests" / "fixtures" / "octokit" / "push.json"
SECRET = "bench-webhook-secret"
PROBE_DEPLOYMENT = "bench-webhook-ci/bench"

PROBE_SOURCE = """
from prefect import flow

@flow(name="bench-webhook-ci")
def bench_ci(service: str, sha: str, ref: str, event: str, fork: bool = False) -> str:
    return sha

if __name__ == "__main__":
    bench_ci.serve(name="bench", print_starting_message=False, limit=8)
"""


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Platform:
    """Everything the benchmark starts, stopped by ``close``."""

    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    url: str = ""
    prefect_home: Path | None = None

    def close(self) -> None:
        from sandbox.prefect_server import stop_prefect_server
        from sandbox.procs import stop_pid

        if self.server:
            self.server.should_exit = True
        if self.thread:
            self.thread.join(timeout=10)
        for proc in self.procs:
            stop_pid(proc.pid)
        if self.prefect_home:
            stop_prefect_server(self.prefect_home)


def start_platform(workdir: Path, *, poll: float, reuse: bool) -> Platform:
    from sandbox.prefect_server import prefect_env, start_prefect_server
    from sandbox.procs import free_port, wait_until

    platform_ = Platform(workdir)
    if not reuse:
        home, port = workdir / "prefect", free_port()
        os.environ.update(prefect_env(home, port))
        start_prefect_server(home, port=port)
        platform_.prefect_home = home
    os.environ["PREFECT_RUNNER_POLL_FREQUENCY"] = str(poll)
    probe = workdir / "bench_probe.py"
    probe.write_text(PROBE_SOURCE)
    log = open(workdir / "runner.log", "ab")  # noqa: SIM115 - closed with the process
    platform_.procs.append(
        subprocess.Popen(
            [sys.executable, str(probe)],
            cwd=workdir,
            env=dict(os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    )

    from prefect import get_client

    def served() -> bool:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(PROBE_DEPLOYMENT)
            return True

    wait_until(served, timeout=90, what="served bench probe deployment")
    platform_.server, platform_.thread, platform_.url = start_receiver()
    return platform_


def bench_catalog() -> Any:
    from core.catalog import parse_catalog

    text = """
defaults: {push_registry: 127.0.0.1:5000, pull_registry: 127.0.0.1:5000,
           manifests_repo: file:///tmp/none/manifests.git}
services:
  hello:
    repo: file:///tmp/none/hello.git
    github: Codertocat/Hello-World
    branch: master
    image: robotics-serving/hello
    environments:
      staging: {path: serving/hello/overlays/staging, argocd_app: hello-staging,
                namespace: staging, host: hello.local}
    approvers: [alice]
"""
    return parse_catalog(text, env={})


def start_receiver() -> tuple[uvicorn.Server, threading.Thread, str]:
    from core.webhooks import Targets
    from deployments.webhook import create_app
    from sandbox.procs import free_port, wait_until

    # No starter given: the app opens its Prefect client in its lifespan, on uvicorn's loop.
    app = create_app(
        secret=SECRET,
        catalog=bench_catalog(),
        targets=Targets(ci=PROBE_DEPLOYMENT, training_image="none/none"),
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=20, what="webhook receiver")
    return server, thread, f"http://127.0.0.1:{port}/github"


def signed(body: bytes, event: str = "push", delivery: str | None = None) -> dict[str, str]:
    from core.webhooks import compute_signature

    return {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": compute_signature(SECRET, body),
        "Content-Type": "application/json",
    }


# --- 1. latency: receipt → Running ---------------------------------------------------------


@dataclass
class Delivery:
    sent: float
    answered: float
    run_id: str
    running: float | None = None


async def running_at(run_id: str) -> tuple[float | None, bool]:
    """When the run entered Running (server timestamp), and whether it has finished."""
    from prefect import get_client
    from prefect.client.schemas.objects import StateType

    async with get_client() as client:
        states = await client.read_flow_run_states(uuid.UUID(run_id))
    running = next((s.timestamp.timestamp() for s in states if s.type == StateType.RUNNING), None)
    return running, any(s.is_final() for s in states)


async def measure_latency(url: str, deliveries: int, gap: float, deadline: float) -> list[Delivery]:
    """One delivery at a time: the next is sent once the previous run is Running (or after
    ``deadline`` s), so each latency is the platform's, not a queue the benchmark built."""
    body = OCTOKIT.read_bytes()
    done: list[Delivery] = []
    async with httpx.AsyncClient(timeout=15) as http:
        for _ in range(deliveries):
            sent = time.time()
            response = await http.post(url, content=body, headers=signed(body))
            answered = time.time()
            if response.status_code != 202:
                raise RuntimeError(f"receiver answered {response.status_code}: {response.text}")
            delivery = Delivery(sent, answered, response.json()["runs"][0]["flow_run_id"])
            done.append(delivery)
            end = time.monotonic() + deadline
            while delivery.running is None and time.monotonic() < end:
                await asyncio.sleep(0.1)
                delivery.running, _ = await running_at(delivery.run_id)
            await asyncio.sleep(gap)
    return done


# --- 2. throughput -------------------------------------------------------------------------


@dataclass
class Level:
    case: str
    clients: int
    requests: int
    errors: int
    seconds: float
    latencies: list[float]


async def closed_loop(
    url: str, case: str, clients: int, seconds: float, max_requests: int
) -> Level:
    push = json.loads(OCTOKIT.read_text())
    other_branch = json.dumps({**push, "ref": "refs/heads/feature"}).encode()
    body = OCTOKIT.read_bytes()
    fixed_delivery = str(uuid.uuid4())
    expect = {"ignored": 202, "redelivered": 202, "bad-signature": 401}[case]
    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds

    def request() -> tuple[bytes, dict[str, str]]:
        if case == "ignored":
            return other_branch, signed(other_branch)
        if case == "redelivered":
            return body, signed(body, delivery=fixed_delivery)
        headers = signed(body)
        headers["X-Hub-Signature-256"] = "sha256=" + "0" * 64
        return body, headers

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.monotonic() < stop and len(latencies) + errors < max_requests:
            content, headers = request()
            t0 = time.perf_counter()
            try:
                response = await http.post(url, content=content, headers=headers)
                ok = response.status_code == expect
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    started = time.monotonic()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=15, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return Level(case, clients, len(latencies), errors, time.monotonic() - started, latencies)


# --- report --------------------------------------------------------------------------------


def render(deliveries: list[Delivery], levels: list[Level], args: argparse.Namespace) -> str:
    accept = [d.answered - d.sent for d in deliveries]
    running = [d.running - d.sent for d in deliveries if d.running is not None]
    load = os.getloadavg()[0]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Measured by `bench/bench_webhook.py` on {platform.machine()}, 2 CPUs shared with "
        f"whatever else runs (1-min load {load:.1f} at the end), {when}. Loopback only: "
        "uvicorn receiver in the benchmark's process, a Prefect server (SQLite), a runner "
        f"serving a probe flow with `PREFECT_RUNNER_POLL_FREQUENCY={args.poll:g}`.",
        "",
        f"### Receipt → flow run Running ({len(deliveries)} deliveries, one at a time)",
        "",
        "| interval | n | p50 s | p95 s | max s |",
        "|---|---:|---:|---:|---:|",
        f"| sent → 202 Accepted (run created) | {len(accept)} | {quantile(accept, 0.5):.3f} "
        f"| {quantile(accept, 0.95):.3f} | {max(accept):.3f} |",
    ]
    if running:
        lines.append(
            f"| sent → Running | {len(running)} | {quantile(running, 0.5):.2f} | "
            f"{quantile(running, 0.95):.2f} | {max(running):.2f} |"
        )
    missing = len(deliveries) - len(running)
    lines += [
        "",
        "The 202 comes back once the run exists in Prefect (well inside GitHub's 10 s). "
        "Running follows when the runner polls (on average half the poll interval) and its "
        "flow-run process has started (a new Python process importing Prefect: seconds of CPU "
        "on a loaded 2-core machine); with a work pool and a worker the poll is the worker's. "
        "Each delivery is sent once the previous run is Running."
        + (f" {missing} runs were not Running within {args.deadline:g} s." if missing else ""),
        "",
        f"### Signed requests per second ({args.seconds:g} s per level, at most "
        f"{args.max_requests} requests)",
        "",
        "| case | clients | req/s | errors | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        rate = lv.requests / lv.seconds if lv.seconds else 0.0
        lines.append(
            f"| {lv.case} | {lv.clients} | {rate:.0f} | {lv.errors} | "
            f"{quantile(lv.latencies, 0.5) * 1000:.1f} | {quantile(lv.latencies, 0.99) * 1000:.1f} |"
        )
    lines += [
        "",
        "`ignored`: a push to a non-release branch (size cap, HMAC-SHA256, JSON, payload model, "
        "routing; no Prefect call). `redelivered`: the same delivery again (one idempotent "
        "`create_flow_run` against Prefect per request, no new run). `bad-signature`: 401.",
    ]
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    """Replace (or add) the "Webhook receipt" section of docs/benchmarks.md, nothing else."""
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{SECTION}\n\n{text}"
    if SECTION in doc:
        start = doc.index(SECTION)
        end = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + block.rstrip("\n") + "\n" + (doc[end:] if end != -1 else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    DOC.write_text(doc)


async def run(args: argparse.Namespace, url: str) -> str:
    deliveries = await measure_latency(url, args.deliveries, args.gap, args.deadline)
    levels = []
    for case in ("ignored", "redelivered", "bad-signature"):
        for clients in args.levels:
            levels.append(await closed_loop(url, case, clients, args.seconds, args.max_requests))
    return render(deliveries, levels, args)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--deliveries", type=int, default=50)
    parser.add_argument("--gap", type=float, default=0.2, help="Pause after a run is Running (s).")
    parser.add_argument("--poll", type=float, default=1.0, help="Runner poll interval (s).")
    parser.add_argument(
        "--deadline", type=float, default=60.0, help="Wait for each Running at most (s)."
    )
    parser.add_argument("--levels", default="1,4,16", help="Client counts for throughput.")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--reuse", action="store_true", help="Use $PREFECT_API_URL's server.")
    parser.add_argument("--write", action="store_true", help="Update docs/benchmarks.md.")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    # One warning per refused delivery would measure the terminal, not the receiver.
    logging.getLogger("robotics_cd.webhook").setLevel(logging.ERROR)
    if args.deliveries < 1 or args.deliveries > 500:
        parser.error("--deliveries must be between 1 and 500")
    with tempfile.TemporaryDirectory(prefix="bench-webhook-") as tmp:
        platform_ = start_platform(Path(tmp), poll=args.poll, reuse=args.reuse)
        try:
            text = asyncio.run(run(args, platform_.url))
        finally:
            platform_.close()
    print(text)
    if args.write:
        write_section(text)
        print(f"written to {DOC} ({SECTION})")


if __name__ == "__main__":
    main()
