"""The training flows.

``training-image``: a push to the training repo → checkout → build → scan → push
``robotics-training/vision-train:<YYYYMMDD-sha7>`` → record it as the latest training image
(a Prefect Variable) → "新训练镜像已就绪" to the team's chat. A rerun for the same commit finds
the image in the registry and builds, pushes and notifies nothing twice.

``train``: what an ML engineer starts from the Prefect UI or ``robotics-cd train``: validate
the parameters → resolve the image (it must be in the registry) → submit a PyTorchJob named
after the flow run (a rerun of the run adopts its job instead of submitting another) →
watch it to Succeeded or Failed while the master's log streams into the run's log → a
progress artifact and a summary artifact. A failed job fails the run with the job's reason
and the last log lines; a cancelled run, or one whose deadline passes, deletes the job.

This module only orders tasks; every outside system is reached in ``tasks/``.
"""

# No ``from __future__ import annotations`` here: Prefect validates the flows' parameters
# from their real annotations, also when it loads this file by path (a served deployment).
from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import acreate_markdown_artifact, acreate_progress_artifact
from prefect.client.schemas.objects import FlowRun, State
from prefect.logging.loggers import flow_run_logger
from prefect.variables import Variable
from pydantic import BaseModel, Field

from core.catalog import Catalog, TrainingImage, load_catalog
from core.errors import InvalidInput, TrainingFailed
from core.images import ImageRef, release_tag, validate_sha
from core.training import (
    TrainParams,
    build_pytorchjob,
    job_duration_seconds,
    job_name,
    job_state,
    parse_train_params,
    summary_markdown,
)
from tasks.images import build_image, find_pushed_image, find_tagged_image, push_image
from tasks.kube import (
    delete_job,
    delete_training_job,
    follow_training_job,
    load_credentials,
    submit_training_job,
)
from tasks.notify import send_chat
from tasks.scan import scan_image
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
    job: str = Field(description="namespace/name of the PyTorchJob.")
    phase: str
    condition: str
    image: str
    image_digest: str | None = None
    duration_seconds: float | None = None
    checkpoint: str | None = None


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
        tag = release_tag(co.committed_at, co.sha)
        pushed = await find_pushed_image(registry, entry.image, tag, co.sha)
        if pushed is None:
            built = await build_image(
                co.path,
                registry=registry,
                repository=entry.image,
                tag=tag,
                sha=co.sha,
                committed_at=co.committed_at,
                source=f"https://github.com/{entry.github}",
                context=entry.build.context,
                dockerfile=entry.build.dockerfile,
            )
            await scan_image(
                built.ref,
                repo_path=co.path,
                dockerfile=entry.build.dockerfile,
                policy=catalog.scan_policy(image),
            )
            pushed = await push_image(built.ref)
        else:
            logger.info("%s is already in the registry: nothing to build or push", pushed.ref)
    finally:
        await remove_checkout(co.path)
    record = TrainingImageRecord(
        image=image,
        ref=pushed.ref,
        tag=tag,
        digest=pushed.digest,
        sha=co.sha,
        committed_at=co.committed_at,
    )
    latest = await _record_latest(record)
    if latest is None:
        logger.info("a newer commit's image is the latest training image; %s not announced", tag)
        return record
    if not latest.notified:
        send_chat(
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


def _job_for(params: TrainParams, flow_run_id: str) -> tuple[str, str]:
    """(name, namespace) of the job of this flow run: the same on every rerun of it."""
    entry = load_catalog().training_image(params.training_image)
    return job_name(params.experiment, flow_run_id), entry.namespace


async def delete_job_of_run(flow: Any, flow_run: FlowRun, state: State) -> None:
    """``on_cancellation`` hook: the run is going away, so its job (and pods) must too."""
    logger = flow_run_logger(flow_run, flow)
    try:
        params = parse_train_params((flow_run.parameters or {}).get("params") or {})
        name, namespace = _job_for(params, str(flow_run.id))
        deleted = await delete_job(await load_credentials(), name, namespace)
    except Exception:
        # A hook's failure is only logged by Prefect; say which job may be left behind.
        logger.exception("cancelled run %s: could not delete its PyTorchJob", flow_run.id)
        raise
    logger.info(
        "cancelled run %s: PyTorchJob %s/%s %s",
        flow_run.id,
        namespace,
        name,
        "deleted" if deleted else "was not there",
    )


@flow(
    name="train",
    flow_run_name="train {params.experiment}",
    on_cancellation=[delete_job_of_run],
)
async def train(params: TrainParams) -> TrainResult:
    """Run a distributed PyTorch training job (Kubeflow PyTorchJob) to its end."""
    logger = get_run_logger()
    params = parse_train_params(params)
    catalog = load_catalog()
    entry = catalog.training_image(params.training_image)
    flow_run_id = str(runtime.flow_run.id)
    name, namespace = _job_for(params, flow_run_id)
    image_ref, digest = await _resolve_image(params, catalog, entry)
    body = build_pytorchjob(params, image_ref, name, namespace, flow_run_id)
    logger.info(
        "PyTorchJob %s/%s: %s, 1 master + %d worker(s), image %s",
        namespace,
        name,
        params.experiment,
        params.workers,
        image_ref,
    )
    await submit_training_job(body)
    progress = await acreate_progress_artifact(
        0.0, key=f"train-{params.experiment}", description=f"PyTorchJob {namespace}/{name}"
    )
    followed = await follow_training_job(
        name,
        namespace,
        timeout_seconds=params.deadline_seconds + DEADLINE_GRACE_SECONDS,
        progress_artifact_id=progress,
    )
    state = job_state(followed.job)
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
            last_lines=followed.last_lines if state.phase != "Succeeded" else (),
        ),
        description=f"PyTorchJob {namespace}/{name}: {state.phase}",
    )
    tail = "\n".join(followed.last_lines[-10:]) or "(no log lines)"
    if followed.timed_out:
        await delete_training_job(name, namespace)
        raise TrainingFailed(
            f"PyTorchJob {namespace}/{name} did not finish within its deadline "
            f"({params.deadline}); it was deleted. Last log lines of the master:\n{tail}"
        )
    if state.phase == "Failed":
        raise TrainingFailed(
            f"PyTorchJob {namespace}/{name} failed: {state.reason}: {state.message}\n"
            f"Last log lines of the master:\n{tail}"
        )
    logger.info("PyTorchJob %s/%s: %s", namespace, name, state.condition)
    return TrainResult(
        job=f"{namespace}/{name}",
        phase=state.phase,
        condition=state.condition,
        image=image_ref,
        image_digest=digest,
        duration_seconds=job_duration_seconds(state),
        checkpoint=followed.checkpoint,
    )
