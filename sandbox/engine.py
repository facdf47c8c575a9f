"""The local Docker Engine and the base images everything here is built from.

No image can be pulled on this machine, so the base images are made locally:

- busybox: the statically linked busybox of the ``busybox-static`` package plus one symlink
  per applet, imported as a one-layer image (what ``tar | docker import -`` does);
- a Debian bookworm with Python 3.11 (``robotics-cd/python-base``): ``debootstrap
  --variant=minbase --include=python3,ca-certificates bookworm DIR <mirror>`` from the mirror
  in this machine's apt sources, then ``tar -C DIR -c . | docker import -``. About 40 s and
  275 MB, once per machine (per Docker Engine): the base of the Python sample service.

Every function is idempotent: present images are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors

BUSYBOX_IMAGE = "robotics-cd/busybox:latest"
CHECK_RUNNER_IMAGE = "robotics-cd/check-runner:latest"
PYTHON_BASE_IMAGE = "robotics-cd/python-base:bookworm"
PYTHON_CHECK_RUNNER_IMAGE = "robotics-cd/python-check-runner:latest"
DEBIAN_SUITE = "bookworm"
DEBOOTSTRAP_PACKAGES = ("python3", "ca-certificates")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
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

# The same for Python services' checks, on the Debian base (python3, no pip, no network).
_PYTHON_CHECK_RUNNER_DOCKERFILE = f"""\
FROM {PYTHON_BASE_IMAGE}
RUN mkdir -p /workspace && chown {NOBODY}:{NOBODY} /workspace
ENV HOME=/tmp PYTHONDONTWRITEBYTECODE=1
WORKDIR /workspace
USER {NOBODY}:{NOBODY}
LABEL org.opencontainers.image.title="robotics-cd Python check runner"
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


def _build_check_runner(
    client: docker.DockerClient,
    dockerfile: str = _CHECK_RUNNER_DOCKERFILE,
    tag: str = CHECK_RUNNER_IMAGE,
) -> None:
    try:
        client.images.build(
            fileobj=io.BytesIO(dockerfile.encode()),
            tag=tag,
            rm=True,
            forcerm=True,
            pull=False,
        )
    except docker.errors.BuildError as exc:
        log = "".join(str(c.get("stream", c.get("error", ""))) for c in exc.build_log)
        raise EngineUnavailable(f"building {tag} failed: {exc}\n{log}") from exc


def debian_mirror(sources: tuple[Path, ...] = APT_SOURCES, suite: str = DEBIAN_SUITE) -> str:
    """The Debian mirror of this machine's apt sources that carries ``suite``.

    Reads both formats: one-line ``deb URI SUITE COMPONENTS`` and deb822 ``.sources`` stanzas
    (``URIs:``, ``Suites:``). ``ROBOTICS_CD_DEBIAN_MIRROR`` overrides.
    """
    override = os.environ.get("ROBOTICS_CD_DEBIAN_MIRROR")
    if override:
        return override
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.suffix in (".list", ".sources"))
        elif source.is_file():
            files.append(source)
    for path in files:
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if (
                    "deb" in fields.get("types", "").split()
                    and suite in fields.get("suites", "").split()
                ):
                    return fields.get("uris", "").split()[0]
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
                    return parts[1]
    raise EngineUnavailable(
        f"no apt source for Debian {suite} in {', '.join(map(str, sources))}; set "
        "ROBOTICS_CD_DEBIAN_MIRROR to a Debian mirror URL"
    )


@contextlib.contextmanager
def machine_lock(name: str) -> Iterator[None]:
    """One maker at a time on this machine (sandboxes of several worktrees share dockerd)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "robotics-cd"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f"{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import_python_base(client: docker.DockerClient, *, timeout: float = 900.0) -> None:
    """debootstrap a minimal bookworm with Python and import it as ``PYTHON_BASE_IMAGE``."""
    debootstrap_image(client, PYTHON_BASE_IMAGE, DEBOOTSTRAP_PACKAGES, timeout=timeout)


def debootstrap_image(
    client: docker.DockerClient,
    image: str,
    packages: tuple[str, ...],
    *,
    timeout: float = 900.0,
) -> None:
    """``debootstrap --variant=minbase --include=PACKAGES bookworm`` imported as ``image``."""
    debootstrap = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin")
    if debootstrap is None:
        raise EngineUnavailable(
            "debootstrap is missing; install it (`apt-get install debootstrap`)"
        )
    if os.geteuid() != 0:
        raise EngineUnavailable(f"making {image} with debootstrap needs root")
    mirror = debian_mirror()
    with tempfile.TemporaryDirectory(prefix="debootstrap-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc = subprocess.run(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(packages)}",
                DEBIAN_SUITE,
                str(rootfs),
                mirror,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            log = (proc.stdout + proc.stderr)[-3000:]
            raise EngineUnavailable(f"debootstrap of {DEBIAN_SUITE} from {mirror} failed:\n{log}")
        # The apt lists and caches are not part of an image.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / junk).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.run(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
            capture_output=True,
            check=True,
            timeout=timeout,
        ).stdout
        repository, tag = image.rsplit(":", 1)
        client.api.import_image_from_data(
            tar,
            repository=repository,
            tag=tag,
            changes=[
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ENV LANG=C.UTF-8",
                "ENV PYTHONUNBUFFERED=1",
                'CMD ["python3"]',
            ],
        )


def ensure_python_base() -> bool:
    """Make ``PYTHON_BASE_IMAGE`` if this engine lacks it; True when it was made now."""
    client = docker_client()
    try:
        if _has_image(client, PYTHON_BASE_IMAGE):
            return False
        with machine_lock("python-base"):
            if _has_image(client, PYTHON_BASE_IMAGE):  # made by another sandbox meanwhile
                return False
            _import_python_base(client)
        return True
    finally:
        client.close()


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
    if ensure_python_base():
        made.append(PYTHON_BASE_IMAGE)
    client = docker_client()
    try:
        if not _has_image(client, PYTHON_CHECK_RUNNER_IMAGE):
            _build_check_runner(client, _PYTHON_CHECK_RUNNER_DOCKERFILE, PYTHON_CHECK_RUNNER_IMAGE)
            made.append(PYTHON_CHECK_RUNNER_IMAGE)
    finally:
        client.close()
    return made


if __name__ == "__main__":
    print(ensure_docker())
    print(ensure_base_images())
