"""``robotics-cd train``: start a distributed training run and follow it.

The parameters are validated here first (the same ``TrainParams`` the run form uses), so a
mistake is refused before anything is started. The run is the ``train`` deployment's
(``run_deployment``, top level); the command then follows it: its state, the trainer's
epochs as they reach the run's log, and the final condition. ``--detach`` prints the run's
URL and returns at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from uuid import UUID

import typer

from core.errors import InvalidInput
from core.settings import get_settings
from core.training import TrainParams, epoch_progress, parse_train_params

POLL_SECONDS = 2.0
DRAIN_SECONDS = 10.0
TERMINAL_OK = ("COMPLETED",)


def run_url(flow_run_id: UUID) -> str:
    """Where the run is in the Prefect UI."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    ui = PREFECT_UI_URL.value() or (PREFECT_API_URL.value() or "").removesuffix("/api")
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"


def _split_volume(text: str) -> dict[str, Any]:
    """``claim[:mount_path[:rw]]`` → a DataVolume mapping."""
    parts = text.split(":")
    if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise InvalidInput(f"volumes: {text!r}: write CLAIM[:MOUNT_PATH[:ro|rw]]")
    volume: dict[str, Any] = {"claim": parts[0]}
    if len(parts) > 1 and parts[1]:
        volume["mount_path"] = parts[1]
    if len(parts) == 3:
        volume["read_only"] = parts[2] == "ro"
    return volume


def _split_env(pairs: list[str], secrets: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """``NAME=VALUE`` pairs and ``NAME=SECRET:KEY`` Secret references → the env mapping."""
    env: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInput(f"env: {pair!r}: write NAME=VALUE")
        env[key] = value
    for pair in secrets:
        key, sep, ref = pair.partition("=")
        secret, colon, secret_key = ref.partition(":")
        if not sep or not colon or not secret or not secret_key:
            raise InvalidInput(f"env: {pair!r}: write NAME=SECRET:KEY (a Secret in the namespace)")
        if key in env:
            raise InvalidInput(f"env: {key} is given both as a value and as a Secret")
        env[key] = {"secret": secret, "key": secret_key}
    return env


def check_run(params: TrainParams) -> TrainParams:
    """What the flow checks first that needs the catalog: the api's rules and the limits."""
    from core.catalog import load_catalog
    from core.training import check_limits

    catalog = load_catalog()
    entry = catalog.training_image(params.training_image)
    update: dict[str, Any] = {"api": params.api or entry.api}
    if update["api"] == "trainjob":
        update["runtime"] = params.runtime or entry.runtime
    checked = parse_train_params({**params.model_dump(mode="json"), **update})
    check_limits(checked, catalog.limits.get(entry.namespace), entry.namespace)
    return checked


async def start_train_run(params: TrainParams) -> UUID:
    from prefect.deployments import run_deployment

    run = await run_deployment(  # type: ignore[misc]  # sync_compatible: awaitable here
        get_settings().train_deployment,
        parameters={"params": params.model_dump(mode="json")},
        timeout=0,
        as_subflow=False,
    )
    flow_run_id: UUID = run.id
    return flow_run_id


async def follow_run(flow_run_id: UUID, *, echo: Any = typer.echo) -> str:
    """Print state changes and the trainer's lines until the run ends; its final state."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
    from prefect.client.schemas.sorting import LogSort

    last_state: str | None = ""
    since = None
    drained_at: float | None = None
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(flow_run_id)
            state = run.state
            name = state.type.value if state else "UNKNOWN"
            if state and state.name != last_state:
                last_state = state.name
                echo(f"[{time.strftime('%H:%M:%S')}] run {run.name}: {state.name}")
            log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            if since is not None:
                log_filter.timestamp = LogFilterTimestamp(after_=since)
            printed = 0
            for entry in await client.read_logs(log_filter, sort=LogSort.TIMESTAMP_ASC, limit=200):
                if since is not None and entry.timestamp <= since:
                    continue
                printed += 1
                since = entry.timestamp
                message = entry.message
                epochs = epoch_progress(message)
                if (
                    epochs
                    or "PyTorchJob" in message
                    or "TrainJob" in message
                    or "resum" in message
                    or entry.level >= 30
                ):
                    bar = ""
                    if epochs:
                        done = round(20 * epochs[0] / epochs[1])
                        bar = f"[{'#' * done}{'.' * (20 - done)}] "
                    echo(f"  {bar}{message}")
            if state and state.is_final():
                if drained_at is None:
                    # The run's last log lines reach the API after its final state: read
                    # on until they stop coming (bounded), then report.
                    drained_at = time.monotonic()
                elif printed == 0 or time.monotonic() - drained_at > DRAIN_SECONDS:
                    if not state.is_completed() and state.message:
                        echo(state.message)
                    return name
            await asyncio.sleep(POLL_SECONDS)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        experiment: str = typer.Option(..., help="Experiment name (lowercase, digits, '-')."),
        image_tag: str | None = typer.Option(
            None, help="Training image tag; default: the latest one the training-image flow pushed."
        ),
        training_image: str = typer.Option("vision-train", help="Training image of the catalog."),
        api: str | None = typer.Option(
            None,
            help="pytorchjob (Training Operator v1) or trainjob (Kubeflow Trainer v2); "
            "default: the training image's api in the catalog.",
        ),
        runtime: str | None = typer.Option(
            None, help="TrainJob: the ClusterTrainingRuntime (default: the catalog's)."
        ),
        config: str = typer.Option("configs/default.yaml", help="Config path inside the image."),
        workers: int = typer.Option(1, help="Worker nodes besides the master."),
        gpus: int = typer.Option(0, help="GPUs per node."),
        nproc_per_node: str = typer.Option("auto", help="Processes per node: auto|cpu|gpu|N."),
        cpu: str = typer.Option("2", help="CPU per node."),
        memory: str = typer.Option("4Gi", help="Memory per node."),
        volume: list[str] = typer.Option(
            [], help="PVC to mount: CLAIM[:MOUNT_PATH[:ro|rw]] (repeatable)."
        ),
        env: list[str] = typer.Option([], help="NAME=VALUE for the trainer (repeatable)."),
        env_secret: list[str] = typer.Option(
            [], help="NAME=SECRET:KEY: env read from a Secret in the namespace (repeatable)."
        ),
        allow_plain_env: list[str] = typer.Option(
            [], help="NAME whose plain value only looks like a credential (repeatable)."
        ),
        command: list[str] = typer.Option([], help="Entrypoint override (repeatable, in order)."),
        arg: list[str] = typer.Option([], help="Trainer argument (repeatable, in order)."),
        checkpoint_dir: str = typer.Option("/checkpoints", help="Where checkpoints are written."),
        deadline: str = typer.Option("2h", help="Longest the job may run (e.g. 90m)."),
        backoff_limit: int = typer.Option(3, help="Container restarts before the job fails."),
        restart_policy: str = typer.Option("OnFailure", help="OnFailure | Never | ExitCode."),
        cleanup: str = typer.Option("Running", help="Pods deleted at the end: All|Running|None."),
        elastic_min: int | None = typer.Option(None, help="Elastic: fewest worker nodes."),
        elastic_max: int | None = typer.Option(None, help="Elastic: most worker nodes."),
        detach: bool = typer.Option(False, "--detach", help="Print the run URL and return."),
    ) -> None:
        """Start the train deployment (a PyTorchJob or a TrainJob) and follow it to its end."""
        try:
            params = parse_train_params(
                {
                    "experiment": experiment,
                    "image_tag": image_tag,
                    "training_image": training_image,
                    "api": api,
                    "runtime": runtime,
                    "config": config,
                    "workers": workers,
                    "gpus_per_node": gpus,
                    "nproc_per_node": nproc_per_node,
                    "cpu": cpu,
                    "memory": memory,
                    "volumes": [_split_volume(v) for v in volume],
                    "env": _split_env(env, env_secret),
                    "allow_plain_env": allow_plain_env,
                    "command": command,
                    "args": arg,
                    "checkpoint_dir": checkpoint_dir,
                    "deadline": deadline,
                    "backoff_limit": backoff_limit,
                    "restart_policy": restart_policy,
                    "cleanup": cleanup,
                    "elastic_min": elastic_min,
                    "elastic_max": elastic_max,
                }
            )
            # The catalog's api and limits, checked here too: a refusal before any run exists.
            check_run(params)
        except InvalidInput as exc:
            typer.secho(str(exc), fg="red", err=True)
            raise typer.Exit(2) from None
        flow_run_id = asyncio.run(start_train_run(params))
        url = run_url(flow_run_id)
        typer.echo(f"train run started: {url}")
        if detach:
            return
        try:
            final = asyncio.run(follow_run(flow_run_id))
        except KeyboardInterrupt:
            typer.echo(f"\nstopped following; the run goes on: {url}")
            raise typer.Exit(130) from None
        if final not in TERMINAL_OK:
            typer.secho(f"train run ended {final}: {url}", fg="red", err=True)
            raise typer.Exit(1)
        typer.secho(f"train run completed: {url}", fg="green")
