"""Distributed training jobs as pure rules: the parameters an ML engineer fills in, the one
PyTorchJob builder, and how a job's status reads.

``TrainParams`` is the ``train`` flow's parameter: its ``Field(description=...)`` texts are
what the Prefect UI shows in the run form, and every rule that can be checked without the
cluster or the registry is checked here, so bad input stops before anything is submitted.

The job spec is rendered by ``build_pytorchjob`` (Kubeflow training-operator,
``kubeflow.org/v1``). A Kubeflow Trainer v2 ``TrainJob`` builder can sit beside it with the
same signature (``JobBuilder``) and its own ``JobKind``; the flow and the Kubernetes tasks
only ever see a ``JobKind`` and a ``dict``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.durations import parse_duration
from core.errors import InvalidInput
from core.images import validate_tag

JSON = dict[str, Any]

# --- kinds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobKind:
    """Where a job kind lives in the Kubernetes API."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


PYTORCHJOB = JobKind(group="kubeflow.org", version="v1", plural="pytorchjobs", kind="PyTorchJob")

# The training-operator's defaults: the container it looks for and the rendezvous port.
CONTAINER_NAME = "pytorch"
MASTER_PORT = 23456
MANAGED_BY = "robotics-cd"
LABEL_EXPERIMENT = "robotics-cd/experiment"
ANNOTATION_FLOW_RUN = "robotics-cd/flow-run-id"
ANNOTATION_IMAGE = "robotics-cd/image"

# --- parameter validators --------------------------------------------------------------------

# Experiment names become part of pod and Service names: a DNS-1035 label (starts with a
# letter), short enough that "<experiment>-<run8>-worker-<nnn>" stays within 63 characters.
EXPERIMENT_MAX = 40
_EXPERIMENT_RE = re.compile(r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")
_PVC_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CPU_RE = re.compile(r"^(\d+(\.\d{1,3})?|\d+m)$")
_MEMORY_RE = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_NPROC_RE = re.compile(r"^(auto|cpu|gpu|[1-9][0-9]{0,2})$")
# Env names the training-operator sets itself; a user value would be silently overwritten.
RESERVED_ENV = frozenset(
    {
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        "PYTHONUNBUFFERED",
        "PET_MASTER_ADDR",
        "PET_MASTER_PORT",
        "PET_NPROC_PER_NODE",
        "PET_NNODES",
        "PET_NODE_RANK",
    }
)


def _experiment(value: str) -> str:
    if not _EXPERIMENT_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid experiment name: lowercase letters, digits and '-', "
            f"starting with a letter, at most {EXPERIMENT_MAX} characters"
        )
    return value


def _tag(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return validate_tag(value)
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None


def _relative_path(value: str) -> str:
    if not value or value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"{value!r} must be a relative path inside the training image's repo")
    return value


def _absolute_path(value: str) -> str:
    if not value.startswith("/") or ".." in value.split("/") or ":" in value:
        raise ValueError(f"{value!r} must be an absolute path in the container, without '..'")
    return value


def _pvc(value: str) -> str:
    if not _PVC_RE.match(value):
        raise ValueError(
            f"{value!r} is not a PersistentVolumeClaim name: lowercase letters, digits, '-' "
            "and '.', no '/' (give the claim's name in the job's namespace, not a path)"
        )
    return value


def _cpu(value: str) -> str:
    if not _CPU_RE.match(value) or _cpu_millis(value) == 0:
        raise ValueError(f"{value!r} is not a CPU quantity (write e.g. 2, 0.5 or 500m)")
    return value


def _memory(value: str) -> str:
    if not _MEMORY_RE.match(value):
        raise ValueError(f"{value!r} is not a memory quantity (write e.g. 512Mi or 16Gi)")
    return value


def _duration(value: str) -> str:
    if parse_duration(value).total_seconds() < 1:
        raise ValueError(f"{value!r} is too short: give at least 1s")
    return value


def _nproc(value: str) -> str:
    if not _NPROC_RE.match(value):
        raise ValueError(f"{value!r} must be auto, cpu, gpu or a number of processes (1-999)")
    return value


def _env(value: dict[str, str]) -> dict[str, str]:
    for name in value:
        if not _ENV_NAME_RE.match(name):
            raise ValueError(f"{name!r} is not an environment variable name")
        if name in RESERVED_ENV:
            raise ValueError(f"{name} is set by the PyTorchJob controller; leave it out")
    return value


def _cpu_millis(value: str) -> int:
    return int(value[:-1]) if value.endswith("m") else round(float(value) * 1000)


Experiment = Annotated[str, AfterValidator(_experiment)]
ImageTag = Annotated[str | None, AfterValidator(_tag)]
ClaimName = Annotated[str, AfterValidator(_pvc)]
ContainerPath = Annotated[str, AfterValidator(_absolute_path)]
RepoPath = Annotated[str, AfterValidator(_relative_path)]
CpuQuantity = Annotated[str, AfterValidator(_cpu)]
MemoryQuantity = Annotated[str, AfterValidator(_memory)]
DurationText = Annotated[str, AfterValidator(_duration)]
NprocPerNode = Annotated[str, AfterValidator(_nproc)]
EnvVars = Annotated[dict[str, str], AfterValidator(_env)]
CleanPodPolicy = Literal["All", "Running", "None"]
RestartPolicy = Literal["OnFailure", "Never", "ExitCode"]


# --- parameters ------------------------------------------------------------------------------


class DataVolume(BaseModel):
    """A dataset or checkpoint store mounted from a PersistentVolumeClaim (CPFS, OSS...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    claim: ClaimName = Field(
        description="Name of the PersistentVolumeClaim in the training namespace "
        "(e.g. cpfs-datasets). Not a path."
    )
    mount_path: ContainerPath = Field(
        default="/data", description="Where the volume appears in every training container."
    )
    read_only: bool = Field(
        default=True, description="Mount read-only (datasets); turn off for checkpoints."
    )


class TrainParams(BaseModel):
    """What an ML engineer decides for one distributed training run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment: Experiment = Field(
        description="Experiment name, used in the job's and pods' names "
        "(lowercase letters, digits, '-'; starts with a letter; at most 40 characters).",
        examples=["resnet50-baseline"],
    )
    training_image: str = Field(
        default="vision-train",
        description="Which training image of the catalog (services.yaml, `training:`) to run.",
    )
    image_tag: ImageTag = Field(
        default=None,
        description="Tag of the training image, e.g. 20261127-1a2b3c4. Empty: the latest "
        "image the training-image flow pushed. It must exist in the registry.",
    )
    config: RepoPath = Field(
        default="configs/default.yaml",
        description="Training config inside the image, relative to the repo root; passed to "
        "the trainer as TRAIN_CONFIG.",
    )
    workers: int = Field(
        default=1,
        ge=0,
        le=256,
        description="Worker nodes besides the master (total nodes = workers + 1).",
    )
    gpus_per_node: int = Field(
        default=0, ge=0, le=16, description="GPUs per node (nvidia.com/gpu); 0 trains on CPU."
    )
    nproc_per_node: NprocPerNode = Field(
        default="auto",
        description="Processes per node (PyTorchJob nprocPerNode): auto, cpu, gpu or a number.",
    )
    cpu: CpuQuantity = Field(default="2", description="CPU per node (e.g. 8 or 500m).")
    memory: MemoryQuantity = Field(default="4Gi", description="Memory per node (e.g. 64Gi).")
    volumes: list[DataVolume] = Field(
        default_factory=list,
        description="Data volumes to mount: PersistentVolumeClaims of CPFS/OSS datasets.",
    )
    env: EnvVars = Field(
        default_factory=dict,
        description="Extra environment variables for the trainer (not MASTER_*, RANK, PET_*).",
    )
    command: list[str] = Field(
        default_factory=list, description="Override the image's entrypoint (empty: keep it)."
    )
    args: list[str] = Field(default_factory=list, description="Arguments for the trainer.")
    checkpoint_dir: ContainerPath = Field(
        default="/checkpoints",
        description="Where the trainer writes checkpoints (CHECKPOINT_DIR); mount a writable "
        "volume there to keep them.",
    )
    deadline: DurationText = Field(
        default="2h",
        description="Longest the job may run (e.g. 90m, 12h); then it is failed and deleted.",
    )
    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Container restarts allowed before the job fails."
    )
    restart_policy: RestartPolicy = Field(
        default="OnFailure",
        description="What a failed replica does: OnFailure restarts it in place, Never fails "
        "the job, ExitCode restarts only on retryable exit codes (128+).",
    )
    cleanup: CleanPodPolicy = Field(
        default="Running",
        description="Pods deleted when the job ends: All, Running (only those still running) "
        "or None (keep them for debugging).",
    )
    elastic_min: int | None = Field(
        default=None, ge=1, description="Elastic training: fewest worker nodes to keep running."
    )
    elastic_max: int | None = Field(
        default=None, ge=1, description="Elastic training: most worker nodes to scale to."
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        self._check_elastic()
        if self.nproc_per_node == "gpu" and self.gpus_per_node == 0:
            raise ValueError("nproc_per_node is 'gpu' but gpus_per_node is 0: give GPUs or use cpu")
        if self.nproc_per_node.isdigit() and 0 < self.gpus_per_node < int(self.nproc_per_node):
            raise ValueError(
                f"nproc_per_node ({self.nproc_per_node}) exceeds gpus_per_node "
                f"({self.gpus_per_node}): one process per GPU at most"
            )
        mounts = [v.mount_path for v in self.volumes]
        if len(set(mounts)) != len(mounts):
            raise ValueError(f"volumes: two volumes share a mount_path ({', '.join(mounts)})")
        return self

    def _check_elastic(self) -> None:
        low, high = self.elastic_min, self.elastic_max
        if low is None and high is None:
            return
        low = low if low is not None else 1
        high = high if high is not None else max(self.workers, low)
        if self.workers == 0:
            raise ValueError(
                f"workers is 0 but elastic_min is {low}: elastic training scales worker nodes; "
                f"set workers between elastic_min and elastic_max, or drop elastic_min/elastic_max"
            )
        if low > high:
            raise ValueError(f"elastic_min ({low}) is larger than elastic_max ({high})")
        if not low <= self.workers <= high:
            raise ValueError(
                f"workers ({self.workers}) must lie between elastic_min ({low}) and "
                f"elastic_max ({high})"
            )

    @property
    def deadline_seconds(self) -> int:
        return int(parse_duration(self.deadline).total_seconds())

    @property
    def nodes(self) -> int:
        return self.workers + 1

    @property
    def elastic(self) -> tuple[int, int] | None:
        if self.elastic_min is None and self.elastic_max is None:
            return None
        low = self.elastic_min or 1
        return low, self.elastic_max or max(self.workers, low)


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field as the run form names it."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


def parse_train_params(data: Mapping[str, Any] | TrainParams) -> TrainParams:
    """Validate raw parameters (CLI, API) into ``TrainParams`` or raise InvalidInput."""
    if isinstance(data, TrainParams):
        return data
    try:
        return TrainParams.model_validate(dict(data))
    except ValidationError as exc:
        raise InvalidInput(
            f"invalid training parameters: {describe_validation_error(exc)}"
        ) from None


def job_name(experiment: str, flow_run_id: str) -> str:
    """The job's name, derived from the flow run so a rerun of the same run finds its job.

    ``<experiment>-<first 8 hex of the run id>``: at most 49 characters, leaving room for
    the ``-worker-<n>`` pod suffix inside a 63-character DNS label.
    """
    _experiment(experiment)
    short = flow_run_id.replace("-", "")[:8].lower()
    if not re.fullmatch(r"[0-9a-f]{8}", short):
        raise InvalidInput(f"flow run id {flow_run_id!r} is not a UUID")
    return f"{experiment}-{short}"


# --- the builders ----------------------------------------------------------------------------


class JobBuilder(Protocol):
    """What every job builder looks like (PyTorchJob today, Trainer v2 TrainJob next)."""

    def __call__(
        self, params: TrainParams, image_ref: str, name: str, namespace: str, flow_run_id: str = ""
    ) -> JSON: ...


def trainer_env(params: TrainParams) -> list[JSON]:
    """The environment the trainer reads, shared by every job kind."""
    ours = {
        "EXPERIMENT": params.experiment,
        "TRAIN_CONFIG": params.config,
        "CHECKPOINT_DIR": params.checkpoint_dir,
    }
    merged = {**ours, **params.env}
    return [{"name": k, "value": v} for k, v in sorted(merged.items())]


def trainer_resources(params: TrainParams) -> JSON:
    amounts: JSON = {"cpu": params.cpu, "memory": params.memory}
    limits = dict(amounts)
    if params.gpus_per_node:
        limits["nvidia.com/gpu"] = str(params.gpus_per_node)
    return {"requests": amounts, "limits": limits}


def trainer_volumes(params: TrainParams) -> tuple[list[JSON], list[JSON]]:
    """(pod volumes, container mounts): the claims, plus shared memory for GPU data loaders."""
    volumes: list[JSON] = []
    mounts: list[JSON] = []
    for index, vol in enumerate(params.volumes):
        name = f"data-{index}"
        volumes.append(
            {
                "name": name,
                "persistentVolumeClaim": {"claimName": vol.claim, "readOnly": vol.read_only},
            }
        )
        mounts.append({"name": name, "mountPath": vol.mount_path, "readOnly": vol.read_only})
    if params.gpus_per_node:
        # NCCL and DataLoader workers need more than the container runtime's 64 MiB /dev/shm.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def trainer_container(params: TrainParams, image_ref: str) -> JSON:
    _, mounts = trainer_volumes(params)
    container: JSON = {
        "name": CONTAINER_NAME,
        "image": image_ref,
        "imagePullPolicy": "IfNotPresent",
    }
    if params.command:
        container["command"] = list(params.command)
    if params.args:
        container["args"] = list(params.args)
    container["env"] = trainer_env(params)
    container["ports"] = [{"name": "pytorchjob-port", "containerPort": MASTER_PORT}]
    container["resources"] = trainer_resources(params)
    if mounts:
        container["volumeMounts"] = mounts
    return container


def job_labels(params: TrainParams) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": MANAGED_BY, LABEL_EXPERIMENT: params.experiment}


def _replica_spec(params: TrainParams, image_ref: str, replicas: int) -> JSON:
    volumes, _ = trainer_volumes(params)
    pod_spec: JSON = {"containers": [trainer_container(params, image_ref)]}
    if volumes:
        pod_spec["volumes"] = volumes
    return {
        "replicas": replicas,
        "restartPolicy": params.restart_policy,
        "template": {"metadata": {"labels": job_labels(params)}, "spec": pod_spec},
    }


def build_pytorchjob(
    params: TrainParams, image_ref: str, name: str, namespace: str, flow_run_id: str = ""
) -> JSON:
    """The ``kubeflow.org/v1`` PyTorchJob for ``params``: one master, ``workers`` workers."""
    replica_specs: JSON = {"Master": _replica_spec(params, image_ref, 1)}
    if params.workers:
        replica_specs["Worker"] = _replica_spec(params, image_ref, params.workers)
    spec: JSON = {
        "nprocPerNode": params.nproc_per_node,
        "runPolicy": {
            "cleanPodPolicy": params.cleanup,
            "backoffLimit": params.backoff_limit,
            "activeDeadlineSeconds": params.deadline_seconds,
        },
        "pytorchReplicaSpecs": replica_specs,
    }
    if params.elastic:
        low, high = params.elastic
        spec["elasticPolicy"] = {
            "minReplicas": low,
            "maxReplicas": high,
            "rdzvBackend": "c10d",
            "maxRestarts": params.backoff_limit,
        }
    annotations = {ANNOTATION_IMAGE: image_ref, "robotics-cd/config": params.config}
    if flow_run_id:
        annotations[ANNOTATION_FLOW_RUN] = flow_run_id
    return {
        "apiVersion": PYTORCHJOB.api_version,
        "kind": PYTORCHJOB.kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": job_labels(params),
            "annotations": annotations,
        },
        "spec": spec,
    }


BUILDERS: dict[str, tuple[JobKind, JobBuilder]] = {"PyTorchJob": (PYTORCHJOB, build_pytorchjob)}


# --- reading a job's status --------------------------------------------------------------------

Phase = Literal["Pending", "Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]


@dataclass(frozen=True)
class JobState:
    """What a job's status says, in the words of its newest true condition."""

    phase: Phase
    reason: str = ""
    message: str = ""
    start_time: str | None = None
    completion_time: str | None = None
    replicas: Mapping[str, Mapping[str, int]] | None = None

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def condition(self) -> str:
        text = self.phase + (f" ({self.reason})" if self.reason else "")
        return text + (f": {self.message}" if self.message else "")


def job_state(job: Mapping[str, Any]) -> JobState:
    """Read ``status.conditions`` as the training-operator writes them.

    Finished means a Succeeded or Failed condition with status "True" (whatever comes after
    it); otherwise the newest true condition gives the phase.
    """
    status = job.get("status") or {}
    conditions = [c for c in status.get("conditions") or [] if c.get("status") == "True"]
    replicas = {
        rtype: {k: int(v) for k, v in (counts or {}).items() if isinstance(v, int)}
        for rtype, counts in (status.get("replicaStatuses") or {}).items()
    }
    chosen: Mapping[str, Any] | None = None
    for cond in conditions:
        if cond.get("type") in ("Succeeded", "Failed"):
            chosen = cond
    if chosen is None and conditions:
        chosen = conditions[-1]
    phase: Phase = "Pending"
    if chosen is not None and chosen.get("type") in (
        "Created",
        "Running",
        "Restarting",
        "Succeeded",
        "Failed",
        "Suspended",
    ):
        phase = chosen["type"]
    return JobState(
        phase=phase,
        reason=str((chosen or {}).get("reason") or ""),
        message=str((chosen or {}).get("message") or ""),
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
        replicas=replicas,
    )


# --- reading the trainer's log ------------------------------------------------------------------

_EPOCH_RE = re.compile(r"\bepoch[\s:=]+(\d+)\s*(?:/|of)\s*(\d+)", re.IGNORECASE)
_CHECKPOINT_RE = re.compile(
    r"\bcheckpoint\b[^/\n]*?(?:to|at|in|:|=)\s*(?P<where>[a-z]+://\S+|/\S+)", re.IGNORECASE
)


def epoch_progress(line: str) -> tuple[int, int] | None:
    """``epoch 3/10`` (or ``epoch 3 of 10``) → (3, 10)."""
    match = _EPOCH_RE.search(line)
    if not match:
        return None
    done, total = int(match.group(1)), int(match.group(2))
    return (done, total) if 0 <= done <= total and total > 0 else None


def checkpoint_location(line: str) -> str | None:
    """``checkpoint saved to /checkpoints/x.pt`` → the path (or URL) it names."""
    match = _CHECKPOINT_RE.search(line)
    return match.group("where").rstrip(".,;") if match else None


def progress_percent(state: JobState, epochs: tuple[int, int] | None) -> float:
    """A progress figure for the artifact: the phase, refined by the epochs the log shows."""
    if state.finished:
        return 100.0
    if epochs:
        done, total = epochs
        return round(10.0 + 85.0 * done / total, 1)
    return {"Pending": 0.0, "Created": 5.0, "Suspended": 5.0}.get(state.phase, 10.0)


# --- the summary -------------------------------------------------------------------------------


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def job_duration_seconds(state: JobState) -> float | None:
    start, end = _parse_time(state.start_time), _parse_time(state.completion_time)
    return (end - start).total_seconds() if start and end else None


def summary_markdown(
    *,
    name: str,
    namespace: str,
    params: TrainParams,
    image_ref: str,
    image_digest: str | None,
    state: JobState,
    checkpoint: str | None,
    last_lines: Iterable[str] = (),
) -> str:
    """The run's summary artifact: what ran, how it ended, where its output went."""
    duration = job_duration_seconds(state)
    replicas = f"1 master + {params.workers} worker(s)"
    if params.gpus_per_node:
        replicas += f", {params.gpus_per_node} GPU(s) per node"
    counts = ", ".join(
        f"{rtype}: " + " ".join(f"{k}={v}" for k, v in sorted(c.items()))
        for rtype, c in sorted((state.replicas or {}).items())
    )
    rows = [
        ("PyTorchJob", f"`{namespace}/{name}`"),
        ("experiment", params.experiment),
        ("final condition", state.condition),
        ("duration", f"{duration:.0f}s" if duration is not None else "unknown"),
        ("replicas", replicas + (f" ({counts})" if counts else "")),
        ("image", f"`{image_ref}`"),
        ("image digest", f"`{image_digest}`" if image_digest else "unknown"),
        ("config", f"`{params.config}`"),
        (
            "checkpoint",
            f"`{checkpoint}`" if checkpoint else f"`{params.checkpoint_dir}` (configured)",
        ),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = f"# Training {params.experiment}: {state.phase}\n\n| | |\n|---|---|\n{table}\n"
    tail = list(last_lines)
    if tail:
        text += "\n## Last log lines (master)\n\n```\n" + "\n".join(tail) + "\n```\n"
    return text
