"""The GitHub twin: the REST subset the product uses, a chat webhook sink, and the push
webhooks GitHub sends after a ``git push``.

REST (token auth, ``Authorization: token X`` or ``Bearer X``), for repos that exist as bare
repos under ``git_base``:

- ``POST/GET /repos/{o}/{r}/statuses/{sha}``, ``GET .../commits/{ref}/statuses`` and
  ``.../commits/{ref}/status`` (combined);
- ``POST/GET /repos/{o}/{r}/deployments``, ``GET .../deployments/{id}``,
  ``POST/GET .../deployments/{id}/statuses``;
- ``POST/GET/DELETE /repos/{o}/{r}/hooks`` (repository webhooks; a ``ping`` on creation);
- comments, each delivered as its signed webhook (``commit_comment``, ``issue_comment``,
  action ``created``): ``POST/GET /repos/{o}/{r}/commits/{sha}/comments``, ``GET
  /repos/{o}/{r}/comments``, ``POST/GET /repos/{o}/{r}/issues/{n}/comments`` (a pull
  request is an issue, as on GitHub);
- pull requests (read): ``GET /repos/{o}/{r}/pulls/{n}``, ``GET
  /repos/{o}/{r}/commits/{sha}/pulls``; the twin-only ``POST /_twin/repos/{o}/{r}/pulls``
  records one (merged or open) without a merge in git;
- collaborators: ``PUT /repos/{o}/{r}/collaborators/{login}`` (``permission`` pull, triage,
  push, maintain, admin; added at once, where GitHub sends an invitation) and ``GET
  .../collaborators/{login}/permission`` (``permission`` admin/write/read/none, ``role_name``).

Users: the configured token is ``robotics-cd`` (admin of every repo). ``POST /_twin/users``
``{"login"}`` makes a person and answers their token, so a test comments *as* them: the
comment's ``user`` and the webhook's ``sender`` are whoever the token belongs to.

Webhooks: each bare repo's ``post-receive`` hook posts to ``/_twin/git/push``; the twin
builds GitHub's ``push`` payload from the repo and delivers it, signed
(``X-Hub-Signature-256``), to the configured receiver (``github.webhook_url``, an
organisation-wide hook) and to every repository hook.

Git over HTTP (smart protocol, as ``https://github.com/<owner>/<repo>.git``): clone, fetch
and push at ``/<owner>/<repo>.git`` with basic auth (any user name, the token as password,
as GitHub takes a token). Behind it is ``git http-backend`` (CGI), so receive-pack runs the
bare repo's hooks and the push webhooks follow as with a local push. An unauthenticated
request gets ``401`` with ``WWW-Authenticate: Basic``, which is when git asks its
``GIT_ASKPASS``. Faults: the git routes have their own fault target ``git``
(``FaultClient.http_fault("git", path_prefix="/robotics/robotics-k8s-manifests.git",
hang_seconds=...)``: hang, refuse with a status, or answer slowly), apart from the REST
routes' ``github``.

Chat sink: any JSON ``POST /chat/<channel>/...`` is recorded and answered the way Feishu,
DingTalk or Slack answer. Everything recorded is readable at ``GET /_twin/recorded`` (no
auth: loopback only, for tests and the demo's summary).

Config (``twin-config.json``): ``github_port``, ``git_base``, ``github``: ``{"token",
"owner", "webhook_url", "webhook_secret"}``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import logging
import os
import re
import secrets
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger("sandbox.github")

JSON = dict[str, Any]
ZERO_SHA = "0" * 40
DOCS = "https://docs.github.com/rest"
STATUS_STATES = {"error", "failure", "pending", "success"}
DEPLOYMENT_STATES = {"error", "failure", "inactive", "in_progress", "queued", "pending", "success"}
MAX_PUSH_COMMITS = 20
MAX_DELIVERIES = 500
HOOKSHOT = "GitHub-Hookshot/sandbox"
BOT_LOGIN = "robotics-cd"
# A collaborator's role (as PUT .../collaborators takes it) → the permission GitHub reports.
ROLE_PERMISSION = {
    "pull": "read",
    "triage": "read",
    "push": "write",
    "maintain": "write",
    "admin": "admin",
}


def _permissions(role: str) -> JSON:
    order = ["pull", "triage", "push", "maintain", "admin"]
    rank = order.index(role) if role in order else -1
    return {name: rank >= i for i, name in enumerate(order)}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def signature_256(secret: str, body: bytes) -> str:
    """``X-Hub-Signature-256`` as GitHub computes it."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class GitHubError(Exception):
    def __init__(self, status: int, message: str, errors: list[JSON] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors

    def response(self) -> JSONResponse:
        body: JSON = {"message": self.message, "documentation_url": DOCS}
        if self.errors:
            body["errors"] = self.errors
        return JSONResponse(body, status_code=self.status)


def _validation(resource: str, fld: str, message: str) -> GitHubError:
    return GitHubError(
        422,
        "Validation Failed",
        [{"resource": resource, "code": "custom", "field": fld, "message": message}],
    )


# -- git reading ------------------------------------------------------------------------


def _git(bare: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "--git-dir", str(bare), *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise GitHubError(422, f"git {args[0]} failed: {proc.stderr.strip()}")
    return proc.stdout


def _changes(bare: Path, sha: str) -> tuple[list[str], list[str], list[str]]:
    out = _git(bare, "diff-tree", "--root", "--no-commit-id", "--name-status", "-r", sha)
    added: list[str] = []
    modified: list[str] = []
    removed: list[str] = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        code = parts[0][:1]
        if code == "A":
            added.append(parts[1])
        elif code == "D":
            removed.append(parts[1])
        elif code == "R" and len(parts) == 3:
            removed.append(parts[1])
            added.append(parts[2])
        else:
            modified.append(parts[-1])
    return added, modified, removed


@dataclass
class Store:
    """What the twin recorded, persisted as one JSON file so a twin restart keeps it."""

    path: Path
    data: JSON = field(default_factory=dict)

    KEYS = (
        "statuses",
        "deployments",
        "deployment_statuses",
        "hooks",
        "deliveries",
        "chat",
        "users",
        "collaborators",
        "comments",
        "pulls",
    )

    def __post_init__(self) -> None:
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
        for key in self.KEYS:
            self.data.setdefault(key, [])
        self.data.setdefault("next_id", 1)

    def next_id(self) -> int:
        value = int(self.data["next_id"])
        self.data["next_id"] = value + 1
        return value

    def add(self, key: str, item: JSON) -> JSON:
        self.data[key].append(item)
        if key == "deliveries":
            del self.data[key][:-MAX_DELIVERIES]
        self.save()
        return item

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)


class GitHubTwin:
    def __init__(
        self,
        *,
        base_url: str,
        git_base: Path,
        owner: str,
        token: str,
        webhook_url: str,
        webhook_secret: str,
        store: Store,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.git_base = git_base
        self.owner = owner
        self.token = token
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.store = store
        self._transport = transport
        self._background: set[asyncio.Task[Any]] = set()
        self._repo_ids = itertools.count(1000)

    # -- helpers --------------------------------------------------------------------------

    def check_token(self, request: Request) -> str:
        """The login the request's token belongs to (401 without a known token)."""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if not header:
            raise GitHubError(401, "Requires authentication")
        if scheme.lower() in ("token", "bearer"):
            if hmac.compare_digest(value.strip(), self.token):
                return BOT_LOGIN
            for person in self.store.data["users"]:
                if hmac.compare_digest(value.strip(), person["token"]):
                    return str(person["login"])
        raise GitHubError(401, "Bad credentials")

    def bare(self, owner: str, repo: str) -> Path:
        path = self.git_base / f"{repo}.git"
        if owner != self.owner or not re.fullmatch(r"[A-Za-z0-9._-]+", repo) or not path.is_dir():
            raise GitHubError(404, "Not Found")
        return path

    def resolve(self, bare: Path, ref: str) -> str | None:
        proc = subprocess.run(
            ["git", "--git-dir", str(bare), "rev-parse", "--verify", "-q", f"{ref}^{{commit}}"],
            capture_output=True,
            text=True,
            check=False,
        )
        return proc.stdout.strip() if proc.returncode == 0 else None

    def user(self, login: str = "robotics-cd") -> JSON:
        known = next((u for u in self.store.data["users"] if u["login"] == login), None)
        return {
            "login": login,
            "id": int(known["id"]) if known else 1,
            "type": "Bot" if login.endswith("[bot]") else "User",
            "url": f"{self.base_url}/users/{login}",
            "html_url": f"{self.base_url}/{login}",
        }

    def repository(self, repo: str) -> JSON:
        full = f"{self.owner}/{repo}"
        clone_url = (self.git_base / f"{repo}.git").resolve().as_uri()
        return {
            "id": abs(hash(full)) % 10_000_000,
            "node_id": f"R_{hashlib.sha1(full.encode()).hexdigest()[:12]}",  # noqa: S324
            "name": repo,
            "full_name": full,
            "private": False,
            "owner": {
                "name": self.owner,
                "login": self.owner,
                "id": 2,
                "type": "Organization",
                "html_url": f"{self.base_url}/{self.owner}",
            },
            "html_url": f"{self.base_url}/{full}",
            "url": f"{self.base_url}/repos/{full}",
            "clone_url": clone_url,
            "git_url": clone_url,
            "ssh_url": clone_url,
            "default_branch": "main",
            "master_branch": "main",
            "pushed_at": int(time.time()),
        }

    # -- commit statuses ------------------------------------------------------------------

    def create_status(self, owner: str, repo: str, sha: str, body: JSON) -> JSON:
        bare = self.bare(owner, repo)
        state = body.get("state")
        if state not in STATUS_STATES:
            raise _validation("Status", "state", "state is not included in the list")
        if not re.fullmatch(r"[0-9a-f]{40}", sha) or self.resolve(bare, sha) != sha:
            raise GitHubError(422, f"No commit found for SHA: {sha}")
        item_id = self.store.next_id()
        stamp = now()
        status = {
            "id": item_id,
            "node_id": f"SC_{item_id}",
            "url": f"{self.base_url}/repos/{owner}/{repo}/statuses/{sha}",
            "state": state,
            "description": body.get("description"),
            "target_url": body.get("target_url"),
            "context": body.get("context") or "default",
            "created_at": stamp,
            "updated_at": stamp,
            "creator": self.user(),
            "repository": f"{owner}/{repo}",
            "sha": sha,
        }
        return self.store.add("statuses", status)

    def statuses_for(self, owner: str, repo: str, ref: str) -> list[JSON]:
        bare = self.bare(owner, repo)
        sha = self.resolve(bare, ref) or ref
        found = [
            s
            for s in self.store.data["statuses"]
            if s["repository"] == f"{owner}/{repo}" and s["sha"] == sha
        ]
        return list(reversed(found))

    def combined_status(self, owner: str, repo: str, ref: str) -> JSON:
        latest: dict[str, JSON] = {}
        for status in self.statuses_for(owner, repo, ref):
            latest.setdefault(status["context"], status)
        states = {s["state"] for s in latest.values()}
        if states & {"error", "failure"}:
            state = "failure"
        elif not latest or "pending" in states:
            state = "pending"
        else:
            state = "success"
        bare = self.bare(owner, repo)
        return {
            "state": state,
            "statuses": list(latest.values()),
            "sha": self.resolve(bare, ref) or ref,
            "total_count": len(latest),
            "repository": self.repository(repo),
        }

    # -- deployments ----------------------------------------------------------------------

    def create_deployment(self, owner: str, repo: str, body: JSON) -> JSON:
        bare = self.bare(owner, repo)
        ref = body.get("ref")
        if not isinstance(ref, str) or not ref:
            raise _validation("Deployment", "ref", "ref is required")
        sha = self.resolve(bare, ref)
        if sha is None:
            raise GitHubError(409, f"No ref found for: {ref}")
        item_id = self.store.next_id()
        stamp = now()
        url = f"{self.base_url}/repos/{owner}/{repo}/deployments/{item_id}"
        deployment = {
            "id": item_id,
            "node_id": f"DE_{item_id}",
            "url": url,
            "sha": sha,
            "ref": ref,
            "task": body.get("task") or "deploy",
            "payload": body.get("payload") or {},
            "original_environment": body.get("environment") or "production",
            "environment": body.get("environment") or "production",
            "description": body.get("description"),
            "creator": self.user(),
            "created_at": stamp,
            "updated_at": stamp,
            "statuses_url": f"{url}/statuses",
            "repository_url": f"{self.base_url}/repos/{owner}/{repo}",
            "transient_environment": bool(body.get("transient_environment", False)),
            "production_environment": bool(
                body.get("production_environment", body.get("environment") == "production")
            ),
            "repository": f"{owner}/{repo}",
        }
        return self.store.add("deployments", deployment)

    def deployment(self, owner: str, repo: str, deployment_id: int) -> JSON:
        self.bare(owner, repo)
        for item in self.store.data["deployments"]:
            if item["id"] == deployment_id and item["repository"] == f"{owner}/{repo}":
                return dict(item)
        raise GitHubError(404, "Not Found")

    def list_deployments(self, owner: str, repo: str, query: dict[str, str]) -> list[JSON]:
        self.bare(owner, repo)
        found = [
            d
            for d in self.store.data["deployments"]
            if d["repository"] == f"{owner}/{repo}"
            and all(query.get(k) in (None, d.get(k)) for k in ("sha", "ref", "task", "environment"))
        ]
        return list(reversed(found))

    def create_deployment_status(
        self, owner: str, repo: str, deployment_id: int, body: JSON
    ) -> JSON:
        deployment = self.deployment(owner, repo, deployment_id)
        state = body.get("state")
        if state not in DEPLOYMENT_STATES:
            raise _validation("DeploymentStatus", "state", "state is not included in the list")
        status = self._deployment_status(deployment, body, state)
        if state == "success" and body.get("auto_inactive", True):
            # GitHub marks earlier deployments of the environment inactive.
            for other in self.store.data["deployments"]:
                same_env = other["environment"] == deployment["environment"]
                if (
                    other["id"] != deployment_id
                    and same_env
                    and other["repository"] == (f"{owner}/{repo}")
                ):
                    last = self._last_status(other["id"])
                    if last and last["state"] == "success":
                        self._deployment_status(other, {}, "inactive")
        return status

    def _last_status(self, deployment_id: int) -> JSON | None:
        found = [
            s for s in self.store.data["deployment_statuses"] if s["deployment_id"] == deployment_id
        ]
        return found[-1] if found else None

    def _deployment_status(self, deployment: JSON, body: JSON, state: str) -> JSON:
        item_id = self.store.next_id()
        stamp = now()
        status = {
            "id": item_id,
            "node_id": f"DES_{item_id}",
            "url": f"{deployment['url']}/statuses/{item_id}",
            "state": state,
            "creator": self.user(),
            "description": body.get("description", ""),
            "environment": body.get("environment") or deployment["environment"],
            "target_url": body.get("target_url") or body.get("log_url", ""),
            "log_url": body.get("log_url") or body.get("target_url", ""),
            "environment_url": body.get("environment_url", ""),
            "created_at": stamp,
            "updated_at": stamp,
            "deployment_url": deployment["url"],
            "repository_url": deployment["repository_url"],
            "deployment_id": deployment["id"],
            "repository": deployment["repository"],
        }
        return self.store.add("deployment_statuses", status)

    def deployment_statuses(self, owner: str, repo: str, deployment_id: int) -> list[JSON]:
        self.deployment(owner, repo, deployment_id)
        found = [
            s for s in self.store.data["deployment_statuses"] if s["deployment_id"] == deployment_id
        ]
        return list(reversed(found))

    # -- repository hooks -----------------------------------------------------------------

    def create_hook(self, owner: str, repo: str, body: JSON) -> JSON:
        self.bare(owner, repo)
        config = body.get("config") or {}
        if not isinstance(config, dict) or not config.get("url"):
            raise _validation("Hook", "config", "url is missing")
        if config.get("content_type", "form") not in ("json", "form"):
            raise _validation("Hook", "content_type", "content_type is not json or form")
        item_id = self.store.next_id()
        hook = {
            "id": item_id,
            "type": "Repository",
            "name": "web",
            "active": bool(body.get("active", True)),
            "events": list(body.get("events") or ["push"]),
            "config": {
                "url": config["url"],
                "content_type": config.get("content_type", "form"),
                "insecure_ssl": str(config.get("insecure_ssl", "0")),
                "secret": config.get("secret", ""),
            },
            "created_at": now(),
            "updated_at": now(),
            "url": f"{self.base_url}/repos/{owner}/{repo}/hooks/{item_id}",
            "repository": f"{owner}/{repo}",
        }
        self.store.add("hooks", hook)
        ping = {
            "zen": "Keep it logically awesome.",
            "hook_id": item_id,
            "hook": _public_hook(hook),
            "repository": self.repository(repo),
            "sender": self.user(),
        }
        self._spawn(self._deliver(hook_target(hook), "ping", ping))
        return _public_hook(hook)

    def hooks(self, owner: str, repo: str) -> list[JSON]:
        self.bare(owner, repo)
        return [h for h in self.store.data["hooks"] if h["repository"] == f"{owner}/{repo}"]

    def delete_hook(self, owner: str, repo: str, hook_id: int) -> None:
        before = len(self.store.data["hooks"])
        self.store.data["hooks"] = [
            h
            for h in self.store.data["hooks"]
            if not (h["id"] == hook_id and h["repository"] == f"{owner}/{repo}")
        ]
        if len(self.store.data["hooks"]) == before:
            raise GitHubError(404, "Not Found")
        self.store.save()

    def targets(self, repo: str, event: str) -> list[JSON]:
        found: list[JSON] = []
        if self.webhook_url:
            found.append(
                {
                    "hook_id": 1,
                    "url": self.webhook_url,
                    "secret": self.webhook_secret,
                    "content_type": "json",
                    "target_type": "organization",
                }
            )
        for hook in self.store.data["hooks"]:
            wanted = set(hook["events"])
            if (
                hook["repository"] == f"{self.owner}/{repo}"
                and hook["active"]
                and (event in wanted or "*" in wanted)
            ):
                found.append(hook_target(hook))
        return found

    # -- users and collaborators ----------------------------------------------------------

    def create_user(self, body: JSON) -> JSON:
        login = str(body.get("login") or "")
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}", login):
            raise _validation("User", "login", "login is invalid")
        for person in self.store.data["users"]:
            if person["login"].lower() == login.lower():
                return {"login": person["login"], "token": person["token"]}
        person = {
            "login": login,
            "id": 10_000 + self.store.next_id(),
            "token": secrets.token_hex(20),
        }
        self.store.add("users", person)
        return {"login": login, "token": person["token"]}

    def _known_login(self, login: str) -> str:
        if login.lower() == BOT_LOGIN:
            return BOT_LOGIN
        for person in self.store.data["users"]:
            if person["login"].lower() == login.lower():
                return str(person["login"])
        raise GitHubError(404, "Not Found")

    def add_collaborator(self, owner: str, repo: str, login: str, body: JSON) -> bool:
        """True when added, False when only the permission changed (201 / 204 on GitHub)."""
        self.bare(owner, repo)
        login = self._known_login(login)
        permission = body.get("permission", "push")
        if permission not in ROLE_PERMISSION:
            raise _validation("Repository", "permission", "permission is not included in the list")
        entries = self.store.data["collaborators"]
        full = f"{owner}/{repo}"
        for entry in entries:
            if entry["repository"] == full and entry["login"] == login:
                entry["role"] = permission
                self.store.save()
                return False
        self.store.add("collaborators", {"repository": full, "login": login, "role": permission})
        return True

    def permission(self, owner: str, repo: str, login: str) -> JSON:
        """GitHub's answer for a collaborator's permission (``read`` for anyone else: the
        repositories here are public)."""
        self.bare(owner, repo)
        login = self._known_login(login)
        role = "admin" if login == BOT_LOGIN else "read"
        for entry in self.store.data["collaborators"]:
            if entry["repository"] == f"{owner}/{repo}" and entry["login"] == login:
                role = entry["role"]
        role_name = {"pull": "read", "push": "write"}.get(role, role)
        return {
            "permission": ROLE_PERMISSION.get(role, "none"),
            "role_name": role_name,
            "user": self.user(login) | {"permissions": _permissions(role)},
        }

    # -- pull requests --------------------------------------------------------------------

    def record_pull(self, owner: str, repo: str, body: JSON) -> JSON:
        bare = self.bare(owner, repo)
        head_sha = str(body.get("head_sha") or "")
        merge_sha = body.get("merge_commit_sha")
        for sha in (head_sha, merge_sha):
            if sha and self.resolve(bare, str(sha)) != sha:
                raise GitHubError(422, f"No commit found for SHA: {sha}")
        number = self.store.next_id()
        merged = bool(body.get("merged", merge_sha is not None))
        stamp = now()
        full = f"{owner}/{repo}"
        pull = {
            "url": f"{self.base_url}/repos/{full}/pulls/{number}",
            "html_url": f"{self.base_url}/{full}/pull/{number}",
            "issue_url": f"{self.base_url}/repos/{full}/issues/{number}",
            "id": number,
            "number": number,
            "state": "closed" if merged else "open",
            "title": str(body.get("title") or f"pull request {number}"),
            "user": self.user(str(body.get("user") or BOT_LOGIN)),
            "body": body.get("body"),
            "created_at": stamp,
            "updated_at": stamp,
            "closed_at": stamp if merged else None,
            "merged_at": stamp if merged else None,
            "merged": merged,
            "merge_commit_sha": merge_sha,
            "head": {"ref": str(body.get("head_ref") or "feature"), "sha": head_sha},
            "base": {"ref": str(body.get("base_ref") or "main"), "sha": merge_sha or head_sha},
            "repository": full,
        }
        return self.store.add("pulls", pull)

    def pull(self, owner: str, repo: str, number: int) -> JSON:
        self.bare(owner, repo)
        for pull in self.store.data["pulls"]:
            if pull["repository"] == f"{owner}/{repo}" and pull["number"] == number:
                return {k: v for k, v in pull.items() if k != "repository"}
        raise GitHubError(404, "Not Found")

    def pulls_of_commit(self, owner: str, repo: str, sha: str) -> list[JSON]:
        self.bare(owner, repo)
        return [
            {k: v for k, v in p.items() if k != "repository"}
            for p in self.store.data["pulls"]
            if p["repository"] == f"{owner}/{repo}"
            and sha in (p["head"]["sha"], p["merge_commit_sha"])
        ]

    def _issue(self, owner: str, repo: str, number: int) -> JSON:
        """The issue view of a pull request (the twin's issues are its pull requests)."""
        pull = self.pull(owner, repo, number)
        return {
            "url": pull["issue_url"],
            "html_url": pull["html_url"],
            "id": pull["id"],
            "number": number,
            "title": pull["title"],
            "user": pull["user"],
            "state": pull["state"],
            "body": pull["body"],
            "pull_request": {
                "url": pull["url"],
                "html_url": pull["html_url"],
                "merged_at": pull["merged_at"],
            },
        }

    # -- comments -------------------------------------------------------------------------

    def _author_association(self, owner: str, repo: str, login: str) -> str:
        role = self.permission(owner, repo, login)["role_name"]
        if login == BOT_LOGIN or role == "admin":
            return "OWNER" if login == BOT_LOGIN else "MEMBER"
        return "COLLABORATOR" if role in ("write", "maintain", "triage") else "NONE"

    def create_commit_comment(
        self, owner: str, repo: str, sha: str, body: JSON, login: str
    ) -> JSON:
        bare = self.bare(owner, repo)
        text = body.get("body")
        if not isinstance(text, str) or not text:
            raise _validation("CommitComment", "body", "body is missing")
        full_sha = self.resolve(bare, sha)
        if full_sha is None:
            raise GitHubError(422, f"No commit found for SHA: {sha}")
        item_id = self.store.next_id()
        stamp = now()
        full = f"{owner}/{repo}"
        comment = {
            "html_url": f"{self.base_url}/{full}/commit/{full_sha}#commitcomment-{item_id}",
            "url": f"{self.base_url}/repos/{full}/comments/{item_id}",
            "id": item_id,
            "node_id": f"CC_{item_id}",
            "body": text,
            "path": body.get("path"),
            "position": body.get("position"),
            "line": body.get("line"),
            "commit_id": full_sha,
            "user": self.user(login),
            "author_association": self._author_association(owner, repo, login),
            "created_at": stamp,
            "updated_at": stamp,
        }
        self.store.add("comments", {**comment, "repository": full, "kind": "commit"})
        self._notify(repo, "commit_comment", {"action": "created", "comment": comment}, login)
        return comment

    def create_issue_comment(
        self, owner: str, repo: str, number: int, body: JSON, login: str
    ) -> JSON:
        issue = self._issue(owner, repo, number)
        text = body.get("body")
        if not isinstance(text, str) or not text:
            raise _validation("IssueComment", "body", "body is missing")
        item_id = self.store.next_id()
        stamp = now()
        full = f"{owner}/{repo}"
        comment = {
            "html_url": f"{issue['html_url']}#issuecomment-{item_id}",
            "url": f"{self.base_url}/repos/{full}/issues/comments/{item_id}",
            "issue_url": issue["url"],
            "id": item_id,
            "node_id": f"IC_{item_id}",
            "body": text,
            "user": self.user(login),
            "author_association": self._author_association(owner, repo, login),
            "created_at": stamp,
            "updated_at": stamp,
        }
        self.store.add(
            "comments", {**comment, "repository": full, "kind": "issue", "number": number}
        )
        payload = {"action": "created", "issue": issue, "comment": comment}
        self._notify(repo, "issue_comment", payload, login)
        return comment

    def comments(
        self, owner: str, repo: str, *, sha: str | None = None, number: int | None = None
    ) -> list[JSON]:
        self.bare(owner, repo)
        found = []
        for item in self.store.data["comments"]:
            if item["repository"] != f"{owner}/{repo}":
                continue
            if sha is not None and (item["kind"] != "commit" or item["commit_id"] != sha):
                continue
            if number is not None and (item["kind"] != "issue" or item["number"] != number):
                continue
            if sha is None and number is None and item["kind"] != "commit":
                continue
            found.append(
                {k: v for k, v in item.items() if k not in ("repository", "kind", "number")}
            )
        return found

    def _notify(self, repo: str, event: str, payload: JSON, login: str) -> None:
        payload = {**payload, "repository": self.repository(repo), "sender": self.user(login)}
        for target in self.targets(repo, event):
            self._spawn(self._deliver(target, event, payload))

    # -- push webhooks --------------------------------------------------------------------

    def push_payload(self, repo: str, update: JSON, pusher: str) -> JSON:
        bare = self.git_base / f"{repo}.git"
        before, after, ref = update["before"], update["after"], update["ref"]
        created, deleted = before == ZERO_SHA, after == ZERO_SHA
        if deleted:
            shas: list[str] = []
        elif created:
            others = [
                line.split()[0]
                for line in _git(
                    bare, "for-each-ref", "--format=%(objectname) %(refname)"
                ).splitlines()
                if line.split()[1] != ref and line.split()[1].startswith("refs/heads/")
            ]
            shas = _git(bare, "rev-list", "--reverse", after, "--not", *others).split()
        else:
            shas = _git(bare, "rev-list", "--reverse", f"{before}..{after}").split()
        forced = bool(
            not created
            and not deleted
            and subprocess.run(
                ["git", "--git-dir", str(bare), "merge-base", "--is-ancestor", before, after],
                capture_output=True,
                check=False,
            ).returncode
        )
        commits = [self._commit(bare, repo, sha) for sha in shas[-MAX_PUSH_COMMITS:]]
        head = None if deleted else self._commit(bare, repo, after)
        full = f"{self.owner}/{repo}"
        return {
            "ref": ref,
            "before": before,
            "after": after,
            "repository": self.repository(repo),
            "pusher": {"name": pusher, "email": f"{pusher}@robotics.local"},
            "sender": self.user(pusher),
            "created": created,
            "deleted": deleted,
            "forced": forced,
            "base_ref": None,
            "compare": f"{self.base_url}/{full}/compare/{before[:12]}...{after[:12]}",
            "commits": commits,
            "head_commit": head,
        }

    def _commit(self, bare: Path, repo: str, sha: str) -> JSON:
        fmt = "%H%x00%T%x00%an%x00%ae%x00%cn%x00%ce%x00%cI%x00%B"
        fields = _git(bare, "show", "-s", f"--format={fmt}", sha).split("\x00")
        full, tree, an, ae, cn, ce, stamp, message = (fields + [""] * 8)[:8]
        added, modified, removed = _changes(bare, sha)
        return {
            "id": full,
            "tree_id": tree,
            "distinct": True,
            "message": message.strip(),
            "timestamp": stamp,
            "url": f"{self.base_url}/{self.owner}/{repo}/commit/{full}",
            "author": {"name": an, "email": ae, "username": an},
            "committer": {"name": cn, "email": ce, "username": cn},
            "added": added,
            "removed": removed,
            "modified": modified,
        }

    def on_push(self, repo: str, updates: list[JSON], pusher: str) -> list[str]:
        if not (self.git_base / f"{repo}.git").is_dir():
            raise GitHubError(404, "Not Found")
        guids: list[str] = []
        for update in updates:
            payload = self.push_payload(repo, update, pusher)
            for target in self.targets(repo, "push"):
                guid = str(uuid.uuid4())
                guids.append(guid)
                self._spawn(self._deliver(target, "push", payload, guid=guid))
        return guids

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _deliver(
        self,
        target: JSON,
        event: str,
        payload: JSON,
        *,
        guid: str | None = None,
        redelivery: bool = False,
    ) -> JSON:
        guid = guid or str(uuid.uuid4())
        body = json.dumps(payload).encode()
        headers = {
            "Accept": "*/*",
            "User-Agent": HOOKSHOT,
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": guid,
            "X-GitHub-Hook-ID": str(target["hook_id"]),
            "X-GitHub-Hook-Installation-Target-Type": target["target_type"],
            "X-GitHub-Hook-Installation-Target-ID": "1",
            "Content-Type": "application/json",
        }
        if target.get("content_type") == "form":
            from urllib.parse import urlencode

            body = urlencode({"payload": body.decode()}).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if target.get("secret"):
            headers["X-Hub-Signature"] = (
                "sha1=" + hmac.new(target["secret"].encode(), body, hashlib.sha1).hexdigest()
            )
            headers["X-Hub-Signature-256"] = signature_256(target["secret"], body)
        record: JSON = {
            "guid": guid,
            "event": event,
            "action": payload.get("action"),
            "hook_id": target["hook_id"],
            "url": target["url"],
            "repository": (payload.get("repository") or {}).get("full_name"),
            "redelivery": redelivery,
            "delivered_at": now(),
            "request": {"headers": _public_headers(headers), "payload": payload},
        }
        started = time.monotonic()
        try:
            async with httpx.AsyncClient(timeout=10.0, transport=self._transport) as client:
                response = await client.post(target["url"], content=body, headers=headers)
            record.update(status_code=response.status_code, response=response.text[:2000])
        except httpx.HTTPError as exc:
            record.update(status_code=0, error=f"{type(exc).__name__}: {exc}")
        record["duration"] = round(time.monotonic() - started, 3)
        log.info("delivered %s %s to %s: %s", event, guid, target["url"], record["status_code"])
        return self.store.add("deliveries", record)

    async def redeliver(self, guid: str) -> JSON:
        """Send a recorded delivery again, with the same GUID (GitHub's "Redeliver")."""
        for record in reversed(self.store.data["deliveries"]):
            if record["guid"] == guid:
                target = self._target_by_id(record["hook_id"])
                if target is None:
                    raise GitHubError(404, "the hook of this delivery no longer exists")
                return await self._deliver(
                    target,
                    record["event"],
                    record["request"]["payload"],
                    guid=guid,
                    redelivery=True,
                )
        raise GitHubError(404, "Not Found")

    def _target_by_id(self, hook_id: int) -> JSON | None:
        if hook_id == 1 and self.webhook_url:
            return self.targets("", "")[0]
        hook = next((h for h in self.store.data["hooks"] if h["id"] == hook_id), None)
        return hook_target(hook) if hook else None

    # -- chat sink ------------------------------------------------------------------------

    def record_chat(
        self, channel: str, path: str, body: Any, content_type: str, query: str = ""
    ) -> JSON:
        item = {
            "id": self.store.next_id(),
            "channel": channel,
            "path": path,
            "query": query,
            "content_type": content_type,
            "body": body,
            "received_at": now(),
        }
        return self.store.add("chat", item)


def hook_target(hook: JSON) -> JSON:
    return {
        "hook_id": hook["id"],
        "url": hook["config"]["url"],
        "secret": hook["config"].get("secret", ""),
        "content_type": hook["config"].get("content_type", "form"),
        "target_type": "repository",
    }


def _public_hook(hook: JSON) -> JSON:
    out = {k: v for k, v in hook.items() if k != "repository"}
    out["config"] = dict(hook["config"])
    if out["config"].get("secret"):
        out["config"]["secret"] = "********"
    return out


def _public_headers(headers: dict[str, str]) -> dict[str, str]:
    return dict(headers)


_CHAT_ANSWERS: dict[str, Callable[[], Response]] = {
    "feishu": lambda: JSONResponse(
        {"StatusCode": 0, "StatusMessage": "success", "code": 0, "data": {}, "msg": "success"}
    ),
    "dingtalk": lambda: JSONResponse({"errcode": 0, "errmsg": "ok"}),
    "slack": lambda: PlainTextResponse("ok"),
}


# -- HTTP ---------------------------------------------------------------------------------


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise GitHubError(400, "Problems parsing JSON") from exc


def build_app(twin: GitHubTwin) -> Starlette:
    Handler = Callable[..., Awaitable[Any]]

    def api(
        handler: Handler, *, status: int = 200, auth: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                if auth:
                    request.state.login = twin.check_token(request)
                result = await handler(request, **request.path_params)
            except GitHubError as exc:
                return exc.response()
            if isinstance(result, Response):
                return result
            if result is None:
                return Response(status_code=204)
            return JSONResponse(result, status_code=status)

        return run

    async def root(request: Request) -> Any:
        return {"current_user_url": f"{twin.base_url}/user", "sandbox": True}

    async def create_status(request: Request, owner: str, repo: str, sha: str) -> Any:
        return twin.create_status(owner, repo, sha, await _json_body(request))

    async def list_statuses(request: Request, owner: str, repo: str, ref: str) -> Any:
        return twin.statuses_for(owner, repo, ref)

    async def combined(request: Request, owner: str, repo: str, ref: str) -> Any:
        return twin.combined_status(owner, repo, ref)

    async def deployments(request: Request, owner: str, repo: str) -> Any:
        if request.method == "POST":
            return JSONResponse(
                twin.create_deployment(owner, repo, await _json_body(request)), status_code=201
            )
        return twin.list_deployments(owner, repo, dict(request.query_params))

    async def deployment(request: Request, owner: str, repo: str, deployment_id: str) -> Any:
        return twin.deployment(owner, repo, _int(deployment_id))

    async def deployment_statuses(
        request: Request, owner: str, repo: str, deployment_id: str
    ) -> Any:
        if request.method == "POST":
            body = await _json_body(request)
            created = twin.create_deployment_status(owner, repo, _int(deployment_id), body)
            return JSONResponse(created, status_code=201)
        return twin.deployment_statuses(owner, repo, _int(deployment_id))

    async def hooks(request: Request, owner: str, repo: str) -> Any:
        if request.method == "POST":
            hook = twin.create_hook(owner, repo, await _json_body(request))
            return JSONResponse(hook, status_code=201)
        return [_public_hook(h) for h in twin.hooks(owner, repo)]

    async def delete_hook(request: Request, owner: str, repo: str, hook_id: str) -> Any:
        twin.delete_hook(owner, repo, _int(hook_id))
        return None

    async def commit_comments(request: Request, owner: str, repo: str, ref: str) -> Any:
        if request.method == "POST":
            body = await _json_body(request)
            created = twin.create_commit_comment(owner, repo, ref, body, request.state.login)
            return JSONResponse(created, status_code=201)
        sha = twin.resolve(twin.bare(owner, repo), ref) or ref
        return twin.comments(owner, repo, sha=sha)

    async def repo_comments(request: Request, owner: str, repo: str) -> Any:
        return twin.comments(owner, repo)

    async def issue_comments(request: Request, owner: str, repo: str, number: str) -> Any:
        if request.method == "POST":
            body = await _json_body(request)
            created = twin.create_issue_comment(
                owner, repo, _int(number), body, request.state.login
            )
            return JSONResponse(created, status_code=201)
        return twin.comments(owner, repo, number=_int(number))

    async def pull(request: Request, owner: str, repo: str, number: str) -> Any:
        return twin.pull(owner, repo, _int(number))

    async def commit_pulls(request: Request, owner: str, repo: str, ref: str) -> Any:
        return twin.pulls_of_commit(owner, repo, ref)

    async def record_pull(request: Request, owner: str, repo: str) -> Any:
        return JSONResponse(
            twin.record_pull(owner, repo, await _json_body(request)), status_code=201
        )

    async def collaborator(request: Request, owner: str, repo: str, login: str) -> Any:
        added = twin.add_collaborator(owner, repo, login, await _json_body(request))
        if not added:
            return None
        return JSONResponse({"invitee": twin.user(login), "permissions": "write"}, status_code=201)

    async def permission(request: Request, owner: str, repo: str, login: str) -> Any:
        return twin.permission(owner, repo, login)

    async def users(request: Request) -> Any:
        return JSONResponse(twin.create_user(await _json_body(request)), status_code=201)

    async def git_push(request: Request) -> Any:
        body = await _json_body(request)
        guids = twin.on_push(
            str(body.get("repository", "")),
            list(body.get("updates") or []),
            str(body.get("pusher") or "sandbox"),
        )
        return JSONResponse({"deliveries": guids}, status_code=202)

    async def recorded(request: Request) -> Any:
        data = twin.store.data
        return {k: data[k] for k in Store.KEYS if k not in ("hooks", "users")} | {
            "hooks": [_public_hook(h) for h in data["hooks"]],
            "users": [u["login"] for u in data["users"]],
        }

    async def redeliver(request: Request, guid: str) -> Any:
        return JSONResponse(await twin.redeliver(guid), status_code=202)

    async def chat(request: Request, channel: str, path: str = "") -> Any:
        if request.method == "GET":
            return [c for c in twin.store.data["chat"] if c["channel"] == channel]
        content_type = request.headers.get("content-type", "")
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else {}
        except ValueError:
            body = raw.decode(errors="replace")
        twin.record_chat(channel, path, body, content_type, request.url.query)
        answer = _CHAT_ANSWERS.get(channel)
        return answer() if answer else JSONResponse({"ok": True})

    repo = "/repos/{owner}/{repo}"
    return Starlette(
        routes=[
            Route("/", api(root, auth=False)),
            Route(f"{repo}/statuses/{{sha}}", api(create_status, status=201), methods=["POST"]),
            Route(f"{repo}/statuses/{{ref}}", api(list_statuses), methods=["GET"]),
            Route(f"{repo}/commits/{{ref}}/statuses", api(list_statuses)),
            Route(f"{repo}/commits/{{ref}}/status", api(combined)),
            Route(f"{repo}/deployments", api(deployments), methods=["GET", "POST"]),
            Route(f"{repo}/deployments/{{deployment_id}}", api(deployment)),
            Route(
                f"{repo}/deployments/{{deployment_id}}/statuses",
                api(deployment_statuses),
                methods=["GET", "POST"],
            ),
            Route(
                f"{repo}/commits/{{ref}}/comments", api(commit_comments), methods=["GET", "POST"]
            ),
            Route(f"{repo}/commits/{{ref}}/pulls", api(commit_pulls)),
            Route(f"{repo}/comments", api(repo_comments)),
            Route(
                f"{repo}/issues/{{number}}/comments", api(issue_comments), methods=["GET", "POST"]
            ),
            Route(f"{repo}/pulls/{{number}}", api(pull)),
            Route(f"{repo}/collaborators/{{login}}", api(collaborator), methods=["PUT"]),
            Route(f"{repo}/collaborators/{{login}}/permission", api(permission)),
            Route("/_twin/users", api(users, auth=False), methods=["POST"]),
            Route(
                "/_twin/repos/{owner}/{repo}/pulls", api(record_pull, auth=False), methods=["POST"]
            ),
            Route(f"{repo}/hooks", api(hooks), methods=["GET", "POST"]),
            Route(f"{repo}/hooks/{{hook_id}}", api(delete_hook), methods=["DELETE"]),
            Route("/_twin/git/push", api(git_push, auth=False), methods=["POST"]),
            Route("/_twin/recorded", api(recorded, auth=False)),
            Route(
                "/_twin/deliveries/{guid}/redeliver",
                api(redeliver, auth=False),
                methods=["POST"],
            ),
            Route("/chat/{channel}", api(chat, auth=False), methods=["GET", "POST"]),
            Route("/chat/{channel}/{path:path}", api(chat, auth=False), methods=["GET", "POST"]),
        ]
    )


# --- git over HTTP ---------------------------------------------------------------------------

_GIT_PATH = re.compile(r"^/([A-Za-z0-9._-]+)/([A-Za-z0-9._-]+?)(?:\.git)?(/.*)$")
_GIT_SERVICES = ("/info/refs", "/git-upload-pack", "/git-receive-pack", "/HEAD", "/objects/")
GIT_BACKEND_TIMEOUT = 120.0


def git_path(path: str) -> tuple[str, str, str] | None:
    """(owner, repo, rest) of a smart-HTTP git path, or None for anything else."""
    match = _GIT_PATH.match(path)
    if match is None or not match.group(3).startswith(_GIT_SERVICES):
        return None
    return match.group(1), match.group(2), match.group(3)


def _basic_password(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2]


def _git_denied(status: int, message: str) -> Response:
    headers = {"WWW-Authenticate": 'Basic realm="GitHub"'} if status == 401 else {}
    return PlainTextResponse(message + "\n", status_code=status, headers=headers)


async def serve_git(twin: GitHubTwin, request: Request) -> Response:
    """One smart-HTTP request, authenticated by the token, answered by ``git http-backend``."""
    parts = git_path(request.url.path)
    if parts is None:
        return PlainTextResponse("Not Found\n", status_code=404)
    owner, repo, rest = parts
    password = _basic_password(request.headers.get("authorization", ""))
    if password is None:
        return _git_denied(401, "Authentication required")
    if not hmac.compare_digest(password, twin.token):
        return _git_denied(401, "Invalid username or token")
    try:
        twin.bare(owner, repo)
    except GitHubError:
        return _git_denied(404, "Repository not found.")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "GIT_PROJECT_ROOT": str(twin.git_base.resolve()),
        "GIT_HTTP_EXPORT_ALL": "1",
        "GIT_HTTP_MAX_REQUEST_BUFFER": "100M",
        "PATH_INFO": f"/{repo}.git{rest}",
        "REQUEST_METHOD": request.method,
        "QUERY_STRING": request.url.query,
        "CONTENT_TYPE": request.headers.get("content-type", ""),
        "REMOTE_USER": "robotics-cd",  # http-backend allows receive-pack to a known user
        "REMOTE_ADDR": request.client.host if request.client else "127.0.0.1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "GATEWAY_INTERFACE": "CGI/1.1",
    }
    for header, var in (
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "GIT_PROTOCOL"),
        ("content-length", "CONTENT_LENGTH"),
    ):
        if header in request.headers:
            env[var] = request.headers[header]
    body = await request.body()
    if "CONTENT_LENGTH" in env:
        env["CONTENT_LENGTH"] = str(len(body))
    proc = await asyncio.create_subprocess_exec(
        "git",
        "http-backend",
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(body), GIT_BACKEND_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return PlainTextResponse("git http-backend timed out\n", status_code=504)
    head, sep, payload = out.partition(b"\r\n\r\n")
    if not sep:
        head, sep, payload = out.partition(b"\n\n")
    status = 200
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines():
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.strip().split()[0])
        elif name:
            headers[name.strip()] = value.strip()
    if proc.returncode != 0 and status == 200 and not payload:
        log.warning("git http-backend failed for %s: %s", request.url.path, err.decode()[-400:])
        return PlainTextResponse("git http-backend failed\n", status_code=500)
    headers.pop("Content-Length", None)
    return Response(payload, status_code=status, headers=headers)


def build_server(twin: GitHubTwin, registry: Any = None) -> Any:
    """The twin's whole ASGI app: git over HTTP (fault target ``git``) beside the REST API
    and the chat sink (fault target ``github``)."""
    from sandbox.faults import FaultInjector

    async def git_app(scope: Any, receive: Any, send: Any) -> None:
        response = await serve_git(twin, Request(scope, receive))
        await response(scope, receive, send)

    git = FaultInjector(git_app, target="git", registry=registry)
    rest = FaultInjector(build_app(twin), target="github", registry=registry)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and git_path(scope["path"]) is not None:
            await git(scope, receive, send)
        else:
            await rest(scope, receive, send)

    return app


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise GitHubError(404, "Not Found") from exc


async def start(ctx: Any) -> None:
    conf: JSON = ctx.config.get("github", {})
    port = int(ctx.config["github_port"])
    twin = GitHubTwin(
        base_url=f"http://127.0.0.1:{port}",
        git_base=Path(ctx.config["git_base"]),
        owner=conf.get("owner", "robotics"),
        token=conf.get("token") or secrets.token_hex(20),
        webhook_url=conf.get("webhook_url", ""),
        webhook_secret=conf.get("webhook_secret", ""),
        store=Store(ctx.state_dir / "github" / "recorded.json"),
    )
    await ctx.serve(build_server(twin), port, "github")
