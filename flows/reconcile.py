"""The ``reconcile`` flow: production is never left half-switched by a release that died.

    for each service's production lease (git):
        judge its holder from outside (``core.recovery.judge``): lease renewal, the holder's
        process on this host, its state in Prefect (an unreachable API is never silence)
        leave ─or─ free the lease ─or─ restore:
            take the lease over (compare-and-swap: of two reconcilers, one wins)
            → one fenced commit reverting the holder's recorded commits
            → Argo CD sync → smoke → free the lease → mark the dead run Crashed

It trusts nothing of the process that held the lease: only git, the Prefect API and the
process table. It runs as a served deployment on a schedule, once whenever ``serve`` starts,
and as ``robotics-cd reconcile``; the command needs no Prefect API (a reconciler that needs
the control plane could not recover from its outage). Idempotent: a second pass finds
nothing to do.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect import flow
from prefect.logging import get_logger
from pydantic import BaseModel

from core.catalog import Catalog, Service, load_catalog
from core.errors import LeaseHeld, RoboticsCDError
from core.recovery import Action, HolderFacts, LeaseFacts, RunPhase, judge
from core.release import rollback_plan
from core.settings import Settings, get_settings
from tasks import argocd, gitops, lifecycle, quarantine, smoke
from tasks.blocking import in_thread

log = get_logger("robotics_cd.reconcile")
TAKEOVER_TTL = timedelta(minutes=15)


class Reconciled(BaseModel):
    """What one pass did for one service."""

    service: str
    holder: str
    action: Action
    reason: str
    commit: str | None = None


def reconciler_id() -> str:
    """The lease holder name of a reconciler that runs outside a flow run."""
    return f"reconciler-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def process_alive(host: str | None, pid: int | None) -> bool | None:
    """Whether process ``pid`` on ``host`` lives; None when it cannot be seen from here."""
    if not host or pid is None or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is dead too
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


async def reconcile_service(
    name: str, svc: Service, catalog: Catalog, settings: Settings, *, me: str
) -> Reconciled | None:
    target = svc.environments.get("production")
    if target is None:
        return None
    lease = await in_thread(gitops.lease_holder.fn, name, "production", **_repo(catalog))
    if lease is None:
        return None
    record = lease.record
    phase = await lifecycle.run_phase(record.holder)
    if phase == RunPhase.MISSING and record.holder.startswith("reconciler-"):
        phase = RunPhase.ACTIVE  # a one-shot reconciler: judged by its lease and process
    verdict = judge(
        LeaseFacts(
            holder=record.holder,
            expires_at=record.expires_at,
            own_commits=tuple(record.commits),
            blocked=record.blocked,
        ),
        HolderFacts(phase=phase, process_alive=process_alive(record.host, record.pid)),
        datetime.now(UTC),
        outage_limit=settings.control_plane_outage,
    )
    done = Reconciled(
        service=name, holder=record.holder, action=verdict.action, reason=verdict.reason
    )
    if verdict.action == Action.LEAVE:
        return done
    release = record.owner
    try:
        commit: str | None = None
        whole = record.train is not None
        if whole:
            try:
                commit = await restore_train(
                    lease,
                    catalog,
                    me=me,
                    reason=f"reconciler: {verdict.reason}",
                    revert=verdict.action == Action.RESTORE,
                )
            except PartialTrain as exc:  # some lease freed by hand: this service on its own
                log.warning("%s production: %s; restoring this service alone", name, exc)
                whole = False
        if not whole:
            commit = await restore_release(
                name,
                svc,
                catalog,
                release,
                me=me,
                reason=f"reconciler: {verdict.reason}",
                revert=verdict.action == Action.RESTORE,
            )
    except LeaseHeld as exc:  # another reconciler (or rollback run) acts for it now
        return done.model_copy(update={"action": Action.LEAVE, "reason": str(exc)})
    if verdict.mark_crashed or phase == RunPhase.ACTIVE:
        what = f"reverted {commit[:12]}" if commit else "nothing to revert"
        await lifecycle.mark_crashed(
            release, f"the reconciler restored production ({what}): {verdict.reason}"
        )
    log.warning("%s production: %s (%s)", name, verdict.action.value, verdict.reason)
    return done.model_copy(update={"commit": commit})


def _repo(catalog: Catalog) -> dict[str, str]:
    return {
        "repo_url": catalog.defaults.manifests_repo,
        "branch": catalog.defaults.manifests_branch,
    }


def commits_to_undo(name: str, svc: Service, catalog: Catalog, release: str) -> list[str]:
    """What restoring production for ``release`` would revert now (nothing is written)."""
    repo = _repo(catalog)
    lease = gitops.lease_holder.fn(name, "production", **repo)
    overlay = {"overlay": str(svc.environments["production"].path), **repo}
    facts = gitops.rollback_facts.fn(name, "production", release, **overlay)
    recorded = lease.commits if lease is not None and lease.record.owner == release else []
    plan = rollback_plan(
        release,
        me=release,
        holder=lease.holder if lease is not None else None,
        holder_expired=lease is None or lease.expired(datetime.now(UTC)),
        recorded=recorded or facts.commits,
        already_reverted=facts.undone,
        later_releases=facts.later_runs,
    )
    return plan.revert


async def restore_release(
    name: str,
    svc: Service,
    catalog: Catalog,
    release: str,
    *,
    me: str,
    reason: str,
    revert: bool = True,
) -> str | None:
    """Take the lease of ``release`` over (compare-and-swap), revert its recorded commits in
    one fenced commit, sync, smoke, free the lease. The restoring commit, or None when there
    was nothing to revert. LeaseHeld when another live run holds production."""
    target = svc.environments["production"]
    repo = _repo(catalog)
    taken = await in_thread(
        gitops.take_over_lease.fn,
        name,
        "production",
        release,
        me,
        ttl=TAKEOVER_TTL.total_seconds(),
        **repo,
    )
    commit: str | None = None
    if revert:
        overlay = {"overlay": str(target.path), **repo}
        facts = await in_thread(gitops.rollback_facts.fn, name, "production", release, **overlay)
        plan = rollback_plan(
            release,
            me=me,
            holder=taken.holder,
            holder_expired=False,
            recorded=taken.commits if taken.record.owner == release else facts.commits,
            already_reverted=facts.undone,
            later_releases=facts.later_runs,
        )
        if plan.revert:
            written = await in_thread(
                gitops.revert_release.fn,
                name,
                "production",
                plan.revert,
                reason,
                release_run_id=release,
                holder=me,
                **overlay,
            )
            commit = written.sha
            _quarantine(name, written.sha, reason, release, plan.revert, repo)
        if not plan.refused:
            # Also when the revert was written before (by the release, whose sync failed):
            # production is restored only once Argo CD runs it.
            await argocd.argocd_sync_and_wait.fn(
                target.argocd_app,
                commit if commit else await in_thread(gitops.head_commit.fn, **repo),
                False,
                is_descendant=gitops.descendant_check(**repo),
            )
            await in_thread(smoke.smoke_test.fn, target, svc.smoke)
    await in_thread(gitops.release_lease.fn, name, "production", me, **repo)
    return commit


class PartialTrain(Exception):
    """The dead train no longer holds every one of its leases: it is not restored whole."""


async def restore_train(
    lease: gitops.Lease, catalog: Catalog, *, me: str, reason: str, revert: bool = True
) -> str | None:
    """A dead release train: every lease it still holds taken over in ONE atomic push, ONE
    commit reverting every commit it recorded across every overlay, syncs in reverse
    dependency order, smoke tests, every lease freed. LeaseHeld when another live run holds
    any of them. No image is quarantined: which service failed died with the train."""
    from core.images import parse_reference
    from core.release import commits_to_revert
    from tasks.gitops import train as train_git

    ref = lease.record.train
    if ref is None:
        raise ValueError(f"lease {lease.name} is not a release train's")
    dead = lease.holder
    repo_kw = _repo(catalog)
    _, repo = train_git.train_repo(me, **repo_kw)
    current = repo.read_leases(ref.leases)
    names = [n for n, held in current.items() if held is not None and held.holder == dead]
    if set(names) != set(ref.leases):
        raise PartialTrain(
            f"train {ref.name}'s run {dead} holds only {', '.join(names) or 'none'} of "
            f"{', '.join(ref.leases)}"
        )
    recorded: list[str] = []
    for n in names:
        recorded += [c for c in current[n].commits if c not in recorded]  # type: ignore[union-attr]
    repo.take_train(names, me, TAKEOVER_TTL, ref.name)  # compare-and-swap, all or none
    services = [n.removesuffix("-production") for n in ref.leases]  # dependency order
    commit: str | None = None
    if revert and recorded:
        members = [
            train_git.TrainMember(
                service=s,
                overlay=str(catalog.service(s).environments["production"].path),
                lease=f"{s}-production",
                # Unused by a revert (it writes no image); a member names one all the same.
                image=parse_reference(
                    f"{catalog.defaults.pull_registry}/{catalog.service(s).image}:restore"
                ),
                replicas=0,
            )
            for s in reversed(services)
        ]
        written = repo.train_revert(
            train=ref.name,
            members=members,
            commits=commits_to_revert(recorded, set()),
            holder=me,
            reason=reason,
        )
        commit = written.sha
        for s in reversed(services):  # the callers first: reverse dependency order
            target = catalog.service(s).environments["production"]
            await argocd.argocd_sync_and_wait.fn(
                target.argocd_app, commit, False, is_descendant=gitops.descendant_check(**repo_kw)
            )
            await in_thread(smoke.smoke_test.fn, target, catalog.service(s).smoke)
    repo.release_train(names, me)
    return commit


def _quarantine(
    service: str,
    rollback_commit: str,
    reason: str,
    release: str,
    undone: list[str],
    repo: dict[str, str],
) -> None:
    """The dead release's digest goes to ``quarantine/<svc>.yaml``, right after the revert; a
    failure is loud but never holds up the restore."""
    try:
        digest, _ = quarantine.quarantine_rollback(
            service,
            None,
            rollback_commit,
            reason,
            release,
            undone,
            repo_url=repo["repo_url"],
            branch=repo["branch"],
        )
    except RoboticsCDError as exc:
        log.error("%s: could not quarantine the image of %s: %s", service, release, exc)
        return
    log.warning("%s: quarantined %s of release %s", service, digest, release)


async def reconcile_once(
    catalog: Catalog | None = None, settings: Settings | None = None, *, me: str | None = None
) -> list[Reconciled]:
    """One pass over every service; an error on one service does not stop the others."""
    settings = settings or get_settings()
    catalog = catalog or load_catalog(settings.catalog)
    me = me or reconciler_id()
    results: list[Reconciled] = []
    for name, svc in catalog.services.items():
        try:
            done = await reconcile_service(name, svc, catalog, settings, me=me)
        except RoboticsCDError as exc:
            log.error("%s production: reconcile failed, next pass retries: %s", name, exc)
            continue
        if done is not None:
            results.append(done)
    results.extend(await end_dead_runs(holders={r.holder for r in results}))
    return results


async def end_dead_runs(*, holders: set[str]) -> list[Reconciled]:
    """Release runs that Prefect shows Running whose process on this host is dead, and
    that hold no production lease (the lease pass above answers for those): a runner that
    died in staging, or while waiting for the lock, changed nothing in production; the run
    ends Crashed, saying so, instead of staying Running forever without the automations."""
    try:
        running = await lifecycle.running_runs("release")
    except Exception as exc:  # the control plane, not the runs: judge nothing
        log.warning("Prefect API did not answer; dead runs are judged next pass: %s", exc)
        return []
    ended: list[Reconciled] = []
    for run in running:
        if run.run_id in holders or process_alive(run.host, run.pid) is not False:
            continue
        why = f"its process {run.host}:{run.pid} is dead ({run.state_name}); it held no lease"
        if await lifecycle.mark_crashed(
            run.run_id, f"the reconciler ended it: {why}, production untouched"
        ):
            log.warning("release %s: %s; marked Crashed", run.run_id, why)
            ended.append(
                Reconciled(
                    service=run.service, holder=run.run_id, action=Action.END_RUN, reason=why
                )
            )
    return ended


@flow(
    name="reconcile",
    description="Find production leases whose release died or stopped renewing, restore "
    "production by reverting that release's commits, free the lease, mark the run Crashed.",
)
async def reconcile() -> list[Reconciled]:
    from prefect.runtime import flow_run

    return await reconcile_once(me=str(flow_run.id) if flow_run.id else None)
