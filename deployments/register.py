"""What ``robotics-cd serve`` and ``robotics-cd deploy`` share: the deployment table, the
automations, and registering both so that only what differs changes.

Each flow is imported lazily: a flow module not written yet is skipped with a warning, so
serving works while the project grows. ``prefect.yaml`` declares the same deployments for
``prefect deploy``; a test keeps the two in step.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from core.catalog import Catalog
from core.errors import InvalidInput
from core.settings import get_settings

log = logging.getLogger("robotics_cd.register")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PoolType = Literal["process", "kubernetes"]
DEFAULT_POOL = {"process": "robotics-cd-process", "kubernetes": "robotics-cd-kubernetes"}
ZOMBIE_AUTOMATION = "robotics-cd: mark silent flow runs crashed"
ROLLBACK_AUTOMATION = "robotics-cd: roll back crashed or cancelled releases"
RECONCILER_LATE_AUTOMATION = "robotics-cd: the reconciler has not run for three periods"
RECONCILE_DEPLOYMENT = "reconcile/reconcile"
# Three missed heartbeats (PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 in the sandbox) = dead.
ZOMBIE_AFTER = timedelta(seconds=float(os.environ.get("ROBOTICS_CD_ZOMBIE_AFTER_SECONDS", "90")))


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: which flow, under what name, with which defaults."""

    flow_name: str
    module: str
    function: str
    description: str
    tags: tuple[str, ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    cron: str | None = None
    # Seconds between runs, read when the deployment is built (settings may change it).
    interval: Callable[[], float] | None = None

    @property
    def name(self) -> str:
        # Deployment name = flow name: "ci/ci", as core.settings names them.
        return self.flow_name

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"

    @property
    def entrypoint(self) -> str:
        return f"{self.module.replace('.', '/')}.py:{self.function}"


SPECS: tuple[DeploymentSpec, ...] = (
    DeploymentSpec(
        "ci",
        "flows.ci",
        "ci",
        "CI of one commit: checkout, lint, test, build, scan, push; reports commit statuses "
        "and hands a default-branch push over to the release.",
        ("ci", "github"),
    ),
    DeploymentSpec(
        "release",
        "flows.release",
        "release",
        "Release one built image: staging by GitOps, verification, approval in the UI, "
        "production canary judged on metrics, promotion or rollback.",
        ("release",),
    ),
    DeploymentSpec(
        "release-train",
        "flows.release_train",
        "release_train",
        "Release several services as one: staging in dependency order, one approval, every "
        "production lease in one atomic push, lockstep canaries, one promotion or rollback "
        "commit for all.",
        ("release", "train"),
    ),
    DeploymentSpec(
        "rollback",
        "flows.rollback",
        "rollback",
        "Restore production of one service to its tree before a release (started by hand "
        "or by the automation for crashed and cancelled releases).",
        ("release", "rollback"),
    ),
    DeploymentSpec(
        "expire-approvals",
        "flows.release",
        "expire_approvals",
        "Reject releases whose approval waited longer than the catalog's timeout.",
        ("release", "approval"),
        cron="*/5 * * * *",
    ),
    DeploymentSpec(
        "reconcile",
        "flows.reconcile",
        "reconcile",
        "Restore production where a release died or stopped renewing its lease (also runs "
        "once whenever serve starts, and as `robotics-cd reconcile`).",
        ("release", "recovery"),
        interval=lambda: get_settings().reconcile_period.total_seconds(),
    ),
    DeploymentSpec(
        "training-image",
        "flows.training",
        "training_image",
        "Build, scan and push a training image after a push that touches its sources.",
        ("training", "github"),
    ),
    DeploymentSpec(
        "train",
        "flows.training",
        "train",
        "Run a distributed PyTorchJob to the end, streaming its logs.",
        ("training",),
    ),
    DeploymentSpec(
        "dora-report",
        "flows.dora",
        "dora_report_flow",
        "Weekly DORA metrics from the manifests repo's history, as a markdown artifact.",
        ("dora",),
        cron="0 6 * * 1",
    ),
)


def load_flow(spec: DeploymentSpec) -> Any | None:
    """The flow object, or None (with a warning) when its module is not there yet."""
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as exc:
        if exc.name != spec.module:
            raise
        log.warning("flow module %s not present: deployment %s skipped", spec.module, spec.name)
        return None
    flow = getattr(module, spec.function, None)
    if flow is None:
        log.warning(
            "%s has no %s: deployment %s skipped", spec.module, spec.function, spec.full_name
        )
        return None
    if getattr(flow, "name", None) != spec.flow_name:
        log.warning(
            "flow %s.%s is named %r, not %r: its deployment is %s/%s",
            spec.module,
            spec.function,
            getattr(flow, "name", None),
            spec.flow_name,
            getattr(flow, "name", None),
            spec.name,
        )
    return flow


def runner_deployments(
    *,
    only: set[str] | None = None,
    work_pool_name: str | None = None,
    job_variables: dict[str, Any] | None = None,
    name_suffix: str = "",
) -> list[Any]:
    """``RunnerDeployment``s of every flow present (``only``: a subset by flow name;
    ``name_suffix``: appended to each deployment name, e.g. for a side-by-side copy)."""
    from prefect._internal.versioning import VersionType
    from prefect.types.entrypoint import EntrypointType

    deployments = []
    for spec in SPECS:
        if only is not None and spec.flow_name not in only:
            continue
        flow = load_flow(spec)
        if flow is None:
            continue
        deployments.append(
            flow.to_deployment(
                name=spec.name + name_suffix,
                description=spec.description,
                tags=list(spec.tags),
                parameters=dict(spec.parameters) or None,
                cron=spec.cron,
                interval=spec.interval() if spec.interval else None,
                work_pool_name=work_pool_name,
                job_variables=job_variables,
                entrypoint_type=EntrypointType.MODULE_PATH,
                # The flow's source hash, not one inferred from git: in a clone with a remote
                # Prefect stores the commit sha instead, and a second deploy then "differs".
                version_type=VersionType.SIMPLE,
                # Sync even when called from async code (deploy), which would otherwise
                # get ato_deployment's coroutine.
                _sync=True,
            )
        )
    return deployments


# --- global concurrency limits (no longer used) --------------------------------------------
#
# Earlier versions created a global concurrency limit `release-<service>-<env>` (limit 1) per
# service and environment, and nothing ever acquired it. It could not be the release lock:
# a slot is given back when a run suspends for approval (days, without a process), and a
# slot held by a process that died stays taken until slot decay. The lock is the lease (a
# ref in the manifests repo, compare-and-swap, recording the run and its "before"). So the
# limits are removed rather than used.


def legacy_concurrency_limit_names(catalog: Catalog) -> list[str]:
    """The limits earlier versions of ``deploy`` created: ``release-<service>-<env>``."""
    return sorted(
        f"release-{name}-{env}"
        for name, svc in catalog.services.items()
        for env in svc.environments
    )


async def remove_unused_concurrency_limits(catalog: Catalog, client: Any) -> list[str]:
    """Delete the ``release-<service>-<env>`` limits an earlier ``deploy`` made."""
    from prefect.exceptions import ObjectNotFound

    removed = []
    for name in legacy_concurrency_limit_names(catalog):
        try:
            await client.delete_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            continue
        removed.append(name)
    return removed


# --- automations ---------------------------------------------------------------------------


def zombie_automation(
    name: str = ZOMBIE_AUTOMATION,
    *,
    after: timedelta = ZOMBIE_AFTER,
    flow_runs: str = "prefect.flow-run.*",
) -> Any:
    """Prefect's zombie-run pattern: a running flow run whose heartbeats stop is Crashed."""
    from prefect.automations import AutomationCore, ChangeFlowRunState, EventTrigger
    from prefect.client.schemas.objects import StateType

    return AutomationCore(
        name=name,
        description="A flow run that sent a heartbeat then went silent for "
        f"{int(after.total_seconds())} s is marked Crashed (needs "
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY on the runners/workers).",
        trigger=EventTrigger(
            match={"prefect.resource.id": flow_runs},
            after={"prefect.flow-run.heartbeat"},
            # Any event of the run is a sign of life: a heartbeat, and every state change,
            # whatever its name (a state event is `prefect.flow-run.<state name>`, so the
            # custom-named Rejected, Promoted, Superseded, AwaitingLock, Resuming ... count).
            expect={"prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture="Proactive",
            threshold=1,
            within=after,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message="Flow run marked Crashed: no heartbeat for "
                f"{int(after.total_seconds())} s (its process or pod died).",
            )
        ],
    )


def reconciler_late_automation(
    reconcile_deployment_id: UUID, period: timedelta, name: str = RECONCILER_LATE_AUTOMATION
) -> Any:
    """Fires when no run of the reconcile deployment completed for three periods: the
    safety net itself is down. Its firing is an event in the UI's feed
    (``prefect.automation.triggered``); wire a notification action to it on a real platform
    (the action here does nothing else, having no notification block to name)."""
    from prefect.automations import AutomationCore, DoNothing, EventTrigger

    return AutomationCore(
        name=name,
        description=f"No reconcile run completed for {int(3 * period.total_seconds())} s: "
        "production would not be restored after a runner dies. Start `robotics-cd serve` "
        "or a worker, or run `robotics-cd reconcile`.",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={
                "prefect.resource.role": "deployment",
                "prefect.resource.id": f"prefect.deployment.{reconcile_deployment_id}",
            },
            expect={"prefect.flow-run.Completed"},
            posture="Proactive",
            threshold=1,
            within=3 * period,
        ),
        actions=[DoNothing()],
    )


# What the rollback flow may be told about the release run that died, by parameter name.
# (`| string`: a bare `{{ flow_run.id }}` fails to render in Prefect 3.9's RunDeployment.)
ROLLBACK_PARAMETER_TEMPLATES = {
    "release_flow_run_id": "{{ flow_run.id | string }}",
    "release_run_id": "{{ flow_run.id | string }}",
    "flow_run_id": "{{ flow_run.id | string }}",
    "service": "{{ flow_run.parameters.service }}",
    "reason": "release run {{ flow_run.name }} ended {{ flow_run.state.name }}",
}


def rollback_automation(
    release_deployment_id: UUID,
    rollback_deployment_id: UUID,
    accepted: set[str],
    name: str = ROLLBACK_AUTOMATION,
) -> Any:
    """A crashed or cancelled release run starts the rollback deployment for that run.

    Only the parameters the rollback deployment accepts (``accepted``, from its schema) are
    passed, so the automation never creates a run the server refuses.
    """
    from prefect.automations import AutomationCore, EventTrigger, RunDeployment

    return AutomationCore(
        name=name,
        description="Roll production back when a release run crashed or was cancelled; the "
        "rollback flow is idempotent per release run.",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={
                "prefect.resource.role": "deployment",
                "prefect.resource.id": f"prefect.deployment.{release_deployment_id}",
            },
            expect={"prefect.flow-run.Crashed", "prefect.flow-run.Cancelled"},
            posture="Reactive",
            threshold=1,
        ),
        actions=[
            RunDeployment(
                source="selected",
                deployment_id=rollback_deployment_id,
                parameters={k: v for k, v in ROLLBACK_PARAMETER_TEMPLATES.items() if k in accepted},
            )
        ],
    )


Change = Literal["created", "updated", "unchanged"]


def _without_ids(value: Any) -> Any:
    """A dumped model with every ``id`` key removed (the server gives triggers new ones)."""
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k != "id"}
    if isinstance(value, list | tuple):
        return [_without_ids(v) for v in value]
    return value


def automation_view(automation: Any) -> dict[str, Any]:
    """What an automation *is*, for comparing the stored one with the wanted one: the fields
    of ``AutomationCore``, without ids, sets kept as sets (their order means nothing)."""
    from prefect.automations import AutomationCore

    fields = set(AutomationCore.model_fields)
    core = AutomationCore.model_validate(automation.model_dump(include=fields))
    view: dict[str, Any] = _without_ids(core.model_dump(mode="python"))
    return view


async def upsert_automation(client: Any, automation: Any) -> tuple[UUID, Change]:
    """Create the automation, update it if it differs, or leave it alone.

    Leaving an unchanged automation alone matters: updating one drops its trigger state, so
    a proactive trigger forgets the runs that are already silent (a runner restarted after a
    crash would otherwise erase the evidence of the crash). Duplicates of the name are
    removed."""
    existing = await client.read_automations_by_name(automation.name)
    for old in existing[1:]:
        await client.delete_automation(old.id)
    if not existing:
        return UUID(str(await client.create_automation(automation))), "created"
    current = existing[0]
    if automation_view(current) == automation_view(automation):
        return UUID(str(current.id)), "unchanged"
    await client.update_automation(current.id, automation)
    log.info("automation %r differed from the wanted one: updated", automation.name)
    return UUID(str(current.id)), "updated"


# --- deployments ---------------------------------------------------------------------------


def _schedules_view(schedules: Any) -> list[Any]:
    view = []
    for item in schedules or []:
        schedule = getattr(item, "schedule", None)
        dumped = schedule.model_dump(mode="json") if schedule is not None else None
        if isinstance(dumped, dict):
            # An interval schedule built without one gets "now" as its anchor: that is not
            # a difference worth an update (which would reset the schedule's runs).
            dumped.pop("anchor_date", None)
        view.append((json_key(dumped), bool(getattr(item, "active", True))))
    return sorted(view)


def json_key(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


def deployment_differences(existing: Any, wanted: Any, work_pool_name: str | None) -> list[str]:
    """The fields in which a stored deployment differs from a ``RunnerDeployment`` (empty:
    registering it again would change nothing)."""
    want_schema = wanted._parameter_openapi_schema.model_dump(exclude_unset=True)
    have_schema = existing.parameter_openapi_schema or {}
    pairs: dict[str, tuple[Any, Any]] = {
        "description": (existing.description, wanted.description),
        "tags": (sorted(existing.tags or []), sorted(wanted.tags or [])),
        "parameters": (json_key(existing.parameters or {}), json_key(wanted.parameters or {})),
        "entrypoint": (existing.entrypoint, wanted.entrypoint),
        "version": (existing.version, wanted.version),
        "work_pool_name": (existing.work_pool_name, work_pool_name or wanted.work_pool_name),
        "job_variables": (
            json_key(existing.job_variables or {}),
            json_key(wanted.job_variables or {}),
        ),
        "parameter_openapi_schema": (json_key(have_schema), json_key(want_schema)),
        "enforce_parameter_schema": (
            existing.enforce_parameter_schema,
            wanted.enforce_parameter_schema,
        ),
        "concurrency_limit": (existing.concurrency_limit, wanted.concurrency_limit),
        "schedules": (_schedules_view(existing.schedules), _schedules_view(wanted.schedules)),
        "paused": (bool(existing.paused), bool(wanted.paused)),
    }
    return [name for name, (have, want) in pairs.items() if have != want]


async def apply_deployment(
    client: Any, deployment: Any, work_pool_name: str | None = None
) -> tuple[UUID, Change]:
    """Register a ``RunnerDeployment`` only where it differs from the stored one."""
    from prefect.exceptions import ObjectNotFound

    full_name = f"{deployment.flow_name}/{deployment.name}"
    try:
        existing = await client.read_deployment_by_name(full_name)
    except ObjectNotFound:
        return UUID(str(await deployment.aapply(work_pool_name=work_pool_name))), "created"
    differs = deployment_differences(existing, deployment, work_pool_name)
    if not differs:
        return UUID(str(existing.id)), "unchanged"
    log.info("deployment %s differs in %s: updated", full_name, ", ".join(differs))
    return UUID(str(await deployment.aapply(work_pool_name=work_pool_name))), "updated"


# --- work pools ----------------------------------------------------------------------------

HEARTBEAT_ENV = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
# Where a Kubernetes pool's flow-run pods mount the results claim (Prefect's local storage).
RESULTS_MOUNT = "/var/lib/robotics-cd/results"


# Start a Kubernetes worker with this in its environment: the worker then moves every plain
# env value of a flow run's Job (PREFECT_API_URL, an API key or auth string, the settings
# below) into a per-Job Secret owned by the Job, and the pod reads it with envFrom.
KUBERNETES_WORKER_ENV = {"PREFECT_INTEGRATIONS_KUBERNETES_WORKER_STORE_ENV_AS_SECRET": "true"}

# Words in an env name that mark a credential. Credentials live in Prefect blocks (read by
# the flow at run time) or reach the Job through the worker's Secret, never in a pool's base
# job template, which anyone reading the work pool sees.
_CREDENTIAL_WORDS = ("TOKEN", "PASSWORD", "PASSWD", "SECRET", "KEY", "AUTH", "CREDENTIAL")


def credential_like(name: str) -> bool:
    """Whether an env variable's name says it carries a credential."""
    upper = name.upper()
    if upper.endswith("_BLOCK"):
        return False  # the *name* of the block that holds one (ROBOTICS_CD_*_TOKEN_BLOCK)
    return any(word in upper for word in _CREDENTIAL_WORDS)


@dataclass(frozen=True)
class KubernetesPoolOptions:
    """What the Kubernetes variant's base job template fixes for every flow run's Job.

    ``host_network``: the Job's pod runs in its node's network namespace, so it reaches
    services on the node's 127.0.0.1 (the sandbox: its Prefect API, registry, git, Argo CD
    and Prometheus listen there); off on a real cluster. ``env``: plain, non-secret settings
    every flow run needs (``ROBOTICS_CD_*``: URLs, block names); a name that looks like a
    credential is refused. ``results_claim``: a PersistentVolumeClaim (ReadWriteMany on a
    cluster of several nodes: NAS on ACK) mounted at ``RESULTS_MOUNT`` as Prefect's result
    storage, so a release resumed after its approval in a *new* Job finds the results its
    first Job persisted (without it, every task before the approval runs again).
    """

    namespace: str = "robotics-cd"
    service_account: str = "robotics-cd-runner"
    image: str = "127.0.0.1:5000/robotics-cd/worker:latest"
    cpu_request: str = "500m"
    cpu_limit: str = "2"
    memory_request: str = "1Gi"
    memory_limit: str = "4Gi"
    host_network: bool = False
    env: dict[str, str] = field(default_factory=dict)
    results_claim: str | None = None


def _set_default(template: dict[str, Any], variable: str, value: Any) -> None:
    properties = template["variables"]["properties"]
    if variable not in properties:
        raise KeyError(f"the worker's base job template has no variable {variable!r}")
    properties[variable]["default"] = value


def process_base_job_template(working_dir: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Prefect's process template; runs start in the project (flows import as modules)."""
    from prefect.workers.process import ProcessWorker

    template: dict[str, Any] = ProcessWorker.get_default_base_job_template()
    _set_default(template, "working_dir", str(working_dir))
    _set_default(template, "env", dict(HEARTBEAT_ENV))
    return template


def kubernetes_base_job_template(options: KubernetesPoolOptions) -> dict[str, Any]:
    """prefect-kubernetes' Job template with this project's namespace, account, image,
    resources and heartbeats as defaults (each still overridable per deployment)."""
    from prefect_kubernetes.worker import KubernetesWorker

    env = {**HEARTBEAT_ENV, **options.env}
    if options.results_claim:
        # The setting's own name, not its legacy alias PREFECT_LOCAL_STORAGE_PATH: a worker
        # passes its own settings to each run under their own names, and the own name wins
        # over the alias (seen on the twin: a worker's storage path overrode ours).
        env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = RESULTS_MOUNT
    refused = sorted(name for name in env if credential_like(name))
    if refused:
        raise InvalidInput(
            f"{', '.join(refused)}: a credential must not be plain env in the work pool's job "
            "template; keep it in a Prefect block, or let the worker store the Job's env as a "
            f"Secret ({', '.join(KUBERNETES_WORKER_ENV)}=true)"
        )
    template: dict[str, Any] = KubernetesWorker.get_default_base_job_template()
    if options.host_network:
        pod_spec = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        pod_spec["hostNetwork"] = True
        # Cluster DNS names still resolve from the host's network namespace.
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    if options.results_claim:
        pod_spec = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        pod_spec["volumes"] = [
            {"name": "results", "persistentVolumeClaim": {"claimName": options.results_claim}}
        ]
        pod_spec["containers"][0]["volumeMounts"] = [
            {"name": "results", "mountPath": RESULTS_MOUNT}
        ]
    for variable, value in (
        ("namespace", options.namespace),
        ("service_account_name", options.service_account),
        ("image", options.image),
        ("image_pull_policy", "IfNotPresent"),
        ("cpu_request", options.cpu_request),
        ("cpu_limit", options.cpu_limit),
        ("memory_request", options.memory_request),
        ("memory_limit", options.memory_limit),
        ("env", env),
        ("finished_job_ttl", 3600),
    ):
        _set_default(template, variable, value)
    return template


async def ensure_work_pool(
    client: Any, name: str, pool_type: PoolType, template: dict[str, Any]
) -> Any:
    """Create the pool or overwrite its base job template: deploy is re-runnable."""
    from prefect.client.schemas.actions import WorkPoolCreate

    return await client.create_work_pool(
        WorkPoolCreate(
            name=name,
            type=pool_type,
            base_job_template=template,
            description=f"robotics-cd flows ({pool_type})",
        ),
        overwrite=True,
    )


def kubernetes_template_file() -> Path:
    """The Kubernetes pool's base job template as a file, for ``prefect work-pool create``."""
    return Path(__file__).parent / "kubernetes-base-job-template.json"
