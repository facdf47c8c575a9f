"""Running git: deadlines, credentials kept out of URLs and argv, redaction."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import GitOpsError
from tasks.gitcmd import ASKPASS, GitCredentials, git_env, redact, run_git, split_credentials


def test_a_token_in_the_url_is_split_off() -> None:
    url, creds = split_credentials("https://ghp_secret@github.example/o/r.git")
    assert url == "https://github.example/o/r.git"
    assert creds == GitCredentials("x-access-token", "ghp_secret")
    url, creds = split_credentials("http://bot:p%40ss@127.0.0.1:8080/o/r.git", token="other")
    assert url == "http://127.0.0.1:8080/o/r.git"
    assert creds == GitCredentials("bot", "p@ss")


def test_a_token_from_the_secret_applies_to_http_only() -> None:
    assert split_credentials("https://h/o/r.git", token="t")[1] == GitCredentials(
        "x-access-token", "t"
    )
    assert split_credentials("file:///srv/git/r.git", token="t") == ("file:///srv/git/r.git", None)
    assert split_credentials("https://h/o/r.git") == ("https://h/o/r.git", None)


def test_credentials_do_not_show_in_repr_or_messages() -> None:
    assert "sekret" not in repr(GitCredentials("u", "sekret"))
    assert (
        redact("fatal: https://u:sekret@h/r.git not found")
        == "fatal: https://***@h/r.git not found"
    )


def test_askpass_answers_git_from_the_environment(tmp_path: Path) -> None:
    env = git_env(GitCredentials("bot", "tok123"))
    assert env["GIT_ASKPASS"] == str(ASKPASS)
    assert env["GIT_CONFIG_KEY_0"] == "credential.helper" and env["GIT_CONFIG_VALUE_0"] == ""

    def ask(prompt: str) -> str:
        return subprocess.run(
            [str(ASKPASS), prompt], env=env, capture_output=True, text=True, check=True
        ).stdout

    assert ask("Username for 'http://h': ") == "bot\n"
    assert ask("Password for 'http://bot@h': ") == "tok123\n"
    assert "ROBOTICS_CD_GIT_PASSWORD" not in git_env(None)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers (a hung git remote)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/robotics/manifests.git"
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    server.close()


def test_a_hung_remote_times_out_naming_remote_and_operation(
    tmp_path: Path, silent_server: str
) -> None:
    started = time.monotonic()
    with pytest.raises(GitOpsError) as caught:
        run_git(
            ["ls-remote", "--", silent_server],
            cwd=tmp_path,
            remote=silent_server,
            timeout=1.5,
            credentials=GitCredentials("x", "tok"),
            error=GitOpsError,
        )
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed
    message = str(caught.value)
    assert "git ls-remote" in message and silent_server in message and "1.5s" in message
    # The whole process group died: no git-remote-http of ours is left behind.
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert silent_server not in procs
