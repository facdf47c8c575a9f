"""``robotics-cd dora`` and the weekly ``dora-report`` flow over a synthetic release history
(real git repos, see tests/unit/test_dora.py), the flow against a real Prefect server."""

from __future__ import annotations

import json
from datetime import datetime

import anyio
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.objects import Artifact
from typer.testing import CliRunner

from cli.app import app
from tests.unit.test_dora import UNTIL, build_history

pytestmark = pytest.mark.integration


@pytest.fixture
def repos(tmp_path, monkeypatch):

    build_history(tmp_path)
    monkeypatch.setenv("ROBOTICS_CD_GIT_BASE", f"file://{tmp_path}")
    monkeypatch.setenv("ROBOTICS_CD_WORKSPACE", str(tmp_path / "work"))
    monkeypatch.delenv("ROBOTICS_CD_CATALOG", raising=False)
    yield tmp_path


def test_the_cli_prints_the_window_metrics(repos):
    args = ["dora", "--service", "api-gateway", "--since", "2026-11-10", "--until", "2026-11-17"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["deployments"], report["failed"], report["rework"]) == (4, 2, 1)
    assert report["change_fail_rate"] == 0.5 and report["rework_rate"] == 0.25
    assert report["lead_time"]["median_seconds"] == 136800
    assert report["recovery_time"]["median_seconds"] == 2700
    assert report["in_progress"] == ["r6"] and report["awaiting_fix"] == ["r5"]

    text = CliRunner().invoke(app, args)
    assert text.exit_code == 0, text.output
    assert "change fail rate                 50% (2 of 4)" in text.output
    assert "change lead time                 median 1d14h" in text.output
    assert "deployment rework rate           25% (1 of 4)" in text.output


def test_a_since_after_until_is_refused(repos):
    result = CliRunner().invoke(app, ["dora", "--since", "2026-12-01", "--until", "2026-11-01"])
    assert result.exit_code != 0 and "is not before" in result.output


def test_the_weekly_flow_publishes_a_markdown_artifact_with_a_chart(prefect_server, repos):
    from flows.dora import dora_report_flow

    text = anyio.run(lambda: dora_report_flow("api-gateway", UNTIL))
    assert "(2 promoted, 2 failed)" in text  # the week 11-10 .. 11-17

    def created(artifact: Artifact) -> datetime:
        assert artifact.created is not None  # the server stamps every artifact it stores
        return artifact.created

    async def latest() -> str:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dora-api-gateway"]))
            )
        return str(sorted(found, key=created)[-1].data)

    markdown = anyio.run(latest)
    assert "| change fail rate | 50% (2 of 4) |" in markdown
    assert "| 2026-11-10 | 4 | 2 | 1 |" in markdown  # the last of the eight weekly rows
    assert "![dora](data:image/png;base64," in markdown
