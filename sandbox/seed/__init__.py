"""Seed the sandbox's git "GitHub": bare repos under ``<state>/git/`` from the content folders
beside this module, each with a ``post-receive`` hook that asks the GitHub twin to send a
signed ``push`` webhook, as GitHub does after a push.

Idempotent: a repo that exists is left as it is (its history is the sandbox's state); hooks
are rewritten every time, since the GitHub twin's address may change between ``up``s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

CONTENT = Path(__file__).parent
# bare repo name -> content folder
REPOS: dict[str, str] = {
    "robotics-api": "robotics-api",
    "robotics-fleet": "robotics-fleet",
    "robotics-training": "robotics-training",
    "robotics-k8s-manifests": "manifests",
}
AUTHOR = ("robotics-cd sandbox", "sandbox@robotics.local")
SEED_FILE = "seed.json"


class SeedError(RuntimeError):
    """A seed repo could not be created."""


@dataclass(frozen=True)
class Seeded:
    git_base: Path
    seed_tag: str  # the first image tag of every service (placeholder __SEED_TAG__)
    heads: dict[str, str]  # repo -> sha of main after seeding

    @property
    def base_url(self) -> str:
        return self.git_base.resolve().as_uri()

    def url(self, repo: str) -> str:
        return f"{self.base_url}/{repo}.git"

    def path(self, repo: str) -> Path:
        return self.git_base / f"{repo}.git"


def _git(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    name, email = AUTHOR
    full_env = {
        **os.environ,
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": email,
        "GIT_CONFIG_NOSYSTEM": "1",
        # The seed must not trigger webhooks for itself: the twin may not be running yet.
        "ROBOTICS_CD_SANDBOX_NO_HOOK": "1",
        **(env or {}),
    }
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=full_env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SeedError(f"git {' '.join(args[:2])} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _substitute_tree(root: Path, values: dict[str, str]) -> None:
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        new = text
        for placeholder, value in values.items():
            new = new.replace(placeholder, value)
        if new != text:
            path.write_text(new)


def _create_repo(bare: Path, content: Path, values: dict[str, str], message: str) -> str:
    _git("init", "-q", "--bare", "-b", "main", str(bare))
    with tempfile.TemporaryDirectory(prefix="seed-") as tmp:
        work = Path(tmp) / "work"
        shutil.copytree(content, work, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _substitute_tree(work, values)
        _git("init", "-q", "-b", "main", cwd=work)
        _git("add", "-A", cwd=work)
        _git("commit", "-q", "-m", message, cwd=work)
        _git("push", "-q", str(bare), "main:main", cwd=work)
        return _git("rev-parse", "HEAD", cwd=work)


_HOOK = """#!{python}
# post-receive: ask the sandbox's GitHub twin to deliver a signed `push` webhook, as GitHub
# does after a push. Written by sandbox.seed; the twin's address is in twin-github-url.
import json, os, pathlib, sys, urllib.request

if os.environ.get("ROBOTICS_CD_SANDBOX_NO_HOOK"):
    sys.exit(0)
here = pathlib.Path(__file__).resolve().parent
url_file = here / "twin-github-url"
if not url_file.exists():
    sys.exit(0)
updates = []
for line in sys.stdin:
    parts = line.split()
    if len(parts) == 3:
        updates.append({{"before": parts[0], "after": parts[1], "ref": parts[2]}})
body = json.dumps({{
    "repository": {repo!r},
    "updates": updates,
    "pusher": os.environ.get("GIT_PUSHER") or os.environ.get("USER") or "sandbox",
}}).encode()
request = urllib.request.Request(
    url_file.read_text().strip() + "/_twin/git/push",
    data=body,
    headers={{"Content-Type": "application/json"}},
    method="POST",
)
try:
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
except Exception as exc:  # a push must not fail because the twin is down
    print(f"sandbox: push webhook not sent ({{exc}})", file=sys.stderr)
"""


def install_hooks(git_base: Path, github_url: str | None) -> None:
    """(Re)write every seeded repo's post-receive hook and the twin address it posts to."""
    for repo in REPOS:
        hooks = git_base / f"{repo}.git" / "hooks"
        if not hooks.is_dir():
            continue
        hook = hooks / "post-receive"
        hook.write_text(_HOOK.format(python=sys.executable, repo=repo))
        hook.chmod(0o755)
        url_file = hooks / "twin-github-url"
        if github_url:
            url_file.write_text(github_url)
        else:
            url_file.unlink(missing_ok=True)


def seed_repos(git_base: Path, *, pull_registry: str) -> Seeded:
    """Create the bare repos that are missing; return the seed tag and heads."""
    git_base.mkdir(parents=True, exist_ok=True)
    record = git_base / SEED_FILE
    known: dict[str, str] = json.loads(record.read_text()) if record.exists() else {}
    base_url = git_base.resolve().as_uri()
    heads: dict[str, str] = {}
    api_bare = git_base / "robotics-api.git"
    if not api_bare.exists():
        sha = _create_repo(api_bare, CONTENT / "robotics-api", {}, "robotics-api: initial import")
        known["seed_tag"] = f"{datetime.now(UTC):%Y%m%d}-{sha[:7]}"
    if "seed_tag" not in known:
        sha = _git("--git-dir", str(api_bare), "rev-parse", "main")
        known["seed_tag"] = f"{datetime.now(UTC):%Y%m%d}-{sha[:7]}"
    values = {
        "__REGISTRY__": pull_registry,
        "__SEED_TAG__": known["seed_tag"],
        "__GIT_BASE__": base_url,
    }
    for repo, folder in REPOS.items():
        bare = git_base / f"{repo}.git"
        if not bare.exists():
            _create_repo(bare, CONTENT / folder, values, f"{repo}: initial import")
        heads[repo] = _git("--git-dir", str(bare), "rev-parse", "main")
    record.write_text(json.dumps(known))
    return Seeded(git_base, known["seed_tag"], heads)
