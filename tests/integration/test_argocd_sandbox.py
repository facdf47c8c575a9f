"""The Argo CD client against the sandbox's Argo CD twin (real git, real kustomize, pods as
containers): a wait that ends at a descendant revision, and 503s that the retry policy
outlives. Needs engineer D's ``sandbox`` fixture (tests/fixtures_sandbox.py)."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prefect import flow

from core.errors import SyncFailed
from core.images import ImageRef
from sandbox.faults import FaultClient
from tasks import gitops
from tasks.argocd import ArgoCDClient, RetryPolicy, argocd_sync_and_wait
from tasks.gitops import ManifestsRepo

pytestmark = [pytest.mark.integration, pytest.mark.sandbox]

ROOT = Path(__file__).parents[2]
KUBECTL = str(ROOT / ".venv" / "bin" / "kubectl")
STAGING_APP = "api-gateway-staging"
STAGING = "serving/api-gateway/overlays/staging"
IMAGE = "robotics-serving/api-gateway"
MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


def seed_digest(sb) -> str:
    """The digest of the seed api-gateway image, from the sandbox's registry."""
    return registry_digest(sb, IMAGE, sb.seed_tag)


def registry_digest(sb, repository: str, tag: str) -> str:
    response = httpx.head(
        f"http://{sb.registry}/v2/{repository}/manifests/{tag}",
        headers={"Accept": MANIFEST_TYPES},
        auth=sb.registry_auth,
        timeout=10,
    )
    response.raise_for_status()
    return response.headers["Docker-Content-Digest"]


def manifests(sb, tmp_path: Path, name: str) -> ManifestsRepo:
    return ManifestsRepo(
        url=sb.repo_url("robotics-k8s-manifests"), workdir=tmp_path / name, kubectl=KUBECTL
    )


def another_commit(sb, tmp_path: Path) -> str:
    """Someone else's commit landing on the manifests repo after ours (not touching staging)."""
    other = tmp_path / f"other-{uuid.uuid4().hex[:6]}"
    subprocess.run(
        ["git", "clone", "-q", sb.repo_url("robotics-k8s-manifests"), str(other)], check=True
    )
    (other / "training" / "NOTES.md").write_text(f"note {uuid.uuid4()}\n")
    for args in (
        ["add", "-A"],
        ["-c", "user.name=p", "-c", "user.email=p@x", "commit", "-q", "-m", "docs: training notes"],
        ["push", "-q", "origin", "main"],
    ):
        subprocess.run(["git", *args], cwd=other, check=True)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=other, check=True, capture_output=True, text=True
    ).stdout.strip()


def argo(sb, **kwargs) -> ArgoCDClient:
    return ArgoCDClient(base_url=sb.argocd_url, token=sb.argocd_token, **kwargs)


async def test_wait_ends_good_at_a_descendant_revision(sandbox, tmp_path):
    sb = sandbox
    repo = manifests(sb, tmp_path, "ours")
    image = ImageRef(sb.registry, IMAGE, sb.seed_tag, seed_digest(sb))
    ours = repo.set_image(
        overlay=STAGING,
        image_name="api-gateway",
        image=image,
        subject=f"deploy(staging): api-gateway:{sb.seed_tag}",
        flow_run_id=f"test-{uuid.uuid4()}",
    )
    later = another_commit(sb, tmp_path)
    assert repo.is_ancestor(ours.sha, later)

    def is_descendant(revision: str, commit: str) -> bool:
        return revision == commit or repo.is_ancestor(commit, revision)

    started = time.monotonic()
    async with argo(sb) as client:
        app = await client.refresh(STAGING_APP)
        if not app.get("operation"):
            await client.sync(STAGING_APP)  # automated app: no revision
        state = await client.wait_synced(
            STAGING_APP, ours.sha, is_descendant=is_descendant, deadline=150, poll_interval=1
        )
        live = await client.get(STAGING_APP)
    assert repo.is_ancestor(later, state.synced_revision)  # ours, then theirs, or later still
    assert state.health == "Healthy" and state.sync_status == "Synced"
    assert str(image) in (live["status"].get("summary") or {}).get("images", [])
    assert time.monotonic() - started < 150


async def test_argo_answering_503_three_times_is_outlived(sandbox):
    sb = sandbox
    faults = FaultClient(sb.control_url)
    faults.http_fault("argocd", path_prefix="/api/v1/applications", status=503, count=3)
    try:
        async with argo(sb, retry=RetryPolicy(base_delay=0.2)) as client:
            started = time.monotonic()
            app = await client.get(STAGING_APP)
        assert app["metadata"]["name"] == STAGING_APP
        assert time.monotonic() - started >= 0.2 + 0.4 + 0.8 - 0.1  # it did back off
    finally:
        faults.clear("argocd")


async def test_sync_and_wait_task_and_its_rerun_makes_no_new_sync(sandbox, sandbox_env, tmp_path):
    sb = sandbox
    url = sb.repo_url("robotics-k8s-manifests")
    image = ImageRef(sb.registry, IMAGE, sb.seed_tag, seed_digest(sb))
    ours = manifests(sb, tmp_path, "task").set_image(
        overlay=STAGING,
        image_name="api-gateway",
        image=image,
        subject=f"deploy(staging): api-gateway:{sb.seed_tag}",
    )

    @flow(name="argocd-sync-and-wait-test")
    async def staging(commit: str) -> tuple[bool, str]:
        check = gitops.descendant_check(repo_url=url, branch="main")
        outcome = await argocd_sync_and_wait(
            STAGING_APP,
            commit,
            automated=True,
            deadline=150,
            is_descendant=check,
            poll_interval=1.0,
        )
        return outcome.synced_now, outcome.revision

    _, revision = await staging(ours.sha)
    history = len(sb.app(STAGING_APP)["status"]["history"])
    synced_now, again = await staging(ours.sha)
    assert synced_now is False and again == revision
    assert len(sb.app(STAGING_APP)["status"]["history"]) == history  # no new sync


async def test_an_image_that_never_gets_ready_fails_naming_progress_deadline_exceeded(
    sandbox, tmp_path
):
    sb = sandbox
    repo = manifests(sb, tmp_path, "pde")
    before = repo.head_commit()
    # A person shortens staging's progress deadline, so the rollout gives up quickly.
    person = sb.clone("robotics-k8s-manifests", tmp_path / "person")
    patch = f"{STAGING}/patch-replicas.yaml"
    sb.commit_and_push(
        person,
        "staging: 8s progress deadline",
        {patch: (person / patch).read_text() + "  progressDeadlineSeconds: 8\n"},
    )
    # busybox has no server: its pod never becomes ready.
    never_ready = ImageRef(
        sb.registry, "library/busybox", "seed", registry_digest(sb, "library/busybox", "seed")
    )
    bad = repo.set_image(
        overlay=STAGING,
        image_name="api-gateway",
        image=never_ready,
        subject="deploy(staging): api-gateway:seed (never ready)",
    )

    def is_descendant(revision: str, commit: str) -> bool:
        return revision == commit or repo.is_ancestor(commit, revision)

    try:
        async with argo(sb) as client:
            app = await client.refresh(STAGING_APP)
            if not app.get("operation"):
                await client.sync(STAGING_APP)
            started = time.monotonic()
            with pytest.raises(SyncFailed) as failure:
                await client.wait_synced(
                    STAGING_APP, bad.sha, is_descendant=is_descendant, deadline=90, poll_interval=1
                )
            assert time.monotonic() - started < 90
        text = str(failure.value)
        assert "ProgressDeadlineExceeded" in text
        assert "Deployment staging/api-gateway" in text
    finally:
        await _restore_staging(sb, repo, before, is_descendant)


async def _restore_staging(sb, repo: ManifestsRepo, before: str, is_descendant) -> None:
    """Put staging back as it was (other tests share the sandbox), and wait until it is good."""
    restored = repo.restore(
        overlay=STAGING,
        before=before,
        subject="rollback(staging): api-gateway",
        body="test cleanup",
    )
    async with argo(sb) as client:
        if (await client.get(STAGING_APP)).get("operation"):
            await client.terminate(STAGING_APP)  # the failing sync may still be retrying
        deadline = time.monotonic() + 30
        while (await client.get(STAGING_APP)).get("operation") and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        app = await client.refresh(STAGING_APP)
        if not app.get("operation"):
            await client.sync(STAGING_APP)
        await client.wait_synced(
            STAGING_APP, restored.sha, is_descendant=is_descendant, deadline=120, poll_interval=1
        )


async def test_pods_of_an_app_carry_the_digest_they_run_and_their_start(sandbox, tmp_path):
    """``resource-tree`` + ``resource``: the evidence a measured window records."""
    from core.ordering import measured_pods_verdict
    from tasks.argocd import measured_pod

    sb = sandbox
    repo = manifests(sb, tmp_path, "pods")
    pinned = repo.current_image(STAGING, "api-gateway")
    assert pinned is not None
    digest = pinned.digest or seed_digest(sb)  # the seed pins a tag only
    async with argo(sb) as client:
        head = repo.head_commit()
        await client.sync_and_wait(
            STAGING_APP,
            head,
            automated=True,
            deadline=150,
            is_descendant=lambda rev, c: rev == c or repo.is_ancestor(c, rev),
        )
        tree = await client.resource_tree(STAGING_APP)
        kinds = {n["kind"] for n in tree["nodes"]}
        pods = [measured_pod(p, "start") for p in await client.pods(STAGING_APP, track="stable")]
        canary = await client.pods(STAGING_APP, track="canary")
    assert {"Deployment", "ReplicaSet", "Pod"} <= kinds
    assert pods and all(p.track == "stable" and p.started_at is not None for p in pods)
    assert all(p.runs(digest) for p in pods), pods
    assert all((p.get("metadata") or {}).get("labels", {}).get("track") == "canary" for p in canary)
    ends = pods + [p.model_copy(update={"seen": "end"}) for p in pods]
    assert measured_pods_verdict(ends, digest, what="staging") is None
    assert measured_pods_verdict(ends, None, what="rollback") is None  # one digest, unpinned
    other = "sha256:" + "0" * 64
    assert "other than" in (measured_pods_verdict(ends, other, what="staging") or "")
