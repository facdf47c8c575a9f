"""What a person reads in the Prefect UI about a release: the progress artifact, the
analysis table, the canary chart (a PNG inside a markdown artifact), the release record,
and links to flow runs.

Artifact keys must be lowercase letters, digits and dashes (:func:`artifact_key` makes
them). The chart is drawn with matplotlib's Agg backend (no display) and embedded as
``![canary](data:image/png;base64,...)``, which the Prefect UI renders as a picture.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext
from prefect.utilities.urls import url_for

from core.analysis import AnalysisRun, Decision, IntervalVerdict, MetricVerdict
from core.errors import InvalidInput
from core.record_text import ReleaseLike, as_verdict, fmt_num, render_release_record
from tasks.charts import Points, canary_chart_png, dora_chart_png, dora_markdown, png_markdown

_KEY_BAD = re.compile(r"[^a-z0-9-]+")


def _artifact(create: Callable[..., Any], **kwargs: Any) -> UUID:
    # Prefect's artifact functions dispatch to a coroutine inside an event loop; a release
    # may be an async flow, so ask for the synchronous variant explicitly.
    artifact_id = create(**kwargs, _sync=True)
    if not isinstance(artifact_id, UUID):
        raise TypeError(f"{create.__name__} returned {type(artifact_id).__name__}, not a UUID")
    return artifact_id


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from free text: lowercase, digits, single dashes."""
    key = _KEY_BAD.sub("-", "-".join(parts).lower()).strip("-")
    key = re.sub(r"-{2,}", "-", key)
    if not key:
        raise InvalidInput(f"cannot make an artifact key from {parts!r}")
    return key[:200]


def flow_run_url(flow_run_id: str | UUID | None = None) -> str | None:
    """The Prefect UI page of a flow run (the current one by default), from PREFECT_UI_URL
    (or the API URL it derives from). None when no UI URL is known."""
    if flow_run_id is None:
        context = FlowRunContext.get()
        if context is None or context.flow_run is None:
            return None
        flow_run_id = context.flow_run.id
    return url_for("flow-run", obj_id=flow_run_id)


# --- progress ------------------------------------------------------------------------------


def start_progress(key: str, description: str, percent: float = 0.0) -> UUID:
    return _artifact(
        create_progress_artifact,
        progress=_clamp(percent),
        key=artifact_key(key),
        description=description,
    )


def update_progress(artifact_id: UUID, percent: float, description: str | None = None) -> UUID:
    return _artifact(
        update_progress_artifact,
        artifact_id=artifact_id,
        progress=_clamp(percent),
        description=description,
    )


def _clamp(percent: float) -> float:
    return max(0.0, min(100.0, float(percent)))


# --- analysis table ------------------------------------------------------------------------


def weights_at(intervals: Sequence[Any], steps: Sequence[tuple[int, datetime]]) -> list[int | None]:
    """The canary weight in force at each interval's start (from the steps' commit times)."""
    out: list[int | None] = []
    for item in intervals:
        v = as_verdict(item)
        start = v.end.timestamp() - v.window_seconds
        current = None
        for weight, at in steps:
            if at.timestamp() <= start + 1.0:  # a step committed just before counts
                current = weight
        out.append(current)
    return out


def analysis_rows(
    intervals: Sequence[Any],
    weights: Sequence[int | None] | None = None,
    *,
    steps: Sequence[tuple[int, datetime]] | None = None,
) -> list[dict[str, str]]:
    """One row per metric per interval: metric, canary, stable, threshold, verdict.

    ``intervals`` are IntervalVerdicts or anything carrying one as ``.analysis``; the weight
    column comes from ``weights`` or is derived from the canary ``steps``.
    """
    if weights is None and steps is not None:
        weights = weights_at(intervals, steps)
    rows = []
    for i, item in enumerate(intervals):
        interval = as_verdict(item)
        w = weights[i] if weights is not None and i < len(weights) else None
        weight = "" if w is None else f"{w}%"
        for m in interval.metrics:
            rows.append(_row(interval, m, weight))
    return rows


def _row(interval: IntervalVerdict, m: MetricVerdict, weight: str) -> dict[str, str]:
    return {
        "interval end": interval.end.astimezone(UTC).strftime("%H:%M:%S"),
        "weight": weight,
        "metric": m.metric,
        "canary": fmt_num(m.canary),
        "stable": fmt_num(m.stable),
        "threshold": m.threshold,
        "verdict": m.verdict.label,
        "p-value": "" if m.p_value is None else f"{m.p_value:.3g}",
        "reason": m.reason,
    }


def publish_analysis_table(
    key: str,
    intervals: Sequence[Any],
    weights: Sequence[int | None] | None = None,
    description: str = "Canary analysis: canary against stable, each interval",
    *,
    steps: Sequence[tuple[int, datetime]] | None = None,
) -> UUID:
    rows = analysis_rows(intervals, weights, steps=steps)
    return _artifact(
        create_table_artifact,
        table=rows,
        key=artifact_key(key),
        description=description,
    )


def chart_steps(steps: Sequence[tuple[int, datetime]]) -> list[tuple[float, int]]:
    """The release record's ``(weight, time)`` steps as the chart's ``(unix_ts, weight)``."""
    return [(at.timestamp(), weight) for weight, at in steps]


def publish_canary_chart(
    key: str,
    error_ratio: Mapping[str, Points],
    p99_seconds: Mapping[str, Points],
    steps: Sequence[tuple[float, int]] = (),
    *,
    title: str = "canary vs stable",
    caption: str = "",
) -> UUID:
    png = canary_chart_png(error_ratio, p99_seconds, steps, title=title)
    markdown = f"## {title}\n\n{png_markdown(png)}\n"
    if caption:
        markdown += f"\n{caption}\n"
    return _artifact(
        create_markdown_artifact,
        markdown=markdown,
        key=artifact_key(key),
        description=title,
    )


def publish_release_record(record: ReleaseLike, key: str | None = None) -> UUID:
    return _artifact(
        create_markdown_artifact,
        markdown=render_release_record(record, run_url=flow_run_url(record.flow_run_id)),
        key=artifact_key(key or f"release-{record.service}"),
        description=f"Release record of {record.service}: {record.outcome}",
    )


async def publish_release_record_of(record: ReleaseLike, flow_run_id: str) -> None:
    """The release record of *another* run (one ended through the API), attached to it."""
    from prefect import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    async with get_client() as client:
        await client.create_artifact(
            ArtifactCreate(
                key=artifact_key(f"release-{record.service}"),
                type="markdown",
                data=render_release_record(record, run_url=flow_run_url(flow_run_id)),
                description=f"Release record of {record.service}: {record.outcome}",
                flow_run_id=UUID(flow_run_id),
            )
        )


def publish_markdown(key: str, markdown: str, description: str) -> UUID:
    """A markdown artifact (e.g. a release train's record)."""
    return _artifact(
        create_markdown_artifact, markdown=markdown, key=artifact_key(key), description=description
    )


@task(name="release-record")
def release_record(record: Any, key: str | None = None) -> UUID:
    """Publish the release record as a markdown artifact (a task, so it shows in the UI)."""
    return publish_release_record(record, key)


@task(name="canary-chart")
def canary_chart(
    key: str,
    error_ratio: dict[str, list[tuple[float, float]]],
    p99_seconds: dict[str, list[tuple[float, float]]],
    steps: list[tuple[float, int]],
    title: str = "canary vs stable",
) -> UUID:
    return publish_canary_chart(key, error_ratio, p99_seconds, steps, title=title)


# --- the canary's progress artifact --------------------------------------------------------


class _Named(Protocol):
    @property
    def service(self) -> str: ...


class CanaryProgress:
    """The progress artifact of one canary: moves with the steps and passing intervals."""

    def __init__(self, artifact_id: UUID, steps: Sequence[int], analyses_per_step: int) -> None:
        self.artifact_id = artifact_id
        self.steps = list(steps)
        self.analyses_per_step = analyses_per_step

    @classmethod
    def start(cls, plan: _Named, policy: Any) -> CanaryProgress:
        steps = list(policy.steps)
        artifact_id = start_progress(
            f"canary-{plan.service}", f"{plan.service}: canary at {steps[0]}%", 0.0
        )
        return cls(artifact_id, steps, int(policy.analyses_per_step))

    def percent(self, run: AnalysisRun) -> float:
        if run.decision == Decision.PROMOTE:
            return 100.0
        total = len(self.steps) * self.analyses_per_step
        done = run.step_index * self.analyses_per_step + run.passes_in_step
        return round(100.0 * done / total, 1) if total else 0.0

    def update(self, run: AnalysisRun) -> None:
        description = (
            f"canary at {run.weight}%: {run.passes_in_step}/{self.analyses_per_step} passing "
            f"intervals, {run.failures} failed, {run.inconclusives} inconclusive"
        )
        if run.decision == Decision.ROLLBACK:
            description = f"rolling back at {run.weight}%: {run.reason}"
        update_progress(self.artifact_id, self.percent(run), description)


# --- the weekly DORA report ----------------------------------------------------------------


def publish_dora_report(key: str, current: Any, weeks: Sequence[Any]) -> UUID:
    png = dora_chart_png(weeks)
    return _artifact(
        create_markdown_artifact,
        markdown=dora_markdown(current, weeks, png),
        key=artifact_key(key),
        description=f"DORA metrics, week ending {current.until:%Y-%m-%d}",
    )
