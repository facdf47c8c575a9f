"""Recovery's git mechanics against real git over the GitHub twin's HTTP remote: a blocked
lease stops every later release until an operator clears it (and the clearing is kept), and
two reconcilers that read the same dead lease at the same moment make exactly one restoring
commit between them."""

from __future__ import annotations

import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.errors import LeaseHeld, LeaseLost, OverlayRefused
from core.release import LeaseStep, StepKind, commits_to_revert
from tasks.gitops import Fence
from tests.integration.test_gitops import PRODUCTION
from tests.integration.test_gitops_http import LEASE, SERVICE, Twin, canary, remote
from tests.integration.test_gitops_http import twin as twin

pytestmark = pytest.mark.integration


def test_a_blocked_lease_stops_later_releases_until_cleared(tmp_path: Path, twin: Twin) -> None:
    repo = twin.repo(tmp_path, "release")
    repo.take_lease(LEASE, "run-1", timedelta(seconds=1))
    canary(repo, 10, "run-1")
    blocked = repo.block_lease(LEASE, "run-1", "restore not verified: Argo CD down")
    assert blocked.record.blocked and blocked.commits  # what to undo stays visible
    later = twin.repo(tmp_path, "later")
    # Long past its TTL, the lease is still nobody else's: not a release, not a takeover.
    with pytest.raises(LeaseHeld, match="operator clears it"):
        later.take_lease(LEASE, "run-2", timedelta(minutes=5))
    with pytest.raises(LeaseHeld, match="operator clears it"):
        later.take_over_lease(LEASE, "rollback-9", "run-1", timedelta(minutes=5))
    cleared = later.clear_lease(LEASE, "alice", "checked production by hand")
    assert cleared is not None and cleared.holder == "run-1"
    # Unblocked and expired, its record kept: the reconciler restores what it lists.
    after = later.read_lease(LEASE)
    assert after is not None and after.record.blocked is None
    assert after.commits == blocked.commits and after.expired(datetime.now(UTC))
    kept = remote(twin, "for-each-ref", "--format=%(refname)", "refs/leases-cleared/")
    assert kept.strip().startswith(f"refs/leases-cleared/{LEASE}/")
    audit = remote(twin, "log", "-1", "--format=%B", kept.split()[0])
    assert "cleared by alice: checked production by hand" in audit
    assert later.take_lease(LEASE, "run-2", timedelta(minutes=5)).holder == "run-2"


def test_two_reconcilers_make_exactly_one_restoring_commit(tmp_path: Path, twin: Twin) -> None:
    dead = twin.repo(tmp_path, "dead")
    seeded = dead.read_file(f"{PRODUCTION}/canary.yaml")
    dead.take_lease(LEASE, "run-1", timedelta(seconds=1))
    canary(dead, 10, "run-1")
    canary(dead, 25, "run-1")
    head_before = remote(twin, "rev-parse", "main")
    recorded = dead.read_lease(LEASE)
    assert recorded is not None and len(recorded.commits) == 2
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def reconciler(name: str) -> None:
        repo = twin.repo(tmp_path, name)
        repo.read_lease(LEASE)  # both read the same stale lease first
        barrier.wait(timeout=30)
        try:
            taken = repo.take_over_lease(LEASE, name, "run-1", timedelta(minutes=5))
            facts = repo.rollback_facts(PRODUCTION, "run-1")
            revert = commits_to_revert(taken.commits, facts.undone)
            if not revert:
                outcomes[name] = "nothing to revert"
                return
            result = repo.revert(
                overlay=PRODUCTION,
                commits=revert,
                subject=f"rollback(production): {SERVICE}, reverting release run-1",
                body=f"reconciler {name}",
                flow_run_id=name,
                fence=Fence(
                    lease=LEASE,
                    holder=name,
                    step=lambda sha: LeaseStep(kind=StepKind.ROLLBACK, commit=sha),
                ),
            )
            outcomes[name] = "restored" if result.changed else "found it restored"
        except (LeaseHeld, LeaseLost) as exc:
            outcomes[name] = f"lost: {type(exc).__name__}"

    threads = [threading.Thread(target=reconciler, args=(n,)) for n in ("rec-a", "rec-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(outcomes) == ["rec-a", "rec-b"], outcomes
    restoring = remote(
        twin, "log", "--format=%H %s", f"{head_before}..main", "--", PRODUCTION
    ).splitlines()
    assert len(restoring) == 1, (restoring, outcomes)
    assert "reverting release run-1" in restoring[0]
    assert list(outcomes.values()).count("restored") == 1, outcomes
    assert dead.read_file(f"{PRODUCTION}/canary.yaml") == seeded


def test_a_revert_that_conflicts_refuses_and_changes_nothing(tmp_path: Path, twin: Twin) -> None:
    """The release's first canary commit cannot be reverted alone once a later commit changed
    the same lines: the refusal names the file, nothing is pushed, and the clone is clean for
    the next write."""
    repo = twin.repo(tmp_path, "release")
    repo.take_lease(LEASE, "run-1", timedelta(minutes=5))
    first = canary(repo, 10, "run-1")
    canary(repo, 25, "run-1")  # the same weight line, changed again
    head_before = remote(twin, "rev-parse", "main")
    fence = Fence(
        lease=LEASE, holder="run-1", step=lambda sha: LeaseStep(kind=StepKind.ROLLBACK, commit=sha)
    )
    with pytest.raises(OverlayRefused, match=r"do not revert cleanly.*canary"):
        repo.revert(
            overlay=PRODUCTION,
            commits=[first],
            subject=f"rollback(production): {SERVICE}",
            body="only the first step",
            flow_run_id="run-1",
            fence=fence,
        )
    assert remote(twin, "rev-parse", "main") == head_before
    status = subprocess.run(
        ["git", "-C", str(repo.workdir), "status", "--porcelain"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert status.stdout.strip() == ""
    assert canary(repo, 50, "run-1")  # the clone still writes
