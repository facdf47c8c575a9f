"""The Kubernetes API twin: the REST surface of an API server over ``ObjectStore``.

Serves, on 127.0.0.1 with a bearer token, what kubectl (get/create/delete/logs/label/scale)
and kubernetes_asyncio (typed and custom-object clients, ``Watch``) need:

- discovery: ``/version``, ``/api``, ``/apis``, ``/api/v1``, ``/apis/<group>[/<version>]``;
- objects: list (label and field selectors, ``limit``/``continue``), get, create, replace,
  patch (merge, strategic-as-merge, JSON patch), delete (cascading, ``propagationPolicy``
  Background/Foreground/Orphan, graceful for pods: ``gracePeriodSeconds``), deletecollection, with
  ``?dryRun=All`` computed but not stored;
- ``/status`` subresources (GET/PUT/PATCH), ``pods/<name>/log`` from ``store.log_source``;
- ``?watch=true`` streams: resume from ``resourceVersion``, an ``ERROR`` event with a 410
  ``Expired`` Status when that version is older than the kept history, ``BOOKMARK`` events
  when ``allowWatchBookmarks`` is set, ``sendInitialEvents`` for watch-list clients;
- ``meta.k8s.io/v1`` Tables when the client asks for them (``kubectl get`` does);
- every error as a ``Status`` object with the real HTTP code.

``start(ctx)`` is the twin component: it serves HTTPS (its own CA, see ``tls.py``) on
``ctx.config["kube_port"]`` (or a free port, kept for the next start), requires the bearer
token of ``ctx.config["kube_token"]`` (or one generated and kept), and writes
``<state>/kubeconfig`` with the CA, the server and the token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from sandbox.kube import discovery, tables
from sandbox.kube.kubeconfig import load_or_create_token, write_kubeconfig
from sandbox.kube.patches import json_patch
from sandbox.kube.store import (
    ApiError,
    ObjectStore,
    ResourceType,
    Subscription,
    WatchEvent,
    merge_patch,
    parse_selector,
    resource_by_plural,
    selects,
)
from sandbox.kube.tls import ensure_tls
from sandbox.procs import free_port, port_free

log = logging.getLogger("sandbox.kube.api")

JSON = dict[str, Any]
PUBLIC_PATHS = frozenset({"version", "healthz", "livez", "readyz"})
# A watch without timeoutSeconds ends after this, as an API server's would (30-60 min).
DEFAULT_WATCH_SECONDS = 1800
# How long a log request waits for the source's first chunk before answering 200 anyway,
# so an error raised at once (pod not started) still becomes a Status.
LOG_FIRST_CHUNK_WAIT = 1.0
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def _json_response(body: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")), status_code=status, media_type="application/json"
    )


def _status_response(error: ApiError) -> Response:
    return _json_response(error.to_status(), error.status)


def _success_status(rt: ResourceType, obj: JSON) -> JSON:
    meta = obj.get("metadata", {})
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {
            "name": meta.get("name"),
            "group": rt.group,
            "kind": rt.plural,
            "uid": meta.get("uid"),
        },
    }


def _is_custom(rt: ResourceType) -> bool:
    """Custom resources (CRDs) behave slightly differently from built-in kinds."""
    return "." in rt.group and not rt.group.endswith("k8s.io")


def _wants_table(request: Request) -> bool:
    return "as=Table" in request.headers.get("accept", "")


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("true", "1")


def _dry_run(request: Request) -> bool:
    values = request.query_params.getlist("dryRun")
    if any(v != "All" for v in values):
        raise ApiError(400, "BadRequest", "dryRun must be 'All' when given")
    return bool(values)


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, "BadRequest", f"{name} must be an integer, got {raw!r}") from None


async def _body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return None
    content_type = request.headers.get("content-type", "application/json")
    if "protobuf" in content_type or "cbor" in content_type:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the kube twin reads JSON (or YAML) bodies only, not {content_type}: use a "
            "JSON client, e.g. `kubectl create -f FILE` instead of `kubectl create <kind> NAME`",
        )
    try:
        if "yaml" in content_type:
            return yaml.safe_load(raw)
        return json.loads(raw)
    except (ValueError, yaml.YAMLError) as exc:
        raise ApiError(
            400, "BadRequest", f"the request body is not valid JSON/YAML: {exc}"
        ) from exc


def _encode_continue(offset: int, rv: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset, "rv": rv}).encode()).decode()


def _decode_continue(token: str) -> int:
    try:
        return int(json.loads(base64.urlsafe_b64decode(token.encode()))["o"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ApiError(400, "BadRequest", "invalid continue token: start the list again") from exc


def _check_body_type(rt: ResourceType, body: Any) -> JSON:
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the request body must be a JSON object")
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if api_version is None and kind is None:
        # Tolerated like the API server does for a body that names neither.
        body = {**body, "apiVersion": rt.api_version, "kind": rt.kind}
    elif api_version != rt.api_version or kind != rt.kind:
        raise ApiError(
            400,
            "BadRequest",
            f"the object's apiVersion/kind ({api_version}/{kind}) does not match the URL "
            f"({rt.api_version}/{rt.kind})",
        )
    checked: JSON = body
    checked.setdefault("metadata", {})
    if not isinstance(checked["metadata"], dict):
        raise ApiError(400, "BadRequest", "metadata must be an object")
    return checked


def _place(rt: ResourceType, body: JSON, namespace: str | None, name: str | None = None) -> JSON:
    """Fill namespace (and name) from the URL; refuse a body that contradicts it."""
    meta = body["metadata"]
    if rt.namespaced:
        if meta.get("namespace") and meta["namespace"] != namespace:
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        meta["namespace"] = namespace
    if name is not None:
        if meta.get("name") and meta["name"] != name:
            raise ApiError(
                400,
                "BadRequest",
                "the name of the object does not match the name on the URL",
            )
        meta["name"] = name
    return body


class KubeApi:
    """Request handling; one instance per served store."""

    def __init__(
        self,
        store: ObjectStore,
        token: str,
        *,
        server_address: str = "127.0.0.1",
        bookmark_seconds: float = 10.0,
    ) -> None:
        self.store = store
        self._token = token
        self._server_address = server_address
        self._bookmark_seconds = bookmark_seconds

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.handle, methods=_METHODS)])

    # -- entry -----------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        path = request.path_params.get("path", "").strip("/")
        try:
            if path not in PUBLIC_PATHS:
                self._authenticate(request)
            return await self._route(request, [p for p in path.split("/") if p])
        except ApiError as error:
            return _status_response(error)
        except Exception as exc:
            # A bug in the twin: answer like an API server would, and keep the trace.
            log.exception("kube twin failed on %s %s", request.method, request.url.path)
            return _status_response(
                ApiError(500, "InternalError", f"internal error in the kube twin: {exc!r}")
            )

    def _authenticate(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), self._token.encode()
        ):
            raise ApiError(
                401, "Unauthorized", "Unauthorized: use the bearer token of the twin's kubeconfig"
            )

    async def _route(self, request: Request, parts: list[str]) -> Response:
        if parts in (["healthz"], ["livez"], ["readyz"]):
            return PlainTextResponse("ok")
        if len(parts) <= 2 and request.method != "GET":
            raise ApiError(405, "MethodNotAllowed", "discovery documents are read-only")
        if parts == ["version"]:
            return _json_response(discovery.VERSION)
        if parts[:2] == ["openapi", "v3"]:
            return self._openapi(parts[2:])
        if parts == ["api"]:
            return _json_response(discovery.api_versions(self._server_address))
        if parts == ["apis"]:
            return _json_response(discovery.api_group_list())
        if parts[:1] == ["api"] and len(parts) >= 2:
            return await self._group_version(request, "", parts[1], parts[2:])
        if parts[:1] == ["apis"] and len(parts) == 2:
            group_doc = discovery.api_group(parts[1])
            if group_doc is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return _json_response(group_doc)
        if parts[:1] == ["apis"] and len(parts) >= 3:
            return await self._group_version(request, parts[1], parts[2], parts[3:])
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    @staticmethod
    def _openapi(rest: list[str]) -> Response:
        doc: JSON | None = None
        if not rest:
            doc = discovery.openapi_v3_index()
        elif rest[0] == "api" and len(rest) == 2:
            doc = discovery.openapi_v3_group_version("", rest[1])
        elif rest[0] == "apis" and len(rest) == 3:
            doc = discovery.openapi_v3_group_version(rest[1], rest[2])
        if doc is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return _json_response(doc)

    async def _group_version(
        self, request: Request, group: str, version: str, rest: list[str]
    ) -> Response:
        if not rest:
            if request.method != "GET":
                raise ApiError(405, "MethodNotAllowed", "discovery documents are read-only")
            doc = discovery.api_resource_list(group, version)
            if doc is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return _json_response(doc)
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        rt = resource_by_plural(group, version, rest[0])
        if len(rest) > 3 or (namespace is not None and not rt.namespaced):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if rt.namespaced and name is not None and namespace is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if sub is not None and sub not in rt.subresources:
            raise ApiError(404, "NotFound", f"{rt.resource_label} have no subresource {sub!r}")
        return await self._dispatch(request, rt, namespace, name, sub)

    async def _dispatch(
        self,
        request: Request,
        rt: ResourceType,
        namespace: str | None,
        name: str | None,
        sub: str | None,
    ) -> Response:
        handlers: dict[tuple[bool, str | None, str], Callable[[], Awaitable[Response]]] = {
            (False, None, "GET"): lambda: self._list_or_watch(request, rt, namespace),
            (False, None, "POST"): lambda: self._create(request, rt, namespace),
            (False, None, "DELETE"): lambda: self._delete_collection(request, rt, namespace),
        }
        if name is not None:
            handlers = {
                (True, None, "GET"): lambda: self._get(request, rt, namespace, name),
                (True, None, "PUT"): lambda: self._replace(request, rt, namespace, name),
                (True, None, "PATCH"): lambda: self._patch(request, rt, namespace, name),
                (True, None, "DELETE"): lambda: self._delete(request, rt, namespace, name),
                (True, "status", "GET"): lambda: self._get(request, rt, namespace, name),
                (True, "status", "PUT"): lambda: self._replace_status(request, rt, namespace, name),
                (True, "status", "PATCH"): lambda: self._patch_status(request, rt, namespace, name),
                (True, "log", "GET"): lambda: self._log(request, rt, namespace, name),
                (True, "scale", "GET"): lambda: self._get_scale(rt, namespace, name),
                (True, "scale", "PUT"): lambda: self._write_scale(request, rt, namespace, name),
                (True, "scale", "PATCH"): lambda: self._write_scale(request, rt, namespace, name),
            }
        handler = handlers.get((name is not None, sub, request.method))
        if handler is None:
            raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported here")
        return await handler()

    # -- reads -----------------------------------------------------------------------------

    def _render(self, request: Request, rt: ResourceType, obj: JSON) -> Response:
        if _wants_table(request):
            include = request.query_params.get("includeObject", "PartialObjectMetadata")
            return _json_response(
                tables.table(
                    rt,
                    [obj],
                    resource_version=obj["metadata"].get("resourceVersion", ""),
                    include_object=include,
                )
            )
        return _json_response(obj)

    async def _get(
        self, request: Request, rt: ResourceType, namespace: str | None, name: str
    ) -> Response:
        return self._render(request, rt, self.store.get(rt.api_version, rt.kind, namespace, name))

    async def _list_or_watch(
        self, request: Request, rt: ResourceType, namespace: str | None
    ) -> Response:
        if _flag(request, "watch"):
            return await self._watch(request, rt, namespace)
        params = request.query_params
        items, rv = self.store.list_with_version(
            rt.api_version,
            rt.kind,
            namespace,
            params.get("labelSelector") or None,
            params.get("fieldSelector") or None,
        )
        offset = _decode_continue(params["continue"]) if params.get("continue") else 0
        limit = _int_param(request, "limit")
        page = items[offset:]
        token = ""
        if limit and limit > 0 and len(page) > limit:
            page = page[:limit]
            token = _encode_continue(offset + limit, rv)
        if _wants_table(request):
            return _json_response(
                tables.table(
                    rt,
                    page,
                    resource_version=str(rv),
                    include_object=params.get("includeObject", "PartialObjectMetadata"),
                    continue_token=token,
                )
            )
        metadata: JSON = {"resourceVersion": str(rv)}
        if token:
            metadata["continue"] = token
            metadata["remainingItemCount"] = len(items) - offset - len(page)
        return _json_response(
            {
                "kind": rt.list_kind,
                "apiVersion": rt.api_version,
                "metadata": metadata,
                "items": page,
            }
        )

    # -- writes ----------------------------------------------------------------------------

    async def _create(self, request: Request, rt: ResourceType, namespace: str | None) -> Response:
        body = _place(rt, _check_body_type(rt, await _body(request)), namespace)
        created = self.store.create(body, dry_run=_dry_run(request))
        return _json_response(created, 201)

    async def _replace(
        self, request: Request, rt: ResourceType, namespace: str | None, name: str
    ) -> Response:
        body = _place(rt, _check_body_type(rt, await _body(request)), namespace, name)
        if _is_custom(rt) and not body["metadata"].get("resourceVersion"):
            raise ApiError(
                422,
                "Invalid",
                f'{rt.kind}.{rt.group} "{name}" is invalid: metadata.resourceVersion: Invalid '
                "value: 0x0: must be specified for an update",
                [
                    {
                        "reason": "FieldValueInvalid",
                        "message": "must be specified for an update",
                        "field": "metadata.resourceVersion",
                    }
                ],
            )
        return _json_response(self.store.replace(body, dry_run=_dry_run(request)))

    async def _patched(
        self, request: Request, rt: ResourceType, namespace: str | None, name: str
    ) -> tuple[JSON, JSON | None]:
        """The patch as a merge patch, or (for JSON patch) the whole patched object."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        body = await _body(request)
        if content_type in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
            return body, None
        if content_type == "application/json-patch+json":
            current = self.store.get(rt.api_version, rt.kind, namespace, name)
            return {}, json_patch(current, body)
        if content_type == "application/apply-patch+yaml":
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "server-side apply is not served by the twin: use kubectl create/replace or a "
                "merge patch",
            )
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of a PATCH must be merge-patch, strategic-merge-patch or json-patch "
            f"JSON, not {content_type!r}",
        )

    async def _patch(
        self, request: Request, rt: ResourceType, namespace: str | None, name: str
    ) -> Response:
        dry_run = _dry_run(request)
        merge, whole = await self._patched(request, rt, namespace, name)
        if whole is not None:
            # JSON patch: replace with the patched object, guarded by the version it came from.
            whole.pop("status", None)
            return _json_response(self.store.replace(whole, dry_run=dry_run))
        if "status" in rt.subresources:
            merge = {k: v for k, v in merge.items() if k != "status"}
        return _json_response(
            self.store.patch(rt.api_version, rt.kind, namespace, name, merge, dry_run=dry_run)
        )

    async def _replace_status(
        self, request: Request, rt: ResourceType, namespace: str | None, name: str
    ) -> Response:
        body = _place(rt, _check_body_type(rt, await _body(request)), namespace, name)
        return self._write_status(request, rt, namespace, name, body)

    async def _patch_status(
        self, request: Request, rt: ResourceType, namespace: str | None, name: str
    ) -> Response:
        merge, whole = await self._patched(request, rt, namespace, name)
        if whole is None:
            current = self.store.get(rt.api_version, rt.kind, namespace, name)
            whole = merge_patch(current, merge)
            if not (merge.get("metadata") or {}).get("resourceVersion"):
                whole["metadata"].pop("resourceVersion", None)
        return self._write_status(request, rt, namespace, name, whole)

    def _write_status(
        self,
        request: Request,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        new: JSON,
    ) -> Response:
        current = self.store.get(rt.api_version, rt.kind, namespace, name)
        wanted = (new.get("metadata") or {}).get("resourceVersion")
        if wanted and str(wanted) != current["metadata"]["resourceVersion"]:
            self.store.patch(  # raises the same Conflict a replace would
                rt.api_version, rt.kind, namespace, name, {"metadata": {"resourceVersion": wanted}}
            )
        status = new.get("status") or {}
        if not isinstance(status, dict):
            raise ApiError(400, "BadRequest", "status must be an object")
        return _json_response(
            self.store.update_status(
                rt.api_version, rt.kind, namespace, name, status, dry_run=_dry_run(request)
            )
        )

    async def _delete(
        self, request: Request, rt: ResourceType, namespace: str | None, name: str
    ) -> Response:
        options = await _body(request) or {}
        if not isinstance(options, dict):
            raise ApiError(400, "BadRequest", "DeleteOptions must be a JSON object")
        policy = request.query_params.get("propagationPolicy") or options.get("propagationPolicy")
        preconditions = options.get("preconditions") or {}
        if preconditions:
            current = self.store.get(rt.api_version, rt.kind, namespace, name)
            for fld, key in (("uid", "uid"), ("resourceVersion", "resourceVersion")):
                if preconditions.get(fld) and preconditions[fld] != current["metadata"].get(key):
                    raise ApiError(
                        409,
                        "Conflict",
                        f"Precondition failed: {fld} in precondition: {preconditions[fld]}, "
                        f"{fld} in object meta: {current['metadata'].get(key)}",
                    )
        grace = _int_param(request, "gracePeriodSeconds")
        if grace is None and options.get("gracePeriodSeconds") is not None:
            grace = int(options["gracePeriodSeconds"])
        deleted = self.store.delete(
            rt.api_version,
            rt.kind,
            namespace,
            name,
            propagation_policy=policy,
            graceful=True,
            grace_period_seconds=grace,
            dry_run=_dry_run(request),
        )
        try:
            pending = "deletionTimestamp" in deleted["metadata"] and bool(
                self.store.get(rt.api_version, rt.kind, namespace, name)
            )
        except ApiError:
            pending = False  # gone already (a foreground owner whose dependents went at once)
        if pending or _is_custom(rt) or rt.kind in ("Pod", "Namespace"):
            # Still there (terminating, or waiting for its dependents): the object itself.
            return _json_response(deleted, 202 if pending and rt.kind != "Pod" else 200)
        return _json_response(_success_status(rt, deleted))

    async def _delete_collection(
        self, request: Request, rt: ResourceType, namespace: str | None
    ) -> Response:
        params = request.query_params
        dry_run = _dry_run(request)
        items = self.store.list(
            rt.api_version,
            rt.kind,
            namespace,
            params.get("labelSelector") or None,
            params.get("fieldSelector") or None,
        )
        deleted = []
        for item in items:
            meta = item["metadata"]
            with contextlib.suppress(ApiError):  # already gone through a cascade: fine
                deleted.append(
                    self.store.delete(
                        rt.api_version,
                        rt.kind,
                        meta.get("namespace"),
                        meta["name"],
                        propagation_policy=params.get("propagationPolicy"),
                        dry_run=dry_run,
                    )
                )
        return _json_response(
            {
                "kind": rt.list_kind,
                "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(self.store.resource_version())},
                "items": deleted,
            }
        )

    # -- scale (kubectl scale) ---------------------------------------------------------------

    def _scale_of(self, obj: JSON) -> JSON:
        meta = obj["metadata"]
        match_labels = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 1)},
            "status": {
                "replicas": (obj.get("status") or {}).get("replicas", 0),
                "selector": ",".join(f"{k}={v}" for k, v in sorted(match_labels.items())),
            },
        }

    async def _get_scale(self, rt: ResourceType, namespace: str | None, name: str) -> Response:
        return _json_response(
            self._scale_of(self.store.get(rt.api_version, rt.kind, namespace, name))
        )

    async def _write_scale(
        self, request: Request, rt: ResourceType, namespace: str | None, name: str
    ) -> Response:
        current = self.store.get(rt.api_version, rt.kind, namespace, name)
        if request.method == "PUT":
            body = await _body(request)
            wanted = body if isinstance(body, dict) else {}
        else:
            merge, whole = await self._patched(request, rt, namespace, name)
            wanted = merge_patch(self._scale_of(current), merge) if whole is None else {}
        replicas = (wanted.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise ApiError(
                422,
                "Invalid",
                "spec.replicas: Invalid value: must be a non-negative integer",
                [
                    {
                        "reason": "FieldValueInvalid",
                        "message": "must be >= 0",
                        "field": "spec.replicas",
                    }
                ],
            )
        version = (wanted.get("metadata") or {}).get("resourceVersion")
        patch: JSON = {"spec": {"replicas": replicas}}
        if version:
            patch["metadata"] = {"resourceVersion": version}
        updated = self.store.patch(
            rt.api_version, rt.kind, namespace, name, patch, dry_run=_dry_run(request)
        )
        return _json_response(self._scale_of(updated))

    # -- watch -----------------------------------------------------------------------------

    async def _watch(self, request: Request, rt: ResourceType, namespace: str | None) -> Response:
        params = request.query_params
        labels = parse_selector(params.get("labelSelector") or None)
        fields = parse_selector(params.get("fieldSelector") or None)
        rv_param = params.get("resourceVersion", "")
        send_initial = params.get("sendInitialEvents", "").lower() == "true"
        timeout = _int_param(request, "timeoutSeconds") or DEFAULT_WATCH_SECONDS
        table_format = _wants_table(request)
        initial: list[JSON] = []
        try:
            since = int(rv_param) if rv_param not in ("", "0") else None
        except ValueError:
            raise ApiError(
                400, "BadRequest", f"resourceVersion must be a number, got {rv_param!r}"
            ) from None
        try:
            current, list_rv = self.store.list_with_version(rt.api_version, rt.kind, namespace)
            current = [o for o in current if selects(o, labels, fields)]
            if since is None or send_initial:
                # "Get state and start at most recent": synthetic ADDED events, then changes.
                initial, since = current, list_rv
            subscription = self.store.subscribe(since)
        except ApiError as error:
            if error.status != 410:
                raise
            # An API server answers a too-old watch with 200 and one ERROR event.
            return StreamingResponse(_one_error(error), media_type="application/json")
        stream = _WatchStream(
            rt=rt,
            namespace=namespace,
            labels=labels,
            fields=fields,
            subscription=subscription,
            initial=initial,
            visible_from=current,
            since=since,
            send_initial_end=send_initial,
            bookmarks=_flag(request, "allowWatchBookmarks"),
            bookmark_seconds=self._bookmark_seconds,
            deadline=time.monotonic() + timeout,
            table_format=table_format,
        )
        return StreamingResponse(stream.lines(), media_type="application/json")

    # -- logs ------------------------------------------------------------------------------

    async def _log(
        self, request: Request, rt: ResourceType, namespace: str | None, name: str
    ) -> Response:
        pod = self.store.get(rt.api_version, rt.kind, namespace, name)
        container = request.query_params.get("container") or None
        names = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        if container is None and len(names) > 1:
            raise ApiError(
                400,
                "BadRequest",
                f"a container name must be specified for pod {name}, choose one of: "
                f"[{' '.join(str(n) for n in names)}]",
            )
        if container is not None and names and container not in names:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        container = container or (names[0] if names else None)
        source = self.store.log_source
        if source is None:
            # Nothing runs pods yet: an existing pod simply has no output.
            return Response(b"", media_type="text/plain")
        tail = _int_param(request, "tailLines")
        chunks = source(namespace or "", name, container, tail, _flag(request, "follow"))
        first = asyncio.ensure_future(_first_chunk(chunks))
        done, _ = await asyncio.wait({first}, timeout=LOG_FIRST_CHUNK_WAIT)
        if done:
            chunk = first.result()  # raises the source's ApiError before any byte is sent
            return StreamingResponse(_log_body(chunk, chunks, None), media_type="text/plain")
        return StreamingResponse(_log_body(None, chunks, first), media_type="text/plain")


async def _first_chunk(chunks: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None


async def _log_body(
    first: bytes | None,
    chunks: AsyncIterator[bytes],
    pending: asyncio.Future[bytes | None] | None,
) -> AsyncIterator[bytes]:
    try:
        if pending is not None:
            first = await pending
        if first is None:
            return
        yield first
        async for chunk in chunks:
            yield chunk
    finally:
        closer = getattr(chunks, "aclose", None)
        if closer is not None:
            await closer()


async def _one_error(error: ApiError) -> AsyncIterator[bytes]:
    yield _event_line("ERROR", error.to_status())


def _event_line(type_: str, obj: JSON) -> bytes:
    return json.dumps({"type": type_, "object": obj}, separators=(",", ":")).encode() + b"\n"


class _WatchStream:
    """One watch: initial events, then the store's changes filtered to one resource."""

    def __init__(
        self,
        *,
        rt: ResourceType,
        namespace: str | None,
        labels: list[Any],
        fields: list[Any],
        subscription: Subscription,
        initial: list[JSON],
        visible_from: list[JSON],
        since: int,
        send_initial_end: bool,
        bookmarks: bool,
        bookmark_seconds: float,
        deadline: float,
        table_format: bool,
    ) -> None:
        self.rt = rt
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.subscription = subscription
        self.initial = initial
        self.last_rv = since
        self.send_initial_end = send_initial_end
        self.bookmarks = bookmarks
        self.bookmark_seconds = bookmark_seconds
        self.deadline = deadline
        self.table_format = table_format
        self.columns_sent = False
        # Names currently visible through the selectors, to turn a MODIFIED that leaves or
        # enters the selection into DELETED or ADDED as the API server does. A resumed
        # watch starts from what matches now (the state at its version is not kept).
        self.visible: set[tuple[str, str]] = {self._key(o) for o in visible_from}

    @staticmethod
    def _key(obj: JSON) -> tuple[str, str]:
        meta = obj.get("metadata", {})
        return (meta.get("namespace", ""), meta.get("name", ""))

    def _line(self, type_: str, obj: JSON) -> bytes:
        if self.table_format and type_ in ("ADDED", "MODIFIED", "DELETED"):
            obj = tables.table(
                self.rt,
                [obj],
                resource_version=obj["metadata"].get("resourceVersion", ""),
                with_columns=not self.columns_sent,
            )
            self.columns_sent = True
        return _event_line(type_, obj)

    def _bookmark(self, annotations: dict[str, str] | None = None) -> bytes:
        metadata: JSON = {"resourceVersion": str(self.last_rv)}
        if annotations:
            metadata["annotations"] = annotations
        return _event_line(
            "BOOKMARK",
            {"kind": self.rt.kind, "apiVersion": self.rt.api_version, "metadata": metadata},
        )

    def _translate(self, event: WatchEvent) -> tuple[str, JSON] | None:
        obj = event.object
        if obj.get("apiVersion") != self.rt.api_version or obj.get("kind") != self.rt.kind:
            return None
        key = self._key(obj)
        if self.namespace and self.rt.namespaced and key[0] != self.namespace:
            return None
        if not self.labels and not self.fields:
            return event.type, obj
        now = selects(obj, self.labels, self.fields)
        was = key in self.visible
        if event.type == "DELETED":
            self.visible.discard(key)
            return ("DELETED", obj) if (now or was) else None
        if now:
            self.visible.add(key)
            return ("MODIFIED" if was and event.type == "MODIFIED" else "ADDED", obj)
        if was:
            self.visible.discard(key)
            return ("DELETED", obj)
        return None

    async def lines(self) -> AsyncIterator[bytes]:
        try:
            for obj in self.initial:
                yield self._line("ADDED", obj)
            if self.send_initial_end:
                yield self._bookmark({"k8s.io/initial-events-end": "true"})
            async for line in self._changes():
                yield line
        finally:
            self.subscription.close()

    async def _changes(self) -> AsyncIterator[bytes]:
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                return
            wait = min(remaining, self.bookmark_seconds) if self.bookmarks else remaining
            try:
                event = await asyncio.wait_for(self.subscription.__anext__(), timeout=wait)
            except TimeoutError:
                if self.bookmarks and time.monotonic() < self.deadline:
                    yield self._bookmark()
                continue
            except StopAsyncIteration:
                return  # the store is closing
            except ApiError as error:
                yield _event_line("ERROR", error.to_status())
                return
            self.last_rv = event.resource_version
            translated = self._translate(event)
            if translated is not None:
                yield self._line(*translated)


# -- the twin component ----------------------------------------------------------------------


def _pick_port(state_dir: Path, configured: Any) -> int:
    """The configured port, else the one used last time (kubeconfigs stay valid), else free."""
    if configured:
        return int(configured)
    remembered = state_dir / "kube" / "port"
    if remembered.exists():
        port = int(remembered.read_text().strip() or 0)
        if port and port_free(port):
            return port
    port = free_port()
    remembered.parent.mkdir(parents=True, exist_ok=True)
    remembered.write_text(str(port))
    return port


async def start(ctx: Any) -> None:
    """Twin component: serve the Kubernetes API and write ``<state>/kubeconfig``."""
    config = ctx.config
    state_dir: Path = ctx.state_dir
    port = _pick_port(state_dir, config.get("kube_port"))
    token = load_or_create_token(state_dir, config.get("kube_token"))
    api = KubeApi(
        ctx.store,
        token,
        server_address=f"127.0.0.1:{port}",
        bookmark_seconds=float(config.get("kube_bookmark_seconds", 10.0)),
    )
    tls = ensure_tls(state_dir / "kube" / "tls")
    await ctx.serve(api.app(), port, "kube", ssl_certfile=tls.cert, ssl_keyfile=tls.key)
    ctx.served["kube"] = port
    server = f"https://127.0.0.1:{port}"
    path = write_kubeconfig(state_dir / "kubeconfig", server, token, tls.ca_cert.read_bytes())
    log.info("kubernetes API twin on %s, kubeconfig %s", server, path)
