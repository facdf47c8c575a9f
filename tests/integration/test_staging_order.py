"""Staging follows the source history (issue #16): real git for the service repo and the
manifests repo, the real `kubectl kustomize`, racing writers in threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from core.errors import Superseded
from core.ordering import SourceOrder
from tasks import gitops
from tasks.source import source_relation_sync
from tests.integration.test_gitops import (
    STAGING,
    git,
    image,
    remote_log,
    seed_manifests,
)

pytestmark = pytest.mark.integration


class ServiceRepo:
    """A bare service repo on `main`, grown one commit at a time from a work clone."""

    def __init__(self, root: Path) -> None:
        self.bare = root / "robotics-api.git"
        self.work = root / "robotics-api"
        git(root, "init", "-q", "--bare", "-b", "main", str(self.bare))
        git(root, "clone", "-q", str(self.bare), str(self.work))
        self.n = 0

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def commit(self, *, force: bool = False) -> str:
        self.n += 1
        (self.work / "f.txt").write_text(f"{self.n}\n")
        git(self.work, "add", "-A")
        git(
            self.work,
            "-c",
            "user.name=d",
            "-c",
            "user.email=d@x",
            "commit",
            "-q",
            "-m",
            f"c{self.n}",
        )
        git(self.work, "push", "-q", *(["--force"] if force else []), "origin", "HEAD:main")
        return git(self.work, "rev-parse", "HEAD")

    def force_push_unrelated(self) -> str:
        git(self.work, "checkout", "-q", "--orphan", f"rewrite-{self.n}")
        return self.commit(force=True)


@pytest.fixture
def setup(tmp_path, monkeypatch):

    monkeypatch.setenv("ROBOTICS_CD_WORKSPACE", str(tmp_path / "workspace"))
    yield seed_manifests(tmp_path), ServiceRepo(tmp_path)


def stage(manifests: str, svc: ServiceRepo, n: int, sha: str, run: str) -> gitops.CommitResult:
    result: gitops.CommitResult = gitops.bump_image.fn(
        "staging",
        "api-gateway",
        image("api-gateway", n, tag=f"20261207-{sha[:7]}"),
        flow_run_id=run,
        source_sha=sha,
        overlay=STAGING,
        repo_url=manifests,
        branch="main",
        source_repo=svc.url,
        source_branch="main",
    )
    return result


def staged_source(manifests: str) -> str:
    found = gitops.overlay_source.fn("api-gateway", "staging", overlay=STAGING, repo_url=manifests)
    assert found is not None
    return found.source_sha


def test_relation_of_commits_in_the_service_repo(setup, tmp_path):
    _, svc = setup
    a, b = svc.commit(), svc.commit()
    kw = {"workspace": tmp_path / "ws", "timeout": 30.0}
    assert source_relation_sync(svc.url, b, a, "main", **kw).order == SourceOrder.NEWER
    assert source_relation_sync(svc.url, a, b, "main", **kw).order == SourceOrder.OLDER
    assert source_relation_sync(svc.url, a, a, "main", **kw).order == SourceOrder.SAME
    x = svc.force_push_unrelated()
    relation = source_relation_sync(svc.url, x, b, "main", **kw)
    assert relation.order == SourceOrder.UNRELATED
    assert relation.ours_on_branch and not relation.theirs_on_branch


def test_an_older_commit_written_after_a_newer_one_is_superseded_and_writes_nothing(setup):
    manifests, svc = setup
    a, b = svc.commit(), svc.commit()
    assert stage(manifests, svc, 2, b, "run-b").changed
    before = remote_log(manifests)
    with pytest.raises(Superseded) as refused:
        stage(manifests, svc, 1, a, "run-a")
    assert b[:12] in str(refused.value) and "run-b" in str(refused.value)
    assert remote_log(manifests) == before  # nothing written
    assert staged_source(manifests) == b


def test_in_order_both_write_and_staging_ends_on_the_newest(setup):
    manifests, svc = setup
    a, b = svc.commit(), svc.commit()
    assert stage(manifests, svc, 1, a, "run-a").changed
    assert stage(manifests, svc, 2, b, "run-b").changed
    assert staged_source(manifests) == b
    assert stage(manifests, svc, 2, b, "run-b").changed is False  # a rerun writes nothing


@pytest.mark.parametrize("rounds", [3])
def test_racing_writers_never_leave_an_older_commit_on_staging(setup, rounds):
    """Three commits written at once, newest first and oldest last in the thread start order:
    whatever wins each push, staging ends on the newest and the older ones are Superseded
    or were written before it."""
    manifests, svc = setup
    for _ in range(rounds):
        shas = [svc.commit() for _ in range(3)]
        outcome: dict[str, str] = {}

        def write(i: int, sha: str, outcome: dict[str, str] = outcome) -> None:
            try:
                stage(manifests, svc, 10 + i, sha, f"run-{sha[:7]}")
                outcome[sha] = "written"
            except Superseded:
                outcome[sha] = "superseded"

        threads = [
            threading.Thread(target=write, args=(i, sha))
            for i, sha in reversed(list(enumerate(shas)))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert staged_source(manifests) == shas[-1]
        assert outcome[shas[-1]] == "written"
        assert set(outcome) == set(shas)


def test_after_a_force_push_the_branch_commit_wins(setup):
    manifests, svc = setup
    svc.commit()
    b = svc.commit()
    assert stage(manifests, svc, 2, b, "run-b").changed
    x = svc.force_push_unrelated()
    assert stage(manifests, svc, 3, x, "run-x").changed  # b is off the branch now
    with pytest.raises(Superseded):
        stage(manifests, svc, 2, b, "run-b-again")  # the rewritten-away commit stays out
    assert staged_source(manifests) == x
