"""Rules of the Argo CD and GitHub twins that need no services: health as Argo CD computes
it, the live-versus-desired comparison, kubectl apply's three-way merge, GitHub's signature."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from sandbox.argocd import health as h
from sandbox.argocd.resources import (
    LAST_APPLIED,
    in_sync,
    merged_for_apply,
    prepare,
    sort_key,
    with_last_applied,
)
from sandbox.github import signature_256


def _deployment(**status: object) -> dict[str, object]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "api", "generation": 2},
        "spec": {"replicas": 2},
        "status": {"observedGeneration": 2, **status},
    }


def test_deployment_health_follows_argo_cd() -> None:
    assert h.deployment_health(_deployment(updatedReplicas=1, replicas=2)).status == h.PROGRESSING
    done = _deployment(updatedReplicas=2, replicas=2, availableReplicas=2)
    assert h.deployment_health(done).status == h.HEALTHY
    stuck = _deployment(
        updatedReplicas=1,
        conditions=[
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
        ],
    )
    assert h.deployment_health(stuck) == h.Health(
        h.DEGRADED, 'Deployment "api" exceeded its progress deadline'
    )
    stale = _deployment(updatedReplicas=2, replicas=2, availableReplicas=2, observedGeneration=1)
    assert h.deployment_health(stale).status == h.PROGRESSING


def test_ingress_is_healthy_only_with_a_load_balancer_address() -> None:
    ingress: dict[str, Any] = {"metadata": {"name": "api"}, "status": {}}
    assert h.resource_health("networking.k8s.io", "Ingress", ingress) == h.Health(h.PROGRESSING)
    ingress["status"] = {"loadBalancer": {"ingress": [{"ip": "127.0.0.1"}]}}
    assert h.resource_health("networking.k8s.io", "Ingress", ingress) == h.Health(h.HEALTHY)
    assert h.resource_health("networking.k8s.io", "Ingress", None) == h.Health(h.MISSING)
    assert h.resource_health("", "ConfigMap", {"metadata": {}}) is None


def test_job_health_and_aggregate() -> None:
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "message": "boom"}]}}
    assert h.job_health(failed) == h.Health(h.DEGRADED, "boom")
    complete = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert h.job_health(complete).status == h.HEALTHY
    assert h.aggregate([h.HEALTHY, h.PROGRESSING, h.SUSPENDED]) == h.PROGRESSING
    assert h.aggregate([h.HEALTHY, h.MISSING, h.DEGRADED]) == h.DEGRADED
    assert h.aggregate([]) == h.HEALTHY


def test_comparison_ignores_server_fields_but_sees_changes() -> None:
    desired = prepare(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"port": 80}},
        app="app",
        namespace="staging",
    )
    live = json.loads(json.dumps(desired))
    live["metadata"].update(uid="u", resourceVersion="7")
    live["status"] = {"loadBalancer": {}}
    assert in_sync(desired, live)
    live["spec"]["port"] = 81
    assert not in_sync(desired, live)
    assert desired["metadata"]["namespace"] == "staging"
    assert desired["metadata"]["labels"]["argocd.argoproj.io/instance"] == "app"


def test_apply_drops_what_we_removed_and_keeps_what_others_added() -> None:
    first = prepare(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "d", "annotations": {"ours": "1"}},
            "spec": {"replicas": 1},
        },
        app="app",
        namespace="production",
    )
    live = with_last_applied(first)
    live["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "3"
    live["metadata"]["resourceVersion"] = "12"
    second = json.loads(json.dumps(first))
    del second["metadata"]["annotations"]["ours"]
    merged = merged_for_apply(live, second)
    annotations = merged["metadata"]["annotations"]
    assert "ours" not in annotations
    assert annotations["deployment.kubernetes.io/revision"] == "3"
    assert json.loads(annotations[LAST_APPLIED])["metadata"]["annotations"].get("ours") is None
    assert merged["metadata"]["resourceVersion"] == "12"


def test_sync_order_is_argo_cds_kind_order() -> None:
    kinds = ["Ingress", "Deployment", "Service", "Namespace", "HorizontalPodAutoscaler"]
    objs = [{"kind": k, "metadata": {"name": "x"}} for k in kinds]
    ordered = [o["kind"] for o in sorted(objs, key=sort_key)]
    assert ordered == ["Namespace", "Service", "Deployment", "HorizontalPodAutoscaler", "Ingress"]


def test_signature_matches_githubs_test_vector() -> None:
    body = b"Hello, World!"
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert signature_256("It's a Secret to Everybody", body) == expected
    digest = hmac.new(b"It's a Secret to Everybody", body, hashlib.sha256).hexdigest()
    assert expected == f"sha256={digest}"


def test_a_field_we_applied_and_then_removed_is_out_of_sync() -> None:
    before = prepare(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "s", "annotations": {"x": "1"}},
        },
        app="app",
        namespace="production",
    )
    live = with_last_applied(before)
    after = json.loads(json.dumps(before))
    del after["metadata"]["annotations"]["x"]
    assert in_sync(before, live)
    assert not in_sync(after, live)
