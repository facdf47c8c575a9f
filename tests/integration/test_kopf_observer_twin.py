"""The prefect-kubernetes worker's observer is a kopf operator: against the twin, kopf
logs in from the kubeconfig, scans discovery, lists and watches pods and Jobs across every
namespace with the observer's bare-key label selector (``prefect.io/flow-run-id``), and sees
exactly the labelled objects come and go. The API-only twin (no containers): a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import kopf
import pytest

from tests.fixtures_kube import KubeTwin

LABEL = "prefect.io/flow-run-id"
NAMESPACE = "kopf-observed"


def _objects() -> list[dict[str, Any]]:
    labels = {LABEL: "6b1f1a9e-run"}
    container = [{"name": "prefect-job", "image": "x"}]
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "run-pod", "namespace": NAMESPACE, "labels": labels},
            "spec": {"containers": container},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "other-pod", "namespace": NAMESPACE},
            "spec": {"containers": container},
        },
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "run-job", "namespace": NAMESPACE, "labels": labels},
            "spec": {"template": {"spec": {"containers": container, "restartPolicy": "Never"}}},
        },
    ]


def test_kopf_watches_labelled_pods_and_jobs_cluster_wide(
    kube_twin: KubeTwin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kube_twin.kubeconfig))
    registry = kopf.OperatorRegistry()
    seen: list[tuple[str, str]] = []
    # The observer's settings and filters (prefect_kubernetes/observer.py `configure`).
    kopf.on.login(registry=registry)(kopf.login_with_kubeconfig)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.watching.label_selectors["v1", "pods"] = LABEL
        settings.watching.label_selectors["batch", "v1", "jobs"] = LABEL
        settings.watching.chunk_size = 500
        settings.posting.enabled = False

    @kopf.on.event("pods", labels={LABEL: kopf.PRESENT}, registry=registry)
    def on_pod(event: kopf.RawEvent, name: str, **_: Any) -> None:
        seen.append((f"pod {event['type']}", name))

    @kopf.on.event("batch", "v1", "jobs", labels={LABEL: kopf.PRESENT}, registry=registry)
    def on_job(event: kopf.RawEvent, name: str, **_: Any) -> None:
        seen.append((f"job {event['type']}", name))

    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=lambda: asyncio.run(
            kopf.operator(
                registry=registry,
                clusterwide=True,
                standalone=True,
                stop_flag=stop,
                ready_flag=ready,
            )
        ),
        daemon=True,
    )
    thread.start()
    try:
        assert ready.wait(30), "kopf did not get ready against the twin"
        manifest = tmp_path / "objects.json"
        manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": _objects()}))
        kube_twin.kubectl("create", "--validate=false", "-f", str(manifest))

        def wait_for(wanted: set[tuple[str, str]]) -> None:
            # kopf's ready flag does not wait for its watches: an object created before a
            # watch starts comes from the initial listing (event type None), not as ADDED;
            # both mean kopf saw it. Deletions come through the watch either way.
            deadline = time.monotonic() + 20
            while not wanted <= {(e.replace(" None", " ADDED"), n) for e, n in seen}:
                assert time.monotonic() < deadline, f"kopf saw only {seen}"
                time.sleep(0.1)

        wait_for({("pod ADDED", "run-pod"), ("job ADDED", "run-job")})
        kube_twin.kubectl("delete", "job/run-job", "pod/run-pod", "-n", NAMESPACE)
        wait_for({("pod DELETED", "run-pod"), ("job DELETED", "run-job")})
        assert "other-pod" not in {name for _, name in seen}
    finally:
        stop.set()
        thread.join(timeout=30)
        kube_twin.kubectl(
            "delete",
            "--validate=false",
            "-f",
            str(tmp_path / "objects.json"),
            "--ignore-not-found",
            check=False,
        )
    assert not thread.is_alive(), "kopf did not stop"
