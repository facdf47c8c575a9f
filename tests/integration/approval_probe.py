"""A stand-in release for the approval tests: it waits for a decision exactly as the real
release does (``tasks.approvals.wait_for_decision``: the per-service form, the expiry key).

Served by a runner subprocess (``python -m tests.integration.approval_probe``): a suspended
run holds no process, so only a deployment run can wait for approval and be resumed.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.states import Completed, State

from tasks.approvals import wait_for_decision

DEPLOYMENT = "approval-probe/approval-probe"
APPROVERS = ["alice", "bob"]


@flow(name="approval-probe")
async def approval_probe(service: str, image: str = "", source_sha: str = "") -> State[Any]:
    decision = await wait_for_decision(APPROVERS, f"probe release of {service}")
    return Completed(
        message=decision.outcome(), name="Approved" if decision.approved else "Rejected"
    )


if __name__ == "__main__":
    approval_probe.serve(name="approval-probe", print_starting_message=False)
