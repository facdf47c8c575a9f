"""The train flow's pure reports: the kept node-0 log and what a cancelled run had done."""

from __future__ import annotations

from core.training import PYTORCHJOB, TRAINJOB, TrainParams
from flows.training import JobTarget, cancel_report, log_markdown

LINES = [
    "vision-train: rank=0 world_size=3 master=tj-node-0-0.tj:29500",
    "epoch 1/3 step 1/2 rank=0",
    "epoch 1/3 step 2/2 rank=0",
    "epoch 1/3 loss=0.5000 rank=0 world_size=3",
    "checkpoint saved to /checkpoints/x/epoch-1.ckpt",
    "epoch 2/3 step 1/2 rank=0",
    "a line with ``` fences",
]


def target(kind=TRAINJOB) -> JobTarget:
    return JobTarget("x-0f1e2d3c", "training", "trainjob", kind, "torch-distributed")


def test_log_artifact_holds_every_line_in_one_code_block():
    text = log_markdown(target(), LINES, "The run was cancelled.")
    assert text.startswith("# TrainJob training/x-0f1e2d3c: node 0 log")
    assert "The run was cancelled." in text
    assert text.count("```\n") == 2  # a fence inside a line cannot close the block
    for line in LINES[:-1]:
        assert line in text
    assert "master log" in log_markdown(target(PYTORCHJOB), [])
    assert "(no log lines)" in log_markdown(target(PYTORCHJOB), [])


def test_cancel_report_says_what_ran():
    job = {
        "kind": "TrainJob",
        "status": {"jobsStatus": [{"name": "node", "active": 1}]},
        "metadata": {},
    }
    report = cancel_report(target(), TrainParams(experiment="x"), job, LINES, True)
    assert "| TrainJob | `training/x-0f1e2d3c` |" in report
    assert "| phase when cancelled | Running |" in report
    assert "epoch 2/3, step 1/2" in report
    assert "| last checkpoint | `/checkpoints/x/epoch-1.ckpt` |" in report
    assert "deleted, with its pods" in report
    nothing = cancel_report(target(), TrainParams(experiment="x"), None, [], False)
    assert (
        "not submitted" in nothing
        and "was not there" in nothing
        and "| last checkpoint | none |" in nothing
    )
