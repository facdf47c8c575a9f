"""Pure parts of the CI path: which events ship, the summary, Trivy JSON into findings."""

from __future__ import annotations

from core.catalog import parse_catalog
from core.errors import CheckFailed
from flows.ci import CIResult, StageTiming, render_summary, ships
from tasks.scan import (
    ScanReport,
    artifact_description,
    artifact_rows,
    parse_misconfigs,
    parse_secrets,
)

CATALOG = parse_catalog(
    """
defaults: {push_registry: r.example.com, pull_registry: r.example.com, manifests_repo: x}
services:
  api:
    repo: x
    github: a/b
    branch: main
    image: robotics/api
    environments: {}
    approvers: [alice]
""",
    env={},
)
SHA = "0123456789abcdef0123456789abcdef01234567"


def test_only_a_push_to_the_default_branch_of_the_own_repo_ships() -> None:
    svc = CATALOG.service("api")
    assert ships(svc, event="push", ref="refs/heads/main", fork=False)
    assert not ships(svc, event="push", ref="refs/heads/feature", fork=False)
    assert not ships(svc, event="pull_request", ref="refs/heads/main", fork=False)
    assert not ships(svc, event="pull_request", ref="refs/pull/7/head", fork=True)
    assert not ships(svc, event="push", ref="refs/heads/main", fork=True)


def test_the_summary_names_commit_stages_image_and_scan_counts() -> None:
    result = CIResult(
        service="api",
        sha=SHA,
        ref="refs/heads/main",
        event="push",
        image=f"r.example.com/robotics/api:20261127-0123456@sha256:{'a' * 64}",
        tag="20261127-0123456",
        digest=f"sha256:{'a' * 64}",
        built=True,
        pushed=True,
        scan_counts={"MEDIUM": 1},
        vuln_scanned=False,
        stages=[StageTiming(name="lint", seconds=1.25, outcome="passed")],
    )
    text = render_summary(result, subject="fix things")
    assert SHA in text and "fix things" in text and "built and pushed" in text
    assert f"sha256:{'a' * 64}" in text and "MEDIUM 1" in text
    assert "| lint | passed | 1.2 |" in text or "| lint | passed | 1.3 |" in text
    assert "vulnerability scanner did NOT run" in text
    failed = render_summary(
        result.model_copy(update={"image": None}), error=RuntimeError("boom\nmore")
    )
    assert "FAILED" in failed and "RuntimeError: boom" in failed and "more" not in failed
    lint = CheckFailed("lint", "sh scripts/lint.sh", 1, "lint: config/fail_rate must be an integer")
    failed_lint = render_summary(result.model_copy(update={"image": None}), error=lint)
    assert "CheckFailed: lint failed (exit code 1)" in failed_lint
    assert "```\nlint: config/fail_rate must be an integer\n```" in failed_lint


def test_trivy_json_becomes_findings_without_secret_values() -> None:
    secrets = {
        "Results": [
            {
                "Target": "/app/key.txt",
                "Secrets": [
                    {
                        "RuleID": "github-pat",
                        "Severity": "CRITICAL",
                        "Title": "GitHub Personal Access Token",
                        "StartLine": 3,
                        "Match": "token=ghp_****",
                        "Code": {"Lines": [{"Content": "token=ghp_real"}]},
                    }
                ],
            }
        ]
    }
    config = {
        "Results": [
            {
                "Target": "Dockerfile",
                "Misconfigurations": [
                    {
                        "ID": "DS-0031",
                        "Severity": "CRITICAL",
                        "Title": "Secrets in ENV",
                        "Status": "FAIL",
                        "Message": 'secret env "AWS_KEY"',
                    },
                    {"ID": "DS-0002", "Severity": "HIGH", "Title": "root user", "Status": "PASS"},
                ],
            }
        ]
    }
    findings = parse_secrets(secrets) + parse_misconfigs(config, "Dockerfile")
    assert [(f.scanner, f.id, f.severity) for f in findings] == [
        ("secret", "github-pat", "CRITICAL"),
        ("misconfig", "DS-0031", "CRITICAL"),
    ]
    assert "ghp_" not in str([f.model_dump() for f in findings])
    report = ScanReport(
        image="r.example.com/robotics/api:t",
        findings=findings,
        counts={"CRITICAL": 2},
        gate=["CRITICAL", "HIGH"],
        vuln_scanned=False,
        vuln_note="no vulnerability DB",
    )
    rows = artifact_rows(report)
    assert rows[0]["id"] == "NOT RUN" and "did NOT run" in rows[0]["title"]
    assert all(r["gate"] == "FAIL" for r in rows[1:])
    assert "Gate: FAILED" in artifact_description(report)
    assert "vulnerability scanner did NOT run" in artifact_description(report)
