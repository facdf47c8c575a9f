"""The twin's PyTorchJob controller: Kubeflow's training-operator, as far as a client can tell.

For every ``kubeflow.org/v1`` PyTorchJob in the object store it creates what the real
operator creates: one headless Service and one Pod per replica (``<job>-master-0``,
``<job>-worker-<i>``), owned by the job, labelled ``training.kubeflow.org/*``, with the
launcher environment (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``, ``PET_*``).
The runtime component runs the Pods as containers on the namespace's network, where the
Service names resolve, so the master is reachable by its name.

From the Pods' status it writes the job's status: ``replicaStatuses``, ``startTime``,
``completionTime`` and the conditions Created → Running (→ Restarting) → Succeeded | Failed,
with the operator's reasons and messages. ``runPolicy`` is honoured: ``backoffLimit`` (the
sum of container restarts of OnFailure/Always replicas), ``activeDeadlineSeconds``,
``cleanPodPolicy`` (All | Running | None, default None), ``ttlSecondsAfterFinished`` and
``suspend``. ``restartPolicy: ExitCode`` recreates a pod that died of a signal (exit code
>= 128) and fails the job on any other non-zero exit.

Not modelled: gang scheduling (PodGroups), elastic scaling by HPA, admission webhooks
(an invalid spec is failed with reason ``PyTorchJobFailedValidation`` instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sandbox.kube.store import ApiError, ObjectStore

log = logging.getLogger("sandbox.pytorchjob")

JSON = dict[str, Any]

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
OPERATOR_NAME = "pytorchjob-controller"
LABEL_JOB = "training.kubeflow.org/job-name"
LABEL_TYPE = "training.kubeflow.org/replica-type"
LABEL_INDEX = "training.kubeflow.org/replica-index"
LABEL_ROLE = "training.kubeflow.org/job-role"
LABEL_OPERATOR = "training.kubeflow.org/operator-name"
CONTAINER = "pytorch"
PORT_NAME = "pytorchjob-port"
DEFAULT_PORT = 23456
REPLICA_ORDER = ("Master", "Worker")
ACTIVE_PHASES = ("Pending", "Running")
# How often unfinished jobs are looked at without an event (deadlines, TTLs).
RESYNC_SECONDS = 1.0


async def start(ctx: Any) -> None:
    """Twin component entry point: run the controller on the twin's object store."""
    controller = PyTorchJobController(ctx.store)
    ctx.spawn(controller.run(), "pytorchjob-controller")


def _now_text(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# --- conditions, as commonutil.UpdateJobConditions writes them ---------------------------------


def has_condition(status: JSON, ctype: str) -> bool:
    return any(
        c.get("type") == ctype and c.get("status") == "True" for c in status.get("conditions") or []
    )


def is_finished(status: JSON) -> bool:
    return has_condition(status, "Succeeded") or has_condition(status, "Failed")


def set_condition(status: JSON, ctype: str, reason: str, message: str, now: str) -> None:
    """Add or refresh a true condition; Running and Restarting exclude each other, and a
    terminal condition turns Running false (the training-operator's filterOutCondition)."""
    conditions: list[JSON] = status.get("conditions") or []
    current = next((c for c in conditions if c.get("type") == ctype), None)
    if (
        current is not None
        and current.get("status") == "True"
        and current.get("reason") == reason
        and current.get("message") == message
    ):
        return
    kept: list[JSON] = []
    for cond in conditions:
        other = cond.get("type")
        if other == ctype or {ctype, other} == {"Running", "Restarting"}:
            continue
        if ctype in ("Succeeded", "Failed") and other == "Running":
            cond = {**cond, "status": "False", "lastUpdateTime": now, "lastTransitionTime": now}
        kept.append(cond)
    kept.append(
        {
            "type": ctype,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastUpdateTime": now,
            "lastTransitionTime": now,
        }
    )
    status["conditions"] = kept


# --- what the operator injects into pods -------------------------------------------------------


def _nproc_int(job: JSON) -> int:
    value = str(job["spec"].get("nprocPerNode") or "auto")
    return int(value) if value.isdigit() else 1


def _master_port(job: JSON) -> int:
    master = job["spec"]["pytorchReplicaSpecs"].get("Master") or {}
    for container in master.get("template", {}).get("spec", {}).get("containers") or []:
        if container.get("name") == CONTAINER:
            for port in container.get("ports") or []:
                if port.get("name") == PORT_NAME:
                    return int(port["containerPort"])
    return DEFAULT_PORT


def _total_replicas(job: JSON) -> int:
    return sum(int(s.get("replicas", 1)) for s in job["spec"]["pytorchReplicaSpecs"].values())


def launcher_env(job: JSON, rtype: str, index: int) -> list[JSON]:
    """The env of ``pkg/controller.v1/pytorch/envvar.go`` (+ ``master.go``, ``elastic.go``)."""
    name = job["metadata"]["name"]
    spec = job["spec"]
    replica_specs = spec["pytorchReplicaSpecs"]
    total = _total_replicas(job)
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    if "Master" in replica_specs:
        rank = index + 1 if rtype == "Worker" else index
        port = str(_master_port(job))
        env.update(
            MASTER_ADDR=f"{name}-master-0",
            MASTER_PORT=port,
            PET_MASTER_ADDR=f"{name}-master-0",
            PET_MASTER_PORT=port,
            WORLD_SIZE=str(total * _nproc_int(job)),
            RANK=str(rank),
            PET_NODE_RANK=str(rank),
        )
    env["PET_NPROC_PER_NODE"] = str(spec.get("nprocPerNode") or "auto")
    elastic = spec.get("elasticPolicy")
    if elastic:
        low = elastic.get("minReplicas", total)
        high = elastic.get("maxReplicas", total)
        env["PET_NNODES"] = f"{low}:{high}"
        host = elastic.get("rdzvHost") or f"{name}-worker-0"
        env["PET_RDZV_ENDPOINT"] = f"{host}:{elastic.get('rdzvPort', DEFAULT_PORT)}"
        env["PET_RDZV_BACKEND"] = elastic.get("rdzvBackend") or "c10d"
        if elastic.get("rdzvId"):
            env["PET_RDZV_ID"] = str(elastic["rdzvId"])
        if elastic.get("maxRestarts") is not None:
            env["PET_MAX_RESTARTS"] = str(elastic["maxRestarts"])
    else:
        env["PET_NNODES"] = str(total)
    return [{"name": k, "value": v} for k, v in env.items()]


def replica_labels(job_name: str, rtype: str, index: int) -> dict[str, str]:
    labels = {
        LABEL_OPERATOR: OPERATOR_NAME,
        LABEL_JOB: job_name,
        LABEL_TYPE: rtype.lower(),
        LABEL_INDEX: str(index),
    }
    if rtype == "Master":
        labels[LABEL_ROLE] = "master"
    return labels


def owner_reference(job: JSON) -> JSON:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def replica_name(job_name: str, rtype: str, index: int) -> str:
    return f"{job_name}-{rtype.lower()}-{index}"


def build_pod(job: JSON, rtype: str, index: int) -> JSON:
    rspec = job["spec"]["pytorchReplicaSpecs"][rtype]
    template = copy.deepcopy(rspec.get("template") or {})
    meta = template.get("metadata") or {}
    spec = template.get("spec") or {}
    job_name = job["metadata"]["name"]
    policy = rspec.get("restartPolicy") or "OnFailure"
    # ExitCode is the operator's business: the kubelet must not restart anything itself.
    spec["restartPolicy"] = "Never" if policy == "ExitCode" else policy
    injected = launcher_env(job, rtype, index)
    names = {e["name"] for e in injected}
    for container in spec.get("containers") or []:
        user_env = [e for e in container.get("env") or [] if e.get("name") not in names]
        container["env"] = user_env + injected
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": replica_name(job_name, rtype, index),
            "namespace": job["metadata"]["namespace"],
            "labels": {**(meta.get("labels") or {}), **replica_labels(job_name, rtype, index)},
            "annotations": dict(meta.get("annotations") or {}),
            "ownerReferences": [owner_reference(job)],
        },
        "spec": spec,
    }


def build_service(job: JSON, rtype: str, index: int) -> JSON:
    """A headless Service per replica, named like its pod, so the pod is reachable by name."""
    job_name = job["metadata"]["name"]
    labels = replica_labels(job_name, rtype, index)
    selector = {k: v for k, v in labels.items() if k in (LABEL_JOB, LABEL_TYPE, LABEL_INDEX)}
    port = _master_port(job) if rtype == "Master" else DEFAULT_PORT
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": replica_name(job_name, rtype, index),
            "namespace": job["metadata"]["namespace"],
            "labels": labels,
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "ports": [{"name": PORT_NAME, "port": port, "targetPort": port}],
        },
    }


def validation_error(job: JSON) -> str | None:
    """What the operator's admission webhook would refuse."""
    specs = (job.get("spec") or {}).get("pytorchReplicaSpecs")
    if not isinstance(specs, dict) or not specs:
        return "spec.pytorchReplicaSpecs: Required value"
    for rtype, rspec in specs.items():
        if rtype not in REPLICA_ORDER:
            return f"spec.pytorchReplicaSpecs[{rtype}]: unsupported replica type"
        containers = (rspec.get("template") or {}).get("spec", {}).get("containers") or []
        if not any(c.get("name") == CONTAINER for c in containers):
            return (
                f"spec.pytorchReplicaSpecs[{rtype}].template.spec.containers: "
                f"a container named {CONTAINER!r} is required"
            )
        if int(rspec.get("replicas", 1)) < 0:
            return f"spec.pytorchReplicaSpecs[{rtype}].replicas: must be >= 0"
    if "Master" in specs and int(specs["Master"].get("replicas", 1)) != 1:
        return "spec.pytorchReplicaSpecs[Master].replicas: must be 1"
    if job["spec"].get("elasticPolicy") and "Worker" not in specs:
        return "spec.elasticPolicy: needs Worker replicas"
    return None


# --- pod status helpers ------------------------------------------------------------------------


def _phase(pod: JSON) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def _restarts(pod: JSON) -> int:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    init = (pod.get("status") or {}).get("initContainerStatuses") or []
    return sum(int(s.get("restartCount") or 0) for s in [*statuses, *init])


def _exit_code(pod: JSON) -> int | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            terminated = (status.get("state") or {}).get("terminated") or {}
            code = terminated.get("exitCode")
            return int(code) if code is not None else None
    return None


# --- the controller ----------------------------------------------------------------------------


class PyTorchJobController:
    """Reconciles every PyTorchJob on store events and on a short resync tick."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        resync: float = RESYNC_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.resync = resync
        self.clock = clock
        self._dirty: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        # Per job uid: container restarts already reported (to raise Restarting once per
        # restart) and operator-side recreations under restartPolicy ExitCode.
        self._seen_restarts: dict[str, int] = {}
        self._recreations: dict[str, int] = {}

    async def run(self) -> None:
        while True:
            try:
                await self._run_once()
            except ApiError as exc:
                if exc.status != 410:
                    raise
                log.warning("pytorchjob controller fell behind the store; re-listing")

    async def _run_once(self) -> None:
        subscription = self.store.subscribe()
        pump = asyncio.create_task(self._pump(subscription), name="pytorchjob-events")
        try:
            last_resync = 0.0
            while True:
                if pump.done():
                    pump.result()  # re-raises 410 so run() re-subscribes
                    return
                if time.monotonic() - last_resync >= self.resync:
                    # Deadlines and TTLs pass without any event.
                    self._mark_all()
                    last_resync = time.monotonic()
                else:
                    # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation
                    # that arrives as the event is set, and the controller would never stop.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.resync):
                            await self._wake.wait()
                self._wake.clear()
                dirty, self._dirty = self._dirty, set()
                for namespace, name in sorted(dirty):
                    self.reconcile_safely(namespace, name)
        finally:
            pump.cancel()
            subscription.close()
            # Collect the pump's own end; a cancellation of this task still propagates.
            await asyncio.gather(pump, return_exceptions=True)

    async def _pump(self, subscription: Any) -> None:
        async for event in subscription:
            key = self._job_key(event.object)
            if key:
                self._dirty.add(key)
                self._wake.set()

    @staticmethod
    def _job_key(obj: JSON) -> tuple[str, str] | None:
        meta = obj.get("metadata") or {}
        if obj.get("kind") == KIND and obj.get("apiVersion") == API_VERSION:
            return meta.get("namespace", ""), meta.get("name", "")
        if obj.get("kind") in ("Pod", "Service"):
            job = (meta.get("labels") or {}).get(LABEL_JOB)
            if job:
                return meta.get("namespace", ""), job
        return None

    def _mark_all(self) -> None:
        for job in self.store.list(API_VERSION, KIND):
            status = job.get("status") or {}
            run_policy = job.get("spec", {}).get("runPolicy") or {}
            if is_finished(status) and run_policy.get("ttlSecondsAfterFinished") is None:
                continue
            self._dirty.add((job["metadata"]["namespace"], job["metadata"]["name"]))

    def reconcile_safely(self, namespace: str, name: str) -> None:
        try:
            self.reconcile(namespace, name)
        except ApiError as exc:
            # A conflicting write (someone deleted the job meanwhile): the next event or
            # tick reconciles again from fresh state.
            log.info("reconcile %s/%s: %s; retrying on the next event", namespace, name, exc)
            self._dirty.add((namespace, name))

    # -- one reconcile ------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> None:
        try:
            job = self.store.get(API_VERSION, KIND, namespace, name)
        except ApiError as exc:
            if exc.status == 404:
                return  # deleted: the store's cascade took its pods and services
            raise
        if job["metadata"].get("deletionTimestamp"):
            return  # being deleted (foreground): its pods are going, none are made
        now = self.clock()
        stamp = _now_text(now)
        status: JSON = copy.deepcopy(job.get("status") or {})
        before = copy.deepcopy(status)
        run_policy = job.get("spec", {}).get("runPolicy") or {}
        pods = self._owned(job, "Pod")

        if is_finished(status):
            self._clean_up(job, pods, run_policy)
            self._expire(job, status, run_policy, now)
            return

        problem = validation_error(job)
        if problem:
            self._fail(job, status, pods, "PyTorchJobFailedValidation", problem, stamp)
            return self._write(job, status, before)

        if not status.get("conditions"):
            set_condition(
                status, "Created", "PyTorchJobCreated", f"PyTorchJob {name} is created.", stamp
            )

        if run_policy.get("suspend"):
            self._suspend(job, status, pods, stamp)
            return self._write(job, status, before)
        if has_condition(status, "Suspended"):
            # Resumed: the clock for activeDeadlineSeconds starts again.
            status["conditions"] = [c for c in status["conditions"] if c["type"] != "Suspended"]

        status.setdefault("startTime", stamp)
        limit_message = self._past_limits(job, status, pods, run_policy, now)
        if limit_message:
            self._fail(job, status, pods, "PyTorchJobFailed", limit_message, stamp)
            return self._write(job, status, before)

        pods = self._ensure_replicas(job, pods, status, stamp)
        self._update_status(job, status, pods, stamp)
        if is_finished(status):
            self._clean_up(job, pods, run_policy)
        self._write(job, status, before)

    def _owned(self, job: JSON, kind: str) -> list[JSON]:
        uid = job["metadata"]["uid"]
        found = self.store.list(
            "v1", kind, job["metadata"]["namespace"], {LABEL_JOB: job["metadata"]["name"]}
        )
        return [
            obj
            for obj in found
            if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])
        ]

    def _write(self, job: JSON, status: JSON, before: JSON) -> None:
        if status != before:
            meta = job["metadata"]
            self.store.update_status(API_VERSION, KIND, meta["namespace"], meta["name"], status)

    # -- limits -----------------------------------------------------------------------------

    def _restart_total(self, job: JSON, pods: list[JSON]) -> int:
        """PastBackoffLimit's count: container restarts of running pods whose replica type
        restarts (OnFailure/Always), plus the pods we recreated under ExitCode."""
        specs = job["spec"]["pytorchReplicaSpecs"]
        counted = {
            rtype.lower()
            for rtype, spec in specs.items()
            if (spec.get("restartPolicy") or "OnFailure") in ("OnFailure", "Always")
        }
        total = sum(
            _restarts(pod)
            for pod in pods
            if _phase(pod) == "Running" and pod["metadata"]["labels"].get(LABEL_TYPE) in counted
        )
        return total + self._recreations.get(job["metadata"]["uid"], 0)

    def _past_limits(
        self, job: JSON, status: JSON, pods: list[JSON], run_policy: JSON, now: float
    ) -> str | None:
        name = job["metadata"]["name"]
        deadline = run_policy.get("activeDeadlineSeconds")
        started = _parse_time(status.get("startTime"))
        if deadline is not None and started is not None and now - started >= int(deadline):
            return f"Job {name} has failed because it was active longer than specified deadline"
        limit = run_policy.get("backoffLimit")
        if limit is not None:
            restarts = self._restart_total(job, pods)
            if (restarts > 0) if int(limit) == 0 else restarts >= int(limit):
                return f"Job {name} has failed because it has reached the specified backoff limit"
        return None

    # -- pods and services ------------------------------------------------------------------

    def _ensure_replicas(self, job: JSON, pods: list[JSON], status: JSON, stamp: str) -> list[JSON]:
        name = job["metadata"]["name"]
        uid = job["metadata"]["uid"]
        by_name = {p["metadata"]["name"]: p for p in pods}
        services = {s["metadata"]["name"] for s in self._owned(job, "Service")}
        wanted: set[str] = set()
        for rtype in REPLICA_ORDER:
            rspec = job["spec"]["pytorchReplicaSpecs"].get(rtype)
            if rspec is None:
                continue
            for index in range(int(rspec.get("replicas", 1))):
                pod_name = replica_name(name, rtype, index)
                wanted.add(pod_name)
                if pod_name not in services:
                    self._create(build_service(job, rtype, index))
                pod = by_name.get(pod_name)
                if pod is not None and self._retry_exit_code(job, rspec, pod):
                    self._recreations[uid] = self._recreations.get(uid, 0) + 1
                    set_condition(
                        status,
                        "Restarting",
                        "PyTorchJobRestarting",
                        f"PyTorchJob {name} is restarting because 1 {rtype} replica(s) failed.",
                        stamp,
                    )
                    self._delete("Pod", pod)
                    by_name.pop(pod_name)
                    pod = None
                if pod is None:
                    by_name[pod_name] = self._create(build_pod(job, rtype, index))
        for pod_name, pod in list(by_name.items()):
            if pod_name not in wanted:  # scaled down
                self._delete("Pod", pod)
                by_name.pop(pod_name)
        return list(by_name.values())

    @staticmethod
    def _retry_exit_code(job: JSON, rspec: JSON, pod: JSON) -> bool:
        if (rspec.get("restartPolicy") or "OnFailure") != "ExitCode" or _phase(pod) != "Failed":
            return False
        code = _exit_code(pod)
        return code is not None and code >= 128

    def _create(self, obj: JSON) -> JSON:
        try:
            return self.store.create(obj)
        except ApiError as exc:
            if exc.status != 409:
                raise
            meta = obj["metadata"]
            return self.store.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])

    def _delete(self, kind: str, obj: JSON) -> None:
        meta = obj["metadata"]
        with contextlib.suppress(ApiError):
            self.store.delete("v1", kind, meta["namespace"], meta["name"])

    def _clean_up(self, job: JSON, pods: list[JSON], run_policy: JSON) -> None:
        """DeletePodsAndServices: the pods cleanPodPolicy names, and their Services."""
        policy = run_policy.get("cleanPodPolicy") or "None"
        if policy == "None":
            return
        for pod in pods:
            if policy == "Running" and _phase(pod) not in ACTIVE_PHASES:
                continue
            self._delete("Pod", pod)
            self._delete("Service", pod)  # same name as its pod

    def _expire(self, job: JSON, status: JSON, run_policy: JSON, now: float) -> None:
        ttl = run_policy.get("ttlSecondsAfterFinished")
        finished = _parse_time(status.get("completionTime"))
        if ttl is not None and finished is not None and now - finished >= int(ttl):
            meta = job["metadata"]
            with contextlib.suppress(ApiError):
                self.store.delete(API_VERSION, KIND, meta["namespace"], meta["name"])
            self._forget(meta["uid"])

    def _forget(self, uid: str) -> None:
        self._seen_restarts.pop(uid, None)
        self._recreations.pop(uid, None)

    def _suspend(self, job: JSON, status: JSON, pods: list[JSON], stamp: str) -> None:
        for pod in pods:
            self._delete("Pod", pod)
            self._delete("Service", pod)
        name = job["metadata"]["name"]
        status["conditions"] = [
            {**c, "status": "False"} if c.get("type") == "Running" else c
            for c in status.get("conditions") or []
        ]
        set_condition(
            status, "Suspended", "PyTorchJobSuspended", f"PyTorchJob {name} is suspended.", stamp
        )
        status.pop("startTime", None)

    def _fail(
        self, job: JSON, status: JSON, pods: list[JSON], reason: str, message: str, stamp: str
    ) -> None:
        status["replicaStatuses"] = self._replica_statuses(job, pods)
        set_condition(status, "Failed", reason, message, stamp)
        status.setdefault("completionTime", stamp)
        self._clean_up(job, pods, job.get("spec", {}).get("runPolicy") or {})

    # -- status -----------------------------------------------------------------------------

    @staticmethod
    def _replica_statuses(job: JSON, pods: list[JSON]) -> JSON:
        result: JSON = {}
        for rtype in job.get("spec", {}).get("pytorchReplicaSpecs") or {}:
            mine = [p for p in pods if p["metadata"]["labels"].get(LABEL_TYPE) == rtype.lower()]
            counts = {
                "active": sum(1 for p in mine if _phase(p) == "Running"),
                "succeeded": sum(1 for p in mine if _phase(p) == "Succeeded"),
                "failed": sum(1 for p in mine if _phase(p) == "Failed"),
            }
            # The operator omits zero counts (omitempty).
            result[rtype] = {k: v for k, v in counts.items() if v}
        return result

    def _update_status(self, job: JSON, status: JSON, pods: list[JSON], stamp: str) -> None:
        """The pytorch controller's UpdateJobStatus, plus Restarting on in-place restarts."""
        name = job["metadata"]["name"]
        namespace = job["metadata"]["namespace"]
        uid = job["metadata"]["uid"]
        specs = job["spec"]["pytorchReplicaSpecs"]
        replica_statuses = self._replica_statuses(job, pods)
        status["replicaStatuses"] = replica_statuses
        restarts = self._restart_total(job, pods) - self._recreations.get(uid, 0)
        seen = self._seen_restarts.get(uid, restarts)
        self._seen_restarts[uid] = max(seen, restarts)
        leader = "Master" if "Master" in specs else "Worker"
        for rtype in REPLICA_ORDER:
            if rtype not in specs:
                continue
            counts = replica_statuses[rtype]
            expected = int(specs[rtype].get("replicas", 1)) - counts.get("succeeded", 0)
            failed = counts.get("failed", 0)
            if rtype == leader:
                if restarts > seen:
                    set_condition(
                        status,
                        "Restarting",
                        "PyTorchJobRestarting",
                        f"PyTorchJob {name} is restarting because {restarts - seen} "
                        "replica(s) restarted.",
                        stamp,
                    )
                elif counts.get("active", 0) > 0:
                    set_condition(
                        status,
                        "Running",
                        "PyTorchJobRunning",
                        f"PyTorchJob {namespace}/{name} is running.",
                        stamp,
                    )
                if expected == 0:
                    status["completionTime"] = stamp
                    set_condition(
                        status,
                        "Succeeded",
                        "PyTorchJobSucceeded",
                        f"PyTorchJob {namespace}/{name} successfully completed.",
                        stamp,
                    )
                    return
            if failed > 0 and not self._retrying(specs[rtype], pods, rtype):
                status["completionTime"] = stamp
                set_condition(
                    status,
                    "Failed",
                    "PyTorchJobFailed",
                    f"PyTorchJob {namespace}/{name} has failed because {failed} {rtype} "
                    "replica(s) failed.",
                    stamp,
                )
                return

    @staticmethod
    def _retrying(rspec: JSON, pods: list[JSON], rtype: str) -> bool:
        """An ExitCode replica whose failed pods all died of signals is being recreated."""
        if (rspec.get("restartPolicy") or "OnFailure") != "ExitCode":
            return False
        failed = [
            p
            for p in pods
            if p["metadata"]["labels"].get(LABEL_TYPE) == rtype.lower() and _phase(p) == "Failed"
        ]
        return all((_exit_code(p) or 0) >= 128 for p in failed)
