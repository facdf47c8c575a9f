"""Argo CD's REST API (the subset the product and ``argocd app wait`` use), over the twin's
controller. Errors have grpc-gateway's shape: ``{"error", "code", "message"}``."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from sandbox.argocd.controller import (
    INVALID_ARGUMENT,
    UNAUTHENTICATED,
    ArgoError,
    Controller,
)
from sandbox.kube.store import ApiError

VERSION = "v3.6.0+sandbox"

Handler = Callable[[Request], Awaitable[Response]]


class Sessions:
    """Bearer tokens: the configured API token, or one ``POST /api/v1/session`` issued.

    Issued tokens are ``<user>.<nonce>.<hmac>`` so they stay valid across a twin restart
    without storing them, as Argo CD's signed JWTs do.
    """

    def __init__(self, *, username: str, password: str, token: str, signing_key: str) -> None:
        self.username, self.password, self.token = username, password, token
        self._key = signing_key.encode()

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def login(self, username: str, password: str) -> str:
        good = hmac.compare_digest(username, self.username) and hmac.compare_digest(
            password, self.password
        )
        if not good:
            raise ArgoError(UNAUTHENTICATED, "Invalid username or password")
        text = f"{username}.{secrets.token_hex(8)}"
        return f"{text}.{self._sign(text)}"

    def user_of(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        token = token or request.cookies.get("argocd.token", "")
        if not token:
            raise ArgoError(UNAUTHENTICATED, "no session information")
        if self.token and hmac.compare_digest(token, self.token):
            return self.username
        user, _, rest = token.partition(".")
        nonce, _, signature = rest.partition(".")
        if user and nonce and hmac.compare_digest(signature, self._sign(f"{user}.{nonce}")):
            return user
        raise ArgoError(UNAUTHENTICATED, "invalid session: token signature is invalid")


def _error(exc: ArgoError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.http_status)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ArgoError(INVALID_ARGUMENT, f"invalid request body: {exc}") from exc
    if not isinstance(body, dict):
        raise ArgoError(INVALID_ARGUMENT, "the request body must be a JSON object")
    return body


def build_app(controller: Controller, sessions: Sessions) -> Starlette:
    def guarded(handler: Callable[[Request, str], Awaitable[Response]]) -> Handler:
        async def run(request: Request) -> Response:
            try:
                user = sessions.user_of(request)
                return await handler(request, user)
            except ArgoError as exc:
                return _error(exc)
            except ApiError as exc:
                return _error(ArgoError(13, exc.message))

        return run

    async def version(_: Request) -> Response:
        return JSONResponse({"Version": VERSION})

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok")

    async def session(request: Request) -> Response:
        try:
            body = await _body(request)
            token = sessions.login(str(body.get("username", "")), str(body.get("password", "")))
        except ArgoError as exc:
            return _error(exc)
        return JSONResponse({"token": token})

    async def userinfo(request: Request, user: str) -> Response:
        return JSONResponse({"loggedIn": True, "username": user, "iss": "argocd"})

    async def list_apps(request: Request, user: str) -> Response:
        return JSONResponse({"metadata": {}, "items": controller.list_apps()})

    async def get_app(request: Request, user: str) -> Response:
        name = request.path_params["name"]
        refresh = request.query_params.get("refresh")
        controller.get_app(name)  # 404 before any work
        if refresh:
            if refresh == "hard":
                controller.repos.forget_renders()
            async with controller._lock(name):
                await controller.reconcile(name, fetch=True)
        return JSONResponse(controller.get_app(name))

    async def sync(request: Request, user: str) -> Response:
        name = request.path_params["name"]
        body = await _body(request)
        return JSONResponse(controller.request_sync(name, body, user))

    async def rollback(request: Request, user: str) -> Response:
        name = request.path_params["name"]
        body = await _body(request)
        return JSONResponse(controller.request_rollback(name, body, user))

    async def resource(request: Request, user: str) -> Response:
        live = controller.live_resource(request.path_params["name"], dict(request.query_params))
        return JSONResponse({"manifest": json.dumps(live)})

    async def resource_tree(request: Request, user: str) -> Response:
        return JSONResponse(controller.resource_tree(request.path_params["name"]))

    async def sync_windows(request: Request, user: str) -> Response:
        return JSONResponse(controller.sync_windows(request.path_params["name"]))

    async def get_project(request: Request, user: str) -> Response:
        return JSONResponse(controller.get_project(request.path_params["name"]))

    async def terminate(request: Request, user: str) -> Response:
        controller.terminate(request.path_params["name"])
        return JSONResponse({})

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/api/version", version),
            Route("/api/v1/session", session, methods=["POST"]),
            Route("/api/v1/session/userinfo", guarded(userinfo)),
            Route("/api/v1/applications", guarded(list_apps)),
            Route("/api/v1/applications/{name}", guarded(get_app)),
            Route("/api/v1/applications/{name}/resource", guarded(resource)),
            Route("/api/v1/applications/{name}/resource-tree", guarded(resource_tree)),
            Route("/api/v1/applications/{name}/sync", guarded(sync), methods=["POST"]),
            Route("/api/v1/applications/{name}/rollback", guarded(rollback), methods=["POST"]),
            Route("/api/v1/applications/{name}/operation", guarded(terminate), methods=["DELETE"]),
            Route("/api/v1/applications/{name}/syncwindows", guarded(sync_windows)),
            Route("/api/v1/projects/{name}", guarded(get_project)),
        ]
    )
