"""Release history for the DORA metrics, read from git: the manifests repo's
production commits and the source repos' commit times.

Nothing here depends on Prefect's run history (the server keeps events for days, git keeps
them for good). Each repo is mirrored bare under ``<workspace>/dora/`` and fetched on every
read; every git call has a timeout.

What a production commit says (written by ``tasks/gitops.py``):

    canary(production): <svc>:<tag> weight=.. replicas=..   Prefect-Flow-Run, Source-Commit, Image
    promote(production): <svc>:<tag>                         the same trailers
    promote(production): ... with a body "rollback: ..."     an operator's rollback to an older
                                                             image (no Source-Commit)
    rollback(production): ...  with "Undoes: <sha>" lines   the restoring commit
    Revert "..." with "This reverts commit <sha>."          a git revert (also a rollback)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import anyio.to_thread
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from core.catalog import Catalog
from core.dora import Deployment, EventKind, ReleaseEvent, SourceChange, Status, deployments
from core.errors import SourceError
from core.settings import get_settings
from tasks.gitcmd import GitResult, git_token, redact, run_git, split_credentials

GIT_TIMEOUT = 120.0
_SHA = re.compile(r"^[0-9a-f]{7,40}$")
_UNDOES = re.compile(r"^(?:Undoes:\s*|This reverts commit\s+)([0-9a-f]{7,40})", re.MULTILINE)
_TRAILER = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):\s*(.+?)\s*$", re.MULTILINE)


class History(BaseModel):
    """Every deployment found, and the source commits each promoted one shipped."""

    deployments: list[Deployment]
    changes: dict[str, list[SourceChange]] = Field(description="release id -> source commits")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Mirror:
    """A bare mirror of one remote's branches, fetched before each read.

    git runs through ``tasks.gitcmd``: a deadline on every call, a token (in the URL or the
    Prefect Secret) given to git only through askpass, never in argv or on disk."""

    def __init__(
        self, url: str, cache: Path, *, timeout: float = GIT_TIMEOUT, token: str | None = None
    ) -> None:
        self.path = cache / hashlib.sha256(url.encode()).hexdigest()[:16]
        self.url, self.credentials = split_credentials(url, token)
        self.timeout = timeout

    def run(self, *args: str, cwd: Path | None = None) -> GitResult:
        return run_git(
            list(args),
            cwd=cwd or self.path,
            remote=self.url,
            timeout=self.timeout,
            credentials=self.credentials,
            error=SourceError,
        )

    def git(self, *args: str) -> str:
        result = self.run(*args)
        if result.code != 0:
            raise SourceError(
                f"git {args[0]} on {redact(self.url)} failed: {result.output.strip()}"
            )
        return result.stdout

    def fetch(self) -> None:
        with _locked(self.path):
            if not (self.path / "HEAD").exists():
                self.path.mkdir(parents=True, exist_ok=True)
                self.git("init", "-q", "--bare")
            self.git("fetch", "-q", "--no-tags", "--prune", self.url, "+refs/heads/*:refs/heads/*")

    def has(self, sha: str) -> bool:
        return self.run("cat-file", "-e", f"{sha}^{{commit}}").code == 0


# --- the manifests repo --------------------------------------------------------------------


def _classify(subject: str, body: str) -> tuple[EventKind, tuple[str, ...]] | None:
    undoes = tuple(_UNDOES.findall(body))
    if subject.startswith("rollback(production)") or subject.startswith('Revert "'):
        return EventKind.ROLLBACK, undoes
    if subject.startswith("promote(production)"):
        if re.search(r"^rollback:", body, re.MULTILINE) and "Source-Commit:" not in body:
            return EventKind.ROLLBACK, ()  # an operator's rollback to an older image
        return EventKind.PROMOTE, ()
    if subject.startswith("canary(production)"):
        return EventKind.CANARY, ()
    return None


def parse_commit(service: str, sha: str, timestamp: int, message: str) -> ReleaseEvent | None:
    """The event a production commit stands for, or None (seeding, hand edits)."""
    subject, _, body = message.partition("\n")
    kind = _classify(subject.strip(), body)
    if kind is None:
        return None
    trailers: dict[str, str] = {}
    for key, value in _TRAILER.findall(body):
        trailers.setdefault(key, value)
    source = trailers.get("Source-Commit")
    return ReleaseEvent(
        kind=kind[0],
        service=service,
        commit=sha,
        at=datetime.fromtimestamp(timestamp, UTC),
        release_id=trailers.get("Prefect-Flow-Run"),
        source_sha=source if source and _SHA.match(source) else None,
        image=trailers.get("Image"),
        undoes=kind[1],
    )


def read_events(mirror: Mirror, branch: str, overlays: Mapping[str, str]) -> list[ReleaseEvent]:
    """Production events of each service (``overlays``: service -> production overlay path)."""
    events: list[ReleaseEvent] = []
    for service, path in overlays.items():
        out = mirror.git("log", "--format=%H%x1f%ct%x1f%B%x1e", f"refs/heads/{branch}", "--", path)
        for record in out.split("\x1e"):
            fields = record.strip("\n").split("\x1f")
            if len(fields) != 3:
                continue
            event = parse_commit(service, fields[0], int(fields[1]), fields[2])
            if event is not None:
                events.append(event)
    return events


# --- the source repos ----------------------------------------------------------------------


def source_changes(mirror: Mirror, base: str | None, sha: str) -> list[SourceChange]:
    """Source commits in ``sha`` and not in ``base`` (just ``sha`` when base is unknown)."""
    if not mirror.has(sha):
        raise SourceError(
            f"source commit {sha[:12]} is not in {redact(mirror.url)} (force-pushed away?)"
        )
    if base and base != sha and mirror.has(base):
        out = mirror.git("log", "--format=%H %ct", f"{base}..{sha}")
    else:
        out = mirror.git("log", "-1", "--format=%H %ct", sha)
    changes = []
    for line in out.split("\n"):
        if " " in line:
            commit, stamp = line.split(" ", 1)
            changes.append(
                SourceChange(sha=commit, committed_at=datetime.fromtimestamp(int(stamp), UTC))
            )
    return changes


def read_history(
    *,
    manifests_url: str,
    branch: str,
    overlays: Mapping[str, str],
    source_repos: Mapping[str, str],
    cache: Path,
    timeout: float = GIT_TIMEOUT,
) -> History:
    """Deployments of every service in ``overlays`` and the changes of the promoted ones."""
    manifests = Mirror(manifests_url, cache, timeout=timeout, token=git_token(manifests_url))
    manifests.fetch()
    found = deployments(read_events(manifests, branch, overlays))
    mirrors: dict[str, Mirror] = {}
    changes: dict[str, list[SourceChange]] = {}
    for dep in found:
        if dep.status != Status.PROMOTED or not dep.source_sha:
            continue
        url = source_repos.get(dep.service)
        if url is None:
            continue
        if url not in mirrors:
            mirrors[url] = Mirror(url, cache, timeout=timeout, token=git_token(url))
            mirrors[url].fetch()
        changes[dep.release_id] = source_changes(mirrors[url], dep.base_source_sha, dep.source_sha)
    return History(deployments=found, changes=changes)


def history_from_catalog(catalog: Catalog, service: str | None = None) -> History:
    """The history of one service (or all), with the catalog's repos and overlay paths."""
    names = [service] if service else sorted(catalog.services)
    overlays, repos = {}, {}
    for name in names:
        svc = catalog.service(name)
        target = svc.environments.get("production")
        if target is None:
            continue
        overlays[name] = str(target.path)
        repos[name] = svc.repo
    return read_history(
        manifests_url=catalog.defaults.manifests_repo,
        branch=catalog.defaults.manifests_branch,
        overlays=overlays,
        source_repos=repos,
        cache=get_settings().workspace / "dora",
    )


@task(name="dora-history", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
async def release_history(catalog: Catalog, service: str | None = None) -> History:
    """Read the release history from git (manifests repo and source repos)."""
    return await anyio.to_thread.run_sync(lambda: history_from_catalog(catalog, service))
