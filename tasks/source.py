"""Git: check out one exact commit of a service repo into a fresh directory.

A local bare repo is a remote like any other. Each checkout gets its own directory under
``settings.workspace/checkouts`` so concurrent runs never share a tree. No remote is
configured in it: the commit is fetched by URL, the URL without credentials, and a token
(from the URL or the Prefect Secret ``settings.git_token_block``) reaches git only through
``GIT_ASKPASS`` (``tasks.gitcmd``), so it is in no process's argv and no file. Every git
call has a deadline (``settings.git_timeout``); a call that passes it is a ``SourceError``
naming the remote and the operation.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio.to_thread
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from core.errors import SourceError
from core.images import validate_sha
from core.ordering import SourceRelation, source_order
from core.settings import get_settings
from tasks.gitcmd import DEFAULT_TIMEOUT, git_token, redact, run_git, split_credentials


class Checkout(BaseModel):
    """What a checkout produced: the exact commit and where its tree is."""

    sha: str = Field(description="The 40-character commit id that was checked out.")
    committed_at: datetime = Field(description="Committer date of the commit, in UTC.")
    path: str = Field(description="Directory holding the working tree.")
    subject: str = Field(default="", description="First line of the commit message.")


def redact_url(url: str) -> str:
    """The remote URL without user/password (``https://token@host`` → ``https://***@host``)."""
    return redact(url)


def _fresh_dir(workspace: Path, label: str, sha: str) -> Path:
    path = workspace / "checkouts" / f"{label or 'repo'}-{sha[:12]}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


class _Git:
    """git in one directory, against one remote, with a deadline and askpass credentials."""

    def __init__(self, path: Path, repo_url: str, timeout: float, token: str | None) -> None:
        self.path = path
        self.url, self.credentials = split_credentials(repo_url, token)
        self.timeout = timeout

    def status(self, *args: str) -> tuple[int, str, str]:
        result = run_git(
            list(args),
            cwd=self.path,
            remote=self.url,
            timeout=self.timeout,
            credentials=self.credentials,
            error=SourceError,
        )
        return result.code, result.stdout, redact(result.stderr)

    def __call__(self, *args: str) -> str:
        code, out, err = self.status(*args)
        if code != 0:
            detail = (err or out).strip()
            lines = detail.splitlines() or [f"exit code {code}"]
            first = next((ln for ln in lines if ln.startswith(("fatal:", "error:"))), lines[-1])
            raise SourceError(f"git {args[0]} failed for {self.url}: {first}")
        return out


def _fetch(g: _Git, sha: str) -> None:
    """Fetch just ``sha``; fall back to all branches and PR heads when the server refuses."""
    code, _, _ = g.status("fetch", "-q", "--no-tags", "--depth=1", "--", g.url, sha)
    if code != 0:
        g(
            "fetch",
            "-q",
            "--no-tags",
            "--",
            g.url,
            "+refs/heads/*:refs/remotes/origin/*",
            "+refs/pull/*/head:refs/remotes/origin/pr/*",
        )


def checkout_sync(
    repo_url: str,
    sha: str,
    *,
    workspace: Path,
    label: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
) -> Checkout:
    """The blocking work of :func:`checkout`, for worker threads."""
    validate_sha(sha)
    path = _fresh_dir(workspace, label, sha)
    g = _Git(path, repo_url, timeout, token)
    try:
        g("init", "-q")
        _fetch(g, sha)
        g("checkout", "--detach", "--quiet", sha)
        head, stamp, subject = g("log", "-1", "--format=%H%x00%ct%x00%s", "HEAD").split("\0", 2)
    except SourceError as exc:
        shutil.rmtree(path, ignore_errors=True)
        raise SourceError(
            f"cannot check out {sha} from {g.url}: {exc}; "
            "check the repo in services.yaml and that the commit was pushed"
        ) from exc
    if head != sha:
        raise SourceError(f"checked out {head} but {sha} was asked for")
    return Checkout(
        sha=head,
        committed_at=datetime.fromtimestamp(int(stamp), UTC),
        path=str(path),
        subject=subject.strip(),
    )


@task(
    name="checkout",
    task_run_name="checkout {sha:.7}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=lambda _task, _run, state: isinstance(state.data, SourceError),
)
async def checkout(repo_url: str, sha: str, *, label: str = "") -> Checkout:
    """Check out commit ``sha`` of ``repo_url`` into a fresh directory.

    Args:
        repo_url: git remote (URL or path; a token in the URL is redacted everywhere).
        sha: the full 40-hex commit id; anything else is refused before touching git.
        label: a prefix for the directory name (the service or training image name).

    Returns:
        :class:`Checkout` with the sha, the committer date in UTC (the tag's date) and the
        path of the tree, under ``settings.workspace/checkouts``.

    Raises:
        InvalidInput: ``sha`` is not 40 lowercase hex characters.
        SourceError: the remote or the commit cannot be fetched.
    """
    validate_sha(sha)
    settings = get_settings()
    token = git_token(repo_url)
    result = await anyio.to_thread.run_sync(
        lambda: checkout_sync(
            repo_url,
            sha,
            workspace=settings.workspace,
            label=label,
            timeout=settings.git_timeout,
            token=token,
        )
    )
    get_run_logger().info(
        "checked out %s (%s, committed %s) into %s",
        sha[:7],
        result.subject,
        result.committed_at.isoformat(),
        result.path,
    )
    return result


@task(name="remove-checkout")
async def remove_checkout(path: str) -> None:
    """Delete a checkout made by :func:`checkout` (only paths under the workspace)."""
    root = (get_settings().workspace / "checkouts").resolve()
    target = Path(path).resolve()
    if root not in target.parents:
        raise SourceError(f"refusing to delete {target}: not under {root}")
    try:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(target))
    except OSError as exc:
        # A leftover directory costs disk, not correctness: say so and go on.
        get_run_logger().warning("could not delete checkout %s: %s", target, exc)


_TAG_SHA7 = re.compile(r"^\d{8}-([0-9a-f]{7})$")


@contextlib.contextmanager
def _history(
    repo_url: str,
    refspec: str,
    *,
    workspace: Path,
    timeout: float,
    token: str | None,
) -> Iterator[_Git]:
    """A throwaway bare repo holding the commit graph (no blobs) of ``refspec``."""
    path = workspace / "history" / uuid.uuid4().hex[:12]
    path.mkdir(parents=True)
    g = _Git(path, repo_url, timeout, token)
    try:
        g("init", "-q", "--bare")
        g("fetch", "-q", "--no-tags", "--filter=blob:none", "--", g.url, refspec)
        yield g
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _is_ancestor(g: _Git, ancestor: str, descendant: str) -> bool:
    """``git merge-base --is-ancestor``; a commit the fetched history lacks is nobody's."""
    code, out, err = g.status("merge-base", "--is-ancestor", ancestor, descendant)
    # 1: not an ancestor; "not a valid commit" / "no such commit": not in the history at all
    if code == 1 or (code == 128 and ("not a valid" in err.lower() or "no such" in err.lower())):
        return False
    if code != 0:
        raise SourceError(
            f"cannot compare {ancestor[:12]} with {descendant[:12]} in {g.url}: "
            f"{(err or out).strip()}"
        )
    return True


def is_superseded_sync(
    repo_url: str,
    source_sha: str,
    running_tag: str,
    *,
    workspace: Path,
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
) -> bool:
    """True when production's image (tag ``YYYYMMDD-sha7``) was built from ``source_sha``
    or a descendant of it, so releasing ``source_sha`` would go backwards or do nothing."""
    validate_sha(source_sha)
    match = _TAG_SHA7.match(running_tag)
    if match is None:  # not one of our tags (a seed or hand-made image): nothing to compare
        return False
    with _history(
        repo_url, "+refs/heads/*:refs/heads/*", workspace=workspace, timeout=timeout, token=token
    ) as g:
        code, out, _ = g.status("rev-parse", "--verify", "--quiet", f"{match.group(1)}^{{commit}}")
        if code != 0:
            return False  # built from a commit no branch holds any more
        return _is_ancestor(g, source_sha, out.strip())


def source_relation_sync(
    repo_url: str,
    ours: str,
    theirs: str,
    branch: str,
    *,
    workspace: Path,
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
) -> SourceRelation:
    """How commit ``ours`` relates to ``theirs`` in ``repo_url``, and which of them
    ``branch`` still holds (one fetch of every branch's commit graph)."""
    validate_sha(ours)
    validate_sha(theirs)
    _check_branch(branch)
    with _history(
        repo_url, "+refs/heads/*:refs/heads/*", workspace=workspace, timeout=timeout, token=token
    ) as g:
        order = source_order(ours, theirs, lambda a, b: _is_ancestor(g, a, b))
        return SourceRelation(
            order=order,
            ours_on_branch=_is_ancestor(g, ours, f"refs/heads/{branch}"),
            theirs_on_branch=_is_ancestor(g, theirs, f"refs/heads/{branch}"),
        )


@task(name="is-superseded", cache_policy=NO_CACHE)
async def is_superseded(repo_url: str, source_sha: str, running_tag: str) -> bool:
    """Is production already running ``source_sha`` or something built after it?"""
    settings = get_settings()
    token = git_token(repo_url)
    return await anyio.to_thread.run_sync(
        lambda: is_superseded_sync(
            repo_url,
            source_sha,
            running_tag,
            workspace=settings.workspace,
            timeout=settings.git_timeout,
            token=token,
        )
    )


def _check_branch(branch: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9._/-]+", branch) or ".." in branch:
        raise SourceError(f"invalid branch name {branch!r} in the catalog")


def is_on_branch_sync(
    repo_url: str,
    sha: str,
    branch: str,
    *,
    workspace: Path,
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
) -> bool:
    """True when ``sha`` is the tip of ``branch`` in ``repo_url`` or an ancestor of it."""
    validate_sha(sha)
    _check_branch(branch)
    with _history(
        repo_url,
        f"+refs/heads/{branch}:refs/heads/{branch}",
        workspace=workspace,
        timeout=timeout,
        token=token,
    ) as g:
        return _is_ancestor(g, sha, branch)


@task(
    name="is-on-branch",
    task_run_name="is {sha:.7} on {branch}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=lambda _task, _run, state: isinstance(state.data, SourceError),
)
async def is_on_branch(repo_url: str, sha: str, branch: str) -> bool:
    """Is commit ``sha`` on ``branch`` of ``repo_url`` (its tip or an ancestor of it)?

    A push build asks this of the catalog's repo and release branch before it builds: a run
    started by hand through the API with ``event=push`` carries a commit of its caller's
    choosing, a pull-request head included.
    """
    settings = get_settings()
    token = git_token(repo_url)
    return await anyio.to_thread.run_sync(
        lambda: is_on_branch_sync(
            repo_url,
            sha,
            branch,
            workspace=settings.workspace,
            timeout=settings.git_timeout,
            token=token,
        )
    )


@task(name="source-relation", task_run_name="{ours:.7} against {theirs:.7}", cache_policy=NO_CACHE)
async def source_relation(repo_url: str, ours: str, theirs: str, branch: str) -> SourceRelation:
    """How this release's commit relates to another release's (see :func:`source_relation_sync`)."""
    settings = get_settings()
    token = git_token(repo_url)
    return await anyio.to_thread.run_sync(
        lambda: source_relation_sync(
            repo_url,
            ours,
            theirs,
            branch,
            workspace=settings.workspace,
            timeout=settings.git_timeout,
            token=token,
        )
    )
