"""The training flows.

``training-image``: a push to the training repo → checkout → build → scan → push
``robotics-training/vision-train:<YYYYMMDD-sha7>`` → record it as the latest training image
(a Prefect Variable) → "新训练镜像已就绪" to the team's chat. A rerun for the same commit finds
the image in the registry and builds, pushes and notifies nothing twice.

``train``: what an ML engineer starts from the Prefect UI or ``robotics-cd train``: validate
the parameters (shape, the namespace's limits, no plain credentials in env) → resolve the
image (it must be in the registry) → submit a PyTorchJob or a Trainer v2 TrainJob (the
training image's ``api``, or the run's) named after the flow run (a rerun of the run adopts
its job; a retry after a failure deletes the failed job and resumes from the last checkpoint
the earlier attempt logged) → watch it to its end while the master's / node 0's log streams
into the run's log → a progress artifact (epoch, step, ETA), the node-0 log as an artifact,
and a summary artifact. A failed job fails the run with the job's reason and the last log
lines; a cancelled run deletes the job and reports what ran; a run whose deadline passes
deletes the job.

This module only orders tasks; every outside system is reached in ``tasks/``.
"""

# No ``from __future__ import annotations`` here: Prefect validates the flows' parameters
# from their real annotations, also when it loads this file by path (a served deployment).
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect import flow, get_client, get_run_logger, runtime
from prefect.artifacts import acreate_markdown_artifact, acreate_progress_artifact
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)
from prefect.client.schemas.objects import FlowRun, State
from prefect.client.schemas.sorting import ArtifactSort
from prefect.logging.loggers import flow_run_logger
from prefect.variables import Variable
from pydantic import BaseModel, Field

from core.catalog import Catalog, TrainingImage, load_catalog
from core.errors import InvalidInput, TrainingFailed
from core.images import ImageRef, validate_sha
from core.training import (
    ANNOTATION_RESUMED_FROM,
    BUILDERS,
    KINDS,
    PYTORCHJOB,
    TRAINJOB,
    Api,
    JobKind,
    TrainingProgress,
    TrainParams,
    check_limits,
    checkpoint_location,
    job_duration_seconds,
    job_name,
    job_state,
    parse_train_params,
    summary_markdown,
)
from flows.ship import ship_image
from tasks.blocking import in_thread
from tasks.images import find_tagged_image
from tasks.kube import (
    delete_job,
    delete_training_job,
    follow_training_job,
    get_training_job,
    load_credentials,
    read_job,
    read_node0_log,
    submit_training_job,
)
from tasks.notify import send_chat
from tasks.source import checkout, remove_checkout

READY_TITLE = "新训练镜像已就绪"
# The flow's own wait outlives the job's activeDeadlineSeconds by this much, so the
# controller's verdict (with its reason) normally arrives first.
DEADLINE_GRACE_SECONDS = 120


def latest_variable(image: str) -> str:
    """Name of the Prefect Variable holding the latest image of a training image."""
    return f"latest-training-image-{image}"


class TrainingImageRecord(BaseModel):
    """The latest training image, as the Prefect Variable holds it."""

    image: str = Field(description="Catalog name of the training image.")
    ref: str = Field(description="registry/repository:tag@sha256:... as pushed.")
    tag: str
    digest: str
    sha: str
    committed_at: datetime
    notified: bool = Field(default=False, description="The chat has been told about it.")


class TrainResult(BaseModel):
    job: str = Field(description="namespace/name of the training job.")
    kind: str = Field(default="PyTorchJob", description="PyTorchJob or TrainJob.")
    phase: str
    condition: str
    image: str
    image_digest: str | None = None
    duration_seconds: float | None = None
    checkpoint: str | None = None
    resumed_from: str | None = Field(
        default=None, description="Checkpoint of an earlier attempt this one resumed from."
    )


# --- training-image ----------------------------------------------------------------------------


async def _read_latest(image: str) -> TrainingImageRecord | None:
    raw: Any = await Variable.aget(latest_variable(image))
    return TrainingImageRecord.model_validate(raw) if isinstance(raw, dict) else None


async def _write_latest(record: TrainingImageRecord) -> None:
    await Variable.aset(
        latest_variable(record.image), record.model_dump(mode="json"), overwrite=True
    )


async def _record_latest(record: TrainingImageRecord) -> TrainingImageRecord | None:
    """Make ``record`` the latest unless a newer commit's image already is; the record that
    stands for this image afterwards (None if a newer image is the latest)."""
    current = await _read_latest(record.image)
    if current is not None and current.digest == record.digest:
        return current
    if current is not None and current.committed_at > record.committed_at:
        return None
    await _write_latest(record)
    return record


def _ready_message(record: TrainingImageRecord, entry: TrainingImage, subject: str) -> str:
    return (
        f"**{entry.image}:{record.tag}**\n\n"
        f"- commit: `{record.sha[:7]}` {subject}\n"
        f"- image: `{record.ref}`\n"
        f"- start a run: `robotics-cd train --experiment <name> --image-tag {record.tag}`"
    )


@flow(name="training-image", flow_run_name="training-image {image} {sha:.7}")
async def training_image(
    sha: str, image: str = "vision-train", ref: str | None = None
) -> TrainingImageRecord:
    """Build, scan and push the training image of commit ``sha``; record and announce it.

    ``ref`` is the pushed ref the webhook saw (for the log only: what to build is ``sha``).
    """
    validate_sha(sha)
    logger = get_run_logger()
    if ref:
        logger.info("training image %s for %s at %s", image, ref, sha[:7])
    catalog: Catalog = load_catalog()
    entry = catalog.training_image(image)
    registry = catalog.defaults.push_registry
    co = await checkout(entry.repo, sha, label=image)
    try:
        shipped = await ship_image(
            co,
            registry=registry,
            repository=entry.image,
            github=entry.github,
            build=entry.build,
            scan_policy=catalog.scan_policy(image),
        )
        if shipped.reused:
            logger.info("%s is already in the registry: nothing to build or push", shipped.ref)
    finally:
        await remove_checkout(co.path)
    tag = shipped.tag
    record = TrainingImageRecord(
        image=image,
        ref=shipped.ref,
        tag=tag,
        digest=shipped.digest,
        sha=co.sha,
        committed_at=co.committed_at,
    )
    latest = await _record_latest(record)
    if latest is None:
        logger.info("a newer commit's image is the latest training image; %s not announced", tag)
        return record
    if not latest.notified:
        await in_thread(
            send_chat,
            READY_TITLE,
            _ready_message(latest, entry, co.subject),
            channels=entry.notify or None,
            link=runtime.flow_run.ui_url,
        )
        latest = latest.model_copy(update={"notified": True})
        await _write_latest(latest)
    await acreate_markdown_artifact(
        key=f"training-image-{image}",
        markdown=f"# {READY_TITLE}\n\n" + _ready_message(latest, entry, co.subject),
        description=f"training image {entry.image}:{tag}",
    )
    return latest


# --- train -------------------------------------------------------------------------------------


async def _resolve_image(
    params: TrainParams, catalog: Catalog, entry: TrainingImage
) -> tuple[str, str | None]:
    """(image reference for the pods, its digest): the tag must exist in the registry."""
    tag = params.image_tag
    if tag is None:
        latest = await _read_latest(params.training_image)
        if latest is None:
            raise InvalidInput(
                f"image_tag: no {params.training_image} image has been built yet; run the "
                "training-image flow or give image_tag"
            )
        tag = latest.tag
    found = await find_tagged_image(catalog.defaults.push_registry, entry.image, tag)
    if found is None:
        raise InvalidInput(
            f"image_tag: {entry.image}:{tag} is not in the registry "
            f"{catalog.defaults.push_registry}; pick a pushed tag (the training-image flow "
            "announces each one)"
        )
    # The cluster pulls from the pull registry, by the same tag (tags are never overwritten).
    ref = ImageRef(catalog.defaults.pull_registry, entry.image, tag)
    return ref.tagged, found.digest


@dataclass(frozen=True)
class JobTarget:
    """Where this flow run's job lives and which API it speaks."""

    name: str
    namespace: str
    api: Api
    kind: JobKind
    runtime: str


def _with_catalog(params: TrainParams, catalog: Catalog) -> tuple[TrainParams, JobTarget]:
    """The parameters with the catalog's ``api``/``runtime`` filled in (and validated for
    that API), checked against the namespace's limits."""
    entry = catalog.training_image(params.training_image)
    api: Api = params.api or entry.api
    update: dict[str, Any] = {"api": api}
    if api == "trainjob":
        update["runtime"] = params.runtime or entry.runtime
    params = parse_train_params({**params.model_dump(mode="json"), **update})
    check_limits(params, catalog.limits.get(entry.namespace), entry.namespace)
    return params, JobTarget(
        name="",
        namespace=entry.namespace,
        api=api,
        kind=KINDS[api],
        runtime=params.runtime or entry.runtime,
    )


def _target(params: TrainParams, flow_run_id: str) -> tuple[TrainParams, JobTarget]:
    """(validated parameters, job of this flow run): the same on every rerun of the run."""
    params, target = _with_catalog(params, load_catalog())
    name = job_name(params.experiment, flow_run_id)
    return params, JobTarget(name, target.namespace, target.api, target.kind, target.runtime)


def log_artifact_key(experiment: str) -> str:
    return f"train-{experiment}-log"


def log_markdown(target: JobTarget, lines: list[str], note: str = "") -> str:
    """The node-0 log as a markdown artifact (kept after the pods are gone)."""
    who = "master" if target.kind == PYTORCHJOB else "node 0"
    head = f"# {target.kind.kind} {target.namespace}/{target.name}: {who} log\n\n"
    if note:
        head += note + "\n\n"
    body = "\n".join(line.replace("```", "`\u200b``") for line in lines) or "(no log lines)"
    return head + "```\n" + body + "\n```\n"


async def _last_checkpoint_of_run(flow_run_id: str, experiment: str) -> str | None:
    """The last checkpoint an earlier attempt of this run logged, from its kept log
    artifacts (the newest attempt first)."""
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]),
                key=ArtifactFilterKey(any_=[log_artifact_key(experiment)]),
            ),
            sort=ArtifactSort.CREATED_DESC,
        )
    for artifact in found:
        checkpoint = None
        for line in str(artifact.data or "").splitlines():
            checkpoint = checkpoint_location(line) or checkpoint
        if checkpoint:
            return checkpoint
    return None


async def _prepare_attempt(target: JobTarget, params: TrainParams, flow_run_id: str) -> str | None:
    """Before submitting: a retried run whose earlier attempt's job failed (or is gone)
    deletes that job and resumes from the last checkpoint it logged; a job that still runs
    or has completed is adopted by the submit. The checkpoint to resume from, or None."""
    logger = get_run_logger()
    previous = await get_training_job(target.name, target.namespace, target.kind)
    if previous is not None:
        state = job_state(previous)
        if not state.finished or state.succeeded:
            return (previous["metadata"].get("annotations") or {}).get(ANNOTATION_RESUMED_FROM)
    attempt = runtime.flow_run.run_count
    checkpoint = await _last_checkpoint_of_run(flow_run_id, params.experiment)
    if previous is not None:
        logger.info(
            "attempt %d: the earlier attempt's %s %s/%s ended %s; deleting it to start again",
            attempt,
            target.kind.kind,
            target.namespace,
            target.name,
            job_state(previous).condition,
        )
        await delete_training_job(target.name, target.namespace, target.kind, wait=True)
    if checkpoint and not params.kept(checkpoint):
        logger.warning(
            "attempt %d: the last checkpoint %s is not on a writable volume (it went with the "
            "pods); starting from scratch",
            attempt,
            checkpoint,
        )
        checkpoint = None
    if checkpoint:
        logger.info("attempt %d resumes from checkpoint %s", attempt, checkpoint)
    elif previous is not None:
        logger.info("attempt %d: no checkpoint was logged before; starting from scratch", attempt)
    return checkpoint


async def delete_job_of_run(flow: Any, flow_run: FlowRun, state: State) -> None:
    """``on_cancellation`` hook: the run is going away, so its job (and pods) must too.

    Before deleting, the node-0 log is read and kept as the run's log artifact, and a
    "cancelled" artifact reports what ran: the epochs reached and the last checkpoint.
    """
    logger = flow_run_logger(flow_run, flow)
    try:
        raw = parse_train_params((flow_run.parameters or {}).get("params") or {})
        _, target = _target(raw, str(flow_run.id))
        credentials = await load_credentials()
        job = await read_job(credentials, target.name, target.namespace, target.kind)
        lines = await read_node0_log(credentials, target.name, target.namespace, target.kind)
        deleted = await delete_job(credentials, target.name, target.namespace, target.kind)
    except Exception:
        # A hook's failure is only logged by Prefect; say which job may be left behind.
        logger.exception("cancelled run %s: could not delete its training job", flow_run.id)
        raise
    what = f"{target.kind.kind} {target.namespace}/{target.name}"
    report = cancel_report(target, raw, job, lines, deleted)
    async with get_client() as client:
        for key, markdown, description in (
            (
                log_artifact_key(raw.experiment),
                log_markdown(target, lines, "The run was cancelled; the job was deleted."),
                f"{what}: node-0 log (cancelled)",
            ),
            (f"train-{raw.experiment}-cancelled", report, f"{what}: cancelled"),
        ):
            await client.create_artifact(
                ArtifactCreate(
                    key=key,
                    type="markdown",
                    data=markdown,
                    description=description,
                    flow_run_id=flow_run.id,
                )
            )
    logger.info(
        "cancelled run %s: %s %s", flow_run.id, what, "deleted" if deleted else "was not there"
    )


def cancel_report(
    target: JobTarget,
    params: TrainParams,
    job: dict[str, Any] | None,
    lines: list[str],
    deleted: bool,
) -> str:
    """What a cancelled run had done: phase, epochs and steps reached, last checkpoint."""
    progress = TrainingProgress()
    checkpoint = None
    for line in lines:
        progress.feed(line, 0.0)
        checkpoint = checkpoint_location(line) or checkpoint
    rows = [
        (target.kind.kind, f"`{target.namespace}/{target.name}`"),
        ("experiment", params.experiment),
        ("phase when cancelled", job_state(job).condition if job else "not submitted"),
        ("progress", progress.describe() or "no epoch finished"),
        ("last checkpoint", f"`{checkpoint}`" if checkpoint else "none"),
        ("job", "deleted, with its pods" if deleted else "was not there"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = f"# Training {params.experiment}: cancelled\n\n| | |\n|---|---|\n{table}\n"
    if lines:
        text += "\n## Last log lines (node 0)\n\n```\n" + "\n".join(lines[-20:]) + "\n```\n"
    return text


@flow(
    name="train",
    flow_run_name="train {params.experiment}",
    on_cancellation=[delete_job_of_run],
)
async def train(params: TrainParams) -> TrainResult:
    """Run a distributed training job (Kubeflow PyTorchJob or Trainer v2 TrainJob) to its end.

    Retried after a failure (Prefect's Retry, or ``retries`` on the deployment), it resumes
    from the last checkpoint the earlier attempt logged.
    """
    logger = get_run_logger()
    flow_run_id = str(runtime.flow_run.id)
    params, target = _target(parse_train_params(params), flow_run_id)
    catalog = load_catalog()
    entry = catalog.training_image(params.training_image)
    name, namespace, kind = target.name, target.namespace, target.kind
    what = f"{kind.kind} {namespace}/{name}"
    image_ref, digest = await _resolve_image(params, catalog, entry)
    resume_from = await _prepare_attempt(target, params, flow_run_id)
    _, build = BUILDERS[target.api]
    body = build(
        params,
        image_ref,
        name,
        namespace,
        flow_run_id,
        resume_from=resume_from,
        runtime=target.runtime,
    )
    shape = (
        f"{params.nodes} node(s) on {target.runtime}"
        if kind == TRAINJOB
        else f"1 master + {params.workers} worker(s)"
    )
    logger.info("%s: %s, %s, image %s", what, params.experiment, shape, image_ref)
    await submit_training_job(body)
    progress = await acreate_progress_artifact(
        0.0, key=f"train-{params.experiment}", description=what
    )
    followed = await follow_training_job(
        name,
        namespace,
        kind,
        timeout_seconds=params.deadline_seconds + DEADLINE_GRACE_SECONDS,
        progress_artifact_id=progress,
    )
    state = job_state(followed.job)
    await acreate_markdown_artifact(
        key=log_artifact_key(params.experiment),
        markdown=log_markdown(target, followed.log),
        description=f"{what}: node-0 log ({state.phase})",
    )
    await acreate_markdown_artifact(
        key=f"train-{params.experiment}-summary",
        markdown=summary_markdown(
            name=name,
            namespace=namespace,
            params=params,
            image_ref=image_ref,
            image_digest=digest,
            state=state,
            checkpoint=followed.checkpoint,
            last_lines=followed.last_lines if not state.succeeded else (),
            kind=kind.kind,
            resumed_from=resume_from,
            runtime=target.runtime if kind == TRAINJOB else None,
        ),
        description=f"{what}: {state.phase}",
    )
    tail = "\n".join(followed.last_lines[-10:]) or "(no log lines)"
    if followed.timed_out:
        await delete_training_job(name, namespace, kind)
        raise TrainingFailed(
            f"{what} did not finish within its deadline ({params.deadline}); it was deleted. "
            f"Last log lines of node 0:\n{tail}"
        )
    if state.phase == "Failed":
        resume = ""
        if followed.checkpoint and params.kept(followed.checkpoint):
            resume = f" A retry of this run resumes from {followed.checkpoint}."
        elif followed.checkpoint:
            resume = (
                f" Its last checkpoint {followed.checkpoint} is not on a writable volume: a "
                "retry starts from scratch."
            )
        raise TrainingFailed(
            f"{what} failed: {state.reason}: {state.message}.{resume}\n"
            f"Last log lines of node 0:\n{tail}"
        )
    logger.info("%s: %s", what, state.condition)
    return TrainResult(
        job=f"{namespace}/{name}",
        kind=kind.kind,
        phase=state.phase,
        condition=state.condition,
        image=image_ref,
        image_digest=digest,
        duration_seconds=job_duration_seconds(state),
        checkpoint=followed.checkpoint,
        resumed_from=resume_from,
    )
