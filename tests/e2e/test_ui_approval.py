"""Approving in the real Prefect UI works.

A served deployment of a tiny flow suspends with the release's own approval form
(``tasks.approvals.approval_form``); headless Chromium opens the suspended run in the Prefect
UI, presses Resume, fills the form and submits, and the run resumes and completes with what
was typed. Both runs are started together, so the runner's start-up latency is paid once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from playwright.sync_api import Page
from prefect import State, flow, get_client, suspend_flow_run
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Completed

from core.approval import ApprovalDecision
from core.errors import InvalidInput
from sandbox.procs import spawn, stop_pid, wait_until
from tasks.approvals import approval_form, to_decision
from tests.ui import (
    PrefectUIError,
    approve_in_ui,
    chromium,
    fill_approval_form,
    offered_choices,
    open_resume_dialog,
    submit_resume,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
APPROVERS = ["alice", "bob"]
DESCRIPTION = "## Approve `robotics-api:1.4.2`\n\nStaging is healthy; production waits for you."
DEPLOYMENT = "ui-approval-probe/ui-approval"


@flow(name="ui-approval-probe", persist_result=True)
async def ui_approval_probe() -> dict[str, str] | State[Any]:
    """Suspend for approval exactly as the release does, then report what the form said."""
    form = await suspend_flow_run(  # type: ignore[misc]
        wait_for_input=approval_form(APPROVERS, DESCRIPTION), key="approval"
    )
    decision: ApprovalDecision = to_decision(form)
    if not decision.approved:  # as flows.release.end_rejected ends a rejected release
        return Completed(message=decision.outcome(), name="Rejected")
    return {
        "decision": decision.decision,
        "approver": decision.approver,
        "comment": decision.comment,
        "outcome": decision.outcome(),
    }


SERVE = (
    "import prefect\n"
    "from tests.e2e.test_ui_approval import ui_approval_probe\n"
    "prefect.serve(ui_approval_probe.to_deployment(name='ui-approval'), "
    "print_starting_message=False)\n"
)


def _read(run_id: UUID) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def _state_is(run_id: UUID, kind: StateType) -> bool:
    state = _read(run_id).state
    return state is not None and state.type == kind


@pytest.fixture(scope="module")
def suspended(
    prefect_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[UUID]]:
    """Two runs of the served probe, both waiting for approval."""
    logs = tmp_path_factory.mktemp("ui-approval")
    served = spawn(
        [sys.executable, "-c", SERVE],
        log=logs / "serve.log",
        env={**os.environ, **prefect_server.env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
        cwd=ROOT,
    )
    try:
        wait_until(_deployed, timeout=60, what=f"served {DEPLOYMENT} (log: {logs / 'serve.log'})")
        runs = [_start_run() for _ in range(2)]
        for run_id in runs:
            wait_until(
                partial(_state_is, run_id, StateType.PAUSED),
                timeout=90,
                interval=0.5,
                what=f"flow run {run_id} suspended (log: {logs / 'serve.log'})",
            )
        yield runs
    finally:
        stop_pid(served.pid)


@pytest.fixture(scope="module")
def ui_page() -> Iterator[Page]:
    """One headless Chromium for the module: its cache spares a second boot of the UI."""
    with chromium() as page:
        yield page


def _final_state(run_id: UUID) -> State[Any]:
    """Wait (bounded) until the resumed run has ended, and return how it ended."""
    wait_until(
        lambda: bool((state := _read(run_id).state) and state.is_final()),
        timeout=60,
        interval=0.5,
        what=f"flow run {run_id} ended after the decision in the UI",
    )
    state = _read(run_id).state
    assert state is not None
    return state


def _start_run() -> UUID:
    """A top-level deployment run (only those can suspend), as the hand-off starts a release."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        return client.create_flow_run_from_deployment(deployment.id).id


def _deployed() -> bool:
    with get_client(sync_client=True) as client:
        client.read_deployment_by_name(DEPLOYMENT)
    return True


def test_approving_in_the_ui_resumes_the_run_with_the_form(
    prefect_server: Any, suspended: list[UUID], ui_page: Page, tmp_path: Path
) -> None:
    run_id = suspended[0]
    comment = "staging looks right; go ahead"

    approve_in_ui(
        prefect_server.ui_url,
        str(run_id),
        decision="approve",
        approver="bob",
        comment=comment,
        debug_dir=tmp_path,
        page=ui_page,
    )

    state = _final_state(run_id)
    assert state.type == StateType.COMPLETED, state
    # _sync: the module's Playwright page keeps an event loop in this thread
    assert state.result(_sync=True) == {  # type: ignore[call-overload]
        "decision": "approve",
        "approver": "bob",
        "comment": comment,
        "outcome": "approved by bob",
    }


def test_rejecting_in_the_ui_ends_the_run_rejected(
    prefect_server: Any, suspended: list[UUID], ui_page: Page
) -> None:
    """Step by step, looking at the form on the way: the release's description is above it
    and the approver is a choice of the service's approvers, and of nobody else."""
    run_id = suspended[1]

    dialog = open_resume_dialog(ui_page, prefect_server.ui_url, str(run_id))
    assert dialog.get_by_role("heading", name="Approve robotics-api:1.4.2").is_visible()
    assert offered_choices(ui_page, dialog, "Decision") == ["approve", "reject"]
    assert offered_choices(ui_page, dialog, "Approver") == ["alice", "bob"]  # nobody else
    with pytest.raises(PrefectUIError, match="'mallory' is not a choice of the form"):
        fill_approval_form(ui_page, dialog, decision="reject", approver="mallory", comment="")
    fill_approval_form(
        ui_page, dialog, decision="reject", approver="alice", comment="digest differs from staging"
    )
    submit_resume(ui_page, dialog)

    state = _final_state(run_id)
    assert state.type == StateType.COMPLETED, state
    assert state.name == "Rejected"
    assert state.message == "rejected by alice: digest differs from staging"


def test_a_bad_decision_is_refused_before_a_browser_starts() -> None:
    with pytest.raises(InvalidInput, match="decision must be one of"):
        approve_in_ui(
            "http://127.0.0.1:9", str(UUID(int=0)), decision="maybe", approver="bob", comment=""
        )
