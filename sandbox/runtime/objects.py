"""Small helpers over Kubernetes objects as plain dicts: times, owners, conditions, labels,
quantities. Pure functions, shared by the controllers, the kubelet and the router."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

JSON = dict[str, Any]


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    """RFC 3339 from the store or Docker (nanoseconds allowed) to an aware datetime."""
    if not value or value.startswith("0001-"):
        return None
    text = value.rstrip("Z")
    if "." in text:
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def docker_time(value: str | None) -> str | None:
    parsed = parse_time(value)
    return parsed.strftime("%Y-%m-%dT%H:%M:%SZ") if parsed else None


def meta(obj: JSON) -> JSON:
    return obj.setdefault("metadata", {})  # type: ignore[no-any-return]


def labels_of(obj: JSON) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def annotations_of(obj: JSON) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def owner_ref(owner: JSON) -> JSON:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_by(obj: JSON, owner: JSON) -> bool:
    uid = owner["metadata"]["uid"]
    return any(
        r.get("uid") == uid for r in (obj.get("metadata") or {}).get("ownerReferences") or []
    )


def controller_of(obj: JSON) -> JSON | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return None


def selector_matches(selector: JSON | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions); an empty one matches nothing."""
    if not selector:
        return False
    match_labels = selector.get("matchLabels") or {}
    exprs = selector.get("matchExpressions") or []
    if not match_labels and not exprs:
        return False
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for expr in exprs:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and present and labels.get(key) in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def service_selects(service: JSON, labels: dict[str, str]) -> bool:
    """A Service's plain map selector; a Service without one selects no pod."""
    selector = (service.get("spec") or {}).get("selector") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def condition(obj: JSON, type_: str) -> JSON | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def set_condition(
    conditions: list[JSON],
    type_: str,
    status: str,
    reason: str,
    message: str,
    *,
    with_update_time: bool = False,
    touch: bool = True,
) -> list[JSON]:
    """Set one condition, keeping lastTransitionTime unless the status flips.

    ``with_update_time`` adds ``lastUpdateTime`` (Deployments have it), refreshed when
    ``touch`` or when anything about the condition changes.
    """
    now = now_iso()
    old = next((c for c in conditions if c.get("type") == type_), None)
    new: JSON = {"type": type_, "status": status, "reason": reason, "message": message}
    if old and old.get("status") == status:
        new["lastTransitionTime"] = old.get("lastTransitionTime", now)
    else:
        new["lastTransitionTime"] = now
    if with_update_time:
        same = bool(old) and all(old.get(k) == new[k] for k in ("status", "reason", "message"))  # type: ignore[union-attr]
        new["lastUpdateTime"] = (
            old.get("lastUpdateTime", now) if same and not touch and old else now
        )
    rest = [c for c in conditions if c.get("type") != type_]
    if old is not None:
        index = conditions.index(old)
        rest.insert(index, new)
        return rest
    return [*rest, new]


def pod_ready(pod: JSON) -> bool:
    cond = condition(pod, "Ready")
    return bool(cond and cond.get("status") == "True")


def pod_active(pod: JSON) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", "Failed") and not meta(pod).get("deletionTimestamp")


_QUANTITY = re.compile(r"^([0-9.]+(?:[eE][-+]?[0-9]+)?)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity ("500m", "128Mi", 2) as a number."""
    if isinstance(value, int | float):
        return float(value)
    match = _QUANTITY.match(str(value).strip())
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"not a resource quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def int_or_percent(value: Any, total: int, *, round_up: bool) -> int:
    """maxSurge/maxUnavailable: an int, or "25%" of ``total`` rounded as the controller does."""
    if value is None:
        return 0
    if isinstance(value, str) and value.endswith("%"):
        exact = total * float(value[:-1]) / 100
        whole = int(exact)
        return whole + 1 if round_up and whole < exact else whole
    return int(value)
