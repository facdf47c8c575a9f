"""What ``robotics-cd serve`` and ``robotics-cd deploy`` share: the deployment table, the
global concurrency limits, and the automations.

Each flow is imported lazily: a flow module not written yet is skipped with a warning, so
serving works while the project grows. ``prefect.yaml`` declares the same deployments for
``prefect deploy``; a test keeps the two in step.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from core.catalog import Catalog

log = logging.getLogger("robotics_cd.register")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PoolType = Literal["process", "kubernetes"]
DEFAULT_POOL = {"process": "robotics-cd-process", "kubernetes": "robotics-cd-kubernetes"}
ZOMBIE_AUTOMATION = "robotics-cd: mark silent flow runs crashed"
ROLLBACK_AUTOMATION = "robotics-cd: roll back crashed or cancelled releases"
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
                work_pool_name=work_pool_name,
                job_variables=job_variables,
                entrypoint_type=EntrypointType.MODULE_PATH,
                # Sync even when called from async code (deploy), which would otherwise
                # get ato_deployment's coroutine.
                _sync=True,
            )
        )
    return deployments


# --- global concurrency limits -------------------------------------------------------------


def concurrency_limit_names(catalog: Catalog) -> list[str]:
    """One limit per service and environment: ``release-<service>-<env>``."""
    return sorted(
        f"release-{name}-{env}"
        for name, svc in catalog.services.items()
        for env in svc.environments
    )


async def ensure_concurrency_limits(catalog: Catalog, client: Any) -> list[str]:
    """Create missing limits (limit 1); existing ones are left as the operator set them."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    for name in concurrency_limit_names(catalog):
        try:
            await client.read_global_concurrency_limit_by_name(name)
            continue
        except ObjectNotFound:
            pass
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
        )
        created.append(name)
    return created


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


async def upsert_automation(client: Any, automation: Any) -> UUID:
    """Create the automation, or replace the one of the same name: deploy is re-runnable."""
    existing = await client.read_automations_by_name(automation.name)
    for old in existing[1:]:
        await client.delete_automation(old.id)
    if existing:
        await client.update_automation(existing[0].id, automation)
        return UUID(str(existing[0].id))
    return UUID(str(await client.create_automation(automation)))


# --- work pools ----------------------------------------------------------------------------

HEARTBEAT_ENV = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}


@dataclass(frozen=True)
class KubernetesPoolOptions:
    """What the Kubernetes variant's base job template fixes for every flow run's Job."""

    namespace: str = "robotics-cd"
    service_account: str = "robotics-cd-runner"
    image: str = "127.0.0.1:5000/robotics-cd/worker:latest"
    cpu_request: str = "500m"
    cpu_limit: str = "2"
    memory_request: str = "1Gi"
    memory_limit: str = "4Gi"


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

    template: dict[str, Any] = KubernetesWorker.get_default_base_job_template()
    for variable, value in (
        ("namespace", options.namespace),
        ("service_account_name", options.service_account),
        ("image", options.image),
        ("image_pull_policy", "IfNotPresent"),
        ("cpu_request", options.cpu_request),
        ("cpu_limit", options.cpu_limit),
        ("memory_request", options.memory_request),
        ("memory_limit", options.memory_limit),
        ("env", dict(HEARTBEAT_ENV)),
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
