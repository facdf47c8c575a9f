"""The release record and the approval form's text, as markdown: pure rendering of a
release's record (no Prefect, no I/O), so every line of it can be tested alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from core.analysis import IntervalVerdict


def fmt_num(value: float | None) -> str:
    return "no data" if value is None else f"{value:.4g}"


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


def md_cell(text: object) -> str:
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
    if run_url:
        rows.append(("Flow run", f"[{record.flow_run_id}]({run_url})"))
    out = [f"# Release of {record.service}: {record.outcome}", "", "| | |", "|---|---|"]
    out += [f"| {name} | {md_cell(value)} |" for name, value in rows]
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
                    f"{md_cell(v.reason)} |"
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
                f"| {m.metric} | {fmt_num(m.canary)} | {m.threshold} | {m.verdict.label} |"
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
