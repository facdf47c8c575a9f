"""How much traffic the twin's ingress router and busybox containers sustain on this machine.

Starts a private twin (``python -m sandbox.twin``), runs a Deployment of a busybox image
(``web``: busybox ``httpd`` + a CGI script, as the runtime tests use; ``seed``: the sample
``robotics-api`` service of the demo, ``nc`` + ``httpd -i`` per connection), then drives
closed-loop HTTP clients at increasing concurrency for a few seconds each, twice per level:

- **direct**: to the pod's port published on 127.0.0.1 (the container alone);
- **router**: through the namespace's ingress router (Host header, Service, round robin).

For each it reports requests/s, errors and latency percentiles, and the highest rate reached
with no error and P99 under ``--p99-max``. The ratio router/direct (same run, same machine
load) says what the router costs. ``--write`` puts the table into ``docs/benchmarks.md``,
section "Router and busybox throughput".

Run: ``.venv/bin/python -m bench.bench_router [--target web|seed] [--replicas 1]
[--levels 1,2,4,8,16] [--seconds 4] [--p99-max 0.25] [--write]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import docker
import httpx
import yaml

from sandbox.engine import BUSYBOX_IMAGE, ensure_base_images
from sandbox.procs import free_port
from sandbox.runtime import cleanup, state_label
from tests.fixtures_kube import KUBECTL, start_kube_twin
from tests.fixtures_runtime import build_web_image

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Router and busybox throughput"
HOST = "bench.example.test"
NAMESPACE = "bench"


@dataclass
class Level:
    mode: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies: list[float]

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.seconds

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def build_image(target: str) -> tuple[str, str, int]:
    """(local image, path to request, container port) of the target."""
    ensure_base_images()
    client = docker.from_env(timeout=300)
    try:
        if target == "web":
            return build_web_image(client, "v1"), "/cgi-bin/status", 8000
        tag = "robotics-cd-bench/robotics-api:latest"
        client.images.build(
            path=str(REPO / "sandbox" / "seed" / "robotics-api"),
            tag=tag,
            buildargs={"BASE": BUSYBOX_IMAGE},
            rm=True,
            pull=False,
        )
        return tag, "/v1/status", 8000
    finally:
        client.close()


def manifests(image: str, port: int, replicas: int) -> list[dict[str, Any]]:
    labels = {"app": "bench"}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "bench", "namespace": NAMESPACE},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [
                            {
                                "name": "web",
                                "image": image,
                                "imagePullPolicy": "Never",
                                "ports": [{"name": "http", "containerPort": port}],
                                "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1},
                            }
                        ]
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "bench", "namespace": NAMESPACE},
            "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": port}]},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": {"name": "bench", "namespace": NAMESPACE},
            "spec": {
                "rules": [
                    {
                        "host": HOST,
                        "http": {
                            "paths": [
                                {
                                    "path": "/",
                                    "pathType": "Prefix",
                                    "backend": {
                                        "service": {"name": "bench", "port": {"number": 80}}
                                    },
                                }
                            ]
                        },
                    }
                ]
            },
        },
    ]


async def drive(
    url: str, headers: dict[str, str], concurrency: int, seconds: float, mode: str
) -> Level:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    async with session.get(url, headers=headers) as response:
                        await response.read()
                        ok = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                latencies.append(time.perf_counter() - started)
                if not ok:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return Level(mode, concurrency, len(latencies), errors, elapsed, latencies)


def wait_ready(control: str, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pods = [
            p
            for p in httpx.get(f"{control}/admin/endpoints", timeout=5).json()["pods"]
            if p["namespace"] == NAMESPACE and p["ready"] and p["ports"]
        ]
        if pods:
            return pods
        time.sleep(0.5)
    raise TimeoutError("the bench pods did not get ready within 60 s")


def run(args: argparse.Namespace) -> tuple[list[Level], dict[str, Any]]:
    image, path, port = build_image(args.target)
    tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
    state = tmp / "twin"
    control_port, router_port = free_port(), free_port()
    config = {
        "control_port": control_port,
        "ingress_ports": {NAMESPACE: router_port},
        "load": {"enabled": False},
        "argocd_port": free_port(),
        "github_port": free_port(),
        "git_base": str(tmp / "git"),
    }
    levels: list[Level] = []
    try:
        with start_kube_twin(state, **config) as kube:
            docs = yaml.safe_dump_all(manifests(image, port, args.replicas))
            subprocess.run(
                [str(KUBECTL), f"--kubeconfig={kube.kubeconfig}", "apply", "-f", "-"],
                input=docs,
                text=True,
                check=True,
                capture_output=True,
            )
            pods = wait_ready(f"http://127.0.0.1:{control_port}")
            direct = f"http://127.0.0.1:{pods[0]['ports'][str(port)]}{path}"
            routed = f"http://127.0.0.1:{router_port}{path}"
            for concurrency in args.levels:
                for mode, url, headers in (
                    ("direct", direct, {}),
                    ("router", routed, {"Host": HOST}),
                ):
                    level = asyncio.run(drive(url, headers, concurrency, args.seconds, mode))
                    levels.append(level)
                    print(
                        f"{mode:6} c={concurrency:3} {level.rps:8.1f} req/s  errors={level.errors:4}  "
                        f"p50={level.pct(0.5) * 1000:7.1f} ms  p99={level.pct(0.99) * 1000:7.1f} ms",
                        flush=True,
                    )
    finally:
        cleanup(state_label(state))
    meta = {
        "target": args.target,
        "replicas": args.replicas,
        "direct_pods": 1,
        "seconds": args.seconds,
        "p99_max": args.p99_max,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_avg": os.getloadavg()[0],
    }
    return levels, meta


def best(levels: list[Level], mode: str, p99_max: float) -> Level | None:
    ok = [lv for lv in levels if lv.mode == mode and lv.errors == 0 and lv.pct(0.99) <= p99_max]
    return max(ok, key=lambda lv: lv.rps, default=None)


def report(levels: list[Level], meta: dict[str, Any]) -> str:
    lines = [
        f"Target `{meta['target']}`, {meta['replicas']} replica(s) behind the router; direct = one "
        f"pod's published port. {meta['seconds']} s per level, closed-loop clients in the same "
        f"process, {meta['cpus']} CPUs shared with whatever else runs (1-min load "
        f"{meta['load_avg']:.1f} at the end), {meta['date']}.",
        "",
        "| mode | clients | req/s | errors | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        lines.append(
            f"| {lv.mode} | {lv.concurrency} | {lv.rps:.0f} | {lv.errors} | "
            f"{lv.pct(0.5) * 1000:.1f} | {lv.pct(0.99) * 1000:.1f} |"
        )
    d, r = best(levels, "direct", meta["p99_max"]), best(levels, "router", meta["p99_max"])
    lines.append("")
    limit = f"error-free with P99 ≤ {meta['p99_max'] * 1000:.0f} ms"
    if d and r:
        lines.append(
            f"Highest rate {limit}: direct {d.rps:.0f} req/s ({d.concurrency} clients), router "
            f"{r.rps:.0f} req/s ({r.concurrency} clients): router/direct = {r.rps / d.rps:.2f}."
        )
    else:
        lines.append(f"No level was {limit} for {'direct' if not d else 'router'}.")
    return "\n".join(lines) + "\n"


def write_section(text: str, target: str) -> None:
    """Replace (or add) this bench's subsection for ``target`` in docs/benchmarks.md."""
    intro = (
        f"{SECTION}\n\n"
        "Measured by `bench/bench_router.py` (run it again on the machine you judge: the "
        "numbers depend on it). Canary policies should set `min_requests` per interval well "
        "under the router's error-free rate times the interval, and the synthetic load "
        "(`sandbox.robotics.dev/load`) well under it too, so the twin is never the bottleneck.\n"
    )
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    sub = f"### {target}\n"
    if SECTION not in doc:
        doc = doc.rstrip("\n") + "\n\n" + intro
    start = doc.index(SECTION)
    end = doc.find("\n## ", start + len(SECTION))
    section = doc[start : end if end != -1 else len(doc)]
    if sub in section:
        s = section.index(sub)
        e = section.find("\n### ", s + len(sub))
        section = section[:s] + sub + "\n" + text + (section[e:] if e != -1 else "")
    else:
        section = section.rstrip("\n") + "\n\n" + sub + "\n" + text
    doc = doc[:start] + section.rstrip("\n") + "\n" + (doc[end:] if end != -1 else "")
    DOC.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=("web", "seed"), default="web")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument(
        "--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16]
    )
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--p99-max", type=float, default=0.25)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    levels, meta = run(args)
    text = report(levels, meta)
    print(text)
    print(json.dumps(meta))
    if args.write:
        write_section(text, args.target)
        print(f"written to {DOC}")


if __name__ == "__main__":
    main()
