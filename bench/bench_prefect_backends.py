"""The Prefect server under a release orchestrator's load: SQLite against PostgreSQL + Redis
(two API servers, one ``--no-services``, behind the sandbox's balancer).

For each backend a fresh server (``sandbox.prefect_server``) in a temp dir, then, per level
``SxC`` (S suspended releases, C running canaries):

- **S suspended releases**: synthetic flow runs of a ``release`` flow in the Suspended state,
  their ``service`` parameter spread over 8 services (added up to S; levels only grow).
- **C running canaries**: flow runs in Running; each, like ``flows/release.py``'s canary, polls
  its commands once a second (``tasks.approvals.pending_commands``: a
  ``filter_flow_run_input`` with a key prefix and the keys already seen) and every 2 s does
  a step's bookkeeping: a task run created, set Running then Completed, and two log lines.
- meanwhile, one client creates flow runs one after the other (``create_flow_run``, what
  ``run_deployment`` and the webhook do), 0.2 s apart.

For ``--seconds`` (20) per level: latency p50/p95/p99/max of ``create_flow_run`` and of the
poll, polls that came late (the next poll could not start on time: the loop over-ran its
1 s), and the CPU (% of one core) and memory (PSS, MiB) of the server processes and of the
database processes (SQLite lives inside the server process).

Run: ``/work/bin/heavy .venv/bin/python -m bench.bench_prefect_backends [--levels
1x5,10x5,50x5,50x20,200x40] [--seconds 20] [--backends sqlite,postgres+redis] [--write]``;
``--write`` replaces the section "Prefect server: SQLite vs PostgreSQL + Redis" of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.procs import free_port

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Prefect server: SQLite vs PostgreSQL + Redis"
SERVICES = [f"svc-{i}" for i in range(8)]
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Level:
    suspended: int
    canaries: int
    create: list[float] = field(default_factory=list)
    poll: list[float] = field(default_factory=list)
    late_polls: int = 0
    polls: int = 0
    errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    mem: dict[str, float] = field(default_factory=dict)
    client_cpu: float = 0.0
    loadavg: float = 0.0


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime + stime + cutime + cstime: a PostgreSQL backend that exits during the window
    # moves its CPU into the postmaster's reaped-children counters, and stays counted.
    return sum(int(f) for f in fields[11:15]) / TICK


def _pss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _groups(home: Path) -> dict[str, list[int]]:
    from sandbox import prefect_server

    raw = prefect_server.pids(home)
    groups: dict[str, list[int]] = {"server": [], "database": []}
    for part, pids in raw.items():
        key = "database" if part in ("postgresql", "redis") else "server"
        groups[key] += pids
    return groups


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _suspend(count: int, have: int) -> None:
    from prefect import get_client
    from prefect.states import Suspended

    async with get_client() as client:
        for i in range(have, count):
            run = await client.create_flow_run(
                _release_flow(), parameters={"service": SERVICES[i % len(SERVICES)]}
            )
            await client.set_flow_run_state(run.id, Suspended(timeout_seconds=86400), force=True)


_FLOW: Any = None


def _release_flow() -> Any:
    global _FLOW
    if _FLOW is None:
        from prefect import flow

        @flow(name="release")
        def release(service: str = "") -> None:
            return None

        _FLOW = release
    return _FLOW


async def _canary(level: Level, stop: asyncio.Event, index: int) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import LogCreate
    from prefect.states import Completed, Running

    from tasks.approvals import pending_commands

    async with get_client() as client:
        run = await client.create_flow_run(
            _release_flow(), parameters={"service": SERVICES[index % len(SERVICES)]}
        )
        await client.set_flow_run_state(run.id, Running(), force=True)
        seen: set[str] = set()
        step = 0
        next_tick = time.monotonic()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                await pending_commands(run.id, seen)
                level.poll.append(time.perf_counter() - t0)
                level.polls += 1
                if step % 2 == 0:
                    task_run = await client.create_task_run(
                        task=_step_task(),
                        flow_run_id=run.id,
                        dynamic_key=f"{step}",
                        name=f"canary-step-{step}",
                    )
                    await client.set_task_run_state(task_run.id, Running(), force=True)
                    await client.set_task_run_state(task_run.id, Completed(), force=True)
                    await client.create_logs(
                        [
                            LogCreate(
                                name="release",
                                level=20,
                                message=f"canary step {step}: analysis {j}",
                                timestamp=_now(),
                                flow_run_id=run.id,
                            )
                            for j in range(2)
                        ]
                    )
            except Exception:
                level.errors += 1
            step += 1
            next_tick += 1.0
            delay = next_tick - time.monotonic()
            if delay < 0:
                level.late_polls += 1
                next_tick = time.monotonic()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
        await client.set_flow_run_state(run.id, Completed(), force=True)


_TASK: Any = None


def _step_task() -> Any:
    global _TASK
    if _TASK is None:
        from prefect import task

        @task(name="canary-step")
        def step() -> None:
            return None

        _TASK = step
    return _TASK


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


async def _creator(level: Level, stop: asyncio.Event) -> None:
    from prefect import get_client
    from prefect.states import Cancelled

    async with get_client() as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                run = await client.create_flow_run(
                    _release_flow(),
                    parameters={"service": "bench", "image": f"x@sha256:{uuid.uuid4().hex}"},
                )
                level.create.append(time.perf_counter() - t0)
                # Not left Scheduled: nothing will pick it up, and the late-runs service
                # would spend the measurement marking it Late.
                await client.set_flow_run_state(run.id, Cancelled(), force=True)
            except Exception:
                level.errors += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.2)


async def _measure(home: Path, level: Level, seconds: float) -> None:
    stop = asyncio.Event()
    canaries = [asyncio.create_task(_canary(level, stop, i)) for i in range(level.canaries)]
    await asyncio.sleep(3)  # canaries created and polling before the window opens
    level.create.clear()
    level.poll.clear()
    level.polls = level.late_polls = level.errors = 0
    groups = _groups(home)
    cpu0 = {k: sum(_cpu_seconds(p) for p in v) for k, v in groups.items()}
    client0 = _cpu_seconds(os.getpid())
    t0 = time.monotonic()
    creator = asyncio.create_task(_creator(level, stop))
    mem_samples: dict[str, list[float]] = {k: [] for k in groups}
    end = t0 + seconds
    while time.monotonic() < end:
        for key, pids in _groups(home).items():
            mem_samples.setdefault(key, []).append(sum(_pss_mib(p) for p in pids))
        await asyncio.sleep(2)
    groups = _groups(home)
    wall = time.monotonic() - t0
    level.cpu = {
        k: 100 * (sum(_cpu_seconds(p) for p in v) - cpu0.get(k, 0.0)) / wall
        for k, v in groups.items()
    }
    level.mem = {k: max(v) if v else 0.0 for k, v in mem_samples.items()}
    level.client_cpu = 100 * (_cpu_seconds(os.getpid()) - client0) / wall
    level.loadavg = os.getloadavg()[0]
    stop.set()
    await asyncio.gather(creator, *canaries, return_exceptions=True)


def _start(backend: str, home: Path) -> Any:
    from sandbox import launcher, prefect_server

    if backend == "sqlite":
        return launcher.start_prefect(home, free_port())
    return prefect_server.start_prefect_server(home, db="postgres", messaging="redis", timeout=600)


def run_backend(backend: str, levels: list[tuple[int, int]], seconds: float) -> list[Level]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from sandbox import prefect_server

    home = Path(tempfile.mkdtemp(prefix=f"bench-prefect-{backend.replace('+', '-')}-"))
    print(f"[{backend}] starting in {home}", flush=True)
    server = _start(backend, home)
    results: list[Level] = []
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            have = 0
            for suspended, canaries in levels:
                asyncio.run(_suspend(suspended, have))
                have = max(have, suspended)
                level = Level(suspended, canaries)
                asyncio.run(_measure(home, level, seconds))
                print(f"[{backend}] {_row(level)}", flush=True)
                results.append(level)
    finally:
        print(f"[{backend}] stopped: {prefect_server.stop_prefect_stack(home)}", flush=True)
        shutil.rmtree(home, ignore_errors=True)
    return results


def _ms(values: list[float], q: float) -> str:
    v = _pct(values, q)
    return "—" if v != v else f"{v * 1000:.0f}"


def _row(level: Level) -> str:
    return (
        f"| {level.suspended} | {level.canaries} | {len(level.create)} | "
        f"{_ms(level.create, 0.5)} | {_ms(level.create, 0.95)} | {_ms(level.create, 0.99)} | "
        f"{level.polls} | {_ms(level.poll, 0.5)} | {_ms(level.poll, 0.95)} | "
        f"{_ms(level.poll, 0.99)} | {_ms(level.poll, 1.0)} | {level.late_polls} | "
        f"{level.errors} | {level.cpu.get('server', 0):.0f} | {level.mem.get('server', 0):.0f} | "
        f"{level.cpu.get('database', 0):.0f} | {level.mem.get('database', 0):.0f} | "
        f"{level.client_cpu:.0f} | {level.loadavg:.1f} |"
    )


HEADER = (
    "| suspended | canaries | creates | create p50 ms | p95 | p99 | polls | poll p50 ms | p95 "
    "| p99 | max | late polls | errors | server CPU % | server MiB | db CPU % | db MiB "
    "| load gen CPU % | load avg |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def render(results: dict[str, list[Level]], seconds: float) -> str:
    cpu = os.cpu_count()
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
        f"{cpu} cores shared with other work, Python {sys.version.split()[0]}, "
        f"Prefect {_version('prefect')}, prefect-redis {_version('prefect-redis')}. "
        f"{int(seconds)} s per level; the load generator is one asyncio process on the same "
        "machine. CPU is % of one core over the window (server: every Prefect server process "
        "and the balancer; db: PostgreSQL's processes and Redis; SQLite runs inside the server "
        "process, so its db columns are empty). Memory is the peak PSS. A poll is *late* when "
        "the 1 s loop over-ran (poll plus step bookkeeping took more than a second).",
        "",
        "`bench/bench_prefect_backends.py` (see its docstring).",
        "",
    ]
    for backend, levels in results.items():
        lines += [f"### {backend}", "", HEADER, *(_row(level) for level in levels), ""]
    return "\n".join(lines)


def _version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def write_section(text: str) -> None:
    """Replace (or add) this benchmark's section of docs/benchmarks.md, nothing else."""
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{SECTION}\n\n{text}"
    if SECTION in doc:
        start = doc.index(SECTION)
        end = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + block.rstrip("\n") + "\n" + (doc[end:] if end != -1 else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    DOC.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--levels", default="1x5,10x5,50x5,50x20,200x40")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--backends", default="sqlite,postgres+redis")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    levels = [(int(a), int(b)) for a, b in (x.split("x") for x in args.levels.split(","))]
    if levels != sorted(levels, key=lambda lv: lv[0]):
        parser.error("levels must not shrink the suspended count")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    results = {b: run_backend(b, levels, args.seconds) for b in args.backends.split(",")}
    text = render(results, args.seconds)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
