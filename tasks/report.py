"""What a person reads in the Prefect UI about a release: the progress artifact, the
analysis table, the canary chart (a PNG inside a markdown artifact), the release record,
and links to flow runs.

Artifact keys must be lowercase letters, digits and dashes (:func:`artifact_key` makes
them). The chart is drawn with matplotlib's Agg backend (no display) and embedded as
``![canary](data:image/png;base64,...)``, which the Prefect UI renders as a picture.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
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
from pydantic import BaseModel, ConfigDict, Field

from core.analysis import IntervalVerdict, MetricVerdict
from core.errors import InvalidInput

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


def canary_progress(weight: int, steps: Sequence[int], *, promoted: bool = False) -> float:
    """How far a canary is, in percent: the share of steps reached (100 once promoted)."""
    if promoted:
        return 100.0
    if not steps or weight <= 0:
        return 0.0
    reached = sum(1 for s in steps if s <= weight)
    # The last step (100 %) is only "done" at promotion.
    return round(100.0 * reached / (len(steps) + 1), 1)


# --- analysis table ------------------------------------------------------------------------


def _num(value: float | None) -> str:
    return "no data" if value is None else f"{value:.4g}"


def analysis_rows(
    intervals: Sequence[IntervalVerdict], weights: Sequence[int] | None = None
) -> list[dict[str, str]]:
    """One row per metric per interval: metric, canary, stable, threshold, verdict."""
    rows = []
    for i, interval in enumerate(intervals):
        weight = f"{weights[i]}%" if weights is not None and i < len(weights) else ""
        for m in interval.metrics:
            rows.append(_row(interval, m, weight))
    return rows


def _row(interval: IntervalVerdict, m: MetricVerdict, weight: str) -> dict[str, str]:
    return {
        "interval end": interval.end.astimezone(UTC).strftime("%H:%M:%S"),
        "weight": weight,
        "metric": m.metric,
        "canary": _num(m.canary),
        "stable": _num(m.stable),
        "threshold": m.threshold,
        "verdict": m.verdict.value,
        "p-value": "" if m.p_value is None else f"{m.p_value:.3g}",
        "reason": m.reason,
    }


def publish_analysis_table(
    key: str,
    intervals: Sequence[IntervalVerdict],
    weights: Sequence[int] | None = None,
    description: str = "Canary analysis: canary against stable, each interval",
) -> UUID:
    rows = analysis_rows(intervals, weights)
    return _artifact(
        create_table_artifact,
        table=rows,
        key=artifact_key(key),
        description=description,
    )


# --- the canary chart ----------------------------------------------------------------------

Points = Sequence[tuple[float, float]]


def canary_chart_png(
    error_ratio: Mapping[str, Points],
    p99_seconds: Mapping[str, Points],
    steps: Sequence[tuple[float, int]] = (),
    *,
    title: str = "canary vs stable",
) -> bytes:
    """Error ratio and P99 over time, canary vs stable, with the weight steps marked.

    Series are ``{"canary": [(unix_ts, value), ...], "stable": [...]}``; steps are
    ``(unix_ts, weight_percent)``.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display anywhere this runs
    from matplotlib import dates as mdates
    from matplotlib import pyplot as plt

    fig, (ax_err, ax_p99) = plt.subplots(2, 1, figsize=(8, 5), sharex=True, dpi=80)
    try:
        colours = {"canary": "tab:orange", "stable": "tab:blue"}
        for ax, series, label, scale in (
            (ax_err, error_ratio, "5xx ratio (%)", 100.0),
            (ax_p99, p99_seconds, "P99 latency (ms)", 1000.0),
        ):
            for track in ("stable", "canary"):
                points = series.get(track, [])
                if points:
                    xs = [datetime.fromtimestamp(t, UTC) for t, _ in points]
                    ys = [v * scale for _, v in points]
                    ax.plot(xs, ys, label=track, color=colours[track], linewidth=1.5)
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            for ts, weight in steps:
                at = datetime.fromtimestamp(ts, UTC)
                ax.axvline(at, color="grey", linestyle="--", linewidth=0.8)
                if ax is ax_err:
                    ax.annotate(
                        f"{weight}%",
                        xy=(mdates.date2num(at), 1.0),  # type: ignore[no-untyped-call]
                        xycoords=("data", "axes fraction"),
                        xytext=(2, -10),
                        textcoords="offset points",
                        fontsize=8,
                        color="grey",
                    )
        if ax_err.get_legend_handles_labels()[0]:
            ax_err.legend(loc="upper left", fontsize=8)
        ax_err.set_title(title)
        ax_p99.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]
        fig.autofmt_xdate()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
        return buffer.getvalue()
    finally:
        plt.close(fig)


def png_markdown(png: bytes, alt: str = "canary") -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f"![{alt}](data:image/png;base64,{encoded})"


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


# --- the release record --------------------------------------------------------------------


class SmokeLine(BaseModel):
    model_config = ConfigDict(frozen=True)
    path: str
    status: int | None
    latency_ms: float | None


class EnvironmentRecord(BaseModel):
    """What happened to one environment in a release."""

    model_config = ConfigDict(frozen=True)
    name: str
    manifest_commits: list[str] = Field(default_factory=list)
    argocd_app: str = ""
    argocd_revisions: list[str] = Field(default_factory=list)
    smoke: list[SmokeLine] = Field(default_factory=list)
    metrics_verdict: str = ""


class ReleaseRecord(BaseModel):
    """The audit trail of one release, source commit to outcome."""

    model_config = ConfigDict(frozen=True)
    service: str
    source_repo: str = ""
    source_commit: str
    image: str
    digest: str = ""
    flow_run_url: str | None = None
    environments: list[EnvironmentRecord] = Field(default_factory=list)
    analyses: list[IntervalVerdict] = Field(default_factory=list)
    approval: str = Field(default="", description="approved / rejected / timed out / pending")
    approver: str = ""
    comment: str = ""
    outcome: str = Field(default="", description="promoted / rolled back: <reason> / ...")
    reason: str = ""
    manifests_repo: str = ""
    links: dict[str, str] = Field(default_factory=dict)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _short(sha: str) -> str:
    return sha[:12] if re.fullmatch(r"[0-9a-f]{40}", sha) else sha


def render_release_record(record: ReleaseRecord) -> str:
    """The release record as markdown, in the order a person follows the release."""
    out = [f"# Release of {record.service}: {record.outcome or 'in progress'}", ""]
    if record.reason:
        out += [f"**Why:** {record.reason}", ""]
    out += ["| | |", "|---|---|"]
    source = f"`{_short(record.source_commit)}`"
    if record.source_repo:
        source += f" in {record.source_repo}"
    out.append(f"| Source commit | {_cell(source)} |")
    out.append(f"| Image | `{_cell(record.image)}` |")
    if record.digest:
        out.append(f"| Digest | `{record.digest}` |")
    for env in record.environments:
        commits = ", ".join(f"`{_short(c)}`" for c in env.manifest_commits) or "none"
        out.append(f"| {env.name} manifest commits | {commits} |")
        if env.argocd_app:
            revisions = ", ".join(f"`{_short(r)}`" for r in env.argocd_revisions) or "none"
            out.append(f"| {env.name} Argo CD ({env.argocd_app}) revisions | {revisions} |")
        if env.smoke:
            smoke = ", ".join(
                f"{s.path} {s.status or 'no answer'}"
                + (f" ({s.latency_ms:.0f} ms)" if s.latency_ms is not None else "")
                for s in env.smoke
            )
            out.append(f"| {env.name} smoke | {_cell(smoke)} |")
        if env.metrics_verdict:
            out.append(f"| {env.name} metrics | {_cell(env.metrics_verdict)} |")
    if record.approval:
        who = f" by {record.approver}" if record.approver else ""
        out.append(f"| Approval | {_cell(record.approval + who)} |")
    if record.comment:
        out.append(f"| Comment | {_cell(record.comment)} |")
    out.append(f"| Outcome | **{_cell(record.outcome or 'in progress')}** |")
    if record.flow_run_url:
        out.append(f"| Flow run | [{record.flow_run_url}]({record.flow_run_url}) |")
    for name, url in record.links.items():
        out.append(f"| {_cell(name)} | [{url}]({url}) |")
    if record.analyses:
        out += ["", "## Canary analyses", "", "| interval end | verdict | canary req | reason |"]
        out.append("|---|---|---|---|")
        for a in record.analyses:
            requests = "no data" if a.canary_requests is None else f"{a.canary_requests:.0f}"
            out.append(
                f"| {a.end.astimezone(UTC).strftime('%H:%M:%S')} | {a.verdict.value} | "
                f"{requests} | {_cell(a.reason)} |"
            )
    return "\n".join(out) + "\n"


def publish_release_record(record: ReleaseRecord, key: str | None = None) -> UUID:
    return _artifact(
        create_markdown_artifact,
        markdown=render_release_record(record),
        key=artifact_key(key or f"release-{record.service}"),
        description=f"Release record of {record.service}: {record.outcome or 'in progress'}",
    )


@task(name="release-record")
def release_record(record: ReleaseRecord, key: str | None = None) -> UUID:
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
