"""Workload controllers of the twin: Deployments, ReplicaSets and Jobs, as the real
kube-controller-manager runs them, enough for the sandbox's services and hooks.

They only read and write the object store (the kubelet runs the pods they create), are
level-triggered (each pass looks at everything) and write ``status`` with the fields and
conditions the real controllers write, so Argo CD–style health and ``kubectl rollout
status`` read them as they would on a cluster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from typing import Any

from sandbox.runtime import events
from sandbox.runtime.objects import (
    JSON,
    annotations_of,
    condition,
    int_or_percent,
    labels_of,
    now_iso,
    owned_by,
    owner_ref,
    parse_time,
    pod_active,
    pod_ready,
    selector_matches,
    set_condition,
)

log = logging.getLogger("sandbox.runtime.workloads")

REVISION = "deployment.kubernetes.io/revision"
HASH_LABEL = "pod-template-hash"


def _suffix() -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    return "".join(secrets.choice(alphabet) for _ in range(5))


def template_hash(template: JSON) -> str:
    """A stable hash of a pod template (the real one is FNV; any stable hash will do)."""
    text = json.dumps(template, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    number = int(digest[:16], 16)
    out = ""
    for _ in range(10):
        number, rem = divmod(number, len(alphabet))
        out += alphabet[rem]
    return out


class Controllers:
    """Deployment, ReplicaSet and Job controllers over one object store."""

    def __init__(self, store: Any, backoff_initial: float = 1.0, backoff_max: float = 10.0):
        self.store = store
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        # Job uid -> monotonic time before which no replacement pod is created.
        self._job_backoff: dict[str, float] = {}
        # Job uid -> the uids of its pods already counted in status.succeeded/failed (the
        # job controller's finalizer accounting: a pod is counted once, and stays counted
        # after it is deleted).
        self._job_counted: dict[str, set[str]] = {}
        # Job uid -> the uids of every pod of it seen (one that vanishes uncounted failed).
        self._job_seen: dict[str, set[str]] = {}

    def reconcile_all(self) -> None:
        from sandbox.kube.store import ApiError

        for kind, api_version, fn in (
            ("Deployment", "apps/v1", self.reconcile_deployment),
            ("ReplicaSet", "apps/v1", self.reconcile_replicaset),
            ("Job", "batch/v1", self.reconcile_job),
            ("PersistentVolumeClaim", "v1", self.reconcile_claim),
        ):
            for obj in self.store.list(api_version, kind):
                if obj["metadata"].get("deletionTimestamp"):
                    continue  # being deleted (foreground): its dependents are going, none new
                try:
                    fn(obj)
                except ApiError as exc:
                    # 404/409: the object changed under us; the next pass sees the new one.
                    if exc.status not in (404, 409):
                        log.exception("%s %s: %s", kind, obj["metadata"]["name"], exc)
                except Exception:
                    log.exception("reconciling %s %s failed", kind, obj["metadata"]["name"])

    # -- helpers ---------------------------------------------------------------------------

    def _pods_of(self, owner: JSON) -> list[JSON]:
        ns = owner["metadata"]["namespace"]
        return [p for p in self.store.list("v1", "Pod", ns) if owned_by(p, owner)]

    def _update_status(self, obj: JSON, status: JSON) -> None:
        if status != obj.get("status"):
            m = obj["metadata"]
            self.store.update_status(
                obj["apiVersion"], obj["kind"], m["namespace"], m["name"], status
            )

    def _create_pod(
        self, owner: JSON, template: JSON, name: str, extra_labels: dict[str, str]
    ) -> None:
        tmeta = template.get("metadata") or {}
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": owner["metadata"]["namespace"],
                "labels": {**(tmeta.get("labels") or {}), **extra_labels},
                "annotations": dict(tmeta.get("annotations") or {}),
                "ownerReferences": [owner_ref(owner)],
            },
            "spec": json.loads(json.dumps(template.get("spec") or {})),
            "status": {"phase": "Pending"},
        }
        if not pod["metadata"]["annotations"]:
            del pod["metadata"]["annotations"]
        created = self.store.create(pod)
        if owner.get("kind") == "Job":
            self._job_seen.setdefault(owner["metadata"]["uid"], set()).add(
                created["metadata"]["uid"]
            )
            events.record(
                self.store,
                owner,
                "SuccessfulCreate",
                f"Created pod: {created['metadata']['name']}",
                component="job-controller",
            )

    # -- ReplicaSets -----------------------------------------------------------------------

    def reconcile_replicaset(self, rs: JSON) -> None:
        spec = rs.get("spec") or {}
        want = int(spec.get("replicas", 1))
        pods = [p for p in self._pods_of(rs) if pod_active(p)]
        name = rs["metadata"]["name"]
        ns = rs["metadata"]["namespace"]
        if len(pods) < want:
            for _ in range(want - len(pods)):
                self._create_pod(rs, spec.get("template") or {}, f"{name}-{_suffix()}", {})
            pods = [p for p in self._pods_of(rs) if pod_active(p)]
        elif len(pods) > want:
            # Remove not-ready pods first, then the youngest (as the controller ranks them).
            newest_first = sorted(
                pods, key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True
            )
            ranked = sorted(newest_first, key=pod_ready)
            doomed = ranked[: len(pods) - want]
            for pod in doomed:
                self.store.delete("v1", "Pod", ns, pod["metadata"]["name"])
            pods = [p for p in pods if p not in doomed]
        ready = [p for p in pods if pod_ready(p)]
        selector = spec.get("selector")
        status: JSON = {
            "replicas": len(pods),
            "fullyLabeledReplicas": sum(
                1 for p in pods if selector_matches(selector, labels_of(p))
            ),
            "readyReplicas": len(ready),
            "availableReplicas": len(ready),
            "observedGeneration": rs["metadata"].get("generation", 1),
        }
        for key in ("readyReplicas", "availableReplicas"):
            if status[key] == 0:
                del status[key]
        self._update_status(rs, status)

    # -- Deployments -----------------------------------------------------------------------

    def reconcile_deployment(self, dep: JSON) -> None:
        spec = dep.get("spec") or {}
        meta = dep["metadata"]
        ns = meta["namespace"]
        replicas = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        phash = template_hash(template)
        all_rs = [rs for rs in self.store.list("apps/v1", "ReplicaSet", ns) if owned_by(rs, dep)]
        new_rs = next((rs for rs in all_rs if labels_of(rs).get(HASH_LABEL) == phash), None)
        old_rs = [rs for rs in all_rs if rs is not new_rs]
        created = False
        if spec.get("paused"):
            return
        if new_rs is None:
            revision = 1 + max([int(annotations_of(rs).get(REVISION, "0")) for rs in all_rs] or [0])
            new_rs = self._create_rs(dep, template, phash, revision, 0 if old_rs else replicas)
            created = True
        strategy = spec.get("strategy") or {}
        if strategy.get("type") == "Recreate":
            self._recreate(dep, new_rs, old_rs, replicas)
        else:
            self._rolling(dep, new_rs, old_rs, replicas, strategy.get("rollingUpdate") or {})
        self._trim_history(dep, old_rs)
        # Re-read what the ReplicaSets now say about their pods.
        all_rs = [rs for rs in self.store.list("apps/v1", "ReplicaSet", ns) if owned_by(rs, dep)]
        new_rs = next(rs for rs in all_rs if labels_of(rs).get(HASH_LABEL) == phash)
        self._deployment_status(dep, new_rs, all_rs, replicas, created)

    def _create_rs(
        self, dep: JSON, template: JSON, phash: str, revision: int, replicas: int
    ) -> JSON:
        meta = dep["metadata"]
        spec = dep.get("spec") or {}
        tmpl = json.loads(json.dumps(template))
        tmpl.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = phash
        selector = json.loads(json.dumps(spec.get("selector") or {}))
        selector.setdefault("matchLabels", {})[HASH_LABEL] = phash
        rs: JSON = {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": f"{meta['name']}-{phash}",
                "namespace": meta["namespace"],
                "labels": {**(tmpl["metadata"].get("labels") or {})},
                "annotations": {
                    REVISION: str(revision),
                    "deployment.kubernetes.io/desired-replicas": str(spec.get("replicas", 1)),
                },
                "ownerReferences": [owner_ref(dep)],
            },
            "spec": {
                "replicas": replicas,
                "minReadySeconds": spec.get("minReadySeconds", 0),
                "selector": selector,
                "template": tmpl,
            },
        }
        log.info(
            "deployment %s/%s: new replica set %s",
            meta["namespace"],
            meta["name"],
            rs["metadata"]["name"],
        )
        return dict(self.store.create(rs))

    def _scale(self, rs: JSON, replicas: int) -> None:
        if int((rs.get("spec") or {}).get("replicas", 1)) != replicas:
            m = rs["metadata"]
            self.store.patch(
                "apps/v1", "ReplicaSet", m["namespace"], m["name"], {"spec": {"replicas": replicas}}
            )
            rs.setdefault("spec", {})["replicas"] = replicas

    @staticmethod
    def _spec_replicas(rs: JSON) -> int:
        return int((rs.get("spec") or {}).get("replicas", 1))

    @staticmethod
    def _available(rs: JSON) -> int:
        return int((rs.get("status") or {}).get("availableReplicas", 0))

    def _rolling(
        self, dep: JSON, new_rs: JSON, old_rs: list[JSON], replicas: int, rolling: JSON
    ) -> None:
        surge = int_or_percent(rolling.get("maxSurge", "25%"), replicas, round_up=True)
        unavailable = int_or_percent(rolling.get("maxUnavailable", "25%"), replicas, round_up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        if not old_rs or all(self._spec_replicas(r) == 0 for r in old_rs):
            self._scale(new_rs, replicas)
            for rs in old_rs:
                self._scale(rs, 0)
            return
        # Scale up the new ReplicaSet within replicas + maxSurge.
        total = self._spec_replicas(new_rs) + sum(self._spec_replicas(r) for r in old_rs)
        room = replicas + surge - total
        if room > 0 and self._spec_replicas(new_rs) < replicas:
            self._scale(new_rs, min(replicas, self._spec_replicas(new_rs) + room))
        # Scale down old ReplicaSets while keeping replicas - maxUnavailable available.
        min_available = replicas - unavailable
        available = self._available(new_rs) + sum(self._available(r) for r in old_rs)
        budget = available - min_available
        for rs in sorted(old_rs, key=lambda r: int(annotations_of(r).get(REVISION, "0"))):
            current = self._spec_replicas(rs)
            if current == 0:
                continue
            # Unavailable old pods can go at once: they do not count toward availability.
            unhealthy = max(0, current - self._available(rs))
            cut = min(current, unhealthy + max(0, budget))
            budget -= max(0, cut - unhealthy)
            if cut > 0:
                self._scale(rs, current - cut)

    def _recreate(self, dep: JSON, new_rs: JSON, old_rs: list[JSON], replicas: int) -> None:
        for rs in old_rs:
            self._scale(rs, 0)
        old_pods = [p for rs in old_rs for p in self._pods_of(rs) if pod_active(p)]
        if not old_pods:
            self._scale(new_rs, replicas)

    def _trim_history(self, dep: JSON, old_rs: list[JSON]) -> None:
        limit = int((dep.get("spec") or {}).get("revisionHistoryLimit", 10))
        idle = [
            rs
            for rs in old_rs
            if self._spec_replicas(rs) == 0
            and int((rs.get("status") or {}).get("replicas", 0)) == 0
        ]
        idle.sort(key=lambda r: int(annotations_of(r).get(REVISION, "0")))
        for rs in idle[: max(0, len(idle) - limit)]:
            m = rs["metadata"]
            self.store.delete("apps/v1", "ReplicaSet", m["namespace"], m["name"])

    def _deployment_status(
        self, dep: JSON, new_rs: JSON, all_rs: list[JSON], replicas: int, created: bool
    ) -> None:
        spec = dep.get("spec") or {}
        old_status = dep.get("status") or {}
        st = [rs.get("status") or {} for rs in all_rs]
        total = sum(int(s.get("replicas", 0)) for s in st)
        updated = int((new_rs.get("status") or {}).get("replicas", 0))
        ready = sum(int(s.get("readyReplicas", 0)) for s in st)
        available = sum(int(s.get("availableReplicas", 0)) for s in st)
        spec_total = sum(self._spec_replicas(rs) for rs in all_rs)
        rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
        max_unavailable = (
            0
            if (spec.get("strategy") or {}).get("type") == "Recreate"
            else int_or_percent(rolling.get("maxUnavailable", "25%"), replicas, round_up=False)
        )
        status: JSON = {
            "observedGeneration": dep["metadata"].get("generation", 1),
            "replicas": total,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": available,
            "unavailableReplicas": max(0, spec_total - available),
        }
        for key in (
            "replicas",
            "updatedReplicas",
            "readyReplicas",
            "availableReplicas",
            "unavailableReplicas",
        ):
            if status[key] == 0:
                del status[key]
        conditions: list[JSON] = list(old_status.get("conditions") or [])
        if available >= replicas - max_unavailable:
            conditions = set_condition(
                conditions,
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
                with_update_time=True,
                touch=False,
            )
        else:
            conditions = set_condition(
                conditions,
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
                with_update_time=True,
                touch=False,
            )
        rs_name = new_rs["metadata"]["name"]
        complete = (
            updated == replicas
            and total == replicas
            and available == replicas
            and int((new_rs.get("status") or {}).get("availableReplicas", 0)) == replicas
        )
        progressed = (
            created
            or updated > int(old_status.get("updatedReplicas", 0))
            or ready > int(old_status.get("readyReplicas", 0))
            or available > int(old_status.get("availableReplicas", 0))
            or total < int(old_status.get("replicas", 0))
        )
        progressing = condition({"status": {"conditions": conditions}}, "Progressing")
        deadline = int(spec.get("progressDeadlineSeconds", 600))
        if complete:
            conditions = set_condition(
                conditions,
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                f'ReplicaSet "{rs_name}" has successfully progressed.',
                with_update_time=True,
                touch=False,
            )
        elif created:
            conditions = set_condition(
                conditions,
                "Progressing",
                "True",
                "NewReplicaSetCreated",
                f'Created new replica set "{rs_name}"',
                with_update_time=True,
            )
        elif (
            progressed
            or progressing is None
            or dep["metadata"].get("generation") != old_status.get("observedGeneration")
        ):
            conditions = set_condition(
                conditions,
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                f'ReplicaSet "{rs_name}" is progressing.',
                with_update_time=True,
            )
        elif progressing.get("reason") in ("NewReplicaSetAvailable", "ProgressDeadlineExceeded"):
            # As upstream: a finished rollout that loses a pod is not "progressing" again,
            # and a timed-out one stays timed out until something moves.
            pass
        else:
            last = parse_time(progressing.get("lastUpdateTime"))
            if last is not None and time.time() - last.timestamp() > deadline:
                conditions = set_condition(
                    conditions,
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    f'ReplicaSet "{rs_name}" has timed out progressing.',
                    with_update_time=True,
                )
        status["conditions"] = conditions
        self._update_status(dep, status)

    # -- PersistentVolumeClaims ------------------------------------------------------------

    def reconcile_claim(self, claim: JSON) -> None:
        """Bind at once, as a dynamic provisioner would: the data lives in a Docker volume
        named after the claim, made when a pod first mounts it."""
        spec = claim.get("spec") or {}
        storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
        status = {
            "phase": "Bound",
            "accessModes": list(spec.get("accessModes") or ["ReadWriteOnce"]),
            "capacity": {"storage": storage},
        }
        self._update_status(claim, status)

    # -- Jobs ------------------------------------------------------------------------------

    def reconcile_job(self, job: JSON) -> None:
        spec = job.get("spec") or {}
        meta = job["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        old = job.get("status") or {}
        conditions: list[JSON] = list(old.get("conditions") or [])
        finished = any(
            c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
            for c in conditions
        )
        if finished:
            self._job_ttl(job)
            return
        completions = int(spec.get("completions", 1) if spec.get("completions") is not None else 1)
        parallelism = int(spec.get("parallelism", 1) if spec.get("parallelism") is not None else 1)
        backoff_limit = int(spec.get("backoffLimit", 6))
        template = spec.get("template") or {}
        restart_policy = (template.get("spec") or {}).get("restartPolicy", "Never")
        pods = self._pods_of(job)
        active = [p for p in pods if pod_active(p)]
        succeeded, failed_pods = self._count_finished(uid, old, pods)
        restarts = sum(
            int(cs.get("restartCount", 0))
            for p in pods
            for cs in (p.get("status") or {}).get("containerStatuses") or []
        )
        # With OnFailure, container restarts count toward the backoff limit (as upstream).
        failures = failed_pods + (restarts if restart_policy == "OnFailure" else 0)
        status: JSON = {
            "startTime": old.get("startTime") or now_iso(),
            "active": len(active),
            "succeeded": succeeded,
            "failed": failed_pods,
            "ready": sum(1 for p in active if pod_ready(p)),
            "uncountedTerminatedPods": {},
        }
        started = parse_time(status["startTime"])
        deadline = spec.get("activeDeadlineSeconds")
        now = now_iso()
        fail_reason = None
        if failures > backoff_limit:
            fail_reason = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        elif (
            deadline is not None and started and time.time() - started.timestamp() > float(deadline)
        ):
            fail_reason = ("DeadlineExceeded", "Job was active longer than specified deadline")
        if fail_reason is not None:
            for pod in active:
                self.store.delete("v1", "Pod", ns, pod["metadata"]["name"])
            status["active"] = 0
            status["ready"] = 0
            conditions = set_condition(conditions, "FailureTarget", "True", *fail_reason)
            conditions = set_condition(conditions, "Failed", "True", *fail_reason)
            for c in conditions:
                c.setdefault("lastProbeTime", now)
            status["conditions"] = conditions
            log.info("job %s/%s failed: %s", ns, name, fail_reason[0])
            events.record(
                self.store,
                job,
                fail_reason[0],
                fail_reason[1],
                type_="Warning",
                component="job-controller",
            )
        elif succeeded >= completions:
            status["completionTime"] = now
            conditions = set_condition(
                conditions,
                "SuccessCriteriaMet",
                "True",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            )
            conditions = set_condition(
                conditions,
                "Complete",
                "True",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            )
            for c in conditions:
                c.setdefault("lastProbeTime", now)
            status["conditions"] = conditions
            log.info("job %s/%s complete", ns, name)
            events.record(self.store, job, "Completed", "Job completed", component="job-controller")
        else:
            want = min(parallelism, completions - succeeded) - len(active)
            if want > 0 and time.monotonic() >= self._job_backoff.get(uid, 0.0):
                for _ in range(want):
                    self._create_pod(
                        job,
                        template,
                        f"{name}-{_suffix()}",
                        {
                            "batch.kubernetes.io/controller-uid": uid,
                            "batch.kubernetes.io/job-name": name,
                            "controller-uid": uid,
                            "job-name": name,
                        },
                    )
                status["active"] = len(active) + want
                if failed_pods:
                    delay = min(self.backoff_initial * 2 ** (failed_pods - 1), self.backoff_max)
                    self._job_backoff[uid] = time.monotonic() + delay
            if conditions:
                status["conditions"] = conditions
        for key in ("active", "succeeded", "failed", "ready"):
            if status[key] == 0:
                del status[key]
        self._update_status(job, status)

    def _count_finished(self, uid: str, old: JSON, pods: list[JSON]) -> tuple[int, int]:
        """status.succeeded and status.failed, cumulative as the job controller keeps them:
        each pod counted once, when it finishes; a pod deleted before it succeeded counts as
        failed from its deletionTimestamp on (no podFailurePolicy), so a Job whose running
        pod is deleted does not start a new pod past its backoffLimit (0: the Job fails)."""
        seen = self._job_seen.setdefault(uid, set())
        counted = self._job_counted.get(uid)
        if counted is None:
            # First look at this Job since the twin started: what it has counted so far is
            # in its status, including the finished pods still present.
            counted = {
                p["metadata"]["uid"]
                for p in pods
                if (p.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            }
            self._job_counted[uid] = counted
            if not old:
                counted.clear()
        succeeded, failed = int(old.get("succeeded", 0)), int(old.get("failed", 0))
        present = {p["metadata"]["uid"] for p in pods}
        gone = seen - present - counted  # removed at once (no grace) before it finished
        failed += len(gone)
        counted |= gone
        seen |= present
        for pod in pods:
            pod_uid = pod["metadata"]["uid"]
            if pod_uid in counted:
                continue
            phase = (pod.get("status") or {}).get("phase")
            if phase == "Succeeded":
                succeeded += 1
            elif phase == "Failed" or pod["metadata"].get("deletionTimestamp"):
                failed += 1
            else:
                continue
            counted.add(pod_uid)
        return succeeded, failed

    def _job_ttl(self, job: JSON) -> None:
        ttl = (job.get("spec") or {}).get("ttlSecondsAfterFinished")
        if ttl is None:
            return
        done = parse_time((job.get("status") or {}).get("completionTime")) or parse_time(
            next(
                (
                    c.get("lastTransitionTime")
                    for c in (job.get("status") or {}).get("conditions") or []
                    if c.get("type") in ("Complete", "Failed")
                ),
                None,
            )
        )
        if done and time.time() - done.timestamp() >= float(ttl):
            m = job["metadata"]
            self.store.delete("batch/v1", "Job", m["namespace"], m["name"])
