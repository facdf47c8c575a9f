"""Quarantine files: the pure rules and the commits in a real (local) manifests repo."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime

import pytest

from core import quarantine as q
from core.errors import InvalidInput
from tasks.quarantine import QuarantineRepo
from tests.unit.test_dora import PROD, Repo, at

SVC = "api-gateway"
DIGEST = "sha256:" + "ab" * 32
IMAGE = f"127.0.0.1:5000/robotics-serving/{SVC}:20261207-abc1234@{DIGEST}"
ROLLBACK = "c" * 40


def entry(digest: str = DIGEST) -> q.QuarantineEntry:
    return q.QuarantineEntry(
        digest=digest,
        image=IMAGE,
        rollback_commit=ROLLBACK,
        release="run-1",
        reason="rolled back: error_ratio 0.3 > 0.05",
        at=at(7, 3),
    )


def test_add_is_idempotent_and_lift_records_who_and_why():
    empty = q.parse(None, SVC)
    one = q.add(empty, entry())
    assert q.add(one, entry()) is one
    message = q.refusal(one, DIGEST)
    assert message is not None and ROLLBACK[:12] in message and "run-1" in message
    assert "robotics-cd quarantine lift api-gateway" in message
    again = q.parse(q.render(one), SVC)
    assert again == one  # the file round-trips
    lifted = q.lift(again, DIGEST, by="alice", reason="flaky env", at=at(7, 4))
    assert q.refusal(lifted, DIGEST) is None
    assert lifted.lifted[0].by == "alice" and lifted.lifted[0].rollback_commit == ROLLBACK


def test_bad_input_is_refused():
    with pytest.raises(InvalidInput):
        q.add(q.parse(None, SVC), entry("sha256:short"))
    with pytest.raises(InvalidInput, match="not quarantined"):
        q.lift(q.parse(None, SVC), DIGEST, by="a", reason="r", at=at(1, 0))
    with pytest.raises(InvalidInput, match="reason"):
        q.lift(q.add(q.parse(None, SVC), entry()), DIGEST, by="a", reason=" ", at=at(1, 0))
    with pytest.raises(InvalidInput, match="not readable"):
        q.parse("quarantined: 3\n", SVC)


def test_quarantine_and_lift_are_commits_in_the_manifests_repo(tmp_path):
    man = Repo(tmp_path, "robotics-k8s-manifests")
    man.commit(at(1, 0), "seed", f"{PROD}/k.yaml")
    canary = man.commit(
        at(1, 1),
        f"canary(production): {SVC}:t\n\nImage: {IMAGE}\nPrefect-Flow-Run: run-1",
        f"{PROD}/c.yaml",
    )
    repo = QuarantineRepo(
        url=str(man.bare),
        branch="main",
        workspace=tmp_path / "work",
        timeout=30,
        clock=lambda: datetime(2026, 12, 7, 4, tzinfo=UTC),
    )
    assert repo.read(SVC).quarantined == [] and repo.services() == []
    assert repo.image_of(canary) == IMAGE
    sha = repo.quarantine(SVC, entry())
    assert sha is not None
    assert repo.quarantine(SVC, entry()) is None  # already there: no second commit
    assert repo.services() == [SVC]
    assert repo.read(SVC).find(DIGEST) == entry()

    lift = repo.lift(SVC, DIGEST, by="alice", reason="the fault was in the test env")
    assert repo.read(SVC).find(DIGEST) is None
    log = subprocess.run(
        ["git", "--git-dir", str(man.bare), "log", "--format=%an|%s%n%b", "-2"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert log.startswith(f"alice|quarantine({SVC}): lift {DIGEST}")
    assert "Lifted-By: alice" in log and f"Rollback-Commit: {ROLLBACK}" in log
    assert "the fault was in the test env" in log
    assert f"robotics-cd|quarantine({SVC}): {DIGEST} after rollback {ROLLBACK[:12]}" in log
    head = subprocess.run(
        ["git", "--git-dir", str(man.bare), "rev-parse", "main"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert head == lift
