"""``robotics-cd deploy`` against the session's real Prefect server, and prefect.yaml.

The Kubernetes pool's base job template is validated by the server itself (it refuses a
template whose job configuration names undeclared variables). No Kubernetes worker runs
here; the pool is created, not used.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from prefect import get_client
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

from cli.ops import deploy_all
from deployments import register as reg
from tests.matrix import full_matrix

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_kubernetes_template_file_is_the_one_deploy_uses():
    on_disk = json.loads(reg.kubernetes_template_file().read_text())
    assert on_disk == reg.kubernetes_base_job_template(reg.KubernetesPoolOptions()), (
        "regenerate deployments/kubernetes-base-job-template.json from "
        "deployments.register.kubernetes_base_job_template(KubernetesPoolOptions())"
    )


async def test_kubernetes_pool_is_accepted_by_the_prefect_server(prefect_server):
    name = f"robotics-cd-k8s-test-{uuid.uuid4().hex[:6]}"
    options = reg.KubernetesPoolOptions(
        namespace="robotics-ci", service_account="ci-runner", image="registry.local/rcd:1.0"
    )
    async with get_client() as client:
        await reg.ensure_work_pool(
            client, name, "kubernetes", reg.kubernetes_base_job_template(options)
        )
        pool = await client.read_work_pool(name)
        # Deploying again updates in place.
        await reg.ensure_work_pool(
            client, name, "kubernetes", reg.kubernetes_base_job_template(options)
        )
        await client.delete_work_pool(name)
    assert pool.type == "kubernetes"
    variables = pool.base_job_template["variables"]["properties"]
    assert variables["namespace"]["default"] == "robotics-ci"
    assert variables["service_account_name"]["default"] == "ci-runner"
    assert variables["image"]["default"] == "registry.local/rcd:1.0"
    assert variables["memory_limit"]["default"] == "4Gi"
    assert variables["env"]["default"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    manifest = pool.base_job_template["job_configuration"]["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["memory"] == "{{ memory_limit }}"


async def test_a_broken_template_is_refused_by_the_server(prefect_server):
    from prefect.exceptions import PrefectHTTPStatusError

    template = reg.kubernetes_base_job_template(reg.KubernetesPoolOptions())
    template["job_configuration"]["namespace"] = "{{ no_such_variable }}"
    async with get_client() as client:
        with pytest.raises(PrefectHTTPStatusError, match="422"):
            await reg.ensure_work_pool(client, "robotics-cd-broken", "kubernetes", template)


def _spec_view(spec: reg.DeploymentSpec) -> dict[str, Any]:
    return {
        "entrypoint": spec.entrypoint,
        "tags": list(spec.tags),
        "parameters": dict(spec.parameters),
        "cron": spec.cron,
        "description": spec.description,
    }


def test_prefect_yaml_declares_every_flow_in_both_pools():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    declared: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in config["deployments"]:
        flow_name = next(
            s.flow_name
            for s in reg.SPECS
            if s.entrypoint == entry["entrypoint"] and (entry["name"] in (s.name, "kubernetes"))
        )
        declared[(flow_name, entry["work_pool"]["name"])] = {
            "entrypoint": entry["entrypoint"],
            "tags": entry["tags"],
            "parameters": entry["parameters"],
            "cron": (entry.get("schedules") or [{}])[0].get("cron"),
            "description": entry["description"],
            "name": entry["name"],
            "pull": entry.get("pull"),
            "job_variables": entry["work_pool"]["job_variables"],
        }
    for spec in reg.SPECS:
        for pool in ("robotics-cd-process", "robotics-cd-kubernetes"):
            entry = declared[(spec.flow_name, pool)]
            assert {k: entry[k] for k in _spec_view(spec)} == _spec_view(spec)
    assert {s.flow_name for s in reg.SPECS} == {
        "ci",
        "release",
        "release-train",
        "rollback",
        "expire-approvals",
        "reconcile",
        "training-image",
        "train",
        "dora-report",
    }
    template = reg.kubernetes_base_job_template(reg.KubernetesPoolOptions())
    for (_, pool), entry in declared.items():
        if pool == "robotics-cd-kubernetes":
            assert set(entry["job_variables"]) <= set(template["variables"]["properties"])
            assert entry["pull"][0]["prefect.deployments.steps.set_working_directory"]


async def test_deploy_registers_flows_and_automations_and_changes_only_what_differs(
    prefect_server,
):
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    suffix = f"-deploytest-{uuid.uuid4().hex[:4]}"
    pool = f"robotics-cd-process{suffix}"
    legacy = reg.legacy_concurrency_limit_names(_catalog())
    async with get_client() as client:  # what an earlier version of deploy left behind
        for name in legacy:
            with contextlib.suppress(PrefectHTTPStatusError):  # already there: fine
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )
    first = await deploy_all(pool_type="process", pool_name=pool, name_suffix=suffix)
    again = await deploy_all(pool_type="process", pool_name=pool, name_suffix=suffix)
    try:
        assert first.deployments == again.deployments  # same ids
        assert first.automations == again.automations
        assert set(first.changes.values()) == {"created"}
        # Nothing differs the second time: nothing is written, automations keep their state.
        assert set(again.changes.values()) == {"unchanged"}, again.changes
        assert set(first.limits_removed) == set(legacy) and again.limits_removed == []
        assert f"ci/ci{suffix}" in first.deployments
        async with get_client() as client:
            ci = await client.read_deployment_by_name(f"ci/ci{suffix}")
            assert ci.work_pool_name == pool
            assert ci.entrypoint == "flows.ci.ci"
            assert set(ci.tags) == {"ci", "github"}
            assert (ci.description or "").startswith("CI of one commit")
            process_pool = await client.read_work_pool(pool)
            assert process_pool.base_job_template["variables"]["properties"]["working_dir"][
                "default"
            ] == str(ROOT)

            for name in legacy:
                with pytest.raises(ObjectNotFound):
                    await client.read_global_concurrency_limit_by_name(name)

            zombie = await client.read_automations_by_name(reg.ZOMBIE_AUTOMATION + suffix)
            assert len(zombie) == 1
            trigger: Any = zombie[0].trigger
            assert trigger.posture == "Proactive"
            assert trigger.after == {"prefect.flow-run.heartbeat"}
            assert zombie[0].actions[0].type == "change-flow-run-state"

            if (
                f"release/release{suffix}" in first.deployments
                and f"rollback/rollback{suffix}" in first.deployments
            ):
                (rollback,) = await client.read_automations_by_name(
                    reg.ROLLBACK_AUTOMATION + suffix
                )
                release_id = first.deployments[f"release/release{suffix}"]
                rollback_id = first.deployments[f"rollback/rollback{suffix}"]
                related = getattr(rollback.trigger, "match_related", None)
                assert f"prefect.deployment.{release_id}" in str(related)
                action: Any = rollback.actions[0]
                assert str(action.deployment_id) == rollback_id
                assert action.parameters["service"] == "{{ flow_run.parameters.service }}"
                assert action.parameters["release_run_id"] == "{{ flow_run.id | string }}"
                await _cancelled_release_starts_a_rollback(client, release_id, rollback_id)
    finally:
        async with get_client() as client:
            for automation_id in first.automations.values():
                await client.delete_automation(uuid.UUID(automation_id))
            for deployment_id in first.deployments.values():
                await client.delete_deployment(uuid.UUID(deployment_id))
            await client.delete_work_pool(pool)


async def _cancelled_release_starts_a_rollback(
    client: Any, release_id: str, rollback_id: str
) -> None:
    """The automation at work: a release run cancelled → a rollback run for that release."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.states import Cancelled

    run = await client.create_flow_run_from_deployment(
        uuid.UUID(release_id),
        parameters={"service": "api-gateway", "image": "x", "source_sha": "0" * 40},
    )
    await client.set_flow_run_state(
        run.id, Cancelled(message="test: operator cancelled"), force=True
    )
    deadline = time.monotonic() + 60
    while True:
        started = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[uuid.UUID(rollback_id)]))
        )
        if started or time.monotonic() > deadline:
            break
        await anyio.sleep(0.5)
    assert len(started) == 1, "the automation started no rollback within 60 s"
    assert started[0].parameters["release_run_id"] == str(run.id)
    assert started[0].parameters["service"] == "api-gateway"
    assert "Cancelled" in started[0].parameters["reason"]


def _catalog() -> Any:
    from core.catalog import load_catalog

    return load_catalog()


async def test_zombie_automation_marks_a_silent_running_run_crashed(prefect_server):
    """The automation `deploy` creates, scoped to one run and a 10 s window so the test is
    quick and cannot touch other tests' runs: heartbeat, then silence → Crashed."""
    from datetime import timedelta

    from prefect import flow
    from prefect.events import emit_event
    from prefect.states import Running

    @flow(name="zombie-probe")
    def zombie_probe() -> None:
        """Never executed: its run is driven by hand."""

    async with get_client() as client:
        flow_id = await client.create_flow_from_name("zombie-probe")
        run = await client.create_flow_run(zombie_probe, state=Running())
        assert run.flow_id == flow_id
        automation = reg.zombie_automation(
            f"zombie-test-{run.id}",
            after=timedelta(seconds=10),
            flow_runs=f"prefect.flow-run.{run.id}",
        )
        automation_id, _ = await reg.upsert_automation(client, automation)
        try:
            await anyio.sleep(2)  # the triggers service loads the new automation
            emit_event(
                event="prefect.flow-run.heartbeat",
                resource={"prefect.resource.id": f"prefect.flow-run.{run.id}"},
            )
            deadline = time.monotonic() + 60
            state = None
            while time.monotonic() < deadline:
                state = (await client.read_flow_run(run.id)).state
                if state is not None and state.type.value == "CRASHED":
                    break
                await anyio.sleep(1)
            assert state is not None and state.type.value == "CRASHED", state
            assert "no heartbeat" in (state.message or "")
        finally:
            await client.delete_automation(automation_id)


async def test_a_changed_automation_is_updated_and_an_unchanged_one_keeps_its_trigger_state(
    prefect_server,
):
    """A runner restarted right after a crash registers the automations again. The zombie
    trigger has already seen the dead run's last heartbeat: registering the same automation
    leaves it alone, so the run is still marked Crashed when its window ends. (Updating it
    would drop that state and the run would stay Running for good: issue #15.)"""
    from datetime import timedelta

    from prefect import flow
    from prefect.events import emit_event
    from prefect.states import Running

    @flow(name="zombie-restart-probe")
    def probe() -> None:
        """Never executed: its run is driven by hand."""

    async with get_client() as client:
        await client.create_flow_from_name("zombie-restart-probe")
        run = await client.create_flow_run(probe, state=Running())
        automation = reg.zombie_automation(
            f"zombie-restart-{run.id}",
            after=timedelta(seconds=10),
            flow_runs=f"prefect.flow-run.{run.id}",
        )
        automation_id, change = await reg.upsert_automation(client, automation)
        assert change == "created"
        try:
            await anyio.sleep(2)  # the triggers service loads the new automation
            emit_event(
                event="prefect.flow-run.heartbeat",
                resource={"prefect.resource.id": f"prefect.flow-run.{run.id}"},
            )
            await anyio.sleep(2)  # the heartbeat opened the trigger's window
            again_id, change = await reg.upsert_automation(client, automation)  # the restart
            assert (again_id, change) == (automation_id, "unchanged")
            deadline = time.monotonic() + 60
            state = None
            while time.monotonic() < deadline:
                state = (await client.read_flow_run(run.id)).state
                if state is not None and state.type.value == "CRASHED":
                    break
                await anyio.sleep(1)
            assert state is not None and state.type.value == "CRASHED", state

            changed = automation.model_copy(update={"description": "a new description"})
            _, change = await reg.upsert_automation(client, changed)
            assert change == "updated"
            (stored,) = await client.read_automations_by_name(automation.name)
            assert stored.description == "a new description"
        finally:
            await client.delete_automation(automation_id)


# One custom-named ending in CI; the other two are the same code path (full matrix).
@pytest.mark.parametrize(
    "ending",
    [
        "Rejected",
        pytest.param("Promoted", marks=full_matrix),
        pytest.param("Superseded", marks=full_matrix),
    ],
)
async def test_zombie_automation_leaves_runs_in_custom_named_states_alone(prefect_server, ending):
    """A state event is `prefect.flow-run.<state name>`: a run that heartbeats, then ends
    `Rejected`, `Promoted` or `Superseded` has shown life, so the automation neither marks
    it Crashed nor fails trying (`automation.action.failed ... Run is
    already in terminal state`, seen after every rejected release). The sandbox e2e
    (`tests/e2e/test_release.py`) asserts the same on real releases."""
    from datetime import UTC, datetime, timedelta

    from prefect import flow
    from prefect.client.schemas.objects import State
    from prefect.events import emit_event
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
    from prefect.states import Completed, Failed, Running

    @flow(name="zombie-named-state-probe")
    def probe() -> None:
        """Never executed: its run is driven by hand."""

    since = datetime.now(UTC)
    async with get_client() as client:
        await client.create_flow_from_name("zombie-named-state-probe")
        run = await client.create_flow_run(probe, state=Running())
        automation = reg.zombie_automation(
            f"zombie-named-{run.id}",
            after=timedelta(seconds=10),
            flow_runs=f"prefect.flow-run.{run.id}",
        )
        automation_id, _ = await reg.upsert_automation(client, automation)
        try:
            await anyio.sleep(2)  # the triggers service loads the new automation
            emit_event(
                event="prefect.flow-run.heartbeat",
                resource={"prefect.resource.id": f"prefect.flow-run.{run.id}"},
            )
            await anyio.sleep(1)
            state: State[Any] = (
                Failed(name=ending, message="test")
                if ending == "Superseded"
                else Completed(name=ending, message="test")
            )
            await client.set_flow_run_state(run.id, state, force=True)
            await anyio.sleep(10 + 12)  # the whole window, and the triggers service's loop
            after = (await client.read_flow_run(run.id)).state
            assert after is not None and after.name == ending, after
            failed = await client.read_events(
                filter=EventFilter(
                    occurred=EventOccurredFilter(since=since),
                    event=EventNameFilter(name=["prefect.automation.action.failed"]),
                ),
                limit=50,
            )
            mine = [e for e in failed.events if str(automation_id) in e.resource.id]
            assert mine == []
        finally:
            await client.delete_automation(automation_id)
