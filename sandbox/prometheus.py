"""A real Prometheus on 127.0.0.1, scraping every second:

- ``sandbox``: the twin's ``/metrics`` (ingress, kube-state and cAdvisor series), a static
  target;
- ``kubernetes-pods``: the pods themselves, with the usual ``prometheus.io/scrape|port|path``
  annotations, discovered from the Kubernetes twin's pods with the labels of
  ``kubernetes_sd_configs`` role ``pod``. Debian's Prometheus is built without the
  Kubernetes discovery, so the twin serves those target groups over Prometheus' HTTP SD
  (``sandbox/kube/prometheus_sd.py``); the relabelling below is the real cluster's. The
  sandbox reaches a pod only through the port the twin publishes on 127.0.0.1, recorded on
  the pod as the annotation ``sandbox.robotics.dev/metrics-address``: the relabelling puts
  that in ``__address__`` and drops any pod without it, so Prometheus never scrapes a
  container-network address.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from sandbox.procs import (
    free_port,
    http_ok,
    pid_alive,
    remembered_port,
    spawn,
    stop_pidfile,
    wait_until,
)

METRICS_ADDRESS_ANNOTATION = "sandbox.robotics.dev/metrics-address"
POD_NAMESPACES = ("staging", "production")


def _meta(annotation: str) -> str:
    """The ``__meta_kubernetes_pod_annotation_*`` label Prometheus makes of an annotation."""
    return "__meta_kubernetes_pod_annotation_" + "".join(
        c if c.isalnum() else "_" for c in annotation
    )


def pods_job(discovery_url: str, namespaces: Sequence[str] = POD_NAMESPACES) -> dict[str, Any]:
    """The scrape job of annotated pods. ``discovery_url``: the twin's HTTP SD of pods. On a
    real cluster the ``http_sd_configs`` entry is ``kubernetes_sd_configs: [{role: pod,
    namespaces: {names: [...]}}]``; the relabelling is the same."""
    query = "&".join(f"namespace={ns}" for ns in namespaces)
    return {
        "job_name": "kubernetes-pods",
        "http_sd_configs": [{"url": f"{discovery_url}?{query}", "refresh_interval": "2s"}],
        "relabel_configs": [
            {
                "source_labels": [_meta("prometheus.io/scrape")],
                "action": "keep",
                "regex": "true",
            },
            {
                "source_labels": ["__meta_kubernetes_pod_phase"],
                "action": "keep",
                "regex": "Running",
            },
            # Only the address the twin published on loopback; never the pod IP.
            {
                "source_labels": [_meta(METRICS_ADDRESS_ANNOTATION)],
                "action": "keep",
                "regex": r"127\.0\.0\.1:\d+",
            },
            {"source_labels": [_meta(METRICS_ADDRESS_ANNOTATION)], "target_label": "__address__"},
            {
                "source_labels": [_meta("prometheus.io/path")],
                "regex": "(.+)",
                "target_label": "__metrics_path__",
            },
            {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {
                "source_labels": ["__meta_kubernetes_pod_container_name"],
                "target_label": "container",
            },
        ],
    }


@dataclass(frozen=True)
class PrometheusServer:
    url: str
    home: Path


def write_config(home: Path, targets: Sequence[str], pod_discovery: str | None = None) -> Path:
    scrape: list[dict[str, Any]] = [
        {"job_name": "sandbox", "static_configs": [{"targets": list(targets)}]},
    ]
    if pod_discovery is not None:
        scrape.append(pods_job(pod_discovery))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": scrape,
    }
    path = home / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_prometheus(
    home: Path,
    targets: Sequence[str],
    *,
    pod_discovery: str | None = None,
    port: int | None = None,
    timeout: float = 60.0,
) -> PrometheusServer:
    """Start (or reuse, if already running from ``home``) Prometheus scraping ``targets``
    and, given the twin's ``pod_discovery`` URL, the annotated pods it lists."""
    home.mkdir(parents=True, exist_ok=True)
    pidfile, portfile = home / "prometheus.pid", home / "prometheus.port"
    config = write_config(home, targets, pod_discovery)
    if pidfile.exists() and portfile.exists() and pid_alive(int(pidfile.read_text())):
        old = int(portfile.read_text())
        url = f"http://127.0.0.1:{old}"
        # Pick up changed targets without a restart.
        httpx.post(f"{url}/-/reload", timeout=5)
        return PrometheusServer(url, home)
    port = port or remembered_port(portfile) or free_port()
    spawn(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=1d",
        ],
        log=home / "prometheus.log",
        pidfile=pidfile,
    )
    portfile.write_text(str(port))
    url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: http_ok(f"{url}/-/ready"),
        timeout=timeout,
        what=f"Prometheus (log: {home / 'prometheus.log'})",
    )
    return PrometheusServer(url, home)


def stop_prometheus(home: Path) -> bool:
    (home / "prometheus.port").unlink(missing_ok=True)
    return stop_pidfile(home / "prometheus.pid")
