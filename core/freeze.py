"""Freeze windows: when production takes no release, and until when. Pure, no I/O.

A window is either recurring (a cron expression giving its starts, a duration, a time zone)
or one-off (a start and an end), and always carries a reason people read. The catalog holds
global windows (``freeze:`` at the top) and per-service ones (``services.<svc>.freeze:``);
both apply to the service. Staging is never frozen: only the production part of a release
asks.

:func:`active_freeze` answers "is production frozen at t, why, and until when": the end is
the end of the whole frozen stretch, so two windows that overlap or touch count as one (a
release resumed at the end of the first would otherwise start in the second).

An Argo CD sync window that denies the production app is a freeze too.
:func:`argocd_freezes` reads what Argo CD answers for the app
(``GET /api/v1/applications/{name}/syncwindows``: ``assignedWindows``, ``activeWindows``,
``canSync``, each window only ``kind``, ``schedule``, ``duration``, ``manualSync``) with the
project's ``spec.syncWindows`` for what that answer leaves out (``timeZone``,
``description``): every assigned ``deny`` window is a recurring freeze, and when the app has
``allow`` windows and none is open (Argo CD says it cannot sync, and no deny window is
active), production is frozen until the next allow window opens.
:func:`from_argocd_sync_window` turns one project window into a window of this module.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.durations import Duration, parse_duration
from core.errors import InvalidInput

# A frozen stretch made of windows that keep touching is followed this far, no further.
MAX_CHAINED_WINDOWS = 200


def _check_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {value!r} (an IANA name such as UTC, Europe/Berlin, Asia/Shanghai)"
        ) from None
    return value


def _check_cron(value: str) -> str:
    try:
        CronSim(value, datetime(2026, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise ValueError(
            f"not a cron expression: {value!r} ({exc}); five fields: minute hour "
            "day-of-month month day-of-week, e.g. '0 18 * * 5' for Fridays at 18:00"
        ) from None
    return value


class FreezeWindow(BaseModel):
    """One freeze window of the catalog: recurring (``cron`` + ``duration``) or one-off
    (``start`` + ``end``), in ``timezone``, with a ``reason``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: str = Field(min_length=3, description="Why production is frozen (shown to people).")
    cron: str | None = Field(
        default=None,
        description="Recurring: when each window starts, as a five-field cron expression "
        "read in `timezone` (e.g. '0 18 * * 5': Fridays 18:00).",
    )
    duration: Duration | None = Field(
        default=None, description="Recurring: how long each window lasts (e.g. 62h)."
    )
    start: datetime | None = Field(
        default=None,
        description="One-off: first frozen moment (ISO 8601; without an offset it is read "
        "in `timezone`).",
    )
    end: datetime | None = Field(
        default=None, description="One-off: first moment no longer frozen (same rules)."
    )
    timezone: str = Field(default="UTC", description="IANA time zone of the cron and dates.")
    name: str = Field(default="", description="A short label (defaults to the reason).")

    @field_validator("timezone")
    @classmethod
    def _zone_ok(cls, value: str) -> str:
        return _check_zone(value)

    @field_validator("cron")
    @classmethod
    def _cron_ok(cls, value: str | None) -> str | None:
        return None if value is None else _check_cron(value)

    @model_validator(mode="after")
    def _one_kind(self) -> FreezeWindow:
        recurring = self.cron is not None or self.duration is not None
        one_off = self.start is not None or self.end is not None
        if recurring and one_off:
            raise ValueError(
                "a freeze window is either recurring (cron + duration) or one-off "
                "(start + end), not both"
            )
        if recurring:
            if self.cron is None or self.duration is None:
                raise ValueError("a recurring freeze window needs both cron and duration")
            if self.duration <= timedelta(0):
                raise ValueError("duration must be positive")
        elif one_off:
            if self.start is None or self.end is None:
                raise ValueError("a one-off freeze window needs both start and end")
            if self.localize(self.end) <= self.localize(self.start):
                raise ValueError("end must be after start")
        else:
            raise ValueError("a freeze window needs cron + duration, or start + end")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def label(self) -> str:
        return self.name or self.reason

    def localize(self, value: datetime) -> datetime:
        return value if value.tzinfo is not None else value.replace(tzinfo=self.zone)

    def covering(self, at: datetime) -> tuple[datetime, datetime] | None:
        """The occurrence of this window that covers ``at`` (start, end), or None."""
        at = _aware(at)
        if self.start is not None and self.end is not None:
            start, end = self.localize(self.start), self.localize(self.end)
            return (start, end) if start <= at < end else None
        if self.cron is None or self.duration is None:
            return None
        # Starts at or before ``at`` (cronsim's reverse order excludes its own start time,
        # and cron resolves to minutes: ask from the next whole minute).
        local = at.astimezone(self.zone)
        probe = local.replace(second=0, microsecond=0) + timedelta(minutes=1)
        best: tuple[datetime, datetime] | None = None
        for begin in CronSim(self.cron, probe, reverse=True):
            if begin + self.duration <= at:
                break  # this start and every earlier one ended before ``at``
            if begin <= at:
                end = begin + self.duration
                if best is None or end > best[1]:
                    best = (begin, end)
        return best

    def next_start(self, after: datetime) -> datetime | None:
        """The first start of this window strictly after ``after`` (None: no more)."""
        after = _aware(after)
        if self.start is not None:
            start = self.localize(self.start)
            return start if start > after else None
        if self.cron is None:
            return None
        return next(iter(CronSim(self.cron, after.astimezone(self.zone))), None)


@dataclass(frozen=True)
class Freeze:
    """Production is frozen now: until ``until``, for ``reasons`` (one per window met)."""

    until: datetime
    reasons: tuple[str, ...]
    scopes: tuple[str, ...]

    def describe(self) -> str:
        when = self.until.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return f"production is frozen until {when}: {'; '.join(self.reasons)}"


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise InvalidInput(f"a time without a zone cannot be judged against freezes: {value}")
    return value


def active_freeze(
    windows: list[tuple[str, FreezeWindow]] | list[FreezeWindow], at: datetime
) -> Freeze | None:
    """The freeze in force at ``at``, or None. ``windows`` are ``(scope, window)`` pairs
    (scope: ``global`` or the service) or bare windows. The end follows overlapping and
    touching windows to the end of the whole frozen stretch."""
    scoped = [w if isinstance(w, tuple) else ("global", w) for w in windows]
    at = _aware(at)
    reasons: list[str] = []
    scopes: list[str] = []
    until: datetime | None = None
    probe = at
    for _ in range(MAX_CHAINED_WINDOWS):
        extended = False
        for scope, window in scoped:
            hit = window.covering(probe)
            if hit is None:
                continue
            if window.label not in reasons:
                reasons.append(window.label)
                scopes.append(scope)
            if until is None or hit[1] > until:
                until, extended = hit[1], True
        if until is None:
            return None
        if not extended:
            break
        probe = until
    if until is None:
        return None
    return Freeze(until=until.astimezone(UTC), reasons=tuple(reasons), scopes=tuple(scopes))


def is_frozen_at(
    windows: list[tuple[str, FreezeWindow]] | list[FreezeWindow], at: datetime
) -> bool:
    return active_freeze(windows, at) is not None


def next_freeze(
    windows: list[tuple[str, FreezeWindow]] | list[FreezeWindow], after: datetime
) -> datetime | None:
    """When the next freeze begins after ``after`` (for the approval form's warning)."""
    found = [w.next_start(after) for w in (x[1] if isinstance(x, tuple) else x for x in windows)]
    upcoming = [f for f in found if f is not None]
    return min(upcoming).astimezone(UTC) if upcoming else None


def from_argocd_sync_window(window: dict[str, Any], app: str) -> FreezeWindow | None:
    """An Argo CD AppProject sync window (``spec.syncWindows[]``) as a freeze, when it
    denies ``app`` (``kind: deny`` and ``applications`` globs matching it). Allow windows
    and windows of other apps give None. ``manualSync: true`` lets manual syncs through in
    Argo CD, but production is synced only by us, so it freezes all the same."""
    if str(window.get("kind", "")).lower() != "deny":
        return None
    patterns = [str(p) for p in window.get("applications") or []]
    if not any(fnmatch.fnmatchcase(app, p) for p in patterns):
        return None
    return _argocd_window(window, app, reason=_argocd_reason(window, app))


def _argocd_window(window: dict[str, Any], app: str, *, reason: str) -> FreezeWindow:
    """One Argo CD sync window (its ``schedule``, ``duration``, ``timeZone``,
    ``description``) as a recurring window of this module."""
    try:
        return FreezeWindow(
            reason=str(window.get("description") or reason),
            cron=str(window.get("schedule", "")),
            duration=parse_duration(str(window.get("duration", ""))),
            timezone=str(window.get("timeZone") or "UTC"),
        )
    except ValueError as exc:
        raise InvalidInput(f"Argo CD sync window of {app} not understood: {exc}") from exc


def _argocd_reason(window: dict[str, Any], app: str) -> str:
    what = f"{window.get('schedule', '')} for {window.get('duration', '')}"
    if str(window.get("kind", "")).lower() == "deny":
        return f"Argo CD sync window ({what}) denies {app}"
    return f"Argo CD allow window ({what}) of {app}"


def _same_window(assigned: dict[str, Any], spec: dict[str, Any]) -> bool:
    return all(
        str(assigned.get(k) or "") == str(spec.get(k) or "")
        for k in ("kind", "schedule", "duration")
    )


def argocd_freezes(
    app: str,
    answer: dict[str, Any],
    project_windows: list[dict[str, Any]],
    now: datetime,
) -> list[FreezeWindow]:
    """The freezes Argo CD puts on ``app`` (the production app), from its sync windows
    answer (``GET /api/v1/applications/{app}/syncwindows``) and the project's
    ``spec.syncWindows`` (for each window's ``timeZone`` and ``description``, which that
    answer leaves out; a window not found there is read in UTC).

    - Each assigned ``deny`` window is a recurring freeze (``manualSync: true`` included:
      Argo CD would let a manual sync through, but a freeze is a decision about releases,
      not about who presses sync, and our production syncs are the release's own).
    - When the app has ``allow`` windows, Argo CD cannot sync it, and no assigned deny
      window is active now, the app is outside every allow window: frozen from ``now``
      until the next one opens (or for a day, re-read then, if none ever opens)."""
    now = _aware(now)
    assigned = [dict(w) for w in answer.get("assignedWindows") or []]
    found: list[FreezeWindow] = []
    allows: list[FreezeWindow] = []
    for window in assigned:
        kind = str(window.get("kind", "")).lower()
        spec = next((dict(p) for p in project_windows if _same_window(window, p)), {})
        merged = {
            **window,
            "timeZone": spec.get("timeZone"),
            "description": spec.get("description"),
        }
        if kind == "deny":
            found.append(_argocd_window(merged, app, reason=_argocd_reason(window, app)))
        elif kind == "allow":
            allows.append(_argocd_window(merged, app, reason=_argocd_reason(window, app)))
    can_sync = answer.get("canSync")
    if allows and can_sync is False and active_freeze(found, now) is None:
        opens = [start for start in (w.next_start(now) for w in allows) if start is not None]
        end = min(opens) if opens else now + timedelta(days=1)
        found.append(
            FreezeWindow(
                reason=f"Argo CD allows {app} to sync only in its allow windows, none open now",
                start=now,
                end=max(end, now + timedelta(seconds=1)),
            )
        )
    return found
