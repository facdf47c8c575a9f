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
