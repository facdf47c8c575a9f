"""The webhook receiver against the session's real Prefect server.

Octokit's example payloads are signed and posted to the ASGI app in-process (httpx
ASGITransport); the runs they start are read back from the Prefect API. Probe flows with
their own names stand in for ``ci`` and ``training-image`` so these tests never touch the
real deployments other tests serve.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect import flow, get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun

from core.catalog import Catalog
from core.webhooks import Targets, compute_signature
from deployments.webhook import create_app, load_secret, prefect_starter
from tests.unit.test_webhooks import MANIFESTS_CATALOG, make_catalog

pytestmark = pytest.mark.integration

OCTOKIT = Path(__file__).parent.parent / "fixtures" / "octokit"
SECRET = "webhook-test-secret"
TARGETS = Targets(
    ci="webhook-probe-ci/ci",
    training_image="webhook-probe-training/image",
    release_train="webhook-probe-train/train",
)
CATALOG = make_catalog(service_repo="Codertocat/Hello-World", training_repo="robotics/train-x")
TRAINING_CATALOG = make_catalog(
    service_repo="robotics/api-x", training_repo="Codertocat/Hello-World"
)
MAX_BODY = 256 * 1024


@flow(name="webhook-probe-ci")
def probe_ci(service: str, sha: str, ref: str, event: str, fork: bool = False) -> None:
    """Stands in for ci: only its runs' existence and parameters are checked."""


@flow(name="webhook-probe-training")
def probe_training(image: str, sha: str, ref: str) -> None:
    """Stands in for training-image."""


@flow(name="webhook-probe-train")
def probe_train(bundle_file: str | None = None, manifests_sha: str | None = None) -> None:
    """Stands in for release-train (its bundle parameters)."""


@pytest.fixture(scope="module")
async def probe_deployments(prefect_server) -> dict[str, uuid.UUID]:
    ids = {}
    for probe, name in ((probe_ci, "ci"), (probe_training, "image"), (probe_train, "train")):
        ids[f"{probe.name}/{name}"] = await (await probe.ato_deployment(name=name)).aapply()
    return ids


class Receiver:
    """The app, its client, and the starter's Prefect client (ASGITransport runs no lifespan)."""

    def __init__(self, catalog: Catalog, targets: Targets = TARGETS) -> None:
        self.catalog, self.targets = catalog, targets

    async def __aenter__(self) -> Receiver:
        start, self._open, self._close = prefect_starter()
        await self._open()
        self.app = create_app(
            secret=SECRET,
            catalog=self.catalog,
            starter=start,
            targets=self.targets,
            max_body=MAX_BODY,
        )
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://receiver"
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        await self._close()

    @property
    def stats(self) -> Any:
        return self.app.state.receiver.stats

    async def deliver(
        self,
        event: str,
        body: bytes,
        *,
        delivery: str | None = None,
        signature: str | None = "sign",
    ) -> httpx.Response:
        headers = {
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/test",
        }
        if signature == "sign":
            signature = compute_signature(SECRET, body)
        if signature is not None:
            headers["X-Hub-Signature-256"] = signature
        return await self.http.post("/github", content=body, headers=headers)


def octokit(name: str) -> bytes:
    return (OCTOKIT / name).read_bytes()


def training_push(*paths: str) -> bytes:
    data = json.loads(octokit("push.json"))
    data["commits"][0].update(added=list(paths), modified=[], removed=[])
    return json.dumps(data).encode()


async def runs_of(deployment_id: uuid.UUID) -> list[FlowRun]:
    async with get_client() as client:
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


async def test_push_starts_ci_once_even_when_redelivered_after_a_restart(probe_deployments):
    ci = probe_deployments["webhook-probe-ci/ci"]
    before = {r.id for r in await runs_of(ci)}
    delivery = str(uuid.uuid4())
    async with Receiver(CATALOG) as receiver:
        first = await receiver.deliver("push", octokit("push.json"), delivery=delivery)
        again = await receiver.deliver("push", octokit("push.json"), delivery=delivery)
    async with Receiver(CATALOG) as restarted:  # a new process would hold nothing either
        third = await restarted.deliver("push", octokit("push.json"), delivery=delivery)

    assert first.status_code == again.status_code == third.status_code == 202
    (run_info,) = first.json()["runs"]
    assert run_info["reused"] is False
    assert again.json()["runs"][0]["flow_run_id"] == run_info["flow_run_id"]
    assert third.json()["runs"][0]["flow_run_id"] == run_info["flow_run_id"]
    # The answer says so: the redeliveries (within a second, and after a restart) reuse it.
    assert again.json()["runs"][0]["reused"] is True
    assert third.json()["runs"][0]["reused"] is True
    new = [r for r in await runs_of(ci) if r.id not in before]
    assert len(new) == 1
    run = new[0]
    assert str(run.id) == run_info["flow_run_id"]
    assert run.parameters == {
        "service": "hello",
        "sha": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
        "ref": "refs/heads/master",
        "event": "push",
        "fork": False,
    }
    assert run.idempotency_key == f"github-{delivery}-webhook-probe-ci/ci"
    assert run.parent_task_run_id is None  # a top-level run, not a subflow
    assert {"github", "push"} <= set(run.tags)


async def test_a_new_delivery_of_the_same_push_is_a_new_run(probe_deployments):
    async with Receiver(CATALOG) as receiver:
        a = await receiver.deliver("push", octokit("push.json"))
        b = await receiver.deliver("push", octokit("push.json"))
    assert a.json()["runs"][0]["flow_run_id"] != b.json()["runs"][0]["flow_run_id"]


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "sha256=" + "0" * 64,
        compute_signature("another secret", octokit("push.json")),
        compute_signature(SECRET, b"a different body"),
    ],
    ids=["missing", "zeros", "other-secret", "other-body"],
)
async def test_missing_or_wrong_signature_is_401_and_starts_nothing(probe_deployments, signature):
    ci = probe_deployments["webhook-probe-ci/ci"]
    before = len(await runs_of(ci))
    async with Receiver(CATALOG) as receiver:
        response = await receiver.deliver("push", octokit("push.json"), signature=signature)
    assert response.status_code == 401
    assert len(await runs_of(ci)) == before


async def test_a_10_mb_body_is_refused_without_being_read_whole(probe_deployments):
    sent = 0
    chunk = b"x" * 65536

    async def ten_megabytes() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(160):  # 10 MiB, streamed without a Content-Length
            sent += len(chunk)
            yield chunk

    async with Receiver(CATALOG) as receiver:
        response = await receiver.http.post(
            "/github",
            content=ten_megabytes(),
            headers={
                "X-GitHub-Event": "push",
                "X-GitHub-Delivery": str(uuid.uuid4()),
                "X-Hub-Signature-256": "sha256=" + "0" * 64,
            },
        )
        read = receiver.stats.last_body_bytes_read
    assert response.status_code == 413
    assert read <= MAX_BODY + len(chunk)
    assert sent <= MAX_BODY + 2 * len(chunk)  # the rest was never even pulled from the client


async def test_a_declared_oversize_body_is_refused_before_reading(probe_deployments):
    async with Receiver(CATALOG) as receiver:
        response = await receiver.deliver("push", b"{" + b" " * (MAX_BODY + 10) + b"}")
        assert receiver.stats.last_body_bytes_read == 0
    assert response.status_code == 413


async def test_malformed_json_is_400(probe_deployments):
    async with Receiver(CATALOG) as receiver:
        response = await receiver.deliver("push", b'{"ref": "refs/heads/master",')
    assert response.status_code == 400
    assert "JSON" in response.json()["message"]


async def test_ping_is_answered(probe_deployments):
    async with Receiver(CATALOG) as receiver:
        response = await receiver.deliver("ping", octokit("ping.json"))
    assert response.status_code == 200
    assert response.json()["zen"] == json.loads(octokit("ping.json"))["zen"]


async def test_unknown_event_and_unknown_repository_are_ignored(probe_deployments, caplog):
    caplog.set_level(logging.INFO, logger="robotics_cd.webhook")
    ci = probe_deployments["webhook-probe-ci/ci"]
    before = len(await runs_of(ci))
    other = make_catalog(service_repo="robotics/api-x", training_repo="robotics/train-x")
    async with Receiver(CATALOG) as receiver:
        issues = await receiver.deliver("issues", b'{"action": "opened"}')
    async with Receiver(other) as receiver:
        unknown = await receiver.deliver("push", octokit("push.json"))
    assert issues.status_code == unknown.status_code == 202
    assert "not in the catalog" in unknown.json()["message"]
    assert "not in the catalog" in caplog.text
    assert len(await runs_of(ci)) == before


async def test_pull_request_starts_ci_in_check_mode(probe_deployments):
    async with Receiver(CATALOG) as receiver:
        response = await receiver.deliver("pull_request", octokit("pull_request.opened.json"))
        closed = await receiver.deliver("pull_request", octokit("pull_request.closed.json"))
    assert response.status_code == 202
    assert closed.status_code == 202 and closed.json()["runs"] == []
    async with get_client() as client:
        run = await client.read_flow_run(uuid.UUID(response.json()["runs"][0]["flow_run_id"]))
    assert run.parameters["event"] == "pull_request"
    assert run.parameters["ref"] == "refs/pull/2/head"
    assert run.parameters["fork"] is False


async def test_training_push_starts_training_image_only_for_matching_paths(probe_deployments):
    image = probe_deployments["webhook-probe-training/image"]
    before = {r.id for r in await runs_of(image)}
    async with Receiver(TRAINING_CATALOG) as receiver:
        readme = await receiver.deliver("push", training_push("README.md"))
        assert {r.id for r in await runs_of(image)} == before
        configs = await receiver.deliver("push", training_push("configs/exp.yaml"))
    assert readme.status_code == 202 and readme.json()["runs"] == []
    assert configs.status_code == 202
    new = [r for r in await runs_of(image) if r.id not in before]
    assert [r.parameters for r in new] == [
        {
            "image": "vision",
            "sha": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
            "ref": "refs/heads/master",
        }
    ]


def manifests_push(*commits: dict[str, list[str]]) -> bytes:
    """push.json as a push to the manifests repo (MANIFESTS_CATALOG: Codertocat/Hello-World,
    branch master), with these commits' file lists."""
    data = json.loads(octokit("push.json"))
    template = data["commits"][0]
    data["commits"] = [
        {**template, "added": [], "modified": [], "removed": [], **c} for c in commits
    ]
    return json.dumps(data).encode()


async def test_a_pushed_bundle_file_starts_a_release_train_once(probe_deployments):
    """A push changing ``bundles/<name>.yaml`` in the manifests repo, signed and posted to
    the receiver, starts one run of the release-train deployment per bundle, with the file
    and the pushed commit; a redelivery starts nothing more; a push without one starts none."""
    train = probe_deployments["webhook-probe-train/train"]
    before = {r.id for r in await runs_of(train)}
    body = manifests_push(
        {"modified": ["bundles/fleet-v2.yaml", "serving/api-gateway/overlays/staging/x.yaml"]}
    )
    delivery = str(uuid.uuid4())
    async with Receiver(MANIFESTS_CATALOG) as receiver:
        first = await receiver.deliver("push", body, delivery=delivery)
        again = await receiver.deliver("push", body, delivery=delivery)
        other = await receiver.deliver(
            "push", manifests_push({"modified": ["serving/api-gateway/overlays/production/x"]})
        )
    assert first.status_code == again.status_code == other.status_code == 202
    (started,) = first.json()["runs"]
    assert again.json()["runs"][0]["flow_run_id"] == started["flow_run_id"]
    assert other.json()["runs"] == [] and "no bundle file" in other.json()["message"]
    new = [r for r in await runs_of(train) if r.id not in before]
    assert [str(r.id) for r in new] == [started["flow_run_id"]]
    (run,) = new
    assert run.parameters == {
        "bundle_file": "bundles/fleet-v2.yaml",
        "manifests_sha": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
    }
    assert {"github", "push", "train", "train:fleet-v2"} <= set(run.tags)
    assert run.idempotency_key == f"github-{delivery}-webhook-probe-train/train-fleet-v2"
    assert run.parent_task_run_id is None  # a top-level run, as a train must be (it suspends)


async def test_missing_deployment_is_503_so_github_can_redeliver(probe_deployments):
    targets = Targets(ci="webhook-probe-ci/not-deployed", training_image="x/y")
    async with Receiver(CATALOG, targets) as receiver:
        response = await receiver.deliver("push", octokit("push.json"))
    assert response.status_code == 503
    assert "robotics-cd deploy" in response.json()["message"]


async def test_secret_comes_from_the_prefect_secret_block(prefect_server, monkeypatch):
    from prefect.blocks.system import Secret

    from core.settings import Settings

    monkeypatch.delenv("ROBOTICS_CD_WEBHOOK_SECRET", raising=False)
    name = f"webhook-secret-{uuid.uuid4().hex[:8]}"
    await Secret(value="from-the-block").save(name)
    assert load_secret(Settings(webhook_secret_block=name)) == "from-the-block"
    monkeypatch.setenv("ROBOTICS_CD_WEBHOOK_SECRET", "from-env")
    assert load_secret(Settings(webhook_secret_block=name)) == "from-env"


async def test_missing_secret_says_what_to_do(prefect_server, monkeypatch):
    from core.errors import WebhookSecretMissing
    from core.settings import Settings

    monkeypatch.delenv("ROBOTICS_CD_WEBHOOK_SECRET", raising=False)
    with pytest.raises(WebhookSecretMissing, match="ROBOTICS_CD_WEBHOOK_SECRET"):
        load_secret(Settings(webhook_secret_block="no-such-block-here"))
