"""What the reconciler does with a production lease: pure rules, no I/O.

The reconciler never trusts the process that held the lease. It reads two things it can
check from outside: the lease in git (who holds it, when it was last renewed, what the
release has written) and the holder's flow run in Prefect (its state, and its process
where that can be seen from the same host). From those alone it decides:

- ``LEAVE``: the holder is alive (it renews its lease, its process exists), or the lease is
  blocked and waits for an operator;
- ``FREE``: the holder has finished and production holds nothing of it to undo (promoted,
  or already restored, or it never wrote);
- ``RESTORE``: the holder is dead or finished half-way: revert its recorded commits (one
  fenced commit), then free the lease and mark the run ``Crashed`` if Prefect still shows it
  alive.

Liveness is the lease renewal: a release renews its lease from its own progress (every
analysis interval, every sync poll), so a run stuck in a call stops renewing even while its
heartbeat thread goes on. A process seen gone on this host is dead at once. Prefect's
unreachability is never silence: while the API is down, only a lease expired for longer
than ``outage_limit`` as well leads to a restore.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class Action(StrEnum):
    LEAVE = "leave"
    FREE = "free"
    RESTORE = "restore"
    END_RUN = "end-run"  # a dead run holding no lease: marked Crashed, production untouched


class RunPhase(StrEnum):
    """What Prefect says of the holder's flow run, reduced to what the rules need."""

    ACTIVE = "active"  # Running, Pending, AwaitingLock, Resuming...
    WAITING = "waiting"  # Paused/Suspended/Scheduled: holds no process, by design
    PROMOTED = "promoted"  # Completed, named Promoted
    ENDED = "ended"  # any other final state: Failed, Crashed, Cancelled, Rejected...
    MISSING = "missing"  # the run does not exist (deleted, or another server's)
    UNKNOWN = "unknown"  # the Prefect API did not answer


@dataclass(frozen=True)
class LeaseFacts:
    holder: str
    expires_at: datetime
    own_commits: tuple[str, ...] = ()
    blocked: str | None = None  # the reason, when a restore could not be verified


@dataclass(frozen=True)
class HolderFacts:
    phase: RunPhase
    # None: cannot be seen from here (another host, or no pid recorded).
    process_alive: bool | None = None


@dataclass(frozen=True)
class Judgement:
    action: Action
    reason: str
    mark_crashed: bool = False


def phase_of(state_type: str | None, state_name: str | None) -> RunPhase:
    """Prefect's state type and name (``COMPLETED``/``Promoted``...) as a ``RunPhase``."""
    if state_type is None:
        return RunPhase.MISSING
    kind = state_type.upper()
    if kind == "COMPLETED" and (state_name or "") == "Promoted":
        return RunPhase.PROMOTED
    if kind in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
        return RunPhase.ENDED
    if kind in {"PAUSED", "SCHEDULED"}:
        return RunPhase.WAITING
    return RunPhase.ACTIVE


def judge(
    lease: LeaseFacts, holder: HolderFacts, now: datetime, *, outage_limit: timedelta
) -> Judgement:
    """The one decision of the reconciler for one production lease."""
    if lease.blocked:
        return Judgement(Action.LEAVE, f"blocked: {lease.blocked}; an operator must clear it")
    expired = now >= lease.expires_at
    undo = Action.RESTORE if lease.own_commits else Action.FREE
    if holder.phase == RunPhase.PROMOTED:
        return Judgement(Action.FREE, "the release was promoted; its lease was left behind")
    if holder.phase == RunPhase.ENDED:
        return Judgement(undo, "the release ended without letting its lease go")
    if holder.phase == RunPhase.UNKNOWN:
        if now >= lease.expires_at + outage_limit:
            return Judgement(
                undo,
                f"the Prefect API does not answer and the lease expired more than "
                f"{outage_limit} ago",
            )
        return Judgement(Action.LEAVE, "the Prefect API does not answer: no run is judged silent")
    if holder.phase == RunPhase.MISSING:
        if expired:
            return Judgement(undo, "the holder's run does not exist and its lease expired")
        return Judgement(Action.LEAVE, "the holder's run is not visible yet; its lease is live")
    if holder.process_alive is False:
        return Judgement(undo, "the holder's process is gone", mark_crashed=True)
    if expired:
        return Judgement(undo, "the holder stopped renewing its lease", mark_crashed=True)
    return Judgement(Action.LEAVE, "the holder renews its lease")


def lease_expiry(renewed_at: datetime, ttl: timedelta) -> datetime:
    return renewed_at + ttl


def recovery_bound(ttl: timedelta, period: timedelta, sync: timedelta) -> timedelta:
    """Worst case from a runner's death to production restored when only the reconciler
    runs: the lease must expire (``ttl`` after its last renewal), the reconciler must next
    run (up to one ``period``), then one revert commit and its sync."""
    return ttl + period + sync
