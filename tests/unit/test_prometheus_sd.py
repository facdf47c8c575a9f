"""Pod discovery for Prometheus: the target groups of kubernetes_sd_configs role=pod, and
the scrape job that relabels each pod to its published 127.0.0.1 address."""

from __future__ import annotations

from pathlib import Path

import yaml

from sandbox.kube.prometheus_sd import target_groups
from sandbox.prometheus import METRICS_ADDRESS_ANNOTATION, pods_job, write_config

POD = {
    "metadata": {
        "name": "fleet-planner-canary-5d9c7-x2k4p",
        "namespace": "production",
        "uid": "u1",
        "labels": {"app": "fleet-planner", "track": "canary", "pod-template-hash": "5d9c7"},
        "annotations": {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": "8000",
            METRICS_ADDRESS_ANNOTATION: "127.0.0.1:32771",
        },
        "ownerReferences": [
            {"kind": "ReplicaSet", "name": "fleet-planner-canary-5d9c7", "controller": True}
        ],
    },
    "spec": {
        "containers": [
            {"name": "fleet-planner", "image": "r/f:1", "ports": [{"containerPort": 8000}]}
        ]
    },
    "status": {
        "phase": "Running",
        "podIP": "172.18.0.5",
        "hostIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "True"}],
    },
}


def test_target_groups_carry_the_kubernetes_sd_labels():
    (group,) = target_groups([POD], ["production"])
    assert group["targets"] == ["172.18.0.5:8000"]  # as the real discovery: the pod IP
    labels = group["labels"]
    assert labels["__meta_kubernetes_namespace"] == "production"
    assert labels["__meta_kubernetes_pod_label_track"] == "canary"
    assert labels["__meta_kubernetes_pod_label_pod_template_hash"] == "5d9c7"
    assert labels["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] == "true"
    assert (
        labels["__meta_kubernetes_pod_annotation_sandbox_robotics_dev_metrics_address"]
        == "127.0.0.1:32771"
    )
    assert labels["__meta_kubernetes_pod_ready"] == "true"
    assert labels["__meta_kubernetes_pod_container_port_number"] == "8000"
    assert labels["__meta_kubernetes_pod_controller_kind"] == "ReplicaSet"
    assert target_groups([POD], ["staging"]) == []
    assert target_groups([{**POD, "status": {"phase": "Pending"}}]) == []  # no IP yet


def test_the_job_keeps_annotated_pods_and_scrapes_only_loopback(tmp_path: Path):
    job = pods_job("http://127.0.0.1:9/sd/kubernetes/pods")
    assert job["http_sd_configs"][0]["url"].endswith("?namespace=staging&namespace=production")
    rules = job["relabel_configs"]
    address_rule = next(r for r in rules if r.get("target_label") == "__address__")
    assert address_rule["source_labels"] == [
        "__meta_kubernetes_pod_annotation_sandbox_robotics_dev_metrics_address"
    ]
    keep_loopback = next(r for r in rules if r.get("regex", "").startswith(r"127\."))
    assert keep_loopback["action"] == "keep"
    config = yaml.safe_load(
        write_config(tmp_path, ["127.0.0.1:1"], "http://127.0.0.1:9/sd/kubernetes/pods").read_text()
    )
    assert [j["job_name"] for j in config["scrape_configs"]] == ["sandbox", "kubernetes-pods"]
