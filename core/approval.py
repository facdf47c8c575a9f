"""Pure rules of the approval step: who may decide, when a wait is overdue, and what the
approver is shown."""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import InvalidInput

TIMEOUT_APPROVER = "system:timeout"
Decision = Literal["approve", "reject"]


@dataclass(frozen=True)
class ApprovalDecision:
    decision: Decision
    approver: str
    comment: str = ""
    votes: tuple[Vote, ...] = ()
    break_glass: BreakGlass | None = None

    @property
    def approved(self) -> bool:
        # A decision "by" the timeout can never approve, whatever the form said.
        return self.decision == "approve" and self.approver != TIMEOUT_APPROVER

    @property
    def timed_out(self) -> bool:
        return self.approver == TIMEOUT_APPROVER

    def paths(self) -> list[str]:
        """Who decided and how, one line each (for the record): ``alice via github``."""
        return [v.describe() for v in self.votes]

    def outcome(self) -> str:
        if self.approved:
            return f"approved by {self.approver}"
        if self.timed_out:
            return "rejected: timed out"
        return f"rejected by {self.approver}" + (f": {self.comment}" if self.comment else "")


def check_approver(approver: str, allowed: list[str]) -> str:
    if approver not in allowed:
        raise InvalidInput(
            f"approver {approver!r} is not on this service's allowlist ({', '.join(allowed)})"
        )
    return approver


@dataclass(frozen=True)
class OperatorAction:
    """Who asked for a command that skips the analysis, and why (both recorded).

    The name is what the operator typed: it is checked against the service's approvers, but
    it is not authentication (see docs/operations.md)."""

    operator: str
    reason: str

    def describe(self) -> str:
        return f"{self.operator}: {self.reason}"


def check_operator(operator: str | None, reason: str | None, allowed: list[str]) -> OperatorAction:
    """Refuse an operator command without a name on the allowlist or without a reason."""
    name = (operator or "").strip()
    if not name:
        raise InvalidInput(
            "say who you are: --operator NAME (one of this service's approvers: "
            f"{', '.join(allowed)})"
        )
    if name not in allowed:
        raise InvalidInput(
            f"operator {name!r} is not on this service's approver allowlist ({', '.join(allowed)})"
        )
    why = (reason or "").strip()
    if not why:
        raise InvalidInput("a reason is required: --reason TEXT (it is recorded)")
    return OperatorAction(operator=name, reason=why)


def is_overdue(paused_at: datetime, now: datetime, timeout: timedelta) -> bool:
    return now - paused_at >= timeout


def unified_diff(before: str, after: str, path: str) -> str:
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile=f"a/{path}",
        tofile=f"b/{path}",
    )
    return "".join(lines)


# --- who approved, how: votes and the quorum -------------------------------------------------

Path = Literal["github", "ui", "cli"]
SHORT_ID_LENGTH = 8
_SHORT_ID = re.compile(r"^[0-9a-f]{8}$")
# ``/approve <release>`` and ``/reject <release> <reason>``, each at the start of a line.
_COMMAND = re.compile(
    r"^[ \t]*/(?P<verb>approve|reject|break-glass)(?:[ \t]+(?P<release>\S+))?(?:[ \t]+(?P<rest>.*?))?[ \t]*$",
    re.MULTILINE | re.IGNORECASE,
)


def release_short_id(flow_run_id: str) -> str:
    """The id a comment names a release by: the first 8 hex digits of its flow run id."""
    return flow_run_id.replace("-", "").lower()[:SHORT_ID_LENGTH]


@dataclass(frozen=True)
class CommentCommand:
    """An approval command found in a comment."""

    decision: Decision
    release: str
    reason: str = ""
    break_glass: bool = False


def parse_command(body: str) -> CommentCommand | None:
    """The first approval command of a comment body, or None when it holds none.

    ``/approve <release> [why]``, ``/reject <release> <reason>`` (the reason is mandatory)
    and ``/break-glass <release> <reason>`` (approve *and* release during a freeze; the
    reason is mandatory). Commands inside quoted lines (``> /approve ...``, a reply quoting
    one) do not count. A malformed command raises :class:`InvalidInput` with what to write
    instead, so the reply comment can say it.
    """
    for match in _COMMAND.finditer(body or ""):
        verb = match.group("verb").lower()
        release = (match.group("release") or "").lower()
        rest = (match.group("rest") or "").strip()
        usage = {
            "approve": "/approve <release>",
            "reject": "/reject <release> <reason>",
            "break-glass": "/break-glass <release> <reason>",
        }[verb]
        if not _SHORT_ID.match(release):
            raise InvalidInput(
                f"`/{verb}` needs the release's 8-character id (as the approval request "
                f"prints it): write `{usage}`"
            )
        if verb in ("reject", "break-glass") and not rest:
            raise InvalidInput(f"`/{verb}` needs a reason: write `{usage}`")
        return CommentCommand(
            decision="reject" if verb == "reject" else "approve",
            release=release,
            reason=rest,
            break_glass=verb == "break-glass",
        )
    return None


class Vote(BaseModel):
    """One person's answer to an approval request, as recorded."""

    model_config = ConfigDict(frozen=True)
    decision: Decision
    approver: str = Field(description="The approver's name in the catalog.")
    path: Path = Field(description="How the answer came: github comment, Prefect UI, CLI.")
    authenticated: bool = Field(
        description="Whether someone proved who they are: GitHub did, or an authenticating "
        "proxy in front of the UI did (a setting declares it)."
    )
    login: str = Field(default="", description="The GitHub login, on the github path.")
    comment: str = ""
    break_glass: bool = Field(default=False, description="Approves releasing during a freeze.")
    at: datetime | None = None
    reference: str = Field(default="", description="Where it came from (a comment URL).")

    def describe(self) -> str:
        who = f"{self.approver} (@{self.login})" if self.login else self.approver
        how = self.path + ("" if self.authenticated else ", unauthenticated")
        return f"{self.decision} by {who} via {how}" + (f": {self.comment}" if self.comment else "")


@dataclass(frozen=True)
class Tally:
    """Where a quorum stands."""

    required: int
    approvers: tuple[str, ...]
    rejected_by: Vote | None
    ignored: tuple[str, ...]
    break_glass: tuple[Vote, ...]
    # Groups (a release train's services) that no counted approver belongs to yet.
    uncovered: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def count(self) -> int:
        return len(self.approvers)

    @property
    def met(self) -> bool:
        return self.rejected_by is None and self.count >= self.required and not self.uncovered

    @property
    def decided(self) -> bool:
        return self.rejected_by is not None or self.met

    def progress(self) -> str:
        """What the waiting run shows: ``1 of 2 approvals``."""
        noun = "approval" if self.required == 1 else "approvals"
        text = f"{self.count} of {self.required} {noun}"
        needed = [f"{group} ({', '.join(people)})" for group, people in self.uncovered]
        return text + (f"; still needed: an approver of {', '.join(needed)}" if needed else "")


def tally(
    votes: list[Vote], required: int, cover: Mapping[str, Collection[str]] | None = None
) -> Tally:
    """Count ``votes`` (oldest first) toward a quorum of ``required`` distinct approvers.

    - One reject ends it (the first, whoever among the allowed sent it).
    - Above 1, only authenticated approvals count; an unauthenticated one is listed as
      ignored with why.
    - An approver counts once, whatever path they used and however often.
    - ``cover`` (group → its approvers; a release train's services): the quorum is met only
      when every group has at least one counted approver of its own, so nobody approves a
      service they may not approve alone by approving the bundle.
    """
    if required < 1:
        raise InvalidInput(f"a quorum needs at least 1 approval, not {required}")
    approvers: list[str] = []
    ignored: list[str] = []
    glass: list[Vote] = []
    for vote in votes:
        if vote.decision == "reject":
            return Tally(required, tuple(approvers), vote, tuple(ignored), tuple(glass))
        if required > 1 and not vote.authenticated:
            ignored.append(
                f"{vote.approver} via {vote.path}: unauthenticated approvals do not count "
                f"toward a quorum of {required}"
            )
            continue
        if vote.approver in approvers:
            continue
        approvers.append(vote.approver)
        if vote.break_glass:
            glass.append(vote)
    uncovered = tuple(
        (group, tuple(people))
        for group, people in (cover or {}).items()
        if not any(a in people for a in approvers)
    )
    return Tally(required, tuple(approvers), None, tuple(ignored), tuple(glass), uncovered)


@dataclass(frozen=True)
class BreakGlass:
    """A freeze overridden: by whom and why (recorded, announced)."""

    approvers: tuple[str, ...]
    reasons: tuple[str, ...]

    def describe(self) -> str:
        return f"break-glass by {', '.join(self.approvers)}: {'; '.join(self.reasons)}"


def break_glass(votes: list[Vote], required: int) -> BreakGlass | None:
    """A break-glass holds when ``required`` distinct authenticated approvers asked for it,
    each with a reason (``/break-glass <release> <reason>``), and nobody rejected. A single
    person never breaks a freeze: the quorum is at least 2 here."""
    need = max(required, 2)
    result = tally([v for v in votes if v.break_glass or v.decision == "reject"], need)
    if not result.met:
        return None
    glass = [v for v in result.break_glass if v.authenticated and v.comment.strip()]
    if len({v.approver for v in glass}) < need:
        return None
    return BreakGlass(
        approvers=tuple(v.approver for v in glass), reasons=tuple(v.comment for v in glass)
    )


# --- reminders ---------------------------------------------------------------------------------


def reminder_due(
    waiting_since: datetime, now: datetime, remind_after: timedelta | None, sent: int
) -> int | None:
    """The number of the reminder to send now (1, 2, ...), or None.

    One per ``remind_after`` interval of waiting: reminder k is due from ``waiting_since +
    k * remind_after``. ``sent`` is how many went out already; after a pause of the
    scheduler only the latest is sent (nobody needs three reminders at once)."""
    if remind_after is None or remind_after <= timedelta(0):
        return None
    intervals = int((now - waiting_since) / remind_after)
    return intervals if intervals > sent else None


def reminder_text(
    service: str, tag: str, approvers: list[str], waited: timedelta, progress: str = ""
) -> str:
    hours, rest = divmod(int(waited.total_seconds()), 3600)
    minutes = rest // 60
    waited_text = f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"
    tail = f" ({progress})" if progress else ""
    return (
        f"{service} `{tag}` has waited {waited_text} for approval{tail}; "
        f"approvers: {', '.join(approvers)}"
    )


def decide(
    votes: list[Vote], required: int, cover: Mapping[str, Collection[str]] | None = None
) -> ApprovalDecision | None:
    """The decision the votes make (a reject, or the quorum met), or None: keep waiting."""
    result = tally(votes, required, cover)
    if result.rejected_by is not None:
        vote = result.rejected_by
        return ApprovalDecision(
            decision="reject", approver=vote.approver, comment=vote.comment, votes=tuple(votes)
        )
    if not result.met:
        return None
    counted = [v for v in votes if v.approver in result.approvers and v.decision == "approve"]
    comments = [v.comment for v in counted if v.comment]
    return ApprovalDecision(
        decision="approve",
        approver=", ".join(result.approvers),
        comment="; ".join(dict.fromkeys(comments)),
        votes=tuple(votes),
        break_glass=break_glass(votes, required),
    )


WRITE_PERMISSIONS = frozenset({"write", "admin"})


def authorize_login(
    login: str, permission: str, approver: str | None, service: str
) -> tuple[str | None, str]:
    """Whether a GitHub login may decide for ``service``: (approver, "") or (None, why).

    ``approver`` is what the catalog maps the login to (None: not on the allowlist);
    ``permission`` what GitHub's collaborator permission API answered."""
    if approver is None:
        return None, f"@{login} is not on {service}'s GitHub approver allowlist"
    if permission not in WRITE_PERMISSIONS:
        return None, (
            f"@{login} has {permission!r} permission on the repository; approving needs write"
        )
    return approver, ""


def approval_heading(
    flow_run_id: str, required: int, freeze: object | None, upcoming: datetime | None
) -> str:
    """The lines above the approval form and in the chat request: how to answer by comment,
    the quorum, and the freeze (now, or the next one)."""
    short = release_short_id(flow_run_id)
    lines = [
        f"**Release id `{short}`**: answer with a comment on the source commit or its pull "
        f"request: `/approve {short}` or `/reject {short} <reason>`.",
    ]
    if required > 1:
        lines.append(
            f"Needs **{required} distinct approvers**; only authenticated approvals count "
            "(GitHub comments, or this form behind an authenticating proxy)."
        )
    describe = getattr(freeze, "describe", None)
    if callable(describe):
        lines.append(
            f"**Frozen**: {describe()}. Approved, it waits until then; to release during the "
            f"freeze, at least two approvers comment `/break-glass {short} <reason>`."
        )
    elif upcoming is not None:
        lines.append(f"Next freeze starts {upcoming:%Y-%m-%d %H:%M} UTC.")
    return "\n\n".join(lines) + "\n\n"
