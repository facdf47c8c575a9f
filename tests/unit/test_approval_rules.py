"""Approval rules: comment commands, quorum counting, break-glass, reminders, and the
catalog's approval policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.approval import (
    Vote,
    break_glass,
    decide,
    parse_command,
    release_short_id,
    reminder_due,
    reminder_text,
    tally,
)
from core.errors import CatalogError, InvalidInput
from tests.unit.test_catalog import GOOD, parse

RUN = "3f2a9c41-7b0e-4d5e-9a63-0c1b2d3e4f50"


def vote(approver: str, decision: str = "approve", **kw: object) -> Vote:
    fields: dict[str, object] = {"path": "github", "authenticated": True, **kw}
    return Vote(decision=decision, approver=approver, **fields)


# --- commands --------------------------------------------------------------------------------


def test_the_short_id_is_the_first_eight_hex_digits_of_the_run() -> None:
    assert release_short_id(RUN) == "3f2a9c41"


def test_approve_and_reject_commands_are_read_from_a_comment() -> None:
    approve = parse_command("Staging looks good.\n/approve 3f2a9c41\nthanks")
    assert approve is not None
    assert (approve.decision, approve.release, approve.break_glass) == (
        "approve",
        "3f2a9c41",
        False,
    )
    reject = parse_command("/reject 3F2A9C41 the p99 on staging is up 40%")
    assert reject is not None
    assert (reject.decision, reject.release, reject.reason) == (
        "reject",
        "3f2a9c41",
        "the p99 on staging is up 40%",
    )
    glass = parse_command("/break-glass 3f2a9c41 hotfix for the outage INC-42")
    assert glass is not None and glass.break_glass and glass.decision == "approve"
    assert glass.reason == "hotfix for the outage INC-42"


@pytest.mark.parametrize(
    "body",
    ["", "LGTM", "please /approve 3f2a9c41 later", "> /approve 3f2a9c41", "/approved 3f2a9c41"],
)
def test_comments_without_a_command_are_not_commands(body: str) -> None:
    assert parse_command(body) is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("/approve", "8-character id"),
        ("/approve api-gateway", "8-character id"),
        ("/reject 3f2a9c41", "needs a reason"),
        ("/break-glass 3f2a9c41", "needs a reason"),
    ],
)
def test_a_malformed_command_says_what_to_write(body: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_command(body)


# --- quorum ----------------------------------------------------------------------------------


def test_one_approval_of_two_leaves_the_release_waiting() -> None:
    result = tally([vote("alice")], 2)
    assert not result.met and not result.decided
    assert result.progress() == "1 of 2 approvals"


def test_two_distinct_authenticated_approvers_meet_a_quorum_of_two() -> None:
    result = tally([vote("alice"), vote("alice", path="ui"), vote("bob")], 2)
    assert result.met and result.approvers == ("alice", "bob")
    assert result.progress() == "2 of 2 approvals"


def test_the_same_person_twice_is_one_approval() -> None:
    assert tally([vote("alice"), vote("alice")], 2).count == 1


def test_unauthenticated_approvals_count_only_for_a_quorum_of_one() -> None:
    ui = vote("alice", path="ui", authenticated=False)
    assert tally([ui], 1).met
    above = tally([ui, vote("bob")], 2)
    assert not above.met and above.approvers == ("bob",)
    assert "unauthenticated approvals do not count" in above.ignored[0]


def test_one_reject_ends_it_whatever_came_before() -> None:
    result = tally([vote("alice"), vote("bob", "reject", comment="no")], 2)
    assert result.decided and not result.met
    assert result.rejected_by is not None and result.rejected_by.approver == "bob"


def test_a_quorum_below_one_is_refused() -> None:
    with pytest.raises(InvalidInput):
        tally([], 0)


def test_break_glass_needs_two_authenticated_people_with_reasons() -> None:
    one = [vote("alice", break_glass=True, comment="INC-42 hotfix")]
    assert break_glass(one, 1) is None
    two = [*one, vote("bob", break_glass=True, comment="agreed, INC-42")]
    glass = break_glass(two, 1)
    assert glass is not None and glass.approvers == ("alice", "bob")
    assert "INC-42 hotfix" in glass.describe()
    # A plain approval is not a break-glass; an unauthenticated one never is.
    assert break_glass([*one, vote("bob")], 1) is None
    assert (
        break_glass([*one, vote("bob", break_glass=True, comment="x", authenticated=False)], 1)
        is None
    )
    # A quorum of three needs three.
    assert break_glass(two, 3) is None
    assert break_glass([*two, vote("carol", "reject", comment="no")], 2) is None


def test_a_vote_describes_its_path() -> None:
    assert vote("alice", login="alice-gh").describe() == "approve by alice (@alice-gh) via github"
    assert "ui, unauthenticated" in vote("bob", path="ui", authenticated=False).describe()


# --- reminders -------------------------------------------------------------------------------

T0 = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)


def test_one_reminder_per_interval_of_waiting() -> None:
    hour = timedelta(hours=1)
    assert reminder_due(T0, T0 + timedelta(minutes=59), hour, 0) is None
    assert reminder_due(T0, T0 + hour, hour, 0) == 1
    assert reminder_due(T0, T0 + timedelta(minutes=90), hour, 1) is None
    assert reminder_due(T0, T0 + 2 * hour, hour, 1) == 2
    # A scheduler that slept through three intervals sends one reminder, the latest.
    assert reminder_due(T0, T0 + 5 * hour, hour, 1) == 5
    assert reminder_due(T0, T0 + 5 * hour, None, 0) is None


def test_a_reminder_names_approvers_and_the_wait() -> None:
    text = reminder_text(
        "api-gateway", "1a2b3c4", ["alice", "bob"], timedelta(minutes=125), "1 of 2 approvals"
    )
    assert text == (
        "api-gateway `1a2b3c4` has waited 2 h 05 min for approval (1 of 2 approvals); "
        "approvers: alice, bob"
    )


# --- the catalog's approval policy -----------------------------------------------------------


def with_approval(block: str) -> str:
    return GOOD.replace("    approvers: [alice, bob]\n", "    approvers: [alice, bob]\n" + block)


def test_the_catalog_takes_quorum_reminders_and_github_logins() -> None:
    catalog = parse(
        with_approval(
            "    approval:\n      required: 2\n      remind_after: 30m\n"
            "      github: {alice-gh: alice, Bob-Builder: bob}\n"
        )
    )
    policy = catalog.approval_policy("api-gateway")
    assert policy.required == 2 and policy.remind_after == timedelta(minutes=30)
    assert policy.approver_for("bob-builder") == "bob"
    assert policy.approver_for("mallory") is None
    defaults = parse(GOOD).approval_policy("api-gateway")
    assert defaults.required == 1 and defaults.remind_after is None and defaults.github == {}


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("    approval:\n      required: 3\n", "the quorum could never be met"),
        ("    approval:\n      required: 0\n", "greater than or equal to 1"),
        ("    approval:\n      github: {alice-gh: mallory}\n", "mallory, who are not in approvers"),
        ("    approval:\n      github: {'-bad-': alice}\n", "is not a GitHub login"),
        ("    approval:\n      remind_after: soon\n", "not a duration"),
    ],
)
def test_a_bad_approval_policy_names_service_and_why(block: str, message: str) -> None:
    with pytest.raises(CatalogError, match=message) as caught:
        parse(with_approval(block))
    assert caught.value.service == "api-gateway"


def test_a_default_quorum_larger_than_a_services_approvers_is_refused() -> None:
    text = GOOD.replace("services:\n", "  approval:\n    required: 3\nservices:\n")
    with pytest.raises(
        CatalogError, match=r"service 'api-gateway': defaults\.approval\.required is 3"
    ):
        parse(text)


# --- decisions and who may decide by comment ----------------------------------------------


def test_votes_decide_only_when_the_quorum_is_met_or_someone_rejects() -> None:
    assert decide([vote("alice")], 2) is None
    both = decide([vote("alice", comment="ok"), vote("bob", path="ui")], 2)
    assert both is not None and both.approved and both.approver == "alice, bob"
    assert both.paths() == ["approve by alice via github: ok", "approve by bob via ui"]
    assert both.break_glass is None
    no = decide([vote("alice"), vote("bob", "reject", comment="not now")], 2)
    assert no is not None and not no.approved and no.outcome() == "rejected by bob: not now"


def test_only_an_allowlisted_login_with_write_permission_may_decide() -> None:
    from core.approval import authorize_login

    assert authorize_login("alice-gh", "write", "alice", "api") == ("alice", "")
    assert authorize_login("root", "admin", "alice", "api") == ("alice", "")
    who, why = authorize_login("mallory", "admin", None, "api")
    assert who is None and "not on api's GitHub approver allowlist" in why
    who, why = authorize_login("alice-gh", "read", "alice", "api")
    assert who is None and "approving needs write" in why


# --- a release train: one approver of each service --------------------------------------------

TRAIN = {"api-gateway": ["alice", "bob"], "fleet-planner": ["carol", "dave"]}


def test_a_train_needs_an_approver_of_each_service() -> None:
    only_gateway = tally([vote("alice")], 1, TRAIN)
    assert not only_gateway.met and not only_gateway.decided
    assert only_gateway.progress() == (
        "1 of 1 approval; still needed: an approver of fleet-planner (carol, dave)"
    )
    assert decide([vote("alice")], 1, TRAIN) is None
    both = decide([vote("alice"), vote("carol")], 1, TRAIN)
    assert both is not None and both.approved and both.approver == "alice, carol"


def test_one_person_on_every_services_list_covers_the_train() -> None:
    shared = {"api-gateway": ["alice", "erin"], "fleet-planner": ["carol", "erin"]}
    assert tally([vote("erin")], 1, shared).met


def test_a_reject_from_either_service_ends_the_train() -> None:
    no = decide([vote("alice"), vote("dave", "reject", comment="planner not ready")], 1, TRAIN)
    assert no is not None and not no.approved and no.approver == "dave"
