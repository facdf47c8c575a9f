"""Debian's ``redis-server`` for Prefect's Redis messaging (``prefect-redis``).

Started like the sandbox's PostgreSQL: its files in ``<home>``, a free 127.0.0.1 port, a
password (``<home>/password``), and, when we are root, as an unprivileged system user
(``redis`` from Debian's package, or ``ROBOTICS_CD_REDIS_USER``) through ``runuser``. No
persistence: Prefect's streams live as long as the sandbox.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from sandbox.postgres import ensure_traversable
from sandbox.procs import free_port, pid_alive, remembered_port, spawn, stop_pidfile, wait_until


class RedisError(RuntimeError):
    """redis-server is missing or did not answer."""


@dataclass(frozen=True)
class Redis:
    home: Path
    port: int
    password: str

    def url(self, db: int = 0) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{db}"


def ping(port: int, password: str, *, timeout: float = 2.0) -> bool:
    """``AUTH`` + ``PING`` in RESP by hand: no client library needed to ask if it is up."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(
                f"*2\r\n$4\r\nAUTH\r\n${len(password)}\r\n{password}\r\n*1\r\n$4\r\nPING\r\n".encode()
            )
            got = b""
            while b"PONG" not in got and len(got) < 1024:
                chunk = sock.recv(1024)
                if not chunk:
                    break
                got += chunk
            return b"+PONG" in got
    except OSError:
        return False


def run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    return os.environ.get("ROBOTICS_CD_REDIS_USER", "redis")


def start_redis(home: Path, *, port: int | None = None, timeout: float = 30.0) -> Redis:
    """Start (or reuse, if it answers) a redis-server whose files are in ``home``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisError("redis-server not found: apt-get install -y redis-server")
    home.mkdir(parents=True, exist_ok=True)
    portfile, pwfile = home / "port", home / "password"
    if not pwfile.exists():
        pwfile.write_text(secrets.token_urlsafe(18))
        pwfile.chmod(0o600)
    password = pwfile.read_text().strip()
    if portfile.exists() and ping(int(portfile.read_text()), password):
        return Redis(home, int(portfile.read_text()), password)
    port = port or remembered_port(portfile) or free_port()
    user = run_as()
    ensure_traversable(home, user)
    data = home / "data"
    data.mkdir(exist_ok=True)
    if user:
        entry = pwd.getpwnam(user)
        os.chown(data, entry.pw_uid, entry.pw_gid)
    # The password goes in a config file only the server user reads, not on the command line.
    conf = data / "redis.conf"
    conf.write_text(
        f"bind 127.0.0.1\nport {port}\nrequirepass {password}\ndir {data}\n"
        'save ""\nappendonly no\nprotected-mode yes\ndaemonize no\n'
    )
    conf.chmod(0o600)
    if user:
        os.chown(conf, entry.pw_uid, entry.pw_gid)
    argv = [binary, str(conf)]
    spawn(
        ["runuser", "-u", user, "--", *argv] if user else argv,
        log=home / "redis.log",
        pidfile=home / "redis.pid",
    )
    portfile.write_text(str(port))
    wait_until(
        lambda: ping(port, password),
        timeout=timeout,
        what=f"redis-server (log: {home / 'redis.log'})",
    )
    return Redis(home, port, password)


def is_running(home: Path) -> bool:
    pidfile = home / "redis.pid"
    return pidfile.exists() and pid_alive(int(pidfile.read_text()))


def stop_redis(home: Path) -> bool:
    (home / "port").unlink(missing_ok=True)
    return stop_pidfile(home / "redis.pid")
