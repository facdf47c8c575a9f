"""Small helpers the sandbox uses to run its processes: free ports, waits with deadlines,
pid files, and stopping what it started."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def remembered_port(portfile: Path) -> int | None:
    """The port a restarted service had before, if recorded and still free: clients,
    manifests and env files that name it keep working."""
    try:
        port = int(portfile.read_text())
    except (OSError, ValueError):
        return None
    return port if port_free(port) else None


def port_free(port: int) -> bool:
    """Nothing holds ``port`` on 127.0.0.1 (binding it would succeed)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(
    check: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2
) -> None:
    """Poll ``check`` until it is true; raise TimeoutError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s" + (f": {last}" if last else ""))


def http_ok(url: str, **kwargs: object) -> bool:
    try:
        return httpx.get(url, timeout=2, **kwargs).status_code < 500  # type: ignore[arg-type]
    except httpx.HTTPError:
        return False


def spawn(
    argv: Sequence[str],
    *,
    log: Path,
    env: dict[str, str] | None = None,
    pidfile: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running process in its own session, output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    if pidfile:
        pidfile.write_text(str(proc.pid))
    return proc


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, *, timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it outlives ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not pid_alive(pid):
                return
            time.sleep(0.1)


def stop_pidfile(pidfile: Path, *, timeout: float = 10.0) -> bool:
    if not pidfile.exists():
        return False
    try:
        pid = int(pidfile.read_text().strip())
    except ValueError:
        pidfile.unlink(missing_ok=True)
        return False
    stop_pid(pid, timeout=timeout)
    pidfile.unlink(missing_ok=True)
    return True
