"""The twin's TrainJob controller: Kubeflow Trainer v2.3.0 (+ JobSet), as far as a client can tell.

For every ``trainer.kubeflow.org/v1alpha1`` TrainJob it does what Trainer's controller and the
JobSet controller do together:

- resolve ``spec.runtimeRef`` (a ClusterTrainingRuntime, or a TrainingRuntime in the job's
  namespace) and build the JobSet from the runtime's template: the replicated job labelled
  ``trainer.kubeflow.org/trainjob-ancestor-step: trainer`` gets ``trainer.numNodes`` pods
  (an Indexed Job: parallelism = completions = numNodes), its ``node`` container the
  trainer's image, command, args, env and ``resourcesPerNode``, and, for a runtime with
  ``mlPolicy.torch``, the env torchrun reads (``PET_NNODES``, ``PET_NPROC_PER_NODE``,
  ``PET_NODE_RANK`` from the completion index, ``PET_MASTER_ADDR=<job>-node-0-0.<job>``,
  ``PET_MASTER_PORT=29500``); ``spec.runtimePatches`` are applied (pod labels and
  annotations, volumes, volume mounts and env of named containers);
- one JobSet ``<job>`` owned by the TrainJob, a headless Service ``<job>`` (the JobSet's
  subdomain) and the pods, JobSet-style: ``<job>-<replicatedJob>-<jobIndex>-<podIndex>-<5>``
  (``generateName`` of an Indexed Job's pod), hostname ``<job>-node-0-<i>``, subdomain
  ``<job>``, labels ``jobset.sigs.k8s.io/*`` and ``batch.kubernetes.io/job-completion-index``;
  the runtime component runs them as containers where ``<hostname>.<job>`` resolves;
- the Job semantics of each child Job: ``restartPolicy`` (OnFailure restarts in place,
  counted against ``backoffLimit``; Never replaces a failed pod until ``backoffLimit`` failed
  pods), success when every index succeeded; the JobSet fails on the first failed Job
  (``failurePolicy`` absent: no JobSet restarts) and its active pods are stopped;
- the status: the JobSet's ``replicatedJobsStatus`` and conditions ``Completed``
  (``AllJobsCompleted``) / ``Failed`` (``FailedJobs``), copied to the TrainJob as
  ``jobsStatus`` and ``Complete`` / ``Failed``; ``Suspended`` True (reason Suspended) while
  ``spec.suspend`` (pods deleted), False (reason Resumed) after; ``activeDeadlineSeconds``
  from creation or resume: ``Failed`` ``DeadlineExceeded`` and the JobSet deleted;
- deletion: the TrainJob owns the JobSet, which owns the pods and the Service, so the
  store's garbage collection removes them all.

Not modelled: the child ``batch/v1`` Job objects (pods are owned by the JobSet directly),
initializer steps, Kueue/Volcano scheduling, JobSet failure policies with restarts, the
admission webhook (a TrainJob whose runtime is missing waits, logged, instead of being
refused at create time).

At start the controller installs the ``torch-distributed`` ClusterTrainingRuntime if it is
absent, as Trainer's manifests would, with the sandbox's choice of a fail-fast child Job
(``restartPolicy: Never``, ``backoffLimit: 0``): a lost node fails the run, and a retry of
the ``train`` flow resumes from the last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from sandbox.kube.store import ApiError, ObjectStore
from sandbox.pytorchjob import _now_text, _parse_time

log = logging.getLogger("sandbox.trainjob")

JSON = dict[str, Any]

TRAINER_VERSION = "v2.3.0"
GROUP = "trainer.kubeflow.org"
API_VERSION = f"{GROUP}/v1alpha1"
KIND = "TrainJob"
RUNTIME_KINDS = ("ClusterTrainingRuntime", "TrainingRuntime")
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
JOBSET_KIND = "JobSet"
LABEL_JOBSET = "jobset.sigs.k8s.io/jobset-name"
LABEL_RJOB = "jobset.sigs.k8s.io/replicatedjob-name"
LABEL_JOB_INDEX = "jobset.sigs.k8s.io/job-index"
LABEL_JOB_NAME = "batch.kubernetes.io/job-name"
LABEL_COMPLETION = "batch.kubernetes.io/job-completion-index"
LABEL_ANCESTOR = "trainer.kubeflow.org/trainjob-ancestor-step"
ANCESTOR_TRAINER = "trainer"
NODE = "node"
TRAINER_PORT = 29500
COMPLETION_INDEX_PATH = f"metadata.annotations['{LABEL_COMPLETION}']"
TORCH_RESERVED_ENV = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
)
ACTIVE_PHASES = ("Pending", "Running")
RESYNC_SECONDS = 1.0

# Upstream's manifests/base/runtimes/torch_distributed.yaml at v2.3.0, with the sandbox's
# fail-fast Job (restartPolicy Never, backoffLimit 0) and the twin's local base image.
TORCH_DISTRIBUTED: JSON = {
    "apiVersion": API_VERSION,
    "kind": "ClusterTrainingRuntime",
    "metadata": {
        "name": "torch-distributed",
        "labels": {"trainer.kubeflow.org/framework": "torch"},
    },
    "spec": {
        "mlPolicy": {"numNodes": 1, "torch": {}},
        "template": {
            "spec": {
                "replicatedJobs": [
                    {
                        "name": NODE,
                        "template": {
                            "metadata": {"labels": {LABEL_ANCESTOR: ANCESTOR_TRAINER}},
                            "spec": {
                                "backoffLimit": 0,
                                "template": {
                                    "spec": {
                                        "restartPolicy": "Never",
                                        "containers": [
                                            {"name": NODE, "image": "robotics-cd/busybox:latest"}
                                        ],
                                    }
                                },
                            },
                        },
                    }
                ]
            }
        },
    },
}


async def start(ctx: Any) -> None:
    """Twin component entry point: install the default runtime, run the controller."""
    controller = TrainJobController(ctx.store)
    controller.install_default_runtime()
    ctx.spawn(controller.run(), "trainjob-controller")


# --- conditions (metav1.Condition, meta.SetStatusCondition) -------------------------------------


def condition(status: JSON, ctype: str) -> JSON | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == ctype), None)


def is_true(status: JSON, ctype: str) -> bool:
    cond = condition(status, ctype)
    return cond is not None and cond.get("status") == "True"


def is_finished(status: JSON) -> bool:
    return is_true(status, "Complete") or is_true(status, "Failed")


def set_condition(
    status: JSON, ctype: str, value: str, reason: str, message: str, stamp: str
) -> None:
    """meta.SetStatusCondition: lastTransitionTime changes only when the status does."""
    conditions: list[JSON] = status.setdefault("conditions", [])
    current = condition(status, ctype)
    if current is None:
        conditions.append(
            {
                "type": ctype,
                "status": value,
                "reason": reason,
                "message": message,
                "lastTransitionTime": stamp,
            }
        )
        return
    if current.get("status") != value:
        current["lastTransitionTime"] = stamp
    current.update(status=value, reason=reason, message=message)


# --- building the JobSet from the runtime ---------------------------------------------------------


def _upsert(items: list[JSON], new: list[JSON], key: str = "name") -> list[JSON]:
    """apply.UpsertEnvVars and friends: replace by key, append what is new, keep order."""
    result = [dict(i) for i in items]
    for item in new:
        for index, old in enumerate(result):
            if old.get(key) == item.get(key):
                result[index] = dict(item)
                break
        else:
            result.append(dict(item))
    return result


def _cpu_per_node(resources: JSON) -> int:
    """getNumCPUPerNode: the CPU limit (else request) rounded up, 0 when unset."""
    for section in ("limits", "requests"):
        value = str((resources.get(section) or {}).get("cpu") or "")
        if value:
            millis = int(value[:-1]) if value.endswith("m") else round(float(value) * 1000)
            return math.ceil(millis / 1000)
    return 0


def _gpus_per_node(resources: JSON) -> int:
    for section in ("limits", "requests"):
        value = (resources.get(section) or {}).get("nvidia.com/gpu")
        if value is not None:
            return int(value)
    return 0


def torch_env(job: JSON, num_nodes: int, resources: JSON) -> list[JSON]:
    """The torch plugin's env (pkg/runtime/framework/plugins/torch/torch.go, v2.3.0)."""
    name = job["metadata"]["name"]
    trainer = job["spec"].get("trainer") or {}
    nproc: str = "auto"
    if trainer.get("numProcPerNode") is not None:
        nproc = str(int(trainer["numProcPerNode"]))
    elif _gpus_per_node(resources) == 0:
        nproc = str(max(1, _cpu_per_node(resources)))
    return [
        {"name": "PET_NNODES", "value": str(num_nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": nproc},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_PATH}}},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-{NODE}-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)},
    ]


def _apply_patches(job: JSON, replicated: list[JSON]) -> None:
    """``spec.runtimePatches``: pod metadata, volumes and named containers' mounts/env."""
    by_name = {rj["name"]: rj for rj in replicated}
    for patch in job["spec"].get("runtimePatches") or []:
        template = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get(
            "spec"
        ) or {}
        for rj_patch in template.get("replicatedJobs") or []:
            target = by_name.get(rj_patch.get("name"))
            if target is None:
                continue
            pod_patch = ((rj_patch.get("template") or {}).get("spec") or {}).get("template") or {}
            pod = target["template"]["spec"].setdefault("template", {})
            meta = pod.setdefault("metadata", {})
            for field in ("labels", "annotations"):
                extra = (pod_patch.get("metadata") or {}).get(field) or {}
                if extra:
                    meta[field] = {**(meta.get(field) or {}), **extra}
            spec_patch = pod_patch.get("spec") or {}
            spec = pod.setdefault("spec", {})
            if spec_patch.get("volumes"):
                spec["volumes"] = _upsert(spec.get("volumes") or [], spec_patch["volumes"])
            for c_patch in spec_patch.get("containers") or []:
                for container in spec.get("containers") or []:
                    if container.get("name") == c_patch.get("name"):
                        for field in ("volumeMounts", "env"):
                            if c_patch.get(field):
                                key = "mountPath" if field == "volumeMounts" else "name"
                                container[field] = _upsert(
                                    container.get(field) or [], c_patch[field], key
                                )


def build_jobset(job: JSON, runtime: JSON) -> JSON:
    """The JobSet Trainer's jobset plugin would apply for ``job`` on ``runtime``."""
    name = job["metadata"]["name"]
    trainer = job["spec"].get("trainer") or {}
    runtime_spec = runtime.get("spec") or {}
    ml_policy = runtime_spec.get("mlPolicy") or {}
    template = copy.deepcopy(runtime_spec.get("template") or {})
    replicated: list[JSON] = (template.get("spec") or {}).get("replicatedJobs") or []
    for rj in replicated:
        rj.setdefault("replicas", 1)
        job_template = rj.setdefault("template", {})
        ancestor = ((job_template.get("metadata") or {}).get("labels") or {}).get(LABEL_ANCESTOR)
        if ancestor != ANCESTOR_TRAINER:
            continue
        job_spec = job_template.setdefault("spec", {})
        num_nodes = int(trainer.get("numNodes") or ml_policy.get("numNodes") or 1)
        job_spec.update(parallelism=num_nodes, completions=num_nodes, completionMode="Indexed")
        pod_spec = job_spec.setdefault("template", {}).setdefault("spec", {})
        for container in pod_spec.get("containers") or []:
            if container.get("name") != NODE:
                continue
            for field in ("image", "command", "args"):
                if trainer.get(field):
                    container[field] = copy.deepcopy(trainer[field])
            resources = trainer.get("resourcesPerNode") or container.get("resources") or {}
            if trainer.get("resourcesPerNode"):
                container["resources"] = copy.deepcopy(resources)
            container["env"] = _upsert(container.get("env") or [], trainer.get("env") or [])
            if "torch" in ml_policy:
                container["env"] = _upsert(container["env"], torch_env(job, num_nodes, resources))
                container["ports"] = _upsert(
                    container.get("ports") or [],
                    [{"containerPort": TRAINER_PORT}],
                    "containerPort",
                )
    _apply_patches(job, replicated)
    spec = template.setdefault("spec", {})
    spec["network"] = {
        "enableDNSHostnames": True,
        "subdomain": name,
        "publishNotReadyAddresses": True,
    }
    spec["suspend"] = bool(job["spec"].get("suspend"))
    return {
        "apiVersion": JOBSET_API,
        "kind": JOBSET_KIND,
        "metadata": {
            "name": name,
            "namespace": job["metadata"]["namespace"],
            "labels": dict((template.get("metadata") or {}).get("labels") or {}),
            "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
            "ownerReferences": [owner_reference(job, API_VERSION, KIND)],
        },
        "spec": spec,
    }


def owner_reference(obj: JSON, api_version: str, kind: str) -> JSON:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_job_name(jobset: str, replicated_job: str, job_index: int) -> str:
    return f"{jobset}-{replicated_job}-{job_index}"


def build_pod(jobset: JSON, rj: JSON, job_index: int, completion: int) -> JSON:
    """One pod of an Indexed child Job, as the Job controller names and labels it."""
    name = jobset["metadata"]["name"]
    child = child_job_name(name, rj["name"], job_index)
    template = copy.deepcopy(rj["template"]["spec"].get("template") or {})
    meta = template.get("metadata") or {}
    spec = template.get("spec") or {}
    spec.setdefault("restartPolicy", "OnFailure")
    spec["hostname"] = f"{child}-{completion}"
    spec["subdomain"] = jobset["spec"].get("network", {}).get("subdomain") or name
    ids = {
        LABEL_JOBSET: name,
        LABEL_RJOB: rj["name"],
        LABEL_JOB_INDEX: str(job_index),
        LABEL_JOB_NAME: child,
        "job-name": child,
        LABEL_COMPLETION: str(completion),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"{child}-{completion}-",
            "namespace": jobset["metadata"]["namespace"],
            "labels": {**(meta.get("labels") or {}), **ids},
            "annotations": {**(meta.get("annotations") or {}), **ids},
            "ownerReferences": [owner_reference(jobset, JOBSET_API, JOBSET_KIND)],
        },
        "spec": spec,
    }


def build_service(jobset: JSON) -> JSON:
    """The JobSet's headless Service: ``<pod hostname>.<jobset>`` resolves through it."""
    name = jobset["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": jobset["spec"].get("network", {}).get("subdomain") or name,
            "namespace": jobset["metadata"]["namespace"],
            "labels": {LABEL_JOBSET: name},
            "ownerReferences": [owner_reference(jobset, JOBSET_API, JOBSET_KIND)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_JOBSET: name},
            "publishNotReadyAddresses": True,
        },
    }


# --- pod status helpers ----------------------------------------------------------------------------


def _phase(pod: JSON) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def _restarts(pod: JSON) -> int:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return sum(int(s.get("restartCount") or 0) for s in statuses)


def _ready(pod: JSON) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


# --- the controller ----------------------------------------------------------------------------


class TrainJobController:
    """Reconciles every TrainJob on store events and on a short resync tick."""

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
        self._waiting_for_runtime: set[str] = set()

    def install_default_runtime(self) -> None:
        with contextlib.suppress(ApiError):  # 409: an operator installed its own
            self.store.create(copy.deepcopy(TORCH_DISTRIBUTED))

    async def run(self) -> None:
        while True:
            try:
                await self._run_once()
            except ApiError as exc:
                if exc.status != 410:
                    raise
                log.warning("trainjob controller fell behind the store; re-listing")

    async def _run_once(self) -> None:
        subscription = self.store.subscribe()
        pump = asyncio.create_task(self._pump(subscription), name="trainjob-events")
        try:
            last_resync = 0.0
            while True:
                if pump.done():
                    pump.result()
                    return
                if time.monotonic() - last_resync >= self.resync:
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
            # The pump's own end (cancelled, 410) is collected; a cancellation of this task
            # while waiting for it still propagates (suppressing it would loop run() forever).
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
        if obj.get("apiVersion") in (API_VERSION, JOBSET_API) and obj.get("kind") in (
            KIND,
            JOBSET_KIND,
        ):
            return meta.get("namespace", ""), meta.get("name", "")
        if obj.get("kind") == "Pod":
            jobset = (meta.get("labels") or {}).get(LABEL_JOBSET)
            if jobset:
                return meta.get("namespace", ""), jobset
        return None

    def _mark_all(self) -> None:
        for job in self.store.list(API_VERSION, KIND):
            if not is_finished(job.get("status") or {}):
                self._dirty.add((job["metadata"]["namespace"], job["metadata"]["name"]))

    def reconcile_safely(self, namespace: str, name: str) -> None:
        try:
            self.reconcile(namespace, name)
        except ApiError as exc:
            log.info("reconcile %s/%s: %s; retrying on the next event", namespace, name, exc)
            self._dirty.add((namespace, name))

    # -- one reconcile ------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> None:
        try:
            job = self.store.get(API_VERSION, KIND, namespace, name)
        except ApiError as exc:
            if exc.status == 404:
                return  # deleted: garbage collection took the JobSet and its pods
            raise
        if job["metadata"].get("deletionTimestamp"):
            return  # being deleted (foreground): its pods are going, none are made
        status: JSON = copy.deepcopy(job.get("status") or {})
        before = copy.deepcopy(status)
        if is_finished(status):
            return
        now = self.clock()
        stamp = _now_text(now)
        ref = job["spec"].get("runtimeRef") or {}
        group = ref.get("apiGroup") or GROUP
        kind = ref.get("kind") or "ClusterTrainingRuntime"
        if group != GROUP or kind not in RUNTIME_KINDS:
            set_condition(
                status,
                "Failed",
                "True",
                "TrainingRuntimeNotSupported",
                f"unsupported runtime: {kind}.{group}",
                stamp,
            )
            return self._write(job, status, before)
        runtime = self._runtime(job, kind, str(ref.get("name") or ""))
        if runtime is None:
            return

        suspended = bool(job["spec"].get("suspend"))
        if suspended:
            set_condition(status, "Suspended", "True", "Suspended", "TrainJob is suspended", stamp)
        elif is_true(status, "Suspended"):
            set_condition(status, "Suspended", "False", "Resumed", "TrainJob is resumed", stamp)

        jobset = self._ensure_jobset(job, runtime, suspended)
        if not suspended and self._past_deadline(job, status, now):
            set_condition(
                status,
                "Failed",
                "True",
                "DeadlineExceeded",
                "TrainJob exceeded its active deadline",
                stamp,
            )
            self._delete(JOBSET_API, JOBSET_KIND, jobset)
            return self._write(job, status, before)

        self._ensure_service(jobset)
        pods = self._owned_pods(jobset)
        js_status = self._sync_jobset(jobset, pods, suspended, stamp)
        if is_true(js_status, "Completed"):
            done = copy.deepcopy(condition(js_status, "Completed") or {})
            set_condition(
                status,
                "Complete",
                "True",
                done["reason"],
                done["message"],
                done["lastTransitionTime"],
            )
        if is_true(js_status, "Failed"):
            failed = copy.deepcopy(condition(js_status, "Failed") or {})
            set_condition(
                status,
                "Failed",
                "True",
                failed["reason"],
                failed["message"],
                failed["lastTransitionTime"],
            )
        status["jobsStatus"] = [
            {"name": s["name"], **{k: v for k, v in s.items() if k != "name"}}
            for s in js_status.get("replicatedJobsStatus") or []
        ]
        self._write(job, status, before)

    def _runtime(self, job: JSON, kind: str, name: str) -> JSON | None:
        namespace = job["metadata"]["namespace"] if kind == "TrainingRuntime" else None
        try:
            runtime = self.store.get(API_VERSION, kind, namespace, name)
        except ApiError as exc:
            if exc.status != 404:
                raise
            key = f"{job['metadata']['namespace']}/{job['metadata']['name']}"
            if key not in self._waiting_for_runtime:
                self._waiting_for_runtime.add(key)
                log.warning("TrainJob %s: %s %r not found; waiting for it", key, kind, name)
            return None
        return runtime

    def _write(self, job: JSON, status: JSON, before: JSON) -> None:
        if status != before:
            meta = job["metadata"]
            self.store.update_status(API_VERSION, KIND, meta["namespace"], meta["name"], status)

    def _past_deadline(self, job: JSON, status: JSON, now: float) -> bool:
        seconds = job["spec"].get("activeDeadlineSeconds")
        if not seconds:
            return False
        resumed = condition(status, "Suspended")
        if resumed is not None and resumed.get("status") == "False":
            started = _parse_time(resumed.get("lastTransitionTime"))
        else:
            started = _parse_time(job["metadata"].get("creationTimestamp"))
        return started is not None and now - started > int(seconds)

    # -- children ----------------------------------------------------------------------------

    def _ensure_jobset(self, job: JSON, runtime: JSON, suspended: bool) -> JSON:
        meta = job["metadata"]
        try:
            jobset = self.store.get(JOBSET_API, JOBSET_KIND, meta["namespace"], meta["name"])
        except ApiError as exc:
            if exc.status != 404:
                raise
            return self.store.create(build_jobset(job, runtime))
        if bool(jobset["spec"].get("suspend")) != suspended:
            jobset = self.store.patch(
                JOBSET_API,
                JOBSET_KIND,
                meta["namespace"],
                meta["name"],
                {"spec": {"suspend": suspended}},
            )
        return jobset

    def _ensure_service(self, jobset: JSON) -> None:
        with contextlib.suppress(ApiError):  # 409: it is there
            self.store.create(build_service(jobset))

    def _owned_pods(self, jobset: JSON) -> list[JSON]:
        uid = jobset["metadata"]["uid"]
        found = self.store.list(
            "v1", "Pod", jobset["metadata"]["namespace"], {LABEL_JOBSET: jobset["metadata"]["name"]}
        )
        return [
            p
            for p in found
            if any(r.get("uid") == uid for r in p["metadata"].get("ownerReferences") or [])
        ]

    def _delete(self, api_version: str, kind: str, obj: JSON) -> None:
        meta = obj["metadata"]
        with contextlib.suppress(ApiError):
            self.store.delete(api_version, kind, meta["namespace"], meta["name"])

    def _sync_jobset(self, jobset: JSON, pods: list[JSON], suspended: bool, stamp: str) -> JSON:
        """The Job and JobSet controllers' part: pods per index, counts, conditions."""
        status: JSON = copy.deepcopy(jobset.get("status") or {})
        before = copy.deepcopy(status)
        finished = is_true(status, "Completed") or is_true(status, "Failed")
        rj_statuses: list[JSON] = []
        any_failed = False
        all_succeeded = True
        for rj in jobset["spec"].get("replicatedJobs") or []:
            counts = {"ready": 0, "succeeded": 0, "failed": 0, "active": 0, "suspended": 0}
            job_spec = rj["template"].get("spec") or {}
            completions = int(job_spec.get("completions") or job_spec.get("parallelism") or 1)
            backoff = int(job_spec.get("backoffLimit", 6))
            policy = (job_spec.get("template") or {}).get("spec", {}).get(
                "restartPolicy"
            ) or "OnFailure"
            for job_index in range(int(rj.get("replicas", 1))):
                mine = [
                    p
                    for p in pods
                    if p["metadata"]["labels"].get(LABEL_RJOB) == rj["name"]
                    and p["metadata"]["labels"].get(LABEL_JOB_INDEX) == str(job_index)
                ]
                if suspended:
                    for pod in mine:
                        if _phase(pod) in ACTIVE_PHASES:
                            self._delete("v1", "Pod", pod)
                    counts["suspended"] += 1
                    all_succeeded = False
                    continue
                outcome = self._sync_child(
                    jobset, rj, job_index, mine, completions, backoff, policy, finished
                )
                if outcome == "succeeded":
                    counts["succeeded"] += 1
                elif outcome == "failed":
                    counts["failed"] += 1
                    any_failed = True
                else:
                    all_succeeded = False
                    if outcome in ("active", "ready"):
                        counts["active"] += 1
                    if outcome == "ready":
                        counts["ready"] += 1
            rj_statuses.append({"name": rj["name"], **counts})
        status["replicatedJobsStatus"] = rj_statuses
        if not finished and not suspended:
            if any_failed:
                set_condition(
                    status,
                    "Failed",
                    "True",
                    "FailedJobs",
                    "jobset failed due to one or more job failures",
                    stamp,
                )
                for pod in self._owned_pods(jobset):  # the failed JobSet's jobs are stopped
                    if _phase(pod) in ACTIVE_PHASES:
                        self._delete("v1", "Pod", pod)
            elif all_succeeded:
                set_condition(
                    status,
                    "Completed",
                    "True",
                    "AllJobsCompleted",
                    "jobset completed successfully",
                    stamp,
                )
        if suspended:
            set_condition(
                status, "Suspended", "True", "SuspendedJobs", "jobset is suspended", stamp
            )
        elif condition(status, "Suspended") is not None:
            set_condition(status, "Suspended", "False", "ResumeJobs", "jobset is resumed", stamp)
        if status != before:
            meta = jobset["metadata"]
            self.store.update_status(
                JOBSET_API, JOBSET_KIND, meta["namespace"], meta["name"], status
            )
        return status

    def _sync_child(
        self,
        jobset: JSON,
        rj: JSON,
        job_index: int,
        pods: list[JSON],
        completions: int,
        backoff: int,
        policy: str,
        finished: bool,
    ) -> str:
        """One Indexed child Job: 'succeeded', 'failed', 'ready', 'active' or 'pending'."""
        failures = (
            sum(1 for p in pods if _phase(p) == "Failed")
            if policy == "Never"
            else sum(_restarts(p) for p in pods) + sum(1 for p in pods if _phase(p) == "Failed")
        )
        by_index: dict[int, list[JSON]] = {}
        for pod in pods:
            index = int(pod["metadata"]["labels"].get(LABEL_COMPLETION, -1))
            by_index.setdefault(index, []).append(pod)
        if failures > backoff:
            if not finished:
                for pod in pods:
                    if _phase(pod) in ACTIVE_PHASES:
                        self._delete("v1", "Pod", pod)
            return "failed"
        done = 0
        active = 0
        ready = 0
        for index in range(completions):
            mine = by_index.get(index) or []
            if any(_phase(p) == "Succeeded" for p in mine):
                done += 1
                continue
            live = [p for p in mine if _phase(p) in ACTIVE_PHASES]
            if live:
                active += 1
                ready += sum(1 for p in live if _ready(p))
                continue
            if not finished:  # none yet, or the last one failed within the backoff limit
                self.store.create(build_pod(jobset, rj, job_index, index))
                active += 1
        if done == completions:
            return "succeeded"
        if ready + done >= completions:
            return "ready"
        return "active" if active else "pending"
