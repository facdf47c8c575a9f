"""A stand-in release for the approval tests: it waits for a decision exactly as the real
release does (``tasks.approvals.wait_for_votes``: the per-service form, the votes, the quorum, the
expiry key).

Served by a runner subprocess (``python -m tests.integration.approval_probe``): a suspended
run holds no process, so only a deployment run can wait for approval and be resumed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.client.schemas.objects import State
from prefect.states import Completed

from core.freeze import Freeze
from tasks.approvals import hold_for_freeze, wait_for_votes

DEPLOYMENT = "approval-probe/approval-probe"
APPROVERS = ["alice", "bob"]


@flow(name="approval-probe")
async def approval_probe(
    service: str,
    image: str = "",
    source_sha: str = "",
    required: int = 1,
    frozen_until: str = "",
) -> State[Any]:
    decision = await wait_for_votes(APPROVERS, f"probe release of {service}", required=required)
    # Approved during a freeze (``frozen_until``, ISO): ``Frozen`` as the release does, until
    # the scheduled approvals flow resumes it after the window (or a break-glass).
    if decision.approved and frozen_until and decision.break_glass is None:
        until = datetime.fromisoformat(frozen_until)
        if datetime.now(UTC) < until:
            freeze = Freeze(until=until, reasons=("probe freeze",), scopes=("global",))
            await hold_for_freeze(APPROVERS, freeze, f"probe release of {service}")
    glass = f"; {decision.break_glass.describe()}" if decision.break_glass else ""
    return Completed(
        message=decision.outcome() + glass, name="Approved" if decision.approved else "Rejected"
    )


if __name__ == "__main__":
    approval_probe.serve(name="approval-probe", print_starting_message=False)
