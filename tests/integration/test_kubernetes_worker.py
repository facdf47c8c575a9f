"""A flow run as a Kubernetes Job, end to end on real parts: the real
``prefect worker start --type kubernetes`` (prefect-kubernetes, with its kopf observer)
against the Kubernetes twin, which runs the Job's pod as a container of the flow-run image
built here (sandbox/flowrun_image.py), pulled from the sandbox registry, on host networking
so it reaches the Prefect API on 127.0.0.1.

The flow is the product's ``expire-approvals`` (it needs the Prefect API and the catalog
only). Asserted: the run completes; its Job had ``hostNetwork``; the worker moved the run's
env (``PREFECT_API_URL`` among it) into a Secret the pod reads with ``envFrom``, so no
plain env value is in the Job.

Slow (the image: minutes the first time on a machine, then cached), so it runs in the full
matrix only: ``ROBOTICS_CD_FULL_MATRIX=1``. Passed 2026-12-07: 13.6 s from worker
start to Completed (docs/e2e-matrix.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.objects import StateType

from deployments import register as reg
from sandbox.engine import ensure_base_images
from sandbox.flowrun_image import default_cache, ensure_flow_run_image, push_flow_run_image
from sandbox.prefect_server import PrefectServer
from sandbox.procs import spawn, stop_pid
from sandbox.registry import Registry, start_registry, stop_registry
from sandbox.runtime import cleanup, state_label
from tests.fixtures_kube import KubeTwin, start_kube_twin
from tests.matrix import full_matrix

pytestmark = [pytest.mark.integration, full_matrix]

NAMESPACE = "robotics-cd"
RUN_DEADLINE = 300.0


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    home = tmp_path_factory.mktemp("worker-registry")
    registry = start_registry(home)
    try:
        yield registry
    finally:
        stop_registry(home)


@pytest.fixture(scope="module")
def flow_run_image(registry: Registry) -> str:
    built = ensure_flow_run_image(default_cache())
    return push_flow_run_image(registry, built.image)


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[KubeTwin]:
    ensure_base_images()
    state = tmp_path_factory.mktemp("worker-twin")
    config = {
        "components": ["sandbox.kube.api", "sandbox.runtime"],
        "registry": {
            "url": registry.url,
            "username": registry.username,
            "password": registry.password,
        },
        "resync_seconds": 1,
        "load": {"enabled": False},
        "graceful_deletion": True,
    }
    try:
        with start_kube_twin(state, **config) as kube:
            namespace = state / "namespace.json"
            namespace.write_text(
                json.dumps(
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
                )
            )
            kube.kubectl("create", "--validate=false", "-f", str(namespace))
            yield kube
    finally:
        cleanup(state_label(state))


def _worker(twin: KubeTwin, server: PrefectServer, pool: str, log: Path) -> int:
    env = {
        **os.environ,
        **server.env,
        **reg.KUBERNETES_WORKER_ENV,
        "KUBECONFIG": str(twin.kubeconfig),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    proc = spawn(
        [
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            "--pool",
            pool,
            "--type",
            "kubernetes",
        ],
        log=log,
        env=env,
    )
    return proc.pid


async def test_a_flow_run_runs_as_a_job_on_the_twin(
    prefect_server: PrefectServer,
    twin: KubeTwin,
    flow_run_image: str,
    tmp_path: Path,
) -> None:
    from flows.release import expire_approvals

    pool = f"robotics-cd-k8s-{uuid.uuid4().hex[:6]}"
    options = reg.KubernetesPoolOptions(
        namespace=NAMESPACE,
        image=flow_run_image,
        host_network=True,
        cpu_request="100m",
        memory_request="256Mi",
    )
    async with get_client() as client:
        await reg.ensure_work_pool(
            client, pool, "kubernetes", reg.kubernetes_base_job_template(options)
        )
    from prefect.types.entrypoint import EntrypointType

    deployment = await expire_approvals.ato_deployment(
        name=pool, work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH
    )
    deployment_id = await deployment.aapply(work_pool_name=pool)
    log = tmp_path / "worker.log"
    started = time.monotonic()
    pid = _worker(twin, prefect_server, pool, log)
    try:
        async with get_client() as client:
            run = await client.create_flow_run_from_deployment(deployment_id)
            deadline = time.monotonic() + RUN_DEADLINE
            while True:
                run = await client.read_flow_run(run.id)
                assert run.state is not None
                if run.state.is_final():
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"run still {run.state.type} after {RUN_DEADLINE:.0f}s\n"
                        f"{log.read_text()[-3000:]}\n{twin.log.read_text()[-3000:]}"
                    )
                await asyncio.sleep(1)
        elapsed = time.monotonic() - started
        assert run.state.type == StateType.COMPLETED, f"{run.state}\n{log.read_text()[-3000:]}"
        jobs = json.loads(twin.kubectl("get", "jobs", "-n", NAMESPACE, "-o", "json").stdout)[
            "items"
        ]
        [job] = [
            j for j in jobs if j["metadata"]["labels"].get("prefect.io/flow-run-id") == str(run.id)
        ]
        pod_spec: dict[str, Any] = job["spec"]["template"]["spec"]
        assert pod_spec["hostNetwork"] is True
        container = pod_spec["containers"][0]
        assert not [e for e in container.get("env") or [] if "value" in e], container["env"]
        [secret_ref] = [s["secretRef"]["name"] for s in container["envFrom"]]
        secret = json.loads(
            twin.kubectl("get", "secret", secret_ref, "-n", NAMESPACE, "-o", "json").stdout
        )
        assert "PREFECT_API_URL" in secret["data"]
        print(f"flow run as a Job: {elapsed:.1f}s from worker start to Completed")
    finally:
        stop_pid(pid)
