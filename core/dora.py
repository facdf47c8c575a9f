"""The five DORA delivery metrics, computed from typed release events (no I/O).

The events come from the manifests repo's history (``tasks/dora.py`` reads them): every
change to production is a commit whose trailers say which release (flow run) made it, from
which source commit and with which image. From them:

    events ──► deployments(events)           one Deployment per release that changed production:
                                              promoted, failed (rolled back) or in progress
           ──► (the reader adds each promoted deployment's source changes and their times)
           ──► dora_report(deployments, changes, since, until)

Definitions (dora.dev, 2026), as measured here; ``docs/dora.md`` gives the edge cases:

- **deployment**: a release that made at least one production commit (a canary step or a
  promotion). Its time is its first production commit, when it began serving production
  traffic; the window selects deployments by that time. Only *finished* deployments
  (promoted or failed) enter the five metrics; in-progress ones are listed apart.
- **change lead time**: for each source commit a promoted deployment shipped for the first
  time, promotion time minus the commit's committer time. Reported as the median (and p90).
- **deployment frequency**: finished deployments in the window, per day and per week.
- **change fail rate**: failed deployments / finished deployments. A deployment failed when
  any of its production commits was undone by a rollback (automatic, aborted, recovered or by
  an operator).
- **failed deployment recovery time**: the rollback's commit time minus the failed
  deployment's time. Median over the failed deployments in the window.
- **deployment rework rate**: rework deployments / finished deployments. A deployment is
  rework when the service's latest finished deployment before it had failed: it is the
  unplanned follow-up of a production failure (the fix, or the retry).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class EventKind(StrEnum):
    CANARY = "canary"  # a canary step of a release in production
    PROMOTE = "promote"  # the release's image became production's stable image
    ROLLBACK = "rollback"  # production restored: undoes named commits (or the live release)


class ReleaseEvent(BaseModel):
    """One commit of the manifests repo that changed a service's production overlay."""

    model_config = ConfigDict(frozen=True)
    kind: EventKind
    service: str
    commit: str = Field(description="The manifests commit.")
    at: datetime = Field(description="Its committer time (timezone-aware).")
    release_id: str | None = Field(
        default=None, description="The release (flow run) that made it: Prefect-Flow-Run."
    )
    source_sha: str | None = Field(default=None, description="Source-Commit trailer.")
    image: str | None = Field(default=None, description="Image trailer (name:tag@digest).")
    undoes: tuple[str, ...] = Field(
        default=(),
        description="For a rollback: the commits it undoes. Empty: it undoes whatever "
        "release production was running (an operator's rollback to an older image).",
    )


class Status(StrEnum):
    PROMOTED = "promoted"
    FAILED = "failed"
    IN_PROGRESS = "in progress"


class Deployment(BaseModel):
    """A release that changed production, and what became of it."""

    service: str
    release_id: str
    source_sha: str | None
    image: str | None
    deployed_at: datetime = Field(description="Its first production commit.")
    commits: tuple[str, ...]
    status: Status
    promoted_at: datetime | None = None
    failed_at: datetime | None = Field(
        default=None, description="When it was rolled back (production recovered)."
    )
    rollback_commit: str | None = None
    rework: bool = Field(
        default=False, description="Its service's previous finished deployment had failed."
    )
    base_source_sha: str | None = Field(
        default=None,
        description="Source commit production ran (last successful deployment) before it: "
        "its changes are the source commits after this one.",
    )

    @property
    def finished(self) -> bool:
        return self.status != Status.IN_PROGRESS

    @property
    def recovery(self) -> timedelta | None:
        if self.failed_at is None:
            return None
        return self.failed_at - self.deployed_at


class SourceChange(BaseModel):
    """A source commit and its committer time."""

    model_config = ConfigDict(frozen=True)
    sha: str
    committed_at: datetime


def deployments(events: Iterable[ReleaseEvent]) -> list[Deployment]:
    """Group production events by release; settle each release's status from the rollbacks."""
    ordered = sorted(events, key=lambda e: e.at)
    found: dict[tuple[str, str], Deployment] = {}
    owner: dict[str, tuple[str, str]] = {}  # production commit -> its deployment
    live: dict[str, tuple[str, str]] = {}  # service -> the deployment production runs
    last_good: dict[str, str | None] = {}  # service -> source sha of the last good deployment
    last_finished: dict[str, Deployment] = {}
    for event in ordered:
        if event.kind == EventKind.ROLLBACK:
            for key in _undone(event, owner, live):
                undone = found[key]
                if undone.status == Status.FAILED:
                    continue
                undone.status = Status.FAILED
                undone.failed_at = event.at
                undone.rollback_commit = event.commit
                last_finished[undone.service] = undone
                if live.get(undone.service) == key:
                    del live[undone.service]
                    last_good[undone.service] = _previous_good(found, undone)
            continue
        if not event.release_id:
            continue  # a production change that no release made (seeding, by hand)
        key = (event.service, event.release_id)
        dep = found.get(key)
        if dep is None:
            previous = last_finished.get(event.service)
            dep = Deployment(
                service=event.service,
                release_id=event.release_id,
                source_sha=event.source_sha,
                image=event.image,
                deployed_at=event.at,
                commits=(),
                status=Status.IN_PROGRESS,
                rework=previous is not None and previous.status == Status.FAILED,
                base_source_sha=last_good.get(event.service),
            )
            found[key] = dep
        dep.commits = (*dep.commits, event.commit)
        dep.source_sha = dep.source_sha or event.source_sha
        dep.image = event.image or dep.image
        owner[event.commit] = key
        if event.kind == EventKind.PROMOTE and dep.status == Status.IN_PROGRESS:
            dep.status = Status.PROMOTED
            dep.promoted_at = event.at
            live[event.service] = key
            last_good[event.service] = dep.source_sha
            last_finished[event.service] = dep
    return sorted(found.values(), key=lambda d: d.deployed_at)


def _undone(
    event: ReleaseEvent, owner: Mapping[str, tuple[str, str]], live: Mapping[str, tuple[str, str]]
) -> list[tuple[str, str]]:
    if not event.undoes:
        current = live.get(event.service)
        return [current] if current else []
    keys: list[tuple[str, str]] = []
    for sha in event.undoes:
        key = next((owner[c] for c in owner if c.startswith(sha) or sha.startswith(c)), None)
        if key is not None and key not in keys:
            keys.append(key)
    return keys


def _previous_good(found: Mapping[tuple[str, str], Deployment], failed: Deployment) -> str | None:
    """The source production runs again after ``failed`` was rolled back."""
    earlier = [
        d
        for d in found.values()
        if d.service == failed.service
        and d.status == Status.PROMOTED
        and d.promoted_at is not None
        and d.promoted_at < failed.deployed_at
    ]
    return (
        max(earlier, key=lambda d: d.deployed_at).source_sha if earlier else failed.base_source_sha
    )


# --- the report ----------------------------------------------------------------------------


class Summary(BaseModel):
    """Median and p90 of a list of durations (seconds), with the count behind them."""

    count: int
    median_seconds: float | None
    p90_seconds: float | None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Summary:
        if not seconds:
            return cls(count=0, median_seconds=None, p90_seconds=None)
        values = sorted(seconds)
        rank = max(0, math.ceil(0.9 * len(values)) - 1)  # nearest-rank p90
        return cls(
            count=len(values),
            median_seconds=float(statistics.median(values)),
            p90_seconds=float(values[rank]),
        )


class DoraReport(BaseModel):
    """The five metrics over one window, and the deployments behind them."""

    service: str | None = Field(description="None: every service together.")
    since: datetime
    until: datetime
    deployments: int = Field(description="Finished deployments in the window.")
    promoted: int
    failed: int
    rework: int
    in_progress: list[str] = Field(description="Release ids still in progress (not counted).")
    awaiting_fix: list[str] = Field(
        description="Failed release ids after which the service has had no successful "
        "deployment yet (production runs the older release)."
    )
    deployments_per_day: float
    deployments_per_week: float
    lead_time: Summary = Field(description="Change lead time, per source commit.")
    change_fail_rate: float | None = Field(description="failed / deployments; None: none.")
    recovery_time: Summary = Field(description="Failed deployment recovery time.")
    rework_rate: float | None = Field(description="rework / deployments; None: none.")
    releases: list[Deployment] = Field(description="Every deployment in the window.")


def dora_report(
    all_deployments: Sequence[Deployment],
    changes: Mapping[str, Sequence[SourceChange]],
    *,
    since: datetime,
    until: datetime,
    service: str | None = None,
) -> DoraReport:
    """The metrics of the deployments that began in ``[since, until)``.

    ``changes`` maps a promoted deployment's release id to the source commits it shipped for
    the first time (the reader computes them from ``base_source_sha..source_sha``).
    """
    if until <= since:
        raise ValueError(f"empty window: {since.isoformat()} .. {until.isoformat()}")
    mine = [d for d in all_deployments if service is None or d.service == service]
    window = [d for d in mine if since <= d.deployed_at < until]
    finished = [d for d in window if d.finished]
    failed = [d for d in finished if d.status == Status.FAILED]
    promoted = [d for d in finished if d.status == Status.PROMOTED]
    rework = [d for d in finished if d.rework]
    leads: list[float] = []
    for dep in promoted:
        if dep.promoted_at is None:
            continue
        for change in changes.get(dep.release_id, ()):
            leads.append(max(0.0, (dep.promoted_at - change.committed_at).total_seconds()))
    recoveries = [r.total_seconds() for d in failed if (r := d.recovery) is not None]
    days = (until - since).total_seconds() / 86400
    n = len(finished)
    return DoraReport(
        service=service,
        since=since,
        until=until,
        deployments=n,
        promoted=len(promoted),
        failed=len(failed),
        rework=len(rework),
        in_progress=[d.release_id for d in window if not d.finished],
        awaiting_fix=_awaiting_fix(mine, window),
        deployments_per_day=n / days,
        deployments_per_week=n / days * 7,
        lead_time=Summary.of(leads),
        change_fail_rate=len(failed) / n if n else None,
        recovery_time=Summary.of(recoveries),
        rework_rate=len(rework) / n if n else None,
        releases=window,
    )


def _awaiting_fix(history: Sequence[Deployment], window: Sequence[Deployment]) -> list[str]:
    """Failed deployments in the window not followed (same service) by a promoted one."""
    waiting = []
    for dep in window:
        if dep.status != Status.FAILED:
            continue
        later = [
            d
            for d in history
            if d.service == dep.service
            and d.deployed_at > dep.deployed_at
            and d.status == Status.PROMOTED
        ]
        if not later:
            waiting.append(dep.release_id)
    return waiting


def weekly(
    all_deployments: Sequence[Deployment],
    changes: Mapping[str, Sequence[SourceChange]],
    *,
    until: datetime,
    weeks: int,
    service: str | None = None,
) -> list[DoraReport]:
    """One report per week, oldest first, the last one ending at ``until``."""
    return [
        dora_report(
            all_deployments,
            changes,
            since=until - timedelta(weeks=weeks - i),
            until=until - timedelta(weeks=weeks - i - 1),
            service=service,
        )
        for i in range(weeks)
    ]


def format_seconds(seconds: float | None) -> str:
    """``3d4h``, ``2h05m``, ``4m10s``, ``12s``; ``-`` for none."""
    if seconds is None:
        return "-"
    total = round(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def render_text(report: DoraReport) -> str:
    """The report as the CLI prints it."""
    who = report.service or "all services"
    lines = [
        f"DORA metrics for {who}, {report.since:%Y-%m-%d %H:%M} .. {report.until:%Y-%m-%d %H:%M} UTC",
        f"  deployments                      {report.deployments} "
        f"({report.promoted} promoted, {report.failed} failed)",
        f"  deployment frequency             {report.deployments_per_day:.2f}/day, "
        f"{report.deployments_per_week:.1f}/week",
        f"  change lead time                 median {format_seconds(report.lead_time.median_seconds)}, "
        f"p90 {format_seconds(report.lead_time.p90_seconds)} over {report.lead_time.count} changes",
        f"  change fail rate                 {format_rate(report.change_fail_rate)} "
        f"({report.failed} of {report.deployments})",
        "  failed deployment recovery time  median "
        f"{format_seconds(report.recovery_time.median_seconds)} over {report.recovery_time.count}",
        f"  deployment rework rate           {format_rate(report.rework_rate)} "
        f"({report.rework} of {report.deployments})",
    ]
    if report.in_progress:
        lines.append(f"  in progress (not counted)        {', '.join(report.in_progress)}")
    if report.awaiting_fix:
        lines.append(f"  rolled back, no fix deployed yet {', '.join(report.awaiting_fix)}")
    return "\n".join(lines)
