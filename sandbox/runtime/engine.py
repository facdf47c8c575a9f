"""The runtime's side of Docker: networks, images, containers, volumes, stats and logs.

Everything here is synchronous docker-py; the controllers call it through ``in_thread``,
on the runtime's own thread pool: the default one has cpu+4 threads, is shared with the
rest of the twin, and a slow image pull or a followed log stream would hold one of them. Every object created carries the label ``robotics-cd.sandbox=<id of
the state dir>`` so ``cleanup`` removes exactly what one sandbox made and nothing else on
the shared engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import ipaddress
import logging
import tarfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import docker
import docker.errors
import docker.types

log = logging.getLogger("sandbox.runtime.engine")
T = TypeVar("T")

SANDBOX_LABEL = "robotics-cd.sandbox"
# Where namespace networks get their /24s (256 networks; Docker's defaults hold ~30).
NETWORK_RANGE = ipaddress.IPv4Network("10.213.0.0/16")
POD_NS_LABEL = "robotics-cd.pod-namespace"
POD_NAME_LABEL = "robotics-cd.pod-name"
POD_UID_LABEL = "robotics-cd.pod-uid"
CONTAINER_LABEL = "robotics-cd.container"


_POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="runtime-docker")


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking (docker-py) call on the runtime's thread pool."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(fn, *args))


def state_label(state_dir: Path) -> str:
    """The value of ``SANDBOX_LABEL`` for the sandbox living in ``state_dir``."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]


# Names carry the sandbox id: several sandboxes (test sessions, the demo) share one dockerd
# and may all have a "staging" namespace or a pod "train-master-0".
def network_name(label: str, namespace: str) -> str:
    """The Docker network of a namespace: ``twin-<namespace>-<sandbox id>``."""
    return f"twin-{namespace}-{label[:6]}"


def container_name(
    label: str, namespace: str, pod: str, index: int = 0, container: str = ""
) -> str:
    """``twin-<namespace>-<pod>-<sandbox id>`` for a pod's first container;
    ``twin-<namespace>-<pod>-<container>-<sandbox id>`` for the others."""
    base = f"twin-{namespace}-{pod}"
    if index:
        base += f"-{container}"
    return f"{base}-{label[:6]}"


class PullFailed(RuntimeError):
    """An image could not be pulled (kubelet reason ErrImagePull)."""


class ContainerFailed(RuntimeError):
    """Docker refused to create or start a container (kubelet reason CreateContainerError)."""


@dataclass(frozen=True)
class RegistryAuth:
    """The sandbox registry: images named ``<host>/...`` are pulled with these credentials."""

    url: str
    username: str = ""
    password: str = field(default="", repr=False)

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[-1].rstrip("/")


class LogStream(Protocol):
    """docker-py's CancellableStream of log chunks."""

    def __iter__(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...


class EventStream(Protocol):
    """docker-py's CancellableStream of decoded events."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ContainerSummary:
    id: str
    name: str
    state: str  # created | running | exited | ...
    labels: dict[str, str]


@dataclass
class ContainerSpec:
    name: str
    image: str
    network: str
    aliases: list[str]
    labels: dict[str, str]
    hostname: str
    entrypoint: list[str] | None = None
    command: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)
    nano_cpus: int | None = None
    mem_limit: int | None = None
    # docker volume name -> (mount path, read only)
    mounts: list[tuple[str, str, bool]] = field(default_factory=list)
    working_dir: str | None = None
    user: str | None = None
    # hostNetwork: the host's network namespace (127.0.0.1 is the host's); no network,
    # aliases or published ports then.
    host_network: bool = False


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """``repo[:tag][@digest]`` -> (repo, tag, digest); a registry port is not a tag."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        image, tag = image.rsplit(":", 1)
    return image, tag, digest


def pull_reference(image: str) -> tuple[str, str]:
    """What to pull: (repository, tag-or-digest). A digest wins over a tag, as in Kubernetes."""
    repo, tag, digest = split_image(image)
    if digest:
        return repo, digest
    return repo, tag or "latest"


def local_reference(image: str) -> str:
    repo, ref = pull_reference(image)
    return f"{repo}@{ref}" if ref.startswith("sha256:") else f"{repo}:{ref}"


class Engine:
    """One docker-py client shared by the runtime (docker-py is safe across threads here)."""

    def __init__(self, label: str, registry: RegistryAuth | None = None) -> None:
        self.label = label
        self.registry = registry
        self.client = docker.from_env(timeout=120)
        self._pull_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._network_lock = threading.Lock()

    def close(self) -> None:
        self.client.close()

    def network_name(self, namespace: str) -> str:
        return network_name(self.label, namespace)

    def container_name(self, namespace: str, pod: str, index: int, container: str) -> str:
        return container_name(self.label, namespace, pod, index, container)

    @property
    def base_labels(self) -> dict[str, str]:
        return {SANDBOX_LABEL: self.label}

    # -- networks and volumes ------------------------------------------------------------

    def ensure_network(self, name: str) -> str:
        # Docker allows two networks of one name (then refuses to attach to either), so
        # creation is serialized and duplicates left by a crash are dropped.
        with self._network_lock:
            found = [n for n in self.client.networks.list(names=[name]) if n.name == name]
            for extra in found[1:]:
                with contextlib.suppress(docker.errors.APIError):
                    extra.remove()
            if not found:
                self._create_network(name)
        return name

    def remove_network(self, name: str) -> None:
        with self._network_lock:
            for net in self.client.networks.list(names=[name]):
                if net.name == name:
                    try:
                        net.remove()
                    except docker.errors.APIError as exc:
                        # Still has containers (404: gone already): leave it to cleanup().
                        log.info("network %s kept: %s", name, exc.explanation)

    def _create_network(self, name: str) -> None:
        """A bridge network on a free /24 of ``NETWORK_RANGE``.

        Docker's default pools hold about 30 networks on one engine; with one network per
        namespace per sandbox, several engineers' test sessions would exhaust them. Another
        sandbox may take the same /24 between our look and our create: then try the next.
        """
        for _ in range(8):
            subnet = self._free_subnet()
            if subnet is None:
                break
            gateway = str(next(subnet.hosts()))
            ipam = docker.types.IPAMConfig(
                pool_configs=[docker.types.IPAMPool(subnet=str(subnet), gateway=gateway)]
            )
            try:
                self.client.networks.create(
                    name, driver="bridge", labels=self.base_labels, ipam=ipam, check_duplicate=True
                )
                return
            except docker.errors.APIError as exc:
                if "overlap" not in str(exc.explanation).lower():
                    raise
        # No /24 left in our range: let Docker pick from its defaults.
        self.client.networks.create(
            name, driver="bridge", labels=self.base_labels, check_duplicate=True
        )

    def _free_subnet(self) -> ipaddress.IPv4Network | None:
        used = []
        for net in self.client.api.networks():
            for pool in ((net.get("IPAM") or {}).get("Config")) or []:
                with contextlib.suppress(ValueError, KeyError):
                    used.append(ipaddress.ip_network(pool["Subnet"], strict=False))
        for candidate in NETWORK_RANGE.subnets(new_prefix=24):
            if not any(candidate.overlaps(u) for u in used):
                return candidate
        return None

    def ensure_volume(self, name: str, labels: dict[str, str]) -> str:
        try:
            self.client.volumes.get(name)
        except docker.errors.NotFound:
            self.client.volumes.create(name, labels={**self.base_labels, **labels})
        return name

    def remove_volume(self, name: str) -> None:
        try:
            self.client.volumes.get(name).remove(force=True)
        except docker.errors.NotFound:
            return

    # -- images --------------------------------------------------------------------------

    def _pull_lock(self, ref: str) -> threading.Lock:
        with self._locks_guard:
            return self._pull_locks.setdefault(ref, threading.Lock())

    def ensure_image(self, image: str, policy: str) -> str:
        """Make ``image`` present per ``imagePullPolicy``; return its local reference."""
        ref = local_reference(image)
        with self._pull_lock(ref):
            present = self._has_image(ref)
            if policy == "Never":
                if not present:
                    raise PullFailed(f'image "{image}" is not present and imagePullPolicy is Never')
                return ref
            if present and policy != "Always":
                return ref
            repo, tag = pull_reference(image)
            try:
                self.client.images.pull(repo, tag=tag, auth_config=self._auth_for(repo))
            except docker.errors.APIError as exc:
                if present:
                    # Always-pull of a present image with the registry down: Kubernetes
                    # would fail too, but the cached copy is what a node would still run.
                    log.warning("pull of %s failed (%s); using the local copy", image, exc)
                    return ref
                raise PullFailed(f'failed to pull image "{image}": {exc.explanation}') from exc
            return ref

    def _has_image(self, ref: str) -> bool:
        try:
            self.client.images.get(ref)
        except docker.errors.ImageNotFound:
            return False
        return True

    def _auth_for(self, repo: str) -> dict[str, str] | None:
        reg = self.registry
        if reg and reg.username and repo.split("/", 1)[0] == reg.host:
            return {"username": reg.username, "password": reg.password}
        return None

    def image_id(self, ref: str) -> str:
        """``imageID`` as the kubelet reports it: the repo digest when pulled, else the id."""
        img = self.client.images.get(ref)
        digests = img.attrs.get("RepoDigests") or []
        repo = split_image(ref)[0]
        for d in digests:
            if d.startswith(repo + "@"):
                return f"docker-pullable://{d}"
        return f"docker://{img.id}"

    # -- containers ----------------------------------------------------------------------

    def create(self, spec: ContainerSpec) -> str:
        network: dict[str, Any] = {"network_mode": "host"}
        if not spec.host_network:
            endpoint = self.client.api.create_endpoint_config(aliases=spec.aliases or None)
            network = {"network": spec.network, "networking_config": {spec.network: endpoint}}
        try:
            container = self.client.containers.create(
                spec.image,
                name=spec.name,
                entrypoint=spec.entrypoint,
                command=spec.command,
                environment=spec.env,
                hostname=None if spec.host_network else spec.hostname[:63],
                labels={**self.base_labels, **spec.labels},
                ports=None
                if spec.host_network
                else {f"{p}/tcp": ("127.0.0.1", None) for p in spec.ports},
                nano_cpus=spec.nano_cpus,
                mem_limit=spec.mem_limit,
                volumes={
                    vol: {"bind": path, "mode": "ro" if ro else "rw"}
                    for vol, path, ro in spec.mounts
                },
                working_dir=spec.working_dir,
                user=spec.user,
                detach=True,
                **network,
            )
        except docker.errors.APIError as exc:
            raise ContainerFailed(f"creating container {spec.name}: {exc.explanation}") from exc
        return str(container.id)

    def start(self, name: str) -> None:
        try:
            self.client.api.start(name)
        except docker.errors.APIError as exc:
            raise ContainerFailed(f"starting container {name}: {exc.explanation}") from exc

    def inspect(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.api.inspect_container(name))
        except docker.errors.NotFound:
            return None

    def stop(self, name: str, grace_seconds: int) -> None:
        """SIGTERM (or the image's STOPSIGNAL), then SIGKILL after ``grace_seconds``."""
        try:
            self.client.api.stop(name, timeout=max(0, grace_seconds))
        except docker.errors.APIError as exc:
            if exc.status_code not in (304, 404, 409):  # already stopped, or gone
                raise

    def kill(self, name: str) -> None:
        try:
            self.client.api.kill(name)
        except docker.errors.APIError as exc:
            # Already stopped (409) or gone (404): the outcome the caller wanted.
            if exc.status_code not in (404, 409):
                raise

    def remove(self, name: str) -> None:
        try:
            self.client.api.remove_container(name, force=True, v=True)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # removal already in progress
                raise

    def put_files(self, name: str, directory: str, files: dict[str, tuple[bytes, int]]) -> None:
        """Copy files (relative path -> (content, mode)) into ``directory`` of a container."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for path, (content, mode) in sorted(files.items()):
                info = tarfile.TarInfo(path)
                info.size, info.mode = len(content), mode
                tar.addfile(info, io.BytesIO(content))
        try:
            self.client.api.put_archive(name, directory, buf.getvalue())
        except docker.errors.APIError as exc:
            raise ContainerFailed(
                f"writing files into {name}:{directory}: {exc.explanation}"
            ) from exc

    def set_aliases(self, name: str, network: str, aliases: list[str]) -> None:
        """Re-attach ``name`` to ``network`` with new aliases (its host ports change)."""
        net = self.client.networks.get(network)
        try:
            net.disconnect(name, force=True)
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409, 500):
                raise
        net.connect(name, aliases=aliases)

    def ours(self) -> list[ContainerSummary]:
        """Every container of this sandbox, from one list call (no per-container inspect:
        a container removed meanwhile must not fail the listing)."""
        return [
            ContainerSummary(
                id=str(row["Id"]),
                name=str((row.get("Names") or ["/"])[0]).lstrip("/"),
                state=str(row.get("State", "")),
                labels=dict(row.get("Labels") or {}),
            )
            for row in self.client.api.containers(
                all=True, filters={"label": f"{SANDBOX_LABEL}={self.label}"}
            )
        ]

    def stats(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.api.stats(name, stream=False, one_shot=True))
        except docker.errors.NotFound:
            return None

    def container_events(self) -> EventStream:
        """This sandbox's container starts, deaths and removals, as they happen."""
        stream: EventStream = self.client.api.events(
            decode=True,
            filters={
                "type": "container",
                "label": f"{SANDBOX_LABEL}={self.label}",
                "event": ["start", "die", "oom", "destroy"],
            },
        )
        return stream

    def logs(self, name: str, *, tail: int | None, follow: bool) -> LogStream:
        """The container's output as a stream of chunks; ``close()`` ends it early."""
        stream: LogStream = self.client.api.logs(
            name,
            stdout=True,
            stderr=True,
            stream=True,
            follow=follow,
            tail="all" if tail is None else tail,
        )
        return stream


def host_ports(info: dict[str, Any]) -> dict[int, int]:
    """containerPort -> port published on 127.0.0.1, from an inspect result."""
    result: dict[int, int] = {}
    ports = (info.get("NetworkSettings") or {}).get("Ports") or {}
    for key, bindings in ports.items():
        port, _, proto = key.partition("/")
        if proto != "tcp" or not bindings:
            continue
        for binding in bindings:
            if binding.get("HostIp") in ("127.0.0.1", "") and binding.get("HostPort"):
                result[int(port)] = int(binding["HostPort"])
                break
    return result


def network_ip(info: dict[str, Any], network: str) -> str:
    nets = (info.get("NetworkSettings") or {}).get("Networks") or {}
    return str((nets.get(network) or {}).get("IPAddress") or "")


def network_aliases(info: dict[str, Any], network: str) -> list[str]:
    nets = (info.get("NetworkSettings") or {}).get("Networks") or {}
    return list((nets.get(network) or {}).get("Aliases") or [])


def cleanup(label: str) -> dict[str, int]:
    """Remove every container, network and volume labelled ``robotics-cd.sandbox=<label>``."""
    client = docker.from_env(timeout=120)
    flt = {"label": f"{SANDBOX_LABEL}={label}"}
    removed = {"containers": 0, "networks": 0, "volumes": 0}
    try:
        for row in client.api.containers(all=True, filters=flt):
            try:
                client.api.remove_container(row["Id"], force=True, v=True)
                removed["containers"] += 1
            except docker.errors.NotFound:
                continue
        for n in client.networks.list(filters=flt):
            try:
                n.remove()
                removed["networks"] += 1
            except docker.errors.NotFound:
                continue
        for v in client.volumes.list(filters=flt):
            try:
                v.remove(force=True)
                removed["volumes"] += 1
            except docker.errors.NotFound:
                continue
    finally:
        client.close()
    return removed
