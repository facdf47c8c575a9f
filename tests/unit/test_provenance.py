"""Which images a release accepts (issue #24, item 1): the pure rule, then the registry side
over httpx.MockTransport (the real registry and the real ci run: tests/integration)."""

from __future__ import annotations

import pytest

from core.errors import InvalidInput
from core.provenance import CIRun, Provenance, judge

SHA = "a" * 40
DIGEST = "sha256:" + "1" * 64
IMAGE = f"127.0.0.1:5000/robotics-serving/api-gateway:20261207-aaaaaaa@{DIGEST}"


def _run(state: str = "COMPLETED", digest: str | None = DIGEST, event: str = "push") -> CIRun:
    return CIRun(
        flow_run_id="run-1",
        state=state,
        service="api-gateway",
        sha=SHA,
        event=event,
        digest=digest,
    )


def _judge(runs: list[CIRun], label: str = SHA, reason: str | None = None) -> Provenance:
    return judge(
        image=IMAGE,
        service="api-gateway",
        source_sha=SHA,
        digest=DIGEST,
        revision_label=label,
        ci_runs=runs,
        override_reason=reason,
    )


def test_a_digest_pushed_by_a_completed_ci_run_of_the_commit_is_accepted() -> None:
    verdict = _judge([_run("FAILED", None), _run()])
    assert verdict.accepted_by == "ci run run-1" and not verdict.overridden


@pytest.mark.parametrize(
    ("runs", "label", "needle"),
    [
        ([], SHA, "no ci run of the commit"),
        ([_run("RUNNING", None)], SHA, "run-1 (RUNNING, no digest)"),
        ([_run(digest="sha256:" + "2" * 64)], SHA, "no completed ci run of api-gateway pushed"),
        ([_run(event="pull_request")], SHA, "no completed ci run"),
        ([_run()], "b" * 40, "its revision label is " + "b" * 40),
        ([_run()], "", "its revision label is (none)"),
    ],
)
def test_anything_else_is_refused_naming_the_image(
    runs: list[CIRun], label: str, needle: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        _judge(runs, label)
    assert f"refusing to release {IMAGE}" in str(caught.value)
    assert needle in str(caught.value)
    assert "provenance_override_reason" in str(caught.value)


def test_an_operator_override_needs_a_reason_and_is_recorded() -> None:
    verdict = _judge([], reason="hotfix built on the release laptop, INC-88")
    assert verdict.overridden
    assert verdict.accepted_by.startswith("override: hotfix built on the release laptop")
    assert "no ci run of the commit" in verdict.accepted_by
    with pytest.raises(InvalidInput, match="too short"):
        _judge([], reason="because")
