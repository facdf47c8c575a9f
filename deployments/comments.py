"""Approvals by GitHub comment: ``/approve <release>``, ``/reject <release> <reason>`` and
``/break-glass <release> <reason>`` on the release's source commit or on the pull request
that merged it, delivered by the signed ``commit_comment`` / ``issue_comment`` webhooks.

The receiver (``deployments/webhook.py``) has verified the signature and parsed the payload;
:class:`CommentApprovals` then decides, in this order:

1. a comment that holds no command, an edit or a deletion: ignored (202);
2. the repository's service, the waiting release the id names (a paused run of the release
   deployment of that service), and that the comment is on its source commit or on a pull
   request whose merge (or head) commit is that commit;
3. the login: on the service's ``approval.github`` allowlist, with write permission on the
   repository by the collaborator permission API;
4. a vote recorded on the run as ``vote-github-<comment id>`` and the run resumed, so the
   release counts it (quorum, break-glass). The comment id is the same on a redelivery: the
   vote is written once and the second delivery does nothing.

A refused comment is recorded on the run (``refused-github-<comment id>``, read into the
release record) and answered with a reply comment, once. Replies never start a line with a
command, so the receiver never answers itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

import anyio

from core.approval import (
    CommentCommand,
    Vote,
    authorize_login,
    parse_command,
    release_short_id,
)
from core.catalog import Catalog, Service
from core.errors import GitHubError, InvalidInput
from core.webhooks import CommentEvent, CommitCommentEvent

log = logging.getLogger("robotics_cd.webhook.comments")


@dataclass(frozen=True)
class WaitingRelease:
    flow_run_id: str
    service: str
    source_sha: str


@dataclass(frozen=True)
class CommentOutcome:
    """What the receiver answers GitHub (and logs)."""

    status: int
    message: str
    flow_run_id: str = ""
    replied: bool = False


class ReleaseRuns(Protocol):
    """The Prefect side: find the waiting release, record on it (each once)."""

    async def waiting(self, short_id: str, service: str) -> WaitingRelease | None: ...
    async def record_vote(self, flow_run_id: str, key: str, vote: Vote) -> bool: ...
    async def record_refusal(self, flow_run_id: str, key: str, value: dict[str, Any]) -> bool: ...


class GitHubSide(Protocol):
    """The GitHub side (sync, run in a worker thread): permission, pull requests, replies."""

    def permission(self, repo: str, login: str) -> str: ...
    def pull_shas(self, repo: str, number: int) -> set[str]: ...
    def reply(self, repo: str, where: str | int, body: str) -> None: ...


class CommentApprovals:
    def __init__(self, *, catalog: Catalog, runs: ReleaseRuns, github: GitHubSide) -> None:
        self.catalog, self.runs, self.github = catalog, runs, github
        # Replies to comments that name no run (nothing to record them on): once per process.
        self._answered: set[int] = set()

    async def handle(self, event: CommentEvent) -> CommentOutcome:
        comment = event.comment
        repo = event.repository.full_name
        if event.action != "created":
            return CommentOutcome(202, f"comment {event.action}: only new comments decide")
        if event.sender.type == "Bot" or event.sender.login.endswith("[bot]"):
            return CommentOutcome(202, "comments of bots decide nothing")
        try:
            command = parse_command(comment.body)
        except InvalidInput as exc:
            replied = await self._reply_once(event, f"@{comment.user.login} {exc}")
            return CommentOutcome(202, f"malformed command: {exc}", replied=replied)
        if command is None:
            return CommentOutcome(202, "no approval command in the comment")
        found = self.catalog.by_github(repo)
        if found is None or not isinstance(found[1], Service):
            return CommentOutcome(202, f"repository {repo} has no service in the catalog")
        name = found[0]
        release = await self.runs.waiting(command.release, name)
        if release is None:
            text = (
                f"@{comment.user.login} no release `{command.release}` of {name} is waiting "
                "for approval (it may have been decided already); nothing was done."
            )
            replied = await self._reply_once(event, text)
            return CommentOutcome(202, text, replied=replied)
        where_ok = await self._on_the_release(event, release)
        login = event.sender.login
        if not where_ok:
            why = (
                f"the comment is not on {name}'s source commit {release.source_sha[:12]} nor "
                "on the pull request that merged it"
            )
            return await self._refuse(event, release, command, why)
        policy = self.catalog.approval_policy(name)
        approver = policy.approver_for(login)
        permission = "none"
        if approver is not None:
            permission = await anyio.to_thread.run_sync(self.github.permission, repo, login)
        who, why = authorize_login(login, permission, approver, name)
        if who is None:
            return await self._refuse(event, release, command, why)
        vote = Vote(
            decision=command.decision,
            approver=who,
            path="github",
            authenticated=True,
            login=login,
            comment=command.reason,
            break_glass=command.break_glass,
            at=datetime.now(UTC),
            reference=comment.html_url,
        )
        if not await self.runs.record_vote(release.flow_run_id, f"github-{comment.id}", vote):
            return CommentOutcome(
                202, "this comment's vote is recorded already", release.flow_run_id
            )
        log.info("release %s: %s", release.flow_run_id, vote.describe())
        reply = f"Recorded for release `{command.release}` of {name}: {vote.describe()}."
        await self._reply(event, reply)
        return CommentOutcome(202, f"recorded: {vote.describe()}", release.flow_run_id, True)

    async def _on_the_release(self, event: CommentEvent, release: WaitingRelease) -> bool:
        if isinstance(event, CommitCommentEvent):
            return (event.comment.commit_id or "").lower() == release.source_sha.lower()
        if event.issue.pull_request is None:
            return False
        shas = await anyio.to_thread.run_sync(
            self.github.pull_shas, event.repository.full_name, event.issue.number
        )
        return release.source_sha.lower() in {s.lower() for s in shas}

    async def _refuse(
        self, event: CommentEvent, release: WaitingRelease, command: CommentCommand, why: str
    ) -> CommentOutcome:
        login = event.sender.login
        value = {
            "login": login,
            "command": command.decision + (" (break-glass)" if command.break_glass else ""),
            "reason": why,
            "comment": event.comment.html_url,
            "at": datetime.now(UTC).isoformat(),
        }
        key = f"github-{event.comment.id}"
        log.warning("release %s: refused @%s: %s", release.flow_run_id, login, why)
        if not await self.runs.record_refusal(release.flow_run_id, key, value):
            return CommentOutcome(202, f"refused (recorded already): {why}", release.flow_run_id)
        await self._reply(
            event,
            f"@{login} your `{command.decision}` for release `{command.release}` was refused "
            f"and recorded: {why}.",
        )
        return CommentOutcome(202, f"refused: {why}", release.flow_run_id, replied=True)

    async def _reply_once(self, event: CommentEvent, body: str) -> bool:
        if event.comment.id in self._answered:
            return False
        self._answered.add(event.comment.id)
        await self._reply(event, body)
        return True

    async def _reply(self, event: CommentEvent, body: str) -> None:
        where: str | int = (
            event.comment.commit_id or ""
            if isinstance(event, CommitCommentEvent)
            else event.issue.number
        )
        try:
            await anyio.to_thread.run_sync(
                self.github.reply, event.repository.full_name, where, body
            )
        except GitHubError as exc:  # the decision stands; only the answer is lost
            log.error("could not reply on %s: %s", event.repository.full_name, exc)


# --- the real sides ------------------------------------------------------------------------


class PrefectReleaseRuns:
    """Waiting releases are paused runs of the release deployment."""

    def __init__(self, deployment_name: str) -> None:
        self.deployment_name = deployment_name.split("/")[-1]

    async def waiting(self, short_id: str, service: str) -> WaitingRelease | None:
        from tasks.approvals import paused_release_runs

        for run in await paused_release_runs(self.deployment_name):
            params = run.parameters
            if release_short_id(str(run.id)) == short_id and params.get("service") == service:
                return WaitingRelease(str(run.id), service, str(params.get("source_sha", "")))
        return None

    async def record_vote(self, flow_run_id: str, key: str, vote: Vote) -> bool:
        from tasks.approvals import record_vote

        return await record_vote(UUID(flow_run_id), key, vote)

    async def record_refusal(self, flow_run_id: str, key: str, value: dict[str, Any]) -> bool:
        from tasks.approvals import REFUSED_PREFIX, record_input_once

        return await record_input_once(UUID(flow_run_id), REFUSED_PREFIX + key, value)


class RestGitHub:
    """The GitHub REST client (``tasks.github``), one per call: the token is read when a
    comment arrives, so a receiver without it still serves CI webhooks."""

    def __init__(self, base_url: str | None = None, token: str | None = None) -> None:
        self.base_url, self.token = base_url, token

    def _client(self) -> Any:
        from tasks.github import github_client

        return github_client(base_url=self.base_url, token=self.token, retries=2)

    def permission(self, repo: str, login: str) -> str:
        with self._client() as gh:
            return str(gh.collaborator_permission(repo, login))

    def pull_shas(self, repo: str, number: int) -> set[str]:
        with self._client() as gh:
            pull = gh.pull_request(repo, number)
        if not pull:
            return set()
        shas = {pull.get("merge_commit_sha"), (pull.get("head") or {}).get("sha")}
        return {str(s) for s in shas if s}

    def reply(self, repo: str, where: str | int, body: str) -> None:
        with self._client() as gh:
            if isinstance(where, int):
                gh.create_issue_comment(repo, where, body)
            else:
                gh.create_commit_comment(repo, where, body)


__all__ = [
    "CommentApprovals",
    "CommentOutcome",
    "GitHubSide",
    "PrefectReleaseRuns",
    "ReleaseRuns",
    "RestGitHub",
    "WaitingRelease",
]
