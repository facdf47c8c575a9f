"""Prefect tasks over the manifests repo, and the factory of each run's clone.

The factory (:func:`manifests_repo`) resolves the URL, branch and credentials; a token
comes from the URL or the Prefect Secret named by ``settings.git_token_block``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.catalog import load_catalog
from core.durations import parse_duration
from core.errors import InvalidInput, Superseded
from core.images import validate_sha
from core.kustomize import CanarySettings, ImageEntry
from core.ordering import SourceRelation, staging_may_write
from core.release import LeaseStep, StepKind
from core.settings import get_settings
from tasks.gitcmd import git_token
from tasks.gitops.lease import Lease
from tasks.gitops.overlay import Fence, ManifestsRepo
from tasks.gitops.repo import (
    CommitInfo,
    CommitResult,
    Environment,
    OverlaySource,
    RollbackFacts,
    _as_image,
    _check_name,
    _check_relpath,
    _digest_required,
)
from tasks.logs import run_logger

# --- resolving catalog names --------------------------------------------------------------


def lease_name(service: str, env: str) -> str:
    return f"{_check_name(service, 'service')}-{_check_name(env, 'environment')}"


def overlay_path(service: str, env: str) -> str:
    """The overlay folder of a service and environment, from the catalog."""
    target = load_catalog().service(service).environments.get(env)  # type: ignore[call-overload]
    if target is None:
        raise InvalidInput(f"service {service!r} has no {env!r} environment in the catalog")
    return str(target.path)


def _current_run_id() -> str | None:
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return str(run_id) if run_id else None


def manifests_repo(
    *,
    url: str | None = None,
    branch: str | None = None,
    run_id: str | None = None,
    token: str | None = None,
    kind: type[ManifestsRepo] = ManifestsRepo,
) -> ManifestsRepo:
    """The clone of this flow run (shared by its tasks), configured from settings and catalog.
    ``kind``: a subclass with more operations on the same clone (a release train's)."""
    settings = get_settings()
    if url is None or branch is None:
        defaults = load_catalog().defaults
        url = url or defaults.manifests_repo
        branch = branch or defaults.manifests_branch
    # Outside a flow run, one clone per process (reused by its calls).
    run = run_id or _current_run_id() or f"adhoc-{os.getpid()}"
    key = hashlib.sha256(url.encode()).hexdigest()[:10]
    return kind(
        url=url,
        branch=branch,
        workdir=settings.workspace / "manifests" / f"{key}-{run}",
        kubectl=settings.kubectl,
        git_timeout=settings.git_timeout,
        token=token if token is not None else git_token(url),
    )


def production_fence(
    service: str, env: str, holder: str | None, kind: StepKind, weight: int | None = None
) -> Fence:
    """The fence of a write to ``env`` by ``holder`` (the flow run holding its lease)."""
    if not holder:
        raise InvalidInput(
            f"a write to {service}'s {env} overlay must hold its lease: no flow run id here"
        )

    def step(sha: str) -> LeaseStep:
        return LeaseStep(kind=kind, weight=weight, commit=sha)

    return Fence(lease=lease_name(service, env), holder=holder, step=step)


def _holder_repo(
    operation: str, holder: str | None, repo_url: str | None, branch: str | None
) -> tuple[str, ManifestsRepo]:
    """The lease holder (given, or this flow run) and its clone; InvalidInput without one."""
    who = holder or _current_run_id()
    if not who:
        raise InvalidInput(f"{operation} needs a holder (no flow run id in this context)")
    return who, manifests_repo(url=repo_url, branch=branch, run_id=who)


def _overlay(service: str, env: str, overlay: str | None) -> str:
    return _check_relpath(overlay) if overlay else overlay_path(service, env)


def _ttl(ttl: str | float | timedelta) -> timedelta:
    if isinstance(ttl, timedelta):
        return ttl
    if isinstance(ttl, int | float):
        return timedelta(seconds=ttl)
    return parse_duration(ttl)


# --- Prefect tasks ------------------------------------------------------------------------


@task(name="gitops-bump-image")
def bump_image(
    env: Environment,
    service: str,
    image: str,
    flow_run_id: str | None = None,
    source_sha: str | None = None,
    message: str = "",
    *,
    overlay: str | None = None,
    repo_url: str | None = None,
    branch: str | None = None,
    source_repo: str | None = None,
    source_branch: str = "main",
) -> CommitResult:
    """Pin ``image`` (name:tag@digest) in the service's overlay: ``deploy(<env>): <svc>:<tag>``.

    With ``source_repo`` (the service's git remote), the write keeps the overlay in source
    order: before each attempt, the commit the overlay records is compared with
    ``source_sha`` there, and a newer one makes this release ``Superseded`` before it writes.
    """
    _check_name(service, "service")
    ref = _digest_required(_as_image(image))
    if source_sha is not None:
        validate_sha(source_sha)
    path = _overlay(service, env, overlay)
    run_id = flow_run_id or _current_run_id()
    repo = manifests_repo(url=repo_url, branch=branch, run_id=run_id)
    fence = (
        production_fence(service, env, run_id, StepKind.PROMOTE) if env == "production" else None
    )
    guard = (
        _source_order_guard(repo, path, source_sha, source_repo, source_branch)
        if source_repo and source_sha
        else None
    )
    result = repo.set_image(
        overlay=path,
        image_name=service,
        image=ref,
        subject=f"deploy({env}): {service}:{ref.tag}",
        body=message,
        flow_run_id=run_id,
        source_sha=source_sha,
        fence=fence,
        guard=guard,
    )
    _log(result)
    return result


def _source_order_guard(
    repo: ManifestsRepo, overlay: str, ours: str, source_repo: str, source_branch: str
) -> Callable[[], None]:
    """Raise Superseded when ``overlay`` (at the clone's head) records a newer source commit."""
    from tasks.source import source_relation_sync

    settings = get_settings()
    token = git_token(source_repo)
    known: dict[str, SourceRelation] = {}

    def guard() -> None:
        theirs = repo.overlay_source(overlay)
        if theirs is None:
            return
        if theirs.source_sha not in known:
            known[theirs.source_sha] = source_relation_sync(
                source_repo,
                ours,
                theirs.source_sha,
                source_branch,
                workspace=settings.workspace,
                timeout=settings.git_timeout,
                token=token,
            )
        relation = known[theirs.source_sha]
        if not staging_may_write(relation):
            raise Superseded(
                f"{overlay} already runs {theirs.describe()}, which is newer than "
                f"{ours[:12]} ({relation.order.value} history): this release writes nothing"
            )
        if relation.order.value == "unrelated":
            run_logger(__name__).warning(
                "%s runs %s, unrelated to %s in the source history (a force-push?): "
                "writing over it",
                overlay,
                theirs.describe(),
                ours[:12],
            )

    return guard


@task(name="gitops-overlay-source", cache_policy=NO_CACHE)
def overlay_source(
    service: str,
    env: Environment,
    revision: str = "HEAD",
    *,
    overlay: str | None = None,
    repo_url: str | None = None,
    branch: str | None = None,
) -> OverlaySource | None:
    """Which release's commit the overlay records at ``revision`` (its trailers)."""
    _check_name(service, "service")
    repo = manifests_repo(url=repo_url, branch=branch, run_id=_current_run_id())
    return repo.source_at(_overlay(service, env, overlay), revision)


@task(name="gitops-image-at", cache_policy=NO_CACHE)
def image_at(
    service: str,
    env: Environment,
    revision: str,
    *,
    overlay: str | None = None,
    repo_url: str | None = None,
    branch: str | None = None,
) -> ImageEntry | None:
    """The service's image entry in its ``env`` overlay at ``revision`` of the manifests repo."""
    _check_name(service, "service")
    repo = manifests_repo(url=repo_url, branch=branch, run_id=_current_run_id())
    return repo.image_at(_overlay(service, env, overlay), service, revision)


@task(name="gitops-set-canary")
def set_canary(
    service: str,
    image: str,
    replicas: int,
    weight: int,
    flow_run_id: str | None = None,
    source_sha: str | None = None,
    message: str = "",
    *,
    overlay: str | None = None,
    repo_url: str | None = None,
    branch: str | None = None,
) -> CommitResult:
    """Canary step: the canary image, its replicas and its traffic weight, in one commit,
    pushed atomically with the production lease this flow run must hold."""
    _check_name(service, "service")
    ref = _digest_required(_as_image(image))
    settings = CanarySettings(replicas=replicas, weight=weight)
    run_id = flow_run_id or _current_run_id()
    repo = manifests_repo(url=repo_url, branch=branch, run_id=run_id)
    result = repo.set_canary(
        overlay=_overlay(service, "production", overlay),
        service=service,
        image=ref,
        settings=settings,
        subject=f"canary(production): {service}:{ref.tag} weight={weight} replicas={replicas}",
        body=message,
        flow_run_id=run_id,
        source_sha=source_sha,
        fence=production_fence(service, "production", run_id, StepKind.CANARY, weight),
    )
    _log(result)
    return result


@task(name="gitops-promote")
def promote(
    service: str,
    image: str,
    flow_run_id: str | None = None,
    source_sha: str | None = None,
    message: str = "",
    *,
    overlay: str | None = None,
    repo_url: str | None = None,
    branch: str | None = None,
) -> CommitResult:
    """Stable image := ``image``; canary back to replicas 0 and weight "0"; one commit."""
    _check_name(service, "service")
    ref = _digest_required(_as_image(image))
    run_id = flow_run_id or _current_run_id()
    repo = manifests_repo(url=repo_url, branch=branch, run_id=run_id)
    result = repo.set_canary(
        overlay=_overlay(service, "production", overlay),
        service=service,
        image=None,
        stable_image=ref,
        settings=CanarySettings(replicas=0, weight=0),
        subject=f"promote(production): {service}:{ref.tag}",
        body=message,
        flow_run_id=run_id,
        source_sha=source_sha,
        fence=production_fence(service, "production", run_id, StepKind.PROMOTE),
    )
    _log(result)
    return result


@task(name="gitops-restore-overlay")
def restore_overlay(
    service: str,
    env: Environment,
    before: str,
    reason: str,
    undone_commits: list[str],
    flow_run_id: str | None = None,
    *,
    overlay: str | None = None,
    repo_url: str | None = None,
    branch: str | None = None,
) -> CommitResult:
    """One commit restoring the overlay folder to its tree in ``before``, naming what it undoes.

    It resets everything in the folder, others' edits included: a release's rollback uses
    :func:`revert_release` instead. Production writes are fenced by the lease.
    """
    _check_name(service, "service")
    for sha in undone_commits:
        validate_sha(sha)
    path = _overlay(service, env, overlay)
    run_id = flow_run_id or _current_run_id()
    repo = manifests_repo(url=repo_url, branch=branch, run_id=run_id)
    undone = "\n".join(f"Undoes: {sha}" for sha in undone_commits)
    result = repo.restore(
        overlay=path,
        before=before,
        subject=f"rollback({env}): {service} to {path} at {before[:12]}",
        body=f"{reason.strip()}\n\n{undone}" if undone else reason,
        flow_run_id=run_id,
        fence=production_fence(service, env, run_id, StepKind.ROLLBACK)
        if env == "production"
        else None,
    )
    _log(result)
    return result


@task(name="gitops-revert-release")
def revert_release(
    service: str,
    env: Environment,
    commits: list[str],
    reason: str,
    release_run_id: str,
    source_sha: str | None = None,
    holder: str | None = None,
    *,
    overlay: str | None = None,
    repo_url: str | None = None,
    branch: str | None = None,
) -> CommitResult:
    """One commit reverting exactly ``commits`` (a release's own, newest first), pushed
    atomically with the lease ``holder`` (default: this flow run) holds; the lease records
    it as the rollback step. A second call finds it and commits nothing."""
    _check_name(service, "service")
    for sha in commits:
        validate_sha(sha)
    path = _overlay(service, env, overlay)
    who = holder or _current_run_id()
    repo = manifests_repo(url=repo_url, branch=branch, run_id=who)
    n = len(commits)
    result = repo.revert(
        overlay=path,
        commits=commits,
        subject=f"rollback({env}): {service}, reverting {n} commit{'s' * (n != 1)} of release "
        f"{release_run_id}",
        body=reason,
        flow_run_id=who,
        source_sha=source_sha,
        fence=production_fence(service, env, who, StepKind.ROLLBACK),
    )
    _log(result)
    return result


@task(name="gitops-rollback-facts", cache_policy=NO_CACHE)
def rollback_facts(
    service: str,
    env: Environment,
    release_run_id: str,
    *,
    overlay: str | None = None,
    repo_url: str | None = None,
    branch: str | None = None,
) -> RollbackFacts:
    """A release's own commits to the overlay, what is already undone, who wrote after it."""
    _check_name(service, "service")
    repo = manifests_repo(url=repo_url, branch=branch)
    return repo.rollback_facts(_overlay(service, env, overlay), release_run_id)


@task(name="gitops-remove-clone", cache_policy=NO_CACHE)
def remove_clone(
    flow_run_id: str | None = None, *, repo_url: str | None = None, branch: str | None = None
) -> bool:
    """Delete this run's clone of the manifests repo (call it when the run ends)."""
    run_id = flow_run_id or _current_run_id()
    if not run_id:
        raise InvalidInput("remove_clone needs a flow run id (none in this context)")
    return manifests_repo(url=repo_url, branch=branch, run_id=run_id).remove_clone()


@task(name="gitops-preview-production-change", cache_policy=NO_CACHE)
def preview_production_change(
    service: str,
    image: str,
    *,
    overlay: str | None = None,
    repo_url: str | None = None,
    branch: str | None = None,
) -> str:
    """The diff a promotion of ``image`` would make to the production overlay (for approvers)."""
    _check_name(service, "service")
    ref = _digest_required(_as_image(image))
    repo = manifests_repo(url=repo_url, branch=branch)
    return repo.preview_image_change(_overlay(service, "production", overlay), service, ref)


@task(name="gitops-release-commits")
def release_commits(
    service: str,
    env: Environment,
    release_run_id: str,
    *,
    overlay: str | None = None,
    repo_url: str | None = None,
    branch: str | None = None,
) -> list[str]:
    """The commits a release (flow run) made to the service's overlay, oldest first."""
    _check_name(service, "service")
    repo = manifests_repo(url=repo_url, branch=branch)
    return repo.commits_of_run(_overlay(service, env, overlay), release_run_id)


@task(name="gitops-previous-image", cache_policy=NO_CACHE)
def previous_image(
    service: str,
    env: Environment,
    *,
    overlay: str | None = None,
    repo_url: str | None = None,
    branch: str | None = None,
) -> str | None:
    """The image the overlay pinned before the current one (``name:tag@digest``), if any."""
    _check_name(service, "service")
    repo = manifests_repo(url=repo_url, branch=branch)
    history = repo.image_history(_overlay(service, env, overlay), service)
    if not history:
        return None
    current = history[0][1].reference
    return next((e.reference for _, e in history if e.reference != current), None)


@task(name="gitops-head-commit")
def head_commit(*, repo_url: str | None = None, branch: str | None = None) -> str:
    return manifests_repo(url=repo_url, branch=branch).head_commit()


@task(name="gitops-is-ancestor")
def is_ancestor(a: str, b: str, *, repo_url: str | None = None, branch: str | None = None) -> bool:
    return manifests_repo(url=repo_url, branch=branch).is_ancestor(a, b)


@task(name="gitops-commits-touching")
def commits_touching(
    path: str, since: str | None = None, *, repo_url: str | None = None, branch: str | None = None
) -> list[CommitInfo]:
    return manifests_repo(url=repo_url, branch=branch).commits_touching(path, since)


@task(name="gitops-current-image", cache_policy=NO_CACHE)
def current_image(
    service: str,
    env: Environment,
    *,
    overlay: str | None = None,
    repo_url: str | None = None,
    branch: str | None = None,
) -> ImageEntry | None:
    repo = manifests_repo(url=repo_url, branch=branch)
    return repo.current_image(_overlay(service, env, overlay), service)


@task(name="lease-take", cache_policy=NO_CACHE)
def take_lease(
    service: str,
    env: Environment,
    holder: str | None = None,
    ttl: str | float = "2h",
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> Lease:
    """Take the release lock of ``service`` in ``env`` for ``holder`` (default: this flow run)."""
    who, repo = _holder_repo("take_lease", holder, repo_url, branch)
    return repo.take_lease(lease_name(service, env), who, _ttl(ttl))


@task(name="lease-take-over", cache_policy=NO_CACHE)
def take_over_lease(
    service: str,
    env: Environment,
    release_run_id: str,
    holder: str | None = None,
    ttl: str | float = "1h",
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> Lease:
    """``holder`` (default: this flow run) takes the lease of release ``release_run_id`` over,
    keeping its record (LeaseHeld when another live run holds it)."""
    who, repo = _holder_repo("take_over_lease", holder, repo_url, branch)
    return repo.take_over_lease(lease_name(service, env), who, release_run_id, _ttl(ttl))


@task(name="lease-renew", cache_policy=NO_CACHE)
def renew_lease(
    service: str,
    env: Environment,
    holder: str | None = None,
    ttl: str | float = "2h",
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> Lease:
    who, repo = _holder_repo("renew_lease", holder, repo_url, branch)
    return repo.renew_lease(lease_name(service, env), who, _ttl(ttl))


@task(name="lease-release", cache_policy=NO_CACHE)
def release_lease(
    service: str,
    env: Environment,
    holder: str | None = None,
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> bool:
    who, repo = _holder_repo("release_lease", holder, repo_url, branch)
    return repo.release_lease(lease_name(service, env), who)


@task(name="lease-block")
def block_lease(
    service: str,
    env: Environment,
    reason: str,
    holder: str | None = None,
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> Lease:
    """Mark the lease ``holder`` holds blocked: no release takes production until an
    operator clears it."""
    who, repo = _holder_repo("block_lease", holder, repo_url, branch)
    return repo.block_lease(lease_name(service, env), who, reason)


def clear_lease(
    service: str,
    env: Environment,
    operator: str,
    reason: str,
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> Lease | None:
    """An operator frees the lease of ``service`` in ``env`` (the clearing is kept in git)."""
    if not reason.strip():
        raise InvalidInput("clearing a lease needs a reason")
    repo = manifests_repo(url=repo_url, branch=branch)
    return repo.clear_lease(lease_name(service, env), operator, reason)


@task(name="lease-holder", cache_policy=NO_CACHE)
def lease_holder(
    service: str, env: Environment, *, repo_url: str | None = None, branch: str | None = None
) -> Lease | None:
    """Who holds the lock (the record may be expired: check ``Lease.expired``)."""
    return manifests_repo(url=repo_url, branch=branch).read_lease(lease_name(service, env))


def _log(result: CommitResult) -> None:
    logger = run_logger("robotics_cd.gitops")
    if result.changed:
        logger.info("pushed %s %s", result.sha[:12], result.message)
    else:
        logger.info("already there: %s %s (no new commit)", result.sha[:12], result.message)


@dataclass(frozen=True)
class Descends:
    """``check(revision, commit)``: is ``revision`` our ``commit`` or a later one on the branch?

    Hand it to ``tasks.argocd`` waits, which must not speak git themselves. Plain data (the
    repo URL and branch), so a task taking it can hash its inputs.
    """

    repo_url: str | None = None
    branch: str | None = None
    run_id: str | None = None

    def __call__(self, revision: str, commit: str) -> bool:
        if revision == commit:
            return True
        repo = manifests_repo(url=self.repo_url, branch=self.branch, run_id=self.run_id)
        return repo.is_ancestor(commit, revision)


def descendant_check(
    *, repo_url: str | None = None, branch: str | None = None, run_id: str | None = None
) -> Callable[[str, str], bool]:
    """``check(revision, commit)`` over the given manifests repo (see :class:`Descends`)."""
    return Descends(repo_url=repo_url, branch=branch, run_id=run_id)


def descends(revision: str, commit: str) -> bool:
    """``revision`` is ``commit`` or a later commit of the manifests branch (this run's clone).

    Configured from the catalog; flows pass ``descendant_check(repo_url=..., branch=...)``.
    """
    return Descends()(revision, commit)
