"""The CI → release hand-off, and CI's commit statuses back to GitHub.

Hand-off: after CI shipped an image for a push to the default branch, :func:`hand_off` starts
the ``release`` deployment as a *top-level* run (``as_subflow=False``: a subflow cannot
suspend for its approval) with ``timeout=0`` (CI does not wait for a release that may wait
days for a human) and ``idempotency_key=release-<service>-<source sha>``: one release per
commit, whichever CI run hands it over. A retried or resumed CI run, a redelivered webhook,
and a replayed webhook body with a fresh delivery id (the signature covers only the body)
all reuse the release that exists, live or finished; their CI run may run again (it finds the
image and builds nothing), but it starts no second release. A deliberate re-release is the
operator's ``robotics-cd release SERVICE --image ... --reason ...``, which names who and why.
If Prefect will not start it, nothing is lost: the image is built,
pushed and recorded in CI's result; CI logs the failure, sets the ``robotics-cd/release``
commit status to ``error`` and writes an artifact with the exact command that starts the
release by hand.

Statuses: :func:`ci_status_hooks` gives the ci flow ``on_running`` / ``on_completion`` /
``on_failure`` / ``on_crashed`` / ``on_cancellation`` hooks that set the ``robotics-cd/ci``
commit status (pending → success / failure / error) with the flow run's Prefect URL as
``target_url``. A GitHub outage never fails CI: it is logged as a warning.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar, cast
from uuid import UUID

import anyio
from prefect import Flow, task
from prefect.artifacts import acreate_markdown_artifact
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey
from pydantic import BaseModel, Field

from core.catalog import load_catalog
from core.errors import GitHubError, InvalidInput, RoboticsCDError, TriggerError
from core.settings import get_settings
from tasks.logs import run_logger

CI_CONTEXT = "robotics-cd/ci"
RELEASE_CONTEXT = "robotics-cd/release"
_log = logging.getLogger("robotics_cd.handoff")


class Handoff(BaseModel):
    """What the hand-off did: the release run it started, or how to start it by hand."""

    deployment: str
    parameters: dict[str, Any]
    started: bool
    reused: bool = Field(
        default=False,
        description="The commit already had a release (live or finished): that one is kept.",
    )
    flow_run_id: str | None = None
    flow_run_url: str | None = None
    error: str | None = None
    command: str = Field(description="The exact command that starts this release by hand.")


def release_parameters(service: str, image: str, source_sha: str) -> dict[str, Any]:
    return {"service": service, "image": image, "source_sha": source_sha}


def release_key(service: str, source_sha: str) -> str:
    """The idempotency key of a commit's release: one per service and commit."""
    return f"release-{service}-{source_sha}"


def manual_command(deployment: str, parameters: dict[str, Any]) -> str:
    """``prefect deployment run`` with every parameter as JSON, quoted for a POSIX shell."""
    return shlex.join(
        ["prefect", "deployment", "run", deployment, "--params", json.dumps(parameters)]
    )


def flow_run_url(flow_run_id: str | UUID) -> str | None:
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=str(flow_run_id))


async def create_deployment_run(
    client: Any,
    deployment: str,
    *,
    parameters: dict[str, Any],
    idempotency_key: str | None,
    tags: list[str],
) -> tuple[Any, bool]:
    """Create a top-level run of ``deployment`` now; returns (flow run, created).

    ``created`` is False when the idempotency key matched an existing run of the flow: the
    server then answers 200 with that run instead of 201 (``run_deployment`` drops this).
    Raises ``ObjectNotFound`` for a deployment that is not there."""
    from prefect.client.schemas.actions import DeploymentFlowRunCreate
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Scheduled, to_state_create

    found = await client.read_deployment_by_name(deployment)
    body = DeploymentFlowRunCreate(
        parameters=parameters,
        state=to_state_create(Scheduled()),
        tags=tags,
        idempotency_key=idempotency_key,
    )
    response = await client.request(
        "POST",
        "/deployments/{id}/create_flow_run",
        path_params={"id": found.id},
        json=body.model_dump(mode="json", exclude_unset=True),
    )
    return FlowRun.model_validate(response.json()), response.status_code == 201


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a flaky API, not a deployment that is not there."""
    return not isinstance(state.data, DeploymentMissing)


class DeploymentMissing(TriggerError):
    pass


@task(
    name="start-release",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_worth_retrying,
)
async def start_release(
    deployment: str, parameters: dict[str, Any], idempotency_key: str
) -> tuple[str, bool]:
    """Create the release run (top level, not waited on), or find the one this key already
    made; returns (flow run id, created)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        async with get_client() as client:
            run, created = await create_deployment_run(
                client,
                deployment,
                parameters=parameters,
                idempotency_key=idempotency_key,
                tags=["handoff"],
            )
    except ObjectNotFound as exc:
        raise DeploymentMissing(
            f"deployment {deployment} not found on the Prefect server: serve it "
            "(`robotics-cd serve`) or register it (`robotics-cd deploy`)"
        ) from exc
    return str(run.id), created


async def hand_off(
    *,
    service: str,
    image: str,
    source_sha: str,
    ci_run_id: str | UUID,
    deployment: str | None = None,
) -> Handoff:
    """Start the release of a shipped image; never raises for a release that did not start."""
    deployment = deployment or get_settings().release_deployment
    parameters = release_parameters(service, image, source_sha)
    key = release_key(service, source_sha)
    command = manual_command(deployment, parameters)
    logger = run_logger("robotics_cd.handoff")
    state: Any = await start_release(deployment, parameters, key, return_state=True)  # type: ignore[misc]
    if state.is_completed():
        run_id, created = await state.aresult()
        run_id = str(run_id)
        url = flow_run_url(run_id)
        if not created:
            logger.warning(
                "commit %s of %s already has a release, flow run %s %s: it is kept, no "
                "second release starts (CI run %s). To release it again on purpose: "
                "robotics-cd release %s --image %s --operator NAME --reason TEXT",
                source_sha[:12],
                service,
                run_id,
                url or "",
                ci_run_id,
                service,
                image,
            )
            return Handoff(
                deployment=deployment,
                parameters=parameters,
                started=True,
                reused=True,
                flow_run_id=run_id,
                flow_run_url=url,
                command=command,
            )
        logger.info("release of %s started: flow run %s %s", image, run_id, url or "")
        await post_commit_status(
            service, source_sha, "pending", RELEASE_CONTEXT, f"release started for {image}", url
        )
        return Handoff(
            deployment=deployment,
            parameters=parameters,
            started=True,
            flow_run_id=run_id,
            flow_run_url=url,
            command=command,
        )
    error = await _failure_reason(state)
    logger.error(
        "release of %s NOT started (%s); the image is built and pushed. Start it by hand: %s",
        image,
        error,
        command,
    )
    await acreate_markdown_artifact(
        key=f"release-handoff-{service}",
        markdown=_failure_markdown(service, image, source_sha, deployment, error, command),
        description=f"Release of {service} at {source_sha[:7]} not started",
    )
    await post_commit_status(
        service,
        source_sha,
        "error",
        RELEASE_CONTEXT,
        f"release not started; run: {command}",
        flow_run_url(ci_run_id),
    )
    return Handoff(
        deployment=deployment, parameters=parameters, started=False, error=error, command=command
    )


async def _failure_reason(state: Any) -> str:
    try:
        await state.aresult()
    except Exception as exc:  # the task's own exception, re-raised by the state: report it
        return f"{type(exc).__name__}: {exc}"
    return state.message or "the release deployment could not be started"


def _failure_markdown(
    service: str, image: str, sha: str, deployment: str, error: str, command: str
) -> str:
    return (
        f"# Release of {service} not started\n\n"
        f"CI built and pushed `{image}` for commit `{sha}`, but the `{deployment}` "
        f"deployment could not be started:\n\n> {error}\n\n"
        "Nothing is lost: the image is in the registry. Once the deployment is served or "
        "deployed (`robotics-cd serve` / `robotics-cd deploy`), start the release by hand, "
        "once:\n\n"
        f"```sh\n{command}\n```\n"
    )


# --- the operator's deliberate re-release --------------------------------------------------

MANUAL_RELEASE_KEY = "operator-release"
ImageLookup = Callable[[str, str, str], Coroutine[Any, Any, Any]]


class ManualRelease(BaseModel):
    flow_run_id: str
    flow_run_url: str | None
    image: str = Field(description="registry/repository:tag@digest, as found in the registry.")
    source_sha: str
    earlier: list[str] = Field(description="Release runs of this commit before this one.")


async def _lookup_in_registry(registry: str, repository: str, tag: str) -> Any:
    from tasks.images import find_tagged_image

    return await find_tagged_image.fn(registry, repository, tag)


async def start_manual_release(
    *,
    service: str,
    image: str,
    operator: str,
    reason: str,
    source_sha: str | None = None,
    os_user: str = "",
    deployment: str | None = None,
    lookup: ImageLookup = _lookup_in_registry,
) -> ManualRelease:
    """``robotics-cd release``: a release of an image on purpose, even of a commit that was
    released before. Checked before anything starts: the image's repository is the service's,
    the tag is in the registry (with the digest given, if one is), and the source commit is
    known (``--sha``, or the image's revision label). The run carries no idempotency key, is
    tagged ``manual`` and ``operator:<name>``, and holds who and why as its
    ``operator-release`` input. ``operator`` must already be checked against the allowlist."""
    from prefect import get_client

    from core.images import parse_reference, validate_sha

    settings = get_settings()
    deployment = deployment or settings.release_deployment
    svc = load_catalog(settings.catalog).service(service)
    ref = parse_reference(image)
    if ref.repository != svc.image:
        raise InvalidInput(f"image {ref.repository!r} is not {service}'s repository {svc.image!r}")
    if not ref.tag:
        raise InvalidInput(f"image {image!r} needs its tag (registry/repository:tag[@digest])")
    found = await lookup(ref.registry, ref.repository, ref.tag)
    if found is None:
        raise InvalidInput(f"image {ref.tagged} is not in the registry {ref.registry}")
    if ref.digest and ref.digest != found.digest:
        raise InvalidInput(
            f"{ref.tagged} is {found.digest} in the registry {ref.registry}, not {ref.digest}"
        )
    sha = source_sha or found.revision
    if not sha:
        raise InvalidInput(
            f"{ref.tagged} has no revision label: say which commit it was built from (--sha)"
        )
    validate_sha(sha)
    if source_sha and found.revision and found.revision != source_sha:
        raise InvalidInput(
            f"{ref.tagged} was built from {found.revision}, not {source_sha} (its revision label)"
        )
    pinned = str(ref.with_digest(found.digest))
    record = {
        "operator": operator,
        "reason": reason,
        "os_user": os_user,
        "image": pinned,
        "at": datetime.now(UTC).isoformat(),
    }
    async with get_client() as client:
        earlier = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                idempotency_key=FlowRunFilterIdempotencyKey(any_=[release_key(service, sha)])
            )
        )
        run, _ = await create_deployment_run(
            client,
            deployment,
            parameters=release_parameters(service, pinned, sha),
            idempotency_key=None,
            tags=["manual", f"operator:{operator}"],
        )
        await client.create_flow_run_input(run.id, MANUAL_RELEASE_KEY, json.dumps(record))
    _log.info("release of %s started by %s (%s): %s", pinned, operator, reason, run.id)
    return ManualRelease(
        flow_run_id=str(run.id),
        flow_run_url=flow_run_url(run.id),
        image=pinned,
        source_sha=sha,
        earlier=[str(r.id) for r in earlier],
    )


# --- commit statuses -----------------------------------------------------------------------


async def post_commit_status(
    service: str,
    sha: str,
    state: str,
    context: str,
    description: str,
    target_url: str | None,
) -> bool:
    """Set a commit status on the service's GitHub repository; a failure is only a warning.

    Runs the GitHub client in a worker thread with the token loaded asynchronously, so it
    works from async hooks and tasks alike.
    """
    from tasks.github import GitHubCredentials, check_repo, check_sha

    settings = get_settings()
    logger = run_logger("robotics_cd.handoff")
    try:
        repo = check_repo(load_catalog(settings.catalog).service(service).github)
        check_sha(sha)
        credentials = await GitHubCredentials.aload()

        def post() -> None:
            with credentials.get_client() as gh:
                gh.set_commit_status(repo, sha, state, context, description, target_url)  # type: ignore[arg-type]

        await anyio.to_thread.run_sync(post)
    except (GitHubError, RoboticsCDError, ValueError) as exc:
        logger.warning("GitHub status %s=%s on %s not set: %s", context, state, sha[:7], exc)
        return False
    return True


Hook = Callable[[Any, Any, Any], Coroutine[Any, Any, None]]


def _status_hook(state: str, describe: Callable[[Any], str]) -> Hook:
    async def hook(flow: Any, flow_run: Any, run_state: Any) -> None:
        params = flow_run.parameters or {}
        service, sha = params.get("service"), params.get("sha")
        if not isinstance(service, str) or not isinstance(sha, str):
            return
        await post_commit_status(
            service, sha, state, CI_CONTEXT, describe(run_state), flow_run_url(flow_run.id)
        )

    hook.__name__ = f"github_status_{state}"
    return hook


def _message(prefix: str) -> Callable[[Any], str]:
    return lambda run_state: f"{prefix}: {run_state.message or run_state.name}"


def ci_status_hooks() -> dict[str, list[Any]]:
    """The state hooks, by ``@flow`` keyword: ``on_running``, ``on_completion``, ..."""
    return {
        "on_running": [_status_hook("pending", lambda _: "CI running: checks, build, scan")],
        "on_completion": [_status_hook("success", lambda _: "CI passed")],
        "on_failure": [_status_hook("failure", _message("CI failed"))],
        "on_crashed": [_status_hook("error", _message("CI crashed"))],
        "on_cancellation": [_status_hook("error", _message("CI cancelled"))],
    }


F = TypeVar("F", bound=Flow[Any, Any])


def with_ci_statuses(flow: F) -> F:
    """The same flow, reporting its state to GitHub as the ``robotics-cd/ci`` status of the
    ``sha`` parameter on the ``service`` parameter's repository (``ci = with_ci_statuses(ci)``)."""
    hooks = ci_status_hooks()
    wrapped = flow.with_options(
        on_running=flow.on_running_hooks + hooks["on_running"],
        on_completion=flow.on_completion_hooks + hooks["on_completion"],
        on_failure=flow.on_failure_hooks + hooks["on_failure"],
        on_crashed=flow.on_crashed_hooks + hooks["on_crashed"],
        on_cancellation=flow.on_cancellation_hooks + hooks["on_cancellation"],
    )
    return cast(F, wrapped)


__all__ = [
    "CI_CONTEXT",
    "RELEASE_CONTEXT",
    "Handoff",
    "ci_status_hooks",
    "hand_off",
    "manual_command",
    "post_commit_status",
    "start_release",
    "with_ci_statuses",
]


# --- release trains --------------------------------------------------------------------------


class StartedTrain(BaseModel):
    flow_run_id: str
    flow_run_url: str | None
    name: str
    order: list[str] = Field(description="The services in dependency order.")
    services: dict[str, str] = Field(description="Each service's image, pinned to its digest.")
    source_shas: dict[str, str]


async def train_parameters(
    bundle: Any, *, lookup: ImageLookup = _lookup_in_registry
) -> tuple[Any, dict[str, Any]]:
    """The ``release-train`` run's parameters from a bundle, checked before anything starts:
    the plan (every service in the catalog, no dependency cycle, each image the service's
    own), then each image in the registry (its digest, and its source commit from the
    revision label unless the bundle gives it). Returns (plan, parameters)."""
    from core.images import parse_reference
    from core.train import plan_train

    plan = plan_train(load_catalog(get_settings().catalog), bundle)
    images: dict[str, str] = {}
    shas: dict[str, str] = {}
    for svc in plan.services:
        ref = parse_reference(svc.image)
        found = await lookup(ref.registry, ref.repository, ref.tag or "")
        if found is None:
            raise InvalidInput(f"image {ref.tagged} ({svc.service}) is not in the registry")
        if ref.digest and ref.digest != found.digest:
            raise InvalidInput(
                f"{ref.tagged} is {found.digest} in the registry {ref.registry}, not {ref.digest}"
            )
        sha = svc.source_sha or found.revision
        if not sha:
            raise InvalidInput(
                f"{ref.tagged} has no revision label: give {svc.service}'s source_sha in a "
                "bundle file"
            )
        images[svc.service] = str(ref.with_digest(found.digest))
        shas[svc.service] = sha
    parameters = {
        "services": images,
        "source_shas": shas,
        "reason": plan.reason,
        "name": plan.name,
        "steps": list(plan.steps) if bundle.steps else None,
    }
    return plan, parameters


async def start_release_train(
    bundle: Any,
    *,
    operator: str = "",
    deployment: str | None = None,
    lookup: ImageLookup = _lookup_in_registry,
) -> StartedTrain:
    """Start the ``release-train`` deployment for a bundle (the CLI, or a bundle file pushed
    to the manifests repo). One run per train name and bundle content: a replayed trigger
    gets the same run."""
    import hashlib

    from prefect import get_client

    plan, parameters = await train_parameters(bundle, lookup=lookup)
    content = json.dumps(parameters, sort_keys=True).encode()
    key = f"release-train-{plan.name}-{hashlib.sha256(content).hexdigest()[:16]}"
    tags = ["train", f"train:{plan.name}"] + ([f"operator:{operator}"] if operator else [])
    async with get_client() as client:
        run, _ = await create_deployment_run(
            client,
            deployment or get_settings().release_train_deployment,
            parameters=parameters,
            idempotency_key=key,
            tags=tags,
        )
    return StartedTrain(
        flow_run_id=str(run.id),
        flow_run_url=flow_run_url(run.id),
        name=plan.name,
        order=plan.order,
        services=parameters["services"],
        source_shas=parameters["source_shas"],
    )
