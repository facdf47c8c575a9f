"""The ``release`` flow: a pushed image to production, or back.

    staging:   commit overlay → Argo CD sync → wait synced at our commit → smoke → metrics
    approval:  notify → suspend with the approval form (no process held) → decision
    production (under the service's lease, every write one atomic push with the lease):
               superseded? → canary commit → sync → analyse each interval → next weight …
               → promote commit → sync → post-release watch
    on any failure after production changed: one commit reverting the release's own
               commits (as its lease records them) → sync → verify

The flow keeps only the order of steps; the decisions are pure functions in
``core.release``. The catalog and settings are read once, at the start, and passed down.

A resumed run re-executes from the top; every task before the approval comes back
``Cached`` (persisted results, run-scoped cache) and every commit is checked against the
repo's state, so nothing is repeated. A run re-executed after it took the production lease
(a retry from the UI, a rescheduled Kubernetes Job) finds its lease: it carries on at the
step the lease records, with the ``before`` and the commits recorded there.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar
from uuid import UUID

import anyio
from prefect import flow, get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun, State
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from core import record_text
from core.analysis import (
    AnalysisRun,
    Decision,
    TrackObservation,
    Verdict,
    explained_by_restarts,
    explained_stop,
)
from core.approval import ApprovalDecision, approval_heading
from core.catalog import CanaryPolicy, Catalog, Service, load_catalog
from core.errors import (
    ApprovalRejected,
    CanaryFailed,
    ControlPlaneLost,
    LeaseHeld,
    LeaseLost,
    MetricsError,
    Quarantined,
    RoboticsCDError,
    RollbackFailed,
    Superseded,
    VerificationFailed,
)
from core.freeze import FreezeWindow, active_freeze, next_freeze
from core.ordering import MeasuredWindow, measured_pods_verdict, staging_may_write
from core.release import (
    CommandAction,
    EndingKind,
    ReleasePlan,
    ReleaseRecord,
    Resume,
    ResumePoint,
    StepOutcome,
    commits_to_revert,
    describe_holder,
    ending,
    lease_is_free,
    lease_ttl,
    plan_release,
    read_command,
    renew_period,
    resume_point,
)
from core.settings import Settings, get_settings
from tasks import (
    argocd,
    gitops,
    images,
    lifecycle,
    metrics,
    notify,
    quarantine,
    report,
    smoke,
    source,
)
from tasks import github as gh
from tasks.approvals import (
    FROZEN,
    WaitingPolicy,
    hold_for_freeze,
    paused_release_runs,
    pending_commands,
    refused_attempts,
    supersede_run,
    tend_waiting,
    wait_for_votes,
    waiting_releases,
)
from tasks.blocking import in_thread, renewing_every
from tasks.caching import once_per_run
from tasks.lifecycle import emit_release_event, start_rollback_for

_T = TypeVar("_T")
LOCK_WAIT = timedelta(hours=6)
LOCK_POLL_SECONDS = 5.0


@dataclass(frozen=True)
class Config:
    """The configuration of one release, resolved once at its start and passed down."""

    catalog: Catalog
    settings: Settings
    svc: Service
    policy: CanaryPolicy

    def git(self, env: Literal["staging", "production"]) -> dict[str, str]:
        """Where the gitops tasks write for ``env``: overlay, repo URL, branch (no lookups)."""
        return {
            "overlay": str(self.svc.environments[env].path),
            "repo_url": self.catalog.defaults.manifests_repo,
            "branch": self.catalog.defaults.manifests_branch,
        }

    def repo(self) -> dict[str, str]:
        return {
            "repo_url": self.catalog.defaults.manifests_repo,
            "branch": self.catalog.defaults.manifests_branch,
        }


# --- staging ------------------------------------------------------------------------------


async def deploy_staging(plan: ReleasePlan, cfg: Config, record: ReleaseRecord) -> None:
    """Staging in source order, verified on this release's image only; Superseded when a
    newer release of the service got there first."""
    svc, policy = cfg.svc, cfg.policy
    target = svc.environments["staging"]
    run_url = report.flow_run_url(flow_run.id)
    deployment_id = await in_thread(
        gh.create_deployment,
        plan.github,
        plan.source_sha,
        "staging",
        f"{plan.service}:{plan.tag}",
        payload={"flow_run_id": str(flow_run.id), "image": plan.image},
    )
    await in_thread(
        gh.set_deployment_status,
        plan.github,
        deployment_id,
        "in_progress",
        log_url=run_url,
        environment_url=target.base_url,
        description="deploying",
    )
    try:
        commit = await in_thread(
            gitops.bump_image,
            "staging",
            plan.service,
            plan.pull_image,
            source_sha=plan.source_sha,
            source_repo=svc.repo,
            source_branch=svc.branch,
            **cfg.git("staging"),
        )
        record.staging_commit = commit.sha
        synced = await sync_and_wait(cfg, target.argocd_app, commit.sha, automated=True)
        record.staging_revision = synced.revision
        running = await in_thread(
            gitops.image_at, plan.service, "staging", synced.revision, **cfg.git("staging")
        )
        if running is None or running.digest != plan.digest:
            raise await staging_moved_on(
                plan,
                cfg,
                f"Argo CD synced staging at {synced.revision[:12]}, which runs "
                f"{(running.digest if running else None) or 'no pinned image'}, not "
                f"{plan.digest[:19]}…",
            )
        record.smoke = [
            r.model_dump() for r in await in_thread(smoke.smoke_test, target, svc.smoke)
        ]
        # One canary interval of traffic on the new pods only: the window starts now.
        check = await measured(
            plan,
            cfg,
            record,
            "staging",
            "staging",
            plan.digest,
            lambda: metrics.staging_check(
                plan.service,
                target.namespace,
                svc.metrics,
                min_requests=1,
                end_time=datetime.now(UTC) + policy.interval,
                window_seconds=policy.interval.total_seconds(),
                track="stable",
                target=_metrics_target(plan, svc, target.namespace),
            ),
            cached=True,
        )
        if isinstance(check, str):
            raise await staging_moved_on(plan, cfg, check)
        record.staging_metrics = check.analysis
        if check.verdict == Verdict.FAIL:
            raise VerificationFailed(f"staging metrics: {check.analysis.reason}")
    except Superseded as exc:
        await in_thread(
            gh.set_deployment_status,
            plan.github,
            deployment_id,
            "inactive",
            log_url=run_url,
            description=str(exc)[:140],
        )
        raise
    except RoboticsCDError as exc:
        await in_thread(
            gh.set_deployment_status,
            plan.github,
            deployment_id,
            "failure",
            log_url=run_url,
            description=str(exc)[:140],
        )
        raise
    await in_thread(
        gh.set_deployment_status,
        plan.github,
        deployment_id,
        "success",
        log_url=run_url,
        environment_url=target.base_url,
        description="verified",
    )


async def measured(
    plan: ReleasePlan,
    cfg: Config,
    record: ReleaseRecord,
    env: Literal["staging", "production"],
    what: str,
    digest: str | None,
    measure: Callable[[], _T],
    *,
    cached: bool = False,
) -> _T | str:
    """Run ``measure`` (a metrics window) between two listings of the app's stable pods: its
    result when every pod that served the window ran ``digest``, else the reason it did not
    (the listings go to the record as evidence)."""
    app = cfg.svc.environments[env].argocd_app
    pods = argocd.measured_pods.with_options(
        **({"cache_key_fn": once_per_run} if cached else {"cache_policy": NO_CACHE})
    )
    start = datetime.now(UTC)
    before = await pods(app, "start")
    result = await in_thread(measure)
    after = await pods(app, "end")
    record.measured.append(
        MeasuredWindow(
            what=what, digest=digest, start=start, end=datetime.now(UTC), pods=before + after
        )
    )
    verdict = measured_pods_verdict(before + after, digest, what=what)
    if verdict is not None:
        get_run_logger().error("%s", verdict)
        return verdict
    return result


async def staging_moved_on(plan: ReleasePlan, cfg: Config, why: str) -> RoboticsCDError:
    """Staging runs (or measured) something other than this release: Superseded when its
    overlay now records a newer source commit, else a verification failure."""
    theirs = await in_thread(gitops.overlay_source, plan.service, "staging", **cfg.git("staging"))
    if theirs is not None and theirs.source_sha != plan.source_sha:
        relation = await source.source_relation(
            cfg.svc.repo, plan.source_sha, theirs.source_sha, cfg.svc.branch
        )
        if not staging_may_write(relation):
            return Superseded(f"staging now runs {theirs.describe()}, newer than this one ({why})")
    return VerificationFailed(
        f"{why}; no newer release explains it: something else changed staging"
    )


async def supersede_waiting_releases(plan: ReleasePlan, cfg: Config) -> list[str]:
    """End the service's older releases that wait for approval: their forms describe a
    staging that runs this release's image now. Each ends ``Superseded`` through the API (a
    suspended run has no process), with its record line, event and chat message."""
    log = get_run_logger()
    ended = []
    for run in await waiting_releases(plan.service, exclude=str(flow_run.id)):
        params = run.parameters or {}
        theirs, image = str(params.get("source_sha", "")), str(params.get("image", ""))
        if image.endswith(plan.digest):
            continue  # the same image: its form is still true
        try:
            relation = await source.source_relation(
                cfg.svc.repo, plan.source_sha, theirs, cfg.svc.branch
            )
        except RoboticsCDError as exc:
            log.warning("cannot place waiting release %s in the history: %s", run.id, exc)
            continue
        if not staging_may_write(relation):
            log.warning("waiting release %s is newer than this one: left alone", run.id)
            continue
        why = (
            f"{plan.service}:{plan.tag} (release {flow_run.id}) passed staging after it; "
            "staging no longer runs this image"
        )
        if await supersede_run(run, why):
            ended.append(str(run.id))
            await announce_superseded(cfg, run, why)
        else:
            log.info("waiting release %s was decided meanwhile: left alone", run.id)
    return ended


async def announce_superseded(cfg: Config, run: FlowRun, why: str) -> None:
    """The record line, event and chat message of a release this one superseded."""
    params = run.parameters or {}
    try:
        other = plan_release(
            cfg.catalog, str(params["service"]), str(params["image"]), str(params["source_sha"])
        )
    except (KeyError, RoboticsCDError) as exc:
        get_run_logger().warning("superseded run %s has odd parameters: %s", run.id, exc)
        return
    result = ending(EndingKind.SUPERSEDED, other, why=why)
    record = ReleaseRecord.start(other, str(run.id))
    record.started_at = run.start_time or run.created or record.started_at
    record.outcome = result.outcome
    await report.publish_release_record_of(record, str(run.id))
    emit_release_event(result.event, other, {"outcome": record.outcome}, flow_run_id=str(run.id))
    await in_thread(
        notify.send_chat,
        result.headline,
        record_text.release_summary(record),
        link=report.flow_run_url(run.id),
    )
    get_run_logger().warning("release %s ended Superseded: %s", run.id, why)


# --- approval -----------------------------------------------------------------------------


async def await_approval(plan: ReleasePlan, cfg: Config, record: ReleaseRecord) -> ApprovalDecision:
    svc = cfg.svc
    run_url = report.flow_run_url(flow_run.id)
    diff = await in_thread(
        gitops.preview_production_change, plan.service, plan.pull_image, **cfg.git("production")
    )
    description = record_text.approval_description(record, diff)
    # A newer release may have passed staging while this one was finishing its own checks
    # (before it waited, so that one could not end it): ask for approval only of what staging
    # runs. Cached: a resumed run does not ask again.
    staged = gitops.overlay_source.with_options(cache_key_fn=once_per_run)(
        plan.service, "staging", **cfg.git("staging")
    )
    if staged is not None and staged.source_sha != plan.source_sha:
        moved = await staging_moved_on(plan, cfg, f"staging runs {staged.describe()}")
        if isinstance(moved, Superseded):
            raise moved
    await in_thread(
        notify.send_chat,
        f"Approval needed: {plan.service}:{plan.tag}",
        f"{plan.service} `{plan.tag}` passed staging and waits for approval "
        f"by one of {', '.join(svc.approvers)}.",
        link=run_url,
    )
    emit_release_event("awaiting-approval", plan, {"approvers": svc.approvers})
    return await wait_for_approval(plan, cfg, description)


async def wait_for_approval(plan: ReleasePlan, cfg: Config, description: str) -> ApprovalDecision:
    """Votes until the quorum or a reject; then, approved during a freeze, ``Frozen`` until
    the window ends (or a break-glass). Nothing of production is held meanwhile."""
    svc, policy = cfg.svc, cfg.catalog.approval_policy(plan.service)
    argo = await argocd_windows(cfg)
    windows = cfg.catalog.freeze_windows(plan.service) + argo.scoped()
    freeze = active_freeze(windows, datetime.now(UTC))
    upcoming = next_freeze(windows, datetime.now(UTC))
    heading = approval_heading(str(flow_run.id), policy.required, freeze, upcoming)
    decision = await wait_for_votes(
        svc.approvers,
        heading + description,
        required=policy.required,
        ui_authenticated=cfg.settings.ui_authenticated,
    )
    if not decision.approved:
        return decision
    freeze = active_freeze(windows, datetime.now(UTC))
    if freeze is None:
        return decision
    if decision.break_glass is not None and not argo.can_sync:
        # Argo CD itself refuses the production app's syncs now (a deny window without
        # manualSync): a release could change git but never sync, nor sync its rollback.
        get_run_logger().warning(
            "break-glass cannot override Argo CD: %s refuses syncs now; held Frozen", argo.app
        )
        await in_thread(
            notify.send_chat,
            f"Break-glass refused: {plan.service}:{plan.tag} stays Frozen",
            f"Argo CD refuses syncs of {argo.app} now (a sync window without manualSync); "
            f"the release waits for the window to end. {freeze.describe()}.",
            link=report.flow_run_url(flow_run.id),
        )
    elif decision.break_glass is not None:
        glass = decision.break_glass.describe()
        emit_release_event("break-glass", plan, {"freeze": freeze.describe(), "by": glass})
        await in_thread(
            notify.send_chat,
            f"Break-glass: {plan.service}:{plan.tag} releases during a freeze",
            f"{glass}. {freeze.describe()}.",
            link=report.flow_run_url(flow_run.id),
        )
        return decision
    emit_release_event("frozen", plan, {"until": freeze.until.isoformat()})
    await hold_for_freeze(svc.approvers, freeze, heading + description)
    return decision  # not reached: the run re-executes from the top when resumed


async def argocd_windows(cfg: Config) -> argocd.SyncWindows:
    """What the production app's Argo CD sync windows say now (freezes, canSync)."""
    return await argocd.argocd_sync_windows(cfg.svc.environments["production"].argocd_app)


# --- production ---------------------------------------------------------------------------


async def take_production_lock(plan: ReleasePlan, cfg: Config) -> gitops.Lease:
    """Wait (bounded) for the production lease; the run's state says who holds it.

    A re-executed run finds the lease it holds already and gets it back with its record.
    """
    me = str(flow_run.id)
    ttl = lease_ttl(cfg.policy).total_seconds()
    deadline = datetime.now(UTC) + LOCK_WAIT
    waiting_on: str | None = None
    while True:
        lease = await in_thread(gitops.lease_holder, plan.service, "production", **cfg.repo())
        if lease_is_free(lease.record if lease else None, me, datetime.now(UTC)):
            try:
                taken: gitops.Lease = await in_thread(
                    gitops.take_lease, plan.service, "production", ttl=ttl, **cfg.repo()
                )
                break
            except LeaseHeld:  # another release won the race for the free lease
                lease = await in_thread(
                    gitops.lease_holder, plan.service, "production", **cfg.repo()
                )
        if datetime.now(UTC) >= deadline:
            holder = lease.holder if lease else "?"
            raise LeaseHeld(f"{plan.service}-production", holder, "after waiting " + str(LOCK_WAIT))
        if lease is not None and lease.holder != waiting_on:
            waiting_on = lease.holder
            await lifecycle.mark_waiting(
                f"waiting for the production lock of {plan.service}, held by "
                f"{describe_holder(lease.record)} until {lease.expires_at:%Y-%m-%d %H:%M:%S} UTC"
            )
        await anyio.sleep(LOCK_POLL_SECONDS)
    if waiting_on:
        await lifecycle.mark_waiting(None)
    return taken


def stable_image(plan: ReleasePlan, cfg: Config) -> str | None:
    """What production runs now: the image a rollback returns to."""
    running = gitops.current_image(plan.service, "production", **cfg.git("production"))
    return running.reference if running else None


async def refuse_if_superseded(plan: ReleasePlan, cfg: Config) -> None:
    running = await in_thread(
        gitops.current_image, plan.service, "production", **cfg.git("production")
    )
    if running is None or not running.new_tag:
        return
    if await source.is_superseded(cfg.svc.repo, plan.source_sha, running.new_tag):
        raise Superseded(
            f"production already runs {plan.service}:{running.new_tag}, which contains "
            f"{plan.source_sha[:12]}; nothing to release"
        )


async def run_canary(
    plan: ReleasePlan, cfg: Config, record: ReleaseRecord, resume: ResumePoint
) -> StepOutcome:
    """Weight steps by commits, each judged on metrics; ends promote-ready or raises.

    A re-executed run starts at the step its lease records (``resume``), never below it.
    """
    log = get_run_logger()
    svc, policy = cfg.svc, cfg.policy
    target = svc.environments["production"]
    progress = report.CanaryProgress.start(plan, policy)
    analysis = AnalysisRun.start(policy).model_copy(update={"step_index": resume.step_index})
    weight = analysis.weight
    await _set_canary_weight(plan, cfg, weight, record)
    seen_commands: set[str] = set()
    baseline: TrackObservation | None = None
    early = _EarlyAbort(plan, svc, policy, record)
    for _ in range(analysis.max_intervals):
        end = datetime.now(UTC) + policy.interval
        raw = await _wait_interval_or_command(
            plan, cfg, end, seen_commands, look=early.look if weight < 100 else None
        )
        if raw is not None:
            command = read_command(raw)
            if command.action == CommandAction.ABORT:
                raise CanaryFailed(command.reason)
            if command.action == CommandAction.PROMOTE:
                record.notes.append(command.reason)
                return StepOutcome(promoted=True, reason=command.reason)
        result = await in_thread(
            metrics.analyse_interval,
            plan.service,
            target.namespace,
            svc.metrics,
            policy,
            end_time=end,
            window_seconds=policy.interval.total_seconds(),
            unavailable_is_inconclusive=True,
            stable_baseline=baseline,
            target=_metrics_target(plan, svc, target.namespace),
        )
        if (result.observation.stable.requests or 0.0) >= policy.min_requests:
            baseline = result.observation.stable
        decision = analysis.record(result.analysis)
        record.analyses.append(result.analysis)
        progress.update(analysis)
        log.info("canary at %s%%: %s (%s)", weight, result.verdict, analysis.reason)
        await in_thread(
            gitops.renew_lease,
            plan.service,
            "production",
            ttl=lease_ttl(policy).total_seconds(),
            **cfg.repo(),
        )
        if decision == Decision.ROLLBACK:
            trouble = await argocd.canary_trouble(target.argocd_app)
            raise CanaryFailed(explained_stop(analysis.reason, trouble))
        if decision == Decision.PROMOTE:
            return StepOutcome(promoted=True, reason=analysis.reason)
        if decision == Decision.NEXT_STEP:
            weight = analysis.weight
            await _set_canary_weight(plan, cfg, weight, record)
            early.new_step()
    raise CanaryFailed(f"analysis did not decide within {analysis.max_intervals} intervals")


async def _set_canary_weight(
    plan: ReleasePlan, cfg: Config, weight: int, record: ReleaseRecord
) -> None:
    commit = await in_thread(
        gitops.set_canary,
        plan.service,
        plan.pull_image,
        cfg.policy.canary_replicas,
        weight,
        source_sha=plan.source_sha,
        **cfg.git("production"),
    )
    if commit.sha not in record.production_commits:
        record.production_commits.append(commit.sha)
    record.steps.append((weight, datetime.now(UTC)))
    synced = await sync_and_wait(
        cfg, cfg.svc.environments["production"].argocd_app, commit.sha, automated=False, plan=plan
    )
    record.production_revisions.append(synced.revision)


SYNC_DEADLINE = timedelta(minutes=10)


async def sync_and_wait(
    cfg: Config, app: str, commit: str, *, automated: bool, plan: ReleasePlan | None = None
) -> argocd.SyncOutcome:
    """Sync and wait until the app runs our commit or a descendant of it. In production
    (``plan`` given) the lease is renewed while it waits, never past the sync's deadline."""
    wait = argocd.argocd_sync_and_wait(
        app,
        commit,
        automated,
        f"{int(SYNC_DEADLINE.total_seconds())}s",
        is_descendant=gitops.descendant_check(**cfg.repo()),
    )
    if plan is None:
        return await wait
    async with renewing(plan, cfg, until=SYNC_DEADLINE):
        return await wait


def renew(plan: ReleasePlan, cfg: Config) -> None:
    """One renewal of this run's production lease (LeaseLost when another run has it)."""
    gitops.renew_lease.fn(
        plan.service,
        "production",
        str(flow_run.id),
        ttl=lease_ttl(cfg.policy).total_seconds(),
        **cfg.repo(),
    )


def renewing(
    plan: ReleasePlan, cfg: Config, *, until: timedelta
) -> AbstractAsyncContextManager[None]:
    """The production lease renewed every ``renew_period`` while a block runs, at most ``until``."""
    return renewing_every(
        lambda: renew(plan, cfg),
        period=renew_period(lease_ttl(cfg.policy)),
        until=until,
        what="lease renewal",
    )


async def _wait_interval_or_command(
    plan: ReleasePlan,
    cfg: Config,
    end: datetime,
    seen: set[str],
    *,
    look: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any] | None:
    """Wait for the interval to end, renewing the lease; an operator's abort or promote cuts
    it short, and so does the early abort (``look`` raises CanaryFailed on overwhelming
    evidence). While the Prefect API does not answer, the canary holds its weight: the
    interval is not over until commands can be read again (so no step is taken blind), for
    at most ``control_plane_outage``; past that the run ends and leaves production to the
    reconciler (its lease, no longer renewed, expires)."""
    log = get_run_logger()
    period = renew_period(lease_ttl(cfg.policy)).total_seconds()
    last_renewal = time.monotonic()
    outage_since: float | None = None
    limit = cfg.settings.control_plane_outage.total_seconds()
    while True:
        try:
            for key, value in await pending_commands(flow_run.id, seen):
                seen.add(key)
                return value
            if outage_since is not None:
                log.warning(
                    "Prefect API answers again after %.0f s", time.monotonic() - outage_since
                )
            outage_since = None
        except Exception as exc:  # the control plane, not the release: hold and retry
            if outage_since is None:
                outage_since = time.monotonic()
                log.warning("Prefect API unreachable (%s): canary holds its weight", exc)
            elif time.monotonic() - outage_since > limit:
                raise ControlPlaneLost(
                    f"Prefect API unreachable for over {limit:.0f} s; production is left to "
                    "the reconciler"
                ) from exc
        if time.monotonic() - last_renewal >= period:
            try:
                await anyio.to_thread.run_sync(renew, plan, cfg)
                last_renewal = time.monotonic()
            except LeaseLost:
                raise
            except RoboticsCDError as exc:  # a slow remote: retried at the next poll
                log.warning("lease renewal failed, retrying: %s", exc)
        if outage_since is None and datetime.now(UTC) >= end:
            return None
        if look is not None and outage_since is None:
            await look()
        await anyio.sleep(min(1.0, max(0.1, (end - datetime.now(UTC)).total_seconds())))


class _EarlyAbort:
    """The sequential test of core.analysis, looked at every ``early_abort_check`` within
    the intervals of a step below 100 %, on the counts since the step began."""

    def __init__(
        self, plan: ReleasePlan, svc: Service, policy: CanaryPolicy, record: ReleaseRecord
    ) -> None:
        self.plan, self.svc, self.policy, self.record = plan, svc, policy, record
        self.namespace = svc.environments["production"].namespace
        self.app = svc.environments["production"].argocd_app
        self.new_step()

    def new_step(self) -> None:
        self.since = datetime.now(UTC)
        self.cut: float | None = None
        self.cut_known = False
        self.next_look = self.since

    async def look(self) -> None:
        if self.policy.early_abort_alpha is None or datetime.now(UTC) < self.next_look:
            return
        self.next_look = datetime.now(UTC) + self.policy.early_abort_check
        log = get_run_logger()
        try:
            if not self.cut_known:
                self.cut = await anyio.to_thread.run_sync(
                    lambda: metrics.stable_latency_cut(
                        self.plan.service,
                        self.namespace,
                        self.svc.metrics,
                        before=self.since,
                        window_seconds=self.policy.interval.total_seconds(),
                    )
                )
                self.cut_known = True
            check = await anyio.to_thread.run_sync(
                lambda: metrics.early_abort_check(
                    self.plan.service,
                    self.namespace,
                    self.svc.metrics,
                    self.policy,
                    since=self.since,
                    cut=self.cut,
                )
            )
        except MetricsError as exc:
            log.warning("early abort: no look this time (%s); the interval judge still judges", exc)
            return
        if check.abort:
            check = explained_by_restarts(check, await argocd.canary_trouble(self.app))
            self.record.notes.append(check.reason)
            log.warning("canary stopped: %s", check.reason)
            raise CanaryFailed(check.reason)


async def promote_and_watch(plan: ReleasePlan, cfg: Config, record: ReleaseRecord) -> None:
    svc, policy = cfg.svc, cfg.policy
    target = svc.environments["production"]
    commit = await in_thread(
        gitops.promote,
        plan.service,
        plan.pull_image,
        source_sha=plan.source_sha,
        **cfg.git("production"),
    )
    if commit.sha not in record.production_commits:
        record.production_commits.append(commit.sha)
    synced = await sync_and_wait(cfg, target.argocd_app, commit.sha, automated=False, plan=plan)
    record.production_revisions.append(synced.revision)
    watch_end = datetime.now(UTC) + policy.post_release_watch
    while datetime.now(UTC) < watch_end:
        end = min(watch_end, datetime.now(UTC) + policy.interval)
        window = max(1.0, (end - datetime.now(UTC)).total_seconds())
        check = await measured(
            plan,
            cfg,
            record,
            "production",
            f"post-release watch {len(record.watch) + 1}",
            plan.digest,
            lambda: metrics.post_release_watch(
                plan.service,
                target.namespace,
                svc.metrics,
                min_requests=policy.min_requests,
                end_time=end,  # noqa: B023 (called before the loop moves on)
                window_seconds=window,  # noqa: B023
                target=_metrics_target(plan, svc, target.namespace),
            ),
        )
        if isinstance(check, str):
            raise CanaryFailed(f"post-release watch: {check}")
        record.watch.append(check.analysis)
        if check.verdict == Verdict.FAIL:
            raise CanaryFailed(f"post-release watch: {check.analysis.reason}")


async def roll_back(plan: ReleasePlan, cfg: Config, reason: str, record: ReleaseRecord) -> None:
    """Compensation: one commit reverting the release's own commits (as its lease records
    them), written under the lease; sync; verify."""
    target = cfg.svc.environments["production"]
    lease = await in_thread(gitops.lease_holder, plan.service, "production", **cfg.repo())
    recorded = lease.commits if lease is not None and lease.holder == str(flow_run.id) else []
    revert = commits_to_revert(recorded or record.production_commits, set())
    commit = await in_thread(
        gitops.revert_release,
        plan.service,
        "production",
        revert,
        f"rolled back: {reason}",
        release_run_id=str(flow_run.id),
        source_sha=plan.source_sha,
        **cfg.git("production"),
    )
    record.rollback_commit = commit.sha
    await quarantine_rolled_back(plan, commit.sha, reason, record)
    synced = await sync_and_wait(cfg, target.argocd_app, commit.sha, automated=False, plan=plan)
    record.production_revisions.append(synced.revision)
    restored = await in_thread(
        gitops.image_at, plan.service, "production", synced.revision, **cfg.git("production")
    )
    checked = await measured(
        plan,
        cfg,
        record,
        "production",
        "rollback",
        restored.digest if restored else None,
        lambda: [r.model_dump() for r in smoke.smoke_test(target, cfg.svc.smoke)],
    )
    if isinstance(checked, str):
        raise VerificationFailed(f"rollback not verified: {checked}")
    record.rollback_verification = checked


async def quarantine_rolled_back(
    plan: ReleasePlan, rollback_commit: str, reason: str, record: ReleaseRecord
) -> None:
    """Right after the rollback commit: the digest goes to ``quarantine/<svc>.yaml``. A
    failure here is loud but never holds up the rollback's sync."""
    try:
        await quarantine.quarantine_image(
            plan.service,
            plan.pull_image,
            rollback_commit,
            f"rolled back: {reason}",
            record.flow_run_id,
        )
    except RoboticsCDError as exc:
        get_run_logger().error("could not quarantine %s: %s", plan.digest, exc)
        record.notes.append(f"quarantine of {plan.digest} failed: {exc}")


async def restore_until_verified(
    plan: ReleasePlan, cfg: Config, reason: str, record: ReleaseRecord
) -> None:
    """``roll_back`` again and again (the revert commit is made once; a retry syncs and
    verifies) with backoff, until production is verified or ``rollback_deadline`` passes:
    then ``RollbackFailed``. A lost lease is not retried: production is another run's."""
    log = get_run_logger()
    deadline = time.monotonic() + cfg.settings.rollback_deadline.total_seconds()
    delay, attempt = 2.0, 0
    while True:
        attempt += 1
        try:
            await roll_back(plan, cfg, reason, record)
            return
        except LeaseLost:
            raise
        except Exception as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RollbackFailed(
                    f"production not verified restored after {attempt} attempt(s): {exc}"
                ) from exc
            log.error("restore attempt %d failed (%s); retrying in %.0f s", attempt, exc, delay)
            record.notes.append(f"restore attempt {attempt} failed: {exc}")
            await anyio.sleep(min(delay, left))
            delay = min(delay * 2, 30.0)


def block_production(plan: ReleasePlan, cfg: Config, why: str) -> None:
    """Production could not be restored: keep the lease, blocked, and say so everywhere
    (the ending adds the record, the event and the chat message)."""
    try:
        gitops.block_lease.fn(plan.service, "production", why, str(flow_run.id), **cfg.repo())
    except RoboticsCDError as exc:  # the lease is still ours and unexpired: nobody takes it
        get_run_logger().error("could not mark the lease blocked: %s", exc)
    deployment_id = gh.create_deployment(
        plan.github,
        plan.source_sha,
        "production",
        f"{plan.service}:{plan.tag}",
        payload={"flow_run_id": str(flow_run.id), "image": plan.image},
    )
    gh.set_deployment_status(
        plan.github,
        deployment_id,
        "error",
        log_url=report.flow_run_url(flow_run.id),
        description=f"rollback failed: {why}"[:140],
    )


# --- the flow -----------------------------------------------------------------------------


@flow(
    name="release",
    description="Staging by GitOps and Argo CD, verification, approval in the Prefect UI, "
    "production canary judged on metrics, promotion or automatic rollback.",
    persist_result=True,
    on_cancellation=[start_rollback_for],  # type: ignore[list-item]
    on_crashed=[start_rollback_for],  # type: ignore[list-item]
)
async def release(
    service: str, image: str, source_sha: str, provenance_override_reason: str | None = None
) -> State[Any]:
    """Release ``image`` (registry/repo:tag@digest, built from ``source_sha``) of ``service``.

    The image must be in the registry and pushed by a completed ``ci`` run of the commit;
    ``provenance_override_reason`` lets an operator ship another image, and is recorded.
    """
    settings = get_settings()
    catalog = load_catalog(settings.catalog)
    plan = plan_release(catalog, service, image, source_sha)
    cfg = Config(
        catalog=catalog,
        settings=settings,
        svc=catalog.service(service),
        policy=catalog.canary_policy(service),
    )
    await lifecycle.claim_process()  # the reconciler tells a dead run by it, not by heartbeats
    refusal = await quarantine.quarantine_refusal(plan.service, plan.image)
    if refusal is not None:
        return Failed(message=refusal, name="Quarantined", data=Quarantined(refusal))
    record = ReleaseRecord.start(plan, str(flow_run.id))
    record.notes.append(
        await images.verify_release_image(
            plan.image,
            service=service,
            source_sha=source_sha,
            override_reason=provenance_override_reason,
        )
    )
    emit_release_event("started", plan)

    try:
        await deploy_staging(plan, cfg, record)
        await supersede_waiting_releases(plan, cfg)
        decision = await await_approval(plan, cfg, record)
    except Superseded as exc:
        return await in_thread(end, EndingKind.SUPERSEDED, plan, cfg, record, why=str(exc))
    record.decision = decision
    record.notes.extend(await refused_attempts(UUID(str(flow_run.id))))
    if not decision.approved:
        return await in_thread(end, EndingKind.REJECTED, plan, cfg, record, decision=decision)

    lease = await take_production_lock(plan, cfg)
    resume = resume_point(lease.record, cfg.policy)
    record.production_commits = list(resume.commits)
    if resume.resumed:
        get_run_logger().warning(
            "re-executed: lease %s records %d production commit(s), before=%s; carrying on "
            "at %s (step %d)",
            lease.name,
            len(resume.commits),
            (lease.before or "?")[:12],
            resume.at.value,
            resume.step_index,
        )
        record.notes.append(f"re-executed: carried on at {resume.at.value} from its lease")
    holds_lease = True
    try:
        if resume.at == Resume.ROLLED_BACK:
            why = "rolled back before this re-execution (the lease records the rollback)"
            await roll_back(plan, cfg, why, record)
            return await in_thread(end, EndingKind.ROLLED_BACK, plan, cfg, record, why=why)
        if resume.at == Resume.START:
            await refuse_if_superseded(plan, cfg)
            await images.keep_rollback_target(service, await in_thread(stable_image, plan, cfg))
        if resume.at in (Resume.START, Resume.CANARY):
            outcome = await run_canary(plan, cfg, record, resume)
            record.notes.append(outcome.reason)
        await promote_and_watch(plan, cfg, record)
    except Superseded as exc:
        return await in_thread(end, EndingKind.SUPERSEDED, plan, cfg, record, why=str(exc))
    except LeaseLost as exc:
        # Another run owns production now: this run may write nothing more, not even a
        # rollback (the new holder, or the reconciler, answers for production).
        holds_lease = False
        record.notes.append(str(exc))
        raise
    except ControlPlaneLost as exc:
        # The lease is left to expire: the reconciler restores production from it.
        holds_lease = False
        record.notes.append(str(exc))
        raise
    except Exception as exc:  # any failure after production changed: ours, foreign, a bug
        if not record.production_commits:
            raise  # production never changed: nothing to roll back
        why = str(exc) if isinstance(exc, RoboticsCDError) else f"{type(exc).__name__}: {exc}"
        try:
            await restore_until_verified(plan, cfg, why, record)
        except RollbackFailed as failed:
            holds_lease = False  # kept, blocked: nothing takes production until cleared
            await in_thread(block_production, plan, cfg, str(failed))
            return await in_thread(
                end, EndingKind.ROLLBACK_FAILED, plan, cfg, record, why=str(failed)
            )
        return await in_thread(end, EndingKind.ROLLED_BACK, plan, cfg, record, why=why)
    finally:
        if holds_lease:
            await in_thread(let_go, plan, cfg)
        await in_thread(gitops.remove_clone, **cfg.repo())
    return await in_thread(end, EndingKind.PROMOTED, plan, cfg, record)


def _metrics_target(plan: ReleasePlan, svc: Service, namespace: str) -> metrics.Target:
    """Where the tracks' metrics are, as the service's traffic router exports them."""
    return metrics.Target(service=plan.service, namespace=namespace, router=svc.traffic.router)


def let_go(plan: ReleasePlan, cfg: Config) -> None:
    """Release the production lease; one taken over meanwhile is the new holder's (said
    loudly, never raised over the error that ended the release)."""
    try:
        gitops.release_lease(plan.service, "production", **cfg.repo())
    except LeaseHeld as exc:
        get_run_logger().error("the production lease is not this run's any more: %s", exc)


def publish_canary_evidence(plan: ReleasePlan, cfg: Config, record: ReleaseRecord) -> None:
    """The analysis table and the canary chart (error ratio and P99 over time, steps marked)."""
    namespace = cfg.svc.environments["production"].namespace
    key = f"canary-{plan.service}"
    report.publish_analysis_table(f"{key}-analyses", record.analyses, steps=record.steps)
    start, end_at = record.steps[0][1], datetime.now(UTC)
    if end_at - start < timedelta(seconds=10):
        return
    try:
        window = metrics.canary_window(
            plan.service,
            namespace,
            start=start,
            end=end_at,
            target=_metrics_target(plan, cfg.svc, namespace),
        )
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


def end(
    kind: EndingKind,
    plan: ReleasePlan,
    cfg: Config,
    record: ReleaseRecord,
    *,
    why: str = "",
    decision: ApprovalDecision | None = None,
) -> State[Any]:
    """Record, publish and announce how the release ended (``core.release.ending`` decides)."""
    result = ending(kind, plan, why=why, decision=decision)
    record.outcome = result.outcome
    if record.steps:
        publish_canary_evidence(plan, cfg, record)
    report.publish_release_record(record)
    emit_release_event(result.event, plan, {"outcome": record.outcome})
    notify.send_chat(
        result.headline, record_text.release_summary(record), link=report.flow_run_url(flow_run.id)
    )
    if result.state == "completed":
        return Completed(message=result.message, name=result.state_name)
    data: RoboticsCDError = (
        ApprovalRejected(why)
        if kind == EndingKind.SUPERSEDED
        else RollbackFailed(why)
        if kind == EndingKind.ROLLBACK_FAILED
        else CanaryFailed(why)
    )
    if result.state_name:
        return Failed(message=result.message, name=result.state_name, data=data)
    return Failed(message=result.message, data=data)


# --- approvals that waited too long --------------------------------------------------------


@flow(
    name="expire-approvals",
    description="The scheduled approvals flow: resume releases whose freeze is over, remind "
    "approvers of releases that wait, and end waits longer than the catalog allows (each "
    "such release resumes and ends 'rejected: timed out').",
)
async def expire_approvals() -> list[str]:
    settings = get_settings()
    catalog = load_catalog(settings.catalog)
    deployment = settings.release_deployment.split("/")[-1]
    argo = await frozen_services_argocd_freezes(catalog, deployment)
    policies = {
        name: WaitingPolicy(
            timeout=catalog.approval_policy(name).timeout,
            remind_after=catalog.approval_policy(name).remind_after,
            approvers=svc.approvers,
            required=catalog.approval_policy(name).required,
            freezes=catalog.freeze_windows(name) + argo.get(name, []),
        )
        for name, svc in catalog.services.items()
    }
    tended = await tend_waiting(deployment, policies, ui_authenticated=settings.ui_authenticated)
    for run_id, service, text in tended.reminders:
        await in_thread(
            notify.send_chat,
            f"Reminder: {service} waits for approval",
            text,
            link=report.flow_run_url(run_id),
        )
    return tended.expired


async def frozen_services_argocd_freezes(
    catalog: Catalog, deployment: str
) -> dict[str, list[tuple[str, FreezeWindow]]]:
    """The Argo CD freezes of each service that has a ``Frozen`` release, read for this pass
    (a thaw must not ignore a sync window that denies production). When Argo CD cannot be
    read, the service stays frozen until the next pass, said in the log."""
    found: dict[str, list[tuple[str, FreezeWindow]]] = {}
    frozen = {
        str(run.parameters.get("service", ""))
        for run in await paused_release_runs(deployment)
        if run.state is not None and run.state.name == FROZEN
    }
    for name in sorted(frozen & set(catalog.services)):
        app = catalog.service(name).environments["production"].argocd_app
        try:
            found[name] = (await argocd.argocd_sync_windows(app)).scoped()
        except RoboticsCDError as exc:
            get_run_logger().warning("%s stays frozen this pass: %s", name, exc)
            now = datetime.now(UTC)
            unread = FreezeWindow(
                reason=f"Argo CD sync windows of {app} could not be read: {exc}"[:300],
                start=now - timedelta(minutes=1),
                end=now + timedelta(minutes=5),
            )
            found[name] = [("argocd", unread)]
    return found
