"""Pure rules of the approval step: who may decide, when a wait is overdue, and what the
approver is shown."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from core.errors import InvalidInput

TIMEOUT_APPROVER = "system:timeout"
Decision = Literal["approve", "reject"]


@dataclass(frozen=True)
class ApprovalDecision:
    decision: Decision
    approver: str
    comment: str = ""

    @property
    def approved(self) -> bool:
        # A decision "by" the timeout can never approve, whatever the form said.
        return self.decision == "approve" and self.approver != TIMEOUT_APPROVER

    @property
    def timed_out(self) -> bool:
        return self.approver == TIMEOUT_APPROVER

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
