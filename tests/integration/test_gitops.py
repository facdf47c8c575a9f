"""The manifests repo operations against real git bare repos and the real `kubectl kustomize`."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from prefect import flow

from core.errors import InvalidInput, LeaseHeld, OverlayRefused
from core.images import parse_reference
from core.kustomize import CanarySettings, ImageEntry
from core.release import LeaseRecord
from tasks import gitops
from tasks.gitops import ManifestsRepo

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SEED = ROOT / "sandbox" / "seed" / "manifests"
KUBECTL = str(ROOT / ".venv" / "bin" / "kubectl")
REGISTRY = "127.0.0.1:5000"
SEED_TAG = "20261126-0000000"


def digest(n: int) -> str:
    return "sha256:" + f"{n:02x}" * 32


def image(service: str, n: int, tag: str = "20261127-abc1234") -> str:
    return f"{REGISTRY}/robotics-serving/{service}:{tag}@{digest(n)}"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def seed_manifests(root: Path, services: tuple[str, ...] = ("api-gateway",)) -> str:
    """A bare manifests repo made from the seed (placeholders substituted); its file:// URL."""
    work = root / "seed-work"
    shutil.copytree(SEED, work)
    for svc in services:
        if svc != "api-gateway":
            shutil.copytree(work / "serving" / "api-gateway", work / "serving" / svc)
    for path in work.rglob("*.yaml"):
        text = path.read_text()
        for svc in services:
            if f"serving/{svc}/" in str(path) and svc != "api-gateway":
                text = text.replace("api-gateway", svc)
        text = (
            text.replace("__REGISTRY__", REGISTRY)
            .replace("__SEED_TAG__", SEED_TAG)
            .replace("__GIT_BASE__", f"file://{root}")
        )
        path.write_text(text)
    git(work, "init", "-q", "-b", "main")
    git(work, "add", "-A")
    git(work, "-c", "user.name=seed", "-c", "user.email=seed@x", "commit", "-q", "-m", "seed")
    bare = root / "robotics-k8s-manifests.git"
    git(root, "clone", "-q", "--bare", str(work), str(bare))
    return f"file://{bare}"


def remote_head(url: str) -> str:
    return git(Path("/"), "ls-remote", url, "refs/heads/main").split()[0]


def remote_log(url: str) -> list[str]:
    bare = Path(url.removeprefix("file://"))
    return git(bare, "log", "--format=%s", "main").splitlines()


def push_from_other_clone(root: Path, url: str, change) -> str:
    """Someone else's commit on the remote (a person, or another release)."""
    other = root / f"other-{time.monotonic_ns()}"
    git(root, "clone", "-q", url, str(other))
    change(other)
    git(other, "add", "-A")
    git(other, "-c", "user.name=p", "-c", "user.email=p@x", "commit", "-q", "-m", "someone else")
    git(other, "push", "-q", "origin", "main")
    return git(other, "rev-parse", "HEAD")


@pytest.fixture
def manifests(tmp_path) -> str:
    return seed_manifests(tmp_path)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Flow runs clone under this test's temp dir, not the default workspace."""

    monkeypatch.setenv("ROBOTICS_CD_WORKSPACE", str(tmp_path / "workspace"))
    yield tmp_path / "workspace"


def client(tmp_path: Path, url: str, name: str = "clone", **kwargs) -> ManifestsRepo:
    return ManifestsRepo(url=url, workdir=tmp_path / "work" / name, kubectl=KUBECTL, **kwargs)


STAGING = "serving/api-gateway/overlays/staging"
PRODUCTION = "serving/api-gateway/overlays/production"


def bump(repo: ManifestsRepo, ref: str, overlay: str = STAGING, service: str = "api-gateway"):
    img = parse_reference(ref)
    return repo.set_image(
        overlay=overlay,
        image_name=service,
        image=img,
        subject=f"deploy(staging): {service}:{img.tag}",
        flow_run_id="run-1",
        source_sha="a" * 40,
    )


def test_bump_commits_once_with_trailers_and_a_rerun_is_a_noop(tmp_path, manifests):
    repo = client(tmp_path, manifests)
    first = bump(repo, image("api-gateway", 1))
    assert first.changed and first.message == "deploy(staging): api-gateway:20261127-abc1234"
    assert remote_head(manifests) == first.sha
    body = git(Path(manifests.removeprefix("file://")), "log", "-1", "--format=%B", "main")
    assert "Prefect-Flow-Run: run-1" in body
    assert f"Source-Commit: {'a' * 40}" in body
    assert repo.current_image(STAGING, "api-gateway") == ImageEntry(
        "api-gateway", f"{REGISTRY}/robotics-serving/api-gateway", "20261127-abc1234", digest(1)
    )
    # A later, unrelated commit; the rerun still finds the commit that pinned the digest.
    push_from_other_clone(tmp_path, manifests, lambda d: (d / "training" / "NOTE").write_text("x"))
    again = bump(client(tmp_path, manifests, "rerun"), image("api-gateway", 1))
    assert again.changed is False and again.sha == first.sha
    assert remote_log(manifests).count("deploy(staging): api-gateway:20261127-abc1234") == 1


def test_push_rejected_by_a_newer_head_is_reapplied_on_top(tmp_path, manifests):
    repo = client(tmp_path, manifests)
    repo.head_commit()  # the clone now lags behind what happens next
    other = push_from_other_clone(
        tmp_path,
        manifests,
        lambda d: (d / PRODUCTION / "patch-replicas.yaml").write_text(
            (d / PRODUCTION / "patch-replicas.yaml")
            .read_text()
            .replace("replicas: 2", "replicas: 3")
        ),
    )
    result = bump(repo, image("api-gateway", 2))
    assert result.changed
    assert repo.is_ancestor(other, result.sha)


def test_a_broken_overlay_is_refused_and_the_head_is_unchanged(tmp_path, manifests):
    def break_it(d: Path) -> None:
        (d / STAGING / "patch-missing.yaml").write_text(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: no-such-deployment\n"
            "spec:\n  replicas: 1\n"
        )
        k = d / STAGING / "kustomization.yaml"
        k.write_text(
            k.read_text().replace(
                "- path: patch-replicas.yaml",
                "- path: patch-replicas.yaml\n- path: patch-missing.yaml",
            )
        )

    broken = push_from_other_clone(tmp_path, manifests, break_it)
    with pytest.raises(OverlayRefused, match=r"does not render.*no-such-deployment"):
        bump(client(tmp_path, manifests), image("api-gateway", 3))
    assert remote_head(manifests) == broken


def test_an_edit_that_changes_more_than_the_image_is_refused(tmp_path, manifests):
    # A replacement copies the image into a ConfigMap: a bump would change that too.
    def add_replacement(d: Path) -> None:
        (d / STAGING / "version.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: version\ndata:\n  image: x\n"
        )
        k = d / STAGING / "kustomization.yaml"
        k.write_text(
            k.read_text().replace("- ../../base\n", "- ../../base\n- version.yaml\n")
            + "replacements:\n- source:\n    kind: Deployment\n    name: api-gateway\n"
            "    fieldPath: spec.template.spec.containers.0.image\n  targets:\n"
            "  - select:\n      kind: ConfigMap\n      name: version\n    fieldPaths:\n    - data.image\n"
        )

    head = push_from_other_clone(tmp_path, manifests, add_replacement)
    with pytest.raises(
        OverlayRefused, match=re.escape("more than intended: ConfigMap/staging/version data.image")
    ):
        bump(client(tmp_path, manifests), image("api-gateway", 4))
    assert remote_head(manifests) == head


def test_an_image_name_no_workload_uses_is_refused(tmp_path, manifests):
    head = remote_head(manifests)
    repo = client(tmp_path, manifests)
    with pytest.raises(OverlayRefused, match="changes nothing"):
        bump(repo, image("api-gateway", 5), service="not-used-anywhere")
    assert remote_head(manifests) == head


def test_ten_concurrent_bumps_of_ten_services_all_land_exactly_once(tmp_path):
    services = tuple(f"svc-{i}" for i in range(10))
    url = seed_manifests(tmp_path, services)
    seeded = len(remote_log(url))

    def one(i: int):
        svc = services[i]
        # Ten racers on two cores: each may lose several rounds before its push lands.
        repo = client(tmp_path, url, f"clone-{i}", retry_base_delay=0.05, max_push_attempts=30)
        return bump(repo, image(svc, i), overlay=f"serving/{svc}/overlays/staging", service=svc)

    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(one, range(10)))

    log = remote_log(url)
    assert len(log) == seeded + 10, log
    for i, svc in enumerate(services):
        assert log.count(f"deploy(staging): {svc}:20261127-abc1234") == 1
        assert results[i].changed
        entry = client(tmp_path, url, "check").current_image(f"serving/{svc}/overlays/staging", svc)
        assert entry is not None and entry.digest == digest(i)
    assert len({r.sha for r in results}) == 10


def test_canary_steps_promotion_and_restore(tmp_path, manifests):
    repo = client(tmp_path, manifests)
    before = repo.head_commit()
    new = parse_reference(image("api-gateway", 7))
    start = repo.set_canary(
        overlay=PRODUCTION,
        service="api-gateway",
        image=new,
        settings=CanarySettings(replicas=1, weight=10),
        subject="canary(production): api-gateway weight=10",
    )
    assert start.changed
    assert repo.canary_settings(PRODUCTION, "api-gateway") == CanarySettings(1, 10)
    canary_entry = repo.current_image(PRODUCTION, "api-gateway-canary")
    assert canary_entry is not None and canary_entry.digest == digest(7)
    canary_text = repo.read_file(f"{PRODUCTION}/canary.yaml")
    assert canary_text.startswith("# Written by the release flow")

    same = repo.set_canary(
        overlay=PRODUCTION,
        service="api-gateway",
        image=new,
        settings=CanarySettings(replicas=1, weight=10),
        subject="canary(production): api-gateway weight=10",
    )
    assert same.changed is False and same.sha == start.sha

    step = repo.set_canary(
        overlay=PRODUCTION,
        service="api-gateway",
        image=new,
        settings=CanarySettings(replicas=1, weight=50),
        subject="canary(production): api-gateway weight=50",
    )
    promoted = repo.set_canary(
        overlay=PRODUCTION,
        service="api-gateway",
        image=None,
        stable_image=new,
        settings=CanarySettings(replicas=0, weight=0),
        subject="promote(production): api-gateway",
    )
    assert promoted.changed
    stable_entry = repo.current_image(PRODUCTION, "api-gateway")
    assert stable_entry is not None and stable_entry.digest == digest(7)
    assert repo.canary_settings(PRODUCTION, "api-gateway") == CanarySettings(0, 0)

    touching = repo.commits_touching(PRODUCTION, since=before)
    assert [c.sha for c in touching] == [start.sha, step.sha, promoted.sha]

    restored = repo.restore(
        overlay=PRODUCTION,
        before=before,
        subject="rollback(production): api-gateway",
        body="canary failed\n\n" + "\n".join(f"Undoes: {c.sha}" for c in touching),
    )
    assert restored.changed
    bare = Path(manifests.removeprefix("file://"))
    assert git(bare, "rev-parse", f"main:{PRODUCTION}") == git(
        bare, "rev-parse", f"{before}:{PRODUCTION}"
    )
    body = git(bare, "log", "-1", "--format=%B", "main")
    assert all(f"Undoes: {c.sha}" in body for c in touching)
    again = repo.restore(overlay=PRODUCTION, before=before, subject="rollback again", body="")
    assert again.changed is False and again.sha == restored.sha


def test_a_canary_edit_for_a_service_the_overlay_lacks_is_refused(tmp_path, manifests):
    head = remote_head(manifests)
    repo = client(tmp_path, manifests)
    # The overlay's canary.yaml has no canary of that service: refused before any commit.
    with pytest.raises(OverlayRefused):
        repo.set_canary(
            overlay=PRODUCTION,
            service="other-service",
            image=parse_reference(image("api-gateway", 8)),
            settings=CanarySettings(replicas=1, weight=10),
            subject="canary(production): wrong",
        )
    assert remote_head(manifests) == head


def test_lease_take_held_renew_release_and_expiry(tmp_path, manifests):
    a = client(tmp_path, manifests, "a")
    b = client(tmp_path, manifests, "b")
    lease = a.take_lease("api-gateway-production", "run-a", timedelta(minutes=5))
    assert lease.holder == "run-a"
    with pytest.raises(LeaseHeld) as held:
        b.take_lease("api-gateway-production", "run-b", timedelta(minutes=5))
    assert held.value.holder == "run-a"
    seen = b.read_lease("api-gateway-production")
    assert seen is not None and seen.holder == "run-a"
    with pytest.raises(LeaseHeld):
        b.release_lease("api-gateway-production", "run-b")
    # Taking it again as the same holder (a resumed run) renews it.
    again = a.take_lease("api-gateway-production", "run-a", timedelta(minutes=10))
    assert again.expires_at > lease.expires_at and again.taken_at == lease.taken_at
    assert a.release_lease("api-gateway-production", "run-a") is True
    assert b.read_lease("api-gateway-production") is None
    assert a.release_lease("api-gateway-production", "run-a") is False

    short = a.take_lease("api-gateway-staging", "run-a", timedelta(seconds=1))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not short.expired(b.clock()):
        time.sleep(0.1)
    taken = b.take_lease("api-gateway-staging", "run-b", timedelta(minutes=5))
    assert taken.holder == "run-b"
    with pytest.raises(LeaseHeld):
        a.renew_lease("api-gateway-staging", "run-a", timedelta(minutes=5))


def test_a_stale_compare_and_swap_loses(tmp_path, manifests):
    a = client(tmp_path, manifests, "a")
    b = client(tmp_path, manifests, "b")
    # Both saw "nobody holds it"; both try to swap from absent: only one may win.
    a.read_lease("x-production")
    b.read_lease("x-production")
    barrier = threading.Barrier(2)
    wins: list[str] = []

    def go(repo: ManifestsRepo, who: str) -> None:
        now = repo.clock()
        record = LeaseRecord(holder=who, taken_at=now, expires_at=now + timedelta(minutes=1))
        commit = repo._lease_commit("x-production", record, None)
        barrier.wait(timeout=10)
        if repo._cas("x-production", None, commit):
            wins.append(who)

    threads = [threading.Thread(target=go, args=(r, w)) for r, w in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(wins) == 1
    winner = a.read_lease("x-production")
    assert winner is not None and winner.holder == wins[0]


def test_two_flow_runs_racing_for_one_lease(prefect_server, workspace, tmp_path, manifests):
    @flow(name="lease-race")
    def race() -> str:
        try:
            lease = gitops.take_lease(
                "api-gateway", "production", ttl="10m", repo_url=manifests, branch="main"
            )
        except LeaseHeld as exc:
            return f"held-by:{exc.holder}"
        return f"holder:{lease.holder}"

    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda _: race(), range(2)))
    holders = [o.split(":", 1)[1] for o in outcomes if o.startswith("holder:")]
    losers = [o.split(":", 1)[1] for o in outcomes if o.startswith("held-by:")]
    assert len(holders) == 1 and len(losers) == 1, outcomes
    assert losers[0] == holders[0]  # the loser is told who holds it
    current = client(tmp_path, manifests, "check").read_lease("api-gateway-production")
    assert current is not None and current.holder == holders[0]


def test_bump_task_in_a_flow(prefect_server, workspace, tmp_path, manifests):
    @flow(name="bump-once")
    def bump_flow(ref: str) -> tuple[str, bool]:
        result = gitops.bump_image(
            "staging",
            "api-gateway",
            ref,
            source_sha="b" * 40,
            repo_url=manifests,
            branch="main",
            overlay=STAGING,
        )
        return result.sha, result.changed

    sha, changed = bump_flow(image("api-gateway", 9))
    assert changed
    sha2, changed2 = bump_flow(image("api-gateway", 9))
    assert (sha2, changed2) == (sha, False)

    @flow(name="clone-cleanup")
    def cleanup() -> bool:
        gitops.head_commit(repo_url=manifests, branch="main")
        return gitops.remove_clone(repo_url=manifests, branch="main")

    assert cleanup() is True
    # Each flow run cloned under the configured workspace (the cleanup run removed its own).
    assert len([p for p in (workspace / "manifests").iterdir() if p.is_dir()]) == 2

    body = git(Path(manifests.removeprefix("file://")), "log", "-1", "--format=%B", "main")
    assert "Prefect-Flow-Run: " in body and f"Source-Commit: {'b' * 40}" in body


def test_release_history_previous_image_preview_and_restore_before_a_runs_commits(
    tmp_path, manifests
):
    repo = client(tmp_path, manifests)
    seeded = f"{REGISTRY}/robotics-serving/api-gateway:{SEED_TAG}"
    first = parse_reference(image("api-gateway", 10, tag="20261127-1111111"))
    second = parse_reference(image("api-gateway", 11, tag="20261128-2222222"))

    def release(run_id: str, img):
        return repo.set_canary(
            overlay=PRODUCTION,
            service="api-gateway",
            image=None,
            stable_image=img,
            settings=CanarySettings(0, 0),
            subject=f"promote(production): api-gateway:{img.tag}",
            flow_run_id=run_id,
        )

    diff = repo.preview_image_change(PRODUCTION, "api-gateway", first)
    assert f'-  newTag: "{SEED_TAG}"' in diff or f"-  newTag: {SEED_TAG}" in diff
    assert f"+  digest: {digest(10)}" in diff
    assert diff.startswith(f"--- a/{PRODUCTION}/kustomization.yaml")

    a = release("run-a", first)
    b = release("run-b", second)
    assert repo.commits_of_run(PRODUCTION, "run-b") == [b.sha]
    assert repo.commits_of_run(PRODUCTION, "run-a") == [a.sha]
    assert repo.commits_of_run(PRODUCTION, "run-zzz") == []
    history = [entry.reference for _, entry in repo.image_history(PRODUCTION, "api-gateway")]
    assert history == [str(second), str(first), seeded]

    restored = repo.restore(
        overlay=PRODUCTION, before=f"{b.sha}^", subject="rollback(production)", body=""
    )
    assert restored.changed
    entry = repo.current_image(PRODUCTION, "api-gateway")
    assert entry is not None and entry.reference == str(first)
    with pytest.raises(InvalidInput):
        repo.restore(overlay=PRODUCTION, before="HEAD~1; rm -rf /", subject="x", body="")
