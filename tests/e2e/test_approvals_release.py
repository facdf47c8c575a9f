"""Issue #20 on the real release flow and the sandbox: approvals that prove who approved, a
quorum, a freeze window, break-glass.

The release of api-gateway is the production path of tests/e2e/test_release.py (served
deployments, the Argo CD twin, real containers, Prometheus, the compact canary of
``tests.e2e.releases.FAST``). Approvals come as comments through the GitHub twin's REST API
on the release's source commit; the twin delivers its signed ``commit_comment`` webhook to
``robotics-cd webhook serve`` on the sandbox's webhook port, which checks the allowlist and
the collaborator permission and records the vote on the suspended run.

The catalog is the repo's ``services.yaml`` with api-gateway's ``approval:`` (and ``freeze:``)
added, written to a file named by ``ROBOTICS_CD_CATALOG``: the served release reads it at the
start of each (re-)execution, the scheduled approvals pass (``expire-approvals``, served here
and started by hand instead of waiting for its five-minute schedule) on each pass. Each
scenario writes the catalog it needs first, so they do not depend on each other's order.

Full matrix only (CI's time budget is full): docs/e2e-matrix.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prefect import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments.flow_runs import arun_deployment

from core.approval import release_short_id
from sandbox.procs import spawn, stop_pid, wait_until
from tests.e2e.releases import (
    CLI,
    OVERLAY,
    ROOT,
    SERVICE,
    cli,
    is_final,
    is_paused,
    manifests_git,
    overlay_tree,
    read_run,
    record_of,
    served_releases,
    start_release,
    state_of,
    wait_run,
)
from tests.matrix import full_matrix

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900), full_matrix]

REPO = "robotics/robotics-api"
LOGINS = {"alice-gh": ("alice", "push"), "bob-gh": ("bob", "maintain")}
STRANGER = "mallory-gh"  # may write to the repository, but is on no allowlist
APPROVERS_LINE = "    approvers: [alice, bob]\n"
LEASE_REF = f"refs/leases/{SERVICE}-production"


# --- the catalog --------------------------------------------------------------------------


class CatalogFile:
    """services.yaml with api-gateway's approval policy and freeze windows, rewritten per
    scenario."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = (ROOT / "services.yaml").read_text()
        assert self.base.count(APPROVERS_LINE) >= 1, "services.yaml changed: update this test"
        self.write()

    def write(self, *, required: int = 1, freeze: list[dict[str, str]] | None = None) -> None:
        github = ", ".join(f"{login}: {who}" for login, (who, _) in LOGINS.items())
        block = f"    approval:\n      required: {required}\n      github: {{{github}}}\n"
        if freeze:
            block += "    freeze:\n" + "".join(
                "      - " + json.dumps(window) + "\n" for window in freeze
            )
        self.path.write_text(self.base.replace(APPROVERS_LINE, APPROVERS_LINE + block, 1))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> CatalogFile:
    return CatalogFile(tmp_path_factory.mktemp("catalog") / "services.yaml")


@pytest.fixture(scope="module")
def env(env: dict[str, str], catalog: CatalogFile) -> Iterator[dict[str, str]]:
    """The sandbox env with this module's catalog, in this process too."""
    extra = {"ROBOTICS_CD_CATALOG": str(catalog.path)}
    os.environ.update(extra)
    try:
        yield {**env, **extra}
    finally:
        for key in extra:
            os.environ.pop(key, None)


@pytest.fixture(autouse=True)
def default_catalog(catalog: CatalogFile) -> Iterator[None]:
    catalog.write()
    yield
    catalog.write()


# --- served deployments, the receiver, the people -------------------------------------------


@pytest.fixture(scope="module")
def runner(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``robotics-cd serve`` of release, rollback and the scheduled approvals pass."""
    with served_releases(
        env, tmp_path_factory.mktemp("approvals-runner"), also=("expire-approvals",)
    ) as log:
        yield log


@pytest.fixture(scope="module")
def receiver(
    sandbox: Any, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """``robotics-cd webhook serve`` where the GitHub twin delivers (the sandbox's port)."""
    port = env["ROBOTICS_CD_WEBHOOK_PORT"]
    log = tmp_path_factory.mktemp("receiver") / "webhook.log"
    proc = spawn([CLI, "webhook", "serve", "--port", port], log=log, env=env, cwd=ROOT)

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=60, what=f"webhook receiver (log: {log})")
        yield log
    finally:
        stop_pid(proc.pid)


@pytest.fixture(scope="module")
def people(sandbox: Any) -> dict[str, str]:
    """GitHub logins of the twin and their tokens: the two allowlisted writers and a
    stranger who may write too."""
    tokens = {}
    for login, role in [*((k, v[1]) for k, v in LOGINS.items()), (STRANGER, "push")]:
        made = httpx.post(f"{sandbox.github_url}/_twin/users", json={"login": login}, timeout=10)
        made.raise_for_status()
        httpx.put(
            f"{sandbox.github_url}/repos/{REPO}/collaborators/{login}",
            json={"permission": role},
            headers={"Authorization": f"Bearer {sandbox.github_token}"},
            timeout=10,
        ).raise_for_status()
        tokens[login] = str(made.json()["token"])
    return tokens


@pytest.fixture
def waiting(env: dict[str, str]) -> Iterator[list[FlowRun]]:
    """Releases a scenario started: any still waiting at its end is rejected, so a failed
    scenario leaves nothing for the next one."""
    started: list[FlowRun] = []
    yield started
    for run in started:
        if is_paused(read_run(run.id)):
            cli("reject", str(run.id), "--approver", "bob", "--comment", "e2e cleanup", env=env)


# --- helpers --------------------------------------------------------------------------------


def comment(sandbox: Any, token: str, sha: str, body: str) -> dict[str, Any]:
    answer = httpx.post(
        f"{sandbox.github_url}/repos/{REPO}/commits/{sha}/comments",
        json={"body": body},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    answer.raise_for_status()
    return dict(answer.json())


def recorded(sandbox: Any) -> dict[str, Any]:
    return dict(httpx.get(f"{sandbox.github_url}/_twin/recorded", timeout=30).json())


def deliveries_of(sandbox: Any, comment_id: int) -> list[dict[str, Any]]:
    return [
        item
        for item in recorded(sandbox)["deliveries"]
        if item["request"]["payload"].get("comment", {}).get("id") == comment_id
        and "status_code" in item
    ]


def delivered(sandbox: Any, comment_id: int) -> dict[str, Any]:
    wait_until(
        lambda: bool(deliveries_of(sandbox, comment_id)),
        timeout=30,
        what=f"the webhook delivery of comment {comment_id}",
    )
    return deliveries_of(sandbox, comment_id)[0]


def replies(sandbox: Any, sha: str) -> list[str]:
    return [
        c["body"]
        for c in recorded(sandbox)["comments"]
        if c.get("commit_id") == sha and c["user"]["login"] == "robotics-cd"
    ]


def run_inputs(run_id: Any, prefix: str) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        async with get_client() as client:
            items = await client.filter_flow_run_input(run_id, prefix, 100, set())
        return {i.key: i.decoded_value for i in items}

    return anyio.run(read)


def waiting_at(text: str) -> Callable[[FlowRun], bool]:
    return lambda r: is_paused(r) and text in (r.state.message or "")  # type: ignore[union-attr]


def is_frozen(run: FlowRun) -> bool:
    return is_paused(run) and run.state is not None and run.state.name == "Frozen"


def own_canary_commits(sandbox: Any, run_id: Any) -> list[str]:
    return manifests_git(
        sandbox, "log", "--format=%s", f"--grep={run_id}", "--", OVERLAY
    ).splitlines()


def processes_of(run_id: Any) -> list[int]:
    """Processes whose environment names this flow run (the runner's child carries
    ``PREFECT__FLOW_RUN_ID``)."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(int(pid))
        except OSError:
            continue
    return found


def lease(sandbox: Any) -> str:
    """The production lease ref of the service in the manifests remote ('' when free)."""
    return manifests_git(sandbox, "for-each-ref", "--format=%(refname) %(objectname)", LEASE_REF)


def approvals_pass() -> None:
    """One run of the served scheduled approvals flow, to its end."""

    async def go() -> FlowRun:
        run: FlowRun = await arun_deployment(
            "expire-approvals/expire-approvals", timeout=120, as_subflow=False
        )
        return run

    run = anyio.run(go)
    assert run.state is not None and run.state.is_completed(), run.state


def released_to_staging(sandbox: Any, build: Any, note: str, waiting: list[FlowRun]) -> FlowRun:
    image, sha = build({"www/release-e2e.txt": f"{note}\n"}, f"e2e: {note}")
    run = start_release(image, sha)
    waiting.append(run)
    wait_run(run, is_paused, timeout=300, what="release waiting for approval")
    return run


def source_sha(run: FlowRun) -> str:
    return str(run.parameters["source_sha"])


def log_result(name: str, run: FlowRun, started: float) -> None:
    state = run.state
    print(
        f"RESULT {name}: {state.name if state else None}: {state.message if state else ''} "
        f"(release {time.monotonic() - started:.0f} s)",
        file=sys.stderr,
    )


# --- scenarios --------------------------------------------------------------------------------


def test_a_comment_approval_resumes_the_release_and_a_stranger_is_refused(
    sandbox, env, runner, receiver, people, catalog, build, waiting
):
    started = time.monotonic()
    run = released_to_staging(sandbox, build, "approved by comment", waiting)
    sha, short = source_sha(run), release_short_id(str(run.id))

    # Someone off the allowlist (who may write): refused, recorded, answered once.
    refused = comment(sandbox, people[STRANGER], sha, f"/approve {short}")
    first = delivered(sandbox, refused["id"])
    assert first["status_code"] == 202, first
    assert "not on api-gateway's GitHub approver allowlist" in first["response"], first
    wait_until(
        lambda: any(r.startswith(f"@{STRANGER}") for r in replies(sandbox, sha)),
        timeout=30,
        what="the refusal's reply comment",
    )
    kept = run_inputs(run.id, "refused-")
    assert list(kept) == [f"refused-github-{refused['id']}"], kept
    assert kept[f"refused-github-{refused['id']}"]["login"] == STRANGER
    # The same delivery again (GitHub's "Redeliver", same GUID): nothing more happens.
    answered = len(replies(sandbox, sha))
    again = httpx.post(
        f"{sandbox.github_url}/_twin/deliveries/{first['guid']}/redeliver", timeout=30
    ).json()
    assert again["status_code"] == 202 and "recorded already" in again["response"], again
    time.sleep(2)
    assert len(replies(sandbox, sha)) == answered
    assert list(run_inputs(run.id, "refused-")) == list(kept)
    assert run_inputs(run.id, "vote-") == {}
    assert is_paused(read_run(run.id)) and own_canary_commits(sandbox, run.id) == []

    # An allowlisted writer: the release resumes with that login and goes to production.
    approval = comment(sandbox, people["alice-gh"], sha, f"Staging looks right.\n/approve {short}")
    assert delivered(sandbox, approval["id"])["status_code"] == 202
    done = wait_run(run, is_final, timeout=420, what="release finished after the comment")
    log_result("comment approval", done, started)
    assert state_of(done).name == "Promoted", done.state
    vote = run_inputs(run.id, "vote-")[f"vote-github-{approval['id']}"]
    assert (vote["approver"], vote["login"], vote["path"], vote["authenticated"]) == (
        "alice",
        "alice-gh",
        "github",
        True,
    )
    record = record_of(run.id)
    assert "approve by alice (@alice-gh) via github" in record, record
    assert f"refused approve by @{STRANGER}" in record, record
    assert any(r.startswith("Recorded for release") for r in replies(sandbox, sha))


def test_a_quorum_of_two_waits_for_a_second_distinct_approver(
    sandbox, env, runner, receiver, people, catalog, build, waiting
):
    catalog.write(required=2)
    started = time.monotonic()
    run = released_to_staging(sandbox, build, "quorum of two", waiting)
    sha, short = source_sha(run), release_short_id(str(run.id))

    comment(sandbox, people["alice-gh"], sha, f"/approve {short}")
    one = wait_run(run, waiting_at("1 of 2 approvals"), timeout=120, what="1 of 2 approvals")
    assert state_of(one).name == "Suspended", one.state
    # The same person again counts once: still one of two.
    comment(sandbox, people["alice-gh"], sha, f"/approve {short} (again)")
    time.sleep(5)
    still = wait_run(run, waiting_at("1 of 2 approvals"), timeout=60, what="still 1 of 2")
    assert own_canary_commits(sandbox, run.id) == [], "a canary before the quorum"
    assert is_paused(still)

    comment(sandbox, people["bob-gh"], sha, f"/approve {short}")
    wait_until(
        lambda: any(
            s.startswith("canary(production)") for s in own_canary_commits(sandbox, run.id)
        ),
        timeout=300,
        what="the canary started by the second approver",
    )
    # The production lease, as the frozen scenario looks for it: held by this run now.
    assert lease(sandbox) != ""
    assert str(run.id) in manifests_git(sandbox, "log", "-1", "--format=%B", LEASE_REF)
    done = wait_run(run, is_final, timeout=420, what="release finished")
    log_result("quorum of two", done, started)
    assert state_of(done).name == "Promoted", done.state
    record = record_of(run.id)
    assert "approved by alice, bob" in record or "approve by bob (@bob-gh)" in record, record
    assert "approve by alice (@alice-gh) via github" in record, record


def test_approved_during_a_freeze_waits_frozen_then_proceeds(
    sandbox, env, runner, receiver, people, catalog, build, waiting
):
    started = time.monotonic()
    run = released_to_staging(sandbox, build, "approved during a freeze", waiting)
    sha, short = source_sha(run), release_short_id(str(run.id))
    before_tree = overlay_tree(sandbox)

    # A one-off window that starts before the approval and ends 75 s after it.
    now = datetime.now(UTC)
    end = now + timedelta(seconds=75)
    catalog.write(
        freeze=[
            {
                "reason": "e2e: short change freeze",
                "start": (now - timedelta(minutes=1)).isoformat(),
                "end": end.isoformat(),
            }
        ]
    )
    comment(sandbox, people["alice-gh"], sha, f"/approve {short}")
    frozen = wait_run(run, is_frozen, timeout=120, what="release Frozen after its approval")
    assert (state_of(frozen).message or "").startswith("production is frozen until"), frozen.state
    assert "e2e: short change freeze" in (state_of(frozen).message or "")
    assert state_of(frozen).state_details.pause_reschedule  # suspended: the process exits
    wait_until(lambda: processes_of(run.id) == [], timeout=60, what="no process of the run")
    # No lease taken, nothing written to production.
    assert lease(sandbox) == "", lease(sandbox)
    assert overlay_tree(sandbox) == before_tree and own_canary_commits(sandbox, run.id) == []

    # The scheduled pass leaves it frozen while the window lasts.
    assert datetime.now(UTC) < end, "the window ended before the test could check it"
    approvals_pass()
    assert is_frozen(read_run(run.id)) and lease(sandbox) == ""
    assert processes_of(run.id) == []
    # ... and resumes it once the window has ended.
    while datetime.now(UTC) < end + timedelta(seconds=1):
        time.sleep(1)
    approvals_pass()
    resumed = read_run(run.id)
    assert not is_frozen(resumed), resumed.state
    done = wait_run(run, is_final, timeout=420, what="release finished after the freeze")
    log_result("frozen then thawed", done, started)
    assert state_of(done).name == "Promoted", done.state
    assert state_of(done).timestamp > end
    assert lease(sandbox) == ""


def test_break_glass_by_a_quorum_releases_during_a_freeze(
    sandbox, env, runner, receiver, people, catalog, build, waiting
):
    from tests.e2e.releases import events_named

    since = datetime.now(UTC)
    freeze = {
        "reason": "e2e: quarter-end freeze",
        "start": (since - timedelta(minutes=5)).isoformat(),
        "end": (since + timedelta(hours=2)).isoformat(),
    }
    catalog.write(required=2, freeze=[freeze])
    started = time.monotonic()
    run = released_to_staging(sandbox, build, "break-glass", waiting)
    sha, short = source_sha(run), release_short_id(str(run.id))

    comment(sandbox, people["alice-gh"], sha, f"/break-glass {short} robot fleet down")
    wait_run(run, waiting_at("1 of 2 approvals"), timeout=120, what="1 of 2 approvals")
    assert own_canary_commits(sandbox, run.id) == []
    comment(sandbox, people["bob-gh"], sha, f"/break-glass {short} hotfix for the outage")
    done = wait_run(run, is_final, timeout=420, what="release finished by break-glass")
    log_result("break-glass", done, started)
    assert state_of(done).name == "Promoted", done.state
    record = record_of(run.id)
    assert "break-glass by alice, bob: robot fleet down; hotfix for the outage" in record, record
    assert "alice (@alice-gh)" in record and "bob (@bob-gh)" in record, record
    glass = [
        e
        for e in events_named("robotics.release.break-glass", since)
        if str(run.id) in json.dumps(e.model_dump(mode="json"))
    ]
    assert len(glass) == 1, glass


def test_an_argocd_deny_window_freezes_like_the_catalogs(
    sandbox, env, runner, receiver, people, catalog, build, waiting
):
    """A deny window of the production app in the Argo CD project (``spec.syncWindows``)
    freezes the release as a catalog window does: Frozen with its reason, then thawed by the
    scheduled pass once Argo CD says the window is over. A break-glass cannot override it
    (Argo CD would refuse the syncs): the release stays Frozen and says so in chat."""
    started = time.monotonic()
    run = released_to_staging(sandbox, build, "Argo CD sync window", waiting)
    sha, short = source_sha(run), release_short_id(str(run.id))
    before_tree = overlay_tree(sandbox)
    # A window that opened at this whole minute (cron resolves minutes) and closes ~75 s
    # from now, on the project of the production app.
    now = datetime.now(UTC)
    opened = now.replace(second=0, microsecond=0)
    end = now + timedelta(seconds=75)
    project = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AppProject",
        "metadata": {"name": "default", "namespace": "argocd"},
        "spec": {
            "sourceRepos": ["*"],
            "destinations": [{"server": "*", "namespace": "*"}],
            "syncWindows": [
                {
                    "kind": "deny",
                    "schedule": f"{opened.minute} {opened.hour} * * *",
                    "duration": f"{int((end - opened).total_seconds())}s",
                    "applications": [f"{SERVICE}-production"],
                    "timeZone": "UTC",
                    "description": "e2e: Argo CD maintenance window",
                }
            ],
        },
    }
    kubectl = [
        str(Path(sys.executable).parent / "kubectl"),
        "--kubeconfig",
        str(sandbox.kubeconfig),
    ]
    drop = [*kubectl, "delete", "appproject", "default", "-n", "argocd", "--ignore-not-found"]
    subprocess.run(drop, check=True, capture_output=True, timeout=60)  # a failed run's
    subprocess.run(
        [*kubectl, "create", "-f", "-"],
        input=json.dumps(project),
        text=True,
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        with sandbox.argocd() as client:
            answer = client.get(f"/api/v1/applications/{SERVICE}-production/syncwindows").json()
        assert answer["canSync"] is False and answer["activeWindows"], answer
        comment(sandbox, people["alice-gh"], sha, f"/break-glass {short} robot fleet down")
        frozen = wait_run(run, is_frozen, timeout=120, what="release Frozen by Argo CD's window")
        assert "e2e: Argo CD maintenance window" in (state_of(frozen).message or ""), frozen.state
        # A second break-glass (the pair break-glass needs): Argo CD refuses syncs now, so
        # the release is held Frozen again rather than writing what it could not sync.
        comment(sandbox, people["bob-gh"], sha, f"/break-glass {short} hotfix for the outage")
        wait_until(
            lambda: any(
                "Break-glass refused" in json.dumps(item["body"])
                for item in recorded(sandbox)["chat"]
            ),
            timeout=120,
            what="the chat message refusing the break-glass",
        )
        wait_run(run, is_frozen, timeout=60, what="release Frozen again after the break-glass")
        assert datetime.now(UTC) < end, "the window ended before the test could check it"
        wait_until(lambda: processes_of(run.id) == [], timeout=60, what="no process of the run")
        assert lease(sandbox) == "" and overlay_tree(sandbox) == before_tree
        approvals_pass()
        assert is_frozen(read_run(run.id))
        while datetime.now(UTC) < end + timedelta(seconds=1):
            time.sleep(1)
        approvals_pass()
        done = wait_run(run, is_final, timeout=420, what="release finished after the window")
        log_result("Argo CD sync window", done, started)
        assert state_of(done).name == "Promoted", done.state
        assert "break-glass by alice, bob" in record_of(run.id)
    finally:
        subprocess.run(drop, check=False, capture_output=True, timeout=60)
