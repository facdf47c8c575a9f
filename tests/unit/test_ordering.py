"""Staging's source order and the measured-pods rule, on plain data."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.ordering import (
    MeasuredPod,
    SourceOrder,
    SourceRelation,
    measured_pods_verdict,
    source_order,
    staging_may_write,
)

# A → B → C on the branch; X is on a history a force-push replaced.
PARENTS = {"B": "A", "C": "B"}


def is_ancestor(a: str, b: str) -> bool:
    while b:
        if a == b:
            return True
        b = PARENTS.get(b, "")
    return False


@pytest.mark.parametrize(
    ("ours", "theirs", "order"),
    [
        ("B", "B", SourceOrder.SAME),
        ("C", "A", SourceOrder.NEWER),  # staging runs an ancestor: ours is later
        ("A", "C", SourceOrder.OLDER),  # staging runs a descendant: ours is older
        ("B", "X", SourceOrder.UNRELATED),  # a force-push: neither contains the other
    ],
)
def test_source_order(ours: str, theirs: str, order: SourceOrder) -> None:
    assert source_order(ours, theirs, is_ancestor) == order


def test_an_older_commit_never_goes_over_a_newer_one() -> None:
    assert not staging_may_write(SourceRelation(order=SourceOrder.OLDER))
    assert staging_may_write(SourceRelation(order=SourceOrder.NEWER))
    assert staging_may_write(SourceRelation(order=SourceOrder.SAME))  # rerun, re-release


@pytest.mark.parametrize(
    ("ours_on", "theirs_on", "writes"),
    [
        (True, False, True),  # ours is what the branch holds after the force-push
        (False, True, False),  # ours was force-pushed away: the branch's commit stays
        (True, True, True),  # both reachable (two branches): the later release writes
        (False, False, True),
    ],
)
def test_unrelated_histories_the_branch_decides(
    ours_on: bool, theirs_on: bool, writes: bool
) -> None:
    relation = SourceRelation(
        order=SourceOrder.UNRELATED, ours_on_branch=ours_on, theirs_on_branch=theirs_on
    )
    assert staging_may_write(relation) is writes


OURS = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64
T0 = datetime(2026, 12, 7, 7, 0, tzinfo=UTC)


def pod(name: str, digest: str, seen: str) -> MeasuredPod:
    return MeasuredPod(
        name=name,
        track="stable",
        image_ids=(f"docker-pullable://127.0.0.1:5000/robotics-serving/api-gateway@{digest}",),
        started_at=T0,
        seen=seen,
    )


def test_a_window_measured_only_our_digest_passes() -> None:
    pods = [pod("a-1", OURS, "start"), pod("a-2", OURS, "start"), pod("a-1", OURS, "end")]
    assert measured_pods_verdict(pods, OURS, what="staging") is None


def test_a_pod_of_another_image_in_the_window_fails_and_is_named() -> None:
    pods = [pod("a-1", OURS, "start"), pod("b-1", OTHER, "end")]
    reason = measured_pods_verdict(pods, OURS, what="staging")
    assert reason is not None and "b-1" in reason and OTHER in reason and "end" in reason


def test_no_pods_or_a_missing_listing_is_not_a_measurement() -> None:
    assert "no pod" in (measured_pods_verdict([], OURS, what="staging") or "")
    only_end = [pod("a-1", OURS, "end")]
    assert "start" in (measured_pods_verdict(only_end, OURS, what="staging") or "")


def test_a_pod_without_a_repo_digest_is_not_ours() -> None:
    bare = MeasuredPod(name="x", image_ids=("docker://sha256:" + "c" * 64,), seen="start")
    assert not bare.runs(OURS)
    assert measured_pods_verdict([bare, pod("a", OURS, "end")], OURS, what="w") is not None


def test_a_tag_only_pin_needs_every_pod_on_one_digest() -> None:
    same = [pod("a-1", OURS, "start"), pod("a-2", OURS, "end")]
    assert measured_pods_verdict(same, None, what="rollback") is None
    mixed = [pod("a-1", OURS, "start"), pod("b-1", OTHER, "end")]
    assert "one image digest" in (measured_pods_verdict(mixed, None, what="rollback") or "")
