"""Docker images: build on the Docker Engine, push to the registry, find what is pushed.

Two protocols, one system:

* the Docker Engine API through docker-py, with the client made by prefect-docker's
  ``DockerHost`` block and the registry login done by its ``DockerRegistryCredentials``
  block (build, tag, push);
* the registry's own HTTP API v2 (``GET /v2/<repo>/manifests/<tag>``, then the config
  blob) through :class:`RegistryClient`, to answer "is this commit already pushed?"
  without pulling anything. It speaks both the Basic challenge (distribution with
  htpasswd) and the Bearer token challenge (ACR, Docker Hub, Harbor).

docker-py and the block login are synchronous or thread-bound; the tasks are async and run
them in worker threads. The password is only ever read from the block at the moment it is
sent; it is never a task parameter, never logged, and never in an exception message.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio.to_thread
import docker
import docker.errors
import httpx
from prefect import get_client, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterName,
)
from prefect.client.schemas.objects import FlowRun, State
from prefect.client.schemas.sorting import FlowRunSort
from prefect_docker import DockerHost, DockerRegistryCredentials
from pydantic import BaseModel, Field

from core.errors import (
    BuildFailed,
    ImageError,
    InvalidInput,
    PushFailed,
    RegistryAuthFailed,
    RegistryUnavailable,
)
from core.images import ImageRef, parse_reference, validate_digest, validate_sha
from core.provenance import CIRun, judge
from core.settings import get_settings
from tasks.logs import run_logger

REVISION_LABEL = "org.opencontainers.image.revision"
SOURCE_LABEL = "org.opencontainers.image.source"
CREATED_LABEL = "org.opencontainers.image.created"

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_INDEX_TYPES = MANIFEST_TYPES[2:]
_USERINFO = re.compile(r"(?<=://)[^/@]+@")
_AUTH_WORDS = ("unauthorized", "authentication required", "denied", "401", "403")


class BuiltImage(BaseModel):
    """A local image built for one commit (not yet pushed)."""

    ref: str = Field(description="registry/repository:tag")
    tag: str
    image_id: str = Field(description="Local image id (sha256:...) on the Docker host.")
    revision: str = Field(description="The git sha in the revision label.")


class PushedImage(BaseModel):
    """An image in the registry, named by tag and pinned by digest."""

    ref: str = Field(description="registry/repository:tag@sha256:...")
    tag: str
    digest: str
    revision: str = Field(description="The git sha in the image's revision label.")


# --- blocks and clients ------------------------------------------------------------------


def retry_on(*transient: type[BaseException]) -> Callable[[Any, Any, State], bool]:
    """A ``retry_condition_fn``: retry only errors a second try may fix (never refused
    credentials or bad input)."""

    def should_retry(_task: Any, _run: Any, state: State) -> bool:
        return isinstance(state.data, transient)

    return should_retry


async def load_docker_host(block_name: str | None = None) -> DockerHost:
    """The ``DockerHost`` block named in settings, or one from the environment if unset."""
    name = block_name or get_settings().docker_host_block
    try:
        return await DockerHost.aload(name)
    except ValueError:
        # No block saved: fall back to DOCKER_HOST / the default socket, like the docker CLI.
        run_logger("robotics_cd.images").info(
            "no DockerHost block %r; using the Docker host from the environment", name
        )
        return DockerHost()


async def load_registry_credentials(block_name: str | None = None) -> DockerRegistryCredentials:
    name = block_name or get_settings().registry_block
    try:
        return await DockerRegistryCredentials.aload(name)
    except ValueError as exc:
        raise ImageError(
            f"no DockerRegistryCredentials block named {name!r}; create it in the Prefect UI "
            "(Blocks → Docker Registry Credentials) or with `robotics-cd sandbox up`"
        ) from exc


def registry_base_url(registry: str) -> str:
    """``http://`` for loopback registries (as dockerd treats them), ``https://`` otherwise.

    An explicit scheme in ``registry`` wins.
    """
    if registry.startswith(("http://", "https://")):
        return registry.rstrip("/")
    host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry.strip("[]")
    return f"{'http' if _is_loopback(host) else 'https'}://{registry}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a DNS name, not an address
        return False


def registry_host(registry: str) -> str:
    """The host[:port] part of a registry URL or host."""
    return registry.split("://", 1)[-1].rstrip("/")


def _check_same_registry(image: ImageRef, credentials: DockerRegistryCredentials) -> None:
    if registry_host(credentials.registry_url) != image.registry:
        raise InvalidInput(
            f"the registry credentials are for {registry_host(credentials.registry_url)}, "
            f"but the image goes to {image.registry}; fix push_registry in services.yaml or "
            "the block's registry_url"
        )


@asynccontextmanager
async def registry_client(
    ref: ImageRef,
    credentials_block: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[RegistryClient]:
    """The registry API client for ``ref``'s registry, from the ``DockerRegistryCredentials``
    block (refused when the block is for another registry)."""
    credentials = await load_registry_credentials(credentials_block)
    _check_same_registry(ref, credentials)
    async with RegistryClient(
        registry=credentials.registry_url,
        username=credentials.username,
        password=credentials.password.get_secret_value(),
        transport=transport,
    ) as client:
        yield client


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class RegistryClient:
    """A small client of the OCI distribution API (read side), with Basic or Bearer auth.

    Pass ``transport`` (e.g. ``httpx.MockTransport``) to test edge cases without a registry.
    """

    def __init__(
        self,
        *,
        registry: str,
        username: str,
        password: str,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.registry = registry_host(registry)
        self._auth = (username, password)
        self._client = httpx.AsyncClient(
            base_url=registry_base_url(registry), transport=transport, timeout=timeout
        )
        self._headers: dict[str, str] = {}

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def _authorize(self, challenge: str) -> None:
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic":
            token = base64.b64encode(":".join(self._auth).encode()).decode()
            self._headers = {"Authorization": f"Basic {token}"}
            return
        if scheme == "bearer" and "realm" in params:
            query = {k: v for k, v in params.items() if k in ("service", "scope")}
            resp = await self._client.get(params["realm"], params=query, auth=self._auth)
            if resp.status_code in (401, 403):
                raise RegistryAuthFailed(
                    self.registry, f"token endpoint answered {resp.status_code}"
                )
            resp.raise_for_status()
            body = resp.json()
            token = body.get("token") or body.get("access_token")
            if not token:
                raise RegistryUnavailable(f"registry {self.registry}: token endpoint gave no token")
            self._headers = {"Authorization": f"Bearer {token}"}
            return
        raise RegistryUnavailable(
            f"registry {self.registry}: unsupported auth challenge {scheme!r}"
        )

    async def _get(self, path: str, *, accept: Iterable[str] = ()) -> httpx.Response:
        headers = {"Accept": ", ".join(accept)} if accept else {}
        return await self._request("GET", path, headers=headers)

    async def _request(
        self, method: str, path: str, *, headers: dict[str, str], content: bytes | None = None
    ) -> httpx.Response:
        try:
            resp = await self._client.request(
                method, path, headers={**headers, **self._headers}, content=content
            )
            if resp.status_code == 401 and "WWW-Authenticate" in resp.headers:
                # Answer the challenge (first call, an expired token, or a push scope) and
                # retry once.
                await self._authorize(resp.headers["WWW-Authenticate"])
                resp = await self._client.request(
                    method, path, headers={**headers, **self._headers}, content=content
                )
        except httpx.HTTPError as exc:
            raise RegistryUnavailable(
                f"registry {self.registry} did not answer ({type(exc).__name__}); check that it "
                "runs and that push_registry in services.yaml names it"
            ) from exc
        if resp.status_code in (401, 403):
            raise RegistryAuthFailed(self.registry, f"HTTP {resp.status_code} on {path}")
        if resp.status_code >= 500:
            raise RegistryUnavailable(
                f"registry {self.registry} answered {resp.status_code} on {path}"
            )
        return resp

    async def manifest(self, repository: str, reference: str) -> tuple[str, dict[str, Any]] | None:
        """(digest, manifest) of ``repository:reference``, or None if the registry has none."""
        resp = await self._get(f"/v2/{repository}/manifests/{reference}", accept=MANIFEST_TYPES)
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise RegistryUnavailable(
                f"registry {self.registry} answered {resp.status_code} for {repository}:{reference}"
            )
        digest = resp.headers.get("Docker-Content-Digest", "")
        if not digest:
            digest = "sha256:" + hashlib.sha256(resp.content).hexdigest()
        return validate_digest(digest), dict(resp.json())

    async def manifest_raw(self, repository: str, reference: str) -> tuple[str, bytes, str] | None:
        """(digest, bytes, media type) of a manifest exactly as stored, or None (404)."""
        resp = await self._get(f"/v2/{repository}/manifests/{reference}", accept=MANIFEST_TYPES)
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise RegistryUnavailable(
                f"registry {self.registry} answered {resp.status_code} for {repository}:{reference}"
            )
        digest = "sha256:" + hashlib.sha256(resp.content).hexdigest()
        media_type = resp.headers.get("Content-Type", "").split(";")[0] or str(
            resp.json().get("mediaType", MANIFEST_TYPES[0])
        )
        return digest, resp.content, media_type

    async def put_manifest(self, repository: str, tag: str, body: bytes, media_type: str) -> str:
        """Tag a manifest (the same bytes, so the same digest) as ``repository:tag``."""
        resp = await self._request(
            "PUT",
            f"/v2/{repository}/manifests/{tag}",
            headers={"Content-Type": media_type},
            content=body,
        )
        if resp.status_code not in (200, 201):
            raise PushFailed(
                f"registry {self.registry} refused tag {repository}:{tag} "
                f"(HTTP {resp.status_code}: {resp.text[:200]})"
            )
        return validate_digest(
            resp.headers.get("Docker-Content-Digest")
            or "sha256:" + hashlib.sha256(body).hexdigest()
        )

    async def blob_json(self, repository: str, digest: str) -> dict[str, Any]:
        resp = await self._get(f"/v2/{repository}/blobs/{digest}")
        if resp.status_code != 200:
            raise RegistryUnavailable(
                f"registry {self.registry} answered {resp.status_code} for blob {digest}"
            )
        return dict(resp.json())

    async def labels(self, repository: str, manifest: Mapping[str, Any]) -> dict[str, str]:
        """The image config labels behind a manifest (first entry of an index)."""
        if manifest.get("mediaType") in _INDEX_TYPES or "manifests" in manifest:
            entries = manifest.get("manifests") or []
            if not entries:
                return {}
            found = await self.manifest(repository, entries[0]["digest"])
            if found is None:
                return {}
            manifest = found[1]
        return image_labels(await self.blob_json(repository, manifest["config"]["digest"]))


# --- find --------------------------------------------------------------------------------


@task(
    name="find-pushed-image",
    task_run_name="find {repository}:{tag}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_on(RegistryUnavailable),
)
async def find_pushed_image(
    registry: str,
    repository: str,
    tag: str,
    sha: str,
    *,
    credentials_block: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> PushedImage | None:
    """Is commit ``sha`` already pushed as ``registry/repository:tag``?

    Reads the tag's manifest and the ``org.opencontainers.image.revision`` label of its
    config blob over the registry's HTTP API v2 (nothing is pulled). A rerun of the CI flow
    uses it to build and push nothing.

    Args:
        registry: host[:port] of the push registry.
        repository: image repository path (``robotics-serving/api-gateway``).
        tag: the release tag (``YYYYMMDD-sha7``).
        sha: the full git sha the image must carry in its revision label.
        credentials_block: name of the ``DockerRegistryCredentials`` block (default: settings).
        transport: an httpx transport for tests.

    Returns:
        :class:`PushedImage` (reference with digest) or None when the tag does not exist.

    Raises:
        RegistryAuthFailed: the registry refused the credentials (registry named).
        RegistryUnavailable: the registry did not answer.
        PushFailed: the tag exists but carries another revision (never overwritten).
    """
    ref = ImageRef(registry, repository, tag)
    validate_sha(sha)
    async with registry_client(ref, credentials_block, transport) as client:
        found = await client.manifest(repository, tag)
        if found is None:
            run_logger("robotics_cd.images").info("%s is not in the registry yet", ref.tagged)
            return None
        digest, manifest = found
        revision = (await client.labels(repository, manifest)).get(REVISION_LABEL, "")
    if revision != sha:
        raise PushFailed(
            f"{ref.tagged} already exists with revision {revision or '(none)'} instead of {sha}; "
            "refusing to overwrite a pushed tag: delete it in the registry if it is wrong"
        )
    pushed = PushedImage(ref=str(ref.with_digest(digest)), tag=tag, digest=digest, revision=sha)
    run_logger("robotics_cd.images").info("%s is already pushed: %s", ref.tagged, pushed.ref)
    return pushed


@task(
    name="find-tagged-image",
    task_run_name="find {repository}:{tag}",
    retries=2,
    retry_delay_seconds=5,
)
async def find_tagged_image(
    registry: str,
    repository: str,
    tag: str,
    *,
    credentials_block: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> PushedImage | None:
    """Is ``registry/repository:tag`` in the registry, whichever commit it was built from?

    The train flow asks this of a tag a person chose, before submitting a job that would
    otherwise sit in ImagePullBackOff. Reads the manifest and the revision label over the
    registry's HTTP API v2 (nothing is pulled).

    Returns:
        :class:`PushedImage` (reference with digest, revision from the label, maybe empty)
        or None when the tag does not exist.

    Raises:
        RegistryAuthFailed: the registry refused the credentials (registry named).
        RegistryUnavailable: the registry did not answer.
    """
    ref = ImageRef(registry, repository, tag)
    async with registry_client(ref, credentials_block, transport) as client:
        found = await client.manifest(repository, tag)
        if found is None:
            run_logger("robotics_cd.images").info("%s is not in the registry", ref.tagged)
            return None
        digest, manifest = found
        revision = (await client.labels(repository, manifest)).get(REVISION_LABEL, "")
    return PushedImage(ref=str(ref.with_digest(digest)), tag=tag, digest=digest, revision=revision)


# --- before a release writes anything: the image, its provenance, the way back -------------


async def _ci_runs(service: str, sha: str) -> list[CIRun]:
    """The ``ci`` runs of ``service`` at ``sha``, each with the digest its result names,
    the last one to end first (a rebuild of the same commit pushes the same digest: the
    record names the latest run that proved it)."""
    async with get_client() as client:
        runs: list[FlowRun] = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["ci"])),
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"ci-{service}-{sha[:7]}"])),
            sort=FlowRunSort.END_TIME_DESC,
        )
    found: list[CIRun] = []
    for run in runs:
        params = run.parameters or {}
        if params.get("service") != service or params.get("sha") != sha:
            continue
        state = run.state
        digest: str | None = None
        if state is not None and state.is_completed():
            try:
                result = await state.aresult(raise_on_failure=False)  # type: ignore[call-overload]
            except Exception as exc:  # an unreadable result is no proof; the warning says why
                run_logger("robotics_cd.images").warning(
                    "cannot read the result of ci run %s: %s", run.id, exc
                )
                result = None
            value = getattr(result, "digest", None)
            digest = value if isinstance(value, str) else None
        found.append(
            CIRun(
                flow_run_id=str(run.id),
                state=state.type.value if state is not None else "UNKNOWN",
                service=service,
                sha=sha,
                event=str(params.get("event", "")),
                digest=digest,
            )
        )
    return found


async def _ci_runs_settled(service: str, sha: str, digest: str, timeout: float) -> list[CIRun]:
    """The ci runs of the commit, waiting (bounded) while one still runs without a proof.

    The ci flow hands off to the release as its last step, so the run that pushed the image
    is usually still finishing when the release starts.
    """
    deadline = anyio.current_time() + timeout
    while True:
        runs = await _ci_runs(service, sha)
        proved = any(r.state == "COMPLETED" and r.digest == digest for r in runs)
        running = [r for r in runs if r.state in ("SCHEDULED", "PENDING", "RUNNING")]
        if proved or not running or anyio.current_time() >= deadline:
            return runs
        await anyio.sleep(2.0)


@task(
    name="verify-release-image",
    task_run_name="verify {image}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_on(RegistryUnavailable),
)
async def verify_release_image(
    image: str,
    *,
    service: str,
    source_sha: str,
    override_reason: str | None = None,
    ci_wait_seconds: float = 300.0,
    credentials_block: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> str:
    """Before a release writes anything: is the exact digest in the registry, and did a
    completed ``ci`` run of this service push it for ``source_sha``?

    Returns:
        How the provenance was accepted (``ci run <id>`` or ``override: <reason> (...)``),
        for the release record.

    Raises:
        InvalidInput: the digest is not in the registry (image and registry named), or its
            provenance is not shown and no override reason was given.
        RegistryAuthFailed, RegistryUnavailable: the registry could not be asked.
    """
    ref = parse_reference(image)
    if ref.digest is None:
        raise InvalidInput(f"image {image!r} must carry a digest (name:tag@sha256:...)")
    validate_sha(source_sha)
    async with registry_client(ref, credentials_block, transport) as client:
        found = await client.manifest(ref.repository, ref.digest)
        if found is None:
            raise InvalidInput(
                f"image {image} is not in registry {ref.registry}: it has no manifest "
                f"{ref.digest} in {ref.repository}; release an image the ci flow pushed"
            )
        revision = (await client.labels(ref.repository, found[1])).get(REVISION_LABEL, "")
    runs = await _ci_runs_settled(service, source_sha, ref.digest, ci_wait_seconds)
    verdict = judge(
        image=image,
        service=service,
        source_sha=source_sha,
        digest=ref.digest,
        revision_label=revision,
        ci_runs=runs,
        override_reason=override_reason,
    )
    log = run_logger("robotics_cd.images")
    if verdict.overridden:
        log.warning("provenance of %s OVERRIDDEN: %s", image, verdict.accepted_by)
    else:
        log.info("%s is in %s; provenance: %s", image, ref.registry, verdict.accepted_by)
    return f"provenance of {ref.digest}: {verdict.accepted_by}"


@task(
    name="keep-rollback-target",
    task_run_name="keep rollback-{service}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_on(RegistryUnavailable),
)
async def keep_rollback_target(
    service: str,
    stable_image: str | None,
    *,
    credentials_block: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> str | None:
    """Before a canary starts: is the stable image a rollback returns to still in the
    registry? Tag it ``rollback-<service>`` so a retention policy (ACR's, for one) keeps it.

    ``stable_image`` is what production's overlay runs (its registry may be the pull
    endpoint; the repository is looked up in the push registry of the credentials block).

    Returns:
        ``registry/repository:rollback-<service>@digest``, or None when production runs no
        image of ours yet (nothing to return to).

    Raises:
        ImageError: the stable image is gone from the registry (a rollback could not start
            its pods); the canary does not start.
    """
    if not stable_image:
        run_logger("robotics_cd.images").info(
            "production runs no %s image yet: no rollback target to keep", service
        )
        return None
    ref = parse_reference(stable_image)
    reference = ref.digest or ref.tag
    if reference is None:
        raise InvalidInput(f"stable image {stable_image!r} has neither tag nor digest")
    credentials = await load_registry_credentials(credentials_block)
    registry = registry_host(credentials.registry_url)
    tag = f"rollback-{service}"
    async with RegistryClient(
        registry=credentials.registry_url,
        username=credentials.username,
        password=credentials.password.get_secret_value(),
        transport=transport,
    ) as client:
        found = await client.manifest_raw(ref.repository, reference)
        if found is None:
            raise ImageError(
                f"the stable image {stable_image} that a rollback of {service} returns to is not "
                f"in registry {registry} any more ({ref.repository}@{reference}); restore it "
                "(or release a known-good image first) before starting a canary"
            )
        digest, body, media_type = found
        if ref.digest and digest != ref.digest:
            raise ImageError(
                f"registry {registry} serves {digest} for {stable_image}, not its pinned digest"
            )
        await client.put_manifest(ref.repository, tag, body, media_type)
    kept = f"{registry}/{ref.repository}:{tag}@{digest}"
    run_logger("robotics_cd.images").info("rollback target kept: %s", kept)
    return kept


# --- build -------------------------------------------------------------------------------


def _inside(root: Path, relative: str, what: str) -> Path:
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise InvalidInput(f"{what} {relative!r} leaves the repository")
    return path


def _stream_lines(
    chunks: Iterable[Mapping[str, Any]], log: Callable[[str], None], tail: deque[str]
) -> dict[str, Any]:
    """Log a docker-py JSON stream line by line; return the last ``aux`` and error seen."""
    result: dict[str, Any] = {}
    for chunk in chunks:
        if "error" in chunk:
            result["error"] = str(chunk["error"]).strip()
            tail.append(result["error"])
            log(result["error"])
        text = chunk.get("stream")
        if isinstance(text, str):
            for line in text.splitlines():
                if line.strip():
                    tail.append(line)
                    log(line)
        if "aux" in chunk and isinstance(chunk["aux"], dict):
            result.update(chunk["aux"])
    return result


def _build_sync(
    client: docker.DockerClient,
    *,
    context: Path,
    dockerfile: Path,
    ref: ImageRef,
    buildargs: dict[str, str],
    labels: dict[str, str],
    log: Callable[[str], None],
) -> str:
    tail: deque[str] = deque(maxlen=30)
    try:
        stream = client.api.build(
            path=str(context),
            dockerfile=str(dockerfile),
            tag=ref.tagged,
            buildargs=buildargs,
            labels=labels,
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
        )
        outcome = _stream_lines(stream, log, tail)
    except docker.errors.DockerException as exc:
        raise BuildFailed(f"building {ref.tagged} failed: {exc}") from exc
    if "error" in outcome:
        raise BuildFailed(f"building {ref.tagged} failed:\n" + "\n".join(tail))
    try:
        return str(client.images.get(ref.tagged).id)
    except docker.errors.ImageNotFound as exc:
        raise BuildFailed(f"the build reported success but {ref.tagged} is missing") from exc


@task(name="build-image", task_run_name="build {repository}:{tag}")
async def build_image(
    repo_path: str,
    *,
    registry: str,
    repository: str,
    tag: str,
    sha: str,
    committed_at: datetime,
    source: str,
    context: str = ".",
    dockerfile: str = "Dockerfile",
    build_args: Mapping[str, str] | None = None,
    docker_host_block: str | None = None,
) -> BuiltImage:
    """Build ``registry/repository:tag`` from a checkout with the Docker Engine API.

    Build args ``BUILD_DATE`` and ``GIT_SHA`` and the OCI labels ``revision``, ``source``
    and ``created`` are set. Both dates are the commit's committer date (UTC), not the
    clock: the same commit builds the same image config, and the tag names the same day.

    Args:
        repo_path: the checkout (``Checkout.path``).
        registry, repository, tag: where the image will be pushed.
        sha: full git sha (revision label, ``GIT_SHA``).
        committed_at: committer date (``BUILD_DATE``, created label).
        source: the repository URL for the source label (credentials are stripped).
        context, dockerfile: paths relative to the repository root.
        build_args: extra build args (e.g. ``BASE``); ``BUILD_DATE``/``GIT_SHA`` win.
        docker_host_block: name of the ``DockerHost`` block (default: settings).

    Raises:
        InvalidInput: a bad reference, or a context/Dockerfile outside the repository.
        BuildFailed: the build failed (the message holds the tail of its output).
    """
    ref = ImageRef(registry, repository, tag)
    validate_sha(sha)
    root = Path(repo_path).resolve()
    context_dir = _inside(root, context, "build context")
    dockerfile_path = _inside(root, dockerfile, "Dockerfile")
    if not dockerfile_path.is_file():
        raise InvalidInput(f"Dockerfile {dockerfile!r} not found in the checkout")
    created = committed_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    args = {**(build_args or {}), "BUILD_DATE": created, "GIT_SHA": sha}
    labels = {
        REVISION_LABEL: sha,
        SOURCE_LABEL: _USERINFO.sub("", source),
        CREATED_LABEL: created,
    }
    logger = run_logger("robotics_cd.images")
    host = await load_docker_host(docker_host_block)

    def build() -> str:
        with host.get_client() as client:
            return _build_sync(
                client,
                context=context_dir,
                dockerfile=dockerfile_path,
                ref=ref,
                buildargs=args,
                labels=labels,
                log=lambda line: logger.info("[build] %s", line),
            )

    image_id = await anyio.to_thread.run_sync(build)
    logger.info("built %s (%s)", ref.tagged, image_id)
    return BuiltImage(ref=ref.tagged, tag=tag, image_id=image_id, revision=sha)


# --- push --------------------------------------------------------------------------------


def _is_auth_error(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in _AUTH_WORDS)


def _push_sync(client: docker.DockerClient, ref: ImageRef, log: Callable[[str], None]) -> str:
    tail: deque[str] = deque(maxlen=20)
    digest = ""
    try:
        for chunk in client.api.push(ref.name, tag=ref.tag, stream=True, decode=True):
            if "error" in chunk:
                message = str(chunk["error"]).strip()
                if _is_auth_error(message):
                    raise RegistryAuthFailed(ref.registry, "push refused")
                raise PushFailed(f"pushing {ref.tagged} failed: {message}")
            status = chunk.get("status")
            if status and chunk.get("id") is None:
                tail.append(str(status))
                log(str(status))
            digest = (chunk.get("aux") or {}).get("Digest", digest)
    except docker.errors.APIError as exc:
        if _is_auth_error(str(exc.explanation or "")):
            raise RegistryAuthFailed(ref.registry, "push refused") from exc
        raise PushFailed(f"pushing {ref.tagged} failed: {exc.explanation}") from exc
    if not digest:
        raise PushFailed(f"pushing {ref.tagged} returned no digest:\n" + "\n".join(tail))
    return validate_digest(str(digest))


@task(
    name="push-image",
    task_run_name="push {image}",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_on(RegistryUnavailable, PushFailed),
)
async def push_image(
    image: str,
    *,
    credentials_block: str | None = None,
    docker_host_block: str | None = None,
) -> PushedImage:
    """Push a built image (``registry/repository:tag``) with a ``DockerRegistryCredentials`` block.

    Args:
        image: the tagged reference from :func:`build_image`.
        credentials_block: name of the ``DockerRegistryCredentials`` block (default: settings).
        docker_host_block: name of the ``DockerHost`` block (default: settings).

    Returns:
        :class:`PushedImage` whose ``ref`` is ``registry/repository:tag@sha256:...``.

    Raises:
        RegistryAuthFailed: the registry refused the credentials (registry named; the
            password is in no message).
        PushFailed: any other push failure.
    """
    ref = parse_reference(image)
    if ref.tag is None or ref.digest is not None:
        raise InvalidInput(f"push_image wants registry/repository:tag, got {image!r}")
    credentials = await load_registry_credentials(credentials_block)
    _check_same_registry(ref, credentials)
    logger = run_logger("robotics_cd.images")
    host = await load_docker_host(docker_host_block)
    client = await anyio.to_thread.run_sync(host.get_client)
    try:
        try:
            await credentials.login(client)
        except docker.errors.APIError as exc:
            if _is_auth_error(str(exc.explanation or "")):
                raise RegistryAuthFailed(ref.registry, "login refused") from exc
            raise PushFailed(f"login to {ref.registry} failed: {exc.explanation}") from exc
        digest = await anyio.to_thread.run_sync(
            lambda: _push_sync(client, ref, lambda line: logger.info("[push] %s", line))
        )
        # The revision is what build_image labelled; read back so the result stands alone.
        labels = await anyio.to_thread.run_sync(lambda: client.images.get(ref.tagged).labels or {})
    finally:
        await anyio.to_thread.run_sync(client.close)
    pushed = PushedImage(
        ref=str(ref.with_digest(digest)),
        tag=ref.tag,
        digest=digest,
        revision=str(labels.get(REVISION_LABEL, "")),
    )
    logger.info("pushed %s", pushed.ref)
    return pushed


def image_labels(config: Mapping[str, Any]) -> dict[str, str]:
    """Labels of an image config blob (``config.Labels``); for callers reading blobs."""
    return dict((config.get("config") or {}).get("Labels") or {})
