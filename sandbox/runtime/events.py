"""core/v1 Events, written by the twin's kubelet and controllers as a cluster's are.

``kubectl describe`` and ``kubectl get events`` read them, and so do clients that explain a
failed pod. One Event per occurrence (``count: 1``; the real event recorder's aggregation is
not modelled); they expire after ``EVENT_TTL_SECONDS`` as the API server's do (one hour).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from sandbox.runtime.objects import JSON, now_iso, parse_time

log = logging.getLogger("sandbox.runtime.events")

NODE_NAME = "twin-node"
EVENT_TTL_SECONDS = 3600.0


def record(
    store: Any,
    obj: JSON,
    reason: str,
    message: str,
    *,
    type_: str = "Normal",
    component: str = "kubelet",
    field_path: str | None = None,
) -> None:
    """One Event about ``obj`` in its namespace; a namespace being deleted drops it."""
    from sandbox.kube.store import ApiError

    meta = obj["metadata"]
    now = now_iso()
    involved: JSON = {
        "apiVersion": obj.get("apiVersion", "v1"),
        "kind": obj.get("kind", ""),
        "name": meta["name"],
        "namespace": meta.get("namespace", "default"),
        "uid": meta.get("uid", ""),
        "resourceVersion": meta.get("resourceVersion", ""),
    }
    if field_path:
        involved["fieldPath"] = field_path
    event: JSON = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{meta['name']}.{secrets.token_hex(8)}",
            "namespace": meta.get("namespace", "default"),
        },
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "type": type_,
        "source": {"component": component, "host": NODE_NAME}
        if component == "kubelet"
        else {"component": component},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "reportingComponent": component,
        "reportingInstance": NODE_NAME if component == "kubelet" else component,
    }
    try:
        store.create(event)
    except ApiError as exc:
        # The namespace is going away with its objects: so does what happened in it.
        log.debug(
            "event %s on %s/%s not recorded: %s", reason, involved["namespace"], meta["name"], exc
        )


def expire(store: Any, ttl: float = EVENT_TTL_SECONDS) -> int:
    """Delete Events last seen more than ``ttl`` seconds ago; how many went."""
    from sandbox.kube.store import ApiError

    horizon = time.time() - ttl
    expired = 0
    for event in store.list("v1", "Event"):
        seen = parse_time(event.get("lastTimestamp") or event["metadata"].get("creationTimestamp"))
        if seen is not None and seen.timestamp() < horizon:
            meta = event["metadata"]
            try:
                store.delete("v1", "Event", meta["namespace"], meta["name"])
                expired += 1
            except ApiError as exc:
                if exc.status != 404:
                    raise
    return expired
