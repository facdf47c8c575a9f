"""The kubelet of the twin: every Pod object runs as real Docker containers.

One worker per pod, as the real kubelet has: it pulls the images (with the sandbox
registry's credentials), creates one container per container of the pod on the
namespace's network with the pod's DNS aliases (pod name, hostname[.subdomain], the names of
the Services selecting it), runs init containers first (one at a time, to
success), restarts exited containers per ``restartPolicy`` with exponential back-off, runs
readiness and liveness probes (httpGet, tcpSocket, exec) through the ports published on
127.0.0.1, and writes ``status`` (phase, conditions, containerStatuses,
initContainerStatuses) the way the kubelet does. Volumes: emptyDir, configMap and secret
(files copied in) are per-pod Docker volumes removed with the pod; a PVC is a Docker volume
named after the claim, kept. Env: value, valueFrom (fieldRef, configMapKeyRef,
secretKeyRef), envFrom, ``$(VAR)`` expansion.

With ``graceful_deletion`` on (twin config), the kubelet binds each pod it runs to its node
(``spec.nodeName: twin-node``, as the scheduler would), so the API deletes it gracefully: on ``deletionTimestamp`` it stops the
containers (SIGTERM, or the image's STOPSIGNAL, then SIGKILL after
``deletionGracePeriodSeconds``), writes their final state, and removes the pod. A
``hostNetwork: true`` pod runs in the host's network namespace, so it reaches services on
127.0.0.1 as a node's host-network pod reaches the node's; its pod IP is 127.0.0.1 and its
ports are not published (they are the host's). It records core/v1 Events (Scheduled,
Pulled, Created, Started, Failed, Killing).

Not modelled: a Service port different from its targetPort *inside* the cluster (names
resolve straight to pod addresses, so in-cluster clients use the container port; the
router does map Service ports), hostPath/projected/downwardAPI volumes. Probes run at ``min(periodSeconds, 2)``
(faster than a real node, so tests wait less) with a timeout of at least 2 s (slower, so an
overloaded machine does not flap healthy pods).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from sandbox.faults import FaultRegistry
from sandbox.runtime import events
from sandbox.runtime.config import RuntimeConfig
from sandbox.runtime.engine import (
    CONTAINER_LABEL,
    POD_NAME_LABEL,
    POD_NS_LABEL,
    POD_UID_LABEL,
    ContainerFailed,
    ContainerSpec,
    Engine,
    EventStream,
    LogStream,
    PullFailed,
    host_ports,
    in_thread,
    network_aliases,
    network_ip,
)
from sandbox.runtime.objects import (
    JSON,
    annotations_of,
    docker_time,
    labels_of,
    now_iso,
    parse_time,
    quantity,
    service_selects,
    set_condition,
)

log = logging.getLogger("sandbox.runtime.kubelet")

PodKey = tuple[str, str]  # namespace, name
# How often a pod whose containers all run and are ready is re-checked (probes).
STEADY_SECONDS = 2.0
# At most how long a deleted ready pod keeps running after it left the router's endpoints
# (its terminationGracePeriodSeconds if shorter).
DRAIN_SECONDS = 5.0
# Where a pod's ports are published on 127.0.0.1, recorded on the pod (see
# Pod.annotate_published_ports); sandbox/prometheus.py relabels __address__ to the second.
PUBLISHED_PORTS_ANNOTATION = "sandbox.robotics.dev/published-ports"
METRICS_ADDRESS_ANNOTATION = "sandbox.robotics.dev/metrics-address"


@dataclass
class PodEndpoint:
    """What the router needs to reach a pod: readiness and its published ports."""

    namespace: str
    name: str
    uid: str
    labels: dict[str, str]
    ready: bool
    ports: dict[int, int]  # containerPort -> 127.0.0.1 port
    port_names: dict[str, int]  # port name -> containerPort


@dataclass
class Probe:
    spec: JSON
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0
    ok: bool = False

    @property
    def period(self) -> float:
        return float(min(self.spec.get("periodSeconds", 10), 2))


@dataclass
class ContainerRun:
    """The kubelet's memory of one container of a pod."""

    spec: JSON
    docker_name: str
    restart_count: int = 0
    last_state: JSON = field(default_factory=dict)
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    next_start: float = 0.0
    backoff: float = 0.0
    seen_finish: str | None = None  # FinishedAt of the exit already counted
    done: bool = False  # terminated and will not be restarted
    image_ref: str | None = None
    image_id: str = ""
    ready: bool = False
    readiness: Probe | None = None
    liveness: Probe | None = None
    info: JSON | None = None


def _env_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion; ``$$`` escapes."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        text,
    )


class PodWorker:
    def __init__(self, kubelet: Kubelet, pod: JSON) -> None:
        self.kubelet = kubelet
        self.namespace = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.uid = pod["metadata"]["uid"]
        self.wake = asyncio.Event()
        self.runs: list[ContainerRun] = []
        self.init_runs: list[ContainerRun] = []
        self.initialized = False
        self.volumes: list[str] = []
        self.prepared = False
        self.started_at: str | None = None
        self.grace_seconds = float((pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
        self.last_status: JSON | None = None
        self.http = kubelet.http
        self.host_network = bool((pod.get("spec") or {}).get("hostNetwork"))

    @property
    def key(self) -> PodKey:
        return (self.namespace, self.name)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Sync until the pod is gone, then remove its containers. A cancelled worker (the
        twin stopping) leaves them running, as a node outlives its API server."""
        try:
            while True:
                pod = self.kubelet.get_pod(self.namespace, self.name)
                if pod is None or pod["metadata"]["uid"] != self.uid:
                    break
                try:
                    delay = await self.sync(pod)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("syncing pod %s/%s failed; retrying", self.namespace, self.name)
                    delay = 2.0
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=delay)
            await self.teardown()
        finally:
            self.kubelet.forget(self)
        successor = self.kubelet.get_pod(self.namespace, self.name)
        if successor is not None:  # a new pod of the same name: its own worker starts now
            self.kubelet.pod_changed(successor)

    async def teardown(self) -> None:
        endpoint = self.kubelet.endpoints.pop(self.key, None)
        if endpoint is not None and endpoint.ready:
            # The router no longer picks this pod; let requests already sent to it finish
            # (a real pod gets SIGTERM and its grace period) before the container goes.
            await asyncio.sleep(min(self.grace_seconds, DRAIN_SECONDS))
        engine = self.kubelet.engine
        for run in self.runs + self.init_runs:
            await in_thread(engine.remove, run.docker_name)
        for volume in self.volumes:
            await in_thread(engine.remove_volume, volume)
        log.info("pod %s/%s removed", self.namespace, self.name)

    # -- one pass --------------------------------------------------------------------------

    async def sync(self, pod: JSON) -> float:
        spec = pod.get("spec") or {}
        if pod["metadata"].get("deletionTimestamp"):
            await self.terminate(pod)
            return 1.0
        if not spec.get("nodeName") and self.kubelet.config.graceful_deletion:
            await self.bind(pod)
            return 0.05
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            # Terminal pods stay as they ended; nothing runs again (as on a real node).
            self.kubelet.endpoints.pop(self.key, None)
            return 5.0
        if not self.prepared:
            await self.prepare(pod)
        policy = spec.get("restartPolicy", "Always")
        aliases = self.kubelet.aliases_for(pod)
        if not self.initialized:
            await self.sync_init(pod, policy, aliases)
        if self.initialized:
            for run in self.runs:
                await self.sync_container(pod, run, policy, aliases)
        self.publish_endpoint(pod)
        await self.annotate_published_ports(pod)
        await self.write_status(pod, policy)
        # Docker's events wake the worker when a container stops or starts, so a steady
        # pod is looked at only for its probes.
        steady = self.initialized and all(
            r.ready and r.waiting is None and r.info is not None and r.info["State"].get("Running")
            for r in self.runs
        )
        soonest = min(
            [STEADY_SECONDS if steady else 1.0]
            + [
                max(0.05, r.next_start - time.monotonic())
                for r in self.runs + self.init_runs
                if r.waiting and not r.done
            ]
        )
        return soonest

    async def bind(self, pod: JSON) -> None:
        """Schedule the pod on the twin's one node, as the scheduler's binding does."""
        from sandbox.kube.store import ApiError

        try:
            self.kubelet.store.patch(
                "v1", "Pod", self.namespace, self.name, {"spec": {"nodeName": events.NODE_NAME}}
            )
        except ApiError as exc:
            if exc.status != 404:
                raise
            return
        events.record(
            self.kubelet.store,
            pod,
            "Scheduled",
            f"Successfully assigned {self.namespace}/{self.name} to {events.NODE_NAME}",
            component="default-scheduler",
        )

    async def terminate(self, pod: JSON) -> None:
        """Graceful deletion: stop every container (SIGTERM, SIGKILL after the grace
        period), record how each ended, then remove the pod object (grace period 0)."""
        from sandbox.kube.store import ApiError

        grace = int(pod["metadata"].get("deletionGracePeriodSeconds") or 0)
        self.grace_seconds = 0.0  # stopped already: teardown does not drain again
        self.kubelet.endpoints.pop(self.key, None)
        engine = self.kubelet.engine
        running = []
        for run in self.runs + self.init_runs:
            info = await in_thread(engine.inspect, run.docker_name)
            if info is not None and info["State"].get("Running"):
                running.append(run)
                events.record(
                    self.kubelet.store,
                    pod,
                    "Killing",
                    f"Stopping container {run.spec['name']}",
                    field_path=f"spec.containers{{{run.spec['name']}}}",
                )
        await asyncio.gather(*(in_thread(engine.stop, run.docker_name, grace) for run in running))
        for run in self.runs + self.init_runs:
            run.info = await in_thread(engine.inspect, run.docker_name)
            run.done = True
            run.ready = False
            run.waiting = None
        if self.prepared:
            await self.write_status(pod, "Never")
        current = self.kubelet.get_pod(self.namespace, self.name)
        if current is None or current["metadata"]["uid"] != self.uid:
            return
        try:
            self.kubelet.store.delete("v1", "Pod", self.namespace, self.name)
        except ApiError as exc:
            if exc.status != 404:
                raise
        log.info("pod %s/%s terminated (grace %ss)", self.namespace, self.name, grace)

    async def sync_init(self, pod: JSON, policy: str, aliases: list[str]) -> None:
        """Init containers run one at a time, each to success, before the app containers;
        a failed one is retried unless the pod's restartPolicy is Never."""
        init_policy = "Never" if policy == "Never" else "OnFailure"
        for run in self.init_runs:
            if run.done:
                if self._failed(run):
                    return  # restartPolicy Never: the pod has failed
                continue
            await self.sync_container(pod, run, init_policy, aliases)
            if not run.done:
                return
            if self._failed(run):
                return
        self.initialized = True

    @staticmethod
    def _failed(run: ContainerRun) -> bool:
        info = run.info or {}
        return int((info.get("State") or {}).get("ExitCode", 0)) != 0

    async def prepare(self, pod: JSON) -> None:
        spec = pod.get("spec") or {}
        engine = self.kubelet.engine
        if not self.host_network:
            await in_thread(engine.ensure_network, engine.network_name(self.namespace))
        self.volumes = await in_thread(self._ensure_volumes, spec)
        old = {c.get("name"): c for c in (pod.get("status") or {}).get("containerStatuses") or []}
        self.runs = []
        for index, container in enumerate(spec.get("containers") or []):
            run = ContainerRun(
                spec=container,
                docker_name=self.kubelet.engine.container_name(
                    self.namespace, self.name, index, container["name"]
                ),
            )
            previous = old.get(container["name"]) or {}
            run.restart_count = int(previous.get("restartCount", 0))
            run.last_state = dict(previous.get("lastState") or {})
            if "readinessProbe" in container:
                run.readiness = Probe(container["readinessProbe"])
            if "livenessProbe" in container:
                run.liveness = Probe(container["livenessProbe"])
            self.runs.append(run)
        self.init_runs = [
            ContainerRun(
                spec=container,
                docker_name=self.kubelet.engine.container_name(
                    self.namespace, self.name, 1, f"init-{container['name']}"
                ),
            )
            for container in spec.get("initContainers") or []
        ]
        # After a twin restart: app containers that exist mean init already finished.
        existing = [await in_thread(engine.inspect, r.docker_name) for r in self.runs]
        self.initialized = not self.init_runs or any(info is not None for info in existing)
        self.started_at = (pod.get("status") or {}).get("startTime") or now_iso()
        self.prepared = True

    def _volume_name(self, volume: JSON) -> str | None:
        """The Docker volume behind a pod volume: a PVC's is named after the claim (data
        outlives the pod); emptyDir, configMap and secret ones belong to the pod."""
        label = self.kubelet.engine.label[:6]
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"].get("claimName", volume["name"])
            return f"twin-{self.namespace}-pvc-{claim}-{label}"
        if (
            "emptyDir" in volume
            or "configMap" in volume
            or "secret" in volume
            or not any(k in volume for k in ("hostPath", "projected", "downwardAPI"))
        ):
            return f"twin-{self.namespace}-{self.name}-{volume['name']}-{self.uid[:8]}"
        return None

    def _volume_files(self, volume: JSON) -> dict[str, tuple[bytes, int]] | None:
        """The files of a configMap or secret volume (path -> (content, mode)), or None."""
        import base64

        from sandbox.kube.store import ApiError

        if "configMap" in volume:
            source, kind, name = volume["configMap"], "ConfigMap", volume["configMap"].get("name")
        elif "secret" in volume:
            source, kind, name = volume["secret"], "Secret", volume["secret"].get("secretName")
        else:
            return None
        try:
            obj = self.kubelet.store.get("v1", kind, self.namespace, name)
        except ApiError as exc:
            if exc.status == 404 and source.get("optional"):
                return {}
            raise ValueError(f'{kind.lower()} "{name}" not found') from exc
        data: dict[str, bytes] = {}
        for key, value in (obj.get("data") or {}).items():
            data[key] = base64.b64decode(value) if kind == "Secret" else str(value).encode()
        for key, value in (obj.get("binaryData") or {}).items():
            data[key] = base64.b64decode(value)
        mode = int(source.get("defaultMode", 0o644))
        items = source.get("items")
        if items:
            return {
                i["path"]: (data.get(i["key"], b""), int(i.get("mode", mode)))
                for i in items
                if i.get("key") in data
            }
        return {key: (value, mode) for key, value in data.items()}

    def _ensure_volumes(self, spec: JSON) -> list[str]:
        """Docker volumes for emptyDir (removed with the pod) and PVCs (kept, by claim)."""
        engine = self.kubelet.engine
        per_pod = []
        for volume in spec.get("volumes") or []:
            name = self._volume_name(volume)
            if name is None:
                continue
            labels = {POD_NS_LABEL: self.namespace}
            if "persistentVolumeClaim" not in volume:
                labels[POD_UID_LABEL] = self.uid
                per_pod.append(name)
            engine.ensure_volume(name, labels)
        return per_pod

    async def sync_container(
        self, pod: JSON, run: ContainerRun, policy: str, aliases: list[str]
    ) -> None:
        engine = self.kubelet.engine
        info = await in_thread(engine.inspect, run.docker_name)
        if info is not None and (info["Config"].get("Labels") or {}).get(POD_UID_LABEL) != self.uid:
            # A container of an earlier pod of the same name: not ours to keep.
            await in_thread(engine.remove, run.docker_name)
            info = None
        run.info = info
        if info is None:
            if not run.done:
                await self.create_and_start(pod, run, aliases)
            return
        state = info["State"]
        if state.get("Running"):
            run.waiting = None
            if self.kubelet.faults.take_crash(self.namespace, self.name):
                log.info("fault: killing %s", run.docker_name)
                await in_thread(engine.kill, run.docker_name)
                return
            if not self.host_network:
                await self.ensure_aliases(run, info, aliases)
            await self.probe(run, info)
            return
        run.ready = False
        if state.get("Status") == "created":
            await self.start_existing(run)
            return
        # Exited (or dead).
        finished = state.get("FinishedAt")
        exit_code = int(state.get("ExitCode", 0))
        if finished != run.seen_finish:
            run.seen_finish = finished
            if run.readiness:
                run.readiness = Probe(run.readiness.spec)
            if run.liveness:
                run.liveness = Probe(run.liveness.spec)
            if policy == "Always" or (policy == "OnFailure" and exit_code != 0):
                run.last_state = {"terminated": self.terminated(info)}
                ran = _seconds_between(state.get("StartedAt"), finished)
                run.backoff = self.kubelet.config.next_backoff(run.backoff, ran)
                run.next_start = time.monotonic() + run.backoff
                run.waiting = (
                    "CrashLoopBackOff",
                    f"back-off {run.backoff:g}s restarting failed container={run.spec['name']} "
                    f"pod={self.name}_{self.namespace}({self.uid})",
                )
            else:
                run.done = True
                run.waiting = None
        if not run.done and time.monotonic() >= run.next_start:
            await self.start_existing(run)
            run.restart_count += 1

    async def create_and_start(self, pod: JSON, run: ContainerRun, aliases: list[str]) -> None:
        if time.monotonic() < run.next_start:
            return
        engine = self.kubelet.engine
        container = run.spec
        policy = container.get("imagePullPolicy") or _default_pull_policy(
            container.get("image", "")
        )
        try:
            run.image_ref = await in_thread(engine.ensure_image, container.get("image", ""), policy)
            run.image_id = await in_thread(engine.image_id, run.image_ref)
        except PullFailed as exc:
            first = run.waiting is None or run.waiting[0] not in (
                "ErrImagePull",
                "ImagePullBackOff",
            )
            run.backoff = self.kubelet.config.next_backoff(run.backoff, 0)
            run.next_start = time.monotonic() + run.backoff
            run.waiting = ("ErrImagePull" if first else "ImagePullBackOff", str(exc))
            if first:
                self._event(pod, run, "Failed", f"Failed to pull image: {exc}", "Warning")
            return
        try:
            spec = self.container_spec(pod, run, aliases)
            await in_thread(engine.create, spec)
            await in_thread(self._project_files, pod, run)
            await in_thread(engine.start, run.docker_name)
        except (ContainerFailed, ValueError) as exc:
            await in_thread(engine.remove, run.docker_name)
            run.backoff = self.kubelet.config.next_backoff(run.backoff, 0)
            run.next_start = time.monotonic() + run.backoff
            run.waiting = ("CreateContainerError", str(exc))
            return
        run.waiting = None
        run.info = await in_thread(engine.inspect, run.docker_name)
        self._event(pod, run, "Pulled", f'Container image "{container.get("image", "")}" ready')
        self._event(pod, run, "Created", f"Created container {container['name']}")
        self._event(pod, run, "Started", f"Started container {container['name']}")

    def _event(
        self, pod: JSON, run: ContainerRun, reason: str, message: str, type_: str = "Normal"
    ) -> None:
        events.record(
            self.kubelet.store,
            pod,
            reason,
            message,
            type_=type_,
            field_path=f"spec.containers{{{run.spec['name']}}}",
        )

    async def start_existing(self, run: ContainerRun) -> None:
        try:
            await in_thread(self.kubelet.engine.start, run.docker_name)
        except ContainerFailed as exc:
            run.waiting = ("RunContainerError", str(exc))
            run.backoff = self.kubelet.config.next_backoff(run.backoff, 0)
            run.next_start = time.monotonic() + run.backoff
            return
        run.waiting = None
        run.info = await in_thread(self.kubelet.engine.inspect, run.docker_name)

    async def ensure_aliases(self, run: ContainerRun, info: JSON, aliases: list[str]) -> None:
        network = self.kubelet.engine.network_name(self.namespace)
        current = set(network_aliases(info, network))
        if set(aliases) <= current:
            return
        log.info("pod %s/%s: aliases now %s", self.namespace, self.name, aliases)
        await in_thread(self.kubelet.engine.set_aliases, run.docker_name, network, aliases)
        run.info = await in_thread(self.kubelet.engine.inspect, run.docker_name)

    def _project_files(self, pod: JSON, run: ContainerRun) -> None:
        """Write configMap/secret volume contents through the created container's mounts."""
        volumes = {v["name"]: v for v in (pod.get("spec") or {}).get("volumes") or []}
        for mount in run.spec.get("volumeMounts") or []:
            volume = volumes.get(mount.get("name"))
            files = self._volume_files(volume) if volume else None
            if files:
                self.kubelet.engine.put_files(run.docker_name, mount["mountPath"], files)

    # -- probes ----------------------------------------------------------------------------

    async def probe(self, run: ContainerRun, info: JSON) -> None:
        started = parse_time(info["State"].get("StartedAt"))
        age = time.time() - started.timestamp() if started else 0.0
        if run.readiness is None:
            run.ready = True
        else:
            run.ready = await self._probe_once(run, run.readiness, info, age, readiness=True)
        if run.liveness is not None:
            alive = await self._probe_once(run, run.liveness, info, age, readiness=False)
            if not alive:
                log.info("liveness probe failed: killing %s", run.docker_name)
                await in_thread(self.kubelet.engine.kill, run.docker_name)

    async def _probe_once(
        self, run: ContainerRun, probe: Probe, info: JSON, age: float, *, readiness: bool
    ) -> bool:
        spec = probe.spec
        initial = not readiness or not probe.ok
        if age < float(spec.get("initialDelaySeconds", 0)) or time.monotonic() < probe.next_at:
            return probe.ok if readiness else True
        probe.next_at = time.monotonic() + probe.period
        success = await self._check(run, spec, info)
        if success:
            probe.successes, probe.failures = probe.successes + 1, 0
            if probe.successes >= int(spec.get("successThreshold", 1)):
                probe.ok = True
        else:
            probe.failures, probe.successes = probe.failures + 1, 0
            if probe.failures >= int(spec.get("failureThreshold", 3)) or (readiness and initial):
                probe.ok = False
        if not readiness:
            return probe.failures < int(spec.get("failureThreshold", 3))
        return probe.ok

    async def _check(self, run: ContainerRun, spec: JSON, info: JSON) -> bool:
        # At least 2 s: on a shared 2-core machine a busybox fork can take over a second,
        # and a probe timing out there would flap pods that are fine.
        timeout = max(float(spec.get("timeoutSeconds", 1)), 2.0)
        ports = self._host_ports(run, info)
        if "httpGet" in spec:
            action = spec["httpGet"]
            port = ports.get(self._port_number(run, action.get("port")))
            if port is None:
                return False
            path = action.get("path", "/")
            headers = {h["name"]: h["value"] for h in action.get("httpHeaders") or []}
            try:
                response = await self.http.get(
                    f"http://127.0.0.1:{port}{path}", headers=headers, timeout=timeout
                )
            except httpx.HTTPError:
                return False
            return 200 <= response.status_code < 400
        if "tcpSocket" in spec:
            port = ports.get(self._port_number(run, spec["tcpSocket"].get("port")))
            if port is None:
                return False
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), timeout
                )
            except (OSError, TimeoutError):
                return False
            writer.close()
            return True
        if "exec" in spec:
            command = spec["exec"].get("command") or []
            code = await in_thread(self._exec, run.docker_name, command)
            return code == 0
        return True

    def _host_ports(self, run: ContainerRun, info: JSON) -> dict[int, int]:
        """Container port -> where 127.0.0.1 reaches it (the same port on host network)."""
        if self.host_network:
            return {
                int(p["containerPort"]): int(p["containerPort"])
                for p in run.spec.get("ports") or []
            }
        return host_ports(info)

    def _exec(self, name: str, command: list[str]) -> int:
        try:
            container = self.kubelet.engine.client.containers.get(name)
            result = container.exec_run(command)
        except Exception as exc:  # docker errors of any kind: the probe failed
            log.debug("exec probe in %s failed: %s", name, exc)
            return -1
        return int(result.exit_code or 0)

    @staticmethod
    def _port_number(run: ContainerRun, port: Any) -> int:
        if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
            return int(port)
        for p in run.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        return -1

    # -- container spec --------------------------------------------------------------------

    def container_spec(self, pod: JSON, run: ContainerRun, aliases: list[str]) -> ContainerSpec:
        container = run.spec
        spec = pod.get("spec") or {}
        env = self.kubelet.resolve_env(pod, container)
        command = [_env_expand(c, env) for c in container.get("command") or []] or None
        args = [_env_expand(a, env) for a in container.get("args") or []] or None
        limits = (container.get("resources") or {}).get("limits") or {}
        nano_cpus = int(quantity(limits["cpu"]) * 1e9) if "cpu" in limits else None
        mem_limit = int(quantity(limits["memory"])) if "memory" in limits else None
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts = []
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount.get("name"))
            docker_volume = self._volume_name(volume) if volume else None
            if docker_volume:
                # configMap/secret volumes stay writable: their files are copied in after
                # the container is created.
                projected = "configMap" in volume or "secret" in volume  # type: ignore[operator]
                read_only = bool(mount.get("readOnly")) and not projected
                mounts.append((docker_volume, mount["mountPath"], read_only))
        security = container.get("securityContext") or spec.get("securityContext") or {}
        user = str(security["runAsUser"]) if "runAsUser" in security else None
        return ContainerSpec(
            name=run.docker_name,
            image=run.image_ref or container["image"],
            network=self.kubelet.engine.network_name(self.namespace),
            aliases=aliases,
            labels={
                POD_NS_LABEL: self.namespace,
                POD_NAME_LABEL: self.name,
                POD_UID_LABEL: self.uid,
                CONTAINER_LABEL: container["name"],
            },
            hostname=spec.get("hostname") or self.name,
            # Kubernetes: command replaces ENTRYPOINT (and drops CMD), args replace CMD.
            entrypoint=command,
            command=args if args is not None else ([] if command else None),
            env=env,
            ports=[
                int(p["containerPort"])
                for p in container.get("ports") or []
                if p.get("protocol", "TCP") == "TCP"
            ],
            nano_cpus=nano_cpus,
            mem_limit=mem_limit,
            mounts=mounts,
            working_dir=container.get("workingDir"),
            user=user,
            host_network=self.host_network,
        )

    # -- status ----------------------------------------------------------------------------

    def terminated(self, info: JSON) -> JSON:
        state = info["State"]
        code = int(state.get("ExitCode", 0))
        reason = "OOMKilled" if state.get("OOMKilled") else ("Completed" if code == 0 else "Error")
        result: JSON = {
            "exitCode": code,
            "reason": reason,
            "startedAt": docker_time(state.get("StartedAt")),
            "finishedAt": docker_time(state.get("FinishedAt")),
            "containerID": f"docker://{info['Id']}",
        }
        return result

    def container_status(self, run: ContainerRun) -> JSON:
        info = run.info
        status: JSON = {
            "name": run.spec["name"],
            "image": run.spec.get("image", ""),
            "imageID": run.image_id,
            "restartCount": run.restart_count,
            "ready": False,
            "started": False,
            "lastState": run.last_state,
        }
        if info is not None:
            status["containerID"] = f"docker://{info['Id']}"
        if info is not None and info["State"].get("Running"):
            status["state"] = {
                "running": {"startedAt": docker_time(info["State"].get("StartedAt"))}
            }
            status["ready"] = run.ready
            status["started"] = True
        elif run.waiting is not None:
            reason, message = run.waiting
            status["state"] = {
                "waiting": {"reason": reason, **({"message": message} if message else {})}
            }
        elif info is not None:
            status["state"] = {"terminated": self.terminated(info)}
        else:
            status["state"] = {"waiting": {"reason": "ContainerCreating"}}
        return status

    def init_status(self, run: ContainerRun) -> JSON:
        status = self.container_status(run)
        if run.info is None and not run.done and run.waiting == ("ContainerCreating", ""):
            status["state"] = {"waiting": {"reason": "PodInitializing"}}
        # A completed init container reports ready, as the kubelet does.
        status["ready"] = run.done and not self._failed(run)
        return status

    def phase(self, policy: str, statuses: list[JSON]) -> str:
        if any(run.done and self._failed(run) for run in self.init_runs):
            return "Failed"
        if not statuses or not self.initialized:
            return "Pending"
        states = [s["state"] for s in statuses]
        ever_started = all(
            "running" in st or "terminated" in st or s.get("lastState") or s["restartCount"] > 0
            for st, s in zip(states, statuses, strict=True)
        )
        if not ever_started:
            return "Pending"
        if all(run.done for run in self.runs):
            codes = [s["state"].get("terminated", {}).get("exitCode", 0) for s in statuses]
            return "Succeeded" if all(c == 0 for c in codes) else "Failed"
        return "Running"

    async def write_status(self, pod: JSON, policy: str) -> None:
        statuses = [self.container_status(run) for run in self.runs]
        if not self.initialized:
            for s in statuses:
                s["state"] = {"waiting": {"reason": "PodInitializing"}}
        phase = self.phase(policy, statuses)
        old = pod.get("status") or {}
        conditions: list[JSON] = list(old.get("conditions") or [])
        all_ready = bool(statuses) and all(s["ready"] for s in statuses)
        not_ready = [s["name"] for s in statuses if not s["ready"]]
        why = "" if all_ready else f"containers with unready status: [{' '.join(not_ready)}]"
        reason = (
            ""
            if all_ready
            else ("PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady")
        )
        conditions = set_condition(conditions, "PodScheduled", "True", "", "")
        pending_init = [r.spec["name"] for r in self.init_runs if not r.done or self._failed(r)]
        if self.initialized:
            conditions = set_condition(conditions, "Initialized", "True", "", "")
        else:
            conditions = set_condition(
                conditions,
                "Initialized",
                "False",
                "ContainersNotInitialized",
                f"containers with incomplete status: [{' '.join(pending_init)}]",
            )
        ready = "True" if all_ready else "False"
        conditions = set_condition(conditions, "ContainersReady", ready, reason, why)
        conditions = set_condition(conditions, "Ready", ready, reason, why)
        ip = "127.0.0.1" if self.host_network else ""
        for run in [] if self.host_network else self.runs:
            if run.info is not None:
                ip = network_ip(run.info, self.kubelet.engine.network_name(self.namespace)) or ip
                break
        status: JSON = {
            "phase": phase,
            "conditions": [{k: v for k, v in c.items() if v != ""} for c in conditions],
            "hostIP": "127.0.0.1",
            "startTime": self.started_at,
            "containerStatuses": statuses,
            "qosClass": qos_class(pod),
        }
        if self.init_runs:
            status["initContainerStatuses"] = [self.init_status(r) for r in self.init_runs]
        if ip:
            status["podIP"] = ip
            status["podIPs"] = [{"ip": ip}]
        if status != old:
            await self.kubelet.update_status(self.namespace, self.name, status)

    async def annotate_published_ports(self, pod: JSON) -> None:
        """Record on the pod where its ports are published on 127.0.0.1, for clients that
        find pods through the API (Prometheus' ``kubernetes_sd_configs``): the host reaches
        pods only there, never on the container network.

        ``sandbox.robotics.dev/published-ports``: ``8000=127.0.0.1:32771,...``;
        ``sandbox.robotics.dev/metrics-address``: the address of the port that
        ``prometheus.io/port`` names (a number or a port name), else of the first port.
        """
        endpoint = self.kubelet.endpoints.get(self.key)
        if endpoint is None or not endpoint.ports:
            return
        current = annotations_of(pod)
        wanted = {
            PUBLISHED_PORTS_ANNOTATION: ",".join(
                f"{port}=127.0.0.1:{host}" for port, host in sorted(endpoint.ports.items())
            )
        }
        named = current.get("prometheus.io/port", "")
        port = (
            int(named) if named.isdigit() else endpoint.port_names.get(named, min(endpoint.ports))
        )
        if port in endpoint.ports:
            wanted[METRICS_ADDRESS_ANNOTATION] = f"127.0.0.1:{endpoint.ports[port]}"
        if all(current.get(k) == v for k, v in wanted.items()):
            return
        await self.kubelet.annotate(self.namespace, self.name, wanted)

    def publish_endpoint(self, pod: JSON) -> None:
        ports: dict[int, int] = {}
        names: dict[str, int] = {}
        for run in self.runs:
            for p in run.spec.get("ports") or []:
                if p.get("name"):
                    names[p["name"]] = int(p["containerPort"])
            if run.info is not None and run.info["State"].get("Running"):
                ports.update(self._host_ports(run, run.info))
        ready = bool(self.runs) and all(
            r.ready and r.info is not None and r.info["State"].get("Running") for r in self.runs
        )
        self.kubelet.endpoints[self.key] = PodEndpoint(
            self.namespace, self.name, self.uid, labels_of(pod), ready, ports, names
        )


def qos_class(pod: JSON) -> str:
    """Guaranteed (limits = requests for cpu and memory everywhere), else Burstable if any
    request or limit is set, else BestEffort."""
    containers = (pod.get("spec") or {}).get("containers") or []
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("limits") or r.get("requests") for r in resources):
        return "BestEffort"
    for r in resources:
        limits = r.get("limits") or {}
        requests = r.get("requests") or limits  # requests default to the limits
        for key in ("cpu", "memory"):
            if key not in limits or str(requests.get(key)) != str(limits[key]):
                return "Burstable"
    return "Guaranteed"


def _seconds_between(start: str | None, end: str | None) -> float:
    a, b = parse_time(start), parse_time(end)
    return (b - a).total_seconds() if a and b else 0.0


def _default_pull_policy(image: str) -> str:
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    if "@" in image:
        return "IfNotPresent"
    if ":" not in last or last.endswith(":latest"):
        return "Always"
    return "IfNotPresent"


class Kubelet:
    """Keeps one PodWorker per Pod object and the pod endpoints the router reads."""

    def __init__(
        self, store: Any, engine: Engine, config: RuntimeConfig, faults: FaultRegistry
    ) -> None:
        self.store = store
        self.engine = engine
        self.config = config
        self.faults = faults
        self.workers: dict[PodKey, PodWorker] = {}
        self.tasks: dict[PodKey, asyncio.Task[None]] = {}
        self.endpoints: dict[PodKey, PodEndpoint] = {}
        self.stopping = False
        self.http = httpx.AsyncClient()
        self.log_streams: set[LogStream] = set()
        self._events: EventStream | None = None

    # -- store access (the store is synchronous and fast) --------------------------------

    def get_pod(self, namespace: str, name: str) -> JSON | None:
        from sandbox.kube.store import ApiError

        try:
            return dict(self.store.get("v1", "Pod", namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def annotate(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        from sandbox.kube.store import ApiError

        try:
            self.store.patch(
                "v1", "Pod", namespace, name, {"metadata": {"annotations": annotations}}
            )
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def update_status(self, namespace: str, name: str, status: JSON) -> None:
        from sandbox.kube.store import ApiError

        try:
            self.store.update_status("v1", "Pod", namespace, name, status)
        except ApiError as exc:
            if exc.status != 404:
                raise

    def services(self, namespace: str) -> list[JSON]:
        return list(self.store.list("v1", "Service", namespace))

    def aliases_for(self, pod: JSON) -> list[str]:
        """The names a pod answers to on its namespace's network."""
        metadata = pod["metadata"]
        spec = pod.get("spec") or {}
        namespace = metadata["namespace"]
        names = [metadata["name"]]
        hostname, subdomain = spec.get("hostname"), spec.get("subdomain")
        if hostname:
            names.append(hostname)
            if subdomain:
                names += [f"{hostname}.{subdomain}", f"{hostname}.{subdomain}.{namespace}.svc"]
        labels = labels_of(pod)
        for service in self.services(namespace):
            if service_selects(service, labels):
                svc = service["metadata"]["name"]
                names += [
                    svc,
                    f"{svc}.{namespace}",
                    f"{svc}.{namespace}.svc",
                    f"{svc}.{namespace}.svc.cluster.local",
                ]
        return list(dict.fromkeys(names))

    def resolve_env(self, pod: JSON, container: JSON) -> dict[str, str]:
        from sandbox.kube.store import ApiError

        metadata = pod["metadata"]
        namespace = metadata["namespace"]
        env: dict[str, str] = {}

        def lookup(kind: str, name: str, key: str | None) -> dict[str, str]:
            try:
                obj = self.store.get("v1", kind, namespace, name)
            except ApiError as exc:
                raise ValueError(f'{kind.lower()} "{name}" not found') from exc
            data = dict(obj.get("data") or {})
            if kind == "Secret":
                import base64

                data = {k: base64.b64decode(v).decode() for k, v in data.items()}
                data.update(obj.get("stringData") or {})
            return data if key is None else {key: data.get(key, "")}

        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, field_name in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if field_name in source:
                    ref = source[field_name]
                    with contextlib.suppress(ValueError):
                        for k, v in lookup(kind, ref["name"], None).items():
                            env[prefix + k] = v
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = _env_expand(str(item["value"]), env)
                continue
            source = item.get("valueFrom") or {}
            if "fieldRef" in source:
                env[name] = self._field(pod, source["fieldRef"].get("fieldPath", ""))
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                env[name] = lookup("ConfigMap", ref["name"], ref["key"])[ref["key"]]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[name] = lookup("Secret", ref["name"], ref["key"])[ref["key"]]
            else:
                env[name] = ""
        return env

    @staticmethod
    def _field(pod: JSON, path: str) -> str:
        metadata = pod["metadata"]
        match = re.match(r"metadata\.(labels|annotations)\['(.+)'\]$", path)
        if match:
            return str((metadata.get(match.group(1)) or {}).get(match.group(2), ""))
        simple = {
            "metadata.name": metadata.get("name", ""),
            "metadata.namespace": metadata.get("namespace", ""),
            "metadata.uid": metadata.get("uid", ""),
            "spec.nodeName": "twin-node",
            "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName", "default"),
            "status.hostIP": "127.0.0.1",
            "status.podIP": "",
        }
        return str(simple.get(path, ""))

    # -- workers ---------------------------------------------------------------------------

    def pod_changed(self, pod: JSON) -> None:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        worker = self.workers.get(key)
        if worker is not None and worker.uid == pod["metadata"]["uid"]:
            worker.wake.set()
            return
        if worker is not None:
            worker.wake.set()  # it will see the new uid and end; resync starts the new one
            return
        worker = PodWorker(self, pod)
        self.workers[key] = worker
        self.tasks[key] = asyncio.create_task(worker.run(), name=f"pod:{key[0]}/{key[1]}")

    def pod_deleted(self, pod: JSON) -> None:
        worker = self.workers.get((pod["metadata"]["namespace"], pod["metadata"]["name"]))
        if worker is not None:
            worker.wake.set()

    def namespace_changed(self, namespace: str) -> None:
        """Services changed: every pod of the namespace re-checks its aliases."""
        for (ns, _), worker in self.workers.items():
            if ns == namespace:
                worker.wake.set()

    def start_events(self) -> None:
        """Follow Docker's container events in a daemon thread; wake the pod's worker."""
        loop = asyncio.get_running_loop()

        def wake(namespace: str, pod: str) -> None:
            worker = self.workers.get((namespace, pod))
            if worker is not None:
                worker.wake.set()

        def follow() -> None:
            while not self.stopping:
                try:
                    self._events = self.engine.container_events()
                    for event in self._events:
                        attrs = (event.get("Actor") or {}).get("Attributes") or {}
                        namespace, pod = attrs.get(POD_NS_LABEL), attrs.get(POD_NAME_LABEL)
                        if namespace and pod:
                            loop.call_soon_threadsafe(wake, namespace, pod)
                except Exception as exc:  # dockerd restarted, or we are closing: retry
                    log.debug("docker events ended: %s", exc)
                if not self.stopping:
                    time.sleep(1.0)

        threading.Thread(target=follow, name="runtime-docker-events", daemon=True).start()

    def forget(self, worker: PodWorker) -> None:
        if self.workers.get(worker.key) is worker:
            del self.workers[worker.key]
            self.tasks.pop(worker.key, None)

    async def resync(self) -> None:
        """Start workers for every pod, remove containers no pod owns."""
        pods = self.store.list("v1", "Pod")
        # A worker still tearing down (draining) owns its containers until it is done.
        uids = {p["metadata"]["uid"] for p in pods} | {w.uid for w in self.workers.values()}
        for pod in pods:
            self.pod_changed(pod)
        containers = await in_thread(self.engine.ours)
        for container in containers:
            uid = container.labels.get(POD_UID_LABEL)
            if uid and uid not in uids:
                log.info("removing orphan container %s", container.name)
                await in_thread(self.engine.remove, container.name)

    async def logs(
        self, namespace: str, pod: str, container: str | None, tail: int | None, follow: bool
    ) -> AsyncIterator[bytes]:
        """Container output for ``kubectl logs`` (the store's ``log_source``)."""
        found = self.get_pod(namespace, pod)
        if found is None:
            raise LookupError(f'pods "{pod}" not found')
        containers = (found.get("spec") or {}).get("containers") or []
        names = [c["name"] for c in containers]
        index = names.index(container) if container in names else 0
        if container is not None and container not in names:
            raise LookupError(f"container {container} is not valid for pod {pod}")
        docker_name = self.engine.container_name(
            namespace, pod, index, names[index] if names else ""
        )
        # The docker stream blocks a thread; closing it (reader gone, twin stopping) ends
        # that thread's read, so a followed log never holds a thread after its reader.
        stream = await in_thread(
            functools.partial(self.engine.logs, docker_name, tail=tail, follow=follow)
        )
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def pump() -> None:
            try:
                for chunk in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except Exception as exc:  # closed, or the container went away: end the stream
                log.debug("log stream of %s ended: %s", docker_name, exc)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(queue.put_nowait, None)

        pump_task = asyncio.create_task(in_thread(pump))
        self.log_streams.add(stream)
        try:
            while (chunk := await queue.get()) is not None:
                yield chunk
        finally:
            self.log_streams.discard(stream)
            stream.close()
            pump_task.cancel()

    async def close(self) -> None:
        self.stopping = True
        if self._events is not None:
            self._events.close()
        for stream in list(self.log_streams):
            stream.close()
        for task in list(self.tasks.values()):
            task.cancel()
        for task in list(self.tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.http.aclose()
