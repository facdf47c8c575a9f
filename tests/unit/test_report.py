"""Release artifacts: keys, table rows, chart, record (pure parts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from core.analysis import IntervalVerdict, MetricVerdict, Verdict
from core.errors import InvalidInput
from core.record_text import approval_description, release_summary, render_release_record
from tasks.charts import canary_chart_png, png_markdown
from tasks.report import analysis_rows, artifact_key

END = datetime(2026, 11, 27, 12, 30, 5, tzinfo=UTC)
INTERVAL = IntervalVerdict(
    end=END,
    window_seconds=10,
    verdict=Verdict.FAIL,
    reason="error_ratio: canary 0.3 > max 0.05",
    metrics=[
        MetricVerdict(
            metric="error_ratio",
            verdict=Verdict.FAIL,
            canary=0.3,
            stable=0.0,
            threshold="<= 0.05, <= 2x stable",
            reason="canary 0.3 > max 0.05",
            p_value=1e-40,
        ),
        MetricVerdict(
            metric="cpu",
            verdict=Verdict.INCONCLUSIVE,
            canary=None,
            stable=0.2,
            threshold="<= 3x stable",
            reason="no data for the canary",
        ),
    ],
    canary_requests=300,
    stable_requests=900,
)


def test_artifact_keys_are_lowercase_digits_dashes():
    assert artifact_key("Release", "api_gateway", "Run 1F") == "release-api-gateway-run-1f"
    assert artifact_key("--a//b--") == "a-b"
    with pytest.raises(InvalidInput):
        artifact_key("///")


def test_analysis_rows_one_per_metric_and_interval():
    rows = analysis_rows([INTERVAL], weights=[25])
    assert rows[0] == {
        "interval end": "12:30:05",
        "weight": "25%",
        "metric": "error_ratio",
        "canary": "0.3",
        "stable": "0",
        "threshold": "<= 0.05, <= 2x stable",
        "verdict": "Fail",
        "p-value": "1e-40",
        "reason": "canary 0.3 > max 0.05",
    }
    assert rows[1]["canary"] == "no data" and rows[1]["verdict"] == "Inconclusive"


def test_weights_come_from_the_steps():
    steps = [(10, datetime(2026, 11, 27, 12, 29, tzinfo=UTC)), (50, END)]
    later = INTERVAL.model_copy(update={"end": datetime(2026, 11, 27, 12, 30, 20, tzinfo=UTC)})
    rows = analysis_rows([INTERVAL, Result(later)], steps=steps)
    assert [r["weight"] for r in rows] == ["10%", "10%", "50%", "50%"]


def test_chart_is_a_png_with_both_tracks():
    t0 = END.timestamp()
    series = {
        "canary": [(t0 + i, 0.3) for i in range(30)],
        "stable": [(t0 + i, 0.0) for i in range(30)],
    }
    p99 = {
        "canary": [(t0 + i, 0.32) for i in range(30)],
        "stable": [(t0 + i, 0.02) for i in range(30)],
    }
    png = canary_chart_png(series, p99, [(t0, 10), (t0 + 15, 50)], title="api-gateway canary")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert 5_000 < len(png) < 200_000
    assert png_markdown(png).startswith("![canary](data:image/png;base64,iVBORw0KGgo")


def test_chart_without_data_still_draws():
    assert canary_chart_png({}, {}, []).startswith(b"\x89PNG")


@dataclass
class Decision:
    approver: str
    comment: str

    def outcome(self) -> str:
        return f"approved by {self.approver}"


@dataclass
class Result:
    analysis: IntervalVerdict


@dataclass
class Record:
    """The shape of the release flow's record (core.release.ReleaseRecord)."""

    service: str = "api-gateway"
    flow_run_id: str = "0b5c1d9e-0000-4000-8000-000000000001"
    source_sha: str = "abc1234" + "0" * 33
    image: str = "127.0.0.1:5000/robotics-serving/api-gateway:20261127-abc1234@sha256:" + "d" * 64
    digest: str = "sha256:" + "d" * 64
    staging_commit: str = "1" * 40
    staging_revision: str = "1" * 40
    smoke: list = field(
        default_factory=lambda: [{"path": "/healthz", "status": 200, "latency_ms": 4.2}]
    )
    staging_metrics: IntervalVerdict | None = None
    decision: Decision | None = None
    production_commits: list = field(default_factory=lambda: ["2" * 40, "3" * 40, "3" * 40])
    production_revisions: list = field(default_factory=lambda: ["3" * 40])
    steps: list = field(default_factory=lambda: [(10, END)])
    analyses: list = field(default_factory=list)
    watch: list = field(default_factory=list)
    rollback_commit: str = ""
    rollback_verification: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    outcome: str = "in progress"


def test_release_record_links_the_whole_path():
    record = Record(
        decision=Decision("alice", "ship | it"),
        analyses=[Result(INTERVAL)],
        rollback_commit="4" * 40,
        outcome="rolled back: error ratio",
        notes=["2 failed intervals > failure limit 1"],
    )
    text = render_release_record(record, run_url="http://ui/runs/flow-run/1")
    order = [
        "Source commit | `abc123400000`",
        "Digest",
        "Staging manifest commit | `111111111111`",
        "Staging Argo CD revision",
        "Staging smoke | /healthz 200 (4 ms)",
        "Approval | approved by alice",
        "Comment | ship \\| it",
        "Production manifest commits | `222222222222`, `333333333333` |",
        "Production Argo CD revisions",
        "Canary steps | 10% at 12:30:05",
        "Rollback commit | `444444444444`",
        "Outcome | **rolled back: error ratio**",
        "Flow run | [0b5c1d9e",
        "## Canary analyses",
        "| 12:30:05 | Fail | 300 |",
        "## Notes",
    ]
    positions = [text.index(o) for o in order]
    assert positions == sorted(positions)


def test_summary_and_approval_description():
    record = Record(staging_metrics=INTERVAL, analyses=[INTERVAL])
    summary = release_summary(record)
    assert "**api-gateway**" in summary and "approval: pending" in summary
    assert "last analysis: Fail" in summary
    text = approval_description(record, "--- a/x\n+++ b/x\n-old\n+new\n")
    assert "Digest: `sha256:dddd" in text
    assert "| error_ratio | 0.3 | <= 0.05, <= 2x stable | Fail |" in text
    assert text.rstrip().endswith("+new\n```")


def test_the_post_release_watch_counts_the_stable_track():
    """The watch judges production's stable track: its rows say so and show that count."""
    from core.analysis import TrackObservation, judge_track
    from core.catalog import MetricRules

    watched = judge_track(
        TrackObservation(requests=412, errors=0),
        MetricRules(cpu=None, memory=None),
        min_requests=10,
        end=END,
        window_seconds=30,
    )
    assert (watched.stable_requests, watched.canary_requests) == (412, None)
    text = render_release_record(Record(analyses=[Result(INTERVAL)], watch=[Result(watched)]))
    watch = text[text.index("## Post-release watch") :]
    assert "| interval end | verdict | stable requests | reason |" in watch
    assert "| 12:30:05 | " in watch and " | 412 | " in watch
    canary = text[text.index("## Canary analyses") : text.index("## Post-release watch")]
    assert "canary requests" in canary and " | 300 | " in canary
