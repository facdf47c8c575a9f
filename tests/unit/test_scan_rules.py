"""Which findings may be ignored: the catalog's allowlist, not the commit (issue #24, item 8)."""

from __future__ import annotations

from datetime import date

import pytest

from core.catalog import ScanIgnore, ScanPolicy, parse_catalog
from core.errors import CatalogError
from core.scanning import parse_trivyignore, rule
from tasks.scan import Finding, ScanReport, apply_ignores, artifact_rows

TODAY = date(2026, 12, 7)
ALLOW = [
    ScanIgnore(id="CVE-2026-1", reason="no fix upstream; not reachable", expires=date(2027, 1, 31)),
    ScanIgnore(id="CVE-2026-2", reason="was accepted for the Q3 freeze", expires=date(2026, 12, 6)),
]


def _ruling(finding_id: str, severity: str, listed: set[str] | None = None) -> str:
    return rule(
        finding_id, severity, allowlist=ALLOW, trivyignore=listed or set(), today=TODAY
    ).disposition


def test_the_catalog_allowlist_ignores_any_severity_until_it_expires() -> None:
    assert _ruling("CVE-2026-1", "CRITICAL") == "allowlisted"
    assert _ruling("CVE-2026-2", "CRITICAL") == "gate"  # expired yesterday
    ruling = rule("CVE-2026-2", "HIGH", allowlist=ALLOW, trivyignore=set(), today=TODAY)
    assert ruling.counts and "expired on 2026-12-06" in ruling.note


def test_the_commits_trivyignore_is_reported_but_not_honoured_for_critical() -> None:
    listed = {"CVE-2026-9", "DS-0031"}
    assert _ruling("CVE-2026-9", "HIGH", listed) == "trivyignore"
    critical = rule("DS-0031", "CRITICAL", allowlist=ALLOW, trivyignore=listed, today=TODAY)
    assert critical.disposition == "trivyignore-not-honoured" and critical.counts
    assert "not honoured for CRITICAL" in critical.note and "scan.ignore" in critical.note


def test_trivyignore_parsing_drops_comments_and_expired_lines() -> None:
    text = "# accepted\nCVE-1\nCVE-2 exp:2026-01-01\nCVE-3 exp:2027-01-01  # later\n\n"
    assert parse_trivyignore(text, TODAY) == {"CVE-1", "CVE-3"}


def test_apply_ignores_feeds_the_gate_and_the_artifact() -> None:
    findings = [
        Finding(scanner="misconfig", id="DS-0031", severity="CRITICAL", title="secret", target="D"),
        Finding(scanner="vuln", id="CVE-2026-1", severity="CRITICAL", title="x", target="os"),
        Finding(scanner="vuln", id="CVE-2026-9", severity="HIGH", title="y", target="os"),
    ]
    policy = ScanPolicy(ignore=ALLOW)
    ruled = apply_ignores(findings, policy, "DS-0031\nCVE-2026-9\n", TODAY)
    report = ScanReport(image="r/x:1", findings=ruled, gate=["CRITICAL", "HIGH"])
    assert [f.id for f in report.blocking] == ["DS-0031"]
    gate = {row["id"]: row["gate"] for row in artifact_rows(report)}
    assert gate["DS-0031"].startswith("FAIL (listed in the commit's .trivyignore")
    assert gate["CVE-2026-1"].startswith("ignored: catalog: no fix upstream")
    assert gate["CVE-2026-9"] == "ignored: ignored by the commit's .trivyignore"


CATALOG = """
defaults:
  push_registry: 127.0.0.1:5000
  pull_registry: 127.0.0.1:5000
  manifests_repo: /tmp/m
  scan:
    ignore:
%s
"""


def test_an_allowlist_entry_needs_a_reason_and_an_expiry_date() -> None:
    good = "      - {id: CVE-2026-1, reason: no fix upstream yet, expires: 2027-01-31}"
    policy = parse_catalog(CATALOG % good).defaults.scan
    assert policy.ignore[0].expires == date(2027, 1, 31)
    for entry, needle in (
        ("      - {id: CVE-2026-1, reason: no fix upstream yet}", "expires"),
        ("      - {id: CVE-2026-1, expires: 2027-01-31}", "reason"),
        ("      - {id: CVE-2026-1, reason: ok, expires: 2027-01-31}", "reason"),
        ("      - {id: CVE-2026-1, reason: no fix upstream yet, expires: soon}", "expires"),
    ):
        with pytest.raises(CatalogError, match=needle):
            parse_catalog(CATALOG % entry)
