"""The manifests repo clone: git with deadlines, fetching, reading history, pushing.

Each flow run works in its own clone (``<workspace>/manifests/<repo>-<run id>``); tasks of
one run share it under a file lock, and the run deletes it when it ends. The clone's remote
URL carries no credentials: a token comes from the URL given (split off) or from the Prefect
Secret, and reaches git only through ``GIT_ASKPASS`` (see ``tasks.gitcmd``). Every git call
has a deadline (``git_timeout``); one that passes it raises ``GitOpsError`` naming the remote
and the operation.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.backoff import Backoff
from core.errors import GitOpsError, InvalidInput, OverlayRefused
from core.images import SHA_RE, ImageRef, parse_reference, validate_sha
from core.kustomize import ImageEntry, find_image
from tasks.gitcmd import DEFAULT_TIMEOUT, GitCredentials, redact, run_git, split_credentials

Environment = Literal["staging", "production"]
IDENTITY = ("robotics-cd", "robotics-cd@robotics.local")
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REJECTED_HINTS = (
    "[rejected]",
    "non-fast-forward",
    "fetch first",
    "stale info",
    "[remote rejected]",
    "atomic push failed",
)


# --- results ------------------------------------------------------------------------------


class CommitResult(BaseModel):
    """What an overlay operation did: the commit that holds the state, and whether it is new."""

    model_config = ConfigDict(frozen=True)
    sha: str = Field(description="The commit on the branch that holds the requested state.")
    changed: bool = Field(description="True when this call pushed a new commit.")
    message: str = Field(description="Subject of the commit (ours, or the existing one).")
    lease_sha: str | None = Field(
        default=None,
        description="For a fenced write: the lease commit pushed with it (None: unfenced).",
    )


class RollbackFacts(BaseModel):
    """What the manifests branch says about one release's commits to an overlay."""

    model_config = ConfigDict(frozen=True)
    commits: list[str] = Field(
        description="The release's own forward commits (by its Prefect-Flow-Run trailer, "
        "reverting commits excluded), oldest first."
    )
    undone: set[str] = Field(description="Commits any reverting commit names (Undoes: <sha>).")
    later_runs: list[str] = Field(
        description="Flow runs whose forward commits changed the overlay after the release's "
        "last commit, oldest first."
    )


class OverlaySource(BaseModel):
    """Which release last pinned an overlay's image: its commit's trailers."""

    model_config = ConfigDict(frozen=True)
    commit: str
    source_sha: str
    flow_run_id: str = ""
    image: str = ""

    def describe(self) -> str:
        run = f" (release {self.flow_run_id})" if self.flow_run_id else ""
        return f"{self.image or 'an image'} built from {self.source_sha[:12]}{run}"


class CommitInfo(BaseModel):
    model_config = ConfigDict(frozen=True)
    sha: str
    subject: str


# --- plumbing -----------------------------------------------------------------------------


def _redact(text: str) -> str:
    """Drop credentials from URLs (https://user:token@host) before text reaches a message."""
    return redact(text)


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


# --- the clone ----------------------------------------------------------------------------


class Repository:
    """A clone of the manifests repo: git with deadlines, fetch, reads, plain pushes."""

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
        git_timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not url:
            raise InvalidInput("manifests repo URL is empty; set defaults.manifests_repo")
        if not re.match(r"^[A-Za-z0-9._/-]+$", branch) or branch.startswith("-"):
            raise InvalidInput(f"invalid branch name {branch!r}")
        clean, credentials = split_credentials(url, token)
        self.url = clean  # never holds a credential: this is what git and messages see
        self._credentials: GitCredentials | None = credentials
        self.workdir = workdir
        self.branch = branch
        self.kubectl = kubectl
        self.max_push_attempts = max_push_attempts
        # Someone else pushed first: back off with jitter so racers spread out.
        self.push_backoff = Backoff(
            retries=max_push_attempts - 1, base_delay=retry_base_delay, max_delay=2.0, jitter=True
        )
        self.render_timeout = render_timeout
        self.git_timeout = git_timeout
        self.clock = clock

    # -- git helpers

    def _run(
        self, *args: str, cwd: Path | None = None, stdin: str | None = None
    ) -> tuple[int, str, str]:
        result = run_git(
            list(args),
            cwd=cwd or self.workdir,
            remote=self.url,
            timeout=self.git_timeout,
            credentials=self._credentials,
            stdin=stdin,
            error=GitOpsError,
        )
        return result.code, result.stdout, redact(result.stderr)

    def _git(self, *args: str, stdin: str | None = None) -> str:
        code, out, err = self._run(*args, stdin=stdin)
        if code != 0:
            detail = redact((err or out).strip())
            raise GitOpsError(f"git {args[0]} failed in the manifests repo clone: {detail}")
        return out

    def _git_status(self, *args: str) -> tuple[int, str]:
        """Run git, returning (exit code, stdout+stderr) instead of raising."""
        code, out, err = self._run(*args)
        return code, redact(out + err)

    def _ensure_clone(self) -> None:
        if (self.workdir / ".git").exists():
            return
        self.workdir.parent.mkdir(parents=True, exist_ok=True)
        code, out, err = self._run(
            "clone",
            "-q",
            "--depth=1",
            f"--branch={self.branch}",
            "--single-branch",
            "--no-tags",
            "--",
            self.url,
            str(self.workdir),
            cwd=self.workdir.parent,
        )
        if code != 0:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise GitOpsError(
                f"cannot clone the manifests repo {self.url} (branch {self.branch}): "
                f"{(err or out).strip()}; check the URL, the branch and access"
            )
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

    def _revert_in_tree(self, commits: list[str], what: str) -> None:
        """Revert ``commits`` in the work tree, uncommitted (the caller commits and pushes);
        a conflict leaves the tree as it was and refuses, naming the files."""
        code, out = self._git_status("revert", "--no-commit", "--no-edit", *commits)
        if code != 0:
            conflicts = self._git_status("diff", "--name-only", "--diff-filter=U")[1]
            self._git_status("revert", "--abort")
            self._git("reset", "-q", "--hard", "HEAD")
            raise OverlayRefused(
                f"{what} do not revert cleanly on {self.branch} (someone changed the same "
                f"lines since: {' '.join(conflicts.split()) or out.strip()}); nothing "
                "committed, restore those fields by hand"
            )
        self._git_status("revert", "--quit")

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

    def rollback_facts(self, overlay: str, flow_run_id: str) -> RollbackFacts:
        """One read of the overlay's history for the rollback of release ``flow_run_id``."""
        overlay = _check_relpath(overlay)
        if not _RUN_ID_RE.match(flow_run_id):
            raise InvalidInput(f"invalid flow run id {flow_run_id!r}")
        with self._session():
            self._update()
            self._full_history()
            out = self._git("log", "--reverse", "--format=%H%x00%B%x1e", "HEAD", "--", overlay)
        commits: list[str] = []
        undone: set[str] = set()
        runs: list[tuple[str, str]] = []  # (sha, run) of forward commits, oldest first
        for entry in out.split("\x1e"):
            sha, _, body = entry.strip().partition("\x00")
            if not sha:
                continue
            named = set(re.findall(r"^Undoes: ([0-9a-f]{40})$", body, re.MULTILINE))
            undone |= named
            if named:
                continue  # a reverting commit is nobody's forward change
            run = re.search(r"^Prefect-Flow-Run: (\S+)$", body, re.MULTILINE)
            runs.append((sha, run.group(1) if run else ""))
            if run and run.group(1) == flow_run_id:
                commits.append(sha)
        later: list[str] = []
        if commits:
            after = [r for _, r in runs[[s for s, _ in runs].index(commits[-1]) + 1 :]]
            later = [r for r in dict.fromkeys(after) if r and r != flow_run_id]
        return RollbackFacts(commits=commits, undone=undone, later_runs=later)

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

    def overlay_source(self, overlay: str, revision: str = "HEAD") -> OverlaySource | None:
        """The newest commit up to ``revision`` that changed ``overlay`` with a
        ``Source-Commit`` trailer (None: no release wrote it yet, e.g. the seed)."""
        overlay = _check_relpath(overlay)
        self._full_history()
        out = self._git(
            "log",
            "-1",
            "--format=%H%x1f%(trailers:key=Source-Commit,valueonly,separator=%x2c)"
            "%x1f%(trailers:key=Prefect-Flow-Run,valueonly,separator=%x2c)"
            "%x1f%(trailers:key=Image,valueonly,separator=%x2c)",
            "--grep=^Source-Commit: ",
            revision,
            "--",
            overlay,
        ).strip()
        if not out:
            return None
        commit, source_sha, run_id, image = [*out.split("\x1f"), "", "", ""][:4]
        if not SHA_RE.match(source_sha.strip()):
            return None
        return OverlaySource(
            commit=commit,
            source_sha=source_sha.strip(),
            flow_run_id=run_id.strip(),
            image=image.strip(),
        )

    def image_at(self, overlay: str, image_name: str, revision: str) -> ImageEntry | None:
        """The overlay's ``images[name=image_name]`` at ``revision`` of the manifests repo."""
        path = f"{_check_relpath(overlay)}/kustomization.yaml"
        with self._session():
            self._update()
            self._full_history()
            code, text = self._git_status("show", f"{revision}:{path}")
            if code != 0:
                raise GitOpsError(f"{path} is not in revision {revision[:12]} of {self.url}")
            return find_image(text, image_name)

    def source_at(self, overlay: str, revision: str) -> OverlaySource | None:
        """:meth:`overlay_source` as of ``revision`` (fetched first)."""
        with self._session():
            self._update()
            return self.overlay_source(overlay, revision)
