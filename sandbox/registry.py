"""A real OCI registry (distribution v2, ``docker-registry``) on 127.0.0.1 with htpasswd auth.

State (config, htpasswd, blobs, pid and port files, the generated password) lives under one
state dir, so a second ``start_registry`` on the same dir reuses the running registry. The
password is generated once and kept in a 0600 file beside the htpasswd file; it is never
logged.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors
import httpx
import yaml

from sandbox.procs import free_port, pid_alive, remembered_port, spawn, stop_pidfile, wait_until

USERNAME = "robotics-cd"


class RegistryError(RuntimeError):
    """The sandbox registry could not start, or an image could not be pushed to it."""


@dataclass(frozen=True)
class Registry:
    host: str  # host:port, as in image references
    username: str
    password: str = field(repr=False)
    home: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"


def _write_config(home: Path, port: int) -> Path:
    config = {
        "version": 0.1,
        "log": {"level": "info", "fields": {"service": "registry"}},
        "storage": {
            "filesystem": {"rootdirectory": str(home / "data")},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "auth": {"htpasswd": {"realm": "robotics-cd-sandbox", "path": str(home / "htpasswd")}},
    }
    path = home / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _password(home: Path) -> str:
    """The registry password: generated once, kept 0600 in the state dir."""
    path = home / "password"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24))
    return path.read_text().strip()


def _write_htpasswd(home: Path, username: str, password: str) -> None:
    htpasswd = shutil.which("htpasswd")
    if htpasswd is None:
        raise RegistryError("htpasswd is missing; install it: apt-get install apache2-utils")
    # -i reads the password from stdin, so it is not on any command line (ps shows argv).
    line = subprocess.run(
        [htpasswd, "-Bin", username], input=password, check=True, capture_output=True, text=True
    ).stdout.strip()
    target = home / "htpasswd"
    target.touch(mode=0o600)
    target.write_text(line + "\n")


def _answers(host: str) -> bool:
    try:
        # 401 without credentials is the registry answering (and proving auth is on).
        return httpx.get(f"http://{host}/v2/", timeout=2).status_code in (200, 401)
    except httpx.HTTPError:
        return False


def start_registry(home: Path, *, port: int | None = None, timeout: float = 30.0) -> Registry:
    """Start (or reuse, if its pid file is alive) a registry whose state is in ``home``."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise RegistryError(
            "docker-registry is missing; install it: apt-get install docker-registry"
        )
    home.mkdir(parents=True, exist_ok=True)
    pidfile, portfile = home / "registry.pid", home / "registry.port"
    password = _password(home)
    if pidfile.exists() and portfile.exists() and pid_alive(int(pidfile.read_text())):
        host = f"127.0.0.1:{int(portfile.read_text())}"
        if _answers(host):
            return Registry(host, USERNAME, password, home)
    port = port or remembered_port(portfile) or free_port()
    _write_htpasswd(home, USERNAME, password)
    config = _write_config(home, port)
    spawn([binary, "serve", str(config)], log=home / "registry.log", pidfile=pidfile)
    portfile.write_text(str(port))
    host = f"127.0.0.1:{port}"
    wait_until(
        lambda: _answers(host), timeout=timeout, what=f"registry (log: {home / 'registry.log'})"
    )
    return Registry(host, USERNAME, password, home)


def stop_registry(home: Path) -> bool:
    (home / "registry.port").unlink(missing_ok=True)
    return stop_pidfile(home / "registry.pid")


def push_image(registry: Registry, local_image: str, repository: str, tag: str) -> str:
    """Tag ``local_image`` as ``<registry>/<repository>:<tag>``, push it, return its digest.

    Used by the sandbox launcher to put base images in the registry (the product pushes
    through its own tasks, not this helper).
    """
    client = docker.from_env(timeout=300)
    try:
        image = client.images.get(local_image)
        target = f"{registry.host}/{repository}"
        image.tag(target, tag=tag)
        auth = {"username": registry.username, "password": registry.password}
        digest = ""
        for line in client.api.push(target, tag=tag, auth_config=auth, stream=True, decode=True):
            if "error" in line:
                raise RegistryError(f"pushing {target}:{tag} failed: {line['error']}")
            digest = line.get("aux", {}).get("Digest", digest)
        if not digest:
            raise RegistryError(f"pushing {target}:{tag} returned no digest")
        return str(digest)
    except docker.errors.DockerException as exc:
        raise RegistryError(f"pushing {local_image} to {registry.host} failed: {exc}") from exc
    finally:
        client.close()
