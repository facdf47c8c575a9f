"""Pod discovery for Prometheus, as ``kubernetes_sd_configs`` (role ``pod``) does it, served
in Prometheus' HTTP SD format.

Debian's ``prometheus`` (2.42) is built without the Kubernetes service discovery (its config
loader answers ``field kubernetes_sd_configs not found in type config.ScrapeConfig``), so the
sandbox cannot point Prometheus at the twin's API directly. The twin serves instead, on its
control port, the very target groups Prometheus' Kubernetes discovery makes of the pods it
lists: one target per container port at ``<podIP>:<port>`` with the documented
``__meta_kubernetes_pod_*`` labels (labels, annotations, phase, readiness, container, port,
controller). The relabelling rules are therefore those of a real cluster
(``sandbox/prometheus.py``); on a real cluster the ``http_sd_configs`` block becomes
``kubernetes_sd_configs: [{role: pod}]`` and nothing else changes.

Like the real discovery, the target address is the pod IP; the sandbox's relabelling
replaces it with the 127.0.0.1 port the twin publishes (annotation
``sandbox.robotics.dev/metrics-address``) and drops pods without one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

JSON = dict[str, Any]
_INVALID = re.compile(r"[^a-zA-Z0-9_]")
META = "__meta_kubernetes_"


def sanitize(name: str) -> str:
    """Prometheus' label-name sanitizing of a Kubernetes label or annotation key."""
    return _INVALID.sub("_", name)


def _pod_labels(pod: JSON) -> dict[str, str]:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    ready = next(
        (c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"),
        "unknown",
    )
    labels = {
        f"{META}namespace": meta.get("namespace", ""),
        f"{META}pod_name": meta.get("name", ""),
        f"{META}pod_ip": status.get("podIP", ""),
        f"{META}pod_uid": meta.get("uid", ""),
        f"{META}pod_phase": status.get("phase", ""),
        f"{META}pod_ready": str(ready).lower(),
        f"{META}pod_node_name": spec.get("nodeName", ""),
        f"{META}pod_host_ip": status.get("hostIP", ""),
    }
    for key, value in (meta.get("labels") or {}).items():
        labels[f"{META}pod_label_{sanitize(key)}"] = str(value)
        labels[f"{META}pod_labelpresent_{sanitize(key)}"] = "true"
    for key, value in (meta.get("annotations") or {}).items():
        labels[f"{META}pod_annotation_{sanitize(key)}"] = str(value)
        labels[f"{META}pod_annotationpresent_{sanitize(key)}"] = "true"
    owners = meta.get("ownerReferences") or []
    controller = next((o for o in owners if o.get("controller")), owners[0] if owners else None)
    if controller:
        labels[f"{META}pod_controller_kind"] = controller.get("kind", "")
        labels[f"{META}pod_controller_name"] = controller.get("name", "")
    return labels


def target_groups(pods: Iterable[JSON], namespaces: Iterable[str] = ()) -> list[JSON]:
    """HTTP SD target groups of ``pods`` (all namespaces when ``namespaces`` is empty)."""
    wanted = set(namespaces)
    groups: list[JSON] = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if wanted and meta.get("namespace") not in wanted:
            continue
        ip = (pod.get("status") or {}).get("podIP", "")
        if not ip:
            continue  # Prometheus' discovery skips pods without an IP
        base = _pod_labels(pod)
        containers = ((pod.get("spec") or {}).get("containers")) or []
        for container in containers:
            ports = container.get("ports") or []
            common = {**base, f"{META}pod_container_name": container.get("name", "")}
            common[f"{META}pod_container_image"] = container.get("image", "")
            common[f"{META}pod_container_init"] = "false"
            if not ports:
                groups.append({"targets": [ip], "labels": common})
                continue
            for port in ports:
                number = str(port.get("containerPort", ""))
                labels = {
                    **common,
                    f"{META}pod_container_port_number": number,
                    f"{META}pod_container_port_name": port.get("name", ""),
                    f"{META}pod_container_port_protocol": port.get("protocol", "TCP"),
                }
                groups.append({"targets": [f"{ip}:{number}"], "labels": labels})
    return groups
