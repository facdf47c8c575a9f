"""Release artifacts: keys, table rows, chart, record (pure parts)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.analysis import IntervalVerdict, MetricVerdict, Verdict
from core.errors import InvalidInput
from tasks.report import (
    EnvironmentRecord,
    ReleaseRecord,
    SmokeLine,
    analysis_rows,
    artifact_key,
    canary_chart_png,
    canary_progress,
    png_markdown,
    render_release_record,
)

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


def test_canary_progress():
    assert canary_progress(0, [10, 25, 50, 100]) == 0
    assert canary_progress(25, [10, 25, 50, 100]) == 40
    assert canary_progress(100, [10, 25, 50, 100]) == 80
    assert canary_progress(100, [10, 25, 50, 100], promoted=True) == 100


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


def test_release_record_links_the_whole_path():
    record = ReleaseRecord(
        service="api-gateway",
        source_repo="robotics/robotics-api",
        source_commit="abc1234" + "0" * 33,
        image="127.0.0.1:5000/robotics-serving/api-gateway:20261127-abc1234",
        digest="sha256:" + "d" * 64,
        flow_run_url="http://127.0.0.1:4200/runs/flow-run/1",
        environments=[
            EnvironmentRecord(
                name="staging",
                manifest_commits=["1" * 40],
                argocd_app="api-gateway-staging",
                argocd_revisions=["1" * 40],
                smoke=[SmokeLine(path="/healthz", status=200, latency_ms=4.2)],
                metrics_verdict="Pass",
            ),
            EnvironmentRecord(
                name="production",
                manifest_commits=["2" * 40, "3" * 40],
                argocd_app="api-gateway-production",
                argocd_revisions=["3" * 40],
            ),
        ],
        analyses=[INTERVAL],
        approval="approved",
        approver="alice",
        comment="ship | it",
        outcome="rolled back: error ratio",
        reason="2 failed intervals > failure limit 1",
    )
    text = render_release_record(record)
    order = [
        "Source commit",
        "Digest",
        "staging manifest commits",
        "staging Argo CD",
        "production manifest commits",
        "Approval | approved by alice",
        "Comment | ship \\| it",
        "Outcome | **rolled back: error ratio**",
        "## Canary analyses",
    ]
    positions = [text.index(o) for o in order]
    assert positions == sorted(positions)
    assert "`abc123400000`" in text
    assert "`222222222222`, `333333333333`" in text
    assert "/healthz 200 (4 ms)" in text
    assert "| 12:30:05 | Fail | 300 |" in text
