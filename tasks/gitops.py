"""The manifests repo: overlay commits and the release lock, over git (GitPython).

Every change to an environment is one commit to the manifests repo, pushed with
fetch-and-reapply on conflict, after ``kubectl kustomize`` proved the overlay still renders
and that only the intended fields changed. Repeats are safe because each operation first
looks at the repo: an image already pinned, a canary already at its step or a folder already
restored is a no-op that returns the commit that made it so.

The release lock is a lease ref ``refs/leases/<svc>-<env>`` in the same remote, moved only by
compare-and-swap pushes (``--force-with-lease=<ref>:<expected>``). Its commit's message holds
the holder (a flow run id), when it was taken and when it expires. It lives outside every
process, so it survives a suspended flow run, a crashed worker and a restarted server.

Each flow run works in its own clone (``<workspace>/manifests/<repo>-<run id>``); tasks of
one run share it under a file lock.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import git
from prefect import task
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from core.catalog import load_catalog
from core.durations import parse_duration
from core.errors import GitOpsError, InvalidInput, LeaseHeld, OverlayRefused, PushConflict
from core.images import ImageRef, parse_reference, validate_sha
from core.kustomize import (
    CanarySettings,
    FieldChange,
    FieldPattern,
    ImageEntry,
    canary_fields,
    diff_manifests,
    find_image,
    image_fields,
    parse_canary,
    parse_rendered,
    render_canary,
    set_image,
    unexpected_changes,
)
from core.settings import get_settings

Environment = Literal["staging", "production"]
IDENTITY = ("robotics-cd", "robotics-cd@robotics.local")
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_BEFORE_RE = re.compile(r"^[0-9a-f]{40}(\^|~[0-9]{1,4})?$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REJECTED_HINTS = (
    "[rejected]",
    "non-fast-forward",
    "fetch first",
    "stale info",
    "[remote rejected]",
)


# --- results ------------------------------------------------------------------------------


class CommitResult(BaseModel):
    """What an overlay operation did: the commit that holds the state, and whether it is new."""

    model_config = ConfigDict(frozen=True)
    sha: str = Field(description="The commit on the branch that holds the requested state.")
    changed: bool = Field(description="True when this call pushed a new commit.")
    message: str = Field(description="Subject of the commit (ours, or the existing one).")


class CommitInfo(BaseModel):
    model_config = ConfigDict(frozen=True)
    sha: str
    subject: str


class Lease(BaseModel):
    """The release lock of one service and environment, as read from its ref."""

    model_config = ConfigDict(frozen=True)
    name: str = Field(description="<service>-<environment>")
    holder: str = Field(description="The flow run id holding the lease.")
    taken_at: datetime
    expires_at: datetime
    sha: str = Field(description="The lease commit (the value a compare-and-swap expects).")

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at


# --- plumbing -----------------------------------------------------------------------------


def _redact(text: str) -> str:
    """Drop credentials from URLs (https://user:token@host) before text reaches a message."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise InvalidInput(f"invalid {what} {value!r}: lowercase letters, digits and '-'")
    return value


def _check_relpath(value: str) -> str:
    parts = Path(value).parts
    if not value or value.startswith("/") or ".." in parts:
        raise InvalidInput(f"overlay path {value!r} must be relative, inside the manifests repo")
    return value.rstrip("/")


def _digest_required(image: ImageRef) -> ImageRef:
    if not image.digest or not image.tag:
        raise InvalidInput(
            f"image {image} must carry a tag and a digest (name:tag@sha256:...): "
            "the overlay pins what was scanned"
        )
    return image


def _as_image(value: str | ImageRef) -> ImageRef:
    return value if isinstance(value, ImageRef) else parse_reference(value)


def _trailers(flow_run_id: str | None, source_sha: str | None, image: ImageRef | None) -> str:
    lines = []
    if image is not None:
        lines.append(f"Image: {image}")
    if flow_run_id:
        lines.append(f"Prefect-Flow-Run: {flow_run_id}")
    if source_sha:
        lines.append(f"Source-Commit: {source_sha}")
    return "\n".join(lines)


def _message(subject: str, body: str, trailers: str) -> str:
    return "\n\n".join(p for p in (subject, body.strip(), trailers) if p) + "\n"


_locks_guard = threading.Lock()
_thread_locks: dict[str, threading.Lock] = {}


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    """Exclusive use of a clone: a thread lock within this process, flock across processes."""
    with _locks_guard:
        tlock = _thread_locks.setdefault(str(path), threading.Lock())
    with tlock:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class _Edit:
    """One overlay change: how to write it, which rendered fields it may change, its subject."""

    overlay: str
    apply: Callable[[Path], None]  # writes files under the work tree (re-run on a new head)
    allowed: list[FieldPattern]
    subject: str
    body: str
    trailers: str
    existing: Callable[[], str | None]  # the commit that already made this state, if any


# --- the client ---------------------------------------------------------------------------


class ManifestsRepo:
    """A clone of the manifests repo and the operations the release needs on it."""

    def __init__(
        self,
        *,
        url: str,
        workdir: Path,
        branch: str = "main",
        kubectl: str = "kubectl",
        max_push_attempts: int = 10,
        retry_base_delay: float = 0.2,
        render_timeout: float = 60.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not url:
            raise InvalidInput("manifests repo URL is empty; set defaults.manifests_repo")
        if not re.match(r"^[A-Za-z0-9._/-]+$", branch) or branch.startswith("-"):
            raise InvalidInput(f"invalid branch name {branch!r}")
        self.url = url
        self.workdir = workdir
        self.branch = branch
        self.kubectl = kubectl
        self.max_push_attempts = max_push_attempts
        self.retry_base_delay = retry_base_delay
        self.render_timeout = render_timeout
        self.clock = clock

    # -- git helpers

    def _git(self, *args: str) -> str:
        try:
            return str(git.Git(str(self.workdir)).execute(["git", *args]))
        except git.GitCommandError as exc:
            detail = _redact(str(exc.stderr or exc.stdout or exc).strip())
            raise GitOpsError(
                f"git {args[0]} failed in the manifests repo clone: {detail}"
            ) from None

    def _git_status(self, *args: str) -> tuple[int, str]:
        """Run git, returning (exit code, stdout+stderr) instead of raising."""
        proc = subprocess.run(
            ["git", *args], cwd=self.workdir, capture_output=True, text=True, check=False
        )
        return proc.returncode, _redact(proc.stdout + proc.stderr)

    def _ensure_clone(self) -> None:
        if (self.workdir / ".git").exists():
            return
        self.workdir.parent.mkdir(parents=True, exist_ok=True)
        try:
            git.Repo.clone_from(
                self.url,
                str(self.workdir),
                depth=1,
                branch=self.branch,
                single_branch=True,
                no_tags=True,
            )
        except git.GitCommandError as exc:
            raise GitOpsError(
                f"cannot clone the manifests repo {_redact(self.url)} (branch {self.branch}): "
                f"{_redact(str(exc.stderr).strip())}; check the URL, the branch and access"
            ) from None
        self._git("config", "user.name", IDENTITY[0])
        self._git("config", "user.email", IDENTITY[1])

    def _update(self) -> str:
        """Bring the work tree to the remote branch head, discarding anything local."""
        self._ensure_clone()
        self._git(
            "fetch", "-q", "origin", f"+refs/heads/{self.branch}:refs/remotes/origin/{self.branch}"
        )
        self._git("reset", "-q", "--hard", f"origin/{self.branch}")
        self._git("clean", "-q", "-ffdx")
        return self._git("rev-parse", "HEAD").strip()

    def _full_history(self) -> None:
        if self._git("rev-parse", "--is-shallow-repository").strip() == "true":
            self._git(
                "fetch",
                "-q",
                "--unshallow",
                "origin",
                f"+refs/heads/{self.branch}:refs/remotes/origin/{self.branch}",
            )

    def _render(self, overlay: str) -> str:
        try:
            proc = subprocess.run(
                [self.kubectl, "kustomize", str(self.workdir / overlay)],
                capture_output=True,
                text=True,
                timeout=self.render_timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            raise GitOpsError(
                f"kubectl not found at {self.kubectl!r}; set ROBOTICS_CD_KUBECTL"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise OverlayRefused(
                f"kubectl kustomize {overlay} did not finish in {self.render_timeout:.0f}s"
            ) from exc
        if proc.returncode != 0:
            raise OverlayRefused(f"overlay {overlay} does not render: {proc.stderr.strip()}")
        return proc.stdout

    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        with _dir_lock(self.workdir):
            yield

    def remove_clone(self) -> bool:
        """Delete this clone (at the end of a run); False when there was none."""
        with self._session():
            if not self.workdir.exists():
                return False
            shutil.rmtree(self.workdir)
            return True

    # -- reading

    def head_commit(self) -> str:
        """The branch head on the remote (after a fetch)."""
        with self._session():
            return self._update()

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        """True when ``ancestor`` is ``descendant`` or one of its ancestors."""
        validate_sha(ancestor)
        validate_sha(descendant)
        with self._session():
            self._update()
            self._full_history()
            for sha in (ancestor, descendant):
                code, _ = self._git_status("cat-file", "-e", f"{sha}^{{commit}}")
                if code != 0:
                    raise GitOpsError(
                        f"commit {sha} is not on the manifests branch {self.branch} "
                        "(a force-push, or a commit of another repo?)"
                    )
            code, out = self._git_status("merge-base", "--is-ancestor", ancestor, descendant)
            if code not in (0, 1):
                raise GitOpsError(f"git merge-base failed: {out.strip()}")
            return code == 0

    def commits_touching(self, path: str, since: str | None = None) -> list[CommitInfo]:
        """Commits after ``since`` (exclusive) up to head that changed ``path``, oldest first."""
        path = _check_relpath(path)
        if since is not None:
            validate_sha(since)
        with self._session():
            self._update()
            self._full_history()
            rev = f"{since}..HEAD" if since else "HEAD"
            out = self._git("log", "--reverse", "--format=%H%x09%s", rev, "--", path)
            return [
                CommitInfo(sha=line.split("\t", 1)[0], subject=line.split("\t", 1)[1])
                for line in out.splitlines()
                if "\t" in line
            ]

    def read_file(self, path: str) -> str:
        path = _check_relpath(path)
        with self._session():
            self._update()
            target = self.workdir / path
            if not target.is_file():
                raise GitOpsError(f"{path} does not exist in the manifests repo")
            return target.read_text()

    def current_image(self, overlay: str, image_name: str) -> ImageEntry | None:
        return find_image(
            self.read_file(f"{_check_relpath(overlay)}/kustomization.yaml"), image_name
        )

    def commits_of_run(self, overlay: str, flow_run_id: str) -> list[str]:
        """Commits (oldest first) that changed ``overlay`` with ``Prefect-Flow-Run: <id>``."""
        overlay = _check_relpath(overlay)
        if not _RUN_ID_RE.match(flow_run_id):
            raise InvalidInput(f"invalid flow run id {flow_run_id!r}")
        with self._session():
            self._update()
            self._full_history()
            out = self._git(
                "log",
                "--reverse",
                "--format=%H",
                "--fixed-strings",
                f"--grep=Prefect-Flow-Run: {flow_run_id}",
                "HEAD",
                "--",
                overlay,
            )
            return out.split()

    def image_history(self, overlay: str, image_name: str) -> list[tuple[str, ImageEntry]]:
        """(commit, entry) for each commit that changed ``overlay``'s kustomization, newest first."""
        path = f"{_check_relpath(overlay)}/kustomization.yaml"
        with self._session():
            self._update()
            self._full_history()
            history: list[tuple[str, ImageEntry]] = []
            for sha in self._git("log", "--format=%H", "HEAD", "--", path).split():
                code, text = self._git_status("show", f"{sha}:{path}")
                if code != 0:
                    continue  # the file was deleted in that commit
                try:
                    entry = find_image(text, image_name)
                except InvalidInput:
                    continue  # a broken revision of the file says nothing about images
                if entry is not None:
                    history.append((sha, entry))
            return history

    def preview_image_change(self, overlay: str, image_name: str, image: ImageRef) -> str:
        """The unified diff setting ``images[name=image_name]`` would make (nothing written)."""
        path = f"{_check_relpath(overlay)}/kustomization.yaml"
        old = self.read_file(path)
        new = set_image(old, ImageEntry(image_name, image.name, image.tag, image.digest))
        return "".join(
            difflib.unified_diff(
                old.splitlines(keepends=True),
                new.splitlines(keepends=True),
                fromfile=f"a/{path}",
                tofile=f"b/{path}",
            )
        )

    def canary_settings(self, overlay: str, service: str) -> CanarySettings:
        return parse_canary(self.read_file(f"{_check_relpath(overlay)}/canary.yaml"), service)

    # -- writing

    def _last_commit_with(self, path: str, needle: str | None) -> str | None:
        self._full_history()
        args = ["log", "-1", "--format=%H"]
        if needle:
            args.append(f"-S{needle}")
        out = self._git(*args, "HEAD", "--", path).strip()
        return out or None

    def _subject_of(self, sha: str) -> str:
        return self._git("log", "-1", "--format=%s", sha).strip()

    def _commit(self, edit: _Edit) -> CommitResult:
        """Apply, check, commit and push ``edit``; on a rejected push start over on the new head."""
        last_reason = ""
        for attempt in range(self.max_push_attempts):
            self._update()
            if not self._apply(edit):
                sha = edit.existing() or self._git("rev-parse", "HEAD").strip()
                return CommitResult(sha=sha, changed=False, message=self._subject_of(sha))
            # Render the head as it is, then our edit on top of it (applying is idempotent).
            self._git("reset", "-q", "--hard", "HEAD")
            before = parse_rendered(self._render_at_head(edit.overlay))
            self._apply(edit)
            self._check(edit, before)
            self._git("add", "-A", "--", edit.overlay)
            self._git("commit", "-q", "-m", _message(edit.subject, edit.body, edit.trailers))
            sha = self._git("rev-parse", "HEAD").strip()
            code, out = self._git_status(
                "push", "--porcelain", "origin", f"HEAD:refs/heads/{self.branch}"
            )
            if code == 0:
                return CommitResult(sha=sha, changed=True, message=edit.subject)
            if not any(hint in out for hint in _REJECTED_HINTS):
                self._git("reset", "-q", "--hard", f"origin/{self.branch}")
                raise GitOpsError(f"push to the manifests repo failed: {out.strip()}")
            last_reason = out.strip()
            # Someone else pushed first: back off with jitter so racers spread out.
            delay = min(2.0, self.retry_base_delay * (2 ** min(attempt, 4)))
            time.sleep(delay * random.uniform(0.5, 1.5))
        self._git("reset", "-q", "--hard", f"origin/{self.branch}")
        raise PushConflict(
            f"{edit.subject}: push still rejected after {self.max_push_attempts} attempts "
            f"({last_reason}); the manifests branch is busy, run the step again"
        )

    def _apply(self, edit: _Edit) -> bool:
        """Write the edit into the work tree; False when the overlay already says that."""
        try:
            edit.apply(self.workdir)
        except InvalidInput as exc:
            self._git("reset", "-q", "--hard", "HEAD")
            raise OverlayRefused(f"{edit.subject}: refused, nothing committed: {exc}") from exc
        return bool(self._git("status", "--porcelain", "--", edit.overlay).strip())

    def _render_at_head(self, overlay: str) -> str:
        try:
            return self._render(overlay)
        except OverlayRefused as exc:
            raise OverlayRefused(
                f"{exc} (at head {self._git('rev-parse', '--short', 'HEAD').strip()}, before "
                "our edit): fix the manifests repo first; nothing was committed"
            ) from exc

    def _check(self, edit: _Edit, before: list[dict[str, object]]) -> None:
        """Refuse (and undo locally) an edit that does not render or changes too much."""
        try:
            after = parse_rendered(self._render(edit.overlay))
            changes = diff_manifests(before, after)
            self._judge(edit, changes)
        except (OverlayRefused, InvalidInput) as exc:
            self._git("reset", "-q", "--hard", "HEAD")
            self._git("clean", "-q", "-ffdx")
            raise OverlayRefused(f"{edit.subject}: refused, nothing committed: {exc}") from exc

    @staticmethod
    def _judge(edit: _Edit, changes: list[FieldChange]) -> None:
        if not edit.allowed:  # a restore may change anything, as long as it renders
            return
        if not changes:
            raise OverlayRefused(
                f"the edit of {edit.overlay} changes nothing in the rendered manifests "
                "(does any workload use this image name?)"
            )
        unexpected = unexpected_changes(changes, edit.allowed)
        if unexpected:
            shown = "; ".join(str(c) for c in unexpected[:5])
            more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
            raise OverlayRefused(
                f"the edit of {edit.overlay} would change more than intended: {shown}{more}"
            )

    def set_image(
        self,
        *,
        overlay: str,
        image_name: str,
        image: ImageRef,
        subject: str,
        body: str = "",
        flow_run_id: str | None = None,
        source_sha: str | None = None,
        extra: Callable[[Path], None] | None = None,
        extra_allowed: list[FieldPattern] | None = None,
    ) -> CommitResult:
        """Point ``images[name=image_name]`` of ``overlay`` at ``image`` (plus ``extra`` edits)."""
        overlay = _check_relpath(overlay)
        entry = ImageEntry(image_name, image.name, image.tag, image.digest)
        kustomization = f"{overlay}/kustomization.yaml"

        def apply(root: Path) -> None:
            path = root / kustomization
            if not path.is_file():
                raise OverlayRefused(f"{kustomization} does not exist in the manifests repo")
            text = path.read_text()
            new = set_image(text, entry)
            if new != text:
                path.write_text(new)
            if extra is not None:
                extra(root)

        def existing() -> str | None:
            return self._last_commit_with(kustomization, image.digest)

        edit = _Edit(
            overlay=overlay,
            apply=apply,
            allowed=image_fields(image=str(image)) + (extra_allowed or []),
            subject=subject,
            body=body,
            trailers=_trailers(flow_run_id, source_sha, image),
            existing=existing,
        )
        with self._session():
            return self._commit(edit)

    def set_canary(
        self,
        *,
        overlay: str,
        service: str,
        image: ImageRef | None,
        settings: CanarySettings,
        subject: str,
        body: str = "",
        flow_run_id: str | None = None,
        source_sha: str | None = None,
        stable_image: ImageRef | None = None,
    ) -> CommitResult:
        """Write canary replicas/weight (and the canary image, and for a promotion the stable one)."""
        overlay = _check_relpath(overlay)
        canary_file = f"{overlay}/canary.yaml"
        kustomization = f"{overlay}/kustomization.yaml"
        entries = []
        if image is not None:
            entries.append(ImageEntry(f"{service}-canary", image.name, image.tag, image.digest))
        if stable_image is not None:
            entries.append(
                ImageEntry(service, stable_image.name, stable_image.tag, stable_image.digest)
            )

        def apply(root: Path) -> None:
            kpath, cpath = root / kustomization, root / canary_file
            for path in (kpath, cpath):
                if not path.is_file():
                    raise OverlayRefused(
                        f"{path.relative_to(root)} does not exist in the manifests repo"
                    )
            text = kpath.read_text()
            new = text
            for entry in entries:
                new = set_image(new, entry)
            if new != text:
                kpath.write_text(new)
            old_canary = cpath.read_text()
            if parse_canary(old_canary, service) != settings:
                cpath.write_text(render_canary(service, settings, previous=old_canary))

        def existing() -> str | None:
            return self._last_commit_with(overlay, None)

        allowed = canary_fields(service, settings)
        if image is not None:
            allowed += image_fields("Deployment", f"{service}-canary", image=str(image))
        if stable_image is not None:
            allowed += image_fields(image=str(stable_image))
        edit = _Edit(
            overlay=overlay,
            apply=apply,
            allowed=allowed,
            subject=subject,
            body=body,
            trailers=_trailers(flow_run_id, source_sha, stable_image or image),
            existing=existing,
        )
        with self._session():
            return self._commit(edit)

    def restore(
        self,
        *,
        overlay: str,
        before: str,
        subject: str,
        body: str,
        flow_run_id: str | None = None,
    ) -> CommitResult:
        """Restore ``overlay`` to its tree in ``before`` (a commit, or a root tree), one commit."""
        overlay = _check_relpath(overlay)
        if not _BEFORE_RE.match(before):
            raise InvalidInput(
                f"invalid revision {before!r}: a 40-hex commit or tree sha, optionally with ^ or ~N"
            )

        def apply(root: Path) -> None:
            self._full_history()
            code, _ = self._git_status("cat-file", "-e", f"{before}^{{tree}}")
            if code != 0:
                raise GitOpsError(
                    f"{before} is not in the manifests repo; cannot restore {overlay} from it"
                )
            self._git("rm", "-r", "-q", "--ignore-unmatch", "--", overlay)
            self._git("checkout", before, "--", overlay)

        def existing() -> str | None:
            return self._last_commit_with(overlay, None)

        edit = _Edit(
            overlay=overlay,
            apply=apply,
            allowed=[],
            subject=subject,
            body=body,
            trailers=_trailers(flow_run_id, None, None),
            existing=existing,
        )
        with self._session():
            return self._commit(edit)

    # -- the lease

    def _lease_ref(self, name: str) -> str:
        return f"refs/leases/{name}"

    def read_lease(self, name: str) -> Lease | None:
        with self._session():
            return self._read_lease(name)

    def _read_lease(self, name: str) -> Lease | None:
        self._ensure_clone()
        ref = self._lease_ref(name)
        local = f"refs/robotics-cd/leases/{name}"
        code, out = self._git_status(
            "fetch", "-q", "--no-tags", "--no-write-fetch-head", "origin", f"+{ref}:{local}"
        )
        if code != 0:
            if "couldn't find remote ref" in out:
                self._git_status("update-ref", "-d", local)
                return None
            raise GitOpsError(f"cannot read lease {name}: {out.strip()}")
        sha = self._git("rev-parse", local).strip()
        raw = self._git("log", "-1", "--format=%b", sha).strip()
        try:
            data = json.loads(raw)
            return Lease(
                name=name,
                holder=str(data["holder"]),
                taken_at=datetime.fromisoformat(data["taken_at"]),
                expires_at=datetime.fromisoformat(data["expires_at"]),
                sha=sha,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise GitOpsError(
                f"lease {name} ({sha[:12]}) holds no readable lease record; delete the ref "
                f"{ref} in the manifests remote if no release is running"
            ) from exc

    def _cas(self, name: str, expected: str | None, new: str | None) -> bool:
        """Move the lease ref from ``expected`` to ``new`` (None: absent) on the remote, atomically."""
        ref = self._lease_ref(name)
        lease_arg = f"--force-with-lease={ref}:{expected or ''}"
        code, out = self._git_status(
            "push", "--porcelain", lease_arg, "origin", f"{new or ''}:{ref}"
        )
        if code == 0:
            return True
        if any(hint in out for hint in _REJECTED_HINTS):
            return False
        raise GitOpsError(f"cannot update lease {name}: {out.strip()}")

    def _lease_commit(self, name: str, holder: str, taken_at: datetime, ttl: timedelta) -> str:
        record = {
            "holder": holder,
            "taken_at": taken_at.isoformat(),
            "expires_at": (self.clock() + ttl).isoformat(),
            "nonce": uuid.uuid4().hex,  # two identical records must still be distinct commits
        }
        # The empty tree must exist as an object before a commit can point at it.
        subprocess.run(
            ["git", "hash-object", "-t", "tree", "-w", "--stdin"],
            cwd=self.workdir,
            input="",
            capture_output=True,
            text=True,
            check=True,
        )
        return self._git(
            "commit-tree", EMPTY_TREE, "-m", f"lease {name}\n\n{json.dumps(record)}"
        ).strip()

    def take_lease(self, name: str, holder: str, ttl: timedelta) -> Lease:
        """Take the lease (or renew it when ``holder`` has it); LeaseHeld when another run does."""
        with self._session():
            for _ in range(3):
                current = self._read_lease(name)
                now = self.clock()
                if current and current.holder != holder and not current.expired(now):
                    raise LeaseHeld(name, current.holder, current.expires_at.isoformat())
                taken_at = current.taken_at if current and current.holder == holder else now
                new = self._lease_commit(name, holder, taken_at, ttl)
                if self._cas(name, current.sha if current else None, new):
                    taken = self._read_lease(name)
                    if taken is None or taken.sha != new:
                        continue
                    return taken
            current = self._read_lease(name)
            if current is not None:
                raise LeaseHeld(name, current.holder, current.expires_at.isoformat())
            raise GitOpsError(f"lease {name}: compare-and-swap kept failing; try again")

    def renew_lease(self, name: str, holder: str, ttl: timedelta) -> Lease:
        with self._session():
            current = self._read_lease(name)
            if current is None:
                raise GitOpsError(f"lease {name} is not held by {holder} (nobody holds it)")
            if current.holder != holder:
                raise LeaseHeld(name, current.holder, current.expires_at.isoformat())
            new = self._lease_commit(name, holder, current.taken_at, ttl)
            if not self._cas(name, current.sha, new):
                now = self._read_lease(name)
                raise LeaseHeld(
                    name,
                    now.holder if now else "nobody",
                    now.expires_at.isoformat() if now else "-",
                )
            renewed = self._read_lease(name)
            if renewed is None:
                raise GitOpsError(f"lease {name} vanished right after renewal")
            return renewed

    def release_lease(self, name: str, holder: str) -> bool:
        """Delete the lease if ``holder`` has it; False when nobody held it."""
        with self._session():
            current = self._read_lease(name)
            if current is None:
                return False
            if current.holder != holder:
                raise LeaseHeld(name, current.holder, current.expires_at.isoformat())
            if not self._cas(name, current.sha, None):
                now = self._read_lease(name)
                if now is None:
                    return False
                raise LeaseHeld(name, now.holder, now.expires_at.isoformat())
            return True


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
    *, url: str | None = None, branch: str | None = None, run_id: str | None = None
) -> ManifestsRepo:
    """The clone of this flow run (shared by its tasks), configured from settings and catalog."""
    settings = get_settings()
    if url is None or branch is None:
        defaults = load_catalog().defaults
        url = url or defaults.manifests_repo
        branch = branch or defaults.manifests_branch
    # Outside a flow run, one clone per process (reused by its calls).
    run = run_id or _current_run_id() or f"adhoc-{os.getpid()}"
    key = hashlib.sha256(url.encode()).hexdigest()[:10]
    return ManifestsRepo(
        url=url,
        branch=branch,
        workdir=settings.workspace / "manifests" / f"{key}-{run}",
        kubectl=settings.kubectl,
    )


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
) -> CommitResult:
    """Pin ``image`` (name:tag@digest) in the service's overlay: ``deploy(<env>): <svc>:<tag>``."""
    _check_name(service, "service")
    ref = _digest_required(_as_image(image))
    if source_sha is not None:
        validate_sha(source_sha)
    path = _overlay(service, env, overlay)
    run_id = flow_run_id or _current_run_id()
    repo = manifests_repo(url=repo_url, branch=branch, run_id=run_id)
    result = repo.set_image(
        overlay=path,
        image_name=service,
        image=ref,
        subject=f"deploy({env}): {service}:{ref.tag}",
        body=message,
        flow_run_id=run_id,
        source_sha=source_sha,
    )
    _log(result)
    return result


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
    """Canary step: the canary image, its replicas and its traffic weight, in one commit."""
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
    """One commit restoring the overlay folder to its tree in ``before``, naming what it undoes."""
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
    )
    _log(result)
    return result


@task(name="gitops-remove-clone")
def remove_clone(
    flow_run_id: str | None = None, *, repo_url: str | None = None, branch: str | None = None
) -> bool:
    """Delete this run's clone of the manifests repo (call it when the run ends)."""
    run_id = flow_run_id or _current_run_id()
    if not run_id:
        raise InvalidInput("remove_clone needs a flow run id (none in this context)")
    return manifests_repo(url=repo_url, branch=branch, run_id=run_id).remove_clone()


@task(name="gitops-preview-production-change")
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


@task(name="gitops-previous-image")
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


@task(name="gitops-current-image")
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


@task(name="lease-take")
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
    who = holder or _current_run_id()
    if not who:
        raise InvalidInput("take_lease needs a holder (no flow run id in this context)")
    repo = manifests_repo(url=repo_url, branch=branch, run_id=who)
    return repo.take_lease(lease_name(service, env), who, _ttl(ttl))


@task(name="lease-renew")
def renew_lease(
    service: str,
    env: Environment,
    holder: str | None = None,
    ttl: str | float = "2h",
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> Lease:
    who = holder or _current_run_id()
    if not who:
        raise InvalidInput("renew_lease needs a holder (no flow run id in this context)")
    repo = manifests_repo(url=repo_url, branch=branch, run_id=who)
    return repo.renew_lease(lease_name(service, env), who, _ttl(ttl))


@task(name="lease-release")
def release_lease(
    service: str,
    env: Environment,
    holder: str | None = None,
    *,
    repo_url: str | None = None,
    branch: str | None = None,
) -> bool:
    who = holder or _current_run_id()
    if not who:
        raise InvalidInput("release_lease needs a holder (no flow run id in this context)")
    repo = manifests_repo(url=repo_url, branch=branch, run_id=who)
    return repo.release_lease(lease_name(service, env), who)


@task(name="lease-holder")
def lease_holder(
    service: str, env: Environment, *, repo_url: str | None = None, branch: str | None = None
) -> Lease | None:
    """Who holds the lock (the record may be expired: check ``Lease.expired``)."""
    return manifests_repo(url=repo_url, branch=branch).read_lease(lease_name(service, env))


def _log(result: CommitResult) -> None:
    logger = get_run_logger()
    if result.changed:
        logger.info("pushed %s %s", result.sha[:12], result.message)
    else:
        logger.info("already there: %s %s (no new commit)", result.sha[:12], result.message)


def descendant_check(
    *, repo_url: str | None = None, branch: str | None = None, run_id: str | None = None
) -> Callable[[str, str], bool]:
    """``check(revision, commit)``: is ``revision`` our ``commit`` or a later one on the branch?

    Hand it to ``tasks.argocd`` waits, which must not speak git themselves.
    """
    repo = manifests_repo(url=repo_url, branch=branch, run_id=run_id)

    def check(revision: str, commit: str) -> bool:
        return revision == commit or repo.is_ancestor(commit, revision)

    return check


def descends(revision: str, commit: str) -> bool:
    """``revision`` is ``commit`` or a later commit of the manifests branch (this run's clone).

    The ``is_descendant`` the Argo CD waits take; configured from the catalog.
    """
    return revision == commit or manifests_repo().is_ancestor(commit, revision)
