"""Distributed training jobs as pure rules: the parameters an ML engineer fills in, the one
PyTorchJob builder, and how a job's status reads.

``TrainParams`` is the ``train`` flow's parameter: its ``Field(description=...)`` texts are
what the Prefect UI shows in the run form, and every rule that can be checked without the
cluster or the registry is checked here, so bad input stops before anything is submitted.

Two builders share one signature (``JobBuilder``): ``build_pytorchjob`` (Kubeflow
training-operator v1, ``kubeflow.org/v1`` PyTorchJob) and ``build_trainjob`` (Kubeflow Trainer
v2, ``trainer.kubeflow.org/v1alpha1`` TrainJob, modelled on Trainer **v2.3.0**: v2 is alpha
and its API changes between minor releases, so both builders sit behind golden files). The
flow and the Kubernetes tasks only ever see a ``JobKind`` and a ``dict``; ``job_state``
reads either kind's status.
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
# Kubeflow Trainer v2.3.0 (pkg/apis/trainer/v1alpha1/trainjob_types.go at tag v2.3.0).
TRAINER_VERSION = "v2.3.0"
TRAINJOB = JobKind(
    group="trainer.kubeflow.org", version="v1alpha1", plural="trainjobs", kind="TrainJob"
)
KINDS: dict[str, JobKind] = {"pytorchjob": PYTORCHJOB, "trainjob": TRAINJOB}
Api = Literal["pytorchjob", "trainjob"]
# Trainer v2's names: the trainer container and replicated job of torch runtimes, its port.
TRAINJOB_NODE = "node"
TRAINJOB_PORT = 29500
DEFAULT_RUNTIME = "torch-distributed"

# The training-operator's defaults: the container it looks for and the rendezvous port.
CONTAINER_NAME = "pytorch"
MASTER_PORT = 23456
MANAGED_BY = "robotics-cd"
LABEL_EXPERIMENT = "robotics-cd/experiment"
ANNOTATION_FLOW_RUN = "robotics-cd/flow-run-id"
ANNOTATION_IMAGE = "robotics-cd/image"
ANNOTATION_CHECKPOINT = "robotics-cd/last-checkpoint"
ANNOTATION_RESUMED_FROM = "robotics-cd/resumed-from"
# The trainer reads the checkpoint to resume from here (empty: start from scratch).
RESUME_ENV = "RESUME_FROM"

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
        RESUME_ENV,
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


def _secret_name(value: str) -> str:
    if not _PVC_RE.match(value):
        raise ValueError(f"{value!r} is not a Secret name: lowercase letters, digits, '-' and '.'")
    return value


class SecretKeyRef(BaseModel):
    """An env value read from a Kubernetes Secret in the job's namespace, not written here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: Annotated[str, AfterValidator(_secret_name)] = Field(
        description="Name of the Secret in the training namespace (e.g. wandb)."
    )
    key: str = Field(
        pattern=r"^[-._a-zA-Z0-9]{1,253}$", description="Key inside the Secret (e.g. api-key)."
    )


EnvValue = str | SecretKeyRef

# What a credential looks like, by name or by value (issue 24 item 6). A plain value that
# matches is refused unless the run lists its name in ``allow_plain_env``.
_CREDENTIAL_NAME_RE = re.compile(
    r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH)",
    re.IGNORECASE,
)
_CREDENTIAL_VALUE_RES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("an AWS access key", re.compile(r"\bA(KIA|SIA)[0-9A-Z]{16}\b")),
    ("an Alibaba Cloud AccessKey", re.compile(r"\bLTAI[0-9A-Za-z]{12,30}\b")),
    ("a GitHub token", re.compile(r"\b(gh[pousr]_[0-9A-Za-z]{20,}|github_pat_\w{20,})")),
    ("a Slack token", re.compile(r"\bxox[abprs]-[0-9A-Za-z-]{10,}")),
    ("a Hugging Face token", re.compile(r"\bhf_[0-9A-Za-z]{30,}")),
    ("an API secret key", re.compile(r"\bsk-[0-9A-Za-z_-]{20,}")),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("a JSON Web Token", re.compile(r"\beyJ[\w-]{8,}\.eyJ[\w-]{8,}\.")),
    ("a URL with a password", re.compile(r"://[^/\s:@]+:[^/\s@]+@")),
)


def credential_reason(name: str, value: str) -> str | None:
    """Why a plain env entry looks like a credential (never quoting the value), or None."""
    if not value:
        return None
    for what, pattern in _CREDENTIAL_VALUE_RES:
        if pattern.search(value):
            return f"its value looks like {what}"
    match = _CREDENTIAL_NAME_RE.search(name)
    if match:
        return f"its name contains {match.group(1).upper()}"
    return None


def _env(value: dict[str, EnvValue]) -> dict[str, EnvValue]:
    for name in value:
        if not _ENV_NAME_RE.match(name):
            raise ValueError(f"{name!r} is not an environment variable name")
        if name in RESERVED_ENV:
            raise ValueError(f"{name} is set by the training job's controller; leave it out")
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
EnvVars = Annotated[dict[str, EnvValue], AfterValidator(_env)]
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
    api: Api | None = Field(
        default=None,
        description="Job API: pytorchjob (Kubeflow Training Operator v1) or trainjob (Kubeflow "
        "Trainer v2 TrainJob). Empty: the training image's `api` in the catalog.",
    )
    runtime: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$",
        description="TrainJob only: the ClusterTrainingRuntime to run on (e.g. "
        "torch-distributed). Empty: the training image's `runtime` in the catalog.",
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
        description="Extra environment variables for the trainer (not MASTER_*, RANK, PET_*): "
        'a value, or {"secret": NAME, "key": KEY} to read it from a Secret. Plain values that '
        "look like credentials are refused unless listed in allow_plain_env.",
    )
    allow_plain_env: list[str] = Field(
        default_factory=list,
        description="Env names whose plain values may look like credentials (they are not).",
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
        self._check_plain_env()
        if self.api == "trainjob":
            self._check_trainjob()
        elif self.runtime is not None:
            raise ValueError("runtime: only a TrainJob (api trainjob) runs on a training runtime")
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

    def _check_plain_env(self) -> None:
        for name, value in self.env.items():
            if isinstance(value, SecretKeyRef) or name in self.allow_plain_env:
                continue
            why = credential_reason(name, value)
            if why:
                raise ValueError(
                    f"env.{name}: a plain value that looks like a credential is refused ({why}); "
                    f'refer to a Secret instead ({{"secret": NAME, "key": KEY}}; CLI: '
                    f"--env-secret {name}=SECRET:KEY), or list {name} in allow_plain_env if it "
                    "is not secret"
                )

    def _check_trainjob(self) -> None:
        """What a Trainer v2.3 TrainJob cannot express: refused rather than dropped."""
        if self.elastic is not None:
            raise ValueError(
                "elastic_min/elastic_max: a TrainJob has no elastic policy in Kubeflow Trainer "
                f"{TRAINER_VERSION}; use api pytorchjob for elastic training"
            )
        if self.nproc_per_node in ("cpu", "gpu"):
            raise ValueError(
                f"nproc_per_node: a TrainJob takes auto or a number, not {self.nproc_per_node!r} "
                f"(trainer.numProcPerNode is an integer in Kubeflow Trainer {TRAINER_VERSION})"
            )
        defaults = type(self).model_fields
        for field in ("restart_policy", "backoff_limit", "cleanup"):
            if getattr(self, field) != defaults[field].default:
                raise ValueError(
                    f"{field}: a TrainJob takes it from its ClusterTrainingRuntime's JobSet "
                    "template, not from the run; leave it at its default or use api pytorchjob"
                )

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

    def kept(self, path: str) -> bool:
        """Whether ``path`` is on a writable volume, so it outlives the pods (a checkpoint
        to resume from)."""
        return any(
            not v.read_only
            and (path == v.mount_path or path.startswith(v.mount_path.rstrip("/") + "/"))
            for v in self.volumes
        )

    @property
    def max_nodes(self) -> int:
        """The most nodes the job may run at once (elastic training may scale up)."""
        elastic = self.elastic
        return max(self.nodes, elastic[1] + 1) if elastic else self.nodes

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
    """What every job builder looks like (PyTorchJob and Trainer v2 TrainJob)."""

    def __call__(
        self,
        params: TrainParams,
        image_ref: str,
        name: str,
        namespace: str,
        flow_run_id: str = "",
        *,
        resume_from: str | None = None,
        runtime: str = DEFAULT_RUNTIME,
    ) -> JSON: ...


def trainer_env(params: TrainParams, resume_from: str | None = None) -> list[JSON]:
    """The environment the trainer reads, shared by every job kind.

    A ``SecretKeyRef`` becomes ``valueFrom.secretKeyRef``: the value never appears in the
    job spec. ``RESUME_FROM`` names the checkpoint of an earlier attempt of the same run.
    """
    ours: dict[str, EnvValue] = {
        "EXPERIMENT": params.experiment,
        "TRAIN_CONFIG": params.config,
        "CHECKPOINT_DIR": params.checkpoint_dir,
    }
    if resume_from:
        ours[RESUME_ENV] = resume_from
    merged = {**ours, **params.env}
    env: list[JSON] = []
    for name, value in sorted(merged.items()):
        if isinstance(value, SecretKeyRef):
            ref = {"name": value.secret, "key": value.key}
            env.append({"name": name, "valueFrom": {"secretKeyRef": ref}})
        else:
            env.append({"name": name, "value": value})
    return env


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


def trainer_container(params: TrainParams, image_ref: str, resume_from: str | None = None) -> JSON:
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
    container["env"] = trainer_env(params, resume_from)
    container["ports"] = [{"name": "pytorchjob-port", "containerPort": MASTER_PORT}]
    container["resources"] = trainer_resources(params)
    if mounts:
        container["volumeMounts"] = mounts
    return container


def job_labels(params: TrainParams) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": MANAGED_BY, LABEL_EXPERIMENT: params.experiment}


def _replica_spec(
    params: TrainParams, image_ref: str, replicas: int, resume_from: str | None
) -> JSON:
    volumes, _ = trainer_volumes(params)
    pod_spec: JSON = {"containers": [trainer_container(params, image_ref, resume_from)]}
    if volumes:
        pod_spec["volumes"] = volumes
    return {
        "replicas": replicas,
        "restartPolicy": params.restart_policy,
        "template": {"metadata": {"labels": job_labels(params)}, "spec": pod_spec},
    }


def _job_metadata(
    params: TrainParams,
    image_ref: str,
    name: str,
    namespace: str,
    flow_run_id: str,
    resume_from: str | None,
) -> JSON:
    annotations = {ANNOTATION_IMAGE: image_ref, "robotics-cd/config": params.config}
    if flow_run_id:
        annotations[ANNOTATION_FLOW_RUN] = flow_run_id
    if resume_from:
        annotations[ANNOTATION_RESUMED_FROM] = resume_from
    return {
        "name": name,
        "namespace": namespace,
        "labels": job_labels(params),
        "annotations": annotations,
    }


def build_pytorchjob(
    params: TrainParams,
    image_ref: str,
    name: str,
    namespace: str,
    flow_run_id: str = "",
    *,
    resume_from: str | None = None,
    runtime: str = DEFAULT_RUNTIME,
) -> JSON:
    """The ``kubeflow.org/v1`` PyTorchJob for ``params``: one master, ``workers`` workers.

    ``runtime`` is a TrainJob's business and ignored here.
    """
    replica_specs: JSON = {"Master": _replica_spec(params, image_ref, 1, resume_from)}
    if params.workers:
        replica_specs["Worker"] = _replica_spec(params, image_ref, params.workers, resume_from)
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
    return {
        "apiVersion": PYTORCHJOB.api_version,
        "kind": PYTORCHJOB.kind,
        "metadata": _job_metadata(params, image_ref, name, namespace, flow_run_id, resume_from),
        "spec": spec,
    }


def build_trainjob(
    params: TrainParams,
    image_ref: str,
    name: str,
    namespace: str,
    flow_run_id: str = "",
    *,
    resume_from: str | None = None,
    runtime: str = DEFAULT_RUNTIME,
) -> JSON:
    """The ``trainer.kubeflow.org/v1alpha1`` TrainJob (Trainer v2.3.0) for ``params``.

    ``workers + 1`` nodes (``trainer.numNodes``) on the ClusterTrainingRuntime ``runtime``.
    The runtime's JobSet template supplies everything else (restart policy, backoff limit);
    what only the pod template can carry (the experiment label, data volumes and their
    mounts in the ``node`` container) goes through ``spec.runtimePatches``, the v2.3 way.
    """
    trainer: JSON = {"image": image_ref}
    if params.command:
        trainer["command"] = list(params.command)
    if params.args:
        trainer["args"] = list(params.args)
    trainer["env"] = trainer_env(params, resume_from)
    trainer["numNodes"] = params.nodes
    if params.nproc_per_node.isdigit():
        trainer["numProcPerNode"] = int(params.nproc_per_node)
    trainer["resourcesPerNode"] = trainer_resources(params)
    volumes, mounts = trainer_volumes(params)
    pod_patch: JSON = {"metadata": {"labels": job_labels(params)}}
    if volumes:
        pod_patch["spec"] = {
            "volumes": volumes,
            "containers": [{"name": TRAINJOB_NODE, "volumeMounts": mounts}],
        }
    patch = {
        "manager": MANAGED_BY,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {"name": TRAINJOB_NODE, "template": {"spec": {"template": pod_patch}}}
                    ]
                }
            }
        },
    }
    return {
        "apiVersion": TRAINJOB.api_version,
        "kind": TRAINJOB.kind,
        "metadata": _job_metadata(params, image_ref, name, namespace, flow_run_id, resume_from),
        "spec": {
            "runtimeRef": {
                "name": runtime,
                "apiGroup": TRAINJOB.group,
                "kind": "ClusterTrainingRuntime",
            },
            "activeDeadlineSeconds": params.deadline_seconds,
            "trainer": trainer,
            "runtimePatches": [patch],
        },
    }


BUILDERS: dict[str, tuple[JobKind, JobBuilder]] = {
    "pytorchjob": (PYTORCHJOB, build_pytorchjob),
    "trainjob": (TRAINJOB, build_trainjob),
}


def kind_of(job: Mapping[str, Any]) -> JobKind:
    """The JobKind of a job object (by apiVersion and kind)."""
    for kind in KINDS.values():
        if job.get("apiVersion") == kind.api_version and job.get("kind") == kind.kind:
            return kind
    raise InvalidInput(f"unsupported training job kind {job.get('apiVersion')}/{job.get('kind')}")


# --- reading a job's status --------------------------------------------------------------------

Phase = Literal[
    "Pending", "Created", "Running", "Restarting", "Succeeded", "Complete", "Failed", "Suspended"
]


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
        return self.phase in ("Succeeded", "Complete", "Failed")

    @property
    def succeeded(self) -> bool:
        """PyTorchJob's Succeeded or TrainJob's Complete."""
        return self.phase in ("Succeeded", "Complete")

    @property
    def condition(self) -> str:
        text = self.phase + (f" ({self.reason})" if self.reason else "")
        return text + (f": {self.message}" if self.message else "")


def job_state(job: Mapping[str, Any]) -> JobState:
    """Read a PyTorchJob's or a TrainJob's status (by its kind)."""
    if job.get("kind") == TRAINJOB.kind:
        return trainjob_state(job)
    return pytorchjob_state(job)


def trainjob_state(job: Mapping[str, Any]) -> JobState:
    """Read a TrainJob's status as Trainer v2.3's controller writes it.

    Conditions (metav1.Condition): ``Complete`` and ``Failed`` copied from the JobSet's
    Completed/Failed, ``Failed`` with reason ``DeadlineExceeded``, ``Suspended`` True while
    suspended (False, reason ``Resumed``, after). No Created/Running conditions exist in
    v2.3: a job is Running while ``jobsStatus`` counts an active child Job.
    """
    status = job.get("status") or {}
    true = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    jobs = {
        str(j.get("name")): {
            k: int(v) for k, v in j.items() if k != "name" and isinstance(v, int) and v
        }
        for j in status.get("jobsStatus") or []
    }
    chosen: Mapping[str, Any] = {}
    phase: Phase = "Created"
    for ctype in ("Failed", "Complete", "Suspended"):
        if ctype in true:
            chosen, phase = true[ctype], ctype  # type: ignore[assignment]
            break
    else:
        if any(counts.get("active") for counts in jobs.values()):
            phase = "Running"
    created = (job.get("metadata") or {}).get("creationTimestamp")
    return JobState(
        phase=phase,
        reason=str(chosen.get("reason") or ""),
        message=str(chosen.get("message") or ""),
        start_time=created,
        completion_time=chosen.get("lastTransitionTime")
        if phase in ("Complete", "Failed")
        else None,
        replicas=jobs,
    )


def pytorchjob_state(job: Mapping[str, Any]) -> JobState:
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
_STEP_RE = re.compile(r"\b(?:step|iter(?:ation)?)[\s:=]+(\d+)\s*(?:/|of)\s*(\d+)", re.IGNORECASE)
_RESUMED_RE = re.compile(r"\bresum\w*\b.*?\bepoch[\s:=]+(\d+)", re.IGNORECASE)
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


def step_progress(line: str) -> tuple[int, int] | None:
    """``step 40/100`` (or ``iter 40 of 100``) → (40, 100): steps within the current epoch."""
    match = _STEP_RE.search(line)
    if not match:
        return None
    done, total = int(match.group(1)), int(match.group(2))
    return (done, total) if 0 <= done <= total and total > 0 else None


@dataclass
class TrainingProgress:
    """Epoch, step and an ETA, read from the trainer's log lines as they arrive.

    The ETA is the time per unit of work since the first progress line of this attempt,
    times the work left; work done before a resume (``resuming from ... epoch N``) is not
    counted as this attempt's speed.
    """

    epochs: tuple[int, int] | None = None
    steps: tuple[int, int] | None = None
    resumed_epoch: int = 0
    first_at: float | None = None
    first_fraction: float = 0.0
    last_at: float | None = None

    def feed(self, line: str, now: float) -> bool:
        """Take one log line read at ``now``; True if the progress changed."""
        resumed = _RESUMED_RE.search(line)
        if resumed:
            self.resumed_epoch = int(resumed.group(1))
        epochs, steps = epoch_progress(line), step_progress(line)
        if epochs is None and steps is None:
            return False
        if epochs is not None and steps is not None:
            # "epoch 2/3 step 1/4": epoch 2 is under way, so 1 epoch is done.
            self.epochs, self.steps = (epochs[0] - 1, epochs[1]), steps
        elif epochs is not None:
            # "epoch 2/3 loss=...": epoch 2 is done.
            self.epochs, self.steps = epochs, None
        else:
            self.steps = steps
        if self.first_at is None:
            self.first_at, self.first_fraction = now, self.fraction
        self.last_at = now
        return True

    @property
    def fraction(self) -> float:
        """Share of the training done, 0..1 (epochs, refined by the steps of the next one)."""
        if self.epochs is None:
            return self.steps[0] / self.steps[1] if self.steps else 0.0
        done, total = self.epochs
        within = self.steps[0] / self.steps[1] if self.steps else 0.0
        return min(1.0, (done + within) / total) if done < total else 1.0

    def eta_seconds(self) -> float | None:
        if self.first_at is None or self.last_at is None:
            return None
        gained = self.fraction - self.first_fraction
        if gained <= 0 or self.last_at <= self.first_at:
            return None
        rate = gained / (self.last_at - self.first_at)
        return max(0.0, (1.0 - self.fraction) / rate)

    def describe(self) -> str:
        parts = []
        if self.epochs and self.steps:
            parts.append(f"epoch {self.epochs[0] + 1}/{self.epochs[1]}")
        elif self.epochs:
            parts.append(f"epoch {self.epochs[0]}/{self.epochs[1]} done")
        if self.steps:
            parts.append(f"step {self.steps[0]}/{self.steps[1]}")
        eta = self.eta_seconds()
        if eta is not None:
            parts.append(f"ETA {format_seconds(eta)}")
        if self.resumed_epoch:
            parts.append(f"resumed after epoch {self.resumed_epoch}")
        return ", ".join(parts)


def format_seconds(seconds: float) -> str:
    """``3725`` → ``1h02m05s``; ``42`` → ``42s``."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def checkpoint_location(line: str) -> str | None:
    """``checkpoint saved to /checkpoints/x.pt`` → the path (or URL) it names."""
    match = _CHECKPOINT_RE.search(line)
    return match.group("where").rstrip(".,;") if match else None


def progress_percent(state: JobState, epochs: tuple[int, int] | TrainingProgress | None) -> float:
    """A progress figure for the artifact: the phase, refined by the epochs (and steps) the
    log shows."""
    if state.finished:
        return 100.0
    if isinstance(epochs, TrainingProgress):
        if epochs.epochs is not None or epochs.steps is not None:
            return round(10.0 + 85.0 * epochs.fraction, 1)
    elif epochs:
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
    kind: str = PYTORCHJOB.kind,
    resumed_from: str | None = None,
    runtime: str | None = None,
) -> str:
    """The run's summary artifact: what ran, how it ended, where its output went."""
    duration = job_duration_seconds(state)
    if kind == TRAINJOB.kind:
        replicas = f"{params.nodes} node(s)"
    else:
        replicas = f"1 master + {params.workers} worker(s)"
    if params.gpus_per_node:
        replicas += f", {params.gpus_per_node} GPU(s) per node"
    counts = ", ".join(
        f"{rtype}: " + " ".join(f"{k}={v}" for k, v in sorted(c.items()))
        for rtype, c in sorted((state.replicas or {}).items())
    )
    rows = [
        (kind, f"`{namespace}/{name}`"),
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
    if runtime:
        rows.insert(1, ("runtime", f"ClusterTrainingRuntime `{runtime}`"))
    if resumed_from:
        rows.append(("resumed from", f"`{resumed_from}`"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = f"# Training {params.experiment}: {state.phase}\n\n| | |\n|---|---|\n{table}\n"
    tail = list(last_lines)
    if tail:
        text += "\n## Last log lines (node 0)\n\n```\n" + "\n".join(tail) + "\n```\n"
    return text


# --- per-namespace limits (the catalog's ``limits:``) -------------------------------------------

_MEMORY_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def memory_bytes(value: str) -> int:
    """``16Gi`` → 17179869184 (the quantities ``_memory`` accepts)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", value)
    if not match:
        raise InvalidInput(f"{value!r} is not a memory quantity (write e.g. 512Mi or 16Gi)")
    return round(float(match.group(1)) * _MEMORY_UNITS[match.group(2) or ""])


def cpu_millis(value: str) -> int:
    """``2`` → 2000, ``500m`` → 500."""
    _cpu(value)
    return _cpu_millis(value)


class NamespaceLimits(BaseModel):
    """What one run may ask for in a namespace (the catalog's ``limits.<namespace>``).

    Every limit is optional; a run over any of them is refused before anything is submitted,
    with the limit named.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_gpus_total: int | None = Field(
        default=None, ge=0, description="GPUs of one run in total (nodes × gpus_per_node)."
    )
    max_cpu_per_replica: CpuQuantity | None = Field(
        default=None, description="CPU of one node (replica), e.g. 32."
    )
    max_memory_per_replica: MemoryQuantity | None = Field(
        default=None, description="Memory of one node (replica), e.g. 256Gi."
    )
    max_replicas: int | None = Field(
        default=None,
        ge=1,
        description="Nodes (replicas) of one run, master included; elastic runs count "
        "elastic_max + 1.",
    )


def check_limits(params: TrainParams, limits: NamespaceLimits | None, namespace: str) -> None:
    """Refuse a run over its namespace's limits, naming the limit (raise InvalidInput)."""
    if limits is None:
        return
    where = f"limits.{namespace}"
    problems: list[str] = []
    nodes = params.max_nodes
    if limits.max_replicas is not None and nodes > limits.max_replicas:
        problems.append(
            f"workers: {nodes} nodes exceed {where}.max_replicas = {limits.max_replicas}"
        )
    gpus = nodes * params.gpus_per_node
    if limits.max_gpus_total is not None and gpus > limits.max_gpus_total:
        problems.append(
            f"gpus_per_node: {gpus} GPUs in total ({nodes} nodes × {params.gpus_per_node}) "
            f"exceed {where}.max_gpus_total = {limits.max_gpus_total}"
        )
    if limits.max_cpu_per_replica is not None and cpu_millis(params.cpu) > cpu_millis(
        limits.max_cpu_per_replica
    ):
        problems.append(
            f"cpu: {params.cpu} per node exceeds {where}.max_cpu_per_replica = "
            f"{limits.max_cpu_per_replica}"
        )
    if limits.max_memory_per_replica is not None and memory_bytes(params.memory) > memory_bytes(
        limits.max_memory_per_replica
    ):
        problems.append(
            f"memory: {params.memory} per node exceeds {where}.max_memory_per_replica = "
            f"{limits.max_memory_per_replica}"
        )
    if problems:
        raise InvalidInput(
            "invalid training parameters: "
            + "; ".join(problems)
            + " (services.yaml; ask the platform team to raise the limit)"
        )
