"""Git (GitPython): check out one exact commit of a service repo into a fresh directory.

A local bare repo is a remote like any other. Each checkout gets its own directory under
``settings.workspace/checkouts`` so concurrent runs never share a tree; the remote is
removed afterwards so a URL carrying a token does not linger in ``.git/config``.
"""

from __future__ import annotations

import re
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

import anyio.to_thread
import git
from prefect import get_run_logger, task
from pydantic import BaseModel, Field

from core.errors import SourceError
from core.images import validate_sha
from core.settings import get_settings

_GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "true",
    "GIT_SSH_COMMAND": "ssh -oBatchMode=yes",
}
_USERINFO = re.compile(r"(?<=://)[^/@]+@")


class Checkout(BaseModel):
    """What a checkout produced: the exact commit and where its tree is."""

    sha: str = Field(description="The 40-character commit id that was checked out.")
    committed_at: datetime = Field(description="Committer date of the commit, in UTC.")
    path: str = Field(description="Directory holding the working tree.")
    subject: str = Field(default="", description="First line of the commit message.")


def redact_url(url: str) -> str:
    """The remote URL without user/password (``https://token@host`` → ``https://***@host``)."""
    return _USERINFO.sub("***@", url)


def _fresh_dir(workspace: Path, label: str, sha: str) -> Path:
    path = workspace / "checkouts" / f"{label or 'repo'}-{sha[:12]}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def _fetch(repo: git.Repo, sha: str) -> None:
    """Fetch just ``sha``; fall back to all branches and PR heads when the server refuses."""
    try:
        repo.git.fetch("--no-tags", "--depth=1", "origin", sha)
    except git.GitCommandError:
        repo.git.fetch(
            "--no-tags",
            "origin",
            "+refs/heads/*:refs/remotes/origin/*",
            "+refs/pull/*/head:refs/remotes/origin/pr/*",
        )


def checkout_sync(repo_url: str, sha: str, *, workspace: Path, label: str = "") -> Checkout:
    """The blocking work of :func:`checkout` (GitPython), for worker threads."""
    validate_sha(sha)
    path = _fresh_dir(workspace, label, sha)
    try:
        repo = git.Repo.init(path)
        with repo.git.custom_environment(**_GIT_ENV):
            repo.create_remote("origin", repo_url)
            _fetch(repo, sha)
            repo.git.checkout("--detach", "--quiet", sha)
            repo.delete_remote(repo.remote("origin"))
        commit = repo.head.commit
    except (git.GitCommandError, ValueError) as exc:
        shutil.rmtree(path, ignore_errors=True)
        detail = redact_url(str(getattr(exc, "stderr", "") or exc)).strip()
        raise SourceError(
            f"cannot check out {sha} from {redact_url(repo_url)}: {detail.splitlines()[-1] if detail else exc}; "
            "check the repo in services.yaml and that the commit was pushed"
        ) from exc
    if commit.hexsha != sha:
        raise SourceError(f"checked out {commit.hexsha} but {sha} was asked for")
    return Checkout(
        sha=commit.hexsha,
        committed_at=commit.committed_datetime.astimezone(UTC),
        path=str(path),
        subject=str(commit.summary),
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
    workspace = get_settings().workspace
    result = await anyio.to_thread.run_sync(
        lambda: checkout_sync(repo_url, sha, workspace=workspace, label=label)
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


def is_superseded_sync(
    repo_url: str, source_sha: str, running_tag: str, *, workspace: Path
) -> bool:
    """True when production's image (tag ``YYYYMMDD-sha7``) was built from ``source_sha``
    or a descendant of it, so releasing ``source_sha`` would go backwards or do nothing."""
    validate_sha(source_sha)
    match = _TAG_SHA7.match(running_tag)
    if match is None:  # not one of our tags (a seed or hand-made image): nothing to compare
        return False
    path = workspace / "history" / uuid.uuid4().hex[:12]
    path.mkdir(parents=True)
    try:
        repo = git.Repo.init(path, bare=True)
        with repo.git.custom_environment(**_GIT_ENV):
            repo.git.fetch(
                "--no-tags", "--filter=blob:none", repo_url, "+refs/heads/*:refs/heads/*"
            )
            try:
                running = repo.git.rev_parse("--verify", "--quiet", f"{match.group(1)}^{{commit}}")
            except git.GitCommandError:
                return False  # built from a commit no branch holds any more
            try:
                repo.git.merge_base("--is-ancestor", source_sha, running)
            except git.GitCommandError as exc:
                if exc.status == 1:
                    return False
                raise SourceError(
                    f"cannot compare {source_sha[:12]} with {running[:12]} in "
                    f"{redact_url(repo_url)}: {exc.stderr.strip()}"
                ) from exc
            return True
    finally:
        shutil.rmtree(path, ignore_errors=True)


@task(name="is-superseded")
async def is_superseded(repo_url: str, source_sha: str, running_tag: str) -> bool:
    """Is production already running ``source_sha`` or something built after it?"""
    workspace = get_settings().workspace
    return await anyio.to_thread.run_sync(
        lambda: is_superseded_sync(repo_url, source_sha, running_tag, workspace=workspace)
    )
