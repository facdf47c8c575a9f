"""Debian's PostgreSQL, a cluster in the state dir, for the Prefect server's scale-out variant.

``initdb`` + ``pg_ctl`` on a free 127.0.0.1 port, the data dir in ``<home>/data``. PostgreSQL
refuses to run as root (and CI runs as root): then every server-side command runs through
``runuser`` as an unprivileged system user (``postgres`` from Debian's package, or the one
named by ``ROBOTICS_CD_PG_USER``) that owns the data dir. Clients connect over TCP with a
password (scram-sha-256) kept in ``<home>/password``: the machine is shared.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox.procs import free_port, pid_alive, remembered_port

DB_NAME = "prefect"
DB_USER = "prefect"


class PostgresError(RuntimeError):
    """The cluster could not be made or started; the message names the log to read."""


@dataclass(frozen=True)
class Postgres:
    home: Path
    port: int
    password: str

    @property
    def url(self) -> str:
        """The SQLAlchemy URL Prefect's server takes (asyncpg driver)."""
        return f"postgresql+asyncpg://{DB_USER}:{self.password}@127.0.0.1:{self.port}/{DB_NAME}"

    @property
    def data(self) -> Path:
        return self.home / "data"


def bin_dir() -> Path:
    """Debian keeps the server binaries off PATH, one dir per major version: take the newest."""
    override = os.environ.get("ROBOTICS_CD_PG_BIN")
    if override:
        return Path(override)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if not found:
        raise PostgresError(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: "
            "apt-get install -y postgresql (scripts/bootstrap.sh does), or set ROBOTICS_CD_PG_BIN"
        )
    return Path(found[-1]).parent


def run_as() -> str | None:
    """The user server-side commands run as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    return os.environ.get("ROBOTICS_CD_PG_USER", "postgres")


def _as_user(user: str | None, argv: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *argv] if user else argv


def _give(path: Path, user: str | None) -> None:
    """Make ``path`` (a dir we created) the user's, and let it traverse the way there."""
    if user is None:
        return
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def ensure_traversable(path: Path, user: str | None) -> None:
    """The server process opens its data dir by absolute path: every ancestor needs ``x`` for
    the user. Ancestors we own get ``o+x`` (not ``r``: nothing becomes listable); any other
    that blocks the way is an error that says what to do."""
    if user is None:
        return
    for parent in [*reversed(path.parents), path]:
        mode = parent.stat().st_mode
        if mode & stat.S_IXOTH:
            continue
        if parent.stat().st_uid == os.geteuid():
            parent.chmod(mode | stat.S_IXOTH)
            continue
        raise PostgresError(
            f"{user} cannot reach {path}: {parent} is not traversable; choose a state dir "
            f"under a path others may traverse"
        )


def _run(argv: list[str], *, what: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise PostgresError(f"{what} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def is_running(home: Path) -> bool:
    pid = _postmaster_pid(home / "data")
    return pid is not None and pid_alive(pid)


def start_postgres(home: Path, *, port: int | None = None, timeout: float = 60.0) -> Postgres:
    """Start (or reuse) the cluster in ``home``; create it and the database the first time."""
    home.mkdir(parents=True, exist_ok=True)
    user = run_as()
    pg = bin_dir()
    portfile, pwfile = home / "port", home / "password"
    if not pwfile.exists():
        pwfile.write_text(secrets.token_urlsafe(18))
        pwfile.chmod(0o600)
    password = pwfile.read_text().strip()
    data = home / "data"
    if is_running(home) and portfile.exists():
        return Postgres(home, int(portfile.read_text()), password)
    port = port or remembered_port(portfile) or free_port()
    ensure_traversable(home, user)
    run = home / "run"  # its unix socket: not Debian's /var/run/postgresql
    run.mkdir(exist_ok=True)
    _give(run, user)
    fresh = not (data / "PG_VERSION").exists()
    if fresh:
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(mode=0o700)
        _give(data, user)
        initpw = run / "initpw"
        initpw.write_text(password + "\n")
        initpw.chmod(0o600)
        _give(initpw, user)
        try:
            _run(
                _as_user(
                    user,
                    [
                        str(pg / "initdb"),
                        "-D",
                        str(data),
                        "-U",
                        DB_USER,
                        f"--pwfile={initpw}",
                        "--auth-host=scram-sha-256",
                        "--auth-local=scram-sha-256",
                        "-E",
                        "UTF8",
                        "--locale=C",
                    ],
                ),
                what="initdb",
            )
        finally:
            initpw.unlink(missing_ok=True)
    log = data / "server.log"  # inside the data dir: the server user writes it
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={run} "
        "-c max_connections=200 -c shared_buffers=64MB"
    )
    _run(
        _as_user(
            user,
            [
                str(pg / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(log),
                "-o",
                options,
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ],
        ),
        what=f"pg_ctl start (log: {log})",
    )
    portfile.write_text(str(port))
    server = Postgres(home, port, password)
    if fresh:
        _run(
            [str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, DB_NAME],
            env={"PGPASSWORD": password},
            what="createdb",
        )
    return server


def stop_postgres(home: Path, *, timeout: float = 30.0) -> bool:
    """Stop the cluster (fast shutdown; SIGKILL of the postmaster if it hangs)."""
    data = home / "data"
    pid = _postmaster_pid(data)
    if pid is None or not pid_alive(pid):
        return False
    proc = subprocess.run(
        _as_user(
            run_as(),
            [str(bin_dir() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "20", "stop"],
        ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0 and pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # children exit when the postmaster is gone
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


def pids(home: Path) -> list[int]:
    """The postmaster and its children (backends, checkpointer, ...), for CPU and memory."""
    root = _postmaster_pid(home / "data")
    if root is None:
        return []
    found = [root]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == root:
            found.append(int(entry.name))
    return found
