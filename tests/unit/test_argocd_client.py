"""The Argo CD client's edge cases against httpx.MockTransport (the real server is the
sandbox's twin, in tests/integration/test_argocd_sandbox.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from core.errors import ArgoCDRefused, ArgoCDUnavailable, InvalidInput, SyncFailed
from tasks.argocd import ArgoCDClient, RetryPolicy, is_done_and_good

FAST = RetryPolicy(base_delay=0.0)
COMMIT = "c" * 40
LATER = "d" * 40
OLDER = "b" * 40
TOKEN = "s3cr3t-token"


def answers(
    *responses: httpx.Response | Exception,
) -> tuple[list[httpx.Request], httpx.MockTransport]:
    """A transport answering the given responses in order (the last one repeats)."""
    seen: list[httpx.Request] = []
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, Exception):
            raise item
        return item

    return seen, httpx.MockTransport(handler)


def client(transport: httpx.MockTransport, **kwargs: Any) -> ArgoCDClient:
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("retry", FAST)
    return ArgoCDClient(base_url="https://argocd.test", transport=transport, **kwargs)


def app_json(
    *,
    revision: str = COMMIT,
    phase: str = "Succeeded",
    running: bool = False,
    sync: str = "Synced",
    health: str = "Healthy",
    finished: str = "2026-11-27T10:00:00Z",
    reconciled: str = "2026-11-27T10:00:01Z",
    results: list[dict[str, Any]] | None = None,
    resources: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": "api-gateway-staging"},
        "operation": {"sync": {"revision": "main"}} if running else None,
        "status": {
            "sync": {"status": sync, "revision": revision},
            "health": {"status": health},
            "reconciledAt": reconciled,
            "resources": resources or [],
            "operationState": {
                "phase": "Running" if running else phase,
                "message": "",
                "finishedAt": None if running else finished,
                "syncResult": {"revision": revision, "resources": results or []},
            },
            "history": [{"id": 0, "revision": revision}],
        },
    }


def ok(body: Any) -> httpx.Response:
    return httpx.Response(200, json=body)


def argo_error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": message, "code": 9, "message": message})


def test_retry_policy_is_the_seeds():
    policy = RetryPolicy()
    assert (policy.retries, [policy.delay(i) for i in range(3)]) == (3, [5.0, 10.0, 20.0])
    assert policy.delay(10) == 180.0


async def test_503_three_times_then_success():
    seen, transport = answers(*[httpx.Response(503)] * 3, ok(app_json()))
    async with client(transport) as argo:
        app = await argo.get("api-gateway-staging")
    assert app["metadata"]["name"] == "api-gateway-staging"
    assert len(seen) == 4
    assert seen[0].headers["Authorization"] == f"Bearer {TOKEN}"


async def test_503_beyond_the_retries_is_unavailable():
    seen, transport = answers(httpx.Response(503))
    async with client(transport) as argo:
        with pytest.raises(ArgoCDUnavailable, match="after 3 retries") as err:
            await argo.sync("api-gateway-staging")
    assert len(seen) == 4
    assert TOKEN not in str(err.value)


async def test_connection_errors_are_retried():
    seen, transport = answers(
        httpx.ConnectError("connection refused"),
        httpx.RemoteProtocolError("connection reset"),
        ok(app_json()),
    )
    async with client(transport) as argo:
        await argo.get("api-gateway-staging")
    assert len(seen) == 3


async def test_operation_in_progress_is_retried():
    seen, transport = answers(
        argo_error(400, "another operation is already in progress"), ok(app_json())
    )
    async with client(transport) as argo:
        await argo.sync("api-gateway-production", revision="main")
    assert len(seen) == 2
    assert json.loads(seen[-1].content) == {"prune": False, "revision": "main"}


async def test_other_4xx_are_refused_at_once_with_argos_message():
    seen, transport = answers(
        argo_error(400, f"Cannot sync to {COMMIT}: auto-sync currently set to main")
    )
    async with client(transport) as argo:
        with pytest.raises(ArgoCDRefused, match="auto-sync currently set to main"):
            await argo.sync("api-gateway-staging", revision=COMMIT)
    assert len(seen) == 1


async def test_forbidden_names_the_token_without_showing_it():
    _, transport = answers(argo_error(403, "permission denied"))
    async with client(transport) as argo:
        with pytest.raises(ArgoCDRefused, match="check the Argo CD token") as err:
            await argo.get("api-gateway-staging")
    assert TOKEN not in str(err.value)


async def test_automated_sync_sends_no_revision():
    seen, transport = answers(ok(app_json()))
    async with client(transport) as argo:
        await argo.sync("api-gateway-staging", prune=True)
    assert json.loads(seen[0].content) == {"prune": True}


async def test_rollback_terminate_and_refresh_requests():
    seen, transport = answers(ok(app_json()))
    async with client(transport) as argo:
        await argo.rollback("api-gateway-production", 3)
        await argo.terminate("api-gateway-production")
        await argo.refresh("api-gateway-production", hard=True)
    assert [(r.method, r.url.path) for r in seen] == [
        ("POST", "/api/v1/applications/api-gateway-production/rollback"),
        ("DELETE", "/api/v1/applications/api-gateway-production/operation"),
        ("GET", "/api/v1/applications/api-gateway-production"),
    ]
    assert json.loads(seen[0].content) == {"id": 3, "prune": False}
    assert seen[2].url.params["refresh"] == "hard"


async def test_session_login_when_there_is_no_token():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/session":
            assert json.loads(request.content) == {"username": "admin", "password": "pw"}
            return ok({"token": "jwt-1"})
        assert request.headers["Authorization"] == "Bearer jwt-1"
        return ok(app_json())

    argo = ArgoCDClient(
        base_url="https://argocd.test",
        username="admin",
        password="pw",
        transport=httpx.MockTransport(handler),
        retry=FAST,
    )
    async with argo:
        await argo.get("a")
        await argo.get("a")


def test_bad_configuration_is_refused_before_any_request():
    with pytest.raises(InvalidInput, match="token"):
        ArgoCDClient(base_url="https://argocd.test")
    with pytest.raises(InvalidInput, match="http"):
        ArgoCDClient(base_url="argocd.test", token="t")


def sequence(*apps: dict[str, Any]) -> Callable[[httpx.Request], httpx.Response]:
    states: Iterator[dict[str, Any]] = iter(apps)
    last: dict[str, Any] = apps[-1]

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal last
        if request.url.path.endswith("/resource"):
            return httpx.Response(404, text="Not Found")
        last = next(states, last)
        return ok(last)

    return handler


def descendant_of_commit(revision: str, commit: str) -> bool:
    return (revision, commit) == (LATER, COMMIT)


async def test_wait_ends_at_a_descendant_revision_once_reconciled():
    handler = sequence(
        app_json(revision=OLDER),  # still the previous sync
        app_json(revision=LATER, running=True),
        app_json(revision=LATER, reconciled="2026-11-27T09:59:59Z"),  # not reconciled yet
        app_json(revision=LATER, health="Progressing"),
        app_json(revision=LATER),
    )
    async with client(httpx.MockTransport(handler)) as argo:
        state = await argo.wait_synced(
            "api-gateway-staging",
            COMMIT,
            is_descendant=descendant_of_commit,
            deadline=10,
            poll_interval=0.01,
        )
    assert state.synced_revision == LATER and state.health == "Healthy"


async def test_wait_fails_fast_on_progress_deadline_exceeded():
    message = 'Deployment "api-gateway" exceeded its progress deadline'
    failed = {
        "group": "apps",
        "version": "v1",
        "kind": "Deployment",
        "namespace": "staging",
        "name": "api-gateway",
        "status": "Synced",
        "hookPhase": "Failed",
        "message": message,
    }
    handler = sequence(
        app_json(running=True),
        app_json(
            phase="Failed",
            health="Degraded",
            results=[failed],
        ),
    )
    async with client(httpx.MockTransport(handler)) as argo:
        with pytest.raises(SyncFailed) as err:
            await argo.wait_synced(
                "api-gateway-staging",
                COMMIT,
                is_descendant=descendant_of_commit,
                deadline=10,
                poll_interval=0.01,
            )
    text = str(err.value)
    assert "Deployment staging/api-gateway" in text
    assert "ProgressDeadlineExceeded" in text and message in text


async def test_the_live_deployment_condition_is_named_when_argo_can_show_it():
    degraded = {
        "group": "apps",
        "version": "v1",
        "kind": "Deployment",
        "namespace": "staging",
        "name": "api-gateway",
        "health": {"status": "Degraded", "message": "exceeded"},
    }
    live = {
        "status": {
            "conditions": [
                {
                    "type": "Progressing",
                    "status": "False",
                    "reason": "ProgressDeadlineExceeded",
                    "message": 'ReplicaSet "api-gateway-1" has timed out progressing.',
                }
            ]
        }
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/resource"):
            assert request.url.params["resourceName"] == "api-gateway"
            return ok({"manifest": json.dumps(live)})
        return ok(app_json(health="Degraded", resources=[degraded]))

    async with client(httpx.MockTransport(handler)) as argo:
        with pytest.raises(SyncFailed, match="ProgressDeadlineExceeded: ReplicaSet"):
            await argo.wait_synced(
                "api-gateway-staging", COMMIT, is_descendant=descendant_of_commit, deadline=5
            )


async def test_wait_fails_naming_the_failed_hook():
    hook = {
        "group": "batch",
        "version": "v1",
        "kind": "Job",
        "namespace": "staging",
        "name": "smoke-test",
        "hookType": "PostSync",
        "hookPhase": "Failed",
        "message": "Job has reached the specified backoff limit",
    }
    handler = sequence(app_json(phase="Failed", results=[hook]))
    async with client(httpx.MockTransport(handler)) as argo:
        with pytest.raises(SyncFailed, match="hook Job staging/smoke-test: Job has reached"):
            await argo.wait_synced(
                "api-gateway-staging", COMMIT, is_descendant=descendant_of_commit, deadline=5
            )


async def test_a_degraded_app_at_an_older_revision_does_not_fail_our_wait():
    handler = sequence(app_json(revision=OLDER, health="Degraded"))
    async with client(httpx.MockTransport(handler)) as argo:
        with pytest.raises(SyncFailed, match=r"within 0s: OutOfSync|within 0s: Synced/Degraded"):
            await argo.wait_synced(
                "api-gateway-staging",
                COMMIT,
                is_descendant=descendant_of_commit,
                deadline=0.2,
                poll_interval=0.05,
            )


async def test_wait_ends_at_the_deadline_saying_where_the_app_is():
    handler = sequence(app_json(running=True))
    async with client(httpx.MockTransport(handler)) as argo:
        with pytest.raises(SyncFailed, match="an operation running"):
            await argo.wait_synced(
                "api-gateway-staging",
                COMMIT,
                is_descendant=descendant_of_commit,
                deadline=0.2,
                poll_interval=0.05,
            )


def test_done_and_good_needs_every_condition():
    good = app_json()
    assert is_done_and_good(good, COMMIT, descendant_of_commit)
    assert is_done_and_good(app_json(revision=LATER), COMMIT, descendant_of_commit)
    assert not is_done_and_good(app_json(revision=OLDER), COMMIT, descendant_of_commit)
    assert not is_done_and_good(app_json(sync="OutOfSync"), COMMIT, descendant_of_commit)
    assert not is_done_and_good(app_json(running=True), COMMIT, descendant_of_commit)
    assert not is_done_and_good(
        app_json(reconciled="2026-11-27T09:00:00Z"), COMMIT, descendant_of_commit
    )


class FakeArgo:
    """Answers GETs from ``before`` (until a sync is posted) then from ``after``; records POSTs."""

    def __init__(self, before, after=(), sync_answer=None):
        self.before, self.after = list(before), list(after)
        self.sync_answer = sync_answer
        self.posts: list[httpx.Request] = []
        self.gets: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.posts.append(request)
            if self.sync_answer is not None:
                return self.sync_answer
            self.before = []
            return ok(app_json(running=True))
        self.gets.append(request)
        states = self.before or self.after
        return ok(states.pop(0) if len(states) > 1 else states[0])


async def test_sync_and_wait_leaves_an_app_already_at_our_commit_alone():
    fake = FakeArgo([app_json(revision=LATER)])
    async with client(httpx.MockTransport(fake)) as argo:
        outcome = await argo.sync_and_wait(
            "api-gateway-production",
            COMMIT,
            automated=False,
            deadline=5,
            is_descendant=descendant_of_commit,
        )
    assert outcome.synced_now is False and outcome.revision == LATER
    assert fake.posts == []


async def test_sync_and_wait_lets_a_running_operation_end_then_syncs_the_branch():
    fake = FakeArgo(
        before=[app_json(revision=OLDER, running=True), app_json(revision=OLDER)],
        after=[app_json(revision=COMMIT, running=True), app_json(revision=COMMIT)],
    )
    async with client(httpx.MockTransport(fake)) as argo:
        outcome = await argo.sync_and_wait(
            "api-gateway-production",
            COMMIT,
            automated=False,
            deadline=5,
            is_descendant=descendant_of_commit,
            poll_interval=0.01,
        )
    assert outcome.synced_now is True and outcome.revision == COMMIT
    assert [json.loads(p.content) for p in fake.posts] == [{"prune": False, "revision": "main"}]


async def test_sync_and_wait_on_an_automated_app_refreshes_and_sends_no_revision():
    fake = FakeArgo(before=[app_json(revision=OLDER)], after=[app_json(revision=COMMIT)])
    async with client(httpx.MockTransport(fake)) as argo:
        await argo.sync_and_wait(
            "api-gateway-staging",
            COMMIT,
            automated=True,
            deadline=5,
            is_descendant=descendant_of_commit,
            poll_interval=0.01,
        )
    assert fake.gets[0].url.params["refresh"] == "normal"
    assert [json.loads(p.content) for p in fake.posts] == [{"prune": False}]


async def test_sync_and_wait_waits_for_an_auto_sync_that_won_the_race():
    busy = argo_error(400, "another operation is already in progress")
    fake = FakeArgo(before=[app_json(revision=OLDER), app_json(revision=COMMIT)], sync_answer=busy)
    async with client(
        httpx.MockTransport(fake), retry=RetryPolicy(retries=1, base_delay=0.0)
    ) as argo:
        outcome = await argo.sync_and_wait(
            "api-gateway-staging",
            COMMIT,
            automated=True,
            deadline=5,
            is_descendant=descendant_of_commit,
            poll_interval=0.01,
        )
    assert outcome.synced_now is False and outcome.revision == COMMIT
