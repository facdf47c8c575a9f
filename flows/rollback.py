"""The ``rollback`` flow: put an environment back by the same GitOps path.

    release rollback (a crashed or cancelled release, started by its hook or automation):
        the release's commits → one commit restoring the overlay to its tree before them
        → sync → wait healthy → smoke → the release's lease let go
    manual rollback (``robotics-cd rollback SERVICE``):
        stable image := the previously deployed one (or a given one), canary to 0
        → sync → wait healthy → smoke

Idempotent: a second run for the same release finds the overlay already restored and
commits nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Completed

from core.catalog import load_catalog
from core.errors import InvalidInput
from core.images import parse_reference
from core.settings import get_settings
from tasks import argocd, gitops, smoke


@flow(
    name="rollback",
    description="Roll a service's environment back by a restoring commit and an Argo CD sync.",
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

    if release_run_id:
        commits = gitops.release_commits.with_options(cache_policy=NO_CACHE)(
            service, environment, release_run_id
        )
        if not commits:
            gitops.release_lease.with_options(cache_policy=NO_CACHE)(
                service, environment, holder=release_run_id
            )
            return Completed(
                message=f"release {release_run_id} never changed {environment}",
                name="NothingToRollBack",
            )
        commit = gitops.restore_overlay(
            service,
            environment,
            f"{commits[0]}^",
            f"rolled back release {release_run_id}: {reason}",
            undone_commits=commits,
        )
    else:
        wanted = image or _previous_image(service, environment)
        ref = parse_reference(wanted)
        if ref.repository != svc.image or not ref.digest:
            raise InvalidInput(f"image {wanted!r} is not a pinned image of {svc.image!r}")
        if environment == "staging":
            commit = gitops.bump_image("staging", service, str(ref), message=f"rollback: {reason}")
        else:
            commit = gitops.promote(service, str(ref), message=f"rollback: {reason}")

    synced = await argocd.argocd_sync_and_wait(
        target.argocd_app, commit.sha, environment == "staging", is_descendant=gitops.descends
    )
    smoke.smoke_test(target, svc.smoke)
    if release_run_id:
        gitops.release_lease.with_options(cache_policy=NO_CACHE)(
            service, environment, holder=release_run_id
        )
    log.info(
        "%s %s back at %s (revision %s)",
        service,
        environment,
        commit.sha[:12],
        synced.revision[:12],
    )
    return Completed(message=f"rolled back {service} {environment} to {commit.sha[:12]}")


def _previous_image(service: str, environment: Literal["staging", "production"]) -> str:
    previous: str | None = gitops.previous_image.with_options(cache_policy=NO_CACHE)(
        service,
        environment,  # type: ignore[arg-type]
    )
    if previous is None:
        raise InvalidInput(f"no earlier {service} image in {environment}'s history; pass --image")
    return previous
