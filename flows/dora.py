"""The ``dora-report`` flow: every week, the five DORA metrics as a markdown artifact.

    git history (manifests repo + source repos) → deployments → this week's metrics and the
    last eight weeks → one markdown artifact per service and one for all, each with a chart

Every number comes from git; Prefect only runs the flow and keeps the artifact.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger

from core.catalog import load_catalog
from core.dora import dora_report, render_text, weekly
from core.settings import get_settings
from tasks import report
from tasks.dora import release_history

WEEKS = 8


@flow(
    name="dora-report",
    description="Weekly DORA metrics (lead time, frequency, change fail rate, recovery time, "
    "rework rate) from the manifests repo's history, published as a markdown artifact.",
)
async def dora_report_flow(service: str | None = None, until: datetime | None = None) -> str:
    """Publish the week ending ``until`` (default: now) for ``service`` (default: each and all)."""
    log = get_run_logger()
    catalog = load_catalog(get_settings().catalog)
    end = until or datetime.now(UTC)
    history = await release_history(catalog, service)
    targets: list[str | None] = [service] if service else [*sorted(catalog.services), None]
    text = ""
    for target in targets:
        current = dora_report(
            history.deployments,
            history.changes,
            since=end - timedelta(days=7),
            until=end,
            service=target,
        )
        weeks = weekly(history.deployments, history.changes, until=end, weeks=WEEKS, service=target)
        report.publish_dora_report(f"dora-{target or 'all'}", current, weeks)
        text = render_text(current)
        log.info("%s", text)
    return text
