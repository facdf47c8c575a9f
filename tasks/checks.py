"""Lint and test commands of a commit, run in throwaway containers on the Docker Engine.

Commit code is untrusted while the worker holds registry, Argo CD and GitHub credentials,
so each command runs in a fresh container that gets:

* a *copy* of the checkout (a tar stream on the container's stdin, unpacked into
  ``/workspace``; no bind mount, so nothing is written back and it works with a remote
  Docker host too), without ``.git`` (the remote URL may carry a token);
* a read-only root filesystem; the only writable places are ``/workspace`` and ``/tmp``,
  size-limited tmpfs mounts. A tmpfs is charged to the container's memory cgroup, so the
  memory limit is the processes' share *plus* both tmpfs sizes: a full workspace never
  starves the processes, and full processes never get the workspace's share;
* no network (``network_mode=none``) unless the catalog says ``checks.network: true``;
* an explicit, minimal environment: nothing of the worker's (no credentials, no
  ``DOCKER_HOST``, no Prefect API key), no Docker socket, all capabilities dropped,
  ``no-new-privileges``, an unprivileged user, bounded CPU, memory and pids;
* a wall-clock deadline enforced three times: inside the container (``docker-init`` is
  PID 1 and the command runs under ``timeout -s KILL``, so the container dies even if the
  worker that started it died), by the client (kill after the deadline plus a grace), and
  by a sweep at the start of every stage that removes check containers past their
  deadline label (a worker that died between create and start, or a command that killed
  its own ``timeout``).

Output streams line by line into the Prefect log; a failure raises :class:`CheckFailed`
naming the stage, the command and the tail of its output.
"""

from __future__ import annotations

import functools
import logging
import socket
import tarfile
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import anyio.to_thread
import docker
import docker.errors
import requests.exceptions
from prefect import get_run_logger, task
from pydantic import BaseModel, Field

from core.errors import CheckFailed, ImageError, InvalidInput
from tasks.images import load_docker_host

CHECK_USER = "65534:65534"
WORKDIR = "/workspace"
TAIL_LINES = 40
DEADLINE_LABEL = "robotics-cd.deadline"
KILL_GRACE_SECONDS = 15.0
# PID 1 is docker-init; the unpacking and the command both run under the deadline.
_UNPACK_THEN_RUN = f'tar -x -f - -C {WORKDIR} && exec sh -c "$0"'
# The only environment a check sees.
CHECK_ENV = {"HOME": "/tmp", "CI": "true", "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"}


class CheckLimits(BaseModel):
    """What one check container may use (catalog ``checks``)."""

    cpus: float = Field(default=1.0, gt=0, description="CPU cores (CFS quota).")
    memory_mb: int = Field(default=1024, ge=64, description="Memory for the processes.")
    workspace_mb: int = Field(default=512, ge=16, description="tmpfs at /workspace.")
    tmp_mb: int = Field(default=64, ge=1, description="tmpfs at /tmp.")
    pids: int = Field(default=512, ge=16)

    @property
    def mem_limit_bytes(self) -> int:
        """Processes plus both tmpfs mounts: a tmpfs is charged to the memory cgroup."""
        return (self.memory_mb + self.workspace_mb + self.tmp_mb) << 20


class CommandResult(BaseModel):
    command: str
    exit_code: int
    seconds: float


class StageResult(BaseModel):
    """What one stage (lint, unit, integration) ran, and how long it took."""

    stage: str
    commands: list[CommandResult] = Field(default_factory=list)
    seconds: float = 0.0


def tar_checkout(root: Path, out: IO[bytes]) -> None:
    """Write the checkout (without .git) as ``workspace/...`` owned by the check user."""
    uid, gid = (int(x) for x in CHECK_USER.split(":"))

    def owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid, info.gid, info.uname, info.gname = uid, gid, "", ""
        return info

    with tarfile.open(fileobj=out, mode="w") as tar:
        # Names are relative to /workspace (a tmpfs, unpacked by tar inside the container).
        # Symlinks stay links (no dereference): a link to a worker file copies nothing of it.
        for child in sorted(root.iterdir()):
            if child.name != ".git":
                tar.add(str(child), arcname=child.name, filter=owned)
    out.seek(0)


def _lines(chunks: Iterator[bytes]) -> Iterator[str]:
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace").rstrip("\r")
    if buffer:
        yield buffer.decode("utf-8", "replace")


def _follow_logs(container: Any, log: Callable[[str], None], tail: deque[str]) -> threading.Thread:
    def pump() -> None:
        for line in _lines(container.logs(stream=True, follow=True, stdout=True, stderr=True)):
            tail.append(line)
            log(line)

    thread = threading.Thread(target=pump, name=f"logs-{container.name}", daemon=True)
    thread.start()
    return thread


def reap_expired(client: docker.DockerClient, now: float | None = None) -> list[str]:
    """Remove check containers past their deadline label (plus the grace); their names."""
    now = time.time() if now is None else now
    reaped = []
    for container in client.containers.list(
        all=True, filters={"label": ["robotics-cd.component=checks", DEADLINE_LABEL]}
    ):
        try:
            deadline = float(container.labels.get(DEADLINE_LABEL, "inf"))
        except ValueError:
            continue
        if deadline + KILL_GRACE_SECONDS < now:
            try:
                container.remove(force=True)
            except docker.errors.NotFound:  # removed by its own client meanwhile
                continue
            reaped.append(str(container.name))
    return reaped


def create_check_container(
    client: docker.DockerClient,
    *,
    stage: str,
    command: str,
    image: str,
    network: bool,
    timeout: float,
    limits: CheckLimits,
    name_prefix: str = "robotics-cd-check",
) -> Any:
    """Create (not start) one boxed-in check container; its stdin takes the checkout tar."""
    name = f"{name_prefix}-{stage}-{uuid.uuid4().hex[:8]}"
    try:
        return client.containers.create(
            image,
            command=[
                "timeout",
                "-s",
                "KILL",
                str(max(1, int(timeout))),
                "sh",
                "-c",
                _UNPACK_THEN_RUN,
                command,
            ],
            name=name,
            init=True,
            stdin_open=True,
            working_dir=WORKDIR,
            user=CHECK_USER,
            environment=CHECK_ENV,
            network_mode="bridge" if network else "none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            read_only=True,
            tmpfs={
                WORKDIR: f"size={limits.workspace_mb}m,exec,uid=65534,gid=65534,mode=0755",
                "/tmp": f"size={limits.tmp_mb}m,exec,uid=65534,gid=65534,mode=1777",
            },
            mem_limit=limits.mem_limit_bytes,
            memswap_limit=limits.mem_limit_bytes,  # no swap on top
            nano_cpus=int(limits.cpus * 1e9),
            pids_limit=limits.pids,
            labels={
                "robotics-cd.component": "checks",
                "robotics-cd.stage": stage,
                DEADLINE_LABEL: f"{time.time() + timeout:.0f}",
            },
        )
    except docker.errors.ImageNotFound as exc:
        raise ImageError(
            f"check image {image} is not on the Docker host; build it (`robotics-cd sandbox up` "
            "makes robotics-cd/check-runner) or set checks.image in services.yaml"
        ) from exc


def _attach_stdin(client: docker.DockerClient, container: Any) -> Any:
    """Attach to the container's stdin (before it starts); returns the socket."""
    return client.api.attach_socket(container.id, params={"stdin": 1, "stream": 1})


def _write_and_close(sock: Any, archive: IO[bytes]) -> None:
    raw = getattr(sock, "_sock", sock)
    archive.seek(0)
    try:
        while chunk := archive.read(1 << 16):
            raw.sendall(chunk)
        raw.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the container died while reading (tar failed, deadline): its exit code says why
    finally:
        sock.close()


def run_command_sync(
    client: docker.DockerClient,
    *,
    stage: str,
    command: str,
    archive: IO[bytes],
    image: str,
    network: bool,
    timeout: float,
    log: Callable[[str], None],
    limits: CheckLimits | None = None,
    name_prefix: str = "robotics-cd-check",
) -> tuple[int | None, str]:
    """Run one command in a fresh container; return (exit code or None on timeout, tail)."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    container = create_check_container(
        client,
        stage=stage,
        command=command,
        image=image,
        network=network,
        timeout=timeout,
        limits=limits or CheckLimits(),
        name_prefix=name_prefix,
    )
    started = time.monotonic()
    try:
        sock = _attach_stdin(client, container)
        container.start()
        _write_and_close(sock, archive)
        pump = _follow_logs(container, log, tail)
        try:
            exit_code: int | None = int(
                container.wait(timeout=timeout + KILL_GRACE_SECONDS)["StatusCode"]
            )
            if exit_code == 137 and time.monotonic() - started >= timeout:
                exit_code = None  # the in-container deadline killed it
                log(f"timed out after {timeout:.0f}s; the container's deadline killed it")
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            exit_code = None
            log(f"timed out after {timeout:.0f}s; killing the container")
            container.kill()
        pump.join(timeout=10)
    except docker.errors.APIError as exc:
        raise ImageError(
            f"could not run the {stage} container from {image}: {exc.explanation or exc}"
        ) from exc
    finally:
        container.remove(force=True)
    return exit_code, "\n".join(tail)


@task(name="check", task_run_name="{stage}")
async def run_check(
    stage: str,
    commands: Sequence[str],
    repo_path: str,
    *,
    image: str,
    network: bool = False,
    timeout: timedelta = timedelta(minutes=10),
    limits: CheckLimits | None = None,
    docker_host_block: str | None = None,
) -> StageResult:
    """Run a stage's commands, one throwaway container each, stopping at the first failure.

    Args:
        stage: ``lint``, ``unit`` or ``integration`` (names the task run and the error).
        commands: shell commands (run with ``sh -c`` in ``/workspace``, a copy of the checkout).
        repo_path: the checkout (``Checkout.path``).
        image: the check image (catalog ``checks.image``); it needs ``sh``.
        network: give the containers a network (catalog ``checks.network``; off by default).
        timeout: per command; a command over it is killed and the stage fails.
        limits: CPU, memory, workspace and /tmp sizes, pids (default :class:`CheckLimits`).
        docker_host_block: name of the ``DockerHost`` block (default: settings).

    Raises:
        CheckFailed: a command exited non-zero or timed out (stage, command, output tail).
        ImageError: the check image is not on the Docker host.
        InvalidInput: the checkout does not fit the workspace.
    """
    root = Path(repo_path)
    if not root.is_dir():
        raise InvalidInput(f"checkout {repo_path} does not exist")
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = get_run_logger()
    result = StageResult(stage=stage)
    if not commands:
        logger.info("%s: no commands in the catalog; nothing to run", stage)
        return result
    host = await load_docker_host(docker_host_block)
    started = time.monotonic()
    client = await anyio.to_thread.run_sync(host.get_client)  # version negotiation is I/O
    limits = limits or CheckLimits()
    with tempfile.TemporaryFile() as archive, client:
        reaped = await anyio.to_thread.run_sync(lambda: reap_expired(client))
        if reaped:
            logger.warning("removed check containers past their deadline: %s", ", ".join(reaped))
        await anyio.to_thread.run_sync(lambda: tar_checkout(root, archive))
        size_mb = archive.seek(0, 2) / (1 << 20)
        if size_mb > limits.workspace_mb * 0.9:
            raise InvalidInput(
                f"the checkout ({size_mb:.0f} MiB) does not fit the check workspace "
                f"({limits.workspace_mb} MiB); raise checks.workspace_mb in services.yaml"
            )
        for command in commands:
            logger.info("%s: $ %s", stage, command)
            t0 = time.monotonic()
            run = functools.partial(
                run_command_sync,
                client,
                stage=stage,
                command=command,
                archive=archive,
                image=image,
                network=network,
                timeout=timeout.total_seconds(),
                log=lambda line: logger.info("[%s] %s", stage, line),
                limits=limits,
            )
            exit_code, tail = await anyio.to_thread.run_sync(run)
            if exit_code != 0:
                raise CheckFailed(stage, command, exit_code, tail)
            result.commands.append(
                CommandResult(command=command, exit_code=0, seconds=time.monotonic() - t0)
            )
    result.seconds = time.monotonic() - started
    logger.info("%s passed in %.1fs", stage, result.seconds)
    return result
