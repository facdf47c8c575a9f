"""A release train's git side: every lease in one atomic push, one commit per train step.

A train holds the production lease of each of its services (``refs/leases/<svc>-production``,
the same refs a single release takes), and moves them together:

- *take* (:meth:`TrainRepo.take_train`): ONE ``git push --atomic`` carrying a
  ``--force-with-lease=<ref>:<expected>`` for every lease ref. The remote applies all the ref
  updates or none, so two trains (or a train and a single release) can neither deadlock nor
  half-take: one wins every lease, the other gets ``LeaseHeld`` and holds nothing. Each
  record names the train and all its leases (``LeaseRecord.train``); ``before`` is the same
  branch head in each.
- *a train write* (:meth:`TrainRepo.train_canary`, :meth:`TrainRepo.train_promote`,
  :meth:`TrainRepo.train_revert`): ONE commit covering every service's production overlay,
  each overlay rendered and checked like a single release's edit, pushed in one atomic push
  with the branch and every lease ref (each lease records the commit and its service's
  step). A lease taken over meanwhile makes the remote refuse the whole push: ``LeaseLost``.
- *renew*, *release*: atomic over every lease likewise.

The rollback is one commit reverting every commit the train recorded (all overlays at once),
naming each (``Undoes: <sha>``); a second call finds it and commits nothing.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.backoff import Backoff
from core.errors import GitOpsError, InvalidInput, LeaseLost, OverlayRefused, PushConflict
from core.images import ImageRef
from core.kustomize import CanarySettings, FieldPattern, parse_rendered
from core.release import LeaseStep, StepKind, TrainRef, new_lease
from tasks.gitops.lease import Lease, _nonce, lease_ref
from tasks.gitops.overlay import ManifestsRepo, _Edit
from tasks.gitops.repo import REJECTED_HINTS, CommitResult, _check_relpath, _message, _trailers

# Taking every lease of a train is one compare-and-swap of all refs; a racer that moved one
# makes it fail as a whole, and the next try re-reads them all after a short spread-out wait.
LEASES_CAS = Backoff(retries=4, base_delay=0.175, factor=1, jitter=True)


@dataclass(frozen=True)
class TrainMember:
    """One service of a train as its production overlay sees it."""

    service: str
    overlay: str
    lease: str
    image: ImageRef
    replicas: int


@dataclass(frozen=True)
class TrainFence:
    """A train's production write: ``holder`` must hold every lease; ``steps`` says, for a
    new commit, the step each lease records."""

    holder: str
    leases: list[str]
    steps: Callable[[str, str], LeaseStep]  # (lease, commit) -> step


@dataclass(frozen=True)
class _TrainEdit:
    overlays: list[str]
    apply: Callable[[Path], None]
    allowed: dict[str, list[FieldPattern]]  # per overlay; [] = anything that renders
    subject: str
    body: str
    trailers: str
    existing: Callable[[], str | None]
    checks: dict[str, _Edit] = field(default_factory=dict)


class TrainRepo(ManifestsRepo):
    """The manifests clone of a release train."""

    def file_at(self, path: str, revision: str) -> str:
        """A file of the manifests repo at ``revision`` (a bundle file, as it was pushed)."""
        path = _check_relpath(path)
        with self._session():
            self._update()
            self._full_history()
            code, out, _ = self._run("show", f"{revision}:{path}")
        if code != 0:
            raise InvalidInput(f"{path} is not in revision {revision[:12]} of {self.url}")
        return out

    # -- leases, all at once

    def _cas_many(self, moves: Sequence[tuple[str, str | None, str | None]]) -> bool:
        """Move every lease ref ``(name, expected, new)`` (None: absent) in ONE atomic push."""
        args = ["push", "--porcelain", "--atomic"]
        args += [f"--force-with-lease={lease_ref(n)}:{exp or ''}" for n, exp, _ in moves]
        args += ["origin", *[f"{new or ''}:{lease_ref(n)}" for n, _, new in moves]]
        code, out = self._git_status(*args)
        if code == 0:
            return True
        if any(hint in out for hint in REJECTED_HINTS):
            return False
        raise GitOpsError(f"cannot update the train's leases on {self.url}: {out.strip()}")

    def _read_leases(self, names: list[str]) -> dict[str, Lease | None]:
        return {name: self._read_lease(name) for name in names}

    def read_leases(self, names: list[str]) -> dict[str, Lease | None]:
        with self._session():
            return self._read_leases(names)

    def take_train(
        self, names: list[str], holder: str, ttl: timedelta, train: str
    ) -> dict[str, Lease]:
        """Take every lease of ``names`` for ``holder`` in one atomic push, or none.

        LeaseHeld (naming the lease and its holder) when any of them is held by another live
        run or blocked; then nothing is taken. ``holder``'s own leases (a re-executed train)
        are renewed with their records."""
        if len(set(names)) != len(names) or not names:
            raise InvalidInput(f"a train takes distinct leases, got {names}")
        with self._session():
            for attempt in range(LEASES_CAS.attempts):
                current = self._read_leases(names)
                now = self.clock()
                for lease in current.values():
                    if lease is not None and lease.record.blocked:
                        raise self._blocked(lease)
                    if lease is not None and lease.holder != holder and not lease.expired(now):
                        raise self._held(lease)
                head = self._update()
                ref = TrainRef(name=train, leases=list(names))
                new: dict[str, str] = {}
                for name, lease in current.items():
                    record = new_lease(
                        holder, now, ttl, head, lease.record if lease else None, _nonce()
                    ).model_copy(
                        update={"host": socket.gethostname(), "pid": os.getpid(), "train": ref}
                    )
                    new[name] = self._lease_commit(name, record, lease.sha if lease else None)
                moves = [(n, cur.sha if cur else None, new[n]) for n, cur in current.items()]
                if self._cas_many(moves):
                    taken = self._read_leases(names)
                    if all(taken[n] is not None and taken[n].sha == new[n] for n in names):  # type: ignore[union-attr]
                        return {n: t for n, t in taken.items() if t is not None}
                time.sleep(LEASES_CAS.delay(attempt))
            for lease in self._read_leases(names).values():
                if lease is not None and lease.holder != holder:
                    raise self._held(lease)
            raise GitOpsError(f"train {train}: compare-and-swap of its leases kept failing; retry")

    def _held_by(self, names: list[str], holder: str) -> dict[str, Lease]:
        current = self._read_leases(names)
        held: dict[str, Lease] = {}
        for name, lease in current.items():
            if lease is None:
                raise LeaseLost(name, holder, "nobody")
            if lease.holder != holder:
                raise LeaseLost(name, holder, lease.holder)
            held[name] = lease
        return held

    def renew_train(self, names: list[str], holder: str, ttl: timedelta) -> dict[str, Lease]:
        """Renew every lease of the train at once; LeaseLost if any is not ``holder``'s."""
        with self._session():
            for _ in range(3):
                held = self._held_by(names, holder)
                now = self.clock()
                new = {
                    n: self._lease_commit(n, lease.record.renewed(now, ttl, _nonce()), lease.sha)
                    for n, lease in held.items()
                }
                if self._cas_many([(n, held[n].sha, new[n]) for n in names]):
                    return self._held_by(names, holder)
            raise GitOpsError("the train's leases kept moving while renewing them; retry")

    def release_train(self, names: list[str], holder: str) -> bool:
        """Delete every lease ``holder`` holds of ``names``, in one push; False when none was
        held. A lease another run holds is left alone and raises LeaseHeld (after the others
        are released)."""
        with self._session():
            for _ in range(3):
                current = self._read_leases(names)
                mine = {n: c for n, c in current.items() if c is not None and c.holder == holder}
                if mine and not self._cas_many([(n, c.sha, None) for n, c in mine.items()]):
                    continue
                others = [c for c in current.values() if c is not None and c.holder != holder]
                if others:
                    raise self._held(others[0])
                return bool(mine)
            raise GitOpsError("the train's leases kept moving while releasing them; retry")

    # -- train writes: one commit, every overlay, every lease

    def _commit_train(self, edit: _TrainEdit, fence: TrainFence) -> CommitResult:
        last_reason = ""
        for attempt in range(self.max_push_attempts):
            self._update()
            leases = self._held_by(fence.leases, fence.holder)
            if not self._apply_train(edit):
                sha = edit.existing() or self._git("rev-parse", "HEAD").strip()
                return CommitResult(sha=sha, changed=False, message=self._subject_of(sha))
            self._git("reset", "-q", "--hard", "HEAD")
            before = {o: parse_rendered(self._render_at_head(o)) for o in edit.overlays}
            self._apply_train(edit)
            for overlay in edit.overlays:
                # A service whose weight stays at this train step changes nothing: fine.
                if self._git("status", "--porcelain", "--", overlay).strip():
                    self._check(edit.checks[overlay], before[overlay])
            self._git("add", "-A", "--", *edit.overlays)
            self._git("commit", "-q", "-m", _message(edit.subject, edit.body, edit.trailers))
            sha = self._git("rev-parse", "HEAD").strip()
            new = {
                n: self._lease_commit(
                    n, lease.record.with_step(fence.steps(n, sha), uuid.uuid4().hex), lease.sha
                )
                for n, lease in leases.items()
            }
            args = ["push", "--porcelain", "--atomic"]
            args += [
                f"--force-with-lease={lease_ref(n)}:{lease.sha}" for n, lease in leases.items()
            ]
            args += ["origin", f"HEAD:refs/heads/{self.branch}"]
            args += [f"{new[n]}:{lease_ref(n)}" for n in leases]
            code, out = self._git_status(*args)
            if code == 0:
                return CommitResult(sha=sha, changed=True, message=edit.subject)
            if not any(hint in out for hint in REJECTED_HINTS):
                self._git("reset", "-q", "--hard", f"origin/{self.branch}")
                raise GitOpsError(f"push to the manifests repo {self.url} failed: {out.strip()}")
            last_reason = out.strip()
            now = self._read_leases(fence.leases)
            for name in leases:
                moved = now[name]
                if moved is None or moved.holder != fence.holder:
                    self._git("reset", "-q", "--hard", f"origin/{self.branch}")
                    raise LeaseLost(name, fence.holder, moved.holder if moved else "nobody")
            time.sleep(self.push_backoff.delay(attempt))
        self._git("reset", "-q", "--hard", f"origin/{self.branch}")
        raise PushConflict(
            f"{edit.subject}: push still rejected after {self.max_push_attempts} attempts "
            f"({last_reason}); the manifests branch is busy, run the step again"
        )

    def _apply_train(self, edit: _TrainEdit) -> bool:
        try:
            edit.apply(self.workdir)
        except InvalidInput as exc:
            self._git("reset", "-q", "--hard", "HEAD")
            raise OverlayRefused(f"{edit.subject}: refused, nothing committed: {exc}") from exc
        return bool(self._git("status", "--porcelain", "--", *edit.overlays).strip())

    def _canary_train_edit(
        self,
        members: list[TrainMember],
        settings: dict[str, CanarySettings],
        *,
        promote: bool,
        subject: str,
        body: str,
        flow_run_id: str,
    ) -> _TrainEdit:
        edits = {
            m.overlay: self.canary_edit(
                overlay=m.overlay,
                service=m.service,
                image=None if promote else m.image,
                stable_image=m.image if promote else None,
                settings=settings[m.service],
                subject=subject,
            )
            for m in members
        }
        overlays = [_check_relpath(m.overlay) for m in members]

        def apply(root: Path) -> None:
            for overlay in overlays:
                edits[overlay].apply(root)

        def existing() -> str | None:
            self._full_history()
            out = self._git("log", "-1", "--format=%H", "HEAD", "--", *overlays).strip()
            return out or None

        images = "\n".join(f"Image: {m.image}" for m in members)
        return _TrainEdit(
            overlays=overlays,
            apply=apply,
            allowed={o: e.allowed for o, e in edits.items()},
            subject=subject,
            body=body,
            trailers=f"{images}\n{_trailers(flow_run_id, None, None)}",
            existing=existing,
            checks=edits,
        )

    def train_canary(
        self,
        *,
        train: str,
        members: list[TrainMember],
        weights: dict[str, int],
        holder: str,
        body: str = "",
    ) -> CommitResult:
        """One train step: each service's canary image, replicas and weight, in ONE commit,
        pushed atomically with every lease (each records its service's weight)."""
        missing = [m.service for m in members if m.service not in weights]
        if missing:
            raise InvalidInput(f"no weight for {', '.join(missing)} at this train step")
        settings = {m.service: CanarySettings(m.replicas, weights[m.service]) for m in members}
        shown = " ".join(f"{m.service}={weights[m.service]}" for m in members)
        edit = self._canary_train_edit(
            members,
            settings,
            promote=False,
            subject=f"canary(production): train {train}: {shown}",
            body=body,
            flow_run_id=holder,
        )
        fence = TrainFence(
            holder=holder,
            leases=[m.lease for m in members],
            steps=lambda lease, sha: LeaseStep(
                kind=StepKind.CANARY, weight=_weight_of(members, weights, lease), commit=sha
            ),
        )
        with self._session():
            return self._commit_train(edit, fence)

    def train_promote(
        self, *, train: str, members: list[TrainMember], holder: str, body: str = ""
    ) -> CommitResult:
        """The promotion: every service's stable image := its canary's, canaries to 0, in ONE
        commit, fenced with every lease."""
        settings = {m.service: CanarySettings(0, 0) for m in members}
        shown = " ".join(f"{m.service}:{m.image.tag}" for m in members)
        edit = self._canary_train_edit(
            members,
            settings,
            promote=True,
            subject=f"promote(production): train {train}: {shown}",
            body=body,
            flow_run_id=holder,
        )
        fence = TrainFence(
            holder=holder,
            leases=[m.lease for m in members],
            steps=lambda lease, sha: LeaseStep(kind=StepKind.PROMOTE, commit=sha),
        )
        with self._session():
            return self._commit_train(edit, fence)

    def train_revert(
        self,
        *,
        train: str,
        members: list[TrainMember],
        commits: list[str],
        holder: str,
        reason: str,
    ) -> CommitResult:
        """ONE commit reverting exactly ``commits`` (the train's, newest first) across every
        overlay, naming each (``Undoes: <sha>``), fenced with every lease. A second call finds
        it and commits nothing; a revert that does not apply is refused, nothing committed."""
        if not commits:
            raise InvalidInput("nothing to revert: no commits given")
        for sha in commits:
            if len(sha) != 40 or any(c not in "0123456789abcdef" for c in sha):
                raise InvalidInput(f"{sha!r} is not a 40-hex commit id")
        overlays = [_check_relpath(m.overlay) for m in members]

        def apply(root: Path) -> None:
            self._full_history()
            self._revert_in_tree(commits, f"train {train}'s commits")

        def existing() -> str | None:
            self._full_history()
            out = self._git(
                "log",
                "-1",
                "--format=%H",
                "--fixed-strings",
                f"--grep=Undoes: {commits[0]}",
                "HEAD",
                "--",
                *overlays,
            ).strip()
            return out or None

        order = ", ".join(m.service for m in members)
        undone = "\n".join(f"Undoes: {sha}" for sha in commits)
        n = len(commits)
        edit = _TrainEdit(
            overlays=overlays,
            apply=apply,
            allowed={o: [] for o in overlays},
            subject=f"rollback(production): train {train} ({order}), reverting {n} "
            f"commit{'s' * (n != 1)}",
            body=f"{reason.strip()}\n\n{undone}",
            trailers=_trailers(holder, None, None),
            existing=existing,
            checks={
                o: _Edit(
                    overlay=o,
                    apply=lambda root: None,
                    allowed=[],
                    subject=f"rollback(production): train {train}",
                    body="",
                    trailers="",
                    existing=lambda: None,
                )
                for o in overlays
            },
        )
        fence = TrainFence(
            holder=holder,
            leases=[m.lease for m in members],
            steps=lambda lease, sha: LeaseStep(kind=StepKind.ROLLBACK, commit=sha),
        )
        with self._session():
            self._update()
            done = existing()
            if done is not None:
                return CommitResult(sha=done, changed=False, message=self._subject_of(done))
            return self._commit_train(edit, fence)


def _weight_of(members: list[TrainMember], weights: dict[str, int], lease: str) -> int:
    for m in members:
        if m.lease == lease:
            return weights[m.service]
    raise InvalidInput(f"lease {lease} is not one of the train's")


# --- Prefect tasks ------------------------------------------------------------------------
#
# Reads see the world again on every call, and writes check the repo's state first (a step
# already written is found, not written twice), so no task caches.


def train_repo(
    holder: str | None = None, *, repo_url: str | None = None, branch: str | None = None
) -> tuple[str, TrainRepo]:
    """The holder (given, or this flow run) and its clone as a :class:`TrainRepo`."""
    from tasks.gitops.tasks import _current_run_id, manifests_repo

    who = holder or _current_run_id()
    if not who:
        raise InvalidInput("a release train's git operation needs a holder (no flow run id)")
    repo = manifests_repo(url=repo_url, branch=branch, run_id=who, kind=TrainRepo)
    if not isinstance(repo, TrainRepo):
        raise TypeError(f"expected a TrainRepo, got {type(repo).__name__}")
    return who, repo


@task(name="train-take-leases", cache_policy=NO_CACHE)
def take_train_leases(
    leases: list[str],
    train: str,
    ttl: float,
    holder: str | None = None,
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> dict[str, Lease]:
    """Every production lease of the train in one atomic push, or LeaseHeld and none."""
    who, repo = train_repo(holder, repo_url=repo_url, branch=branch)
    return repo.take_train(leases, who, timedelta(seconds=ttl), train)


@task(name="train-read-leases", cache_policy=NO_CACHE)
def read_train_leases(
    leases: list[str], *, repo_url: str | None = None, branch: str | None = None
) -> dict[str, Lease | None]:
    _, repo = train_repo(repo_url=repo_url, branch=branch)
    return repo.read_leases(leases)


def renew_train_leases(
    leases: list[str],
    ttl: float,
    holder: str | None = None,
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> dict[str, Lease]:
    """Renew every lease at once (a plain function: called from a renewal loop's thread)."""
    who, repo = train_repo(holder, repo_url=repo_url, branch=branch)
    return repo.renew_train(leases, who, timedelta(seconds=ttl))


@task(name="train-release-leases", cache_policy=NO_CACHE)
def release_train_leases(
    leases: list[str],
    holder: str | None = None,
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> bool:
    who, repo = train_repo(holder, repo_url=repo_url, branch=branch)
    return repo.release_train(leases, who)


@task(name="train-canary-step", cache_policy=NO_CACHE)
def train_canary_step(
    train: str,
    members: list[TrainMember],
    weights: dict[str, int],
    holder: str | None = None,
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> CommitResult:
    """One train step: one commit over every overlay, atomic with every lease."""
    who, repo = train_repo(holder, repo_url=repo_url, branch=branch)
    return repo.train_canary(train=train, members=members, weights=weights, holder=who)


@task(name="train-promote", cache_policy=NO_CACHE)
def train_promote(
    train: str,
    members: list[TrainMember],
    holder: str | None = None,
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> CommitResult:
    """The train's one promotion commit."""
    who, repo = train_repo(holder, repo_url=repo_url, branch=branch)
    return repo.train_promote(train=train, members=members, holder=who)


@task(name="train-revert", cache_policy=NO_CACHE)
def train_revert(
    train: str,
    members: list[TrainMember],
    commits: list[str],
    reason: str,
    holder: str | None = None,
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> CommitResult:
    """The train's one restoring commit, naming every commit it undoes."""
    who, repo = train_repo(holder, repo_url=repo_url, branch=branch)
    return repo.train_revert(
        train=train, members=members, commits=commits, holder=who, reason=reason
    )


@task(name="train-read-bundle", cache_policy=NO_CACHE)
def read_bundle_file(
    path: str, revision: str, *, repo_url: str | None = None, branch: str | None = None
) -> str:
    """A bundle file as pushed (``bundles/<name>.yaml`` at ``revision``)."""
    _, repo = train_repo(repo_url=repo_url, branch=branch)
    return repo.file_at(path, revision)
