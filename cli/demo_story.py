"""``robotics-cd demo``: the whole story on the local sandbox, told one step at a time.

1. a commit to ``robotics-api`` → signed push webhook → CI → release → staging → verified →
   waiting for approval → approved (by the demo, as ``robotics-cd approve`` does, or by the
   person in the Prefect UI with ``--interactive``);
2. its production canary 10 → 25 → 50 → 100 with an analysis at each step → promoted;
3. a commit making ``/v1/status`` fail on ~30% of requests in production only
   (``config/fail_rate.production``: CI and staging pass) → canary → rolled back by the
   release itself: the manifests repo gets a restoring commit, production runs release 1;
4. a push to the training repo touching ``configs/`` → training image → a ``train`` run of
   one master and two workers → succeeded.

The demo holds no product logic. It starts the sandbox and the served deployments (the same
``robotics-cd serve`` and ``robotics-cd webhook serve`` a person runs), pushes commits with
git, approves through the function behind ``robotics-cd approve``, starts the training run
through the function behind ``robotics-cd train``, and reads every outcome from the Prefect
API and from the sandbox (the Kubernetes and Argo CD twins, the manifests repo, the
production ingress). Every wait has a deadline; a step that does not end as expected stops
the story with the step's name and where to look.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect_kubernetes.credentials import KubernetesCredentials
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.train import start_train_run
from core.catalog import load_catalog
from core.errors import DemoFailed, RoboticsCDError
from core.settings import get_settings
from core.training import TrainParams
from sandbox import launcher
from sandbox.procs import http_ok, spawn, stop_pid, stop_pidfile
from tasks.approvals import resume_with_decision
from tasks.kube import JSON, load_credentials, read_object

T = TypeVar("T")

SERVICE = "api-gateway"
API_REPO = "robotics-api"
TRAINING_REPO = "robotics-training"
MANIFESTS_REPO = "robotics-k8s-manifests"
APPROVER = "alice"
BAD_FAIL_RATE = 30
SERVED = ("ci", "release", "rollback", "training-image", "train")
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Demo Developer",
    "GIT_AUTHOR_EMAIL": "demo@robotics.local",
    "GIT_COMMITTER_NAME": "Demo Developer",
    "GIT_COMMITTER_EMAIL": "demo@robotics.local",
}

# The canary windows (services.yaml reads them from the environment). The default keeps the
# whole story under ten minutes on a two-core machine; --fast is for the CI replay. The
# sandbox sends 20 requests/s per host, so a step at 10% sees ~2 canary requests/s:
# min_requests stays well under that times the interval.
DEMO_WINDOWS = {
    "ROBOTICS_CD_CANARY_INTERVAL": "10s",
    "ROBOTICS_CD_CANARY_ANALYSES": "2",
    "ROBOTICS_CD_CANARY_MIN_REQUESTS": "10",
    "ROBOTICS_CD_POST_RELEASE_WATCH": "20s",
}
FAST_WINDOWS = {
    "ROBOTICS_CD_CANARY_INTERVAL": "5s",
    "ROBOTICS_CD_CANARY_ANALYSES": "1",
    "ROBOTICS_CD_CANARY_MIN_REQUESTS": "4",
    "ROBOTICS_CD_POST_RELEASE_WATCH": "5s",
}


@dataclass(frozen=True)
class Deadlines:
    """Seconds each wait may take before the step is declared failed."""

    triggers: float = 180.0
    delivery: float = 60.0
    ci: float = 900.0
    release_start: float = 180.0
    staging: float = 600.0
    canary: float = 900.0
    person: float = 3600.0
    training_image: float = 900.0
    train: float = 600.0


@dataclass(frozen=True)
class DemoOptions:
    state: Path
    fast: bool = False
    interactive: bool = False
    keep: bool = True
    deadlines: Deadlines = field(default_factory=Deadlines)

    def windows(self) -> dict[str, str]:
        """Canary windows: the caller's environment wins over the demo's choice."""
        chosen = FAST_WINDOWS if self.fast else DEMO_WINDOWS
        return {key: os.environ.get(key, value) for key, value in chosen.items()}


@dataclass
class Row:
    """One line of the final table: what was expected, what happened, where to look."""

    what: str
    expected: str
    outcome: str = "not reached"
    ok: bool = False
    seconds: float | None = None
    where: list[str] = field(default_factory=list)


@dataclass
class Story:
    """What the demo learned while it ran: the final table and the facts checked at the end."""

    rows: list[Row] = field(default_factory=list)
    release_1: FlowRun | None = None
    release_2: FlowRun | None = None
    failed: str | None = None

    def row(self, what: str, expected: str) -> Row:
        row = Row(what, expected)
        self.rows.append(row)
        return row


# --- narration -------------------------------------------------------------------------------


class Narrator:
    """Chapters, lines and live waits on a rich console (plain lines when not a terminal)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def chapter(self, number: int, title: str) -> None:
        self.console.rule(f"[bold]{number}. {title}", align="left")

    def say(self, text: str) -> None:
        self.console.print(f"  {text}", highlight=False)

    def done(self, text: str) -> None:
        self.console.print(f"  [green]✓[/green] {text}", highlight=False)

    def link(self, label: str, url: str | None) -> None:
        if url:
            self.console.print(f"  {label}: [link={url}]{url}[/link]", highlight=False)

    def wait(
        self,
        what: str,
        probe: Callable[[], tuple[T | None, str]],
        *,
        timeout: float,
        where: str,
        interval: float = 1.0,
    ) -> T:
        """Call ``probe`` until it returns a value; its text is shown live beside ``what``.

        ``probe`` raises :class:`DemoFailed` for a terminal wrong outcome; at ``timeout``
        the wait fails naming ``what``, the last thing seen and ``where`` to look.
        """
        deadline = time.monotonic() + timeout
        detail = ""
        started = time.monotonic()
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,  # a log gets the ✓ lines only
        ) as progress:
            task = progress.add_task(what)
            while True:
                try:
                    value, detail = probe()
                except httpx.HTTPError as exc:  # a busy API: ask again until the deadline
                    value, detail = None, f"{type(exc).__name__}: {exc}"
                if value is not None:
                    break
                if time.monotonic() >= deadline:
                    raise DemoFailed(
                        f"{what}: not reached within {timeout:.0f}s (last seen: "
                        f"{detail or 'nothing'}); look at {where}"
                    )
                progress.update(task, description=f"{what} [dim]{detail}[/dim]")
                time.sleep(interval)
        self.done(f"{what} ({time.monotonic() - started:.0f}s){f': {detail}' if detail else ''}")
        return value


# --- the platform: sandbox and triggers --------------------------------------------------------


def start_sandbox(options: DemoOptions, say: Callable[[str], None]) -> launcher.Sandbox:
    """Reuse a sandbox that already runs in the state dir, or start one."""
    if launcher.is_up(options.state):
        sb = launcher.Sandbox.load(options.state.resolve())
        say(f"reusing the sandbox already up in {sb.state_dir}")
    else:
        sb = launcher.up(options.state, echo=say)
    if not sb.webhook_url or not sb.ports.get("webhook"):
        raise DemoFailed(
            f"the sandbox in {sb.state_dir} sends no webhooks (started with --webhook-url ''); "
            "stop it (robotics-cd sandbox down) and run the demo again"
        )
    return sb


@dataclass
class Triggers:
    """The served deployments and the webhook receiver, as subprocesses of the demo."""

    serve: subprocess.Popen[bytes]
    receiver: subprocess.Popen[bytes]
    logs: Path

    def stop(self) -> None:
        for name, proc in (("webhook", self.receiver), ("serve", self.serve)):
            stop_pid(proc.pid)
            (self.logs / f"{name}.pid").unlink(missing_ok=True)


def cli_executable() -> list[str]:
    """How to run ``robotics-cd`` from this interpreter's environment."""
    script = Path(sys.executable).parent / "robotics-cd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from cli.app import app; app()"]


def stop_leftover_triggers(logs: Path) -> None:
    """A demo killed before its cleanup left its runner and receiver: stop them first."""
    for name in ("webhook", "serve"):
        stop_pidfile(logs / f"{name}.pid")


def start_triggers(sb: launcher.Sandbox, env: dict[str, str], logs: Path) -> Triggers:
    """``robotics-cd serve --only ...`` and ``robotics-cd webhook serve --port ...``."""
    stop_leftover_triggers(logs)
    cli = cli_executable()
    root = Path(__file__).resolve().parent.parent
    only = [arg for name in SERVED for arg in ("--only", name)]
    serve = spawn(
        [*cli, "serve", *only],
        log=logs / "serve.log",
        env=env,
        cwd=root,
        pidfile=logs / "serve.pid",
    )
    receiver = spawn(
        [*cli, "webhook", "serve", "--port", str(sb.ports["webhook"])],
        log=logs / "webhook.log",
        env=env,
        cwd=root,
        pidfile=logs / "webhook.pid",
    )
    return Triggers(serve, receiver, logs)


def triggers_ready(runs: Runs, sb: launcher.Sandbox, triggers: Triggers) -> tuple[bool | None, str]:
    for name, proc in (("serve", triggers.serve), ("webhook", triggers.receiver)):
        if proc.poll() is not None:
            raise DemoFailed(
                f"robotics-cd {name} exited with {proc.returncode}; see {triggers.logs}/{name}.log"
            )
    if not http_ok(f"http://127.0.0.1:{sb.ports['webhook']}/healthz"):
        return None, "webhook receiver starting"
    missing = [name for name in SERVED if not runs.deployment_id(name)]
    if missing:
        return None, f"waiting for deployments {', '.join(missing)}"
    return True, f"serving {', '.join(SERVED)}; webhooks on port {sb.ports['webhook']}"


# --- Prefect reads ---------------------------------------------------------------------------


@dataclass
class Runs:
    """Reads of flow runs by deployment, through the Prefect API."""

    client: SyncPrefectClient
    ids: dict[str, UUID] = field(default_factory=dict)

    def deployment_id(self, name: str) -> UUID | None:
        """Id of the deployment ``name/name`` (deployment names equal flow names here)."""
        if name not in self.ids:
            try:
                self.ids[name] = self.client.read_deployment_by_name(f"{name}/{name}").id
            except ObjectNotFound:  # not registered yet: the caller polls again
                return None
        return self.ids[name]

    def find(self, deployment: str, match: Callable[[FlowRun], bool]) -> FlowRun | None:
        """The newest run of ``deployment`` that ``match`` accepts."""
        deployment_id = self.deployment_id(deployment)
        if deployment_id is None:
            return None
        runs = self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])
            ),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=50,
        )
        return next((run for run in runs if match(run)), None)

    def read(self, run_id: UUID) -> FlowRun:
        return self.client.read_flow_run(run_id)


def with_param(name: str, value: str) -> Callable[[FlowRun], bool]:
    return lambda run: run.parameters.get(name) == value


def state_text(run: FlowRun) -> str:
    if run.state is None:
        return "no state yet"
    message = f": {run.state.message}" if run.state.message else ""
    return f"{run.state.name}{message}"[:160]


def run_seconds(run: FlowRun) -> float | None:
    if run.start_time is None:
        return None
    end = run.end_time or datetime.now(UTC)
    return (end - run.start_time).total_seconds()


def is_type(run: FlowRun, *types: StateType) -> bool:
    return run.state is not None and run.state.type in types


# --- git -------------------------------------------------------------------------------------


def git(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_IDENTITY},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise DemoFailed(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def push_commit(
    sb: launcher.Sandbox,
    repo: str,
    files: Mapping[str, str | Callable[[str], str]],
    message: str,
) -> str:
    """Clone ``repo``, write ``files`` (text, or a function of the current text), commit,
    push to main (as a developer would); the new sha."""
    with tempfile.TemporaryDirectory(prefix=f"demo-{repo}-") as tmp:
        work = Path(tmp) / repo
        git("clone", "-q", "-b", "main", sb.repo_url(repo), str(work))
        for rel, content in files.items():
            path = work / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            current = path.read_text() if path.exists() else ""
            path.write_text(content if isinstance(content, str) else content(current))
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", message, cwd=work)
        git("push", "-q", "origin", "HEAD:main", cwd=work)
        return git("rev-parse", "HEAD", cwd=work)


def manifests_log(sb: launcher.Sandbox, count: int = 12) -> list[str]:
    bare = Path(sb.git_base) / f"{MANIFESTS_REPO}.git"
    text = git("--git-dir", str(bare), "log", f"-{count}", "--format=%h %s", "main")
    return text.splitlines()


# --- sandbox reads ---------------------------------------------------------------------------


def _get(kube: KubernetesCredentials, api_version: str, plural: str, name: str) -> JSON | None:
    """Through the product's Kubernetes client, as the release's own reads go (the demo runs
    no event loop of its own)."""
    return asyncio.run(read_object(kube, api_version, plural, "production", name))


def canary_weight(kube: KubernetesCredentials) -> str:
    ingress = _get(kube, "networking.k8s.io/v1", "ingresses", f"{SERVICE}-canary")
    annotations = ((ingress or {}).get("metadata") or {}).get("annotations") or {}
    return str(annotations.get("nginx.ingress.kubernetes.io/canary-weight", "?"))


def production_image(kube: KubernetesCredentials) -> str:
    deployment = _get(kube, "apps/v1", "deployments", SERVICE)
    containers = (((deployment or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
    images = [c.get("image", "") for c in containers.get("containers", [])]
    return images[0] if images else ""


def production_answers(sb: launcher.Sandbox, tries: int = 20) -> list[int]:
    """Status codes of ``/v1/status`` through the production ingress (a timeout: none)."""
    codes: list[int] = []
    with httpx.Client(base_url=sb.ingress["production"], timeout=10) as client:
        for _ in range(tries):
            try:
                response = client.get("/v1/status", headers={"Host": "api.robotics.local"})
            except httpx.TimeoutException:
                continue  # a busy machine, not an answer: judged on the answers only
            codes.append(response.status_code)
    return codes


def digest_of(image: str) -> str:
    return image.rsplit("@", 1)[1] if "@" in image else ""


# --- the story -------------------------------------------------------------------------------


@dataclass
class Demo:
    options: DemoOptions
    sb: launcher.Sandbox
    runs: Runs
    kube: KubernetesCredentials
    narrator: Narrator
    story: Story = field(default_factory=Story)

    @property
    def d(self) -> Deadlines:
        return self.options.deadlines

    def url(self, run: FlowRun | UUID) -> str:
        run_id = run.id if isinstance(run, FlowRun) else run
        return f"{self.sb.prefect_ui_url}/runs/flow-run/{run_id}"

    def artifact_url(self, key: str) -> str:
        return f"{self.sb.prefect_ui_url}/artifacts/key/{key}"

    # -- one service commit, from push to the release waiting for approval --

    def push_and_reach_approval(self, files: dict[str, str], message: str, row: Row) -> FlowRun:
        say = self.narrator.say
        sha = push_commit(self.sb, API_REPO, files, message)
        say(f"pushed {API_REPO}@{sha[:7]} “{message}” to main")
        say("the GitHub twin's post-receive hook sends a signed push webhook to the receiver")
        ci = self.narrator.wait(
            "webhook → CI run created",
            lambda: (self.runs.find("ci", with_param("sha", sha)), ""),
            timeout=self.d.delivery,
            where=f"{self.sb.state_dir}/demo/webhook.log and the GitHub twin's deliveries "
            f"({self.sb.github_url}/_twin/recorded)",
        )
        self.narrator.link("CI run", self.url(ci))
        row.where.append(f"CI {self.url(ci)}")
        ci = self.narrator.wait(
            "CI: checkout · lint · test · build · scan · push",
            lambda: self._final(ci.id, ok=(StateType.COMPLETED,), what="CI"),
            timeout=self.d.ci,
            where=self.url(ci),
        )
        release = self.narrator.wait(
            "hand-off → release run",
            lambda: (
                self.runs.find("release", with_param("source_sha", sha)),
                "",
            ),
            timeout=self.d.release_start,
            where=self.url(ci),
        )
        self.narrator.link("release run", self.url(release))
        say(f"image {release.parameters.get('image')}")
        release = self.narrator.wait(
            "staging: GitOps commit → Argo CD sync → smoke tests → metrics → approval",
            lambda: self._until_paused(release.id),
            timeout=self.d.staging,
            where=self.url(release),
        )
        return release

    def _final(
        self, run_id: UUID, *, ok: tuple[StateType, ...], what: str
    ) -> tuple[FlowRun | None, str]:
        run = self.runs.read(run_id)
        if run.state is not None and run.state.is_final():
            if run.state.type not in ok:
                raise DemoFailed(f"{what} run {run.name} ended {state_text(run)}: {self.url(run)}")
            return run, state_text(run)
        return None, state_text(run)

    def _until_paused(self, run_id: UUID) -> tuple[FlowRun | None, str]:
        run = self.runs.read(run_id)
        if is_type(run, StateType.PAUSED):
            return run, "suspended, waiting for approval"
        if run.state is not None and run.state.is_final():
            raise DemoFailed(
                f"release {run.name} ended before its approval: {state_text(run)}; "
                f"see {self.url(run)}"
            )
        return None, state_text(run)

    def approve(self, release: FlowRun, why: str) -> None:
        say = self.narrator.say
        url = self.url(release)
        who = "your turn" if self.options.interactive else "what a person does"
        say(f"{who}: open the run in the Prefect UI, press [bold]Resume[/bold], choose")
        say(f"decision=approve and an approver (e.g. {APPROVER}); or in a shell:")
        say(f"  [cyan]robotics-cd approve {release.id} --approver {APPROVER}[/cyan]")
        self.narrator.link("approval form", url)
        if self.options.interactive:
            self.narrator.wait(
                "waiting for you to approve (or reject) in the UI",
                lambda: self._left_pause(release.id),
                timeout=self.d.person,
                where=url,
                interval=2.0,
            )
            return
        approvers = load_catalog(get_settings().catalog).service(SERVICE).approvers
        asyncio.run(
            resume_with_decision(
                release.id, "approve", APPROVER, f"robotics-cd demo: {why}", allowed=approvers
            )
        )
        self.narrator.done(f"approved by {APPROVER} (what `robotics-cd approve` does)")

    def _left_pause(self, run_id: UUID) -> tuple[FlowRun | None, str]:
        run = self.runs.read(run_id)
        return (None if is_type(run, StateType.PAUSED) else run), state_text(run)

    def follow_canary(self, release: FlowRun, what: str) -> FlowRun:
        """Until the release ends, showing its state and the canary's live weight."""

        weights: list[str] = []

        def probe() -> tuple[FlowRun | None, str]:
            run = self.runs.read(release.id)
            weight = canary_weight(self.kube)
            if weights and weights[-1] != weight:
                self.narrator.say(f"canary weight {weight}% (in the Kubernetes twin's Ingress)")
            if not weights or weights[-1] != weight:
                weights.append(weight)
            text = f"canary weight {weight}% · {state_text(run)}"
            return (run if run.state is not None and run.state.is_final() else None), text

        return self.narrator.wait(what, probe, timeout=self.d.canary, where=self.url(release))

    # -- the four chapters --

    def good_release(self) -> None:
        self.narrator.chapter(1, "a commit to robotics-api: CI, staging, approval")
        row = self.story.row("release 1 (good commit)", "Completed: Promoted")
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        release = self.push_and_reach_approval(
            {"www/index.html": _index_html(stamp)},
            f"demo: front page says when it was released ({stamp})",
            row,
        )
        row.where.insert(0, f"release {self.url(release)}")
        self.approve(release, "staging verified")

        self.narrator.chapter(2, "production canary 10 → 25 → 50 → 100, then promotion")
        release = self.follow_canary(release, "canary steps with an analysis each")
        self.story.release_1 = release
        row.seconds, row.outcome = run_seconds(release), state_text(release)
        promoted = release.state is not None and release.state.name == "Promoted"
        if not (is_type(release, StateType.COMPLETED) and promoted):
            raise DemoFailed(f"release 1 ended {state_text(release)}: see {self.url(release)}")
        row.ok = True
        self.narrator.done(f"production runs {production_image(self.kube)}")
        row.where.append(f"record {self.artifact_url(f'release-{SERVICE}')}")

    def bad_release(self) -> None:
        self.narrator.chapter(
            3, f"a bad commit: /v1/status fails {BAD_FAIL_RATE}% in production → rollback"
        )
        self.narrator.say(
            f"config/fail_rate.production = {BAD_FAIL_RATE}: fine in CI and staging, wrong in "
            "production only; the canary's job to catch"
        )
        row = self.story.row("release 2 (bad commit)", "Failed: rolled back")
        release = self.push_and_reach_approval(
            {"config/fail_rate.production": f"{BAD_FAIL_RATE}\n"},
            f"demo: config/fail_rate.production {BAD_FAIL_RATE} (a production-only regression)",
            row,
        )
        row.where.insert(0, f"release {self.url(release)}")
        self.approve(release, "looks fine in staging")
        release = self.follow_canary(release, "canary judged on error ratio and latency")
        self.story.release_2 = release
        row.seconds, row.outcome = run_seconds(release), state_text(release)
        message = (release.state.message or "") if release.state else ""
        if not (is_type(release, StateType.FAILED) and "rolled back" in message):
            raise DemoFailed(f"release 2 ended {state_text(release)}: see {self.url(release)}")
        row.ok = True
        row.where.append(f"analyses {self.artifact_url(f'canary-{SERVICE}-analyses')}")
        self.check_production_restored(row)

    def check_production_restored(self, row: Row) -> None:
        """Production back on release 1's image, canary at 0, answering, git reverted."""
        if self.story.release_1 is None:
            raise DemoFailed("release 1 is unknown: cannot check what production returned to")
        expected = digest_of(str(self.story.release_1.parameters.get("image", "")))
        image, weight = production_image(self.kube), canary_weight(self.kube)
        codes = production_answers(self.sb)
        bad = [code for code in codes if code >= 300]
        rollback = [line for line in manifests_log(self.sb) if "rollback(production)" in line]
        problems = [
            f"production runs {image}, not release 1's {expected}" if expected not in image else "",
            f"canary weight is {weight}, not 0" if weight != "0" else "",
            f"production answered {len(bad)} of {len(codes)} requests with {sorted(set(bad))}"
            if bad or not codes
            else "",
            "no rollback commit in the manifests repo" if not rollback else "",
        ]
        problems = [p for p in problems if p]
        if problems:
            row.ok = False
            raise DemoFailed("after the rollback: " + "; ".join(problems) + f"; see {row.where[0]}")
        self.narrator.done(f"manifests repo: {rollback[0]}")
        self.narrator.done(f"production back on {image} (canary weight 0)")
        self.narrator.done(f"{len(codes)}/{len(codes)} answers of production's /v1/status are 2xx")

    def training(self) -> None:
        self.narrator.chapter(4, "a training-repo push: training image, then a distributed run")
        image_row = self.story.row("training image", "Completed")
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        sha = push_commit(
            self.sb,
            TRAINING_REPO,
            {"configs/demo.yaml": _training_config(stamp), "Dockerfile": non_root},
            f"demo: configs/demo.yaml, trainer runs as non-root ({stamp})",
        )
        self.narrator.say(
            f"pushed {TRAINING_REPO}@{sha[:7]}: a new config in configs/, and the trainer "
            "runs as non-root (the scan gate refuses images whose user is root)"
        )
        run = self.narrator.wait(
            "webhook → training-image run created",
            lambda: (
                self.runs.find("training-image", with_param("sha", sha)),
                "",
            ),
            timeout=self.d.delivery,
            where=f"{self.sb.state_dir}/demo/webhook.log",
        )
        self.narrator.link("training-image run", self.url(run))
        image_row.where.append(self.url(run))
        run = self.narrator.wait(
            "training image: checkout · build · scan · push · notify",
            lambda: self._final(run.id, ok=(StateType.COMPLETED,), what="training-image"),
            timeout=self.d.training_image,
            where=self.url(run),
        )
        image_row.seconds, image_row.outcome, image_row.ok = run_seconds(run), state_text(run), True

        train_row = self.story.row("train: 1 master + 2 workers", "Completed")
        params = TrainParams(
            experiment=f"demo-{sha[:7]}",
            config="configs/demo.yaml",
            workers=2,
            cpu="100m",
            memory="64Mi",
            deadline="10m",
        )
        self.narrator.say(
            f"robotics-cd train --experiment {params.experiment} --config {params.config} "
            "--workers 2 --cpu 100m --memory 64Mi"
        )
        train_id = asyncio.run(start_train_run(params))
        self.narrator.link("train run", self.url(train_id))
        train_row.where.append(self.url(train_id))
        train = self.narrator.wait(
            "PyTorchJob: master + 2 workers train, logs stream into the run",
            lambda: self._final(train_id, ok=(StateType.COMPLETED,), what="train"),
            timeout=self.d.train,
            where=self.url(train_id),
        )
        train_row.seconds, train_row.outcome, train_row.ok = (
            run_seconds(train),
            state_text(train),
            True,
        )
        train_row.where.append(self.artifact_url(f"train-{params.experiment}-summary"))


def _index_html(stamp: str) -> str:
    return (
        "<!doctype html><title>robotics-api</title><p>robotics-api: "
        f'<a href="/v1/status">/v1/status</a><p>released by robotics-cd demo at {stamp}\n'
    )


def non_root(dockerfile: str) -> str:
    """The training Dockerfile with a non-root user owning the checkpoint directory (once)."""
    if "\nUSER " in dockerfile:
        return dockerfile
    return dockerfile.replace(
        "\nENTRYPOINT",
        "\n# Not root: Trivy's DS-0002 (HIGH) fails the scan gate otherwise.\n"
        "RUN mkdir -p /checkpoints && chown 65534:65534 /checkpoints\n"
        "USER 65534:65534\nENTRYPOINT",
        1,
    )


def _training_config(stamp: str) -> str:
    return (
        f"# Pushed by robotics-cd demo at {stamp}\n"
        "model: resnet18\nepochs: 3\nlearning_rate: 0.05\nepoch_seconds: 1\nfail_at_epoch: 0\n"
    )


# --- the end: table and instructions ---------------------------------------------------------


def summary(story: Story, sb: launcher.Sandbox, console: Console) -> None:
    table = Table(title="robotics-cd demo", show_lines=True)
    table.add_column("step")
    table.add_column("expected")
    table.add_column("outcome")
    table.add_column("time", justify="right")
    table.add_column("where to look", overflow="fold")
    for row in story.rows:
        mark = "[green]✓[/green] " if row.ok else "[red]✗[/red] "
        seconds = f"{row.seconds:.0f}s" if row.seconds is not None else "-"
        table.add_row(row.what, row.expected, mark + row.outcome, seconds, "\n".join(row.where))
    console.print(table)
    bare = Path(sb.git_base) / f"{MANIFESTS_REPO}.git"
    console.print(f"manifests repo: git --git-dir {bare} log --oneline", highlight=False)
    try:
        for line in manifests_log(sb, 8):
            console.print(f"  {line}", highlight=False)
    except DemoFailed as exc:
        console.print(f"  ({exc})", highlight=False)


def closing_words(options: DemoOptions, sb: launcher.Sandbox, console: Console) -> None:
    state = options.state
    if options.keep:
        console.print(
            f"\nThe sandbox keeps running. Prefect UI: [link={sb.prefect_ui_url}]"
            f"{sb.prefect_ui_url}[/link]\n"
            f"  point a shell at it:  source {state}/env\n"
            "  run flows again:      robotics-cd serve & robotics-cd webhook serve "
            f"--port {sb.ports.get('webhook')}\n"
            f"  stop it:              robotics-cd sandbox down --state {state}",
            highlight=False,
        )
    else:
        console.print("\nstopping the sandbox (--no-keep)")


def run_demo(options: DemoOptions, console: Console | None = None) -> int:
    """Play the whole story; 0 when every step ended as expected, else 1."""
    console = console or _console()
    narrator = Narrator(console)
    try:
        which_git()
    except DemoFailed as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        return 2
    narrator.chapter(0, "the sandbox and the served deployments")
    try:
        sb = start_sandbox(options, narrator.say)
    except (launcher.SandboxError, TimeoutError, DemoFailed) as exc:
        console.print(f"[red]the sandbox did not start:[/red] {exc}", highlight=False)
        return 1
    narrator.link("Prefect UI", sb.prefect_ui_url)
    env = {**sb.env(), **options.windows(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    narrator.say(
        "canary windows: "
        + ", ".join(f"{k.removeprefix('ROBOTICS_CD_')}={v}" for k, v in options.windows().items())
    )
    logs = Path(sb.state_dir) / "demo"
    story = Story()
    triggers: Triggers | None = None
    try:
        with _pointed_at(sb, env):
            triggers = start_triggers(sb, env, logs)
            started = triggers
            kube = asyncio.run(load_credentials())  # the sandbox's block, as a release reads it
            with get_client(sync_client=True) as client:
                runs = Runs(client)
                narrator.wait(
                    "robotics-cd serve + robotics-cd webhook serve",
                    lambda: triggers_ready(runs, sb, started),
                    timeout=options.deadlines.triggers,
                    where=f"{logs}/serve.log and {logs}/webhook.log",
                )
                _play(Demo(options, sb, runs, kube, narrator, story))
    except (DemoFailed, RoboticsCDError) as exc:
        story.failed = str(exc)
    except KeyboardInterrupt:
        story.failed = "interrupted"
    except Exception as exc:  # a defect, not an outcome: show it whole, then clean up
        console.print_exception()
        story.failed = f"unexpected {type(exc).__name__}: {exc}"
    finally:
        if triggers is not None:
            triggers.stop()
    summary(story, sb, console)
    closing_words(options, sb, console)
    if not options.keep:
        for line in launcher.down(options.state):
            console.print(f"  stopped {line}", highlight=False)
    if story.failed:
        console.print(f"\n[red]demo failed:[/red] {story.failed}", highlight=False)
        console.print(f"logs of the served runs and the receiver: {logs}", highlight=False)
        return 1
    console.print("\n[green]demo: every step ended as expected[/green]")
    return 0


def _console() -> Console:
    """A terminal gets rich's live display; a log file gets long lines, not wrapped ones."""
    console = Console()
    return console if console.is_terminal else Console(width=160, soft_wrap=True)


def _play(demo: Demo) -> None:
    demo.good_release()
    demo.bad_release()
    demo.training()


@contextmanager
def _pointed_at(sb: launcher.Sandbox, env: dict[str, str]) -> Iterator[None]:
    """This process's Prefect client and product settings aimed at the sandbox."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        with temporary_settings(
            updates={PREFECT_API_URL: sb.prefect_api_url, PREFECT_UI_URL: sb.prefect_ui_url}
        ):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def which_git() -> None:
    """git must be on PATH before anything starts (the demo pushes with it)."""
    if shutil.which("git") is None:
        raise DemoFailed("git is not installed: apt-get install git, then run the demo again")
