"""Operator commands that skip the analysis say who and why, and a name that is not on the
service's approver allowlist is refused before anything is started or sent."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.app import app
from core.approval import check_operator
from core.errors import InvalidInput

ALLOWED = ["alice", "bob"]


def test_a_listed_name_and_a_reason_pass():
    action = check_operator(" alice ", " hotfix ", ALLOWED)
    assert (action.operator, action.reason) == ("alice", "hotfix")
    assert action.describe() == "alice: hotfix"


@pytest.mark.parametrize(
    ("operator", "reason", "message"),
    [
        (None, "why", "say who you are: --operator NAME"),
        ("", "why", "say who you are: --operator NAME"),
        ("mallory", "why", "operator 'mallory' is not on this service's approver allowlist"),
        ("system:timeout", "why", "is not on this service's approver allowlist"),
        ("alice", None, "a reason is required: --reason TEXT"),
        ("alice", "   ", "a reason is required: --reason TEXT"),
    ],
)
def test_refused_inputs(operator, reason, message):
    with pytest.raises(InvalidInput, match=message):
        check_operator(operator, reason, ALLOWED)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--operator", "mallory", "--reason", "x"], "not on this service's approver allowlist"),
        (["--operator", "alice"], "a reason is required"),
        (["--reason", "x"], "say who you are"),
    ],
)
def test_manual_rollback_is_refused_before_a_run_starts(args, message, monkeypatch):
    """No Prefect server is reachable here: a refusal that came after the run was started
    would fail differently (and exit 1)."""
    monkeypatch.delenv("ROBOTICS_CD_OPERATOR", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    result = CliRunner().invoke(app, ["rollback", "api-gateway", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.fixture
def shipped_catalog(monkeypatch):

    monkeypatch.delenv("ROBOTICS_CD_CATALOG", raising=False)
    yield


@pytest.mark.usefixtures("shipped_catalog")
def test_who_may_approve_a_release_and_a_release_train():
    """``robotics-cd approve`` takes a train run too: its one form offers every approver of
    its services (a bundle-file train's services are in git: the server checks the name)."""
    from cli.release import approvers_of

    assert approvers_of({"service": "api-gateway", "image": "x"}) == ["alice", "bob"]
    train = {"services": {"api-gateway": "gw", "fleet-planner": "fp"}, "reason": "r"}
    assert approvers_of(train) == ["alice", "bob", "carol", "dave"]
    assert approvers_of({"bundle_file": "bundles/b.yaml", "services": None}) is None
