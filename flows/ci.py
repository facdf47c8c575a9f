"""The ``ci`` flow: checkout → lint → unit → integration → build → scan → push.

Every event runs the checks; only a ``push`` to the service's default branch (never a
fork) goes on to build, scan and push. A rerun for the same commit finds the pushed image
by tag and revision label and builds and pushes nothing. A markdown artifact summarises
the run whether it passed or not.

This module only orders tasks; every outside system is reached in ``tasks/``.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from core.catalog import ScanPolicy, Service, load_catalog
from core.errors import InvalidInput
from core.images import validate_sha
from core.settings import get_settings
from flows.ship import ship_image
from tasks.checks import CheckLimits, run_check
from tasks.handoff import hand_off, with_ci_statuses
from tasks.source import Checkout, checkout, is_on_branch, redact_url, remove_checkout

Event = Literal["push", "pull_request"]
STAGES = ("lint", "unit", "integration")
_REF = re.compile(r"^refs/[A-Za-z0-9._/-]+$")


class StageTiming(BaseModel):
    name: str
    seconds: float
    outcome: Literal["passed", "failed", "skipped"]
    note: str = ""


class CIResult(BaseModel):
    """What the ci flow produced; ``image`` is set only when an image was shipped."""

    service: str
    sha: str
    ref: str
    event: Event
    image: str | None = Field(
        default=None, description="registry/repository:tag@sha256:... (push events only)."
    )
    tag: str | None = None
    digest: str | None = None
    built: bool = Field(default=False, description="This run built the image.")
    pushed: bool = Field(default=False, description="This run pushed the image.")
    reused: bool = Field(default=False, description="The image was already in the registry.")
    scan_counts: dict[str, int] = Field(default_factory=dict)
    vuln_scanned: bool | None = None
    stages: list[StageTiming] = Field(default_factory=list)


class _Clock:
    """Stage durations for the summary (wall time around each awaited task)."""

    def __init__(self) -> None:
        self.stages: list[StageTiming] = []

    @asynccontextmanager
    async def stage(self, name: str) -> AsyncIterator[None]:
        started = time.monotonic()
        try:
            yield
        except BaseException:
            self.stages.append(
                StageTiming(name=name, seconds=time.monotonic() - started, outcome="failed")
            )
            raise
        self.stages.append(
            StageTiming(name=name, seconds=time.monotonic() - started, outcome="passed")
        )

    def skip(self, name: str, note: str) -> None:
        self.stages.append(StageTiming(name=name, seconds=0.0, outcome="skipped", note=note))


def ships(service: Service, *, event: str, ref: str, fork: bool) -> bool:
    """Only a push to the default branch of the service's own repository builds and pushes."""
    return event == "push" and not fork and ref == f"refs/heads/{service.branch}"


async def refuse_unless_on_branch(service: Service, sha: str) -> None:
    """A push build ships only a commit of the catalog's release branch of the catalog's repo.

    ``event`` and ``fork`` are parameters: a run started by hand through the API could call
    a pull-request head a push. The repository, not the caller, says what is on the branch.
    """
    if not await is_on_branch(service.repo, sha, service.branch):
        raise InvalidInput(
            f"commit {sha} is not on branch {service.branch!r} of {redact_url(service.repo)}; "
            "a push build ships only commits of the catalog's release branch (check a "
            "pull-request head with event=pull_request)"
        )


def render_summary(
    result: CIResult, *, subject: str = "", error: BaseException | None = None
) -> str:
    lines = [
        f"# CI {result.service} `{result.sha[:7]}`",
        "",
        f"- commit: `{result.sha}` {subject}".rstrip(),
        f"- ref: `{result.ref}` ({result.event})",
        f"- outcome: **{'FAILED' if error else 'passed'}**",
    ]
    if error:
        lines.append(
            f"- error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        )
        tail = getattr(error, "tail", "")  # a failed check's last output lines
        if tail:
            lines += ["", "```", tail.replace("```", "` ` `"), "```"]
    if result.image:
        how = (
            "already in the registry: nothing built or pushed"
            if result.reused
            else "built and pushed"
        )
        lines += [f"- image: `{result.image}` ({how})", f"- digest: `{result.digest}`"]
    if result.scan_counts or result.vuln_scanned is not None:
        counts = (
            ", ".join(f"{k} {v}" for k, v in sorted(result.scan_counts.items())) or "no findings"
        )
        lines.append(f"- scan: {counts}")
        if result.vuln_scanned is False:
            lines.append(
                "- **the vulnerability scanner did NOT run** (no DB; allowed by the catalog)"
            )
    lines += ["", "| stage | outcome | seconds | note |", "|---|---|---:|---|"]
    lines += [f"| {s.name} | {s.outcome} | {s.seconds:.1f} | {s.note} |" for s in result.stages]
    return "\n".join(lines) + "\n"


def _validate(sha: str, ref: str) -> None:
    validate_sha(sha)
    if not _REF.match(ref) or ".." in ref:
        raise InvalidInput(
            f"invalid git ref {ref!r}: expected refs/heads/<branch> or refs/pull/<n>/head"
        )


async def _ship(
    service: Service,
    co: Checkout,
    *,
    registry: str,
    scan_policy: ScanPolicy,
    clock: _Clock,
    result: CIResult,
) -> CIResult:
    """build → scan → push, or nothing if the commit is already in the registry."""
    shipped = await ship_image(
        co,
        registry=registry,
        repository=service.image,
        github=service.github,
        build=service.build,
        scan_policy=scan_policy,
        stage=clock.stage,
    )
    found = {"image": shipped.ref, "tag": shipped.tag, "digest": shipped.digest}
    if shipped.reused:
        for stage in ("build", "scan", "push"):
            clock.skip(stage, "already pushed")
        return result.model_copy(update={**found, "reused": True})
    scan = shipped.scan
    scanned = {"scan_counts": scan.counts, "vuln_scanned": scan.vuln_scanned} if scan else {}
    return result.model_copy(update={**found, **scanned, "built": True, "pushed": True})


@flow(name="ci", flow_run_name="ci-{service}-{sha:.7}", persist_result=True)
async def ci(service: str, sha: str, ref: str, event: Event, fork: bool = False) -> CIResult:
    """Check a commit of a service; for a push to its default branch, ship its image.

    Args:
        service: the service's name in services.yaml.
        sha: the full commit id.
        ref: the git ref (``refs/heads/main``, ``refs/pull/7/head``).
        event: ``push`` or ``pull_request``.
        fork: the pull request comes from a fork (never builds or pushes).
    """
    logger = get_run_logger()
    _validate(sha, ref)
    catalog = load_catalog(get_settings().catalog)
    svc = catalog.service(service)
    clock = _Clock()
    result = CIResult(service=service, sha=sha, ref=ref, event=event)
    co: Checkout | None = None
    error: BaseException | None = None
    try:
        if ships(svc, event=event, ref=ref, fork=fork):
            async with clock.stage("branch"):
                await refuse_unless_on_branch(svc, sha)
        async with clock.stage("checkout"):
            co = await checkout(svc.repo, sha, label=service)
        for stage in STAGES:
            async with clock.stage(stage):
                await run_check(
                    stage,
                    getattr(svc.checks, stage),
                    co.path,
                    image=svc.checks.image,
                    network=svc.checks.network,
                    timeout=svc.checks.timeout,
                    limits=CheckLimits(
                        cpus=svc.checks.cpus,
                        memory_mb=svc.checks.memory_mb,
                        workspace_mb=svc.checks.workspace_mb,
                    ),
                )
        if ships(svc, event=event, ref=ref, fork=fork):
            result = await _ship(
                svc,
                co,
                registry=catalog.defaults.push_registry,
                scan_policy=catalog.scan_policy(service),
                clock=clock,
                result=result,
            )
        else:
            why = "fork" if fork else f"{event} on {ref}: checks only"
            logger.info("not shipping (%s)", why)
            for stage in ("build", "scan", "push"):
                clock.skip(stage, why)
    except BaseException as exc:
        error = exc
        raise
    finally:
        result = result.model_copy(update={"stages": clock.stages})
        await acreate_markdown_artifact(
            markdown=render_summary(result, subject=co.subject if co else "", error=error),
            key=f"ci-{service}",
            description=f"CI of {service} at {sha[:7]}",
        )
        if co is not None:
            await remove_checkout(co.path)
    if result.image and ships(svc, event=event, ref=ref, fork=fork):
        # A top-level release run (it suspends for approval); reported, never lost, if it
        # cannot start: the image is pushed and in this result.
        await hand_off(service=service, image=result.image, source_sha=sha, ci_run_id=flow_run.id)
    return result


# Commit statuses (robotics-cd/ci: pending → success/failure) with this run's URL.
ci = with_ci_statuses(ci)
