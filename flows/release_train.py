"""The ``release-train`` flow: several services promoted, or rolled back, as one.

    plan:      the bundle against the catalog (unknown service, cycle: refused, nothing written)
    staging:   each service in dependency order, as a release does it (commit → sync →
               smoke → metrics) → the bundle smoke test (paths the catalog names)
    approval:  ONE form for the bundle (each service's staging results and diff)
    production (under every service's lease, taken in ONE atomic push):
               per train step ONE commit over every overlay → sync in dependency order →
               every service judged on the same window → next step only when all pass
               → ONE promotion commit → sync → watch
    on any failure after production changed: ONE commit reverting every commit of the train
               → sync in reverse dependency order → smoke tests

The rules are pure functions in ``core.train``; staging, metrics and syncs are the release's
own parts (``flows.release``), called per service.
"""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from core import record_text
from core.analysis import Decision, IntervalVerdict, TrackObservation, Verdict
from core.approval import ApprovalDecision, approval_heading
from core.catalog import Catalog, load_catalog
from core.errors import (
    CanaryFailed,
    ControlPlaneLost,
    InvalidInput,
    LeaseHeld,
    LeaseLost,
    RoboticsCDError,
    RollbackFailed,
    Superseded,
    VerificationFailed,
)
from core.freeze import Freeze, FreezeWindow, active_freeze, next_freeze
from core.images import parse_reference
from core.release import (
    LeaseRecord,
    ReleasePlan,
    ReleaseRecord,
    StepKind,
    commits_to_revert,
    lease_ttl,
    plan_release,
    renew_period,
)
from core.settings import Settings, get_settings
from core.train import (
    Bundle,
    BundleService,
    TrainAnalysis,
    TrainPlan,
    TrainRecord,
    parse_bundle,
    plan_train,
    render_train_record,
)
from flows.release import Config, argocd_windows, deploy_staging, refuse_if_superseded
from tasks import argocd, gitops, images, lifecycle, metrics, notify, quarantine, report, smoke
from tasks.approvals import wait_for_votes
from tasks.blocking import in_thread, renewing_every
from tasks.gitops import train as train_git
from tasks.lifecycle import emit_train_event

LOCK_WAIT = timedelta(hours=6)
LOCK_POLL_SECONDS = 5.0
SYNC_DEADLINE = timedelta(minutes=10)


class Train:
    """One train's resolved configuration, passed down (read once, at the start)."""

    def __init__(self, plan: TrainPlan, catalog: Catalog, settings: Settings) -> None:
        self.plan, self.catalog, self.settings = plan, catalog, settings
        self.configs = {
            s.service: Config(
                catalog=catalog,
                settings=settings,
                svc=catalog.service(s.service),
                policy=catalog.canary_policy(s.service),
            )
            for s in plan.services
        }
        self.leases = [gitops.lease_name(s, "production") for s in plan.order]
        # The services' production Argo CD sync windows, read by the flow (read_argocd_freezes).
        self.argocd_windows: list[tuple[str, FreezeWindow]] = []
        self.argocd_refuses: list[str] = []  # production apps Argo CD will not sync now
        # The lease lasts as long as the longest of the services' (one window for all).
        self.ttl = max(lease_ttl(c.policy) for c in self.configs.values())
        self.members = [
            train_git.TrainMember(
                service=s.service,
                overlay=str(self.configs[s.service].svc.environments["production"].path),
                lease=gitops.lease_name(s.service, "production"),
                image=parse_reference(s.pull_image),
                replicas=s.canary_replicas,
            )
            for s in plan.services
        ]

    def repo(self) -> dict[str, str]:
        return {
            "repo_url": self.catalog.defaults.manifests_repo,
            "branch": self.catalog.defaults.manifests_branch,
        }

    def images(self) -> dict[str, str]:
        return {s.service: s.image for s in self.plan.services}

    def freeze_windows(self) -> list[tuple[str, FreezeWindow]]:
        """Every window that freezes any of the train's services (global ones once)."""
        windows: list[tuple[str, FreezeWindow]] = []
        for name in self.plan.order:
            windows += [w for w in self.catalog.freeze_windows(name) if w not in windows]
        return windows + self.argocd_windows

    async def read_argocd_freezes(self) -> None:
        """Each service's production Argo CD sync windows that deny it, read now."""
        self.argocd_windows, self.argocd_refuses = [], []
        for name in self.plan.order:
            read = await argocd_windows(self.configs[name])
            if not read.can_sync:
                self.argocd_refuses.append(read.app)
            for window in read.scoped():
                if window not in self.argocd_windows:
                    self.argocd_windows.append(window)

    def frozen(self) -> Freeze | None:
        return active_freeze(self.freeze_windows(), datetime.now(UTC))

    def approvers_by_service(self) -> dict[str, list[str]]:
        """Each service's own approvers: the bundle's approval needs one of each (a service's
        change is never approved by someone only another service trusts)."""
        return {s: self.catalog.service(s).approvers for s in self.plan.order}

    def required_approvals(self) -> int:
        """The strictest quorum of the train's services."""
        return max(self.catalog.approval_policy(s).required for s in self.plan.order)


# --- the lock -------------------------------------------------------------------------------


async def take_train_lock(train: Train) -> dict[str, gitops.Lease]:
    """Wait (bounded) until every lease can be taken at once; the run's state says who holds
    the one it waits for. Nothing is ever half-taken."""
    deadline = datetime.now(UTC) + LOCK_WAIT
    waiting_on: str | None = None
    while True:
        try:
            taken: dict[str, gitops.Lease] = await in_thread(
                train_git.take_train_leases,
                train.leases,
                train.plan.name,
                train.ttl.total_seconds(),
                **train.repo(),
            )
            break
        except LeaseHeld as exc:
            if datetime.now(UTC) >= deadline:
                raise
            if str(exc) != waiting_on:
                waiting_on = str(exc)
                await lifecycle.mark_waiting(f"waiting for production: {exc}")
        await anyio.sleep(LOCK_POLL_SECONDS)
    if waiting_on:
        await lifecycle.mark_waiting(None)
    return taken


def renew(train: Train) -> None:
    train_git.renew_train_leases(
        train.leases, train.ttl.total_seconds(), str(flow_run.id), **train.repo()
    )


def renewing(train: Train, *, until: timedelta) -> AbstractAsyncContextManager[None]:
    """Every lease of the train renewed every ``renew_period`` while a block runs, at most
    ``until``."""
    return renewing_every(
        lambda: renew(train),
        period=renew_period(train.ttl),
        until=until,
        what="train lease renewal",
    )


async def sync_all(train: Train, commit: str, order: list[str]) -> list[str]:
    """Sync each service's production app to ``commit`` (or later) in ``order``, each waited
    on until Synced and Healthy, renewing the leases meanwhile."""
    revisions = []
    async with renewing(train, until=SYNC_DEADLINE * len(order)):
        for name in order:
            cfg = train.configs[name]
            synced = await argocd.argocd_sync_and_wait(
                cfg.svc.environments["production"].argocd_app,
                commit,
                False,
                f"{int(SYNC_DEADLINE.total_seconds())}s",
                is_descendant=gitops.descendant_check(**train.repo()),
            )
            revisions.append(synced.revision)
    return revisions


# --- staging and approval -------------------------------------------------------------------


async def stage_all(train: Train, plans: dict[str, ReleasePlan], record: TrainRecord) -> None:
    """Every service through staging in dependency order, then the bundle smoke test."""
    for name in train.plan.order:
        try:
            await deploy_staging(plans[name], train.configs[name], record.services[name])
        except RoboticsCDError:
            record.failed = [name]
            raise
    await bundle_smoke(train, record)


async def bundle_smoke(train: Train, record: TrainRecord) -> None:
    """The bundle smoke test: each service's ``bundle_smoke`` paths (e.g. the gateway's
    endpoint that calls the planner) on staging, now that every service of the train runs
    there. Every URL and status goes to the record; any failure ends the train before its
    approval (VerificationFailed naming the service and the URL)."""
    failures = []
    for name in train.plan.order:
        target = train.configs[name].svc.environments["staging"]
        paths = train.configs[name].svc.bundle_smoke
        if not paths:
            continue
        results = await in_thread(smoke.bundle_smoke_test, target, paths)
        record.bundle_smoke += [
            {"service": name, "url": f"{target.base_url}{r.path}", "host": target.host}
            | r.model_dump()
            | {"ok": r.ok}
            for r in results
        ]
        failures += [
            f"{name}: GET {target.base_url}{r.path} (Host: {target.host}) → "
            f"{r.status or 'no answer'} after {r.attempts} tries"
            + (f" ({r.error})" if r.error else "")
            for r in results
            if not r.ok
        ]
    if failures:
        raise VerificationFailed(
            "bundle smoke test failed on staging: "
            + "; ".join(failures)
            + ". The services of the train do not work together: production untouched."
        )


async def approve_bundle(
    train: Train, plans: dict[str, ReleasePlan], record: TrainRecord
) -> ApprovalDecision:
    """One form for the bundle: the strictest quorum of its services, and the freeze windows
    of every service (a freeze in force is shown; the flow refuses to go on in it)."""
    required = train.required_approvals()
    windows = train.freeze_windows()
    heading = approval_heading(
        str(flow_run.id),
        required,
        active_freeze(windows, datetime.now(UTC)),
        next_freeze(windows, datetime.now(UTC)),
    )
    parts = [
        f"# Release train {train.plan.name}",
        "",
        f"Reason: {train.plan.reason or '(none given)'}",
        f"Order: {' → '.join(train.plan.order)}; train steps {train.plan.steps} "
        "(each service at its largest own step not above the train's).",
        "",
    ]
    for name in train.plan.order:
        diff = await in_thread(
            gitops.preview_production_change,
            name,
            plans[name].pull_image,
            **train.configs[name].git("production"),
        )
        parts.append(record_text.approval_description(record.services[name], diff))
    if record.bundle_smoke:
        parts.append(f"Bundle smoke test: {len(record.bundle_smoke)} path(s) passed")
    await in_thread(
        notify.send_chat,
        f"Approval needed: release train {train.plan.name}",
        f"{', '.join(train.plan.order)} passed staging together and wait for approval "
        "by an approver of each: "
        + "; ".join(f"{s}: {', '.join(a)}" for s, a in train.approvers_by_service().items())
        + ".",
        link=report.flow_run_url(flow_run.id),
    )
    emit_train_event("awaiting-approval", train.plan.name, train.images())
    return await wait_for_votes(
        train.plan.approvers,
        heading + "\n".join(parts),
        required=required,
        ui_authenticated=train.settings.ui_authenticated,
        cover=train.approvers_by_service(),
    )


# --- production -----------------------------------------------------------------------------


async def refuse_superseded(train: Train, plans: dict[str, ReleasePlan]) -> None:
    """Under every lease, before the first production write: when production already runs a
    service's commit or a newer one (a single release promoted it while the train waited),
    the whole train is refused (Superseded, naming the service), as a single release is:
    never part of a bundle, never an older build over a newer one."""
    for name in train.plan.order:
        try:
            await refuse_if_superseded(plans[name], train.configs[name])
        except Superseded as exc:
            raise Superseded(f"{name}: {exc}; the train releases nothing") from exc


def start_index(train: Train, record: LeaseRecord) -> int:
    """Where a re-executed train carries on: the first train step whose weights are at or
    above what the lease records (never back below what production runs)."""
    step = record.step
    if step is None or step.kind != StepKind.CANARY or not record.commits:
        return 0
    weight = step.weight or 0
    weights = train.plan.service(train.plan.order[0]).weights  # the first lease's service
    return next((i for i, w in enumerate(weights) if w >= weight), len(weights) - 1)


async def set_step(train: Train, index: int, record: TrainRecord) -> None:
    weights = train.plan.weights(index)
    commit = await in_thread(
        train_git.train_canary_step, train.plan.name, train.members, weights, **train.repo()
    )
    if commit.sha not in record.production_commits:
        record.production_commits.append(commit.sha)
    record.steps.append((train.plan.steps[index], weights, datetime.now(UTC)))
    for name, weight in weights.items():
        record.services[name].steps.append((weight, datetime.now(UTC)))
    emit_train_event(
        "step", train.plan.name, train.images(), {"step": train.plan.steps[index], **weights}
    )
    await sync_all(train, commit.sha, train.plan.order)


async def wait_window(train: Train, end: datetime) -> None:
    """Wait for the window to end, renewing the leases."""
    async with renewing(train, until=(end - datetime.now(UTC)) + timedelta(seconds=30)):
        while datetime.now(UTC) < end:
            await anyio.sleep(min(1.0, max(0.1, (end - datetime.now(UTC)).total_seconds())))


async def run_lockstep(train: Train, record: TrainRecord, first: int) -> None:
    """The train's canary: every service judged on the same window; ends ready to promote or
    raises CanaryFailed (naming the services that failed)."""
    log = get_run_logger()
    analysis = TrainAnalysis.start(train.plan).model_copy(update={"step_index": first})
    await set_step(train, first, record)
    window = train.plan.interval
    baselines: dict[str, TrackObservation] = {}
    for _ in range(analysis.max_intervals):
        end = datetime.now(UTC) + window
        await wait_window(train, end)
        verdicts: dict[str, IntervalVerdict] = {}
        for name in train.plan.order:
            cfg = train.configs[name]
            namespace = cfg.svc.environments["production"].namespace
            result = await in_thread(
                metrics.analyse_interval,
                name,
                namespace,
                cfg.svc.metrics,
                cfg.policy,
                end_time=end,
                window_seconds=window.total_seconds(),
                unavailable_is_inconclusive=True,
                stable_baseline=baselines.get(name),
                target=metrics.Target(
                    service=name, namespace=namespace, router=cfg.svc.traffic.router
                ),
            )
            if (result.observation.stable.requests or 0.0) >= cfg.policy.min_requests:
                baselines[name] = result.observation.stable
            verdicts[name] = result.analysis.model_copy(update={"end": end})
            record.services[name].analyses.append(result.analysis)
        decision = analysis.record(verdicts)
        log.info(
            "train step %s%%: %s (%s)",
            train.plan.steps[analysis.step_index],
            decision,
            analysis.reason,
        )
        await anyio.to_thread.run_sync(renew, train)
        if decision == Decision.ROLLBACK:
            record.failed = list(analysis.failed)
            raise CanaryFailed(analysis.reason)
        if decision == Decision.PROMOTE:
            record.notes.append(analysis.reason)
            return
        if decision == Decision.NEXT_STEP:
            await set_step(train, analysis.step_index, record)
    raise CanaryFailed(
        f"the train's analysis did not decide within {analysis.max_intervals} intervals"
    )


async def promote_and_watch(train: Train, record: TrainRecord) -> None:
    commit = await in_thread(
        train_git.train_promote, train.plan.name, train.members, **train.repo()
    )
    if commit.sha not in record.production_commits:
        record.production_commits.append(commit.sha)
    await sync_all(train, commit.sha, train.plan.order)
    watch_end = datetime.now(UTC) + train.plan.post_release_watch
    while datetime.now(UTC) < watch_end:
        end = min(watch_end, datetime.now(UTC) + train.plan.interval)
        await wait_window(train, end)
        window = max(1.0, train.plan.interval.total_seconds())
        for name in train.plan.order:
            cfg = train.configs[name]
            namespace = cfg.svc.environments["production"].namespace
            check = await in_thread(
                metrics.post_release_watch,
                name,
                namespace,
                cfg.svc.metrics,
                min_requests=cfg.policy.min_requests,
                end_time=end,
                window_seconds=window,
                target=metrics.Target(
                    service=name, namespace=namespace, router=cfg.svc.traffic.router
                ),
            )
            record.services[name].watch.append(check.analysis)
            if check.verdict == Verdict.FAIL:
                record.failed = [name]
                raise CanaryFailed(f"post-release watch of {name}: {check.analysis.reason}")


async def roll_back(train: Train, reason: str, record: TrainRecord) -> None:
    """ONE commit reverting every commit of the train (as its leases record them), then the
    syncs in reverse dependency order, then each service's smoke test."""
    leases = await in_thread(train_git.read_train_leases, train.leases, **train.repo())
    me = str(flow_run.id)
    recorded: list[str] = []
    for lease in leases.values():
        if lease is not None and lease.holder == me:
            recorded += [c for c in lease.commits if c not in recorded]
    revert = commits_to_revert(recorded or record.production_commits, set())
    order = train.plan.rollback_order
    members = sorted(train.members, key=lambda m: order.index(m.service))
    commit = await in_thread(
        train_git.train_revert, train.plan.name, members, revert, reason, **train.repo()
    )
    record.rollback_commit = commit.sha
    for name in train.plan.order:
        await _quarantine(train, name, commit.sha, reason, record)
    await sync_all(train, commit.sha, order)
    for name in order:
        svc = train.configs[name].svc
        record.services[name].rollback_verification = [
            r.model_dump()
            for r in await in_thread(smoke.smoke_test, svc.environments["production"], svc.smoke)
        ]


async def _quarantine(
    train: Train, name: str, commit: str, reason: str, record: TrainRecord
) -> None:
    """Only the services that failed carry the blame: their digests go to quarantine."""
    if name not in record.failed:
        return
    try:
        await quarantine.quarantine_image(
            name,
            train.plan.service(name).pull_image,
            commit,
            f"rolled back with train {train.plan.name}: {reason}",
            record.flow_run_id,
        )
    except RoboticsCDError as exc:
        get_run_logger().error("could not quarantine %s: %s", name, exc)
        record.notes.append(f"quarantine of {name} failed: {exc}")


async def restore_until_verified(train: Train, reason: str, record: TrainRecord) -> None:
    log = get_run_logger()
    deadline = time.monotonic() + train.settings.rollback_deadline.total_seconds()
    delay, attempt = 2.0, 0
    while True:
        attempt += 1
        try:
            await roll_back(train, reason, record)
            return
        except LeaseLost:
            raise
        except Exception as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RollbackFailed(
                    f"train {train.plan.name}: production not verified restored after "
                    f"{attempt} attempt(s): {exc}"
                ) from exc
            log.error(
                "train restore attempt %d failed (%s); retrying in %.0f s", attempt, exc, delay
            )
            record.notes.append(f"restore attempt {attempt} failed: {exc}")
            await anyio.sleep(min(delay, left))
            delay = min(delay * 2, 30.0)


def block_all(train: Train, why: str) -> None:
    """Production could not be restored: every lease of the train stays, blocked."""
    for name in train.plan.order:
        try:
            gitops.block_lease.fn(name, "production", why, str(flow_run.id), **train.repo())
        except RoboticsCDError as exc:
            get_run_logger().error("could not mark %s's lease blocked: %s", name, exc)


# --- the flow -------------------------------------------------------------------------------


def _plans(catalog: Catalog, plan: TrainPlan, shas: dict[str, str]) -> dict[str, ReleasePlan]:
    out = {}
    for s in plan.services:
        sha = s.source_sha or shas.get(s.service)
        if not sha:
            raise InvalidInput(
                f"train {plan.name}: no source commit for {s.service} (give source_shas, or "
                "start the train with `robotics-cd train-release`, which reads it from the "
                "image's revision label)"
            )
        out[s.service] = plan_release(catalog, s.service, s.image, sha)
    return out


async def bundle_parameters(catalog: Catalog, path: str, revision: str | None) -> dict[str, Any]:
    """The run's parameters from a pushed bundle file, checked before any write."""
    from tasks import handoff

    if not revision:
        raise InvalidInput(f"bundle_file {path}: give manifests_sha, the commit that pushed it")
    text = await in_thread(
        train_git.read_bundle_file,
        path,
        revision,
        repo_url=catalog.defaults.manifests_repo,
        branch=catalog.defaults.manifests_branch,
    )
    bundle = parse_bundle(text, file=path)
    if not bundle.reason:
        bundle = bundle.model_copy(update={"reason": f"bundle {path} at {revision[:12]}"})
    # Read at call time: the registry lookup is the handoff's (tests replace it there).
    _, parameters = await handoff.train_parameters(bundle, lookup=handoff._lookup_in_registry)
    return parameters


@flow(
    name="release-train",
    description="Several services released as one: staging in dependency order, one "
    "approval, every production lease in one atomic push, lockstep canaries, one promotion "
    "commit or one rollback commit for all.",
    persist_result=True,
)
async def release_train(
    services: dict[str, str] | None = None,
    source_shas: dict[str, str] | None = None,
    reason: str = "",
    name: str = "",
    steps: list[int] | None = None,
    provenance_override_reason: str | None = None,
    bundle_file: str | None = None,
    manifests_sha: str | None = None,
) -> State[Any]:
    """Release ``services`` (service → registry/repo:tag@digest) together.

    ``source_shas``: the commit each image was built from (``robotics-cd train-release``
    fills it from each image's revision label). ``name``: the train's (default: from the run).
    ``bundle_file`` + ``manifests_sha`` (a push of ``bundles/<name>.yaml``, from the webhook):
    the bundle is read from the manifests repo at that commit and checked as the CLI checks
    it (catalog, cycle, each image in the registry) before anything is written.
    """
    settings = get_settings()
    catalog = load_catalog(settings.catalog)
    if bundle_file:
        given = await bundle_parameters(catalog, bundle_file, manifests_sha)
        services, source_shas = given["services"], given["source_shas"]
        reason, name, steps = given["reason"], given["name"], given["steps"]
    if not services:
        raise InvalidInput("a release train needs services (service: image) or a bundle_file")
    bundle = Bundle(
        name=name or f"train-{str(flow_run.id)[:8]}",
        services={s: BundleService(image=i) for s, i in services.items()},
        reason=reason,
        steps=steps,
    )
    plan = plan_train(catalog, bundle)
    plans = _plans(catalog, plan, source_shas or {})
    train = Train(plan, catalog, settings)
    for svc in plan.order:
        refusal = await quarantine.quarantine_refusal(svc, plans[svc].image)
        if refusal is not None:
            return Failed(message=refusal, name="Quarantined")
    record = TrainRecord(
        name=plan.name,
        flow_run_id=str(flow_run.id),
        reason=plan.reason,
        order=plan.order,
        started_at=datetime.now(UTC),
        services={s: ReleaseRecord.start(plans[s], str(flow_run.id)) for s in plan.order},
    )
    for svc in plan.order:
        record.services[svc].notes.append(
            await images.verify_release_image(
                plans[svc].image,
                service=svc,
                source_sha=plans[svc].source_sha,
                override_reason=provenance_override_reason,
            )
        )
    emit_train_event("started", plan.name, train.images(), {"order": plan.order})

    try:
        await stage_all(train, plans, record)
    except RoboticsCDError as exc:  # nothing of production changed: the train ends here
        # A service's own staging failure is named here; the bundle smoke test names its
        # failing URLs itself.
        why = f"{', '.join(record.failed)}: {exc}" if record.failed else str(exc)
        return await in_thread(end, train, record, "staging-failed", why)
    await train.read_argocd_freezes()
    decision = await approve_bundle(train, plans, record)
    record.decision = decision
    if not decision.approved:
        return await in_thread(end, train, record, "rejected", decision.outcome())
    freeze = train.frozen()
    if freeze is not None:
        if decision.break_glass is None:
            # Nothing of production is held or changed: the train is started again after
            # the window (a single release waits suspended; a train does not, yet).
            return await in_thread(end, train, record, "frozen", freeze.describe())
        if train.argocd_refuses:  # Argo CD would refuse the syncs: nothing to break
            why = f"Argo CD refuses syncs of {', '.join(train.argocd_refuses)} now"
            return await in_thread(end, train, record, "frozen", f"{freeze.describe()}; {why}")
        record.notes.append(f"break-glass during a freeze: {decision.break_glass.describe()}")

    leases = await take_train_lock(train)
    first_lease = leases[train.leases[0]].record
    holds = True
    try:
        if first_lease.step is not None and first_lease.step.kind == StepKind.ROLLBACK:
            why = "rolled back before this re-execution (the leases record the rollback)"
            await roll_back(train, why, record)
            return await in_thread(end, train, record, "rolled-back", why)
        record.production_commits = list(first_lease.commits)
        if first_lease.step is None:  # a fresh start: production may have moved on since staging
            await refuse_superseded(train, plans)
        if first_lease.step is None or first_lease.step.kind == StepKind.CANARY:
            await run_lockstep(train, record, start_index(train, first_lease))
        await promote_and_watch(train, record)
    except Superseded as exc:  # before any production write: nothing to undo
        return await in_thread(end, train, record, "superseded", str(exc))
    except (LeaseLost, ControlPlaneLost) as exc:
        holds = False  # another run (or the reconciler) answers for production now
        record.notes.append(str(exc))
        raise
    except Exception as exc:  # any failure after production changed: ours, foreign, a bug
        if not record.production_commits:
            raise
        why = str(exc) if isinstance(exc, RoboticsCDError) else f"{type(exc).__name__}: {exc}"
        try:
            await restore_until_verified(train, why, record)
        except RollbackFailed as failed:
            holds = False
            await in_thread(block_all, train, str(failed))
            return await in_thread(end, train, record, "rollback-failed", str(failed))
        return await in_thread(end, train, record, "rolled-back", why)
    finally:
        if holds:
            try:
                await in_thread(train_git.release_train_leases, train.leases, **train.repo())
            except LeaseHeld as exc:
                get_run_logger().error("a lease of the train is not this run's any more: %s", exc)
        await in_thread(gitops.remove_clone, **train.repo())
    return await in_thread(end, train, record, "promoted", "")


def end(train: Train, record: TrainRecord, event: str, why: str) -> State[Any]:
    """The one record, the event, the chat message and the final state of the train."""
    record.outcome = {
        "promoted": "promoted",
        "rejected": why,
        "rolled-back": f"rolled back: {why}",
        "rollback-failed": f"rollback failed, production blocked: {why}",
        "staging-failed": f"staging failed, production untouched: {why}",
        "frozen": f"not released, production is frozen: {why}; start the train again after it",
        "superseded": f"superseded, production untouched: {why}",
    }[event]
    for name in train.plan.order:
        if record.services[name].analyses:
            report.publish_analysis_table(
                f"train-{train.plan.name}-{name}-analyses",
                record.services[name].analyses,
                steps=record.services[name].steps,
            )
    run_url = report.flow_run_url(flow_run.id)
    report.publish_markdown(
        f"train-{train.plan.name}",
        render_train_record(record, run_url=run_url),
        f"Release train {train.plan.name}: {record.outcome}",
    )
    emit_train_event(event, train.plan.name, train.images(), {"outcome": record.outcome})
    notify.send_chat(
        f"release train {train.plan.name} ({', '.join(train.plan.order)}): {record.outcome}",
        render_train_record(record),
        link=run_url,
    )
    if event == "promoted":
        return Completed(message=f"promoted {', '.join(train.plan.order)}", name="Promoted")
    if event == "rejected":
        return Completed(message=why, name="Rejected")
    if event == "frozen":
        return Completed(message=record.outcome, name="Frozen")
    if event == "staging-failed":
        return Failed(message=record.outcome, name="StagingFailed")
    if event == "superseded":
        return Failed(message=record.outcome, name="Superseded", data=Superseded(why))
    if event == "rollback-failed":
        return Failed(message=record.outcome, name="RollbackFailed", data=RollbackFailed(why))
    return Failed(message=record.outcome, data=CanaryFailed(why))
