"""The local Docker Engine and the base images everything here is built from.

No image can be pulled on this machine, so the base images are made locally: the
statically linked busybox of the ``busybox-static`` package plus one symlink per applet,
imported as a one-layer image (what ``tar | docker import -`` does). Both functions are
idempotent: present images are kept.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import time
from pathlib import Path

import docker
import docker.errors

BUSYBOX_IMAGE = "robotics-cd/busybox:latest"
CHECK_RUNNER_IMAGE = "robotics-cd/check-runner:latest"
BUSYBOX_BINARY = Path(os.environ.get("ROBOTICS_CD_BUSYBOX", "/bin/busybox"))
NOBODY = 65534

# The check runner: an unprivileged user and a writable /workspace the checkout is copied to.
_CHECK_RUNNER_DOCKERFILE = f"""\
FROM {BUSYBOX_IMAGE}
RUN mkdir -p /workspace && chown {NOBODY}:{NOBODY} /workspace
ENV HOME=/tmp
WORKDIR /workspace
USER {NOBODY}:{NOBODY}
LABEL org.opencontainers.image.title="robotics-cd check runner"
"""

_ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n",
}


class EngineUnavailable(RuntimeError):
    """dockerd does not answer, or a base image cannot be made."""


def docker_client() -> docker.DockerClient:
    """A client from the environment (``DOCKER_HOST`` or the default socket)."""
    return docker.from_env(timeout=120)


def ensure_docker(*, timeout: float = 10.0) -> str:
    """Return the engine's version, or raise EngineUnavailable saying how to start it."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client = docker_client()
            try:
                return str(client.version()["Version"])
            finally:
                client.close()
        except docker.errors.DockerException as exc:
            last = exc
            time.sleep(0.5)
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    raise EngineUnavailable(
        f"no Docker Engine answers at {where} ({last}); start it (as root: `dockerd &`, "
        "or run scripts/test which starts it) or point DOCKER_HOST at a running one"
    )


def _has_image(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def _applets(busybox: Path) -> list[str]:
    """Install paths of every applet (``bin/sh``, ``usr/bin/wget``, ...)."""
    out = subprocess.run(
        [str(busybox), "--list-full"], check=True, capture_output=True, text=True
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def busybox_rootfs(busybox: Path = BUSYBOX_BINARY) -> bytes:
    """A tar of a minimal root filesystem: busybox, its applet links, /etc basics, /tmp."""
    if not busybox.is_file():
        raise EngineUnavailable(
            f"{busybox} is missing; install it (`apt-get install busybox-static`) "
            "or set ROBOTICS_CD_BUSYBOX"
        )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "var", "www"):
            add_dir(d)
        add_dir("tmp", 0o1777)
        add_dir("var/tmp", 0o1777)
        tar.add(str(busybox), arcname="bin/busybox")
        for applet in _applets(busybox):
            if applet == "bin/busybox":
                continue
            link = tarfile.TarInfo(applet)
            link.type, link.linkname, link.mode = tarfile.SYMTYPE, "/bin/busybox", 0o777
            tar.addfile(link)
        for name, text in _ETC_FILES.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _import_busybox(client: docker.DockerClient) -> None:
    repository, tag = BUSYBOX_IMAGE.rsplit(":", 1)
    client.api.import_image_from_data(
        busybox_rootfs(),
        repository=repository,
        tag=tag,
        changes=[
            "ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            'CMD ["sh"]',
        ],
    )


def _build_check_runner(client: docker.DockerClient) -> None:
    try:
        client.images.build(
            fileobj=io.BytesIO(_CHECK_RUNNER_DOCKERFILE.encode()),
            tag=CHECK_RUNNER_IMAGE,
            rm=True,
            forcerm=True,
            pull=False,
        )
    except docker.errors.BuildError as exc:
        log = "".join(str(c.get("stream", c.get("error", ""))) for c in exc.build_log)
        raise EngineUnavailable(f"building {CHECK_RUNNER_IMAGE} failed: {exc}\n{log}") from exc


def ensure_base_images() -> list[str]:
    """Make the base images that are missing; return the names of those made."""
    ensure_docker()
    made: list[str] = []
    client = docker_client()
    try:
        if not _has_image(client, BUSYBOX_IMAGE):
            _import_busybox(client)
            made.append(BUSYBOX_IMAGE)
        if not _has_image(client, CHECK_RUNNER_IMAGE):
            _build_check_runner(client)
            made.append(CHECK_RUNNER_IMAGE)
    finally:
        client.close()
    return made


if __name__ == "__main__":
    print(ensure_docker())
    print(ensure_base_images())
