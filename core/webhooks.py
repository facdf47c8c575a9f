"""GitHub webhooks as pure rules: signatures, payload models, and what each delivery starts.

Nothing here does I/O. The receiver (``deployments/webhook.py``) reads the raw body, asks
:func:`verify_signature`, parses the payload with the models below, and hands the catalog and
the payload to :func:`route`, which answers with the deployment runs to start (or why none).

Every value that later reaches a command line or a path — the repository, the ref, the
sha — is checked here against the catalog and git's own rules first.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.catalog import Catalog, Service, TrainingImage
from core.errors import InvalidInput
from core.images import validate_sha
from core.train import bundle_name, is_bundle_path

SIGNATURE_HEADER = "X-Hub-Signature-256"
EVENT_HEADER = "X-GitHub-Event"
DELIVERY_HEADER = "X-GitHub-Delivery"
SIGNATURE_PREFIX = "sha256="
ZERO_SHA = "0" * 40
# GitHub lists at most 20 commits in a push payload; past that the changed paths are unknown.
PUSH_COMMITS_CAP = 20
_DELIVERY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
_FULL_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}$")

# --- signatures ----------------------------------------------------------------------------


def compute_signature(secret: str | bytes, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256(secret, body)>``, exactly as GitHub sends it."""
    key = secret.encode() if isinstance(secret, str) else secret
    return SIGNATURE_PREFIX + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """True when ``header`` is the signature of ``body``; constant-time, never raises."""
    if not header or not secret:
        return False
    expected = compute_signature(secret, body)
    # compare_digest on bytes: a non-ASCII header must not raise, just not match.
    return hmac.compare_digest(expected.encode(), header.strip().encode("utf-8", "replace"))


def validate_delivery_id(value: str | None) -> str:
    if not value or not _DELIVERY_RE.match(value):
        raise InvalidInput(
            f"missing or malformed {DELIVERY_HEADER} header: expected GitHub's delivery GUID"
        )
    return value


# --- git ref rules (git check-ref-format, implemented without git) ------------------------

_REF_FORBIDDEN_CHARS = set(" ~^:?*[\\")


def check_ref_format(ref: str) -> bool:
    """git's ``check-ref-format`` rules for a full ref name (no ``--allow-onelevel``).

    A ref must have two or more ``/``-separated components; no component may be empty,
    start with ``.``, or end with ``.lock``; the name may not contain ``..``, ``@{``,
    ASCII control characters, space, ``~ ^ : ? * [ \\``, may not end with ``.`` or ``/``,
    start with ``/``, or be ``@``.
    """
    if not ref or ref == "@" or ref.endswith(".") or "/" not in ref:
        return False
    if ".." in ref or "@{" in ref:
        return False
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F or ch in _REF_FORBIDDEN_CHARS for ch in ref):
        return False
    return all(
        part and not part.startswith(".") and not part.endswith(".lock") for part in ref.split("/")
    )


def validate_ref(ref: str) -> str:
    if not check_ref_format(ref):
        raise InvalidInput(f"invalid git ref {ref!r}: refused by git's check-ref-format rules")
    return ref


def validate_full_name(value: str) -> str:
    if not _FULL_NAME_RE.match(value):
        raise InvalidInput(f"invalid repository name {value!r}: expected owner/name")
    return value


# --- path filter ---------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a path glob: ``**`` spans directories, ``*`` and ``?`` stay inside one."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("^" + "".join(out) + "$", re.DOTALL)


def path_matches(path: str, patterns: Iterable[str]) -> bool:
    """Whether a repository path matches any pattern (anchored at the repository root)."""
    return any(_glob_regex(p).match(path.lstrip("/")) for p in patterns)


# --- payload models ------------------------------------------------------------------------


class _Payload(BaseModel):
    # GitHub adds fields freely; we read only what we need and ignore the rest.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Repository(_Payload):
    full_name: str
    default_branch: str | None = None
    fork: bool = False


class PushCommit(_Payload):
    id: str
    added: list[str] = []
    modified: list[str] = []
    removed: list[str] = []


class PushEvent(_Payload):
    ref: str
    before: str
    after: str
    created: bool = False
    deleted: bool = False
    forced: bool = False
    repository: Repository
    commits: list[PushCommit] = []
    head_commit: PushCommit | None = None

    def changed_paths(self) -> set[str]:
        paths: set[str] = set()
        for commit in self.commits:
            paths.update(commit.added, commit.modified, commit.removed)
        return paths


class PullRequestRef(_Payload):
    ref: str
    sha: str
    repo: Repository | None = Field(default=None, description="Null when the fork is deleted.")


class PullRequest(_Payload):
    number: int
    merged: bool | None = False
    head: PullRequestRef
    base: PullRequestRef


class PullRequestEvent(_Payload):
    action: str
    number: int
    pull_request: PullRequest
    repository: Repository


class Account(_Payload):
    login: str
    type: str = "User"


class Comment(_Payload):
    id: int
    body: str = ""
    user: Account
    html_url: str = ""
    commit_id: str | None = Field(default=None, description="Commit comments only.")


class CommitCommentEvent(_Payload):
    """``commit_comment``: a comment on a commit (``action`` is ``created``)."""

    action: str
    comment: Comment
    repository: Repository
    sender: Account


class IssuePullRequest(_Payload):
    url: str = ""
    merged_at: str | None = None


class Issue(_Payload):
    number: int
    pull_request: IssuePullRequest | None = Field(
        default=None, description="Present when the issue is a pull request."
    )


class IssueCommentEvent(_Payload):
    """``issue_comment``: a comment on an issue or a pull request's conversation."""

    action: str
    issue: Issue
    comment: Comment
    repository: Repository
    sender: Account


CommentEvent = CommitCommentEvent | IssueCommentEvent


class PingEvent(_Payload):
    zen: str = ""
    hook_id: int | None = None


PAYLOAD_MODELS: dict[str, type[_Payload]] = {
    "push": PushEvent,
    "pull_request": PullRequestEvent,
    "ping": PingEvent,
    "commit_comment": CommitCommentEvent,
    "issue_comment": IssueCommentEvent,
}


def parse_payload(event: str, data: Any) -> _Payload:
    """Validate a decoded JSON body as ``event``'s payload; :class:`InvalidInput` if it is not."""
    model = PAYLOAD_MODELS.get(event)
    if model is None:
        raise InvalidInput(f"unsupported event {event!r}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidInput(f"{event} payload: {where}: {first['msg']}") from None


# --- routing -------------------------------------------------------------------------------

PR_ACTIONS = frozenset({"opened", "synchronize", "reopened"})
CiEvent = Literal["push", "pull_request"]


@dataclass(frozen=True)
class Targets:
    """Names (``flow/deployment``) of the deployments a webhook can start."""

    ci: str = "ci/ci"
    training_image: str = "training-image/training-image"
    release_train: str = "release-train/release-train"


@dataclass(frozen=True)
class RunRequest:
    """One deployment run to start for a delivery."""

    deployment: str
    parameters: dict[str, Any]
    reason: str
    tags: tuple[str, ...] = ()
    key: str = ""  # when one delivery starts several runs of one deployment (bundle files)

    def idempotency_key(self, delivery_id: str) -> str:
        # Same delivery (a redelivery keeps its GUID) → same key → no second run.
        return f"github-{delivery_id}-{self.deployment}" + (f"-{self.key}" if self.key else "")


@dataclass(frozen=True)
class Decision:
    """What a delivery starts: the runs, or nothing and why."""

    runs: tuple[RunRequest, ...] = ()
    ignored: str = ""
    subject: str = field(default="", compare=False)

    @property
    def starts_anything(self) -> bool:
        return bool(self.runs)


def _ignore(reason: str, subject: str = "") -> Decision:
    return Decision(ignored=reason, subject=subject)


def route(
    event: str, payload: _Payload, catalog: Catalog, targets: Targets | None = None
) -> Decision:
    """Decide which deployment runs a (verified, parsed) delivery starts.

    Raises :class:`InvalidInput` when a payload of a known repository carries a ref or sha
    that git would refuse: such a delivery is rejected before anything starts.
    """
    targets = targets or Targets()
    if isinstance(payload, PushEvent):
        return _route_push(payload, catalog, targets)
    if isinstance(payload, PullRequestEvent):
        return _route_pull_request(payload, catalog, targets)
    return _ignore(f"event {event!r} starts nothing")


def _lookup(catalog: Catalog, full_name: str) -> tuple[str, Service | TrainingImage] | None:
    validate_full_name(full_name)
    return catalog.by_github(full_name)


def _route_push(push: PushEvent, catalog: Catalog, targets: Targets) -> Decision:
    repo = push.repository.full_name
    if validate_full_name(repo).lower() == catalog.defaults.manifests_github.lower():
        return _route_bundle_push(push, catalog, targets)
    found = _lookup(catalog, repo)
    if found is None:
        return _ignore(f"repository {repo} is not in the catalog", repo)
    name, entry = found
    validate_ref(push.ref)
    if push.deleted or push.after == ZERO_SHA:
        return _ignore(f"{push.ref} was deleted in {repo}", repo)
    sha = validate_sha(push.after)
    branch_ref = f"refs/heads/{entry.branch}"
    if push.ref != branch_ref:
        return _ignore(f"{push.ref} is not {branch_ref}, the release branch of {name}", repo)
    if isinstance(entry, Service):
        params = {"service": name, "sha": sha, "ref": push.ref, "event": "push", "fork": False}
        return Decision(
            runs=(RunRequest(targets.ci, params, f"push to {push.ref} of {repo}", ("push",)),),
            subject=repo,
        )
    return _route_training_push(push, name, entry, sha, targets)


def _route_bundle_push(push: PushEvent, catalog: Catalog, targets: Targets) -> Decision:
    """A push to the manifests branch that adds or changes bundle files
    (``bundles/<name>.yaml``): one ``release-train`` run per bundle, reading the file at the
    pushed commit. Everything else pushed there (robotics-cd's own commits) starts nothing."""
    repo = push.repository.full_name
    validate_ref(push.ref)
    if push.deleted or push.after == ZERO_SHA:
        return _ignore(f"{push.ref} was deleted in {repo}", repo)
    sha = validate_sha(push.after)
    branch_ref = f"refs/heads/{catalog.defaults.manifests_branch}"
    if push.ref != branch_ref:
        return _ignore(f"{push.ref} is not {branch_ref}, the manifests branch", repo)
    if len(push.commits) >= PUSH_COMMITS_CAP:
        return _ignore(
            f"{len(push.commits)} commits pushed to {repo} (list may be truncated): bundle "
            "files unknown; start the train with `robotics-cd train-release`",
            repo,
        )
    present: dict[str, bool] = {}  # each bundle path: still there after the last commit?
    for commit in push.commits:
        for path in (*commit.added, *commit.modified):
            present[path] = True
        for path in commit.removed:
            present[path] = False
    bundles = sorted(p for p, there in present.items() if there and is_bundle_path(p))
    if not bundles:
        return _ignore(f"no bundle file (bundles/<name>.yaml) changed in {repo}@{sha[:7]}", repo)
    return Decision(
        runs=tuple(
            RunRequest(
                targets.release_train,
                {"bundle_file": path, "manifests_sha": sha},
                f"bundle {path} changed in {repo}@{sha[:7]}",
                ("push", "train", f"train:{bundle_name(path)}"),
                key=bundle_name(path),
            )
            for path in bundles
        ),
        subject=repo,
    )


def _route_training_push(
    push: PushEvent, name: str, entry: TrainingImage, sha: str, targets: Targets
) -> Decision:
    repo = push.repository.full_name
    if len(push.commits) >= PUSH_COMMITS_CAP:
        # GitHub truncates the list: the paths we see may not be all of them. Build.
        reason = f"{len(push.commits)} commits pushed (list may be truncated): paths unknown"
    else:
        matching = sorted(p for p in push.changed_paths() if path_matches(p, entry.paths))
        if not matching:
            return _ignore(
                f"no changed path of {repo}@{sha[:7]} matches {', '.join(entry.paths)}", repo
            )
        shown = ", ".join(matching[:5]) + (" …" if len(matching) > 5 else "")
        reason = f"changed paths match the filter: {shown}"
    params = {"image": name, "sha": sha, "ref": push.ref}
    return Decision(
        runs=(RunRequest(targets.training_image, params, reason, ("push", "training")),),
        subject=repo,
    )


def is_fork(pr: PullRequest) -> bool:
    """A PR from another repository (or from a deleted fork) is untrusted: no build, no push."""
    head_repo, base_repo = pr.head.repo, pr.base.repo
    if head_repo is None or head_repo.fork:
        return True
    return base_repo is None or head_repo.full_name.lower() != base_repo.full_name.lower()


def _route_pull_request(event: PullRequestEvent, catalog: Catalog, targets: Targets) -> Decision:
    repo = event.repository.full_name
    found = _lookup(catalog, repo)
    if found is None:
        return _ignore(f"repository {repo} is not in the catalog", repo)
    name, entry = found
    if not isinstance(entry, Service):
        return _ignore(f"pull requests of training repo {repo} start nothing", repo)
    if event.action not in PR_ACTIONS:
        # A merge arrives as its own push to the default branch; that push starts CI.
        return _ignore(f"pull_request action {event.action!r} starts nothing", repo)
    sha = validate_sha(event.pull_request.head.sha)
    ref = validate_ref(f"refs/pull/{event.number}/head")
    params = {
        "service": name,
        "sha": sha,
        "ref": ref,
        "event": "pull_request",
        "fork": is_fork(event.pull_request),
    }
    reason = f"pull request #{event.number} {event.action} in {repo}"
    return Decision(runs=(RunRequest(targets.ci, params, reason, ("pull_request",)),), subject=repo)
