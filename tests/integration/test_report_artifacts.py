"""Release artifacts land in a real Prefect server, readable as the UI reads them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.objects import Artifact

from core.analysis import AnalysisRun, IntervalVerdict, MetricVerdict, Verdict
from core.catalog import CanaryPolicy
from tasks.report import (
    CanaryProgress,
    canary_chart,
    flow_run_url,
    publish_analysis_table,
    release_record,
    start_progress,
    update_progress,
)
from tests.unit.test_report import Record

pytestmark = pytest.mark.integration


def _created(artifact: Artifact) -> datetime:
    assert artifact.created is not None  # the server stamps every artifact it stores
    return artifact.created


async def _latest(key: str) -> Artifact:
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    return sorted(found, key=_created)[-1]


def latest(key: str) -> Artifact:
    return asyncio.run(_latest(key))


def test_artifacts_of_a_release(prefect_server) -> None:
    end = datetime.now(UTC)
    interval = IntervalVerdict(
        end=end,
        window_seconds=10,
        verdict=Verdict.PASS,
        reason="all metrics within bounds",
        metrics=[
            MetricVerdict(
                metric="error_ratio",
                verdict=Verdict.PASS,
                canary=0.0,
                stable=0.0,
                threshold="<= 0.05",
                reason="ok",
            )
        ],
        canary_requests=200,
        stable_requests=800,
    )
    t0 = end.timestamp() - 30

    @flow(name="report-artifacts-probe")
    def probe() -> tuple[str | None, str]:
        progress = start_progress("canary-api-gateway-probe", "canary at 10%", 10)
        update_progress(progress, 55, "canary at 50%")
        publish_analysis_table("analysis-api-gateway-probe", [interval], weights=[50])
        canary_chart(
            "chart-api-gateway-probe",
            {"canary": [(t0 + i, 0.01) for i in range(30)], "stable": [(t0, 0.0), (t0 + 29, 0.0)]},
            {"canary": [(t0 + i, 0.05) for i in range(30)], "stable": [(t0, 0.02)]},
            [(t0, 10), (t0 + 15, 50)],
        )
        from prefect.runtime import flow_run

        policy = CanaryPolicy(steps=[50, 100], analyses_per_step=2)
        canary = CanaryProgress.start(Record(service="probe-svc"), policy)
        run = AnalysisRun.start(policy)
        run.record(interval)
        canary.update(run)
        release_record(
            Record(flow_run_id=str(flow_run.id), analyses=[interval], outcome="promoted"),
            key="release-api-gateway-probe",
        )

        return flow_run_url(), str(flow_run.id)

    url, run_id = probe()
    assert url == f"{prefect_server.ui_url}/runs/flow-run/{run_id}"
    assert flow_run_url(run_id) == url

    progress = latest("canary-api-gateway-probe")
    assert progress.type == "progress" and progress.data == 55.0  # a JSON number
    table = latest("analysis-api-gateway-probe")
    assert table.type == "table" and "error_ratio" in str(table.data)
    chart = latest("chart-api-gateway-probe")
    assert chart.type == "markdown"
    assert "![canary](data:image/png;base64,iVBORw0KGgo" in str(chart.data)
    canary = latest("canary-probe-svc")
    assert canary.data == 25.0 and canary.description is not None
    assert "1/2 passing" in canary.description
    record = latest("release-api-gateway-probe")
    assert "# Release of api-gateway: promoted" in str(record.data)
    assert str(record.flow_run_id) == run_id
