"""Sync windows of the Argo CD twin, as Argo CD decides them (``pkg/apis/application/v1alpha1``
``SyncWindows``: ``Matches``, ``Active``, ``CanSync``).

An AppProject's ``spec.syncWindows[]`` each have ``kind`` (``allow`` | ``deny``), ``schedule``
(five-field cron, or a descriptor such as ``@daily``), ``duration`` (a Go duration: ``1h30m``),
``applications`` / ``namespaces`` / ``clusters`` (globs; OR-ed, or AND-ed with
``andOperator: true``), ``manualSync`` and ``timeZone`` (IANA, default UTC).

- A window *matches* an app when one of its non-empty lists matches (all of them with
  ``andOperator``): ``applications`` the app's name, ``namespaces`` its destination
  namespace, ``clusters`` its destination server or name.
- A window is *active* at ``now`` when one of its starts (the schedule read in its time zone)
  is after ``now - duration`` and before ``now``.
- ``canSync`` (what ``GET /api/v1/applications/{name}/syncwindows`` answers, for a manual
  sync): an active deny window blocks unless every active deny window has ``manualSync``; else
  an active allow window allows; else allow windows that are all inactive block unless one of
  them has ``manualSync``; no window at all allows.

The answer (``ApplicationSyncWindowsResponse``) lists ``assignedWindows`` (matching) and
``activeWindows`` (matching and active), each as Argo CD's ``ApplicationSyncWindow``: only
``kind``, ``schedule``, ``duration`` and ``manualSync``; empty lists are left out.
"""

from __future__ import annotations

import fnmatch
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from cronsim import CronSim

JSON = dict[str, Any]
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class WindowError(ValueError):
    """A sync window Argo CD would not accept (bad schedule, duration or time zone)."""


def go_duration(text: str) -> timedelta:
    """Go's ``time.ParseDuration`` for the units sync windows use (``90m``, ``1h30m``)."""
    pos, total = 0, 0.0
    for match in _GO_DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise WindowError(f'time: invalid duration "{text}"')
    return timedelta(seconds=total)


def _globs(patterns: list[str], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def matches(window: JSON, app: JSON) -> bool:
    spec = app.get("spec") or {}
    dest = spec.get("destination") or {}
    name = str((app.get("metadata") or {}).get("name", ""))
    checks = []
    if window.get("applications"):
        checks.append(_globs(list(window["applications"]), name))
    if window.get("namespaces"):
        checks.append(_globs(list(window["namespaces"]), str(dest.get("namespace", ""))))
    if window.get("clusters"):
        clusters = list(window["clusters"])
        checks.append(
            _globs(clusters, str(dest.get("server", "")))
            or _globs(clusters, str(dest.get("name", "")))
        )
    if not checks:
        return False
    return all(checks) if window.get("andOperator") else any(checks)


def active(window: JSON, now: datetime) -> bool:
    """A start of the window lies in (now - duration, now)."""
    try:
        zone = ZoneInfo(str(window.get("timeZone") or "UTC"))
        duration = go_duration(str(window.get("duration", "")))
        local = now.astimezone(zone)
        start = next(iter(CronSim(str(window.get("schedule", "")), local - duration)), None)
    except (ValueError, KeyError) as exc:
        raise WindowError(f"sync window {window.get('schedule')!r}: {exc}") from exc
    return start is not None and start < local


def _public(window: JSON) -> JSON:
    """Argo CD's ``ApplicationSyncWindow``: the four fields the API gives back."""
    return {
        "kind": str(window.get("kind", "")),
        "schedule": str(window.get("schedule", "")),
        "duration": str(window.get("duration", "")),
        "manualSync": bool(window.get("manualSync", False)),
    }


def can_sync(assigned: list[JSON], now: datetime, *, manual: bool = True) -> bool:
    if not assigned:
        return True
    open_now = [w for w in assigned if active(w, now)]
    denies = [w for w in open_now if w.get("kind") == "deny"]
    if denies:
        return manual and all(bool(w.get("manualSync")) for w in denies)
    if any(w.get("kind") == "allow" for w in open_now):
        return True
    closed_allows = [w for w in assigned if w.get("kind") == "allow"]
    if closed_allows:
        return manual and any(bool(w.get("manualSync")) for w in closed_allows)
    return True


def sync_windows_answer(project: JSON | None, app: JSON, now: datetime | None = None) -> JSON:
    """``ApplicationSyncWindowsResponse`` of ``app`` under ``project`` (None: no windows)."""
    now = now or datetime.now(UTC)
    windows = [dict(w) for w in ((project or {}).get("spec") or {}).get("syncWindows") or []]
    assigned = [w for w in windows if matches(w, app)]
    answer: JSON = {"canSync": can_sync(assigned, now)}
    open_now = [_public(w) for w in assigned if active(w, now)]
    if open_now:
        answer["activeWindows"] = open_now
    if assigned:
        answer["assignedWindows"] = [_public(w) for w in assigned]
    return answer
