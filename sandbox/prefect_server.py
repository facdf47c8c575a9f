"""A real Prefect server on 127.0.0.1, its state under a state dir.

Two shapes, chosen by ``db`` and ``messaging``:

- **embedded** (the default, the demo's): one ``prefect server start`` on SQLite with the
  in-memory broker, listening on the public port itself.
- **scale-out** (``db="postgres", messaging="redis"``): Debian's PostgreSQL
  (:mod:`sandbox.postgres`) and Redis (:mod:`sandbox.redis_server`), the database migrated
  once, then two API servers, ``api`` (``prefect server start --no-services``) and
  ``services`` (``prefect server start``: the API plus the loop services: scheduler,
  triggers, event persister, ...), behind :mod:`sandbox.balancer` on the public port.
  Redis carries the events between them (``prefect-redis``): with the in-memory broker an
  event received by one server would never reach the other's automations.

PostgreSQL with the in-memory broker, or SQLite with Redis, run one server (no balancer).
Everything needed to restart a part the same way is in ``<home>/stack.json``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sandbox import postgres, redis_server
from sandbox.procs import (
    free_port,
    http_ok,
    pid_alive,
    remembered_port,
    spawn,
    stop_pidfile,
)

ROOT = Path(__file__).resolve().parent.parent
DBS = ("sqlite", "postgres")
MESSAGING = ("memory", "redis")


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    ui_url: str
    home: Path
    db: str = "sqlite"
    messaging: str = "memory"

    @property
    def env(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.api_url, "PREFECT_UI_URL": self.ui_url}


def prefect_env(home: Path, port: int) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_UI_URL": f"http://127.0.0.1:{port}",
        # The zombie-run pattern: runs send heartbeats; an automation marks silent ones Crashed.
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
    }


def redis_env(redis: redis_server.Redis) -> dict[str, str]:
    """Prefect's settings for Redis messaging, as its self-hosting guide lists them."""
    return {
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1",
        "PREFECT_REDIS_MESSAGING_PORT": str(redis.port),
        "PREFECT_REDIS_MESSAGING_PASSWORD": redis.password,
        "PREFECT_REDIS_MESSAGING_DB": "0",
        # Docket (the services' task queue) defaults to memory://, single-server only.
        "PREFECT_SERVER_DOCKET_URL": redis.url(1),
    }


def _prefect_bin() -> str:
    return shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"


def _stack(home: Path) -> dict[str, Any]:
    path = home / "stack.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def _save_stack(home: Path, stack: dict[str, Any]) -> None:
    path = home / "stack.json"
    path.write_text(json.dumps(stack, indent=2))
    path.chmod(0o600)  # it holds the database and Redis passwords


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _migrate(home: Path, env: dict[str, str], timeout: float) -> None:
    """Migrate the PostgreSQL database once per Prefect version, before any server starts:
    two servers migrating at once would race."""
    marker = home / "postgres" / f"migrated-prefect-{importlib.metadata.version('prefect')}"
    if marker.exists():
        return
    proc = subprocess.run(
        [_prefect_bin(), "server", "database", "upgrade", "-y"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"migrating Prefect's PostgreSQL database failed:\n{proc.stdout[-2000:]}"
        )
    marker.write_text("")


def start_prefect_server(
    home: Path,
    *,
    port: int | None = None,
    timeout: float = 180.0,
    db: str = "sqlite",
    messaging: str = "memory",
) -> PrefectServer:
    """Start (or reuse, if it answers) the Prefect server whose state is in ``home``."""
    if db not in DBS or messaging not in MESSAGING:
        raise ValueError(f"db must be one of {DBS}, messaging one of {MESSAGING}")
    home.mkdir(parents=True, exist_ok=True)
    stack = _stack(home)
    portfile = home / "server.port"
    if portfile.exists() and stack.get("db", "sqlite") == db:
        old = int(portfile.read_text())
        if stack.get("messaging", "memory") == messaging and http_ok(f"{_url(old)}/api/health"):
            return PrefectServer(f"{_url(old)}/api", _url(old), home, db, messaging)
    if portfile.exists() and http_ok(f"{_url(int(portfile.read_text()))}/api/health"):
        raise RuntimeError(
            f"a Prefect server on {stack.get('db', 'sqlite')} + {stack.get('messaging', 'memory')} "
            f"already runs in {home}: stop it first (robotics-cd sandbox down) to switch to "
            f"{db} + {messaging}"
        )
    port = port or remembered_port(portfile) or free_port()
    env = prefect_env(home, port)
    env["PREFECT_UI_API_URL"] = f"{_url(port)}/api"
    if db == "postgres":
        pg = postgres.start_postgres(home / "postgres", timeout=timeout)
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = pg.url
        _migrate(home, env, timeout=max(timeout, 600))
        env["PREFECT_API_DATABASE_MIGRATE_ON_START"] = "false"
    if messaging == "redis":
        env.update(redis_env(redis_server.start_redis(home / "redis")))
    stack = {"db": db, "messaging": messaging, "public_port": port, "servers": {}}
    if db == "postgres" and messaging == "redis":
        for name, extra in (("services", []), ("api", ["--no-services"])):
            backend_port = remembered_port(home / f"server-{name}.port") or free_port()
            (home / f"server-{name}.port").write_text(str(backend_port))
            stack["servers"][name] = {
                "port": backend_port,
                "argv": [
                    _prefect_bin(),
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(backend_port),
                    *extra,
                ],
                "env": {**env, "PREFECT_SERVER_API_PORT": str(backend_port)},
            }
        stack["balancer"] = {
            "port": port,
            "argv": [
                sys.executable,
                "-m",
                "sandbox.balancer",
                "--port",
                str(port),
                *(
                    arg
                    for s in stack["servers"].values()
                    for arg in ("--backend", f"127.0.0.1:{s['port']}")
                ),
            ],
        }
    else:
        stack["servers"]["server"] = {
            "port": port,
            "argv": [_prefect_bin(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            "env": env,
        }
    _save_stack(home, stack)
    # One after the other: each server registers the block types at start-up, and two
    # doing it at once collide on the same rows.
    for name in [*stack["servers"], *(["balancer"] if "balancer" in stack else [])]:
        start_part(home, name, timeout=timeout)
    portfile.write_text(str(port))
    return PrefectServer(f"{_url(port)}/api", _url(port), home, db, messaging)


def _files(home: Path, name: str) -> tuple[Path, Path]:
    """(pid file, log) of a part; the single server keeps the names it always had."""
    stem = (
        "server" if name == "server" else ("balancer" if name == "balancer" else f"server-{name}")
    )
    return home / f"{stem}.pid", home / f"{stem}.log"


def start_part(home: Path, name: str, *, wait: bool = True, timeout: float = 180.0) -> None:
    """(Re)start one server (``api``, ``services``, ``server``) or the ``balancer``, exactly
    as ``start_prefect_server`` did, from ``stack.json``."""
    stack = _stack(home)
    spec = stack["balancer"] if name == "balancer" else stack["servers"][name]
    pidfile, log = _files(home, name)
    env = dict(spec.get("env", {}))
    if name == "balancer":
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
        )
    spawn(spec["argv"], log=log, env=env, pidfile=pidfile, cwd=ROOT)
    if wait:
        wait_part(home, name, timeout=timeout)


def wait_part(home: Path, name: str, *, timeout: float) -> None:
    stack = _stack(home)
    _, log = _files(home, name)
    if name == "balancer":
        url = f"{_url(stack['balancer']['port'])}/_balancer"

        def ready() -> bool:
            try:
                state = httpx.get(url, timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return False
            return all(b["healthy"] for b in state["backends"])
    else:
        url = f"{_url(stack['servers'][name]['port'])}/api/health"

        def ready() -> bool:
            return http_ok(url)

    deadline = time.monotonic() + timeout
    while not ready():
        pid = part_pid(home, name)
        if pid is None or not pid_alive(pid):
            raise RuntimeError(f"Prefect {name} exited; the end of {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Prefect {name} not ready after {timeout:.0f}s (log: {log})")
        time.sleep(0.3)


def part_pid(home: Path, name: str) -> int | None:
    pidfile, _ = _files(home, name)
    try:
        return int(pidfile.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def status_parts(home: Path) -> list[tuple[str, bool, str]]:
    """(part, ok, detail) for the database, the broker, each server and the balancer."""
    stack = _stack(home)
    parts: list[tuple[str, bool, str]] = []
    db = stack.get("db", "sqlite")
    if db == "postgres":
        pg_home = home / "postgres"
        port = (pg_home / "port").read_text().strip() if (pg_home / "port").exists() else "?"
        up = postgres.is_running(pg_home) and http_ok_tcp(int(port) if port.isdigit() else 0)
        parts.append(("postgresql", up, f"127.0.0.1:{port} (data: {pg_home / 'data'})"))
    else:
        parts.append(
            ("prefect database", (home / "prefect.db").exists(), f"sqlite {home / 'prefect.db'}")
        )
    if stack.get("messaging") == "redis":
        r_home = home / "redis"
        try:
            port_i = int((r_home / "port").read_text())
            ok = redis_server.ping(port_i, (r_home / "password").read_text().strip())
        except (OSError, ValueError):
            port_i, ok = 0, False
        parts.append(("redis", ok, f"127.0.0.1:{port_i}"))
    for name, spec in stack.get("servers", {}).items():
        url = f"{_url(spec['port'])}/api/health"
        mode = " (--no-services)" if "--no-services" in spec["argv"] else ""
        label = "prefect server" if name == "server" else f"prefect server {name}"
        parts.append((label, http_ok(url), f"{url}{mode}"))
    if "balancer" in stack:
        url = f"{_url(stack['balancer']['port'])}/_balancer"
        try:
            state = httpx.get(url, timeout=3).json()
            healthy = [b for b in state["backends"] if b["healthy"]]
            parts.append(
                (
                    "prefect balancer",
                    len(healthy) == len(state["backends"]),
                    f"{_url(stack['balancer']['port'])} → "
                    + ", ".join(
                        f"{b['host']}:{b['port']} {'up' if b['healthy'] else 'DOWN'} "
                        f"({b['connections']} conns)"
                        for b in state["backends"]
                    ),
                )
            )
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            parts.append(("prefect balancer", False, f"{url}: {type(exc).__name__}"))
    if not stack:  # started before stack.json existed
        port = (home / "server.port").read_text() if (home / "server.port").exists() else "?"
        parts.append(
            (
                "prefect server",
                http_ok(f"{_url(int(port))}/api/health") if port.isdigit() else False,
                port,
            )
        )
    return parts


def http_ok_tcp(port: int) -> bool:
    import socket

    if not port:
        return False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def pids(home: Path) -> dict[str, list[int]]:
    """Process ids per part (servers with their children, PostgreSQL's backends), for the
    benchmarks' CPU and memory."""
    found: dict[str, list[int]] = {}
    for name in [*_stack(home).get("servers", {"server": {}}), "balancer"]:
        pid = part_pid(home, name)
        if pid is not None and pid_alive(pid):
            found[f"prefect {name}"] = [pid, *_descendants(pid)]
    if postgres.is_running(home / "postgres"):
        found["postgresql"] = postgres.pids(home / "postgres")
    if redis_server.is_running(home / "redis"):
        pid = int((home / "redis" / "redis.pid").read_text())
        found["redis"] = [pid, *_descendants(pid)]
    return found


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_prefect_stack(home: Path) -> list[str]:
    """Stop every part in ``home``: balancer, servers, Redis, PostgreSQL; say what stopped."""
    stopped: list[str] = []
    stack = _stack(home)
    for name in ["balancer", *stack.get("servers", {"server": {}})]:
        pidfile, _ = _files(home, name)
        if stop_pidfile(pidfile):
            stopped.append("prefect balancer" if name == "balancer" else f"prefect {name}")
    if stack and not stack.get("servers", {}).get("server") and stop_pidfile(home / "server.pid"):
        stopped.append("prefect server")  # a single server left over from an older stack
    (home / "server.port").unlink(missing_ok=True)
    if redis_server.stop_redis(home / "redis"):
        stopped.append("redis")
    if postgres.stop_postgres(home / "postgres"):
        stopped.append("postgresql")
    return stopped


def stop_prefect_server(home: Path) -> bool:
    return bool(stop_prefect_stack(home))
