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


def _num(value: float | None) -> str:
    return "no data" if value is None else f"{value:.4g}"


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
        "canary": _num(m.canary),
        "stable": _num(m.stable),
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


class ReleaseLike(Protocol):
    """What the release record is rendered from (the release flow's record,
    ``core.release.ReleaseRecord``). Analyses may be verdicts or interval results; smoke
    results may be models or dicts."""

    @property
    def service(self) -> str: ...
    @property
    def flow_run_id(self) -> str: ...
    @property
    def source_sha(self) -> str: ...
    @property
    def image(self) -> str: ...
    @property
    def digest(self) -> str: ...
    @property
    def staging_commit(self) -> str: ...
    @property
    def staging_revision(self) -> str: ...
    @property
    def smoke(self) -> Sequence[Any]: ...
    @property
    def staging_metrics(self) -> Any: ...
    @property
    def decision(self) -> Any: ...
    @property
    def production_commits(self) -> Sequence[str]: ...
    @property
    def production_revisions(self) -> Sequence[str]: ...
    @property
    def steps(self) -> Sequence[tuple[int, datetime]]: ...
    @property
    def analyses(self) -> Sequence[Any]: ...
    @property
    def watch(self) -> Sequence[Any]: ...
    @property
    def rollback_commit(self) -> str: ...
    @property
    def rollback_verification(self) -> Sequence[Any]: ...
    @property
    def notes(self) -> Sequence[str]: ...
    @property
    def outcome(self) -> str: ...


def as_verdict(item: Any) -> IntervalVerdict:
    """An IntervalVerdict from a verdict or from anything carrying one as ``.analysis``."""
    verdict = getattr(item, "analysis", item)
    if not isinstance(verdict, IntervalVerdict):
        raise TypeError(f"not an interval verdict: {type(item).__name__}")
    return verdict


def _field(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


def _smoke_text(results: Sequence[Any]) -> str:
    parts = []
    for r in results:
        status, latency = _field(r, "status"), _field(r, "latency_ms")
        text = f"{_field(r, 'path')} {status or 'no answer'}"
        if latency is not None:
            text += f" ({latency:.0f} ms)"
        parts.append(text)
    return ", ".join(parts) or "not run"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _short(sha: str) -> str:
    return sha[:12] if re.fullmatch(r"[0-9a-f]{40}", sha or "") else (sha or "none")


def _shas(shas: Sequence[str]) -> str:
    return ", ".join(f"`{_short(s)}`" for s in dict.fromkeys(shas)) or "none"


def _decision_text(decision: Any) -> tuple[str, str]:
    if decision is None:
        return "pending", ""
    outcome = decision.outcome() if callable(getattr(decision, "outcome", None)) else decision
    return str(outcome), str(getattr(decision, "comment", "") or "")


def _approval_paths(decision: Any) -> str:
    """Each answer and the path it took (github / ui), and a break-glass if there was one."""
    paths = decision.paths() if callable(getattr(decision, "paths", None)) else []
    glass = getattr(decision, "break_glass", None)
    text = "; ".join(paths) or "none recorded"
    return f"{text}; **{glass.describe()}**" if glass is not None else text


def render_release_record(record: ReleaseLike, *, run_url: str | None = None) -> str:
    """The release record as markdown, in the order a release goes: source commit → image
    digest → staging and production manifest commits → Argo CD revisions → analyses →
    approver and comment → outcome."""
    approval, comment = _decision_text(record.decision)
    staging = record.staging_metrics
    rows = [
        ("Source commit", f"`{_short(record.source_sha)}`"),
        ("Image", f"`{record.image}`"),
        ("Digest", f"`{record.digest}`" if record.digest else "none"),
        (
            "Staging manifest commit",
            _shas([record.staging_commit] if record.staging_commit else []),
        ),
        (
            "Staging Argo CD revision",
            _shas([record.staging_revision] if record.staging_revision else []),
        ),
        ("Staging smoke", _smoke_text(record.smoke)),
        (
            "Staging metrics",
            f"{as_verdict(staging).verdict.label}: {as_verdict(staging).reason}"
            if staging
            else "not run",
        ),
        ("Approval", approval),
        ("Comment", comment or "none"),
        ("Approvals", _approval_paths(record.decision)),
        ("Production manifest commits", _shas(record.production_commits)),
        ("Production Argo CD revisions", _shas(record.production_revisions)),
        (
            "Canary steps",
            ", ".join(f"{w}% at {t.astimezone(UTC):%H:%M:%S}" for w, t in record.steps) or "none",
        ),
    ]
    if record.rollback_commit:
        rows.append(("Rollback commit", _shas([record.rollback_commit])))
        rows.append(("Rollback smoke", _smoke_text(record.rollback_verification)))
    rows.append(("Outcome", f"**{record.outcome}**"))
    url = run_url or flow_run_url(record.flow_run_id)
    if url:
        rows.append(("Flow run", f"[{record.flow_run_id}]({url})"))
    out = [f"# Release of {record.service}: {record.outcome}", "", "| | |", "|---|---|"]
    out += [f"| {name} | {_cell(value)} |" for name, value in rows]
    for title, items, track in (
        ("Canary analyses", record.analyses, "canary"),
        ("Post-release watch", record.watch, "stable"),
    ):
        if items:
            out += [
                "",
                f"## {title}",
                "",
                f"| interval end | verdict | {track} requests | reason |",
            ]
            out.append("|---|---|---|---|")
            for item in items:
                v = as_verdict(item)
                count = v.canary_requests if track == "canary" else v.stable_requests
                requests = "no data" if count is None else f"{count:.0f}"
                out.append(
                    f"| {v.end.astimezone(UTC):%H:%M:%S} | {v.verdict.label} | {requests} | "
                    f"{_cell(v.reason)} |"
                )
    measured = getattr(record, "measured", None) or []
    if measured:
        out += ["", "## Measured pods", "", "| window | pod | seen at | started | runs |"]
        out.append("|---|---|---|---|---|")
        for window in measured:
            span = f"{window.what} {window.start:%H:%M:%S}–{window.end:%H:%M:%S}"
            for pod in window.pods:
                digests = ", ".join(sorted(pod.digests)) or "no digest"
                judged = window.digest
                ours = (
                    digests
                    if judged is None
                    else "this digest"
                    if pod.runs(judged)
                    else f"**other**: {digests}"
                )
                started = f"{pod.started_at:%H:%M:%S}" if pod.started_at else "?"
                out.append(f"| {span} | {pod.name} | {pod.seen} | {started} | {ours} |")
    if record.notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in record.notes]
    return "\n".join(out) + "\n"


def release_summary(record: ReleaseLike) -> str:
    """A few markdown lines for chat: what, where it ended, why."""
    approval, _ = _decision_text(record.decision)
    lines = [
        f"**{record.service}** `{record.image.rsplit('/', 1)[-1]}`",
        f"source `{_short(record.source_sha)}` · approval: {approval}",
        f"outcome: **{record.outcome}**",
    ]
    if record.analyses:
        last = as_verdict(record.analyses[-1])
        lines.append(f"last analysis: {last.verdict.label} ({last.reason})")
    return "\n\n".join(lines)


def approval_description(record: ReleaseLike, diff: str) -> str:
    """The markdown above the approval form: what would go to production, and why it is
    believed good (staging results), with the production change as a diff."""
    staging = record.staging_metrics
    metrics_lines = []
    if staging is not None:
        for m in as_verdict(staging).metrics:
            metrics_lines.append(
                f"| {m.metric} | {_num(m.canary)} | {m.threshold} | {m.verdict.label} |"
            )
    parts = [
        f"## Release {record.service} to production",
        "",
        f"- Image: `{record.image}`",
        f"- Digest: `{record.digest}`",
        f"- Source commit: `{record.source_sha}`",
        f"- Staging: manifest commit `{_short(record.staging_commit)}`, Argo CD revision "
        f"`{_short(record.staging_revision)}`",
        f"- Smoke tests: {_smoke_text(record.smoke)}",
    ]
    if staging is not None:
        v = as_verdict(staging)
        parts += [
            f"- Staging metrics: **{v.verdict.label}** ({v.reason})",
            "",
            "| metric | staging | threshold | verdict |",
            "|---|---|---|---|",
            *metrics_lines,
        ]
    parts += ["", "### Production change", "", "```diff", diff.rstrip() or "(no change)", "```"]
    return "\n".join(parts) + "\n"


def publish_release_record(record: ReleaseLike, key: str | None = None) -> UUID:
    return _artifact(
        create_markdown_artifact,
        markdown=render_release_record(record),
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
                data=render_release_record(record),
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


def dora_chart_png(weeks: Sequence[Any], *, title: str = "DORA metrics by week") -> bytes:
    """Per week (``core.dora.DoraReport``s, oldest first): deployments (promoted and failed),
    change fail and rework rates, and the median change lead time."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = [f"{w.since:%m-%d}" for w in weeks]
    xs = list(range(len(weeks)))
    fig, (ax_n, ax_rate, ax_lead) = plt.subplots(3, 1, figsize=(8, 7), sharex=True, dpi=80)
    try:
        promoted = [w.promoted for w in weeks]
        ax_n.bar(xs, promoted, color="tab:green", label="promoted")
        ax_n.bar(xs, [w.failed for w in weeks], bottom=promoted, color="tab:red", label="failed")
        ax_n.set_ylabel("deployments")
        ax_n.legend(loc="upper left", fontsize=8)
        ax_n.set_title(title)
        for name, colour, values in (
            ("change fail rate", "tab:red", [w.change_fail_rate for w in weeks]),
            ("rework rate", "tab:orange", [w.rework_rate for w in weeks]),
        ):
            ax_rate.plot(
                xs,
                [float("nan") if v is None else v * 100 for v in values],
                marker="o",
                color=colour,
                label=name,
            )
        ax_rate.set_ylabel("% of deployments")
        ax_rate.set_ylim(0, 105)
        ax_rate.legend(loc="upper left", fontsize=8)
        leads = [w.lead_time.median_seconds for w in weeks]
        ax_lead.plot(
            xs,
            [float("nan") if v is None else v / 3600 for v in leads],
            marker="o",
            color="tab:blue",
        )
        ax_lead.set_ylabel("median lead time (h)")
        ax_lead.set_xticks(xs, labels)
        for ax in (ax_n, ax_rate, ax_lead):
            ax.grid(True, alpha=0.3)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
        return buffer.getvalue()
    finally:
        plt.close(fig)


def dora_markdown(current: Any, weeks: Sequence[Any], png: bytes) -> str:
    """The weekly artifact: this week's five metrics, a row per week, the chart."""
    from core.dora import format_rate, format_seconds

    who = current.service or "all services"
    lines = [
        f"# DORA metrics: {who}",
        "",
        f"Week {current.since:%Y-%m-%d %H:%M} .. {current.until:%Y-%m-%d %H:%M} UTC, read from "
        "the manifests repo's history (see docs/dora.md).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| deployment frequency | {current.deployments} ({current.deployments_per_day:.2f}/day) |",
        f"| change lead time | median {format_seconds(current.lead_time.median_seconds)}, "
        f"p90 {format_seconds(current.lead_time.p90_seconds)} ({current.lead_time.count} changes) |",
        f"| change fail rate | {format_rate(current.change_fail_rate)} "
        f"({current.failed} of {current.deployments}) |",
        f"| failed deployment recovery time | median "
        f"{format_seconds(current.recovery_time.median_seconds)} ({current.recovery_time.count}) |",
        f"| deployment rework rate | {format_rate(current.rework_rate)} "
        f"({current.rework} of {current.deployments}) |",
    ]
    if current.in_progress:
        lines.append(f"| in progress (not counted) | {_cell(', '.join(current.in_progress))} |")
    if current.awaiting_fix:
        lines.append(f"| rolled back, no fix yet | {_cell(', '.join(current.awaiting_fix))} |")
    lines += [
        "",
        "| week of | deployments | failed | rework | lead time (median) | recovery (median) |",
        "|---|---|---|---|---|---|",
    ]
    for w in weeks:
        lines.append(
            f"| {w.since:%Y-%m-%d} | {w.deployments} | {w.failed} | {w.rework} | "
            f"{format_seconds(w.lead_time.median_seconds)} | "
            f"{format_seconds(w.recovery_time.median_seconds)} |"
        )
    lines += ["", png_markdown(png, alt="dora"), ""]
    return "\n".join(lines)


def publish_dora_report(key: str, current: Any, weeks: Sequence[Any]) -> UUID:
    png = dora_chart_png(weeks)
    return _artifact(
        create_markdown_artifact,
        markdown=dora_markdown(current, weeks, png),
        key=artifact_key(key),
        description=f"DORA metrics, week ending {current.until:%Y-%m-%d}",
    )
