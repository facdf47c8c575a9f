"""``robotics-cd sandbox up | status | down``: the whole local platform, on 127.0.0.1 only.

``up`` is idempotent: every part keeps its pid, port and secrets in the state dir, and a part
that already answers is reused. In order: dockerd (only if none answers), the Prefect server
(started in the background while the rest comes up, unless an API URL is given), the base
images, the registry (htpasswd), the seeded git repos, the first images in the registry,
Prometheus, the twin server (Kubernetes API + runtime + Argo CD + GitHub), the Argo CD
Applications, the initial production sync, the Prefect blocks, and ``<state>/env``.

``down`` stops what ``up`` started (pid files), removes the sandbox's containers, networks
and volumes, and with ``purge`` the state dir.

Nothing here imports the product: block names and env variable names are duplicated from
``core/settings.py`` on purpose (the ``ROBOTICS_CD_*_BLOCK`` variables override them).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import importlib.metadata
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from sandbox import engine, postgres, prefect_server, prometheus, redis_server, registry
from sandbox.procs import free_port, http_ok, pid_alive, spawn, stop_pidfile, wait_until
from sandbox.seed import REPOS, Seeded, install_hooks, seed_repos

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE = ROOT / ".sandbox"
VENV_BIN = Path(sys.executable).parent

# Block names: the defaults of core/settings.py (the product's Settings), overridable by the
# same environment variables the product reads.
BLOCK_DEFAULTS = {
    "docker_host_block": "robotics-cd-docker",
    "registry_block": "robotics-cd-registry",
    "kubernetes_block": "robotics-cd-kube",
    "argocd_token_block": "robotics-cd-argocd-token",
    "github_token_block": "robotics-cd-github-token",
    "webhook_secret_block": "robotics-cd-webhook-secret",
    "chat_webhooks_block": "robotics-cd-chat-webhooks",
}
# Manual apps synced once by `up`, as an operator installing the platform would: the
# namespaces and network policies, the training PVCs, and production's first release.
APPS_TO_SYNC_AT_START = (
    "platform-base",
    "training-storage",
    "api-gateway-production",
    "fleet-planner-production",
)
APPS_HEALTHY_AT_START = (
    "platform-base",
    "training-storage",
    "api-gateway-staging",
    "api-gateway-production",
    "fleet-planner-staging",
    "fleet-planner-production",
)
SEED_BUSYBOX = ("library/busybox", "seed")
API_IMAGE = "robotics-serving/api-gateway"
FLEET_IMAGE = "robotics-fleet/fleet-planner"
TRAINING_IMAGE = "robotics-training/vision-train"
OWNER = "robotics"


class SandboxError(RuntimeError):
    """A part of the sandbox could not start; the message says which and where its log is."""


def block_names() -> dict[str, str]:
    return {
        key: os.environ.get(f"ROBOTICS_CD_{key.upper()}", default)
        for key, default in BLOCK_DEFAULTS.items()
    }


@dataclass
class Sandbox:
    """Everything a client needs to reach the sandbox; saved as ``<state>/sandbox.json``."""

    state_dir: str
    prefect_api_url: str
    prefect_ui_url: str
    prefect_managed: bool
    registry: str
    registry_username: str
    registry_password: str = field(repr=False)
    prometheus_url: str = ""
    kube_url: str = ""
    kubeconfig: str = ""
    control_url: str = ""
    argocd_url: str = ""
    argocd_username: str = "admin"
    argocd_password: str = field(default="", repr=False)
    argocd_token: str = field(default="", repr=False)
    github_url: str = ""
    github_token: str = field(default="", repr=False)
    webhook_url: str = ""
    webhook_secret: str = field(default="", repr=False)
    git_base: str = ""
    # How the product reaches the seeded repos: "http" (the GitHub twin's smart-HTTP git with
    # the token, as on GitHub) or "file" (the bare repos directly). ROBOTICS_CD_SANDBOX_GIT.
    git_transport: str = "http"
    seed_tag: str = ""
    ingress: dict[str, str] = field(default_factory=dict)
    chat_urls: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    docker_managed: bool = False
    blocks: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    prefect_db: str = "sqlite"
    prefect_messaging: str = "memory"
    # The Docker Engine's URL for the DockerHost block: tcp://127.0.0.1:<port> (the twin's
    # forwarder to the unix socket, sandbox/docker_tcp.py), so a flow run in a Job with no
    # docker.sock builds too; "" for a sandbox saved before it existed (the environment's).
    docker_host: str = ""
    # Pods are deleted gracefully (SIGTERM, SIGKILL after the grace period) as on a node.
    graceful_deletion: bool = False

    @property
    def git_base_url(self) -> str:
        return Path(self.git_base).resolve().as_uri()

    def repo_url(self, repo: str) -> str:
        return f"{self.git_base_url}/{repo}.git"

    @property
    def product_git_base(self) -> str:
        """Where the product's catalog finds the repos (``ROBOTICS_CD_GIT_BASE``): the twin's
        HTTP git (token from the GitHub token Secret) or, with ``git_transport=file``, the
        bare repos' ``file://`` URLs. Tests and the demo push through :meth:`repo_url`."""
        if self.git_transport == "http" and self.github_url:
            return f"{self.github_url}/{OWNER}"
        return self.git_base_url

    def env(self) -> dict[str, str]:
        """The variables ``<state>/env`` exports: the product's settings and catalog."""
        tools = {
            "ROBOTICS_CD_TRIVY": shutil.which("trivy", path=str(VENV_BIN)) or "trivy",
            "ROBOTICS_CD_KUBECTL": shutil.which("kubectl", path=str(VENV_BIN)) or "kubectl",
        }
        env = {
            "PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_UI_URL": self.prefect_ui_url,
            "KUBECONFIG": self.kubeconfig,
            "ROBOTICS_CD_SANDBOX_STATE": self.state_dir,
            "ROBOTICS_CD_GIT_BASE": self.product_git_base,
            "ROBOTICS_CD_PUSH_REGISTRY": self.registry,
            "ROBOTICS_CD_PULL_REGISTRY": self.registry,
            "ROBOTICS_CD_INGRESS_STAGING": self.ingress.get("staging", ""),
            "ROBOTICS_CD_INGRESS_PRODUCTION": self.ingress.get("production", ""),
            "ROBOTICS_CD_INGRESS_TRAINING": self.ingress.get("training", ""),
            "ROBOTICS_CD_ARGOCD_URL": self.argocd_url,
            "ROBOTICS_CD_ARGOCD_VERIFY_TLS": "false",
            "ROBOTICS_CD_GITHUB_API_URL": self.github_url,
            "ROBOTICS_CD_PROMETHEUS_URL": self.prometheus_url,
            "ROBOTICS_CD_ALLOW_MISSING_VULN_DB": "true",
            "ROBOTICS_CD_WORKSPACE": str(Path(self.state_dir) / "workspace"),
            "ROBOTICS_CD_SANDBOX_CONTROL_URL": self.control_url,
            "ROBOTICS_CD_WEBHOOK_URL": self.webhook_url,
            "ROBOTICS_CD_WEBHOOK_PORT": str(self.ports.get("webhook", "")),
            # What the real argocd CLI reads, for people poking at the twin by hand.
            "ARGOCD_SERVER": self.argocd_url.removeprefix("http://"),
            "ARGOCD_OPTS": "--plaintext",
            **tools,
        }
        env.update({f"ROBOTICS_CD_{k.upper()}": v for k, v in self.blocks.items()})
        return env

    def save(self) -> None:
        path = Path(self.state_dir) / "sandbox.json"
        path.write_text(json.dumps(asdict(self), indent=2))
        path.chmod(0o600)

    @classmethod
    def load(cls, state_dir: Path) -> Sandbox:
        path = state_dir / "sandbox.json"
        if not path.exists():
            raise SandboxError(f"no sandbox in {state_dir}: run `robotics-cd sandbox up` first")
        return cls(**json.loads(path.read_text()))


# -- small persistent state ---------------------------------------------------------------


def _json_file(path: Path, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Read ``path``, or create it with ``make()``; missing keys are filled from ``make()``."""
    current: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    fresh = make()
    merged = {**fresh, **current}
    if merged != current:
        path.write_text(json.dumps(merged, indent=2))
        path.chmod(0o600)
    return merged


def _ports(state: Path) -> dict[str, int]:
    names = (
        "prefect",
        "kube",
        "control",
        "argocd",
        "github",
        "staging",
        "production",
        "training",
        "webhook",
        "docker",
    )

    def make() -> dict[str, Any]:
        return {name: free_port() for name in names}

    return {k: int(v) for k, v in _json_file(state / "ports.json", make).items()}


def _secrets(state: Path) -> dict[str, str]:
    def make() -> dict[str, Any]:
        return {
            "argocd_password": secrets.token_urlsafe(12),
            "argocd_token": secrets.token_urlsafe(24),
            "argocd_signing_key": secrets.token_hex(16),
            "github_token": "ghp_" + secrets.token_hex(18),
            "webhook_secret": secrets.token_urlsafe(24),
            "kube_token": secrets.token_urlsafe(24),
        }

    return {k: str(v) for k, v in _json_file(state / "secrets.json", make).items()}


class _Timer:
    def __init__(self, echo: Callable[[str], None]) -> None:
        self.timings: dict[str, float] = {}
        self.echo = echo
        self.started = time.monotonic()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        self.timings[name] = round(time.monotonic() - t0, 2)
        self.echo(f"  {name:<28} {self.timings[name]:6.1f}s")


# -- Prefect -------------------------------------------------------------------------------


def prefect_template() -> Path:
    """An empty, migrated Prefect database for this Prefect version, made once per machine.

    A fresh server spends most of its start-up in SQLite migrations; copying a migrated
    empty database into a new state dir skips them (the server's own upgrade on start is
    then a no-op). Kept under ``$XDG_CACHE_HOME/robotics-cd`` and keyed by version.
    """
    version = importlib.metadata.version("prefect")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "robotics-cd"
    template = cache / f"prefect-{version}.db"
    if template.exists():
        return template
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prefect-template-") as tmp:
        db = Path(tmp) / "prefect.db"
        prefect = shutil.which("prefect", path=str(VENV_BIN)) or "prefect"
        proc = subprocess.run(
            [prefect, "server", "database", "upgrade", "-y"],
            env={
                **os.environ,
                "PREFECT_HOME": tmp,
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}",
            },
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0 or not db.exists():
            raise SandboxError(f"preparing the Prefect database failed:\n{proc.stdout[-2000:]}")
        # Atomic: a second sandbox starting at the same time sees the whole file or none.
        staged = cache / f".prefect-{version}-{os.getpid()}.db"
        shutil.copyfile(db, staged)
        staged.replace(template)
    return template


def start_prefect(
    home: Path, port: int, db: str = "sqlite", messaging: str = "memory"
) -> prefect_server.PrefectServer:
    """SQLite (from the template) by default; PostgreSQL + Redis + two API servers behind a
    balancer for the scale-out variant (see :mod:`sandbox.prefect_server`)."""
    if db == "sqlite" and not (home / "prefect.db").exists():
        home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(prefect_template(), home / "prefect.db")
    try:
        return prefect_server.start_prefect_server(home, port=port, db=db, messaging=messaging)
    except (postgres.PostgresError, redis_server.RedisError, RuntimeError) as exc:
        raise SandboxError(f"Prefect server ({db}, {messaging}): {exc}") from exc


# -- docker --------------------------------------------------------------------------------


def docker_unix_socket() -> str | None:
    """The engine's unix socket (``DOCKER_HOST`` or the default), None when ``DOCKER_HOST``
    already names a TCP engine (then that URL is the block's as it is)."""
    host = os.environ.get("DOCKER_HOST", "")
    if not host:
        return "/var/run/docker.sock"
    if host.startswith("unix://"):
        return host.removeprefix("unix://")
    return None


def docker_host_url(ports: dict[str, int]) -> str:
    """What the DockerHost block holds: the forwarder's TCP URL, or a TCP ``DOCKER_HOST``."""
    if docker_unix_socket() is None:
        return os.environ["DOCKER_HOST"]
    return f"tcp://127.0.0.1:{ports['docker']}"


def ensure_dockerd(state: Path) -> bool:
    """Make sure a Docker Engine answers; start ``dockerd`` (root only) if none does.

    Returns True when this sandbox started it (so ``down`` stops it).
    """
    try:
        engine.ensure_docker(timeout=3)
        return False
    except engine.EngineUnavailable as exc:
        binary = shutil.which("dockerd")
        if binary is None or os.geteuid() != 0:
            raise SandboxError(
                f"{exc}. Install docker.io and start dockerd as root (sudo dockerd &), then "
                "run `robotics-cd sandbox up` again"
            ) from exc
    spawn([binary], log=state / "dockerd.log", pidfile=state / "dockerd.pid")
    try:
        engine.ensure_docker(timeout=60)
    except engine.EngineUnavailable as exc:
        raise SandboxError(f"dockerd did not start; see {state / 'dockerd.log'}") from exc
    return True


# -- images --------------------------------------------------------------------------------


def _in_registry(reg: registry.Registry, repository: str, tag: str) -> bool:
    response = httpx.head(
        f"{reg.url}/v2/{repository}/manifests/{tag}",
        auth=(reg.username, reg.password),
        headers={
            "Accept": "application/vnd.docker.distribution.manifest.v2+json, "
            "application/vnd.oci.image.manifest.v1+json"
        },
        timeout=10,
    )
    return response.status_code == 200


def _build_from_repo(bare: Path, sha: str, tag: str) -> None:
    """``docker build`` of the repo's tree at ``sha`` (its own Dockerfile)."""
    client = engine.docker_client()
    try:
        with tempfile.TemporaryDirectory(prefix="sandbox-build-") as tmp:
            archive = subprocess.run(
                ["git", "--git-dir", str(bare), "archive", "--format=tar", sha],
                capture_output=True,
                check=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            client.images.build(
                path=tmp,
                tag=tag,
                rm=True,
                forcerm=True,
                buildargs={
                    "GIT_SHA": sha,
                    "BUILD_DATE": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                },
                labels={"org.opencontainers.image.revision": sha},
            )
    except Exception as exc:
        raise SandboxError(f"building the seed image {tag} from {bare.name} failed: {exc}") from exc
    finally:
        client.close()


def push_seed_images(reg: registry.Registry, seeded: Seeded) -> dict[str, str]:
    """The images the seeded manifests name, in the registry (skipped when present)."""
    pushed: dict[str, str] = {}
    repo, tag = SEED_BUSYBOX
    if not _in_registry(reg, repo, tag):
        pushed[f"{repo}:{tag}"] = registry.push_image(reg, engine.BUSYBOX_IMAGE, repo, tag)
    for source, image in (
        ("robotics-api", API_IMAGE),
        ("robotics-fleet", FLEET_IMAGE),
        ("robotics-training", TRAINING_IMAGE),
    ):
        if _in_registry(reg, image, seeded.seed_tag):
            continue
        bare = seeded.path(source)
        sha = subprocess.run(
            ["git", "--git-dir", str(bare), "rev-list", "--max-parents=0", "main"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[-1]
        local = f"sandbox-seed/{image.rsplit('/', 1)[-1]}:{seeded.seed_tag}"
        _build_from_repo(bare, sha, local)
        pushed[f"{image}:{seeded.seed_tag}"] = registry.push_image(
            reg, local, image, seeded.seed_tag
        )
    return pushed


# -- the twin ------------------------------------------------------------------------------


def twin_config(
    state: Path,
    ports: dict[str, int],
    keys: dict[str, str],
    reg: registry.Registry,
    webhook_url: str,
    argocd_poll_seconds: float,
    *,
    graceful_deletion: bool = False,
) -> dict[str, Any]:
    docker_socket = docker_unix_socket()
    return {
        "kube_port": ports["kube"],
        # The engine on 127.0.0.1 TCP for flow runs without a docker.sock (sandbox/docker_tcp.py).
        **(
            {"docker_tcp_port": ports["docker"], "docker_unix_socket": docker_socket}
            if docker_socket
            else {}
        ),
        "graceful_deletion": graceful_deletion,
        "kube_token": keys["kube_token"],
        "control_port": ports["control"],
        "argocd_port": ports["argocd"],
        "github_port": ports["github"],
        "ingress_ports": {ns: ports[ns] for ns in ("staging", "production", "training")},
        "registry": {"url": reg.url, "username": reg.username, "password": reg.password},
        "git_base": str((state / "git").resolve()),
        "kubectl": shutil.which("kubectl", path=str(VENV_BIN)) or "kubectl",
        "argocd": {
            "username": "admin",
            "password": keys["argocd_password"],
            "token": keys["argocd_token"],
            "signing_key": keys["argocd_signing_key"],
            "namespace": "argocd",
            "poll_seconds": argocd_poll_seconds,
        },
        "github": {
            "owner": OWNER,
            "token": keys["github_token"],
            "webhook_url": webhook_url,
            "webhook_secret": keys["webhook_secret"],
        },
    }


def _twin_running(state: Path, config: dict[str, Any]) -> bool:
    pidfile = state / "twin.pid"
    if not (pidfile.exists() and (state / "twin.ready").exists()):
        return False
    if not pid_alive(int(pidfile.read_text())):
        return False
    old = state / "twin-config.json"
    return old.exists() and json.loads(old.read_text()) == config


def start_twin(state: Path, config: dict[str, Any], *, timeout: float = 90.0) -> None:
    if _twin_running(state, config):
        return
    stop_pidfile(state / "twin.pid")
    (state / "twin.ready").unlink(missing_ok=True)
    path = state / "twin-config.json"
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    proc = spawn(
        [sys.executable, "-m", "sandbox.twin", "--state", str(state)],
        log=state / "twin.log",
        pidfile=state / "twin.pid",
        cwd=ROOT,
    )

    def ready() -> bool:
        if proc.poll() is not None:
            raise SandboxError(
                f"the twin server exited ({proc.returncode}); last lines of {state / 'twin.log'}:"
                f"\n{_tail(state / 'twin.log')}"
            )
        return (state / "twin.ready").exists()

    try:
        wait_until(ready, timeout=timeout, what=f"twin server (log: {state / 'twin.log'})")
    except TimeoutError as exc:
        raise SandboxError(f"{exc}\n{_tail(state / 'twin.log')}") from exc


def _tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class KubeClient:
    """Just enough of the Kubernetes API for the launcher, from the twin's kubeconfig."""

    def __init__(self, kubeconfig: Path) -> None:
        conf = yaml.safe_load(kubeconfig.read_text())
        cluster = conf["clusters"][0]["cluster"]
        self.server = cluster["server"]
        ca = Path(tempfile.mkstemp(prefix="sandbox-ca-", suffix=".pem")[1])
        ca.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
        self._ca = ca
        token = conf["users"][0]["user"]["token"]
        self.client = httpx.Client(
            base_url=self.server,
            headers={"Authorization": f"Bearer {token}"},
            verify=str(ca),
            timeout=10,
        )

    def close(self) -> None:
        self.client.close()
        self._ca.unlink(missing_ok=True)

    def ensure(self, collection: str, obj: dict[str, Any]) -> bool:
        """Create ``obj`` under ``collection`` unless it exists; True when created."""
        name = obj["metadata"]["name"]
        if self.client.get(f"{collection}/{name}").status_code == 200:
            return False
        response = self.client.post(collection, json=obj)
        if response.status_code not in (200, 201, 409):
            raise SandboxError(f"creating {collection}/{name} failed: {response.text}")
        return response.status_code != 409


def create_applications(kubeconfig: Path, seeded: Seeded) -> list[str]:
    """Create the Argo CD Applications of ``argocd-apps/`` (those missing) in the twin."""
    bare = seeded.path("robotics-k8s-manifests")
    listing = subprocess.run(
        ["git", "--git-dir", str(bare), "ls-tree", "--name-only", "main", "argocd-apps/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    kube = KubeClient(kubeconfig)
    names: list[str] = []
    try:
        kube.ensure(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "argocd"}},
        )
        for path in listing:
            text = subprocess.run(
                ["git", "--git-dir", str(bare), "show", f"main:{path}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            for doc in yaml.safe_load_all(text):
                if not isinstance(doc, dict) or doc.get("kind") != "Application":
                    continue
                namespace = doc["metadata"].get("namespace", "argocd")
                kube.ensure(f"/apis/argoproj.io/v1alpha1/namespaces/{namespace}/applications", doc)
                names.append(doc["metadata"]["name"])
    finally:
        kube.close()
    return names


class ArgoClient:
    def __init__(self, url: str, token: str) -> None:
        self.client = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )

    def app(self, name: str, refresh: bool = False) -> dict[str, Any]:
        params = {"refresh": "normal"} if refresh else {}
        response = self.client.get(f"/api/v1/applications/{name}", params=params)
        response.raise_for_status()
        return dict(response.json())

    def sync(self, name: str, **body: Any) -> dict[str, Any]:
        response = self.client.post(f"/api/v1/applications/{name}/sync", json=body)
        if response.status_code >= 400:
            raise SandboxError(f"sync of {name} refused: {response.text}")
        return dict(response.json())

    def close(self) -> None:
        self.client.close()


def app_done(app: dict[str, Any]) -> bool:
    """What ``argocd app wait --sync --health --operation`` checks."""
    status = app.get("status") or {}
    state = status.get("operationState") or {}
    return (
        not app.get("operation")
        and state.get("phase") == "Succeeded"
        and (status.get("sync") or {}).get("status") == "Synced"
        and (status.get("health") or {}).get("status") == "Healthy"
    )


def bring_apps_up(sb: Sandbox, *, timeout: float) -> None:
    """Sync the manual apps once (staging syncs itself) and wait until all are healthy."""
    argo = ArgoClient(sb.argocd_url, sb.argocd_token)
    try:
        for name in APPS_TO_SYNC_AT_START:
            app = argo.app(name, refresh=True)
            if not app_done(app) and not app.get("operation"):
                argo.sync(name, prune=True)
        last: dict[str, Any] = {}

        def healthy() -> bool:
            for name in APPS_HEALTHY_AT_START:
                last[name] = argo.app(name)
                if not app_done(last[name]):
                    return False
            return True

        try:
            wait_until(healthy, timeout=timeout, what="the Argo CD applications", interval=0.5)
        except TimeoutError as exc:
            detail = {
                n: {
                    "sync": (a.get("status") or {}).get("sync", {}).get("status"),
                    "health": (a.get("status") or {}).get("health"),
                    "operation": ((a.get("status") or {}).get("operationState") or {}).get(
                        "message"
                    ),
                }
                for n, a in last.items()
            }
            raise SandboxError(f"{exc}: {json.dumps(detail)}") from exc
    finally:
        argo.close()


# -- Prefect blocks ------------------------------------------------------------------------


def register_blocks(sb: Sandbox) -> None:
    """The blocks the product loads its credentials from, on the sandbox's Prefect server."""
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_docker.credentials import DockerRegistryCredentials
    from prefect_docker.host import DockerHost
    from prefect_kubernetes.credentials import KubernetesClusterConfig, KubernetesCredentials

    names = sb.blocks
    kubeconfig = yaml.safe_load(Path(sb.kubeconfig).read_text())
    with temporary_settings(updates={PREFECT_API_URL: sb.prefect_api_url}):
        DockerHost(base_url=sb.docker_host or os.environ.get("DOCKER_HOST")).save(
            names["docker_host_block"], overwrite=True
        )
        DockerRegistryCredentials(
            username=sb.registry_username,
            password=sb.registry_password,
            registry_url=sb.registry,
            reauth=True,
        ).save(names["registry_block"], overwrite=True)
        KubernetesCredentials(
            cluster_config=KubernetesClusterConfig(
                config=kubeconfig, context_name=kubeconfig.get("current-context", "")
            )
        ).save(names["kubernetes_block"], overwrite=True)
        Secret(value=sb.argocd_token).save(names["argocd_token_block"], overwrite=True)
        Secret(value=sb.github_token).save(names["github_token_block"], overwrite=True)
        Secret(value=sb.webhook_secret).save(names["webhook_secret_block"], overwrite=True)
        # Prefect 3 has no JSON block; the URLs carry access tokens, so a Secret holds them.
        Secret(value=sb.chat_urls).save(names["chat_webhooks_block"], overwrite=True)


# -- up / status / down --------------------------------------------------------------------


def up(
    state_dir: Path = DEFAULT_STATE,
    *,
    prefect_api_url: str | None = None,
    webhook_url: str | None = None,
    argocd_poll_seconds: float = 3.0,
    wait_healthy: bool = True,
    echo: Callable[[str], None] = print,
    prefect_db: str = "sqlite",
    prefect_messaging: str = "memory",
    graceful_deletion: bool = False,
) -> Sandbox:
    """Start (or reuse) every part of the sandbox; return how to reach it.

    ``graceful_deletion``: the twin deletes pods as a node does (SIGTERM, then SIGKILL after
    the grace period; the Kubernetes pool's e2e needs it), instead of at once."""
    state = state_dir.resolve()
    git_transport = os.environ.get("ROBOTICS_CD_SANDBOX_GIT", "http")
    if git_transport not in ("http", "file"):
        raise SandboxError(f"ROBOTICS_CD_SANDBOX_GIT={git_transport!r}: use http or file")
    state.mkdir(parents=True, exist_ok=True)
    timer = _Timer(echo)
    ports = _ports(state)
    keys = _secrets(state)
    echo(f"sandbox: state in {state}")
    with timer.step("docker engine"):
        docker_managed = ensure_dockerd(state) or (state / "dockerd.pid").exists()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    prefect_future: concurrent.futures.Future[prefect_server.PrefectServer] | None = None
    if prefect_api_url is None:
        prefect_future = pool.submit(
            start_prefect, state / "prefect", ports["prefect"], prefect_db, prefect_messaging
        )
    try:
        with timer.step("base images"):
            engine.ensure_base_images()
        with timer.step("registry"):
            reg = registry.start_registry(state / "registry")
        with timer.step("git repos"):
            seeded = seed_repos(state / "git", pull_registry=reg.host)
        with timer.step("seed images"):
            push_seed_images(reg, seeded)
        with timer.step("prometheus"):
            prom = prometheus.start_prometheus(
                state / "prometheus",
                [f"127.0.0.1:{ports['control']}"],
                pod_discovery=f"http://127.0.0.1:{ports['control']}/sd/kubernetes/pods",
            )
        hook_url = (
            f"http://127.0.0.1:{ports['webhook']}/github" if webhook_url is None else webhook_url
        )
        config = twin_config(
            state,
            ports,
            keys,
            reg,
            hook_url,
            argocd_poll_seconds,
            graceful_deletion=graceful_deletion,
        )
        with timer.step("twin server"):
            start_twin(state, config)
        github_url = f"http://127.0.0.1:{ports['github']}"
        install_hooks(state / "git", github_url)
        with timer.step("argo cd applications"):
            create_applications(state / "kubeconfig", seeded)
    except Exception:
        pool.shutdown(wait=True)
        raise
    prefect_port = ports["prefect"]
    fallback = prefect_api_url or f"http://127.0.0.1:{prefect_port}/api"
    sb = Sandbox(
        state_dir=str(state),
        prefect_api_url=fallback,
        prefect_ui_url=fallback.removesuffix("/api"),
        prefect_managed=prefect_future is not None,
        registry=reg.host,
        registry_username=reg.username,
        registry_password=reg.password,
        prometheus_url=prom.url,
        kube_url=f"https://127.0.0.1:{ports['kube']}",
        kubeconfig=str(state / "kubeconfig"),
        control_url=f"http://127.0.0.1:{ports['control']}",
        argocd_url=f"http://127.0.0.1:{ports['argocd']}",
        argocd_password=keys["argocd_password"],
        argocd_token=keys["argocd_token"],
        github_url=github_url,
        github_token=keys["github_token"],
        webhook_url=hook_url,
        webhook_secret=keys["webhook_secret"],
        git_base=str(state / "git"),
        git_transport=git_transport,
        seed_tag=seeded.seed_tag,
        ingress={
            ns: f"http://127.0.0.1:{ports[ns]}" for ns in ("staging", "production", "training")
        },
        chat_urls={
            "feishu": f"{github_url}/chat/feishu/open-apis/bot/v2/hook/sandbox",
            "dingtalk": f"{github_url}/chat/dingtalk/robot/send?access_token=sandbox",
            "slack": f"{github_url}/chat/slack/services/T000/B000/sandbox",
        },
        ports=ports,
        docker_managed=docker_managed,
        blocks=block_names(),
        prefect_db=prefect_db if prefect_future is not None else "external",
        prefect_messaging=prefect_messaging if prefect_future is not None else "external",
        docker_host=docker_host_url(ports),
        graceful_deletion=graceful_deletion,
    )

    def prefect_then_blocks() -> None:
        # Runs beside the wait for healthy apps: the server is the slowest part to start.
        if prefect_future is not None:
            server = prefect_future.result()
            sb.prefect_api_url, sb.prefect_ui_url = server.api_url, server.ui_url
            timer.timings["prefect server (parallel)"] = round(time.monotonic() - timer.started, 2)
        t0 = time.monotonic()
        register_blocks(sb)
        timer.timings["prefect blocks (parallel)"] = round(time.monotonic() - t0, 2)

    # Saved now too, so `status` and `down` can speak about a half-started sandbox.
    sb.save()
    blocks_future = pool.submit(prefect_then_blocks)
    try:
        if wait_healthy:
            with timer.step("applications healthy"):
                bring_apps_up(sb, timeout=120)
        with timer.step("prefect server + blocks"):
            blocks_future.result()
    finally:
        pool.shutdown(wait=True)
    sb.timings = {**timer.timings, "total": round(time.monotonic() - timer.started, 2)}
    sb.save()
    write_env(sb)
    return sb


def write_env(sb: Sandbox) -> Path:
    path = Path(sb.state_dir) / "env"
    lines = ["# Written by `robotics-cd sandbox up`: source it to point a shell at the sandbox."]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sb.env().items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def table(sb: Sandbox) -> str:
    rows = [
        ("Prefect UI", sb.prefect_ui_url),
        ("Prefect API", sb.prefect_api_url),
        ("Prefect backend", f"{sb.prefect_db} database, {sb.prefect_messaging} messaging"),
        ("Kubernetes API", f"{sb.kube_url}  (KUBECONFIG={sb.kubeconfig})"),
        ("Argo CD", f"{sb.argocd_url}  (admin / see {sb.state_dir}/secrets.json)"),
        ("GitHub API + chat", sb.github_url),
        ("webhooks go to", sb.webhook_url or "(none)"),
        ("registry", f"{sb.registry}  (user {sb.registry_username})"),
        ("Prometheus", sb.prometheus_url),
        (
            "ingress staging",
            f"{sb.ingress['staging']}  (Host: api.robotics.local | fleet.robotics.local)",
        ),
        (
            "ingress production",
            f"{sb.ingress['production']}  (Host: api.robotics.local | fleet.robotics.local)",
        ),
        ("metrics + faults", sb.control_url),
        ("git repos", ", ".join(f"{sb.product_git_base}/{r}.git" for r in REPOS)),
        ("env file", f"source {sb.state_dir}/env"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {where}" for name, where in rows)


@dataclass(frozen=True)
class PartStatus:
    part: str
    ok: bool
    detail: str


def status(state_dir: Path = DEFAULT_STATE) -> list[PartStatus]:
    """The health of every part of the sandbox living in ``state_dir``."""
    sb = Sandbox.load(state_dir.resolve())
    parts: list[PartStatus] = []

    def check(part: str, probe: Callable[[], str]) -> None:
        try:
            parts.append(PartStatus(part, True, probe()))
        except Exception as exc:
            parts.append(PartStatus(part, False, f"{type(exc).__name__}: {exc}"))

    def ok_http(url: str, **kwargs: Any) -> str:
        response = httpx.get(url, timeout=5, **kwargs)
        response.raise_for_status()
        return url

    check("docker engine", lambda: f"Docker {engine.ensure_docker(timeout=3)}")
    check("prefect api", lambda: ok_http(f"{sb.prefect_api_url}/health"))
    if sb.prefect_managed:  # its database, broker, servers and balancer, one line each
        for part, ok, detail in prefect_server.status_parts(Path(sb.state_dir) / "prefect"):
            parts.append(PartStatus(part, ok, detail))
    check(
        "registry",
        lambda: ok_http(
            f"http://{sb.registry}/v2/", auth=(sb.registry_username, sb.registry_password)
        ),
    )
    check("prometheus", lambda: _prometheus_scrapes(sb.prometheus_url))
    check("twin process", lambda: _twin_pid(Path(sb.state_dir)))
    check(
        "kubernetes api",
        lambda: _kube_version(Path(sb.kubeconfig)),
    )
    check("runtime (metrics)", lambda: ok_http(f"{sb.control_url}/healthz"))
    check("argo cd", lambda: ok_http(f"{sb.argocd_url}/api/version"))
    check("github + chat", lambda: ok_http(f"{sb.github_url}/"))
    for namespace in ("staging", "production"):
        check(f"ingress {namespace}", lambda ns=namespace: _router(sb.ingress[ns]))  # type: ignore[misc]
    argo = ArgoClient(sb.argocd_url, sb.argocd_token)
    try:
        for name in APPS_HEALTHY_AT_START:
            check(f"app {name}", lambda n=name: _app_summary(argo.app(n)))  # type: ignore[misc]
    finally:
        argo.close()
    return parts


def _prometheus_scrapes(url: str) -> str:
    targets = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    # The twin's own /metrics must be scraped; pods come and go (a crash-looping canary is
    # down on purpose), so they are counted, not required.
    twin = [t for t in targets if t.get("labels", {}).get("job") == "sandbox"]
    pods = [t for t in targets if t.get("labels", {}).get("job") == "kubernetes-pods"]
    twin_up = sum(1 for t in twin if t.get("health") == "up")
    pods_up = sum(1 for t in pods if t.get("health") == "up")
    if not twin or twin_up < len(twin):
        raise SandboxError(f"{twin_up}/{len(twin)} twin scrape targets up")
    return f"{url} (twin up; {pods_up}/{len(pods)} discovered pods up)"


def _twin_pid(state: Path) -> str:
    pidfile = state / "twin.pid"
    if not pidfile.exists() or not pid_alive(int(pidfile.read_text())):
        raise SandboxError(f"not running (log: {state / 'twin.log'})")
    return f"pid {pidfile.read_text().strip()}"


def _kube_version(kubeconfig: Path) -> str:
    kube = KubeClient(kubeconfig)
    try:
        response = kube.client.get("/version")
        response.raise_for_status()
        return f"{kube.server} ({response.json().get('gitVersion', '?')})"
    finally:
        kube.close()


def _router(url: str) -> str:
    # Any HTTP answer means the router listens; a 404 for an unknown host is fine.
    httpx.get(f"{url}/healthz", headers={"Host": "api.robotics.local"}, timeout=5)
    return url


def _app_summary(app: dict[str, Any]) -> str:
    st = app.get("status") or {}
    sync = (st.get("sync") or {}).get("status", "Unknown")
    health = (st.get("health") or {}).get("status", "Unknown")
    revision = (st.get("sync") or {}).get("revision", "")[:7]
    text = f"{sync} {health} @ {revision}"
    if sync != "Synced" or health != "Healthy":
        raise SandboxError(text)
    return text


def down(state_dir: Path = DEFAULT_STATE, *, purge: bool = False) -> list[str]:
    """Stop everything ``up`` started in ``state_dir``; remove containers (and state)."""
    from sandbox.runtime import cleanup, state_label

    state = state_dir.resolve()
    stopped: list[str] = []
    if not state.exists():
        return stopped
    if stop_pidfile(state / "twin.pid"):
        stopped.append("twin server")
    (state / "twin.ready").unlink(missing_ok=True)
    try:
        removed = cleanup(state_label(state))
        stopped.append(
            f"{removed['containers']} containers, {removed['networks']} networks, "
            f"{removed['volumes']} volumes"
        )
    except Exception as exc:  # report it and go on stopping the rest
        stopped.append(f"container cleanup FAILED ({type(exc).__name__}: {exc}); rerun down")
    if prometheus.stop_prometheus(state / "prometheus"):
        stopped.append("prometheus")
    if registry.stop_registry(state / "registry"):
        stopped.append("registry")
    stopped += prefect_server.stop_prefect_stack(state / "prefect")
    if stop_pidfile(state / "dockerd.pid"):
        stopped.append("dockerd")
    if purge:
        shutil.rmtree(state, ignore_errors=True)
        stopped.append(f"state {state}")
    return stopped


def is_up(state_dir: Path) -> bool:
    try:
        sb = Sandbox.load(state_dir.resolve())
    except SandboxError:
        return False
    return http_ok(f"{sb.argocd_url}/api/version")
