"""The pictures a person sees in the Prefect UI: the canary chart (error ratio and P99,
canary vs stable, the weight steps marked) and the weekly DORA chart, drawn with
matplotlib's Agg backend (no display) and embedded in markdown as
``![canary](data:image/png;base64,...)``, which the Prefect UI renders as a picture.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from core.record_text import md_cell

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
        lines.append(f"| in progress (not counted) | {md_cell(', '.join(current.in_progress))} |")
    if current.awaiting_fix:
        lines.append(f"| rolled back, no fix yet | {md_cell(', '.join(current.awaiting_fix))} |")
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
