"""The GitHub webhook receiver: an ASGI app that turns signed deliveries into deployment runs.

``robotics-cd webhook serve --host 127.0.0.1 --port 8787`` runs it with uvicorn. Per request:

1. read the body chunk by chunk, stopping at the cap (413; a huge body is never held whole);
2. verify ``X-Hub-Signature-256`` over the raw bytes, constant time (401, nothing started);
3. ``ping`` → 200; events we do not handle → 202 with a log line;
4. decode JSON (400), validate the payload model and the repo/ref/sha (400), route from the
   catalog (unknown repositories → 202 ignored);
5. start each run with ``run_deployment(..., timeout=0, as_subflow=False,
   idempotency_key=f"github-{delivery}-{deployment}")``: a redelivery (same
   ``X-GitHub-Delivery``) creates no second run, across receiver restarts, because the key is
   kept by the Prefect server. Answers 202 with the run ids well inside GitHub's 10 s.

Prefect unreachable or a deployment missing → 503: GitHub shows the delivery as failed and
it can be redelivered safely.

``commit_comment`` and ``issue_comment`` deliveries are approvals by comment: they go to
``deployments/comments.py`` (``/approve``, ``/reject``, ``/break-glass`` on a waiting
release), which records a vote on the run and resumes it; a redelivery records nothing new.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core.catalog import Catalog, load_catalog
from core.errors import GitHubError, InvalidInput, WebhookSecretMissing
from core.settings import Settings, get_settings
from core.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    PAYLOAD_MODELS,
    SIGNATURE_HEADER,
    CommitCommentEvent,
    Decision,
    IssueCommentEvent,
    PingEvent,
    RunRequest,
    Targets,
    parse_payload,
    route,
    validate_delivery_id,
    verify_signature,
)
from deployments.comments import CommentApprovals, PrefectReleaseRuns, RestGitHub

log = logging.getLogger("robotics_cd.webhook")

# GitHub caps payloads at 25 MB, but the events we route are a few kB to a few hundred kB.
DEFAULT_MAX_BODY = 2 * 1024 * 1024
# Stay well inside GitHub's 10 s delivery timeout, even when Prefect is slow.
START_DEADLINE_SECONDS = 8.0
SECRET_ENV = "ROBOTICS_CD_WEBHOOK_SECRET"


@dataclass(frozen=True)
class StartedRun:
    deployment: str
    flow_run_id: str
    name: str
    reused: bool  # the idempotency key matched an existing run (the server answered 200)


class RunStarter(Protocol):
    async def __call__(self, request: RunRequest, idempotency_key: str) -> StartedRun: ...


class DeploymentUnavailable(Exception):
    """Prefect could not start the run (server down, deployment missing): answer 503."""


@dataclass
class ReceiverStats:
    """Counters a test or a benchmark reads; the last request's bytes read prove the cap."""

    requests: int = 0
    runs_started: int = 0
    last_body_bytes_read: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


def load_secret(settings: Settings | None = None) -> str:
    """The webhook secret: ``$ROBOTICS_CD_WEBHOOK_SECRET`` if set, else the Secret block."""
    if value := os.environ.get(SECRET_ENV):
        return value
    settings = settings or get_settings()
    from prefect.blocks.system import Secret

    try:
        block: Secret[str] = Secret.load(settings.webhook_secret_block, _sync=True)  # type: ignore[call-arg,assignment]
    except (ValueError, RuntimeError) as exc:
        raise WebhookSecretMissing(
            f"no webhook secret: set {SECRET_ENV} or create the Prefect Secret block "
            f"{settings.webhook_secret_block!r} holding the secret configured on GitHub"
        ) from exc
    value = block.get()
    if not isinstance(value, str) or not value:
        raise WebhookSecretMissing(
            f"the Secret block {settings.webhook_secret_block!r} is empty; store the webhook "
            "secret configured on GitHub in it"
        )
    return value


def prefect_starter(
    client_factory: Callable[[], Any] | None = None,
) -> tuple[RunStarter, Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """A starter over one long-lived Prefect client, with its open/close hooks."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    from tasks.handoff import create_deployment_run

    holder: dict[str, Any] = {}

    async def open_client() -> None:
        client = (client_factory or get_client)()
        holder["client"] = await client.__aenter__()

    async def close_client() -> None:
        if client := holder.pop("client", None):
            await client.__aexit__(None, None, None)

    async def start(request: RunRequest, idempotency_key: str) -> StartedRun:
        client = holder.get("client")
        if client is None:
            raise DeploymentUnavailable("the receiver's Prefect client is not open")
        try:
            run, created = await create_deployment_run(
                client,
                request.deployment,
                parameters=request.parameters,
                idempotency_key=idempotency_key,
                tags=["github", *request.tags],
            )
        except ObjectNotFound as exc:
            raise DeploymentUnavailable(
                f"deployment {request.deployment} not found: run `robotics-cd deploy` "
                "(work pool) or `robotics-cd serve`"
            ) from exc
        except (PrefectHTTPStatusError, OSError) as exc:
            raise DeploymentUnavailable(f"Prefect API: {type(exc).__name__}: {exc}") from exc
        return StartedRun(request.deployment, str(run.id), run.name, reused=not created)

    return start, open_client, close_client


class WebhookReceiver:
    """The request handler; the catalog, secret and starter are given, not looked up."""

    def __init__(
        self,
        *,
        secret: str,
        catalog: Catalog,
        starter: RunStarter,
        targets: Targets | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        comments: CommentApprovals | None = None,
    ) -> None:
        if not secret:
            raise WebhookSecretMissing("the webhook secret is empty")
        self._secret = secret
        self.catalog = catalog
        self.starter = starter
        self.targets = targets or Targets()
        self.max_body = max_body
        self.comments = comments
        self.stats = ReceiverStats()

    async def handle(self, request: Request) -> JSONResponse:
        self.stats.requests += 1
        response = await self._handle(request)
        self.stats.by_status[response.status_code] = (
            self.stats.by_status.get(response.status_code, 0) + 1
        )
        return response

    async def _read_capped(self, request: Request) -> bytes | None:
        """The body, or None as soon as it passes the cap (never buffering past it)."""
        self.stats.last_body_bytes_read = 0
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            self.stats.last_body_bytes_read = size
            if size > self.max_body:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _handle(self, request: Request) -> JSONResponse:
        try:
            body = await self._read_capped(request)
        except ClientDisconnect:
            log.warning("webhook: the client went away before sending its whole body")
            return _answer(400, "incomplete body", close=True)
        if body is None:
            log.warning("webhook refused: body larger than %d bytes", self.max_body)
            return _answer(413, f"body larger than {self.max_body} bytes", close=True)
        if not verify_signature(self._secret, body, request.headers.get(SIGNATURE_HEADER)):
            log.warning(
                "webhook refused: missing or wrong %s (delivery %s)",
                SIGNATURE_HEADER,
                _printable(request.headers.get(DELIVERY_HEADER)),
            )
            return _answer(401, "missing or wrong signature")
        event = request.headers.get(EVENT_HEADER, "")
        try:
            delivery = validate_delivery_id(request.headers.get(DELIVERY_HEADER))
        except InvalidInput as exc:
            return _answer(400, str(exc))
        if event not in PAYLOAD_MODELS:
            log.info("delivery %s: event %r ignored", delivery, _printable(event))
            return _answer(202, f"event {event!r} is not handled", delivery=delivery)
        try:
            payload = parse_payload(event, _decode(body, request.headers.get("content-type")))
            if isinstance(payload, PingEvent):
                log.info("delivery %s: ping from hook %s", delivery, payload.hook_id)
                return _answer(200, "pong", delivery=delivery, zen=payload.zen)
            if isinstance(payload, CommitCommentEvent | IssueCommentEvent):
                return await self._comment(delivery, event, payload)
            decision = route(event, payload, self.catalog, self.targets)
        except InvalidInput as exc:
            log.warning("delivery %s refused: %s", delivery, exc)
            return _answer(400, str(exc), delivery=delivery)
        if not decision.starts_anything:
            log.info("delivery %s (%s) ignored: %s", delivery, event, decision.ignored)
            return _answer(202, decision.ignored, delivery=delivery, runs=[])
        return await self._start(delivery, event, decision)

    async def _comment(
        self, delivery: str, event: str, payload: CommitCommentEvent | IssueCommentEvent
    ) -> JSONResponse:
        if self.comments is None:
            return _answer(202, "approvals by comment are not configured", delivery=delivery)
        try:
            with anyio.fail_after(START_DEADLINE_SECONDS):
                outcome = await self.comments.handle(payload)
        except (GitHubError, DeploymentUnavailable, TimeoutError, OSError, httpx.HTTPError) as exc:
            reason = str(exc) or f"no answer within {START_DEADLINE_SECONDS:.0f}s"
            log.error("delivery %s (%s): comment not handled: %s", delivery, event, reason)
            return _answer(503, reason, delivery=delivery)
        log.info("delivery %s (%s): %s", delivery, event, outcome.message)
        return _answer(
            outcome.status,
            outcome.message,
            delivery=delivery,
            flow_run_id=outcome.flow_run_id,
            replied=outcome.replied,
        )

    async def _start(self, delivery: str, event: str, decision: Decision) -> JSONResponse:
        started: list[StartedRun] = []
        try:
            with anyio.fail_after(START_DEADLINE_SECONDS):
                for run in decision.runs:
                    started.append(await self.starter(run, run.idempotency_key(delivery)))
        except (DeploymentUnavailable, TimeoutError) as exc:
            reason = str(exc) or f"Prefect did not answer within {START_DEADLINE_SECONDS:.0f}s"
            log.error("delivery %s (%s): could not start runs: %s", delivery, event, reason)
            return _answer(503, reason, delivery=delivery)
        for flow_run, asked in zip(started, decision.runs, strict=True):
            self.stats.runs_started += 0 if flow_run.reused else 1
            log.info(
                "delivery %s (%s): %s run %s (%s) for %s",
                delivery,
                event,
                "reused" if flow_run.reused else "started",
                flow_run.name,
                flow_run.flow_run_id,
                asked.reason,
            )
        return _answer(
            202,
            "started",
            delivery=delivery,
            runs=[
                {
                    "deployment": r.deployment,
                    "flow_run_id": r.flow_run_id,
                    "name": r.name,
                    "reused": r.reused,
                }
                for r in started
            ],
        )


def _decode(body: bytes, content_type: str | None) -> Any:
    """JSON body, or GitHub's form encoding (``payload=<json>``); InvalidInput if neither."""
    text: str | bytes = body
    if content_type and content_type.startswith("application/x-www-form-urlencoded"):
        values = parse_qs(body.decode("utf-8", "replace")).get("payload")
        if not values:
            raise InvalidInput("form-encoded delivery without a 'payload' field")
        text = values[0]
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}") from None


def _printable(value: str | None) -> str:
    return (value or "-").encode("ascii", "replace").decode()[:80]


def _answer(status: int, message: str, *, close: bool = False, **extra: Any) -> JSONResponse:
    headers = {"Connection": "close"} if close else None
    return JSONResponse({"message": message, **extra}, status_code=status, headers=headers)


def create_app(
    *,
    secret: str | None = None,
    catalog: Catalog | None = None,
    starter: RunStarter | None = None,
    targets: Targets | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    comments: CommentApprovals | None = None,
) -> Starlette:
    """The ASGI app. Unset arguments come from settings: the catalog file, the Secret block
    (or env), the deployment names, and a Prefect client opened for the app's lifetime."""
    settings = get_settings()
    hooks: tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]] | None = None
    catalog = catalog or load_catalog(settings.catalog)
    if starter is None:
        starter, open_client, close_client = prefect_starter()
        hooks = (open_client, close_client)
        comments = comments or CommentApprovals(
            catalog=catalog,
            runs=PrefectReleaseRuns(settings.release_deployment),
            github=RestGitHub(settings.github_api_url),
        )
    receiver = WebhookReceiver(
        secret=secret if secret is not None else load_secret(settings),
        catalog=catalog,
        starter=starter,
        comments=comments,
        targets=targets
        or Targets(
            ci=settings.ci_deployment,
            training_image=settings.training_image_deployment,
            release_train=settings.release_train_deployment,
        ),
        max_body=max_body,
    )

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        if hooks:
            await hooks[0]()
        try:
            yield
        finally:
            if hooks:
                await hooks[1]()

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/", receiver.handle, methods=["POST"]),
            Route("/github", receiver.handle, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.receiver = receiver
    return app


def serve(host: str, port: int, *, max_body: int = DEFAULT_MAX_BODY) -> None:
    """Run the receiver with uvicorn until interrupted."""
    import uvicorn

    app = create_app(max_body=max_body)
    log.info("webhook receiver listening on http://%s:%d/github", host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
