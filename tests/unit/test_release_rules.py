"""The release flow's decisions, as pure functions (core.release)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.approval import ApprovalDecision
from core.catalog import CanaryPolicy, Catalog
from core.errors import InvalidInput
from core.release import (
    CommandAction,
    EndingKind,
    LeaseRecord,
    LeaseStep,
    ReleasePlan,
    Resume,
    RollbackPlan,
    StepKind,
    commits_to_revert,
    decode_lease,
    encode_lease,
    ending,
    lease_is_free,
    lease_ttl,
    new_lease,
    plan_release,
    read_command,
    renew_period,
    resume_point,
    rollback_plan,
)

NOW = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
A, B, C, D, E = (c * 40 for c in "abcde")
SHA = "1" * 40
DIGEST = "sha256:" + "ab" * 32

CATALOG = Catalog.model_validate(
    {
        "defaults": {
            "push_registry": "push.example.com",
            "pull_registry": "pull.example.com",
            "manifests_repo": "https://git.example.com/m.git",
        },
        "services": {
            "api": {
                "repo": "https://git.example.com/api.git",
                "github": "robotics/api",
                "image": "robotics-serving/api",
                "environments": {
                    "staging": {
                        "path": "serving/api/overlays/staging",
                        "argocd_app": "api-staging",
                        "namespace": "staging",
                        "host": "api.staging.example.com",
                    },
                    "production": {
                        "path": "serving/api/overlays/production",
                        "argocd_app": "api-production",
                        "namespace": "production",
                        "host": "api.example.com",
                    },
                },
                "approvers": ["alice"],
            }
        },
    }
)


def record(**kw: object) -> LeaseRecord:
    base: dict[str, object] = {
        "holder": "run-1",
        "taken_at": NOW,
        "expires_at": NOW + timedelta(hours=1),
        "before": A,
    }
    return LeaseRecord.model_validate(base | kw)


# --- plan checks ----------------------------------------------------------------------------


def test_a_plan_pins_the_pull_registry_and_keeps_the_pushed_image() -> None:
    plan = plan_release(CATALOG, "api", f"push.example.com/robotics-serving/api:t1@{DIGEST}", SHA)
    assert plan.image == f"push.example.com/robotics-serving/api:t1@{DIGEST}"
    assert plan.pull_image == f"pull.example.com/robotics-serving/api:t1@{DIGEST}"
    assert (plan.tag, plan.digest, plan.github) == ("t1", DIGEST, "robotics/api")


@pytest.mark.parametrize(
    ("image", "sha", "error"),
    [
        ("push.example.com/robotics-serving/api:t1", SHA, "tag and a digest"),
        (f"push.example.com/robotics-serving/other:t1@{DIGEST}", SHA, "not api's repository"),
        (f"push.example.com/robotics-serving/api:t1@{DIGEST}", "abc", "sha"),
    ],
)
def test_bad_plans_are_refused_before_any_side_effect(image: str, sha: str, error: str) -> None:
    with pytest.raises(InvalidInput, match=error):
        plan_release(CATALOG, "api", image, sha)


def test_an_unknown_service_is_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown service"):
        plan_release(CATALOG, "nope", f"r/robotics-serving/api:t@{DIGEST}", SHA)


# --- the lease ------------------------------------------------------------------------------


def test_lease_ttl_is_short_and_renewed_three_times_per_ttl() -> None:
    # Changed with issue 15: the TTL is the liveness signal, no longer a whole canary's span.
    slow = CanaryPolicy(steps=[10, 100], interval="60s", analyses_per_step=3)
    assert lease_ttl(slow) == timedelta(minutes=3)
    fast = CanaryPolicy(steps=[50, 100], interval="6s", analyses_per_step=1)
    assert lease_ttl(fast) == timedelta(seconds=90)  # the floor: longer than a blocking call
    assert renew_period(lease_ttl(slow)) == timedelta(minutes=1)


def test_a_blocked_lease_is_free_for_nobody_and_never_expires() -> None:
    held = LeaseRecord(
        holder="run-1", taken_at=NOW, expires_at=NOW + timedelta(seconds=10),
        blocked="restore not verified",
    )  # fmt: skip
    later = NOW + timedelta(days=30)
    assert not held.expired(later)
    assert not lease_is_free(held, "run-2", later)
    assert not lease_is_free(held, "run-1", later)


def test_a_failed_rollback_ends_rollback_failed_and_blocked() -> None:
    result = ending(EndingKind.ROLLBACK_FAILED, PLAN, why="Argo CD never synced")
    assert result.state == "failed" and result.state_name == "RollbackFailed"
    assert result.event == "rollback-failed" and "blocked" in result.message


def test_who_may_take_the_lease() -> None:
    held = record(holder="run-1")
    assert lease_is_free(None, "run-2", NOW)
    assert lease_is_free(held, "run-1", NOW)  # its own (a re-executed run)
    assert not lease_is_free(held, "run-2", NOW)
    assert lease_is_free(held, "run-2", NOW + timedelta(hours=2))  # expired


def test_a_new_lease_records_before_and_a_reexecuted_run_keeps_its_record() -> None:
    fresh = new_lease("run-1", NOW, timedelta(hours=1), B, None, "n1")
    assert (fresh.holder, fresh.before, fresh.commits, fresh.step) == ("run-1", B, [], None)
    written = fresh.with_step(LeaseStep(kind=StepKind.CANARY, weight=10, commit=C), "n2")
    later = NOW + timedelta(minutes=5)
    again = new_lease("run-1", later, timedelta(hours=1), D, written, "n3")
    assert again.before == B  # never recomputed from the head (D)
    assert again.commits == [C] and again.step == written.step
    assert again.expires_at == later + timedelta(hours=1)
    taken_over = new_lease("run-2", later, timedelta(hours=1), D, written, "n4")
    assert (taken_over.before, taken_over.commits) == (D, [])


def test_the_record_grows_by_forward_commits_and_a_rollback_is_a_step_only() -> None:
    r = record(commits=[])
    r = r.with_step(LeaseStep(kind=StepKind.CANARY, weight=10, commit=B), "1")
    r = r.with_step(LeaseStep(kind=StepKind.CANARY, weight=10, commit=B), "2")  # repeat
    r = r.with_step(LeaseStep(kind=StepKind.CANARY, weight=50, commit=C), "3")
    r = r.with_step(LeaseStep(kind=StepKind.ROLLBACK, commit=D), "4")
    assert r.commits == [B, C]
    assert r.rolled_back and r.step is not None and r.step.commit == D


def test_the_lease_record_round_trips_and_reads_format_1() -> None:
    r = record(commits=[B], step=LeaseStep(kind=StepKind.CANARY, weight=25, commit=B))
    text = encode_lease("api-production", r)
    assert text.startswith("lease api-production\n\n{")
    assert decode_lease(text) == r
    v1 = (
        'lease api-production\n\n{"holder": "run-9", "taken_at": "2026-12-07T03:00:00+00:00", '
        '"expires_at": "2026-12-07T05:00:00+00:00", "nonce": "x"}'
    )
    old = decode_lease(v1)
    assert (old.holder, old.before, old.commits, old.step) == ("run-9", None, [], None)


@pytest.mark.parametrize(
    "message",
    [
        "lease x\n\nnot json",
        'lease x\n\n{"holder": "r"}',
        'lease x\n\n{"holder": "r", "taken_at": "2026-12-07T03:00:00+00:00", '
        '"expires_at": "2026-12-07T05:00:00+00:00", "commits": ["HEAD~1"]}',
    ],
)
def test_an_unreadable_lease_record_is_refused(message: str) -> None:
    with pytest.raises(InvalidInput):
        decode_lease(message)


# --- re-execution ---------------------------------------------------------------------------

POLICY = CanaryPolicy(steps=[10, 25, 50, 100])


def test_a_release_with_nothing_written_starts_at_the_first_step() -> None:
    point = resume_point(record(), POLICY)
    assert (point.at, point.step_index, point.resumed) == (Resume.START, 0, False)


def test_a_reexecuted_canary_carries_on_at_its_recorded_weight() -> None:
    step = LeaseStep(kind=StepKind.CANARY, weight=50, commit=C)
    point = resume_point(record(commits=[B, C], step=step), POLICY)
    assert (point.at, point.step_index, point.commits) == (Resume.CANARY, 2, [B, C])
    assert point.resumed


def test_a_weight_the_policy_lacks_resumes_at_the_next_higher_step() -> None:
    step = LeaseStep(kind=StepKind.CANARY, weight=30, commit=C)
    assert resume_point(record(commits=[C], step=step), POLICY).step_index == 2


def test_a_promoted_or_rolled_back_release_carries_on_after_that() -> None:
    promoted = record(commits=[B, C], step=LeaseStep(kind=StepKind.PROMOTE, commit=C))
    assert resume_point(promoted, POLICY).at == Resume.WATCH
    back = record(commits=[B], step=LeaseStep(kind=StepKind.ROLLBACK, commit=D))
    assert resume_point(back, POLICY).at == Resume.ROLLED_BACK


# --- operator commands ----------------------------------------------------------------------


def test_operator_commands() -> None:
    abort = read_command({"command": "abort", "sender": "bob", "reason": "pager"})
    assert (abort.action, abort.reason) == (CommandAction.ABORT, "aborted by bob: pager")
    now = read_command({"command": "promote", "sender": "amy", "reason": "hotfix"})
    assert (now.action, now.reason) == (CommandAction.PROMOTE, "promoted now by amy: hotfix")
    assert read_command({"command": "dance"}).action == CommandAction.IGNORE


# --- endings --------------------------------------------------------------------------------

PLAN = ReleasePlan(
    service="api",
    image=f"p/robotics-serving/api:t1@{DIGEST}",
    pull_image=f"q/robotics-serving/api:t1@{DIGEST}",
    tag="t1",
    digest=DIGEST,
    source_sha=SHA,
    github="robotics/api",
)


def test_each_ending_has_its_outcome_event_and_state() -> None:
    promoted = ending(EndingKind.PROMOTED, PLAN)
    assert (promoted.outcome, promoted.event, promoted.state, promoted.state_name) == (
        "promoted",
        "promoted",
        "completed",
        "Promoted",
    )
    rejected = ending(
        EndingKind.REJECTED,
        PLAN,
        decision=ApprovalDecision(decision="reject", approver="alice", comment="not today"),
    )
    assert rejected.outcome == "rejected by alice: not today"
    assert (rejected.event, rejected.state, rejected.state_name) == (
        "rejected",
        "completed",
        "Rejected",
    )
    superseded = ending(EndingKind.SUPERSEDED, PLAN, why="newer runs")
    assert (superseded.outcome, superseded.event, superseded.state) == (
        "superseded: newer runs",
        "rejected",
        "failed",
    )
    back = ending(EndingKind.ROLLED_BACK, PLAN, why="p99")
    assert (back.outcome, back.event, back.state, back.headline) == (
        "rolled back: p99",
        "rolled-back",
        "failed",
        "api:t1 rolled back: p99",
    )
    with pytest.raises(ValueError):
        ending(EndingKind.REJECTED, PLAN)


# --- rollback -------------------------------------------------------------------------------


def test_a_rollback_reverts_the_releases_own_commits_newest_first_once() -> None:
    assert commits_to_revert([B, C, C, D], set()) == [D, C, B]
    assert commits_to_revert([B, C, D], {D}) == [C, B]
    assert commits_to_revert([], set()) == []
    with pytest.raises(InvalidInput):
        commits_to_revert(["HEAD"], set())


def test_a_rollback_may_act_for_its_release_or_a_dead_one() -> None:
    def plan_for(holder: str | None, *, expired: bool) -> RollbackPlan:
        return rollback_plan(
            "rel",
            me="me",
            holder=holder,
            holder_expired=expired,
            recorded=[B, C],
            already_reverted=set(),
            later_releases=[],
        )

    for holder in ("rel", "me", None):
        plan = plan_for(holder, expired=False)
        assert plan.revert == [C, B] and not plan.refused
    expired = plan_for("other", expired=True)
    assert expired.revert == [C, B]


def test_a_late_rollback_never_overwrites_a_newer_release() -> None:
    held = rollback_plan(
        "rel",
        me="me",
        holder="newer",
        holder_expired=False,
        recorded=[B],
        already_reverted=set(),
        later_releases=[],
    )
    assert held.revert == [] and "newer" in held.refused
    moved_on = rollback_plan(
        "rel",
        me="me",
        holder=None,
        holder_expired=False,
        recorded=[B],
        already_reverted=set(),
        later_releases=["rel", "newer"],
    )
    assert moved_on.revert == [] and "release newer changed production" in moved_on.refused
