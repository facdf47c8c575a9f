"""GitHub's REST API: commit statuses, deployments and deployment statuses; for approvals
by comment, comments (commit and issue/PR), pull requests and collaborator permissions.

The token comes from a Prefect Secret block (``settings.github_token_block``). Transient
trouble (5xx, 429, connection errors, timeouts) is retried with backoff inside the client;
a GitHub outage must not fail a release, so each task takes ``required`` (default False):
when False a failure after the retries is logged as a warning and the task returns None.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

import httpx
from prefect import task
from prefect.blocks.system import Secret
from pydantic import BaseModel, ConfigDict, SecretStr

from core.backoff import Backoff
from core.errors import GitHubError, InvalidInput
from core.images import SHA_RE
from core.settings import get_settings
from tasks.logs import run_logger

API_VERSION = "2022-11-28"
CommitState = Literal["pending", "success", "failure", "error"]
DeploymentState = Literal["queued", "in_progress", "success", "failure", "error", "inactive"]
COMMIT_STATES = ("pending", "success", "failure", "error")
DEPLOYMENT_STATES = ("queued", "in_progress", "success", "failure", "error", "inactive")
_REPO = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_LOGIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}$")
_RETRYABLE = {429, 500, 502, 503, 504}
DESCRIPTION_LIMIT = 140  # GitHub answers 422 above this


def check_repo(repo: str) -> str:
    if not _REPO.match(repo) or ".." in repo:
        raise InvalidInput(f"GitHub repository must be 'owner/name', got {repo!r}")
    return repo


def check_sha(sha: str) -> str:
    if not SHA_RE.match(sha):
        raise InvalidInput(f"commit sha must be 40 lowercase hex characters, got {sha!r}")
    return sha


def short_description(text: str) -> str:
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 1] + "…"


class GitHubClient:
    """A thin client of the GitHub REST endpoints the release flow uses."""

    def __init__(
        self,
        *,
        base_url: str,
        token: str | None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff_seconds: float = 1.0,
    ) -> None:
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": API_VERSION}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base_url = base_url.rstrip("/")
        self.backoff = Backoff(retries=retries, base_delay=backoff_seconds)
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> GitHubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, missing_ok: bool = False, **kwargs: Any) -> Any:
        """Send, retrying transient failures; return the decoded JSON body (None for a 404
        when ``missing_ok``)."""
        what = f"{method} {path}"
        for attempt in range(self.backoff.attempts):
            last_try = attempt == self.backoff.retries
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if last_try:
                    raise GitHubError(
                        f"GitHub API at {self.base_url} unreachable for {what} after "
                        f"{attempt + 1} tries ({type(exc).__name__}); check "
                        "ROBOTICS_CD_GITHUB_API_URL and the network"
                    ) from exc
            else:
                if response.status_code < 400:
                    return response.json() if response.content else None
                if response.status_code == 404 and missing_ok:
                    return None
                if response.status_code not in _RETRYABLE or last_try:
                    raise GitHubError(self._explain(what, response, attempt + 1))
            time.sleep(self.backoff.delay(attempt))
        raise GitHubError(f"{what}: no attempt made (retries={self.backoff.retries})")

    @staticmethod
    def _explain(what: str, response: httpx.Response, tries: int) -> str:
        try:
            message = response.json().get("message", "")
        except ValueError:
            message = response.text[:200]
        hint = {
            401: "the token is missing or invalid; check the GitHub Secret block",
            403: "the token lacks permission (repo:status / deployments) or is rate limited",
            404: "no such repository or commit, or the token cannot see it",
            422: "GitHub refused the payload",
        }.get(response.status_code, "GitHub is failing; retry later")
        return (
            f"{what} answered HTTP {response.status_code} after {tries} tries: {message} ({hint})"
        )

    def set_commit_status(
        self,
        repo: str,
        sha: str,
        state: CommitState,
        context: str,
        description: str = "",
        target_url: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "state": state,
            "context": context,
            "description": short_description(description),
        }
        if target_url:
            body["target_url"] = target_url
        result: dict[str, Any] = self.request("POST", f"/repos/{repo}/statuses/{sha}", json=body)
        return result

    def find_deployment(self, repo: str, ref: str, environment: str, run_id: str) -> int | None:
        """A deployment of ``ref`` to ``environment`` whose payload names ``run_id``."""
        found = self.request(
            "GET",
            f"/repos/{repo}/deployments",
            params={"ref": ref, "environment": environment, "per_page": "100"},
        )
        for item in found or []:
            payload = item.get("payload")
            if isinstance(payload, dict) and run_id in (
                payload.get("run_id"),
                payload.get("flow_run_id"),
            ):
                return int(item["id"])
        return None

    def create_deployment(
        self,
        repo: str,
        ref: str,
        environment: str,
        description: str,
        payload: dict[str, Any],
    ) -> int:
        body = {
            "ref": ref,
            "environment": environment,
            "description": short_description(description),
            "payload": payload,
            # Our own checks gate the release; GitHub must not merge or re-check contexts.
            "auto_merge": False,
            "required_contexts": [],
            "production_environment": environment == "production",
        }
        created = self.request("POST", f"/repos/{repo}/deployments", json=body)
        if not isinstance(created, dict) or "id" not in created:
            raise GitHubError(f"GitHub created no deployment for {repo}@{ref}: {created!r:.200}")
        return int(created["id"])

    def set_deployment_status(
        self,
        repo: str,
        deployment_id: int,
        state: DeploymentState,
        *,
        log_url: str | None = None,
        environment_url: str | None = None,
        description: str = "",
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"state": state, "description": short_description(description)}
        if log_url:
            body["log_url"] = log_url
        if environment_url:
            body["environment_url"] = environment_url
        result: dict[str, Any] = self.request(
            "POST", f"/repos/{repo}/deployments/{deployment_id}/statuses", json=body
        )
        return result

    # -- approvals by comment ------------------------------------------------------------

    def collaborator_permission(self, repo: str, login: str) -> str:
        """``admin``, ``write``, ``read`` or ``none`` (GitHub's ``permission`` field; an
        unknown login is ``none``). ``maintain`` reads as ``write``, ``triage`` as ``read``."""
        check_repo(repo)
        if not _LOGIN.match(login):
            raise InvalidInput(f"not a GitHub login: {login!r}")
        found = self.request(
            "GET", f"/repos/{repo}/collaborators/{login}/permission", missing_ok=True
        )
        if not isinstance(found, dict):
            return "none"
        return str(found.get("permission") or "none")

    def create_commit_comment(self, repo: str, sha: str, body: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST",
            f"/repos/{check_repo(repo)}/commits/{check_sha(sha)}/comments",
            json={"body": body},
        )
        return result

    def create_issue_comment(self, repo: str, number: int, body: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", f"/repos/{check_repo(repo)}/issues/{int(number)}/comments", json={"body": body}
        )
        return result

    def pull_request(self, repo: str, number: int) -> dict[str, Any] | None:
        found = self.request(
            "GET", f"/repos/{check_repo(repo)}/pulls/{int(number)}", missing_ok=True
        )
        return found if isinstance(found, dict) else None


class GitHubCredentials(BaseModel):
    """Where GitHub's API is and the token to call it with: the one way the product builds
    a :class:`GitHubClient` (``get_client``). The token is a ``SecretStr``, so a logged or
    raised credentials object never shows it."""

    model_config = ConfigDict(frozen=True)
    base_url: str
    token: SecretStr

    @classmethod
    def load(cls, block_name: str | None = None) -> GitHubCredentials:
        """From settings: the API URL and the Secret block holding the token."""
        name = block_name or get_settings().github_token_block
        try:
            block: Secret[Any] = Secret.load(name, _sync=True)  # type: ignore[call-arg,assignment]
        except ValueError as exc:  # Prefect raises ValueError for a missing block
            raise _no_token_block(name) from exc
        return cls._of(name, block.get())

    @classmethod
    async def aload(cls, block_name: str | None = None) -> GitHubCredentials:
        """:meth:`load` for async code (hooks, async tasks): the block is read without
        blocking the loop."""
        name = block_name or get_settings().github_token_block
        try:
            block: Secret[Any] = await Secret.aload(name)
        except ValueError as exc:
            raise _no_token_block(name) from exc
        return cls._of(name, block.get())

    @classmethod
    def _of(cls, block: str, value: object) -> GitHubCredentials:
        if not isinstance(value, str) or not value:
            raise GitHubError(f"Secret block {block!r} must hold the GitHub token as a string")
        return cls(base_url=get_settings().github_api_url, token=SecretStr(value))

    def get_client(
        self,
        *,
        transport: httpx.BaseTransport | None = None,
        retries: int = 3,
        backoff_seconds: float = 1.0,
    ) -> GitHubClient:
        return GitHubClient(
            base_url=self.base_url,
            token=self.token.get_secret_value(),
            transport=transport,
            retries=retries,
            backoff_seconds=backoff_seconds,
        )


def _no_token_block(name: str) -> GitHubError:
    return GitHubError(
        f"no Secret block {name!r} with the GitHub token; create it "
        f"(Secret(value='<token>').save({name!r})) or set ROBOTICS_CD_GITHUB_TOKEN_BLOCK"
    )


def github_client(
    *,
    base_url: str | None = None,
    token: str | None = None,
    transport: httpx.BaseTransport | None = None,
    retries: int = 3,
    backoff_seconds: float = 1.0,
) -> GitHubClient:
    """A client from settings' credentials, or from the URL and token given (the comment
    receiver holds its own)."""
    if token is not None:
        credentials = GitHubCredentials(
            base_url=base_url or get_settings().github_api_url, token=SecretStr(token)
        )
    else:
        credentials = GitHubCredentials.load()
        if base_url is not None:
            credentials = credentials.model_copy(update={"base_url": base_url})
    return credentials.get_client(
        transport=transport, retries=retries, backoff_seconds=backoff_seconds
    )


def _tolerate(what: str, required: bool, exc: GitHubError) -> None:
    if required:
        raise exc
    run_logger("robotics_cd.github").warning(
        "GitHub %s failed; the release goes on without it: %s", what, exc
    )


@task(name="github-commit-status")
def set_commit_status(
    repo: str,
    sha: str,
    state: CommitState,
    context: str,
    description: str = "",
    target_url: str | None = None,
    *,
    required: bool = False,
    client: GitHubClient | None = None,
) -> bool:
    """Set a commit status; True when GitHub has it."""
    check_repo(repo)
    check_sha(sha)
    if state not in COMMIT_STATES:
        raise InvalidInput(f"commit status state must be one of {COMMIT_STATES}, got {state!r}")
    try:
        with client or github_client() as gh:
            gh.set_commit_status(repo, sha, state, context, description, target_url)
    except GitHubError as exc:
        _tolerate(f"status {context}={state} on {repo}@{sha[:7]}", required, exc)
        return False
    return True


@task(name="github-deployment")
def create_deployment(
    repo: str,
    ref: str,
    environment: str,
    description: str,
    payload: dict[str, Any],
    *,
    required: bool = False,
    client: GitHubClient | None = None,
) -> int | None:
    """Create (or reuse) the GitHub deployment of ``ref`` to ``environment``.

    Idempotent: a deployment of the same ref and environment whose payload carries the same
    ``run_id`` (or ``flow_run_id``) is reused, so a resumed or retried release makes no
    second one.
    """
    check_repo(repo)
    run_id = payload.get("run_id", payload.get("flow_run_id"))
    if not isinstance(run_id, str) or not run_id:
        raise InvalidInput(
            "deployment payload needs a 'run_id' or 'flow_run_id' (the flow run id) for idempotency"
        )
    try:
        with client or github_client() as gh:
            existing = gh.find_deployment(repo, ref, environment, run_id)
            if existing is not None:
                return existing
            return gh.create_deployment(repo, ref, environment, description, payload)
    except GitHubError as exc:
        _tolerate(f"deployment of {repo}@{ref} to {environment}", required, exc)
        return None


@task(name="github-deployment-status")
def set_deployment_status(
    repo: str,
    deployment_id: int | None,
    state: DeploymentState,
    log_url: str | None = None,
    environment_url: str | None = None,
    description: str = "",
    *,
    required: bool = False,
    client: GitHubClient | None = None,
) -> bool:
    """Add a status to a deployment (a None id, from a tolerated outage, is skipped)."""
    check_repo(repo)
    if state not in DEPLOYMENT_STATES:
        raise InvalidInput(f"deployment state must be one of {DEPLOYMENT_STATES}, got {state!r}")
    if deployment_id is None:
        _tolerate(
            f"deployment status {state}",
            required,
            GitHubError("there is no GitHub deployment to report to (it was not created)"),
        )
        return False
    try:
        with client or github_client() as gh:
            gh.set_deployment_status(
                repo,
                deployment_id,
                state,
                log_url=log_url,
                environment_url=environment_url,
                description=description,
            )
    except GitHubError as exc:
        _tolerate(f"deployment status {state} on #{deployment_id}", required, exc)
        return False
    return True
