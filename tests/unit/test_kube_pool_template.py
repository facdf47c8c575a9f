"""The Kubernetes work pool's base job template: host networking for the sandbox, plain
settings as env, and no credential ever in it (they reach the Job as the worker's Secret or
through Prefect blocks). The server-side validation of the template is in
tests/integration/test_deploy.py."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from cli.app import app
from cli.ops import parse_job_env
from core.errors import InvalidInput
from deployments import register as reg


def pod_spec(template: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    return spec


def test_the_default_template_keeps_the_pods_on_the_cluster_network() -> None:
    template = reg.kubernetes_base_job_template(reg.KubernetesPoolOptions())
    assert "hostNetwork" not in pod_spec(template)
    assert template["variables"]["properties"]["env"]["default"] == reg.HEARTBEAT_ENV


def test_host_network_and_settings_reach_every_flow_run_job() -> None:
    options = reg.KubernetesPoolOptions(
        image="127.0.0.1:5000/robotics-cd/flow-run:0.1.0",
        host_network=True,
        env={
            "ROBOTICS_CD_ARGOCD_URL": "https://127.0.0.1:8443",
            "ROBOTICS_CD_ARGOCD_TOKEN_BLOCK": "sandbox-argocd-token",
        },
    )
    template = reg.kubernetes_base_job_template(options)
    assert pod_spec(template)["hostNetwork"] is True
    assert pod_spec(template)["dnsPolicy"] == "ClusterFirstWithHostNet"
    variables = template["variables"]["properties"]
    assert variables["image"]["default"] == "127.0.0.1:5000/robotics-cd/flow-run:0.1.0"
    assert variables["env"]["default"] == {
        **reg.HEARTBEAT_ENV,
        "ROBOTICS_CD_ARGOCD_URL": "https://127.0.0.1:8443",
        "ROBOTICS_CD_ARGOCD_TOKEN_BLOCK": "sandbox-argocd-token",
    }


@pytest.mark.parametrize(
    "name",
    ["PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "ROBOTICS_CD_GITHUB_TOKEN", "DB_PASSWORD"],
)
def test_a_credential_is_refused_as_plain_template_env(name: str) -> None:
    with pytest.raises(InvalidInput, match=name):
        reg.kubernetes_base_job_template(reg.KubernetesPoolOptions(env={name: "s3cret"}))


def test_the_worker_is_told_to_store_the_jobs_env_as_a_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect_kubernetes.settings import KubernetesSettings

    # The name is the worker's own setting (a typo would be silently ignored).
    for name, value in reg.KUBERNETES_WORKER_ENV.items():
        monkeypatch.setenv(name, value)
    assert KubernetesSettings().worker.store_env_as_secret is True


def test_job_env_pairs_parse_and_a_bad_one_is_refused() -> None:
    assert parse_job_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(InvalidInput, match="NAME=VALUE"):
        parse_job_env(["A"])


def test_deploy_refuses_a_credential_before_reaching_prefect() -> None:
    result = CliRunner().invoke(
        app,
        ["deploy", "--pool-type", "kubernetes", "--job-env", "PREFECT_API_KEY=pnu_x"],
    )
    assert result.exit_code == 2
    assert "PREFECT_API_KEY" in result.output


async def test_the_worker_renders_our_template_into_a_host_network_job() -> None:
    """What prefect-kubernetes makes of the pool's template for one flow run (the worker's
    own rendering, no cluster): the image, hostNetwork, the run's labels on the pod."""
    from uuid import uuid4

    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    options = reg.KubernetesPoolOptions(
        image="127.0.0.1:5000/robotics-cd/flow-run:0.1.0-abc", host_network=True
    )
    template = reg.kubernetes_base_job_template(options)
    values = {
        name: prop["default"]
        for name, prop in template["variables"]["properties"].items()
        if "default" in prop
    }
    configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(
        template, values
    )
    run = FlowRun(id=uuid4(), name="calm-otter", flow_id=uuid4())
    configuration.prepare_for_flow_run(run)
    manifest = configuration.job_manifest
    pod = manifest["spec"]["template"]
    assert pod["spec"]["hostNetwork"] is True
    assert pod["spec"]["containers"][0]["image"] == options.image
    assert pod["metadata"]["labels"]["prefect.io/flow-run-id"] == str(run.id)
    assert manifest["metadata"]["namespace"] == "robotics-cd"


def test_a_results_claim_is_every_jobs_result_storage() -> None:
    """A release resumed after its approval runs in a new Job: the results its first Job
    persisted must be on a volume both mount, not in the first pod's filesystem."""
    options = reg.KubernetesPoolOptions(results_claim="robotics-cd-results")
    template = reg.kubernetes_base_job_template(options)
    spec = pod_spec(template)
    assert spec["volumes"] == [
        {"name": "results", "persistentVolumeClaim": {"claimName": "robotics-cd-results"}}
    ]
    assert spec["containers"][0]["volumeMounts"] == [
        {"name": "results", "mountPath": reg.RESULTS_MOUNT}
    ]
    env = template["variables"]["properties"]["env"]["default"]
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == reg.RESULTS_MOUNT
    assert "volumes" not in pod_spec(reg.kubernetes_base_job_template(reg.KubernetesPoolOptions()))
