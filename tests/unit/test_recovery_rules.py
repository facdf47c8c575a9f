"""The reconciler's decision for one production lease, on plain facts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.recovery import (
    Action,
    HolderFacts,
    LeaseFacts,
    RunPhase,
    judge,
    phase_of,
    recovery_bound,
)

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
OUTAGE = timedelta(minutes=5)
LIVE = NOW + timedelta(seconds=20)
EXPIRED = NOW - timedelta(seconds=1)


def lease(expires_at: datetime = LIVE, commits: tuple[str, ...] = ("a" * 40,), **kw) -> LeaseFacts:
    return LeaseFacts(holder="run-1", expires_at=expires_at, own_commits=commits, **kw)


@pytest.mark.parametrize(
    ("state_type", "name", "phase"),
    [
        ("RUNNING", "Running", RunPhase.ACTIVE),
        ("RUNNING", "AwaitingLock", RunPhase.ACTIVE),
        ("PENDING", "Pending", RunPhase.ACTIVE),
        ("PAUSED", "Suspended", RunPhase.WAITING),
        ("SCHEDULED", "Frozen", RunPhase.WAITING),
        ("COMPLETED", "Promoted", RunPhase.PROMOTED),
        ("COMPLETED", "Rejected", RunPhase.ENDED),
        ("FAILED", "Superseded", RunPhase.ENDED),
        ("CRASHED", "Crashed", RunPhase.ENDED),
        ("CANCELLED", "Cancelled", RunPhase.ENDED),
        (None, None, RunPhase.MISSING),
    ],
)
def test_prefect_states_map_to_phases(state_type, name, phase) -> None:
    assert phase_of(state_type, name) == phase


def test_a_live_holder_that_renews_is_left_alone() -> None:
    got = judge(lease(), HolderFacts(RunPhase.ACTIVE, process_alive=True), NOW, outage_limit=OUTAGE)
    assert got.action == Action.LEAVE


def test_a_heartbeating_run_that_stopped_renewing_is_restored_and_marked_crashed() -> None:
    # Prefect shows it Running (its heartbeat thread goes on) but the lease says otherwise.
    got = judge(lease(EXPIRED), HolderFacts(RunPhase.ACTIVE), NOW, outage_limit=OUTAGE)
    assert got.action == Action.RESTORE and got.mark_crashed


def test_a_dead_process_is_restored_before_its_lease_expires() -> None:
    got = judge(
        lease(), HolderFacts(RunPhase.ACTIVE, process_alive=False), NOW, outage_limit=OUTAGE
    )
    assert got.action == Action.RESTORE and got.mark_crashed


def test_a_dead_holder_that_never_wrote_only_frees_the_lease() -> None:
    got = judge(lease(EXPIRED, commits=()), HolderFacts(RunPhase.ACTIVE), NOW, outage_limit=OUTAGE)
    assert got.action == Action.FREE


@pytest.mark.parametrize("phase", [RunPhase.ENDED])
def test_an_ended_holder_that_kept_the_lease_is_restored(phase) -> None:
    got = judge(lease(), HolderFacts(phase), NOW, outage_limit=OUTAGE)
    assert got.action == Action.RESTORE and not got.mark_crashed


def test_a_promoted_holder_only_frees_the_lease() -> None:
    got = judge(lease(EXPIRED), HolderFacts(RunPhase.PROMOTED), NOW, outage_limit=OUTAGE)
    assert got.action == Action.FREE


def test_a_blocked_lease_waits_for_an_operator_whatever_the_holder() -> None:
    for phase in RunPhase:
        got = judge(lease(EXPIRED, blocked="rollback unverified"), HolderFacts(phase), NOW,
                    outage_limit=OUTAGE)  # fmt: skip
        assert got.action == Action.LEAVE and "operator" in got.reason


def test_prefect_down_is_not_silence_until_the_outage_limit() -> None:
    down = HolderFacts(RunPhase.UNKNOWN)
    assert judge(lease(EXPIRED), down, NOW, outage_limit=OUTAGE).action == Action.LEAVE
    long_ago = NOW - OUTAGE - timedelta(seconds=1)
    assert judge(lease(long_ago), down, NOW, outage_limit=OUTAGE).action == Action.RESTORE


def test_a_missing_run_is_judged_by_its_lease() -> None:
    missing = HolderFacts(RunPhase.MISSING)
    assert judge(lease(), missing, NOW, outage_limit=OUTAGE).action == Action.LEAVE
    assert judge(lease(EXPIRED), missing, NOW, outage_limit=OUTAGE).action == Action.RESTORE


def test_recovery_bound_adds_ttl_period_and_sync() -> None:
    bound = recovery_bound(timedelta(seconds=30), timedelta(seconds=15), timedelta(seconds=20))
    assert bound == timedelta(seconds=65)
