"""A stand-in ``release`` for the hand-off test: it suspends for approval like the real one.

Served by a runner subprocess (``python -m tests.integration.handoff_probe``) so the hand-off
reaches it the production way: a deployment run started with ``as_subflow=False``.
"""

from __future__ import annotations

from prefect import flow, suspend_flow_run
from prefect.input import RunInput

DEPLOYMENT = "handoff-probe-release/probe"


class ProbeApproval(RunInput):
    approve: bool


@flow(name="handoff-probe-release")
def probe_release(service: str, image: str, source_sha: str) -> str:
    decision = suspend_flow_run(wait_for_input=ProbeApproval, timeout=None)
    return f"{service} {image} {source_sha[:7]} approved={decision.approve}"


if __name__ == "__main__":
    probe_release.serve(name="probe", print_starting_message=False)
