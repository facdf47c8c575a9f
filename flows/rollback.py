"""The ``rollback`` flow: put an environment back by the same GitOps path.

    release rollback (a crashed or cancelled release, started by its hook or automation):
        take the release's lease over (its record says which commits are the release's)
        → may it? (``core.release.rollback_plan``: not when a newer release owns production)
        → one commit reverting exactly the release's own commits, pushed atomically with
          the lease → sync → wait healthy → smoke → the lease let go
    manual rollback (``robotics-cd rollback SERVICE``):
        stable image := the previously deployed one (or a given one), canary to 0, under the
        production lease → sync → wait healthy → smoke

Idempotent: a second run for the same release finds the commits already reverted and
commits nothing. Edits others made to the overlay in the meantime survive: only the
release's own commits are reverted.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from prefect.states import Completed

from core.catalog import load_catalog
from core.errors import InvalidInput, RoboticsCDError
from core.images import parse_reference
from core.release import rollback_plan
from core.settings import get_settings
from tasks import argocd, gitops, quarantine, smoke
from tasks.blocking import in_thread

ROLLBACK_LEASE_TTL = timedelta(hours=1)


@flow(
    name="rollback",
    description="Roll a service's environment back by a reverting commit and an Argo CD sync.",
    persist_result=True,
)
async def rollback(
    service: str,
    environment: Literal["staging", "production"] = "production",
    release_run_id: str | None = None,
    image: str | None = None,
    reason: str = "manual rollback",
) -> State[Any]:
    log = get_run_logger()
    catalog = load_catalog(get_settings().catalog)
    svc = catalog.service(service)
    target = svc.environments.get(environment)
    if target is None:
        raise InvalidInput(f"service {service!r} has no {environment!r} environment")
    if release_run_id and image:
        raise InvalidInput("give either release_run_id or image, not both")
    me = str(flow_run.id)
    repo = {
        "repo_url": catalog.defaults.manifests_repo,
        "branch": catalog.defaults.manifests_branch,
    }
    where = {"overlay": str(target.path), **repo}
    ttl = ROLLBACK_LEASE_TTL.total_seconds()

    if release_run_id:
        lease = await in_thread(
            gitops.take_over_lease, service, environment, release_run_id, ttl=ttl, **repo
        )
        facts = await in_thread(
            gitops.rollback_facts, service, environment, release_run_id, **where
        )
        recorded = lease.commits if lease.record.owner == release_run_id else []
        plan = rollback_plan(
            release_run_id,
            me=me,
            holder=lease.holder,
            holder_expired=False,
            recorded=recorded or facts.commits,
            already_reverted=facts.undone,
            later_releases=facts.later_runs,
        )
        if not plan.revert:
            await in_thread(gitops.release_lease, service, environment, **repo)
            message = (
                plan.refused or f"release {release_run_id} left nothing to revert in {environment}"
            )
            log.info(message)
            return Completed(message=message, name="NothingToRollBack")
        commit = await in_thread(
            gitops.revert_release,
            service,
            environment,
            plan.revert,
            f"rolled back release {release_run_id}: {reason}",
            release_run_id=release_run_id,
            **where,
        )
        if environment == "production":
            await _quarantine(service, commit.sha, reason, release_run_id, plan.revert)
    else:
        wanted = image if image else await in_thread(_previous_image, service, environment, where)
        ref = parse_reference(wanted)
        if ref.repository != svc.image or not ref.digest:
            raise InvalidInput(f"image {wanted!r} is not a pinned image of {svc.image!r}")
        if environment == "staging":
            commit = await in_thread(
                gitops.bump_image,
                "staging",
                service,
                str(ref),
                message=f"rollback: {reason}",
                **where,
            )
        else:
            await in_thread(gitops.take_lease, service, environment, ttl=ttl, **repo)
            commit = await in_thread(
                gitops.promote, service, str(ref), message=f"rollback: {reason}", **where
            )

    synced = await argocd.argocd_sync_and_wait(
        target.argocd_app,
        commit.sha,
        environment == "staging",
        is_descendant=gitops.descendant_check(**repo),
    )
    await in_thread(smoke.smoke_test, target, svc.smoke)
    # Verified: let the lease go. A restore that cannot be verified keeps it (and says so).
    if release_run_id or environment == "production":
        await in_thread(gitops.release_lease, service, environment, **repo)
    await in_thread(gitops.remove_clone, **repo)
    log.info(
        "%s %s back at %s (revision %s)",
        service,
        environment,
        commit.sha[:12],
        synced.revision[:12],
    )
    return Completed(message=f"rolled back {service} {environment} to {commit.sha[:12]}")


async def _quarantine(
    service: str, rollback_commit: str, reason: str, release_run_id: str, undone: list[str]
) -> None:
    """The rolled-back release's digest (from its commits' Image trailer) is quarantined; a
    failure here is loud but never holds up the revert's sync."""
    try:
        await quarantine.quarantine_image(
            service,
            None,
            rollback_commit,
            f"rolled back release {release_run_id}: {reason}",
            release_run_id,
            undone_commits=undone,
        )
    except RoboticsCDError as exc:
        get_run_logger().error("could not quarantine the image of %s: %s", release_run_id, exc)


def _previous_image(
    service: str, environment: Literal["staging", "production"], where: dict[str, str]
) -> str:
    previous: str | None = gitops.previous_image(
        service,
        environment,  # type: ignore[arg-type]
        **where,
    )
    if previous is None:
        raise InvalidInput(f"no earlier {service} image in {environment}'s history; pass --image")
    return previous
