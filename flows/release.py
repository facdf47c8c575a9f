"""The ``release`` flow: a pushed image to production, or back.

    staging:   commit overlay → Argo CD sync → wait synced at our commit → smoke → metrics
    approval:  notify → suspend with the approval form (no process held) → decision
    production (under the service's lease):
               superseded? → canary commit → sync → analyse each interval → next weight …
               → promote commit → sync → post-release watch
    on any failure after production changed: one restoring commit → sync → verify

A resumed run re-executes from the top; every task before the approval comes back
``Cached`` (persisted results, run-scoped cache) and every commit is checked against the
repo's state, so nothing is repeated.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from prefect import flow, get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.context import TaskRunContext
from prefect.flow_runs import suspend_flow_run
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from core.analysis import AnalysisRun, Decision, TrackObservation, Verdict
from core.approval import ApprovalDecision
from core.catalog import CanaryPolicy, Catalog, Service, load_catalog
from core.errors import (
    ApprovalRejected,
    CanaryFailed,
    InvalidInput,
    LeaseHeld,
    RoboticsCDError,
    Superseded,
    VerificationFailed,
)
from core.images import parse_reference, validate_sha
from core.release import ReleasePlan, ReleaseRecord, StepOutcome
from core.settings import get_settings
from tasks import argocd, gitops, lifecycle, metrics, notify, report, smoke, source
from tasks import github as gh
from tasks.approvals import approval_form, expire_overdue, pending_commands, to_decision
from tasks.lifecycle import emit_release_event, start_rollback_for

LOCK_WAIT = timedelta(hours=6)
LOCK_POLL_SECONDS = 5.0


def plan_release(catalog: Catalog, service: str, image: str, source_sha: str) -> ReleasePlan:
    """Check the parameters before any side effect."""
    svc = catalog.service(service)
    ref = parse_reference(image)
    if not ref.tag or not ref.digest:
        raise InvalidInput(f"image {image!r} must carry a tag and a digest (name:tag@sha256:...)")
    if ref.repository != svc.image:
        raise InvalidInput(f"image {ref.repository!r} is not {service}'s repository {svc.image!r}")
    validate_sha(source_sha)
    for env in ("staging", "production"):
        if env not in svc.environments:
            raise InvalidInput(f"service {service!r} has no {env} environment in the catalog")
    pull = ref.with_registry(catalog.defaults.pull_registry)
    return ReleasePlan(
        service=service,
        image=str(ref),
        pull_image=str(pull),
        tag=ref.tag,
        digest=ref.digest,
        source_sha=source_sha,
        github=svc.github,
    )


# --- staging ------------------------------------------------------------------------------


def once_per_run(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of a task whose inputs hold the clock (a window ending 'now + interval'): a
    resumed run gets the first answer instead of measuring again."""
    return f"{context.task.name}-{context.task_run.flow_run_id}"


async def deploy_staging(
    plan: ReleasePlan, svc: Service, policy: CanaryPolicy, record: ReleaseRecord
) -> None:
    target = svc.environments["staging"]
    run_url = report.flow_run_url(flow_run.id)
    deployment_id = gh.create_deployment(
        plan.github,
        plan.source_sha,
        "staging",
        f"{plan.service}:{plan.tag}",
        payload={"flow_run_id": str(flow_run.id), "image": plan.image},
    )
    gh.set_deployment_status(
        plan.github,
        deployment_id,
        "in_progress",
        log_url=run_url,
        environment_url=target.base_url,
        description="deploying",
    )
    commit = gitops.bump_image("staging", plan.service, plan.pull_image, source_sha=plan.source_sha)
    record.staging_commit = commit.sha
    synced = await sync_and_wait(target.argocd_app, commit.sha, automated=True)
    record.staging_revision = synced.revision
    try:
        record.smoke = [r.model_dump() for r in smoke.smoke_test(target, svc.smoke)]
        # One canary interval of traffic on the new pods only: the window starts now.
        window = policy.interval.total_seconds()
        check = metrics.staging_check.with_options(cache_key_fn=once_per_run)(
            plan.service,
            target.namespace,
            svc.metrics,
            min_requests=1,
            end_time=datetime.now(UTC) + policy.interval,
            window_seconds=window,
            track="stable",
        )
        record.staging_metrics = check.analysis
        if check.verdict == Verdict.FAIL:
            raise VerificationFailed(f"staging metrics: {check.analysis.reason}")
    except RoboticsCDError as exc:
        gh.set_deployment_status(
            plan.github, deployment_id, "failure", log_url=run_url, description=str(exc)[:140]
        )
        raise
    gh.set_deployment_status(
        plan.github,
        deployment_id,
        "success",
        log_url=run_url,
        environment_url=target.base_url,
        description="verified",
    )


# --- approval -----------------------------------------------------------------------------


async def await_approval(
    plan: ReleasePlan, svc: Service, record: ReleaseRecord
) -> ApprovalDecision:
    run_url = report.flow_run_url(flow_run.id)
    diff = gitops.preview_production_change.with_options(cache_policy=NO_CACHE)(
        plan.service, plan.pull_image
    )
    description = report.approval_description(record, diff)
    notify.send_chat(
        f"Approval needed: {plan.service}:{plan.tag}",
        f"{plan.service} `{plan.tag}` passed staging and waits for approval "
        f"by one of {', '.join(svc.approvers)}.",
        link=run_url,
    )
    emit_release_event("awaiting-approval", plan, {"approvers": svc.approvers})
    form = await suspend_flow_run(  # type: ignore[misc]
        wait_for_input=approval_form(svc.approvers, description), key="approval"
    )
    return to_decision(form)


# --- production ---------------------------------------------------------------------------


async def take_production_lock(plan: ReleasePlan, policy: CanaryPolicy) -> None:
    """Wait (bounded) for the production lease; the run's state says who holds it."""
    me = str(flow_run.id)
    deadline = datetime.now(UTC) + LOCK_WAIT
    waiting_on: str | None = None
    while True:
        lease = gitops.lease_holder.with_options(cache_policy=NO_CACHE)(plan.service, "production")
        free = lease is None or lease.holder == me or lease.expired(datetime.now(UTC))
        if free:
            try:
                gitops.take_lease.with_options(cache_policy=NO_CACHE)(
                    plan.service, "production", ttl=_lease_ttl(policy).total_seconds()
                )
                break
            except LeaseHeld:  # another release won the race for the free lease
                lease = gitops.lease_holder.with_options(cache_policy=NO_CACHE)(
                    plan.service, "production"
                )
        if datetime.now(UTC) >= deadline:
            holder = lease.holder if lease else "?"
            raise LeaseHeld(f"{plan.service}-production", holder, "after waiting " + str(LOCK_WAIT))
        if lease is not None and lease.holder != waiting_on:
            waiting_on = lease.holder
            await lifecycle.mark_waiting(
                f"waiting for the production lock of {plan.service}, held by release "
                f"{lease.holder} until {lease.expires_at:%Y-%m-%d %H:%M:%S} UTC"
            )
        await anyio.sleep(LOCK_POLL_SECONDS)
    if waiting_on:
        await lifecycle.mark_waiting(None)


def _lease_ttl(policy: CanaryPolicy) -> timedelta:
    canary = policy.interval * (len(policy.steps) * (policy.analyses_per_step + 1) + 4)
    return canary + policy.post_release_watch + timedelta(minutes=30)


async def refuse_if_superseded(plan: ReleasePlan, svc: Service) -> None:
    running = gitops.current_image.with_options(cache_policy=NO_CACHE)(plan.service, "production")
    if running is None or not running.new_tag:
        return
    if await source.is_superseded.with_options(cache_policy=NO_CACHE)(
        svc.repo, plan.source_sha, running.new_tag
    ):
        raise Superseded(
            f"production already runs {plan.service}:{running.new_tag}, which contains "
            f"{plan.source_sha[:12]}; nothing to release"
        )


async def run_canary(
    plan: ReleasePlan, svc: Service, policy: CanaryPolicy, record: ReleaseRecord
) -> StepOutcome:
    """Weight steps by commits, each judged on metrics; ends promote-ready or raises."""
    log = get_run_logger()
    target = svc.environments["production"]
    progress = report.CanaryProgress.start(plan, policy)
    analysis = AnalysisRun.start(policy)
    weight = policy.steps[0]
    await _set_canary_weight(plan, policy, weight, record)
    seen_commands: set[str] = set()
    baseline: TrackObservation | None = None
    for _ in range(analysis.max_intervals):
        end = datetime.now(UTC) + policy.interval
        command = await _wait_interval_or_command(end, seen_commands)
        if command is not None:
            outcome = _apply_command(command, record)
            if outcome is not None:
                return outcome
        result = metrics.analyse_interval.with_options(cache_policy=NO_CACHE)(
            plan.service,
            target.namespace,
            svc.metrics,
            policy,
            end_time=end,
            window_seconds=policy.interval.total_seconds(),
            unavailable_is_inconclusive=True,
            stable_baseline=baseline,
        )
        if (result.observation.stable.requests or 0.0) >= policy.min_requests:
            baseline = result.observation.stable
        decision = analysis.record(result.analysis)
        record.analyses.append(result.analysis)
        progress.update(analysis)
        log.info("canary at %s%%: %s (%s)", weight, result.verdict, analysis.reason)
        gitops.renew_lease.with_options(cache_policy=NO_CACHE)(
            plan.service, "production", ttl=_lease_ttl(policy).total_seconds()
        )
        if decision == Decision.ROLLBACK:
            raise CanaryFailed(analysis.reason)
        if decision == Decision.PROMOTE:
            return StepOutcome(promoted=True, reason=analysis.reason)
        if decision == Decision.NEXT_STEP:
            weight = analysis.weight
            await _set_canary_weight(plan, policy, weight, record)
    raise CanaryFailed(f"analysis did not decide within {analysis.max_intervals} intervals")


async def _set_canary_weight(
    plan: ReleasePlan, policy: CanaryPolicy, weight: int, record: ReleaseRecord
) -> None:
    commit = gitops.set_canary(
        plan.service, plan.pull_image, policy.canary_replicas, weight, source_sha=plan.source_sha
    )
    record.production_commits.append(commit.sha)
    record.steps.append((weight, datetime.now(UTC)))
    synced = await sync_and_wait(_prod_app(plan), commit.sha, automated=False)
    record.production_revisions.append(synced.revision)


async def sync_and_wait(app: str, commit: str, *, automated: bool) -> argocd.SyncOutcome:
    """Sync and wait until the app runs our commit or a descendant of it."""
    return await argocd.argocd_sync_and_wait(app, commit, automated, is_descendant=gitops.descends)


def _prod_app(plan: ReleasePlan) -> str:
    return (
        load_catalog(get_settings().catalog)
        .service(plan.service)
        .environments["production"]
        .argocd_app
    )


async def _wait_interval_or_command(end: datetime, seen: set[str]) -> dict[str, Any] | None:
    """Wait for the interval to end; an operator's abort or promote cuts it short."""
    while datetime.now(UTC) < end:
        for key, value in await pending_commands(flow_run.id, seen):
            seen.add(key)
            return value
        await anyio.sleep(min(1.0, max(0.0, (end - datetime.now(UTC)).total_seconds())))
    return None


def _apply_command(command: dict[str, Any], record: ReleaseRecord) -> StepOutcome | None:
    who, why = command.get("sender", "?"), command.get("reason", "")
    if command.get("command") == "abort":
        raise CanaryFailed(f"aborted by {who}: {why}")
    if command.get("command") == "promote":
        record.notes.append(f"promoted now by {who}: {why}")
        return StepOutcome(promoted=True, reason=f"promoted now by {who}: {why}")
    return None


async def promote_and_watch(
    plan: ReleasePlan, svc: Service, policy: CanaryPolicy, record: ReleaseRecord
) -> None:
    target = svc.environments["production"]
    commit = gitops.promote(plan.service, plan.pull_image, source_sha=plan.source_sha)
    record.production_commits.append(commit.sha)
    synced = await sync_and_wait(target.argocd_app, commit.sha, automated=False)
    record.production_revisions.append(synced.revision)
    watch_end = datetime.now(UTC) + policy.post_release_watch
    while datetime.now(UTC) < watch_end:
        end = min(watch_end, datetime.now(UTC) + policy.interval)
        window = max(1.0, (end - datetime.now(UTC)).total_seconds())
        check = metrics.staging_check.with_options(cache_policy=NO_CACHE)(
            plan.service,
            target.namespace,
            svc.metrics,
            min_requests=policy.min_requests,
            end_time=end,
            window_seconds=window,
            track="stable",
        )
        record.watch.append(check.analysis)
        if check.verdict == Verdict.FAIL:
            raise CanaryFailed(f"post-release watch: {check.analysis.reason}")


async def roll_back(
    plan: ReleasePlan, svc: Service, before: str, reason: str, record: ReleaseRecord
) -> None:
    """Compensation: one commit restoring the production overlay, sync, verify."""
    target = svc.environments["production"]
    commit = gitops.restore_overlay(
        plan.service,
        "production",
        before,
        f"rolled back: {reason}",
        undone_commits=list(dict.fromkeys(record.production_commits)),
    )
    record.rollback_commit = commit.sha
    synced = await sync_and_wait(target.argocd_app, commit.sha, automated=False)
    record.production_revisions.append(synced.revision)
    record.rollback_verification = [r.model_dump() for r in smoke.smoke_test(target, svc.smoke)]


# --- the flow -----------------------------------------------------------------------------


@flow(
    name="release",
    description="Staging by GitOps and Argo CD, verification, approval in the Prefect UI, "
    "production canary judged on metrics, promotion or automatic rollback.",
    persist_result=True,
    on_cancellation=[start_rollback_for],  # type: ignore[list-item]
    on_crashed=[start_rollback_for],  # type: ignore[list-item]
)
async def release(service: str, image: str, source_sha: str) -> State[Any]:
    """Release ``image`` (registry/repo:tag@digest, built from ``source_sha``) of ``service``."""
    catalog = load_catalog(get_settings().catalog)
    plan = plan_release(catalog, service, image, source_sha)
    svc, policy = catalog.service(service), catalog.canary_policy(service)
    record = ReleaseRecord.start(plan, str(flow_run.id))
    emit_release_event("started", plan)

    await deploy_staging(plan, svc, policy, record)
    decision = await await_approval(plan, svc, record)
    record.decision = decision
    if not decision.approved:
        return end_rejected(plan, record, decision)

    await take_production_lock(plan, policy)
    before: str | None = None
    try:
        await refuse_if_superseded(plan, svc)
        before = gitops.head_commit.with_options(cache_policy=NO_CACHE)()
        outcome = await run_canary(plan, svc, policy, record)
        record.notes.append(outcome.reason)
        await promote_and_watch(plan, svc, policy, record)
    except Superseded as exc:
        return end_refused(plan, record, str(exc))
    except RoboticsCDError as exc:
        if before is None:
            raise
        await roll_back(plan, svc, before, str(exc), record)
        return end_rolled_back(plan, record, str(exc))
    finally:
        gitops.release_lease.with_options(cache_policy=NO_CACHE)(plan.service, "production")
    return end_promoted(plan, record)


def publish_canary_evidence(plan: ReleasePlan, record: ReleaseRecord) -> None:
    """The analysis table and the canary chart (error ratio and P99 over time, steps marked)."""
    namespace = (
        load_catalog(get_settings().catalog)
        .service(plan.service)
        .environments["production"]
        .namespace
    )
    key = f"canary-{plan.service}"
    report.publish_analysis_table(f"{key}-analyses", record.analyses, steps=record.steps)
    start, end = record.steps[0][1], datetime.now(UTC)
    if end - start < timedelta(seconds=10):
        return
    try:
        window = metrics.canary_window(plan.service, namespace, start=start, end=end)
    except RoboticsCDError as exc:
        get_run_logger().warning("no canary chart: %s", exc)
        return
    report.canary_chart(
        f"{key}-chart",
        window.error_ratio,
        window.p99_latency_seconds,
        report.chart_steps(record.steps),
        title=f"{plan.service}:{plan.tag} canary vs stable",
    )


# --- endings: one record, one event, one message each --------------------------------------


def end_promoted(plan: ReleasePlan, record: ReleaseRecord) -> State[Any]:
    record.outcome = "promoted"
    _finish(plan, record, "promoted", f"{plan.service}:{plan.tag} promoted to production")
    return Completed(message=f"promoted {plan.service}:{plan.tag}", name="Promoted")


def end_rejected(
    plan: ReleasePlan, record: ReleaseRecord, decision: ApprovalDecision
) -> State[Any]:
    record.outcome = decision.outcome()
    _finish(plan, record, "rejected", f"{plan.service}:{plan.tag} {decision.outcome()}")
    return Completed(message=decision.outcome(), name="Rejected")


def end_refused(plan: ReleasePlan, record: ReleaseRecord, why: str) -> State[Any]:
    record.outcome = f"superseded: {why}"
    _finish(plan, record, "rejected", f"{plan.service}:{plan.tag} superseded: {why}")
    return Failed(message=f"superseded: {why}", name="Superseded", data=ApprovalRejected(why))


def end_rolled_back(plan: ReleasePlan, record: ReleaseRecord, why: str) -> State[Any]:
    record.outcome = f"rolled back: {why}"
    _finish(plan, record, "rolled-back", f"{plan.service}:{plan.tag} rolled back: {why}")
    return Failed(message=f"rolled back: {why}", data=CanaryFailed(why))


def _finish(plan: ReleasePlan, record: ReleaseRecord, event: str, headline: str) -> None:
    if record.steps:
        publish_canary_evidence(plan, record)
    report.publish_release_record(record)
    emit_release_event(event, plan, {"outcome": record.outcome})
    notify.send_chat(
        headline, report.release_summary(record), link=report.flow_run_url(flow_run.id)
    )


# --- approvals that waited too long --------------------------------------------------------


@flow(
    name="expire-approvals",
    description="Resume releases whose approval waited longer than the catalog allows, with a "
    "reject decision from system:timeout: each release then ends 'rejected: timed out'.",
)
async def expire_approvals() -> list[str]:
    catalog = load_catalog(get_settings().catalog)
    timeouts = {name: catalog.approval_policy(name).timeout for name in catalog.services}
    deployment = get_settings().release_deployment.split("/")[-1]
    expired: list[str] = await expire_overdue(
        deployment, timeouts, catalog.defaults.approval.timeout
    )
    return expired
