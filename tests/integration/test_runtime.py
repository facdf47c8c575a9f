"""The twin's runtime on real parts: pods are Docker containers of images pulled from a real
registry, the ingress router splits traffic as ingress-nginx does, and a real Prometheus
scrapes the metrics. Driven through the twin's Kubernetes API with kubectl."""

from __future__ import annotations

import functools
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from sandbox.faults import FaultClient
from sandbox.procs import free_port
from sandbox.runtime import cleanup, state_label
from sandbox.runtime.engine import network_name
from tests.fixtures_kube import KUBECTL, start_kube_twin
from tests.fixtures_runtime import (
    WEB_LOCAL,
    RuntimeTwin,
    ingress,
    namespace,
    service,
    web_deployment,
)

pytestmark = pytest.mark.integration


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return {}


def _available(rt: RuntimeTwin, name: str, ns: str, replicas: int) -> dict[str, Any] | None:
    dep = rt.get("deployment", name, ns)
    status = dep.get("status") or {}
    done = (
        status.get("observedGeneration") == dep["metadata"]["generation"]
        and status.get("updatedReplicas", 0) == replicas
        and status.get("availableReplicas", 0) == replicas
        and status.get("replicas", 0) == replicas
        and _condition(dep, "Available").get("status") == "True"
        and _condition(dep, "Progressing").get("reason") == "NewReplicaSetAvailable"
    )
    return dep if done else None


def test_deployment_available_routed_and_rolled(runtime_twin: RuntimeTwin) -> None:
    rt = runtime_twin
    images = rt.images
    rt.apply(
        namespace("staging"),
        web_deployment("web", "staging", images.web_v1, replicas=2),
        service("web", "staging", {"app": "web"}),
        ingress(
            "web",
            "staging",
            "web.example.test",
            "web",
            annotations={
                "sandbox.robotics.dev/load": "20",
                "sandbox.robotics.dev/load-paths": "/cgi-bin/status",
            },
        ),
    )
    rt.wait_for(
        "web Available with 2 replicas", lambda: _available(rt, "web", "staging", 2), timeout=60
    )

    # The pods are real containers answering through the router, on the Service name too.
    answer = httpx.get(
        f"{rt.router('staging')}/cgi-bin/status", headers={"Host": "web.example.test"}, timeout=10
    )
    assert answer.status_code == 200
    assert "version=v1" in answer.text
    ingress_obj = rt.get("ingress", "web", "staging")
    assert ingress_obj["status"]["loadBalancer"]["ingress"] == [
        {"ip": "127.0.0.1", "ports": [{"port": rt.ingress_ports["staging"], "protocol": "TCP"}]}
    ]
    client = docker.from_env()
    try:
        pods = rt.kube.kubectl(
            "get", "pods", "-n", "staging", "-l", "app=web", "-o", "name"
        ).stdout.split()
        assert len(pods) == 2
        pod_name = pods[0].split("/", 1)[1]
        container = client.containers.get(rt.container("staging", pod_name))
        assert container.status == "running"
        assert container.attrs["HostConfig"]["NanoCpus"] == 200_000_000
        # In-cluster name resolution: a pod reaches the Service by name on the namespace network.
        out = container.exec_run(["wget", "-qO-", "http://web:8000/cgi-bin/status"])
        assert out.exit_code == 0, out.output
        assert b"version=v1" in out.output
    finally:
        client.close()

    # A new image rolls the pods over; the rollout status is in the Deployment's status.
    # (replace: the API twin serves strategic merge patches as merge patches, which would
    # drop the container's other fields on a client-side apply.)
    # Under the synthetic load, the rollout (surge 1, unavailable 0) drops no request.
    served, failed = (
        _requests(rt, 'namespace="staging"', 'ingress="web"'),
        _requests(rt, 'namespace="staging"', 'ingress="web"', 'status="5'),
    )
    rt.apply(web_deployment("web", "staging", images.web_v2, replicas=2), verb="replace")
    dep = rt.wait_for("web rolled to v2", lambda: _available(rt, "web", "staging", 2), timeout=90)
    client = docker.from_env()
    try:
        rt.wait_for(
            "old pods drained and their containers gone",
            lambda: (
                len(
                    client.containers.list(
                        all=True,
                        sparse=True,
                        filters={
                            "name": "twin-staging-web-",
                            "label": f"robotics-cd.sandbox={rt.label}",
                        },
                    )
                )
                == 2
            ),
            timeout=30,
        )
    finally:
        client.close()
    assert _requests(rt, 'namespace="staging"', 'ingress="web"') > served
    errors = {
        code: _requests(rt, 'namespace="staging"', 'ingress="web"', f'status="{code}"')
        for code in (502, 503, 504)
    }
    assert _requests(rt, 'namespace="staging"', 'ingress="web"', 'status="5') == failed, errors
    with FaultClient(rt.control_url) as faults:
        faults.stop_load("staging", "web.example.test")
    assert dep["metadata"]["generation"] == 2
    rs = rt.kube.kubectl("get", "rs", "-n", "staging", "-o", "json").stdout
    assert '"deployment.kubernetes.io/revision": "2"' in rs
    for _ in range(5):
        answer = httpx.get(
            f"{rt.router('staging')}/cgi-bin/status",
            headers={"Host": "web.example.test"},
            timeout=10,
        )
        assert "version=v2" in answer.text
    rollout = rt.kube.kubectl(
        "rollout", "status", "deployment/web", "-n", "staging", "--timeout=10s"
    )
    assert "successfully rolled out" in rollout.stdout


def test_never_ready_template_exceeds_progress_deadline(runtime_twin: RuntimeTwin) -> None:
    rt = runtime_twin
    rt.apply(
        namespace("staging"),
        web_deployment(
            "stuck", "staging", rt.images.web_v1, probe_path="/not-there", progress_deadline=4
        ),
    )

    def exceeded() -> dict[str, Any]:
        dep = rt.get("deployment", "stuck", "staging")
        cond = _condition(dep, "Progressing")
        return cond if cond.get("reason") == "ProgressDeadlineExceeded" else {}

    cond = rt.wait_for("stuck ProgressDeadlineExceeded", exceeded, timeout=20)
    assert cond["status"] == "False"
    assert "has timed out progressing" in cond["message"]
    dep = rt.get("deployment", "stuck", "staging")
    assert _condition(dep, "Available")["status"] == "False"
    assert dep["status"].get("readyReplicas", 0) == 0
    # A pod that never gets ready is running but not Ready.
    pods = rt.kube.kubectl("get", "pods", "-n", "staging", "-l", "app=stuck", "-o", "json").stdout
    assert '"phase": "Running"' in pods

    # Scaled to zero (what a rollback does to a canary), it runs nothing and is healthy.
    rt.kube.kubectl("scale", "deployment/stuck", "-n", "staging", "--replicas=0")
    dep = rt.wait_for(
        "stuck healthy at 0 replicas", lambda: _available(rt, "stuck", "staging", 0), timeout=20
    )
    assert _condition(dep, "Available")["status"] == "True"
    rt.wait_for("stuck's pod gone", lambda: not _pods(rt, "staging", "app=stuck"), timeout=20)


def _pods(rt: RuntimeTwin, ns: str, selector: str) -> list[dict[str, Any]]:
    out = rt.kube.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json").stdout
    return list(json.loads(out)["items"])


def _requests(rt: RuntimeTwin, *fragments: str) -> float:
    """Sum of the router's request counters whose labels contain every fragment."""
    text = httpx.get(f"{rt.control_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("nginx_ingress_controller_requests{")
        and all(f in line for f in fragments)
    )


def _canary_setup(
    rt: RuntimeTwin, weight: int, *, canary_env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    host = "shop.example.test"
    stable = {"app": "shop", "track": "stable"}
    canary = {"app": "shop", "track": "canary"}
    return [
        namespace("production"),
        web_deployment("shop", "production", rt.images.web_v1, labels=stable),
        web_deployment(
            "shop-canary", "production", rt.images.web_v2, labels=canary, env=canary_env
        ),
        service("shop", "production", stable),
        service("shop-canary", "production", canary),
        ingress(
            "shop",
            "production",
            host,
            "shop",
            annotations={
                "sandbox.robotics.dev/load": "20",
                "sandbox.robotics.dev/load-paths": "/cgi-bin/status",
            },
        ),
        ingress(
            "shop-canary",
            "production",
            host,
            "shop-canary",
            annotations={
                "nginx.ingress.kubernetes.io/canary": "true",
                "nginx.ingress.kubernetes.io/canary-weight": str(weight),
                "nginx.ingress.kubernetes.io/canary-by-header": "X-Canary",
            },
        ),
    ]


def test_canary_weight_header_and_5xx_in_prometheus(runtime_twin: RuntimeTwin) -> None:
    rt = runtime_twin
    rt.apply(*_canary_setup(rt, 20))
    for name in ("shop", "shop-canary"):
        rt.wait_for(
            f"{name} Available",
            functools.partial(_available, rt, name, "production", 1),
            timeout=60,
        )
    url = f"{rt.router('production')}/cgi-bin/status"
    host = {"Host": "shop.example.test"}

    with httpx.Client(timeout=10) as client:
        with ThreadPoolExecutor(max_workers=8) as pool:
            versions = list(
                pool.map(lambda _: client.get(url, headers=host).text.split()[0], range(500))
            )
        assert set(versions) == {"version=v1", "version=v2"}
        share = versions.count("version=v2") / len(versions)
        assert 0.15 <= share <= 0.25, f"canary got {share:.1%} of 500 requests at weight 20"
        # canary-by-header wins over the weight, both ways.
        assert all(
            client.get(url, headers={**host, "X-Canary": "always"}).text.startswith("version=v2")
            for _ in range(10)
        )
        assert all(
            client.get(url, headers={**host, "X-Canary": "never"}).text.startswith("version=v1")
            for _ in range(10)
        )
        # Latency injected on the canary track shows in its responses only.
        with FaultClient(rt.control_url) as faults:
            faults.add_latency("production", 0.3, track="canary")
            try:
                slow = client.get(url, headers={**host, "X-Canary": "always"})
                fast = client.get(url, headers={**host, "X-Canary": "never"})
            finally:
                faults.clear_latency()
        assert slow.elapsed.total_seconds() >= 0.3 > fast.elapsed.total_seconds()

    # Metrics carry ingress-nginx's labels: canary traffic has a non-empty canary label.
    metrics = httpx.get(f"{rt.control_url}/metrics", timeout=10).text
    assert 'canary="production-shop-canary-80"' in metrics
    assert "nginx_ingress_controller_request_duration_seconds_bucket{" in metrics

    # The canary starts answering 500: the synthetic load makes it visible in Prometheus.
    # (The stable track answered 503 while no pod was ready yet: only later 5xx count.)
    stable_5xx = _requests(rt, 'ingress="shop"', 'canary=""', 'status="5')
    rt.apply(
        web_deployment(
            "shop-canary",
            "production",
            rt.images.web_v2,
            labels={"app": "shop", "track": "canary"},
            env={"STATUS_CODE": "500"},
        ),
        verb="replace",
    )
    rt.wait_for(
        "canary rolled to the failing version",
        lambda: _available(rt, "shop-canary", "production", 1),
        timeout=60,
    )
    promql = 'sum(rate(nginx_ingress_controller_requests{canary!="",status=~"5.."}[15s])) > 0'
    rt.wait_for("5xx of the canary in Prometheus", lambda: rt.query(promql), timeout=15)
    assert _requests(rt, 'ingress="shop"', 'canary=""', 'status="5') == stable_5xx

    # Stopping the load stops the traffic.
    with FaultClient(rt.control_url) as faults:
        faults.stop_load("production", "shop.example.test")
        try:

            def count() -> float:
                return _requests(rt, 'host="shop.example.test"')

            def quiet_for_a_second() -> bool:
                before = count()
                time.sleep(1.0)  # a measurement window: 20 rps would add ~20 requests
                return count() == before

            rt.wait_for("load stopped", quiet_for_a_second, timeout=8)
        finally:
            faults.start_load("production", "shop.example.test")


def _pod(name: str, ns: str, image: str, command: list[str], restart: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {
            "restartPolicy": restart,
            "containers": [{"name": "main", "image": image, "command": command}],
        },
    }


def test_crashing_container_counts_restarts(runtime_twin: RuntimeTwin) -> None:
    rt = runtime_twin
    serve = ["httpd", "-f", "-p", "8000", "-h", "/www"]
    crasher = _pod(
        "crasher", "staging", rt.images.web_v1, ["sh", "-c", "sleep 0.5; exit 3"], "Always"
    )
    # A healthy pod, to be crash-looped by fault injection.
    victim = _pod("victim", "staging", rt.images.web_v1, serve, "Always")
    # A pod whose liveness probe fails.
    dying = _pod("dying", "staging", rt.images.web_v1, serve, "Always")
    dying["spec"]["containers"][0]["ports"] = [{"containerPort": 8000}]
    dying["spec"]["containers"][0]["livenessProbe"] = {
        "httpGet": {"path": "/missing", "port": 8000},
        "periodSeconds": 1,
        "failureThreshold": 2,
    }
    rt.apply(namespace("staging"), crasher, victim, dying)

    def restarts(pod: str) -> int:
        status = rt.get("pod", pod, "staging").get("status") or {}
        return int(((status.get("containerStatuses") or [{}])[0]).get("restartCount", 0))

    rt.wait_for(
        "victim running",
        lambda: rt.get("pod", "victim", "staging")["status"].get("phase") == "Running",
        timeout=30,
    )
    with FaultClient(rt.control_url) as faults:
        faults.crash_pod("staging", "victim", count=2)

    rt.wait_for("crasher restarted twice", lambda: restarts("crasher") >= 2, timeout=30)
    status = rt.get("pod", "crasher", "staging")["status"]["containerStatuses"][0]
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert status["lastState"]["terminated"]["reason"] == "Error"
    metric = 'kube_pod_container_status_restarts_total{namespace="staging",pod="crasher",container="main"}'
    rt.wait_for("restarts in Prometheus", lambda: rt.query(f"{metric} >= 2"), timeout=15)
    rt.wait_for("victim restarted by the fault", lambda: restarts("victim") >= 2, timeout=30)
    rt.wait_for("dying restarted by its liveness probe", lambda: restarts("dying") >= 1, timeout=30)

    rt.kube.kubectl("delete", "pod", "crasher", "victim", "dying", "-n", "staging")
    client = docker.from_env()
    try:
        rt.wait_for(
            "crasher's container removed with its pod",
            lambda: (
                not client.containers.list(
                    all=True, sparse=True, filters={"name": rt.container("staging", "crasher")}
                )
            ),
            timeout=15,
        )
    finally:
        client.close()


def _job(
    name: str, ns: str, image: str, code: int, backoff_limit: int, script: str = ""
) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": image,
                            "command": ["sh", "-c", f"{script}exit {code}"],
                        }
                    ],
                }
            },
        },
    }


def test_jobs_complete_or_fail_after_backoff_limit(runtime_twin: RuntimeTwin) -> None:
    rt = runtime_twin
    rt.apply(
        namespace("staging"),
        _job("ok-job", "staging", rt.images.web_v1, 0, 2),
        _job("bad-job", "staging", rt.images.web_v1, 1, 1),
    )

    def finished(name: str) -> dict[str, Any] | None:
        job = rt.get("job", name, "staging")
        for cond in job.get("status", {}).get("conditions") or []:
            if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
                return job
        return None

    ok = rt.wait_for("ok-job finished", lambda: finished("ok-job"), timeout=30)
    assert _condition(ok, "Complete")["status"] == "True"
    assert ok["status"]["succeeded"] == 1
    assert "completionTime" in ok["status"]
    bad = rt.wait_for("bad-job finished", lambda: finished("bad-job"), timeout=40)
    failed = _condition(bad, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"
    # backoffLimit 1: the first pod and one retry, both failed.
    assert bad["status"]["failed"] == 2
    pods = rt.kube.kubectl(
        "get", "pods", "-n", "staging", "-l", "job-name=bad-job", "-o", "json"
    ).stdout
    assert pods.count('"phase": "Failed"') == 2


def test_volumes_env_sources_and_logs(
    runtime_twin: RuntimeTwin,
) -> None:
    rt = runtime_twin
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "namespace": "staging"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    writer = _job("writer", "staging", rt.images.web_v1, 0, 0, "echo kept > /data/note; ")
    reader = _job(
        "reader",
        "staging",
        rt.images.web_v1,
        0,
        0,
        "echo read: $(cat /data/note) $(cat /cfg/greeting) $TOKEN; ",
    )
    for job in (writer, reader):
        pod_spec = job["spec"]["template"]["spec"]
        pod_spec["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
        pod_spec["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    reader_spec = reader["spec"]["template"]["spec"]
    reader_spec["volumes"].append({"name": "cfg", "configMap": {"name": "greetings"}})
    reader_spec["containers"][0]["volumeMounts"].append({"name": "cfg", "mountPath": "/cfg"})
    reader_spec["containers"][0]["env"] = [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}
    ]
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "greetings", "namespace": "staging"},
        "data": {"greeting": "hello"},
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "creds", "namespace": "staging"},
        "stringData": {"token": "t0ken"},
    }
    rt.apply(namespace("staging"), claim, writer, config_map, secret)
    rt.wait_for(
        "claim bound",
        lambda: rt.get("pvc", "data", "staging").get("status", {}).get("phase") == "Bound",
        timeout=15,
    )
    rt.wait_for(
        "writer complete",
        lambda: rt.get("job", "writer", "staging").get("status", {}).get("succeeded") == 1,
        timeout=30,
    )
    rt.apply(reader)
    rt.wait_for(
        "reader complete",
        lambda: rt.get("job", "reader", "staging").get("status", {}).get("succeeded") == 1,
        timeout=30,
    )
    (pod,) = _pods(rt, "staging", "job-name=reader")
    logs = rt.kube.kubectl("logs", "-n", "staging", pod["metadata"]["name"]).stdout
    assert logs.strip() == "read: kept hello t0ken"
    # Following the log of a finished container ends with it.
    followed = rt.kube.kubectl("logs", "-f", "-n", "staging", pod["metadata"]["name"], timeout=20)
    assert followed.stdout == logs


def test_init_containers_run_first_and_a_failed_one_fails_the_pod(
    runtime_twin: RuntimeTwin,
) -> None:
    rt = runtime_twin
    image = rt.images.web_v1
    good = _pod("initialized", "staging", image, ["cat", "/work/flag"], "Never")
    good["spec"]["volumes"] = [{"name": "work", "emptyDir": {}}]
    good["spec"]["initContainers"] = [
        {
            "name": "prepare",
            "image": image,
            "command": ["sh", "-c", "echo prepared > /work/flag"],
            "volumeMounts": [{"name": "work", "mountPath": "/work"}],
        }
    ]
    good["spec"]["containers"][0]["volumeMounts"] = [{"name": "work", "mountPath": "/work"}]
    bad = _pod("uninitialized", "staging", image, ["true"], "Never")
    bad["spec"]["initContainers"] = [{"name": "prepare", "image": image, "command": ["false"]}]
    rt.apply(namespace("staging"), good, bad)

    def phase(name: str) -> str:
        return str(rt.get("pod", name, "staging").get("status", {}).get("phase", ""))

    rt.wait_for("initialized Succeeded", lambda: phase("initialized") == "Succeeded", timeout=30)
    assert rt.kube.kubectl("logs", "-n", "staging", "initialized").stdout.strip() == "prepared"
    init = rt.get("pod", "initialized", "staging")["status"]["initContainerStatuses"][0]
    assert init["state"]["terminated"]["exitCode"] == 0
    rt.wait_for("uninitialized Failed", lambda: phase("uninitialized") == "Failed", timeout=30)
    status = rt.get("pod", "uninitialized", "staging")["status"]
    assert _condition(rt.get("pod", "uninitialized", "staging"), "Initialized")["status"] == "False"
    assert status["containerStatuses"][0]["state"] == {"waiting": {"reason": "PodInitializing"}}


def test_same_host_in_two_namespaces_does_not_collide(runtime_twin: RuntimeTwin) -> None:
    rt = runtime_twin
    host = "same.example.test"
    for ns in ("staging", "production"):
        rt.apply(
            namespace(ns),
            web_deployment("same", ns, rt.images.web_v1, env={"VERSION": ns}),
            service("same", ns, {"app": "same"}),
            ingress("same", ns, host, "same"),
        )
    for ns in ("staging", "production"):
        rt.wait_for(
            f"same Available in {ns}", functools.partial(_available, rt, "same", ns, 1), timeout=60
        )
    for ns in ("staging", "production"):
        for _ in range(5):
            answer = httpx.get(
                f"{rt.router(ns)}/cgi-bin/status", headers={"Host": host}, timeout=10
            )
            assert answer.text.startswith(f"version={ns} "), answer.text


def test_deleting_a_namespace_removes_its_containers_and_network(runtime_twin: RuntimeTwin) -> None:
    rt = runtime_twin
    rt.apply(
        namespace("scratch"), _pod("temp", "scratch", rt.images.web_v1, ["sleep", "600"], "Always")
    )
    rt.wait_for(
        "temp running",
        lambda: rt.get("pod", "temp", "scratch")["status"].get("phase") == "Running",
        timeout=30,
    )
    client = docker.from_env()
    network = network_name(rt.label, "scratch")
    try:
        assert client.networks.list(names=[network])
        rt.kube.kubectl("delete", "namespace", "scratch", timeout=60)
        rt.wait_for(
            "scratch's container and network gone",
            lambda: (
                not client.containers.list(
                    all=True, sparse=True, filters={"name": rt.container("scratch", "temp")}
                )
                and not [n for n in client.networks.list(names=[network]) if n.name == network]
            ),
            timeout=30,
        )
    finally:
        client.close()


def test_cleanup_leaves_nothing(tmp_path: Path, runtime_twin: RuntimeTwin) -> None:
    """A second sandbox without a registry runs a local image; ``cleanup`` removes all it made."""
    state = tmp_path / "twin"
    label = state_label(state)
    config = {
        "argocd_port": free_port(),
        "github_port": free_port(),
        "git_base": str(tmp_path / "git"),
    }
    pod = _pod(
        "lonely",
        "default",
        f"{WEB_LOCAL}:v1",
        ["httpd", "-f", "-p", "8000", "-h", "/www"],
        "Always",
    )
    pod["spec"]["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "scratch", "mountPath": "/scratch"}]
    client = docker.from_env()
    flt = {"label": f"robotics-cd.sandbox={label}"}
    try:
        with start_kube_twin(state, **config) as kube:
            subprocess.run(
                [str(KUBECTL), f"--kubeconfig={kube.kubeconfig}", "create", "-f", "-"],
                input=json.dumps(pod),
                text=True,
                check=True,
                capture_output=True,
            )
            runtime_twin.wait_for(
                "lonely pod running",
                lambda: [
                    c
                    for c in client.containers.list(sparse=True, filters=flt)
                    if c.attrs["State"] == "running"
                ],
                timeout=30,
            )
            assert client.networks.list(filters=flt)
            assert client.volumes.list(filters=flt)
        removed = cleanup(label)
        assert removed["containers"] == 1
        assert not client.containers.list(all=True, sparse=True, filters=flt)
        assert not client.networks.list(filters=flt)
        assert not client.volumes.list(filters=flt)
    finally:
        cleanup(label)
        client.close()
