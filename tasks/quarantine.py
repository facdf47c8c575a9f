"""Quarantine files in the manifests repo (``quarantine/<service>.yaml``), over git.

Reads go through a bare mirror fetched on each call; writes are one commit each on a fresh
shallow clone, pushed with fetch-and-reapply when someone pushed first (bounded). Every git
call has a timeout and gets credentials only through askpass (``tasks.gitcmd``). The file
lives in git beside the overlays, so it outlives anything that happens to Prefect.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio.to_thread
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core import quarantine as q
from core.backoff import Backoff
from core.catalog import load_catalog
from core.errors import GitOpsError, InvalidInput, PushConflict, SourceError
from core.images import parse_reference
from core.settings import get_settings
from tasks.dora import GIT_TIMEOUT, Mirror
from tasks.gitcmd import git_token

IDENTITY = ("robotics-cd", "robotics-cd@robotics.local")
_REJECTED = ("[rejected]", "non-fast-forward", "fetch first", "[remote rejected]")
_IMAGE = re.compile(r"^Image:\s*(\S+)\s*$", re.MULTILINE)
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class QuarantineRepo:
    """The quarantine files of one manifests repo and branch."""

    def __init__(
        self,
        *,
        url: str,
        branch: str,
        workspace: Path,
        timeout: float = GIT_TIMEOUT,
        token: str | None = None,
        max_push_attempts: int = 8,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.branch, self.timeout = branch, timeout
        self.workspace = workspace / "quarantine"
        self.mirror = Mirror(url, self.workspace / "mirror", timeout=timeout, token=token)
        self.url = self.mirror.url  # without credentials: git asks for them through askpass
        self.max_push_attempts = max_push_attempts
        self.push_backoff = Backoff(
            retries=max_push_attempts - 1, base_delay=0.2, max_delay=2.0, jitter=True
        )
        self.clock = clock

    # -- reading

    def read(self, service: str) -> q.QuarantineFile:
        _check_service(service)
        self._fetch()
        return q.parse(self._show(q.path_of(service)), service)

    def services(self) -> list[str]:
        self._fetch()
        out = self._git_mirror("ls-tree", "--name-only", f"refs/heads/{self.branch}", "quarantine/")
        return sorted(
            Path(line).stem for line in out.split("\n") if line.endswith(".yaml") and line.strip()
        )

    def image_of(self, commit: str) -> str | None:
        """The ``Image:`` trailer of a manifests commit (the image a release step pinned)."""
        self._fetch()
        match = _IMAGE.search(self._git_mirror("log", "-1", "--format=%B", commit))
        return match.group(1) if match else None

    def _fetch(self) -> None:
        try:
            self.mirror.fetch()
        except SourceError as exc:
            raise GitOpsError(str(exc)) from None

    def _git_mirror(self, *args: str) -> str:
        try:
            return self.mirror.git(*args)
        except SourceError as exc:
            raise GitOpsError(str(exc)) from None

    def _show(self, path: str) -> str | None:
        try:
            return self.mirror.git("show", f"refs/heads/{self.branch}:{path}")
        except SourceError:
            return None  # no such file: nothing quarantined

    # -- writing

    def quarantine(self, service: str, entry: q.QuarantineEntry) -> str | None:
        """Add ``entry``; the new commit, or None when the digest was already quarantined."""
        subject = (
            f"quarantine({service}): {entry.digest} after rollback {entry.rollback_commit[:12]}"
        )
        body = (
            f"{entry.reason.strip()}\n\nImage: {entry.image}\nRollback-Commit: "
            f"{entry.rollback_commit}\n"
            + (f"Prefect-Flow-Run: {entry.release}\n" if entry.release else "")
        )
        return self._commit(service, lambda f: q.add(f, entry), subject, body, IDENTITY)

    def lift(self, service: str, digest: str, *, by: str, reason: str) -> str:
        """Lift ``digest``'s quarantine: a commit recording who and why."""
        q.check_digest(digest)

        def edit(current: q.QuarantineFile) -> q.QuarantineFile:
            return q.lift(current, digest, by=by, reason=reason, at=self.clock())

        entry = self.read(service).find(digest)
        rollback = entry.rollback_commit if entry else "?"
        subject = f"quarantine({service}): lift {digest}"
        body = f"{reason.strip()}\n\nLifted-By: {by}\nRollback-Commit: {rollback}\n"
        sha = self._commit(service, edit, subject, body, (by, f"{by}@robotics.local"))
        if sha is None:
            raise GitOpsError(f"lifting {digest} of {service} changed nothing")
        return sha

    def _commit(
        self,
        service: str,
        edit: Callable[[q.QuarantineFile], q.QuarantineFile],
        subject: str,
        body: str,
        author: tuple[str, str],
    ) -> str | None:
        _check_service(service)
        path = q.path_of(service)
        work = self.workspace / "clones" / uuid.uuid4().hex[:12]
        try:
            for attempt in range(self.max_push_attempts):
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                self._git(work, "init", "-q")
                self._git(
                    work,
                    "fetch",
                    "-q",
                    "--depth=1",
                    "--no-tags",
                    self.url,
                    f"+refs/heads/{self.branch}:refs/remotes/origin/{self.branch}",
                )
                self._git(work, "checkout", "-q", "-B", self.branch, f"origin/{self.branch}")
                target = work / path
                current = q.parse(target.read_text() if target.is_file() else None, service)
                new = edit(current)
                if new == current:
                    return None
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(q.render(new))
                self._git(work, "add", "--", path)
                self._git(
                    work,
                    "-c",
                    f"user.name={IDENTITY[0]}",
                    "-c",
                    f"user.email={IDENTITY[1]}",
                    "commit",
                    "-q",
                    f"--author={author[0]} <{author[1]}>",
                    "-m",
                    f"{subject}\n\n{body}",
                )
                sha = self._git(work, "rev-parse", "HEAD").strip()
                code, out = self._try(
                    work, "push", "--porcelain", self.url, f"HEAD:refs/heads/{self.branch}"
                )
                if code == 0:
                    return sha
                if not any(hint in out for hint in _REJECTED):
                    raise GitOpsError(f"push of {path} to the manifests repo failed: {out.strip()}")
                time.sleep(self.push_backoff.delay(attempt))
            raise PushConflict(
                f"{subject}: push still rejected after {self.max_push_attempts} attempts; "
                "the manifests branch is busy, try again"
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _git(self, work: Path, *args: str) -> str:
        code, out = self._try(work, *args)
        if code != 0:
            raise GitOpsError(f"git {args[0]} failed for the quarantine file: {out.strip()}")
        return out

    def _try(self, work: Path, *args: str) -> tuple[int, str]:
        result = self.mirror.run(*args, cwd=work)
        return result.code, result.output


def _check_service(service: str) -> str:
    if not _NAME.match(service):
        raise InvalidInput(f"invalid service name {service!r}")
    return service


def quarantine_repo(*, repo_url: str | None = None, branch: str | None = None) -> QuarantineRepo:
    """The quarantine files of the catalog's manifests repo (or of ``repo_url``)."""
    settings = get_settings()
    if repo_url is None or branch is None:
        defaults = load_catalog(settings.catalog).defaults
        repo_url = repo_url or defaults.manifests_repo
        branch = branch or defaults.manifests_branch
    return QuarantineRepo(
        url=repo_url,
        branch=branch,
        token=git_token(repo_url),
        workspace=settings.workspace / f"q-{hashlib.sha256(repo_url.encode()).hexdigest()[:8]}",
    )


def digest_of(image: str) -> str:
    ref = parse_reference(image)
    if not ref.digest:
        raise InvalidInput(f"image {image!r} has no digest")
    return ref.digest


# --- Prefect tasks -------------------------------------------------------------------------


@task(name="quarantine-check", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
async def quarantine_refusal(service: str, image: str) -> str | None:
    """Why a release of ``image`` must be refused (its digest is quarantined), or None."""
    digest = digest_of(image)
    qfile = await anyio.to_thread.run_sync(lambda: quarantine_repo().read(service))
    return q.refusal(qfile, digest)


def quarantine_rollback(
    service: str,
    image: str | None,
    rollback_commit: str,
    reason: str,
    release_id: str = "",
    undone_commits: list[str] | None = None,
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> tuple[str | None, str | None]:
    """Quarantine the image a rollback took out of production (``image``, else the ``Image:``
    trailer of the undone commits). Returns (digest, quarantine commit); the commit is None
    when the digest was already quarantined, both are None when no image is known. Plain
    function: the reconciler calls it without a Prefect run."""
    repo = quarantine_repo(repo_url=repo_url, branch=branch)
    found = image or next(filter(None, map(repo.image_of, undone_commits or [])), None)
    if not found:
        return None, None
    entry = q.QuarantineEntry(
        digest=digest_of(found),
        image=found,
        rollback_commit=rollback_commit,
        release=release_id,
        reason=reason,
        at=datetime.now(UTC),
    )
    return entry.digest, repo.quarantine(service, entry)


@task(name="quarantine-image", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
async def quarantine_image(
    service: str,
    image: str | None,
    rollback_commit: str,
    reason: str,
    release_id: str = "",
    undone_commits: list[str] | None = None,
) -> str | None:
    """Quarantine the image a rollback took out of production; the quarantine commit, None
    when it was already quarantined (or no image is known, with a warning)."""
    digest, sha = await anyio.to_thread.run_sync(
        lambda: quarantine_rollback(
            service, image, rollback_commit, reason, release_id, undone_commits
        )
    )
    log = get_run_logger()
    if digest is None:
        log.warning(
            "rollback %s of %s: no image digest to quarantine", rollback_commit[:12], service
        )
    else:
        log.info(
            "%s %s of %s (rollback %s)",
            "quarantined" if sha else "already quarantined:",
            digest,
            service,
            rollback_commit[:12],
        )
    return sha
