"""The Argo CD repo server of the twin: fetch a repo at a revision, render a path.

Each repoURL gets a bare mirror under the cache dir; a render is ``git archive`` of the commit
into a temp dir and ``kubectl kustomize`` of the app's path, cached by (repo, commit, path)
since a commit never changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


class RepoError(Exception):
    """A fetch, a revision or a render failed; the message is what Argo CD would show."""


async def _run(*argv: str, cwd: Path | None = None, stdin: bytes | None = None) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    if proc.returncode != 0:
        raise RepoError(
            f"`{' '.join(argv[:3])} ...` failed: {err.decode(errors='replace').strip()}"
        )
    return out


class RepoServer:
    def __init__(self, cache_dir: Path, *, kubectl: str = "kubectl") -> None:
        self.cache_dir = cache_dir
        self.kubectl = kubectl
        self._locks: dict[str, asyncio.Lock] = {}
        self._renders: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        self._refs: dict[str, dict[str, str]] = {}
        self._default_branch: dict[str, str] = {}
        self._fetched: dict[str, float] = {}

    def forget_renders(self) -> None:
        """A hard refresh: render again even commits already rendered."""
        self._renders.clear()

    def _mirror(self, repo_url: str) -> Path:
        return self.cache_dir / hashlib.sha256(repo_url.encode()).hexdigest()[:16]

    def _lock(self, repo_url: str) -> asyncio.Lock:
        return self._locks.setdefault(repo_url, asyncio.Lock())

    async def fetch(self, repo_url: str, *, max_age: float = 0.0) -> Path:
        """Bring the mirror of ``repo_url`` up to date (every branch and tag).

        ``max_age``: skip the fetch when the last one started less than that many seconds
        ago (the poll loop shares one fetch between the apps of a repo).
        """
        mirror = self._mirror(repo_url)
        async with self._lock(repo_url):
            started = asyncio.get_running_loop().time()
            if max_age and started - self._fetched.get(repo_url, float("-inf")) < max_age:
                return mirror
            if not (mirror / "HEAD").exists():
                mirror.mkdir(parents=True, exist_ok=True)
                await _run("git", "init", "--bare", "-q", str(mirror))
            await _run(
                "git",
                "-C",
                str(mirror),
                "fetch",
                "-q",
                "--prune",
                "--force",
                repo_url,
                "+refs/heads/*:refs/heads/*",
                "+refs/tags/*:refs/tags/*",
            )
            listing = await _run(
                "git",
                "-C",
                str(mirror),
                "for-each-ref",
                "--format=%(objectname) %(*objectname) %(refname)",
            )
            refs: dict[str, str] = {}
            for line in listing.decode().splitlines():
                obj, peeled, ref = line.split(" ", 2)
                refs[ref] = peeled or obj  # an annotated tag names the commit it peels to
            self._refs[repo_url] = refs
            if repo_url not in self._default_branch:
                # The remote's default branch: what HEAD of the origin points at.
                out = await _run("git", "ls-remote", "--symref", repo_url, "HEAD")
                match = re.search(r"^ref: refs/heads/(\S+)\s+HEAD", out.decode(), re.M)
                self._default_branch[repo_url] = match.group(1) if match else "main"
            self._fetched[repo_url] = started
        return mirror

    async def resolve(self, repo_url: str, revision: str, *, max_age: float = 0.0) -> str:
        """The commit sha ``revision`` (HEAD, a branch, a tag or a sha) names in the repo."""
        mirror = await self.fetch(repo_url, max_age=max_age)
        rev = revision or "HEAD"
        if rev == "HEAD":
            rev = self._default_branch.get(repo_url, "main")
        refs = self._refs.get(repo_url, {})
        for candidate in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}"):
            if candidate in refs:
                return refs[candidate]
        try:
            out = await _run("git", "-C", str(mirror), "rev-parse", "--verify", f"{rev}^{{commit}}")
        except RepoError as exc:
            raise RepoError(
                f"unable to resolve '{revision}' to a commit SHA in {repo_url}"
            ) from exc
        return out.decode().strip()

    async def is_ancestor(self, repo_url: str, older: str, newer: str) -> bool:
        mirror = self._mirror(repo_url)
        proc = await asyncio.create_subprocess_exec(
            "git",
            "-C",
            str(mirror),
            "merge-base",
            "--is-ancestor",
            older,
            newer,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await proc.wait() == 0

    async def render(self, repo_url: str, sha: str, path: str) -> list[dict[str, Any]]:
        """The manifests ``kubectl kustomize <path>`` renders at commit ``sha``."""
        if not SHA_RE.match(sha):
            raise RepoError(f"not a commit sha: {sha!r}")
        key = (repo_url, sha, path)
        if key in self._renders:
            return self._renders[key]
        mirror = self._mirror(repo_url)
        tree = Path(tempfile.mkdtemp(prefix="argocd-render-"))
        try:
            archive = await _run("git", "-C", str(mirror), "archive", "--format=tar", sha)
            await _run("tar", "-x", "-C", str(tree), stdin=archive)
            target = (tree / path).resolve()
            if not target.is_relative_to(tree.resolve()) or not target.is_dir():
                raise RepoError(f"app path {path!r} does not exist in {repo_url} at {sha[:7]}")
            if any((target / k).exists() for k in _KUSTOMIZATION_FILES):
                out = await _run(self.kubectl, "kustomize", str(target))
            else:
                # Argo CD's "Directory" source type: every YAML file under the path.
                out = b"\n---\n".join(p.read_bytes() for p in sorted(target.rglob("*.y*ml")))
        finally:
            shutil.rmtree(tree, ignore_errors=True)
        docs = [d for d in yaml.safe_load_all(out.decode()) if isinstance(d, dict)]
        self._renders[key] = docs
        return docs
