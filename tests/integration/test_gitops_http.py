"""The release's foundations against real git over the GitHub twin's HTTP remote.

The twin serves the seeded manifests repo with git's smart protocol (``git http-backend``)
and basic auth by token; its fault switch (target ``git``) makes it hang, refuse or answer
slowly. Shown here: the fenced write (main and the lease move in one atomic push), a stale
writer refused while the holder's write lands, a rollback that reverts only the release's
own commits, a re-executed release resuming at its recorded step, a hung remote timing out
with an error naming it, and the token in no process's argv and no file of the clone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import uvicorn

from core.catalog import CanaryPolicy
from core.errors import GitOpsError, LeaseLost
from core.images import parse_reference
from core.kustomize import CanarySettings
from core.release import LeaseStep, Resume, StepKind, commits_to_revert, resume_point
from sandbox.faults import FaultRegistry, HttpFault
from sandbox.github import GitHubTwin, Store, build_server
from sandbox.procs import free_port
from tasks.gitops import Fence, Lease, ManifestsRepo
from tests.integration.test_gitops import KUBECTL, PRODUCTION, git, image, seed_manifests

pytestmark = pytest.mark.integration

SERVICE = "api-gateway"
LEASE = "api-gateway-production"
MANIFESTS = "/robotics/robotics-k8s-manifests.git"


@dataclass
class Twin:
    url: str  # the manifests repo's HTTP URL, no credentials
    token: str
    faults: FaultRegistry
    bare: Path

    def repo(self, root: Path, name: str, **kwargs: object) -> ManifestsRepo:
        options: dict[str, object] = {"token": self.token, "git_timeout": 30.0} | kwargs
        return ManifestsRepo(
            url=self.url,
            workdir=root / "work" / name,
            kubectl=KUBECTL,
            **options,  # type: ignore[arg-type]
        )


@pytest.fixture
def twin(tmp_path: Path) -> Iterator[Twin]:
    """The GitHub twin serving a freshly seeded manifests repo over HTTP on a free port."""
    seed_root = tmp_path / "seed"
    seed_root.mkdir()
    bare = Path(seed_manifests(seed_root).removeprefix("file://"))
    git_base = tmp_path / "git"
    git_base.mkdir()
    shutil.move(str(bare), git_base / "robotics-k8s-manifests.git")
    port = free_port()
    token = "ghp_" + os.urandom(12).hex()
    faults = FaultRegistry()
    app = GitHubTwin(
        base_url=f"http://127.0.0.1:{port}",
        git_base=git_base,
        owner="robotics",
        token=token,
        webhook_url="",
        webhook_secret="",
        store=Store(tmp_path / "recorded.json"),
    )
    server = uvicorn.Server(
        uvicorn.Config(
            build_server(app, faults),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("GitHub twin did not start")
        time.sleep(0.05)
    yield Twin(
        url=f"http://127.0.0.1:{port}{MANIFESTS}",
        token=token,
        faults=faults,
        bare=git_base / "robotics-k8s-manifests.git",
    )
    faults.clear_http()
    server.should_exit = True
    thread.join(timeout=10)


def remote(twin: Twin, *args: str) -> str:
    return git(twin.bare, *args)


def lease_message(twin: Twin) -> str:
    return remote(twin, "log", "-1", "--format=%B", f"refs/leases/{LEASE}")


def canary(
    repo: ManifestsRepo,
    weight: int,
    holder: str,
    n: int = 7,
    expected: Lease | None = None,
) -> str:
    """One fenced canary step of release ``holder``; the new commit."""
    result = repo.set_canary(
        overlay=PRODUCTION,
        service=SERVICE,
        image=parse_reference(image(SERVICE, n)),
        settings=CanarySettings(replicas=1, weight=weight),
        subject=f"canary(production): {SERVICE} weight={weight}",
        flow_run_id=holder,
        source_sha="a" * 40,
        fence=Fence(
            lease=LEASE,
            holder=holder,
            step=lambda sha: LeaseStep(kind=StepKind.CANARY, weight=weight, commit=sha),
            expected=expected,
        ),
    )
    return result.sha


def test_http_remote_needs_the_token(tmp_path: Path, twin: Twin) -> None:
    good = twin.repo(tmp_path, "good")
    head = good.head_commit()
    assert head == remote(twin, "rev-parse", "main")
    for name, token in (("none", None), ("wrong", "ghp_wrong")):
        with pytest.raises(GitOpsError, match="cannot clone") as refused:
            twin.repo(tmp_path, name, token=token).head_commit()
        assert "ghp_wrong" not in str(refused.value)
    # A token written into the URL works too, and stays out of the clone's config.
    url = twin.url.replace("http://", f"http://x-access-token:{twin.token}@")
    inline = ManifestsRepo(url=url, workdir=tmp_path / "work" / "inline", kubectl=KUBECTL)
    assert inline.head_commit() == head
    assert twin.token not in (tmp_path / "work" / "inline" / ".git" / "config").read_text()


def test_a_fenced_write_moves_main_and_the_lease_in_one_push(tmp_path: Path, twin: Twin) -> None:
    repo = twin.repo(tmp_path, "writer")
    before = repo.head_commit()
    lease = repo.take_lease(LEASE, "run-1", timedelta(minutes=10))
    assert lease.before == before and lease.commits == []
    first = canary(repo, 10, "run-1")
    assert remote(twin, "rev-parse", "main") == first
    after = repo.read_lease(LEASE)
    assert after is not None and after.sha != lease.sha
    assert after.before == before and after.commits == [first]
    assert after.step == LeaseStep(kind=StepKind.CANARY, weight=10, commit=first)
    # The lease's history is the chain of its commits.
    assert remote(twin, "rev-parse", f"refs/leases/{LEASE}^") == lease.sha
    second = canary(repo, 25, "run-1")
    final = repo.read_lease(LEASE)
    assert final is not None and final.commits == [first, second] and final.before == before
    # The commit trailers the DORA metrics read are all there.
    body = remote(twin, "log", "-1", "--format=%B", "main")
    assert "Prefect-Flow-Run: run-1" in body and f"Source-Commit: {'a' * 40}" in body
    assert "Image: " in body
    # Writing without the lease is refused, and nothing lands.
    with pytest.raises(LeaseLost):
        canary(twin.repo(tmp_path, "intruder"), 50, "run-2")
    assert remote(twin, "rev-parse", "main") == second


def test_a_stale_writer_is_refused_while_the_holder_lands(tmp_path: Path, twin: Twin) -> None:
    stale_repo = twin.repo(tmp_path, "stale")
    holder_repo = twin.repo(tmp_path, "holder")
    stale_lease = stale_repo.take_lease(LEASE, "run-old", timedelta(seconds=1))
    deadline = time.monotonic() + 15
    while not stale_lease.expired(datetime.now(UTC)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # The old run's lease expired; a new release takes production over.
    holder_repo.take_lease(LEASE, "run-new", timedelta(minutes=10))
    barrier = threading.Barrier(2, timeout=30)
    results: dict[str, object] = {}

    def write(name: str, repo: ManifestsRepo, weight: int, holder: str, expected: Lease | None):
        def step(sha: str) -> LeaseStep:
            return LeaseStep(kind=StepKind.CANARY, weight=weight, commit=sha)

        fence = Fence(lease=LEASE, holder=holder, step=step, expected=expected)
        original = repo._lease_commit

        def at_the_same_moment(*args: object, **kwargs: object) -> str:
            sha = original(*args, **kwargs)  # type: ignore[arg-type]
            barrier.wait()  # both pushes start together
            return sha

        repo._lease_commit = at_the_same_moment  # type: ignore[method-assign]
        try:
            results[name] = repo.set_canary(
                overlay=PRODUCTION,
                service=SERVICE,
                image=parse_reference(image(SERVICE, weight)),
                settings=CanarySettings(replicas=1, weight=weight),
                subject=f"canary(production): {SERVICE} weight={weight} by {holder}",
                flow_run_id=holder,
                fence=fence,
            ).sha
        except Exception as exc:  # the test inspects it below
            results[name] = exc

    threads = [
        threading.Thread(target=write, args=("stale", stale_repo, 50, "run-old", stale_lease)),
        threading.Thread(target=write, args=("holder", holder_repo, 10, "run-new", None)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert isinstance(results["stale"], LeaseLost), results
    assert isinstance(results["holder"], str), results
    assert remote(twin, "rev-parse", "main") == results["holder"]
    log = remote(twin, "log", "--format=%s", "main")
    assert "by run-new" in log and "by run-old" not in log
    lease = holder_repo.read_lease(LEASE)
    assert lease is not None and lease.holder == "run-new" and lease.commits == [results["holder"]]


def test_two_writers_with_the_same_lease_land_exactly_one_write(tmp_path: Path, twin: Twin) -> None:
    """The remote's own check: both believe in the same lease commit; one push wins."""
    a, b = twin.repo(tmp_path, "a"), twin.repo(tmp_path, "b")
    lease = a.take_lease(LEASE, "run-1", timedelta(minutes=10))
    b.head_commit()
    barrier = threading.Barrier(2, timeout=30)
    outcomes: list[object] = []

    def write(repo: ManifestsRepo, weight: int) -> None:
        original = repo._git_status

        def push_together(*args: str) -> tuple[int, str]:
            if args[:1] == ("push",) and "--atomic" in args:
                barrier.wait()
            return original(*args)

        repo._git_status = push_together  # type: ignore[method-assign]
        try:
            outcomes.append(canary(repo, weight, "run-1", n=weight, expected=lease))
        except Exception as exc:  # inspected below
            outcomes.append(exc)

    threads = [threading.Thread(target=write, args=(r, w)) for r, w in ((a, 10), (b, 25))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    landed = [o for o in outcomes if isinstance(o, str)]
    refused = [o for o in outcomes if isinstance(o, LeaseLost)]
    assert len(landed) == 1 and len(refused) == 1, outcomes
    assert remote(twin, "rev-parse", "main") == landed[0]
    now = a.read_lease(LEASE)
    assert now is not None and now.commits == landed


def test_a_rollback_reverts_only_the_releases_own_commits(tmp_path: Path, twin: Twin) -> None:
    repo = twin.repo(tmp_path, "release")
    seeded = {f: repo.read_file(f"{PRODUCTION}/{f}") for f in ("canary.yaml", "kustomization.yaml")}
    repo.take_lease(LEASE, "run-1", timedelta(minutes=10))
    canary(repo, 10, "run-1")
    # During the canary, a person scales stable (an unrelated overlay edit).
    person = tmp_path / "person"
    git(tmp_path, "clone", "-q", str(twin.bare), str(person))
    patch = person / PRODUCTION / "patch-replicas.yaml"
    patch.write_text(patch.read_text().replace("replicas: 2", "replicas: 5"))
    git(person, "-c", "user.name=p", "-c", "user.email=p@x", "commit", "-qam", "scale stable to 5")
    git(person, "push", "-q", "origin", "main")
    canary(repo, 25, "run-1")
    lease = repo.read_lease(LEASE)
    assert lease is not None
    revert = commits_to_revert(lease.commits, set())
    result = repo.revert(
        overlay=PRODUCTION,
        commits=revert,
        subject=f"rollback(production): {SERVICE}, reverting release run-1",
        body="rolled back: canary failed",
        flow_run_id="run-1",
        fence=Fence(
            lease=LEASE,
            holder="run-1",
            step=lambda sha: LeaseStep(kind=StepKind.ROLLBACK, commit=sha),
        ),
    )
    assert result.changed
    for name, text in seeded.items():
        assert repo.read_file(f"{PRODUCTION}/{name}") == text, name
    assert "replicas: 5" in repo.read_file(f"{PRODUCTION}/patch-replicas.yaml")
    body = remote(twin, "log", "-1", "--format=%B", "main")
    assert all(f"Undoes: {sha}" in body for sha in lease.commits)
    after = repo.read_lease(LEASE)
    assert after is not None and after.commits == lease.commits
    assert after.step == LeaseStep(kind=StepKind.ROLLBACK, commit=result.sha)
    # Once is enough: a second rollback finds the first.
    again = twin.repo(tmp_path, "again").revert(
        overlay=PRODUCTION,
        commits=revert,
        subject="rollback(production): again",
        body="again",
        fence=Fence(
            lease=LEASE,
            holder="run-1",
            step=lambda sha: LeaseStep(kind=StepKind.ROLLBACK, commit=sha),
        ),
    )
    assert again.changed is False and again.sha == result.sha
    facts = repo.rollback_facts(PRODUCTION, "run-1")
    assert facts.commits == lease.commits and set(lease.commits) <= facts.undone


def test_a_reexecuted_release_resumes_at_its_recorded_step(tmp_path: Path, twin: Twin) -> None:
    policy = CanaryPolicy(steps=[10, 25, 50, 100])
    first = twin.repo(tmp_path, "first-execution")
    before = first.head_commit()
    first.take_lease(LEASE, "run-1", timedelta(minutes=10))
    c10 = canary(first, 10, "run-1")
    c25 = canary(first, 25, "run-1")
    # Someone else's commit lands meanwhile: a recomputed "before" would be this one.
    person = tmp_path / "person"
    git(tmp_path, "clone", "-q", str(twin.bare), str(person))
    (person / "training").mkdir(exist_ok=True)
    (person / "training" / "NOTE").write_text("x\n")
    git(person, "add", "-A")
    git(person, "-c", "user.name=p", "-c", "user.email=p@x", "commit", "-qm", "unrelated")
    git(person, "push", "-q", "origin", "main")

    # The run is executed again from the top, in a new process with a new clone.
    again = twin.repo(tmp_path, "second-execution")
    lease = again.take_lease(LEASE, "run-1", timedelta(minutes=10))
    assert lease.before == before and lease.commits == [c10, c25]
    point = resume_point(lease.record, policy)
    assert (point.at, point.step_index, point.commits) == (Resume.CANARY, 1, [c10, c25])
    assert policy.steps[point.step_index] == 25
    # Carrying on at 25 % writes nothing new; the canary never goes back to 10 %.
    head = remote(twin, "rev-parse", "main")
    assert canary(again, policy.steps[point.step_index], "run-1") == c25
    assert remote(twin, "rev-parse", "main") == head
    assert again.canary_settings(PRODUCTION, SERVICE) == CanarySettings(1, 25)
    assert remote(twin, "log", "--format=%s", "main").count(f"{SERVICE} weight=10") == 1


def test_a_hung_remote_times_out_naming_the_remote_and_the_operation(
    tmp_path: Path, twin: Twin
) -> None:
    repo = twin.repo(tmp_path, "patient", git_timeout=3.0)
    repo.head_commit()
    twin.faults.add_http(HttpFault(target="git", path_prefix=MANIFESTS, hang_seconds=60))
    started = time.monotonic()
    with pytest.raises(GitOpsError) as hung:
        repo.head_commit()
    assert time.monotonic() - started < 20
    assert "git fetch" in str(hung.value) and twin.url in str(hung.value)
    assert "did not finish in 3s" in str(hung.value)
    twin.faults.clear_http()
    # Refusing (5xx) is an error at once, naming the remote; slow answers still work.
    twin.faults.add_http(HttpFault(target="git", path_prefix=MANIFESTS, status=503, count=1))
    with pytest.raises(GitOpsError, match=r"503|returned error"):
        repo.read_lease(LEASE)
    twin.faults.add_http(HttpFault(target="git", path_prefix=MANIFESTS, hang_seconds=0.5))
    assert repo.head_commit() == remote(twin, "rev-parse", "main")


def test_the_token_is_in_no_argv_and_no_file(tmp_path: Path, twin: Twin) -> None:
    seen: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"git" in argv:
                    seen.append(argv.decode(errors="replace"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        repo = twin.repo(tmp_path, "release")
        repo.take_lease(LEASE, "run-1", timedelta(minutes=10))
        canary(repo, 10, "run-1")
        repo.release_lease(LEASE, "run-1")
    finally:
        stop.set()
        sampler.join(timeout=10)
    assert any("push" in argv for argv in seen), "the sampler saw no git process"
    assert not [argv for argv in seen if twin.token in argv]
    leaked = subprocess.run(
        ["grep", "-rl", twin.token, str(tmp_path / "work")], capture_output=True, text=True
    )
    assert leaked.stdout == "", leaked.stdout
    assert repo.remove_clone() and not (tmp_path / "work" / "release").exists()


def test_a_service_checkout_over_http_with_the_token_and_a_hung_remote(
    tmp_path: Path, twin: Twin
) -> None:
    from core.errors import SourceError
    from tasks.source import checkout_sync, is_superseded_sync

    bare = twin.bare.parent / "robotics-api.git"
    work = tmp_path / "api"
    git(tmp_path, "init", "-q", "-b", "main", str(work))
    (work / "app.txt").write_text("v1\n")
    git(work, "add", "-A")
    git(work, "-c", "user.name=d", "-c", "user.email=d@x", "commit", "-qm", "v1")
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    sha = git(work, "rev-parse", "HEAD")
    url = twin.url.replace("robotics-k8s-manifests", "robotics-api")
    done = checkout_sync(url, sha, workspace=tmp_path / "ws", label="api", token=twin.token)
    assert done.sha == sha and (Path(done.path) / "app.txt").read_text() == "v1\n"
    assert not subprocess.run(
        ["grep", "-rl", twin.token, str(tmp_path / "ws")], capture_output=True, text=True
    ).stdout
    assert is_superseded_sync(
        url, sha, f"20261207-{sha[:7]}", workspace=tmp_path / "ws", token=twin.token
    )
    with pytest.raises(SourceError, match=r"Authentication|401|could not read"):
        checkout_sync(url, sha, workspace=tmp_path / "ws", label="api", token="wrong")
    twin.faults.add_http(
        HttpFault(target="git", path_prefix="/robotics/robotics-api.git", hang_seconds=60)
    )
    started = time.monotonic()
    with pytest.raises(SourceError) as hung:
        checkout_sync(url, sha, workspace=tmp_path / "ws", token=twin.token, timeout=3)
    assert time.monotonic() - started < 20
    assert "git fetch" in str(hung.value) and url in str(hung.value)
