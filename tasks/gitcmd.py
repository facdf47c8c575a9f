"""Running the git command line: a deadline on every call, credentials the way git expects.

Both git modules (``tasks.gitops`` for the manifests repo, ``tasks.source`` for service
repos) run git through :func:`run_git`:

- **Every call has a timeout.** The whole process group is killed when it passes (git's
  ``git-remote-http`` helper included, so a hung remote cannot leave a child behind), and
  the error names the remote and the operation: ``git fetch of http://host/repo.git did
  not finish in 30s``.
- **Credentials never reach argv or disk.** A token in a URL (``https://user:token@host``)
  is split off by :func:`split_credentials`; git is given the clean URL and asks for the
  password through ``GIT_ASKPASS`` (``git_askpass.sh`` next to this module), which prints
  it from the git process's environment. Configured credential helpers are switched off
  (``credential.helper`` set empty through ``GIT_CONFIG_*``), so nothing stores the token
  in ``~/.git-credentials`` either, and prompts are off (``GIT_TERMINAL_PROMPT=0``).
- **Messages are redacted**: userinfo in any URL becomes ``***``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from core.errors import RoboticsCDError
from core.settings import get_settings

ASKPASS = Path(__file__).with_name("git_askpass.sh")
DEFAULT_TIMEOUT = 60.0
_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")


@dataclass(frozen=True)
class GitCredentials:
    """Basic-auth credentials for an HTTP(S) git remote (GitHub: any user, token as password)."""

    username: str
    password: str = field(repr=False)


def redact(text: str) -> str:
    """Drop credentials from URLs (``https://user:token@host`` → ``https://***@host``)."""
    return _USERINFO.sub(r"\1***@", text)


def split_credentials(url: str, token: str | None = None) -> tuple[str, GitCredentials | None]:
    """The URL without userinfo, and the credentials for it.

    A token in the URL wins over ``token`` (a Prefect Secret's value): ``https://tok@host``
    and ``https://user:tok@host`` both work. Non-HTTP URLs (``file://``, paths, ssh) get no
    credentials.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return url, None
    host = parts.netloc.rpartition("@")[2]
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    if parts.username is not None and parts.password is not None:
        return clean, GitCredentials(unquote(parts.username), unquote(parts.password))
    if parts.username is not None:
        return clean, GitCredentials("x-access-token", unquote(parts.username))
    if token:
        return clean, GitCredentials("x-access-token", token)
    return clean, None


def git_env(credentials: GitCredentials | None) -> dict[str, str]:
    """The environment of one git process: no prompts, no stored credentials, our askpass."""
    env = {
        **os.environ,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": str(ASKPASS),
        "SSH_ASKPASS": str(ASKPASS),
        "GIT_SSH_COMMAND": "ssh -oBatchMode=yes",
        "GCM_INTERACTIVE": "never",
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "credential.helper",
        "GIT_CONFIG_VALUE_0": "",
        "LC_ALL": "C",
    }
    env.pop("ROBOTICS_CD_GIT_USERNAME", None)
    env.pop("ROBOTICS_CD_GIT_PASSWORD", None)
    if credentials is not None:
        env["ROBOTICS_CD_GIT_USERNAME"] = credentials.username
        env["ROBOTICS_CD_GIT_PASSWORD"] = credentials.password
    return env


@dataclass(frozen=True)
class GitResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return redact(self.stdout + self.stderr)


def run_git(
    args: list[str],
    *,
    cwd: Path,
    remote: str,
    timeout: float = DEFAULT_TIMEOUT,
    credentials: GitCredentials | None = None,
    stdin: str | None = None,
    error: type[RoboticsCDError] = RoboticsCDError,
) -> GitResult:
    """Run ``git <args>`` in ``cwd``; kill it (and its children) after ``timeout`` seconds.

    Returns the exit code and output (callers decide what a failure means); raises
    ``error`` naming ``remote`` and the operation when the deadline passes or git is missing.
    """
    operation = next((a for a in args if not a.startswith("-")), "command")
    try:
        proc = subprocess.Popen(
            ["git", *args],
            cwd=cwd,
            env=git_env(credentials),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise error(f"git is not installed (needed for git {operation} of {remote})") from exc
    try:
        out, err = proc.communicate(input=stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise error(
            f"git {operation} of {redact(remote)} did not finish in {timeout:g}s "
            "(the remote hangs or is too slow); nothing was changed by this call, "
            "check the remote and run the step again"
        ) from None
    return GitResult(proc.returncode, out or "", err or "")


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - the group was SIGKILLed
        proc.kill()


def git_token(url: str) -> str | None:
    """The token for an HTTP(S) remote: from the Prefect Secret ``settings.git_token_block``.

    None for non-HTTP remotes, for URLs that carry their own credentials, and when no such
    block exists (a public remote needs none).
    """
    if not url.startswith(("http://", "https://")) or "@" in url.split("/")[2]:
        return None
    return _load_token(get_settings().git_token_block)


@lru_cache(maxsize=4)
def _load_token(block_name: str) -> str | None:
    from prefect.blocks.system import Secret

    try:
        block = Secret.load(block_name, _sync=True)  # type: ignore[call-arg]
    except ValueError:  # Prefect raises ValueError for a missing block
        return None
    value = block.get()  # type: ignore[union-attr]
    return value if isinstance(value, str) and value else None
