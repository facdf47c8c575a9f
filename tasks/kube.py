"""Kubernetes: training jobs (PyTorchJob, Trainer v2 TrainJob), their pods and their logs.

Every call goes through the Kubernetes API with the ``KubernetesCredentials`` block named
``settings.kubernetes_block`` (prefect-kubernetes; without a saved block, in-cluster config
or ``~/.kube/config`` as kubectl would). Job objects are created, read and deleted with
prefect-kubernetes' ``custom_objects`` tasks (async: awaited). Following a job uses
kubernetes_asyncio directly: a watch on the one object (re-listed on disconnect and on
410 Gone), and ``GET .../pods/<master>/log?follow=true`` streamed line by line into the
Prefect log, both under one deadline. A TrainJob's node-0 pod has a JobSet-generated name,
so it is found by its labels (``jobset.sigs.k8s.io/jobset-name``,
``batch.kubernetes.io/job-completion-index=0``), again after each replacement.

Plain ``async def`` helpers take a credentials object, so the flow's cancellation hook (which
runs outside any task) can delete a job with the same code the tasks use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import aiohttp
from kubernetes_asyncio import watch
from kubernetes_asyncio.client.exceptions import ApiException
from prefect import task
from prefect.artifacts import aupdate_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect_kubernetes import custom_objects
from prefect_kubernetes.credentials import KubernetesCredentials
from pydantic import BaseModel, Field

from core.errors import InvalidInput, KubeError
from core.settings import get_settings
from core.training import (
    ANNOTATION_FLOW_RUN,
    CONTAINER_NAME,
    PYTORCHJOB,
    TRAINJOB,
    TRAINJOB_NODE,
    JobKind,
    TrainingProgress,
    checkpoint_location,
    job_state,
    kind_of,
    progress_percent,
)
from tasks.logs import run_logger

JSON = dict[str, Any]
LogSink = Callable[[str], None]

# A watch request lasts at most this long before it is re-listed (the API server's own
# minimum is 5 minutes; shorter here so a silently dead connection is noticed soon).
WATCH_WINDOW_SECONDS = 60
# Any single request (get, create, delete, read a pod) gives up after this long.
REQUEST_TIMEOUT_SECONDS = 30
RECONNECT_DELAY_SECONDS = 1.0
# After the job ends, how long the master's log may take to reach its end.
LOG_DRAIN_SECONDS = 10.0
LAST_LINES = 20
# The node-0 log kept for the log artifact (the newest lines, if a run says more).
KEPT_LINES = 5000
# After a delete, how long the job may take to be gone (its pods' finalizers, GC).
DELETE_WAIT_SECONDS = 60.0
# TrainJob pods: the JobSet's and the Indexed Job's labels.
LABEL_JOBSET = "jobset.sigs.k8s.io/jobset-name"
LABEL_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


# Every call reads or changes live state: a result cached from an earlier identical call in
# the same run (Prefect's default policy when results are persisted) would be a stale read.
create_namespaced_custom_object = custom_objects.create_namespaced_custom_object.with_options(
    cache_policy=NO_CACHE
)
get_namespaced_custom_object = custom_objects.get_namespaced_custom_object.with_options(
    cache_policy=NO_CACHE
)
delete_namespaced_custom_object = custom_objects.delete_namespaced_custom_object.with_options(
    cache_policy=NO_CACHE
)


async def load_credentials(block_name: str | None = None) -> KubernetesCredentials:
    """The ``KubernetesCredentials`` block named in settings, else in-cluster/kubeconfig."""
    name = block_name or get_settings().kubernetes_block
    try:
        return await KubernetesCredentials.aload(name)
    except ValueError:
        logging.getLogger(__name__).info(
            "no KubernetesCredentials block %r; using in-cluster config or ~/.kube/config", name
        )
        return KubernetesCredentials()


async def read_object(
    credentials: KubernetesCredentials, api_version: str, plural: str, namespace: str, name: str
) -> JSON | None:
    """One namespaced object of an API group (``apps/v1`` Deployments, ``networking.k8s.io/v1``
    Ingresses, ``gateway.networking.k8s.io/v1`` HTTPRoutes, ...), or None when absent. The
    CustomObjects API's path (``/apis/{group}/{version}/namespaces/...``) is the same for
    every group, so one call reads them all; the core group (``v1``) is not served by it."""
    group, _, version = api_version.rpartition("/")
    if not group:
        raise InvalidInput(f"{api_version!r}: read_object reads API groups, not the core group")
    async with credentials.get_client("custom_objects") as api:
        try:
            found = await api.get_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise api_error(exc, f"reading {plural} {namespace}/{name}") from exc
    return dict(found)


def _kind_of(body: JSON) -> JobKind:
    try:
        return kind_of(body)
    except InvalidInput as exc:
        raise KubeError(str(exc)) from None


def node0_pod(kind: JobKind, name: str) -> tuple[str | None, str | None, str]:
    """(pod name, label selector, container) of the job's master / node-0 pod."""
    if kind == TRAINJOB:
        return None, f"{LABEL_JOBSET}={name},{LABEL_COMPLETION_INDEX}=0", TRAINJOB_NODE
    return f"{name}-master-0", None, CONTAINER_NAME


def api_error(exc: ApiException, what: str) -> KubeError:
    """An API failure as our error, with the server's own words and what to do."""
    hint = {
        401: "the credentials in the KubernetesCredentials block were refused",
        403: "the service account may not do this; check its RBAC role",
        404: "the resource (or its CRD or namespace) does not exist",
        422: "the API server refused the object as invalid",
    }.get(int(exc.status or 0), "the API server failed")
    return KubeError(f"{what}: HTTP {exc.status} {exc.reason}: {hint}")


async def retry_unless_ours(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transport trouble and 5xx; a KubeError (4xx, refusal) will not get better."""
    error = await state.aresult(raise_on_failure=False)
    if isinstance(error, KubeError):
        return "HTTP 5" in str(error)
    return isinstance(error, Exception)


# --- plain helpers (credentials in, data out) --------------------------------------------------


async def read_job(
    credentials: KubernetesCredentials, name: str, namespace: str, kind: JobKind = PYTORCHJOB
) -> JSON | None:
    try:
        result = await get_namespaced_custom_object(
            credentials,
            kind.group,
            kind.version,
            kind.plural,
            name,
            namespace=namespace,
            _request_timeout=REQUEST_TIMEOUT_SECONDS,
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise api_error(exc, f"reading {kind.kind} {namespace}/{name}") from exc
    return dict(result)  # type: ignore[call-overload]


async def delete_job(
    credentials: KubernetesCredentials, name: str, namespace: str, kind: JobKind = PYTORCHJOB
) -> bool:
    """Delete a job and (by garbage collection) its pods; False if it was already gone."""
    try:
        await delete_namespaced_custom_object(
            credentials,
            kind.group,
            kind.version,
            kind.plural,
            name,
            namespace=namespace,
            propagation_policy="Foreground",
            _request_timeout=REQUEST_TIMEOUT_SECONDS,
        )
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise api_error(exc, f"deleting {kind.kind} {namespace}/{name}") from exc
    return True


# --- tasks -------------------------------------------------------------------------------------


@task(
    name="submit-training-job",
    cache_policy=NO_CACHE,
    task_run_name="submit {body[metadata][name]}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_ours,
)
async def submit_training_job(body: JSON, *, credentials_block: str | None = None) -> JSON:
    """Create the job, or adopt it if this flow run already created it (a rerun).

    Returns:
        The job as the API server has it.

    Raises:
        KubeError: refused, or a job of that name exists that another run created.
    """
    kind = _kind_of(body)
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    credentials = await load_credentials(credentials_block)
    logger = run_logger("robotics_cd.kube")
    try:
        created = await create_namespaced_custom_object(
            credentials,
            kind.group,
            kind.version,
            kind.plural,
            body,
            namespace=namespace,
            _request_timeout=REQUEST_TIMEOUT_SECONDS,
        )
    except ApiException as exc:
        if exc.status != 409:
            raise api_error(exc, f"creating {kind.kind} {namespace}/{name}") from exc
        existing = await read_job(credentials, name, namespace, kind)
        if existing is None:
            raise KubeError(
                f"{kind.kind} {namespace}/{name} was reported as existing but is gone; rerun"
            ) from exc
        ours = (meta.get("annotations") or {}).get(ANNOTATION_FLOW_RUN)
        theirs = (existing["metadata"].get("annotations") or {}).get(ANNOTATION_FLOW_RUN)
        if ours != theirs:
            raise KubeError(
                f"{kind.kind} {namespace}/{name} already exists and belongs to flow run "
                f"{theirs or '(none)'}; delete it or choose another experiment name"
            ) from exc
        logger.info(
            "%s %s/%s was already submitted by this run; following it", kind.kind, namespace, name
        )
        return existing
    logger.info("submitted %s %s/%s", kind.kind, namespace, name)
    return dict(created)  # type: ignore[call-overload]


@task(name="get-training-job", cache_policy=NO_CACHE, task_run_name="get {name}")
async def get_training_job(
    name: str,
    namespace: str,
    kind: JobKind = PYTORCHJOB,
    *,
    credentials_block: str | None = None,
) -> JSON | None:
    return await read_job(await load_credentials(credentials_block), name, namespace, kind)


@task(
    name="delete-training-job",
    cache_policy=NO_CACHE,
    task_run_name="delete {name}",
    retries=2,
    retry_delay_seconds=3,
)
async def delete_training_job(
    name: str,
    namespace: str,
    kind: JobKind = PYTORCHJOB,
    *,
    wait: bool = False,
    credentials_block: str | None = None,
) -> bool:
    """Delete the job (its pods go with it); with ``wait``, until the API no longer has it."""
    credentials = await load_credentials(credentials_block)
    deleted = await delete_job(credentials, name, namespace, kind)
    run_logger("robotics_cd.kube").info(
        "deleted %s %s/%s and its pods" if deleted else "%s %s/%s was already gone",
        kind.kind,
        namespace,
        name,
    )
    if deleted and wait:
        deadline = time.monotonic() + DELETE_WAIT_SECONDS
        while await read_job(credentials, name, namespace, kind) is not None:
            if time.monotonic() > deadline:
                raise KubeError(
                    f"{kind.kind} {namespace}/{name} was still there {DELETE_WAIT_SECONDS:.0f}s "
                    "after its deletion; look for a stuck finalizer"
                )
            await asyncio.sleep(RECONNECT_DELAY_SECONDS)
    return deleted


class FollowResult(BaseModel):
    """How following a job ended."""

    job: JSON = Field(description="The job as last seen.")
    timed_out: bool = Field(default=False, description="The deadline passed first.")
    last_lines: list[str] = Field(default_factory=list, description="Tail of the node-0 log.")
    log: list[str] = Field(
        default_factory=list, description=f"The node-0 log (its last {KEPT_LINES} lines)."
    )
    checkpoint: str | None = Field(default=None, description="Last checkpoint the log named.")
    epochs: tuple[int, int] | None = Field(default=None, description="Last 'epoch n/m' seen.")
    progress: str = Field(default="", description="Epoch, step and ETA, as last reported.")


class _Progress:
    """What the log and the watch have shown so far (shared by the two streams)."""

    def __init__(self, artifact_id: UUID | None, what: str = "") -> None:
        self.artifact_id = artifact_id
        self.what = what
        self.job: JSON = {}
        self.last_lines: deque[str] = deque(maxlen=LAST_LINES)
        self.log: deque[str] = deque(maxlen=KEPT_LINES)
        self.checkpoint: str | None = None
        self.training = TrainingProgress()
        self._reported: tuple[float, str] = (-1.0, "")
        self._pending = False

    @property
    def epochs(self) -> tuple[int, int] | None:
        return self.training.epochs

    def line(self, text: str) -> None:
        self.last_lines.append(text)
        self.log.append(text)
        if self.training.feed(text, time.monotonic()):
            self._pending = True
        self.checkpoint = checkpoint_location(text) or self.checkpoint

    def description(self) -> str:
        """``TrainJob training/x — Running, epoch 2/3, step 1/4, ETA 12s``."""
        parts: list[str] = [job_state(self.job).phase] if self.job else []
        detail = self.training.describe()
        if detail:
            parts.append(detail)
        return f"{self.what} — {', '.join(parts)}" if parts else self.what

    async def report(self) -> None:
        percent = progress_percent(job_state(self.job), self.training)
        text = self.description()
        self._pending = False
        if self.artifact_id is not None and (percent, text) != self._reported:
            self._reported = (percent, text)
            await aupdate_progress_artifact(self.artifact_id, percent, description=text)

    async def report_lines(self, stop: asyncio.Event, every: float = 1.0) -> None:
        """Report what the log lines changed, at most once per ``every`` seconds."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await stop.wait()
            if self._pending:
                await self.report()


async def watch_job(
    credentials: KubernetesCredentials,
    name: str,
    namespace: str,
    on_change: Callable[[JSON], Awaitable[None]],
    kind: JobKind = PYTORCHJOB,
) -> JSON:
    """Follow one job until it is finished; return it.

    Get the object, then watch from its resourceVersion; when the watch ends (server
    timeout, dropped connection) or answers 410 Gone, get it again and watch anew, so no
    change is missed and no wait depends on one connection staying up.
    """
    logger = run_logger("robotics_cd.kube")
    async with credentials.get_client("custom_objects") as api:
        while True:
            try:
                job = await read_job(credentials, name, namespace, kind)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The API server is away (restart, network): keep trying; the caller's
                # deadline bounds how long.
                logger.warning("cannot read %s (%s); retrying", name, exc)
                await asyncio.sleep(RECONNECT_DELAY_SECONDS)
                continue
            if job is None:
                raise KubeError(f"{kind.kind} {namespace}/{name} was deleted while it ran")
            await on_change(job)
            if job_state(job).finished:
                return job
            stream = watch.Watch()
            try:
                async for event in stream.stream(
                    api.list_namespaced_custom_object,
                    kind.group,
                    kind.version,
                    namespace,
                    kind.plural,
                    field_selector=f"metadata.name={name}",
                    resource_version=job["metadata"]["resourceVersion"],
                    timeout_seconds=WATCH_WINDOW_SECONDS,
                ):
                    obj = dict(event["raw_object"])
                    if event["type"] == "DELETED":
                        raise KubeError(f"{kind.kind} {namespace}/{name} was deleted while it ran")
                    if event["type"] not in ("ADDED", "MODIFIED"):
                        continue
                    await on_change(obj)
                    if job_state(obj).finished:
                        return obj
            except ApiException as exc:
                if exc.status != 410:
                    raise api_error(exc, f"watching {kind.kind} {namespace}/{name}") from exc
                logger.info("watch of %s expired (410 Gone); re-listing", name)
            except (aiohttp.ClientError, TimeoutError) as exc:
                logger.warning("watch of %s dropped (%s); re-listing", name, exc)
                await asyncio.sleep(RECONNECT_DELAY_SECONDS)
            finally:
                await stream.close()


def _container_instance(pod: Any, container: str) -> tuple[int, bool] | None:
    """(restartCount, started) of the container, or None while it has no status yet."""
    for status in (pod.status and pod.status.container_statuses) or []:
        if status.name == container:
            state = status.state
            started = bool(state and (state.running or state.terminated))
            return int(status.restart_count or 0), started
    return None


async def _find_pod(core: Any, pod: str | None, selector: str | None, namespace: str) -> Any:
    """The pod by name, or the newest pod matching ``selector``; None if there is none."""
    if pod is not None:
        return await core.read_namespaced_pod(
            pod, namespace, _request_timeout=REQUEST_TIMEOUT_SECONDS
        )
    found = await core.list_namespaced_pod(
        namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT_SECONDS
    )
    items = [p for p in found.items if not p.metadata.deletion_timestamp]
    if not items:
        return None
    return max(items, key=lambda p: (p.metadata.creation_timestamp, p.metadata.name))


async def stream_pod_log(
    credentials: KubernetesCredentials,
    pod: str | None,
    namespace: str,
    sink: LogSink,
    stop: asyncio.Event,
    *,
    container: str = CONTAINER_NAME,
    poll: float = 0.5,
    selector: str | None = None,
) -> None:
    """Copy the container's log, line by line, to ``sink`` until ``stop`` is set.

    Each container instance (one per restart) is followed once from its start; a stream
    that breaks in the middle is reopened and the lines already copied are skipped. Once
    ``stop`` is set, an instance that has started but was not read to its end yet is still
    read (the job's last words are usually the ones that matter).
    """
    # (pod name, restartCount) -> lines copied (-1: read to the end); a TrainJob's replaced
    # node-0 pod has a new name and is read from its start.
    streamed: dict[tuple[str, int], int] = {}
    async with credentials.get_client("core") as core:
        while True:
            try:
                obj = await _find_pod(core, pod, selector, namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise api_error(exc, f"reading pod {namespace}/{pod or selector}") from exc
                obj = None
            except (aiohttp.ClientError, TimeoutError):
                obj = None  # the API server is away for a moment; look again
            instance = _container_instance(obj, container) if obj is not None else None
            pod_name = str(obj.metadata.name) if obj is not None else ""
            key = (pod_name, instance[0] if instance else 0)
            if instance is None or not instance[1] or streamed.get(key) == -1:
                if stop.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=poll)
                continue
            skip = streamed.get(key, 0)
            copied = 0
            try:
                response = await core.read_namespaced_pod_log(
                    pod_name, namespace, container=container, follow=True, _preload_content=False
                )
                try:
                    while True:
                        raw = await response.content.readline()
                        if not raw:
                            break
                        copied += 1
                        if copied > skip:
                            sink(raw.decode("utf-8", "replace").rstrip("\n"))
                finally:
                    response.release()
                streamed[key] = -1  # reached the end of this instance's log
            except ApiException as exc:
                # 400: the container is not running yet / already gone; look again soon.
                if exc.status not in (400, 404):
                    raise api_error(exc, f"reading the log of {namespace}/{pod_name}") from exc
                streamed[key] = max(skip, copied)
            except (aiohttp.ClientError, TimeoutError):
                streamed[key] = max(skip, copied)
            if copied == 0:
                if stop.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=poll)


@task(name="follow-training-job", cache_policy=NO_CACHE, task_run_name="follow {name}")
async def follow_training_job(
    name: str,
    namespace: str,
    kind: JobKind = PYTORCHJOB,
    *,
    timeout_seconds: float,
    progress_artifact_id: UUID | None = None,
    credentials_block: str | None = None,
) -> FollowResult:
    """Watch the job to its end while streaming its master's (node 0's) log into the
    Prefect log.

    Returns when the job is finished (Succeeded/Complete or Failed), or when
    ``timeout_seconds`` pass (``timed_out``); the caller decides what a timeout means (the
    train flow deletes the job). The progress artifact follows the phase and the epoch/step
    lines of the log, with an ETA in its description; the whole node-0 log (its last
    ``KEPT_LINES`` lines) comes back in ``log``, for an artifact that outlives the pods.
    """
    logger = run_logger("robotics_cd.kube")
    credentials = await load_credentials(credentials_block)
    progress = _Progress(progress_artifact_id, f"{kind.kind} {namespace}/{name}")
    last_phase = ""
    pod, selector, container = node0_pod(kind, name)
    label = pod or f"{name}-node-0"

    async def on_change(job: JSON) -> None:
        nonlocal last_phase
        progress.job = job
        state = job_state(job)
        if state.phase != last_phase:
            last_phase = state.phase
            logger.info("%s %s: %s", kind.kind, name, state.condition)
        await progress.report()

    def on_line(text: str) -> None:
        logger.info("[%s] %s", label, text)
        progress.line(text)

    stop = asyncio.Event()
    logs = asyncio.create_task(
        stream_pod_log(
            credentials, pod, namespace, on_line, stop, container=container, selector=selector
        ),
        name=f"log:{name}",
    )
    reporter = asyncio.create_task(progress.report_lines(stop), name=f"progress:{name}")
    timed_out = False
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_seconds):
            await watch_job(credentials, name, namespace, on_change, kind)
    except TimeoutError:
        timed_out = True
        logger.warning(
            "%s %s did not finish within %.0fs", kind.kind, name, time.monotonic() - started
        )
    finally:
        stop.set()
        # Let the log reach its end (the container has exited), but never wait long.
        done, _ = await asyncio.wait({logs}, timeout=LOG_DRAIN_SECONDS)
        if not done:
            logs.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await logs
            except KubeError as exc:
                # Only the log copy failed: the job's outcome still stands; say what is missing.
                logger.warning("the node-0 log could not be streamed: %s", exc)
        await asyncio.gather(reporter, return_exceptions=True)
    await progress.report()
    return FollowResult(
        job=progress.job,
        timed_out=timed_out,
        last_lines=list(progress.last_lines),
        log=list(progress.log),
        checkpoint=progress.checkpoint,
        epochs=progress.epochs,
        progress=progress.training.describe(),
    )


async def read_node0_log(
    credentials: KubernetesCredentials, name: str, namespace: str, kind: JobKind = PYTORCHJOB
) -> list[str]:
    """The node-0 log as it is now (no follow): what a cancelled run had done so far."""
    pod, selector, container = node0_pod(kind, name)
    async with credentials.get_client("core") as core:
        try:
            obj = await _find_pod(core, pod, selector, namespace)
            if obj is None:
                return []
            text = await core.read_namespaced_pod_log(
                obj.metadata.name,
                namespace,
                container=container,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        except ApiException as exc:
            if exc.status in (400, 404):
                return []
            raise api_error(exc, f"reading the node-0 log of {namespace}/{name}") from exc
    return str(text).splitlines()[-KEPT_LINES:]
