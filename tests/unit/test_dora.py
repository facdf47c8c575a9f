"""DORA metrics from a synthetic release history: real git repos (a manifests repo and a
source repo) whose commits carry the trailers the release flow writes, at chosen times."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.dora import (
    Deployment,
    EventKind,
    ReleaseEvent,
    SourceChange,
    Status,
    deployments,
    dora_report,
    format_seconds,
    render_text,
)
from tasks.dora import History, parse_commit, read_history

SVC = "api-gateway"
PROD = f"serving/{SVC}/overlays/production"
STAGING = f"serving/{SVC}/overlays/staging"
SINCE = datetime(2026, 11, 10, tzinfo=UTC)
UNTIL = datetime(2026, 11, 17, tzinfo=UTC)


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC)


class Repo:
    """A work tree pushing to a bare repo, committing at chosen committer times."""

    def __init__(self, root: Path, name: str) -> None:
        self.bare = root / f"{name}.git"
        self.work = root / name
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.bare)], check=True)
        subprocess.run(["git", "init", "-q", "-b", "main", str(self.work)], check=True)
        subprocess.run(
            ["git", "remote", "add", "origin", str(self.bare)], cwd=self.work, check=True
        )
        self.n = 0

    def commit(self, when: datetime, message: str, path: str = "file.txt") -> str:
        self.n += 1
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"{self.n}\n")
        stamp = f"@{int(when.timestamp())} +0000"
        env = {
            **os.environ,
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
            "GIT_AUTHOR_DATE": stamp,
            "GIT_COMMITTER_DATE": stamp,
        }
        for argv in (["git", "add", "-A"], ["git", "commit", "-q", "-m", message]):
            subprocess.run(argv, cwd=self.work, env=env, check=True)
        subprocess.run(["git", "push", "-q", "origin", "HEAD:main"], cwd=self.work, check=True)
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=self.work, check=True, capture_output=True, text=True
        ).stdout.strip()


def trailers(run: str, source: str | None, digest: str = "sha256:" + "a" * 64) -> str:
    lines = [f"Image: 127.0.0.1:5000/robotics-serving/{SVC}:t@{digest}", f"Prefect-Flow-Run: {run}"]
    if source:
        lines.append(f"Source-Commit: {source}")
    return "\n".join(lines)


def canary(manifests: Repo, when: datetime, run: str, source: str, weight: int = 50) -> str:
    return manifests.commit(
        when,
        f"canary(production): {SVC}:t weight={weight} replicas=1\n\n{trailers(run, source)}",
        f"{PROD}/canary.yaml",
    )


def promote(manifests: Repo, when: datetime, run: str, source: str) -> str:
    return manifests.commit(
        when, f"promote(production): {SVC}:t\n\n{trailers(run, source)}", f"{PROD}/k.yaml"
    )


def rollback(manifests: Repo, when: datetime, run: str, undone: list[str]) -> str:
    undoes = "\n".join(f"Undoes: {sha}" for sha in undone)
    return manifests.commit(
        when,
        f"rollback(production): {SVC} to {PROD} at 0123456789ab\n\n"
        f"rolled back: canary failed\n\n{undoes}\n\nPrefect-Flow-Run: {run}",
        f"{PROD}/canary.yaml",
    )


def build_history(root: Path) -> tuple[Repo, Repo, dict[int, str]]:
    """R1 before the window; in it: R2 promoted (with commits older than the window), R3 rolled
    back during its canary, R4 the rework after it, R5 rolled back after its promotion (no
    fix yet), R6 still in progress; staging commits and a seed commit in between."""
    src, man = Repo(root, "robotics-api"), Repo(root, "robotics-k8s-manifests")
    man.commit(at(1, 0), "seed: the manifests repo", f"{PROD}/k.yaml")
    s = {
        1: src.commit(at(1, 10), "s1"),
        2: src.commit(at(2, 10), "s2"),
        3: src.commit(at(9, 12), "s3"),
        4: src.commit(at(10, 9), "s4"),
        5: src.commit(at(11, 9), "s5"),
        6: src.commit(at(12, 9), "s6"),
        7: src.commit(at(13, 9), "s7"),
    }
    canary(man, at(1, 12), "r1", s[1])
    promote(man, at(1, 13), "r1", s[1])
    man.commit(
        at(10, 9, 30), f"deploy(staging): {SVC}:t\n\n{trailers('r2', s[3])}", f"{STAGING}/k.yaml"
    )
    canary(man, at(10, 10), "r2", s[3])
    promote(man, at(10, 11), "r2", s[3])
    c1 = canary(man, at(11, 10), "r3", s[4], 50)
    c2 = canary(man, at(11, 10, 10), "r3", s[4], 100)
    rollback(man, at(11, 10, 30), "r3", [c1, c2])
    canary(man, at(12, 10), "r4", s[5])
    promote(man, at(12, 11), "r4", s[5])
    c5 = canary(man, at(13, 10), "r5", s[6])
    p5 = promote(man, at(13, 10, 30), "r5", s[6])
    rollback(man, at(13, 11), "r5-rollback", [c5, p5])
    canary(man, at(14, 10), "r6", s[7])
    return man, src, s


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    root = tmp_path_factory.mktemp("dora-git")
    man, src, s = build_history(root)
    found = read_history(
        manifests_url=str(man.bare),
        branch="main",
        overlays={SVC: PROD},
        source_repos={SVC: str(src.bare)},
        cache=root / "cache",
        timeout=30,
    )
    found.changes["_shas"] = [SourceChange(sha=v, committed_at=at(1, 0)) for v in s.values()]
    return found


def _status(history: History) -> dict[str, tuple[Status, bool]]:
    return {d.release_id: (d.status, d.rework) for d in history.deployments}


def test_the_history_gives_one_deployment_per_release_with_its_outcome(history):
    assert _status(history) == {
        "r1": (Status.PROMOTED, False),
        "r2": (Status.PROMOTED, False),
        "r3": (Status.FAILED, False),
        "r4": (Status.PROMOTED, True),
        "r5": (Status.FAILED, False),
        "r6": (Status.IN_PROGRESS, True),  # after r5's failure (not counted: unfinished)
    }
    shas = [c.sha for c in history.changes["_shas"]]
    # Each promoted release shipped the source commits after the last good one.
    assert [c.sha for c in history.changes["r1"]] == [shas[0]]  # the first: its own commit
    assert sorted(c.sha for c in history.changes["r2"]) == sorted(shas[1:3])
    assert sorted(c.sha for c in history.changes["r4"]) == sorted(shas[3:5])  # r3's too


def test_the_window_gives_exact_metrics(history):
    report = dora_report(history.deployments, history.changes, since=SINCE, until=UNTIL)
    assert (report.deployments, report.promoted, report.failed, report.rework) == (4, 2, 2, 1)
    assert report.deployments_per_day == pytest.approx(4 / 7)
    assert report.deployments_per_week == pytest.approx(4.0)
    # r2: s2 (8 days before the window) and s3 -> promoted 11-10 11:00; r4: s4, s5 -> 11-12 11:00.
    assert report.lead_time.count == 4
    assert report.lead_time.median_seconds == (93600 + 180000) / 2
    assert report.lead_time.p90_seconds == 694800  # s2: 8 days 1 hour
    assert report.change_fail_rate == 0.5
    assert report.recovery_time.count == 2
    assert report.recovery_time.median_seconds == 2700  # 30 min (r3) and 1 h (r5)
    assert report.recovery_time.p90_seconds == 3600
    assert report.rework_rate == 0.25
    assert report.in_progress == ["r6"]
    assert report.awaiting_fix == ["r5"]  # rolled back, nothing promoted since


def test_releases_before_the_window_are_not_counted(history):
    report = dora_report(history.deployments, history.changes, since=at(1, 0), until=at(2, 0))
    assert (report.deployments, report.promoted, report.lead_time.count) == (1, 1, 1)
    assert report.lead_time.median_seconds == 3 * 3600  # s1 10:00 -> promoted 13:00


def test_no_deployments_gives_zero_frequency_and_no_rates(history):
    report = dora_report(history.deployments, history.changes, since=at(20, 0), until=at(27, 0))
    assert report.deployments == 0 and report.deployments_per_day == 0.0
    assert report.change_fail_rate is None and report.rework_rate is None
    assert report.lead_time.median_seconds is None and report.recovery_time.count == 0
    assert "change fail rate                 - (0 of 0)" in render_text(report)


def test_an_empty_repo_history_gives_no_deployments(tmp_path):
    man = Repo(tmp_path, "manifests")
    man.commit(at(1, 0), "seed", f"{PROD}/k.yaml")
    found = read_history(
        manifests_url=str(man.bare),
        branch="main",
        overlays={SVC: PROD},
        source_repos={},
        cache=tmp_path / "cache",
    )
    assert found.deployments == [] and found.changes == {}


def test_a_rollback_with_no_fix_yet_counts_as_failed_and_recovered():
    events = [
        _event(EventKind.PROMOTE, "c0", at(10, 1), "r0"),
        _event(EventKind.CANARY, "c1", at(10, 2), "r1"),
        ReleaseEvent(
            kind=EventKind.ROLLBACK, service=SVC, commit="c2", at=at(10, 2, 5), undoes=("c1",)
        ),
    ]
    found = deployments(events)
    report = dora_report(found, {}, since=at(10, 0), until=at(11, 0))
    assert (report.deployments, report.failed, report.rework) == (2, 1, 0)
    assert report.change_fail_rate == 0.5
    assert report.recovery_time.median_seconds == 300
    assert report.awaiting_fix == ["r1"]


def test_an_operator_rollback_fails_the_live_release():
    """``robotics-cd rollback`` re-pins an older image: the release production ran failed."""
    message = (
        f"promote(production): {SVC}:old\n\nrollback: bad latency\n\n"
        f"Image: x/{SVC}:old@sha256:{'b' * 64}\nPrefect-Flow-Run: manual-1"
    )
    manual = parse_commit(SVC, "c3", int(at(10, 5).timestamp()), message)
    assert manual is not None and manual.kind == EventKind.ROLLBACK and manual.undoes == ()
    events = [
        _event(EventKind.CANARY, "c1", at(10, 1), "r1"),
        _event(EventKind.PROMOTE, "c2", at(10, 2), "r1"),
        manual,
        _event(EventKind.CANARY, "c4", at(10, 6), "r2"),
        _event(EventKind.PROMOTE, "c5", at(10, 7), "r2"),
    ]
    found = {d.release_id: d for d in deployments(events)}
    assert found["r1"].status == Status.FAILED
    assert found["r1"].recovery == timedelta(hours=4)
    assert found["r2"].rework and found["r2"].status == Status.PROMOTED
    assert "manual-1" not in found  # the rollback itself is no deployment


def test_a_git_revert_is_a_rollback_of_the_reverted_commits():
    event = parse_commit(
        SVC,
        "c9",
        int(at(10, 3).timestamp()),
        'Revert "canary(production): x"\n\nThis reverts commit ' + "1" * 40 + ".\n",
    )
    assert event is not None and event.kind == EventKind.ROLLBACK
    assert event.undoes == ("1" * 40,)


def test_subjects_the_release_does_not_write_are_ignored():
    assert parse_commit(SVC, "c", 0, "seed: manifests\n") is None
    assert parse_commit(SVC, "c", 0, f"deploy(staging): {SVC}:t\n\nPrefect-Flow-Run: r\n") is None


def test_durations_read_like_people_write_them():
    assert [format_seconds(s) for s in (None, 12, 250, 7500, 3 * 86400 + 4 * 3600)] == [
        "-",
        "12s",
        "4m10s",
        "2h05m",
        "3d4h",
    ]


def _event(kind: EventKind, commit: str, when: datetime, run: str) -> ReleaseEvent:
    return ReleaseEvent(
        kind=kind, service=SVC, commit=commit, at=when, release_id=run, source_sha="f" * 40
    )


def test_deployment_model_reports_recovery_only_when_failed():
    dep = Deployment(
        service=SVC,
        release_id="r",
        source_sha=None,
        image=None,
        deployed_at=at(1, 0),
        commits=(),
        status=Status.IN_PROGRESS,
    )
    assert dep.recovery is None and not dep.finished
