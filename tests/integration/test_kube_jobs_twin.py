"""What the prefect-kubernetes worker and its observer call, against the twin running real
containers, through the real ``kubernetes_asyncio`` client:

- a Secret written with ``stringData`` and a Job whose pod takes its env from it
  (``envFrom.secretRef``: the worker's ``store_env_as_secret``);
- ``hostNetwork: true``: the pod reaches a server on the host's 127.0.0.1;
- pods listed and watched across the cluster by the observer's label selector
  (``prefect.io/flow-run-id``, a bare key), logs, core/v1 Events of the pod and the Job;
- the worker's cancel: ``delete_namespaced_job(grace_period_seconds=, propagation_policy=
  "Foreground")``: SIGTERM first, SIGKILL only after the grace period, the Job gone last.

One small busybox image, no registry, no Prometheus; about 20 s.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes_asyncio import client, config, watch

from sandbox.engine import BUSYBOX_IMAGE, ensure_base_images
from sandbox.runtime import cleanup, state_label
from tests.fixtures_kube import KubeTwin, start_kube_twin

NAMESPACE = "robotics-cd"
LABEL = "prefect.io/flow-run-id"
DEADLINE = 60.0


class HostServer:
    """A server on the host's 127.0.0.1 that records the paths pods ask for."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.changed = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server.changed:
                    server.paths.append(self.path)
                    server.changed.notify_all()
                body = f"host saw {self.path}\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_for(self, path: str, timeout: float = DEADLINE) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: path in self.paths, timeout=timeout):
                raise AssertionError(f"no request for {path} in {timeout:.0f}s: {self.paths}")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def jobs_twin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeTwin]:
    ensure_base_images()
    state = tmp_path_factory.mktemp("jobs-twin")
    config_ = {
        "components": ["sandbox.kube.api", "sandbox.runtime"],
        "resync_seconds": 1,
        "load": {"enabled": False},
        "graceful_deletion": True,
    }
    try:
        with start_kube_twin(state, **config_) as twin:
            yield twin
    finally:
        cleanup(state_label(state))


@pytest.fixture
def host() -> Iterator[HostServer]:
    server = HostServer()
    yield server
    server.close()


@contextlib.asynccontextmanager
async def kube_api(twin: KubeTwin) -> AsyncIterator[client.ApiClient]:
    """A real kubernetes_asyncio client from the twin's kubeconfig, the namespace made."""
    api_client = await config.new_client_from_config(config_file=str(twin.kubeconfig))
    try:
        try:
            await client.CoreV1Api(api_client).create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE))
            )
        except client.ApiException as exc:
            if exc.status != 409:
                raise
        yield api_client
    finally:
        await api_client.close()


def flow_run_job(
    run_id: str, script: str, *, grace: int = 30, env_secret: str | None = None
) -> dict[str, Any]:
    """A Job shaped as the worker's base job template makes it (labels on the Job and its
    pod template, restartPolicy Never, backoffLimit 0), with host networking."""
    labels = {LABEL: run_id, "prefect.io/flow-run-name": f"run-{run_id[:8]}"}
    container: dict[str, Any] = {
        "name": "prefect-job",
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", script],
    }
    if env_secret:
        container["envFrom"] = [{"secretRef": {"name": env_secret}}]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": "run-", "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "hostNetwork": True,
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": grace,
                    "containers": [container],
                },
            },
        },
    }


async def pod_events_until(
    core: client.CoreV1Api, run_id: str, done: Any, timeout: float = DEADLINE
) -> list[tuple[str, dict[str, Any]]]:
    """Watch pods cluster-wide by the observer's selector until ``done(type, pod)``."""
    seen: list[tuple[str, dict[str, Any]]] = []
    w = watch.Watch()
    async with asyncio.timeout(timeout):
        async for event in w.stream(
            core.list_pod_for_all_namespaces,
            label_selector=LABEL,
            timeout_seconds=int(timeout),
        ):
            pod = event["raw_object"]
            if pod["metadata"]["labels"].get(LABEL) != run_id:
                continue
            seen.append((event["type"], pod))
            if done(event["type"], pod):
                w.stop()
                return seen
    raise AssertionError(f"the watch ended before the pod was done: {[t for t, _ in seen]}")


def terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = (status.get("state") or {}).get("terminated")
        if state:
            return dict(state)
    return None


async def test_a_flow_run_job_on_host_network_with_env_from_a_secret(
    jobs_twin: KubeTwin, host: HostServer
) -> None:
    async with kube_api(jobs_twin) as api:
        await _flow_run_job_on_host_network(api, host)


async def _flow_run_job_on_host_network(api: client.ApiClient, host: HostServer) -> None:
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    run_id = str(uuid.uuid4())
    secret = await core.create_namespaced_secret(
        NAMESPACE,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=f"run-env-{run_id[:8]}", labels={LABEL: run_id}),
            string_data={"RUN_TOKEN": f"token-{run_id[:8]}"},
        ),
    )
    assert secret.data == {"RUN_TOKEN": base64.b64encode(f"token-{run_id[:8]}".encode()).decode()}
    script = f"wget -q -O- {host.url('/run/')}$RUN_TOKEN && echo flow run finished"
    job = await batch.create_namespaced_job(
        NAMESPACE,
        # The client serializes a dict as it is, and the worker sends its job manifest as one;
        # the stub only admits a V1Job.
        flow_run_job(run_id, script, env_secret=secret.metadata.name),  # type: ignore[arg-type]
    )

    seen = await pod_events_until(
        core, run_id, lambda _t, pod: pod["status"].get("phase") in ("Succeeded", "Failed")
    )
    pod = seen[-1][1]
    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    assert pod["status"]["podIP"] == "127.0.0.1"
    assert pod["spec"]["nodeName"] == "twin-node"
    host.wait_for(f"/run/token-{run_id[:8]}", timeout=5)

    name = pod["metadata"]["name"]
    logs = await core.read_namespaced_pod_log(name, NAMESPACE, container="prefect-job")
    assert f"host saw /run/token-{run_id[:8]}" in logs
    assert "flow run finished" in logs

    async def job_complete() -> Any:
        while True:
            current = await batch.read_namespaced_job(job.metadata.name, NAMESPACE)
            if current.status.succeeded:
                return current
            await asyncio.sleep(0.2)

    async with asyncio.timeout(DEADLINE):
        done = await job_complete()
    assert any(c.type == "Complete" and c.status == "True" for c in done.status.conditions)

    pod_events = await core.list_namespaced_event(
        NAMESPACE, field_selector=f"involvedObject.name={name}"
    )
    reasons = [e.reason for e in pod_events.items]
    assert {"Scheduled", "Pulled", "Created", "Started"} <= set(reasons), reasons
    job_events = await core.list_namespaced_event(
        NAMESPACE, field_selector=f"involvedObject.name={job.metadata.name},involvedObject.kind=Job"
    )
    in_order = sorted(job_events.items, key=lambda e: int(e.metadata.resource_version))
    assert [e.reason for e in in_order] == ["SuccessfulCreate", "Completed"]


@pytest.mark.parametrize("stubborn", [False, True], ids=["exits-on-sigterm", "ignores-sigterm"])
async def test_the_workers_cancel_terminates_gracefully_then_kills(
    jobs_twin: KubeTwin, host: HostServer, stubborn: bool
) -> None:
    """The worker cancels a run by deleting its Job (Foreground, grace period): the pod gets
    SIGTERM and, if it does not exit, SIGKILL after the grace period; then the Job goes."""
    async with kube_api(jobs_twin) as api:
        await _cancel(api, host, stubborn)


async def _cancel(api: client.ApiClient, host: HostServer, stubborn: bool) -> None:
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    run_id = str(uuid.uuid4())
    on_term = f"wget -q -O- {host.url('/term/' + run_id)}" + ("" if stubborn else "; exit 0")
    script = (
        f"trap '{on_term}' TERM; wget -q -O- {host.url('/started/' + run_id)}; "
        "while true; do sleep 0.2; done"
    )
    grace = 3
    job = await batch.create_namespaced_job(
        NAMESPACE,
        flow_run_job(run_id, script, grace=60),  # type: ignore[arg-type]  # a dict, as above
    )
    await asyncio.to_thread(host.wait_for, f"/started/{run_id}")

    deleted_at = time.monotonic()
    await batch.delete_namespaced_job(
        job.metadata.name,
        NAMESPACE,
        grace_period_seconds=grace,
        propagation_policy="Foreground",
    )
    marked = await batch.read_namespaced_job(job.metadata.name, NAMESPACE)
    assert marked.metadata.deletion_timestamp is not None
    assert marked.metadata.finalizers == ["foregroundDeletion"]

    seen = await pod_events_until(core, run_id, lambda t, _pod: t == "DELETED")
    gone_after = time.monotonic() - deleted_at
    await asyncio.to_thread(host.wait_for, f"/term/{run_id}", 5)  # SIGTERM came first
    final = next(s for s in (terminated(p) for _t, p in reversed(seen)) if s is not None)
    if stubborn:
        assert final["exitCode"] == 137, final  # SIGKILL, after the grace period
        assert gone_after >= grace, gone_after
    else:
        assert final["exitCode"] == 0, final
    assert gone_after < grace + 20, gone_after

    async def job_gone() -> None:
        while True:
            try:
                await batch.read_namespaced_job(job.metadata.name, NAMESPACE)
            except client.ApiException as exc:
                if exc.status == 404:
                    return
                raise
            await asyncio.sleep(0.2)

    async with asyncio.timeout(10):
        await job_gone()
    events = await core.list_namespaced_event(
        NAMESPACE, field_selector=f"involvedObject.name={seen[-1][1]['metadata']['name']}"
    )
    assert "Killing" in [e.reason for e in events.items]
