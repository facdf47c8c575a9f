"""Resource health the way Argo CD (gitops-engine ``pkg/health``) computes it.

Only the kinds the manifests repo holds have a check; any other kind has no health and is
left out of the application's aggregate, as Argo CD does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HEALTHY = "Healthy"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
SUSPENDED = "Suspended"
MISSING = "Missing"
UNKNOWN = "Unknown"

# gitops-engine's ordering: the worst status of the resources is the app's status.
_ORDER = (HEALTHY, SUSPENDED, PROGRESSING, MISSING, DEGRADED, UNKNOWN)


@dataclass(frozen=True)
class Health:
    status: str
    message: str = ""

    def as_dict(self) -> dict[str, str]:
        out = {"status": self.status}
        if self.message:
            out["message"] = self.message
        return out


def worse(a: str, b: str) -> str:
    return a if _ORDER.index(a) >= _ORDER.index(b) else b


def aggregate(statuses: list[str]) -> str:
    result = HEALTHY
    for status in statuses:
        result = worse(result, status)
    return result


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in obj.get("status", {}).get("conditions") or []}


def deployment_health(obj: dict[str, Any]) -> Health:
    spec, status = obj.get("spec", {}), obj.get("status", {})
    name = obj["metadata"]["name"]
    if spec.get("paused"):
        return Health(SUSPENDED, "Deployment is paused")
    generation = obj["metadata"].get("generation", 0)
    if status.get("observedGeneration", 0) < generation:
        return Health(
            PROGRESSING,
            "Waiting for rollout to finish: observed deployment generation less than desired "
            "generation",
        )
    progressing = _conditions(obj).get("Progressing")
    if progressing and progressing.get("reason") == "ProgressDeadlineExceeded":
        return Health(DEGRADED, f'Deployment "{name}" exceeded its progress deadline')
    replicas = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    total = status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    if updated < replicas:
        return Health(
            PROGRESSING,
            f"Waiting for rollout to finish: {updated} out of {replicas} new replicas have "
            "been updated...",
        )
    if total > updated:
        return Health(
            PROGRESSING,
            f"Waiting for rollout to finish: {total - updated} old replicas are pending "
            "termination...",
        )
    if available < updated:
        return Health(
            PROGRESSING,
            f"Waiting for rollout to finish: {available} of {updated} updated replicas are "
            "available...",
        )
    return Health(HEALTHY)


def job_health(obj: dict[str, Any]) -> Health:
    conditions = _conditions(obj)
    failed, complete = conditions.get("Failed"), conditions.get("Complete")
    if failed and failed.get("status") == "True":
        return Health(DEGRADED, failed.get("message") or "Job failed")
    if complete and complete.get("status") == "True":
        return Health(HEALTHY, complete.get("message", ""))
    if obj.get("spec", {}).get("suspend"):
        return Health(SUSPENDED, "Job is suspended")
    return Health(PROGRESSING, "Job is running")


def _load_balancer_health(obj: dict[str, Any]) -> Health:
    if obj.get("status", {}).get("loadBalancer", {}).get("ingress"):
        return Health(HEALTHY)
    return Health(PROGRESSING)


def service_health(obj: dict[str, Any]) -> Health:
    if obj.get("spec", {}).get("type") == "LoadBalancer":
        return _load_balancer_health(obj)
    return Health(HEALTHY)


def pvc_health(obj: dict[str, Any]) -> Health:
    phase = obj.get("status", {}).get("phase", "")
    if phase == "Bound":
        return Health(HEALTHY)
    if phase == "Lost":
        return Health(DEGRADED)
    return Health(PROGRESSING)


def pod_health(obj: dict[str, Any]) -> Health:
    status = obj.get("status", {})
    phase = status.get("phase", "")
    if phase == "Succeeded":
        return Health(HEALTHY, status.get("message", ""))
    if phase == "Failed":
        return Health(DEGRADED, status.get("message", ""))
    if phase == "Running":
        ready = _conditions(obj).get("Ready")
        if obj.get("spec", {}).get("restartPolicy") == "Always" and not (
            ready and ready.get("status") == "True"
        ):
            return Health(PROGRESSING, status.get("message", ""))
        return Health(HEALTHY)
    return Health(PROGRESSING, status.get("message", ""))


def hpa_health(obj: dict[str, Any]) -> Health:
    conditions = list(_conditions(obj).values())
    for cond in conditions:
        degraded = (cond.get("type") == "AbleToScale" and cond.get("status") == "False") or (
            cond.get("type") == "ScalingActive"
            and cond.get("status") == "False"
            and cond.get("reason") in {"FailedGetResourceMetric", "InvalidSelector"}
        )
        if degraded:
            return Health(DEGRADED, cond.get("message", ""))
    for cond in conditions:
        if cond.get("status") == "True" and cond.get("type") in {"AbleToScale", "ScalingActive"}:
            return Health(HEALTHY, cond.get("message", ""))
    # Argo CD reports "Waiting to Autoscale" until the HPA controller writes conditions; the
    # sandbox has no HPA controller (pods run at the Deployment's replicas), so an HPA that
    # no controller will ever touch counts as healthy rather than keeping every app
    # Progressing forever.
    if not conditions:
        return Health(HEALTHY, "no autoscaler in the sandbox")
    return Health(PROGRESSING, "Waiting to Autoscale")


def application_health(obj: dict[str, Any]) -> Health:
    health = obj.get("status", {}).get("health", {})
    return Health(health.get("status", UNKNOWN), health.get("message", ""))


_CHECKS = {
    ("apps", "Deployment"): deployment_health,
    ("batch", "Job"): job_health,
    ("networking.k8s.io", "Ingress"): _load_balancer_health,
    ("", "Service"): service_health,
    ("", "PersistentVolumeClaim"): pvc_health,
    ("", "Pod"): pod_health,
    ("autoscaling", "HorizontalPodAutoscaler"): hpa_health,
    ("argoproj.io", "Application"): application_health,
}


def resource_health(group: str, kind: str, live: dict[str, Any] | None) -> Health | None:
    """The health of one resource; ``None`` when Argo CD has no check for its kind."""
    check = _CHECKS.get((group, kind))
    if check is None:
        return None
    if live is None:
        return Health(MISSING)
    return check(live)
