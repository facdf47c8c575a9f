"""Lint and test commands of a commit, run in throwaway containers on the Docker Engine.

Commit code is untrusted while the worker holds registry, Argo CD and GitHub credentials,
so each command runs in a fresh container that gets:

* a *copy* of the checkout (``put_archive`` into ``/workspace``; no bind mount, so nothing
  is written back and it works with a remote Docker host too), without ``.git`` (the
  remote URL may carry a token);
* no network (``network_mode=none``) unless the catalog says ``checks.network: true``;
* an explicit, minimal environment: nothing of the worker's (no credentials, no
  ``DOCKER_HOST``, no Prefect API key), no Docker socket, all capabilities dropped,
  ``no-new-privileges``, an unprivileged user, bounded memory and pids;
* a deadline, after which it is killed.

Output streams line by line into the Prefect log; a failure raises :class:`CheckFailed`
naming the stage, the command and the tail of its output.
"""

from __future__ import annotations

import functools
import logging
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
# The only environment a check sees.
CHECK_ENV = {"HOME": "/tmp", "CI": "true", "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"}


class CommandResult(BaseModel):
    command: str
    exit_code: int
    seconds: float


class StageResult(BaseModel):
    """What one stage (lint, unit, integration) ran, and how long it took."""

    stage: str
    commands: list[CommandResult] = Field(default_factory=list)
    seconds: float = 0.0


def _tar_checkout(root: Path, out: IO[bytes]) -> None:
    """Write the checkout (without .git) as ``workspace/...`` owned by the check user."""
    uid, gid = (int(x) for x in CHECK_USER.split(":"))

    def owned(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if len(parts) > 1 and parts[1] == ".git":
            return None
        info.uid, info.gid, info.uname, info.gname = uid, gid, "", ""
        return info

    with tarfile.open(fileobj=out, mode="w") as tar:
        # Symlinks stay links (no dereference): a link to a worker file copies nothing of it.
        tar.add(str(root), arcname=WORKDIR.strip("/"), filter=owned)
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
    name_prefix: str = "robotics-cd-check",
) -> tuple[int | None, str]:
    """Run one command in a fresh container; return (exit code or None on timeout, tail)."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    name = f"{name_prefix}-{stage}-{uuid.uuid4().hex[:8]}"
    try:
        container = client.containers.create(
            image,
            command=["sh", "-c", command],
            name=name,
            working_dir=WORKDIR,
            user=CHECK_USER,
            environment=CHECK_ENV,
            network_mode="bridge" if network else "none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            mem_limit="1g",
            pids_limit=512,
            labels={"robotics-cd.component": "checks", "robotics-cd.stage": stage},
        )
    except docker.errors.ImageNotFound as exc:
        raise ImageError(
            f"check image {image} is not on the Docker host; build it (`robotics-cd sandbox up` "
            "makes robotics-cd/check-runner) or set checks.image in services.yaml"
        ) from exc
    try:
        archive.seek(0)
        container.put_archive("/", archive)
        container.start()
        pump = _follow_logs(container, log, tail)
        try:
            exit_code: int | None = int(container.wait(timeout=timeout)["StatusCode"])
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
        docker_host_block: name of the ``DockerHost`` block (default: settings).

    Raises:
        CheckFailed: a command exited non-zero or timed out (stage, command, output tail).
        ImageError: the check image is not on the Docker host.
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
    with tempfile.TemporaryFile() as archive, client:
        await anyio.to_thread.run_sync(lambda: _tar_checkout(root, archive))
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
