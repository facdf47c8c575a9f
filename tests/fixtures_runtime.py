"""Fixtures: the twin's runtime on real parts.

``runtime_images`` (session): a busybox-httpd web image built locally (``/healthz``, and
``/cgi-bin/status`` answering ``$STATUS_CODE``, default 200), in two versions, pushed to a
real ``docker-registry`` with htpasswd auth.

``runtime_twin`` (session): a real ``python -m sandbox.twin`` process configured with that
registry, a control port and ingress ports for ``staging`` and ``production``, and a real
Prometheus scraping its ``/metrics`` every second. On teardown: the twin stops, every
container/network/volume of its label is removed, Prometheus and the registry stop.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import docker
import httpx
import pytest
import yaml

from sandbox.engine import BUSYBOX_IMAGE, ensure_base_images
from sandbox.procs import free_port
from sandbox.prometheus import PrometheusServer, start_prometheus, stop_prometheus
from sandbox.registry import Registry, push_image, start_registry, stop_registry
from sandbox.runtime import cleanup, state_label
from sandbox.runtime.engine import container_name
from tests.fixtures_kube import KUBECTL, KubeTwin, start_kube_twin

WEB_LOCAL = "robotics-cd-test/runtime-web"

_STATUS_CGI = """#!/bin/sh
echo "Status: ${STATUS_CODE:-200} X"
echo "Content-Type: text/plain"
echo
echo "version=${VERSION} pod=${POD_NAME} host=$(hostname)"
"""


def _dockerfile(version: str) -> str:
    return f"""\
FROM {BUSYBOX_IMAGE}
COPY status /www/cgi-bin/status
RUN chmod 755 /www/cgi-bin/status && echo ok > /www/healthz
ENV VERSION={version}
EXPOSE 8000
CMD ["httpd", "-f", "-p", "8000", "-h", "/www"]
"""


def build_web_image(client: docker.DockerClient, version: str) -> str:
    """Build the web image from an in-memory context (Dockerfile + CGI script)."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text, mode in (
            ("Dockerfile", _dockerfile(version), 0o644),
            ("status", _STATUS_CGI, 0o755),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    tag = f"{WEB_LOCAL}:{version}"
    client.images.build(fileobj=buf, custom_context=True, tag=tag, rm=True, pull=False)
    return tag


@dataclass(frozen=True)
class RuntimeImages:
    registry: Registry
    web_v1: str
    web_v2: str


@pytest.fixture(scope="session")
def runtime_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeImages]:
    ensure_base_images()
    home = tmp_path_factory.mktemp("runtime-registry")
    registry = start_registry(home)
    client = docker.from_env(timeout=120)
    try:
        refs = []
        for version in ("v1", "v2"):
            local = build_web_image(client, version)
            push_image(registry, local, "test/web", version)
            refs.append(f"{registry.host}/test/web:{version}")
            # Pods must pull from the registry, not find the pushed tag locally.
            client.images.remove(refs[-1], noprune=True)
        yield RuntimeImages(registry, refs[0], refs[1])
    finally:
        client.close()
        stop_registry(home)


_PATHS = {
    "pod": "/api/v1/namespaces/{ns}/pods",
    "pvc": "/api/v1/namespaces/{ns}/persistentvolumeclaims",
    "deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "ingress": "/apis/networking.k8s.io/v1/namespaces/{ns}/ingresses",
}


@dataclass
class RuntimeTwin:
    kube: KubeTwin
    control_url: str
    prometheus: PrometheusServer
    ingress_ports: dict[str, int]
    label: str
    images: RuntimeImages

    def apply(self, *docs: dict[str, Any], verb: str = "apply") -> None:
        """``kubectl apply -f -`` (or ``replace``/``create``) of the given objects."""
        argv = [
            str(KUBECTL),
            f"--kubeconfig={self.kube.kubeconfig}",
            f"--cache-dir={self.kube.state_dir / 'kubectl-cache'}",
            verb,
            "-f",
            "-",
        ]
        done = subprocess.run(
            argv, input=yaml.safe_dump_all(list(docs)), capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise AssertionError(f"kubectl apply failed: {done.stderr}")

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any]:
        """One object, over HTTPS for the common kinds (polling with kubectl costs a Go
        process start each time), else with ``kubectl get``."""
        path = _PATHS.get(kind)
        if path is None:
            out = self.kube.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout
            return dict(json.loads(out))
        response = httpx.get(
            f"{self.kube.url}{path.format(ns=namespace)}/{name}",
            headers={"Authorization": f"Bearer {self.kube.token}"},
            verify=str(self.kube.ca_cert),
            timeout=10,
        )
        response.raise_for_status()
        return dict(response.json())

    def wait_for(
        self, what: str, check: Callable[[], Any], *, timeout: float = 60, interval: float = 0.5
    ) -> Any:
        """Poll ``check`` until it returns a truthy value; fail naming ``what`` and the last
        value or error at the deadline."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
                if last:
                    return last
            except (AssertionError, httpx.HTTPError, KeyError) as exc:
                last = exc
            time.sleep(interval)
        raise AssertionError(
            f"{what}: not true after {timeout:.0f}s (last: {last!r})\n{self.kube.log.read_text()[-3000:]}"
        )

    def query(self, promql: str) -> list[dict[str, Any]]:
        response = httpx.get(
            f"{self.prometheus.url}/api/v1/query", params={"query": promql}, timeout=10
        )
        response.raise_for_status()
        return list(response.json()["data"]["result"])

    def container(self, namespace: str, pod: str) -> str:
        """The Docker container name of a pod's first container."""
        return container_name(self.label, namespace, pod)

    def router(self, namespace: str) -> str:
        return f"http://127.0.0.1:{self.ingress_ports[namespace]}"


@pytest.fixture(scope="session")
def runtime_twin(
    tmp_path_factory: pytest.TempPathFactory, runtime_images: RuntimeImages
) -> Iterator[RuntimeTwin]:
    state = tmp_path_factory.mktemp("runtime-twin")
    control_port = free_port()
    ingress_ports = {"staging": free_port(), "production": free_port()}
    registry = runtime_images.registry
    config = {
        "registry": {
            "url": registry.url,
            "username": registry.username,
            "password": registry.password,
        },
        "control_port": control_port,
        "ingress_ports": ingress_ports,
        "restart_backoff": {"initial": 0.5, "max": 4},
        "resync_seconds": 1,
        # Other twin components in the same process require their ports.
        "argocd_port": free_port(),
        "github_port": free_port(),
        "git_base": str(state / "git"),
    }
    label = state_label(state)
    prom_home = state / "prometheus"
    try:
        with start_kube_twin(state, **config) as kube:
            prometheus = start_prometheus(prom_home, [f"127.0.0.1:{control_port}"])
            try:
                yield RuntimeTwin(
                    kube,
                    f"http://127.0.0.1:{control_port}",
                    prometheus,
                    ingress_ports,
                    label,
                    runtime_images,
                )
            finally:
                stop_prometheus(prom_home)
    finally:
        cleanup(label)


def web_deployment(
    name: str,
    namespace: str,
    image: str,
    *,
    replicas: int = 1,
    labels: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    probe_path: str = "/healthz",
    progress_deadline: int | None = None,
) -> dict[str, Any]:
    labels = labels or {"app": name}
    spec: dict[str, Any] = {
        "replicas": replicas,
        "selector": {"matchLabels": labels},
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        },
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "containers": [
                    {
                        "name": "web",
                        "image": image,
                        "ports": [{"name": "http", "containerPort": 8000}],
                        "env": [{"name": k, "value": v} for k, v in (env or {}).items()]
                        + [
                            {
                                "name": "POD_NAME",
                                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                            }
                        ],
                        "readinessProbe": {
                            "httpGet": {"path": probe_path, "port": "http"},
                            "periodSeconds": 1,
                        },
                        "resources": {"limits": {"cpu": "200m", "memory": "64Mi"}},
                    }
                ]
            },
        },
    }
    if progress_deadline is not None:
        spec["progressDeadlineSeconds"] = progress_deadline
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def service(name: str, namespace: str, selector: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }


def ingress(
    name: str,
    namespace: str,
    host: str,
    service_name: str,
    *,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
        "spec": {
            "ingressClassName": "nginx",
            "rules": [
                {
                    "host": host,
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {
                                    "service": {"name": service_name, "port": {"number": 80}}
                                },
                            }
                        ]
                    },
                }
            ],
        },
    }


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
