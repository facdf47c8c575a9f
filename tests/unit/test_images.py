"""Image rules (tag scheme, reference parsing) and the registry HTTP client's edge cases."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest

from core.errors import InvalidInput, RegistryAuthFailed, RegistryUnavailable
from core.images import ImageRef, parse_reference, release_tag
from tasks.images import RegistryClient, registry_base_url

SHA = "0123456789abcdef0123456789abcdef01234567"
DIGEST = "sha256:" + "a" * 64


# --- tag scheme --------------------------------------------------------------------------


def test_the_tag_is_the_committer_day_in_utc_and_the_short_sha() -> None:
    assert release_tag(datetime(2026, 11, 27, 9, 30, tzinfo=UTC), SHA) == "20261127-0123456"


def test_the_tag_day_is_taken_in_utc_not_the_committers_zone() -> None:
    late_evening_in_new_york = datetime(2026, 11, 27, 21, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert release_tag(late_evening_in_new_york, SHA) == "20261128-0123456"


def test_a_naive_date_or_a_short_sha_is_refused() -> None:
    with pytest.raises(InvalidInput, match="timezone"):
        release_tag(datetime(2026, 11, 27), SHA)
    with pytest.raises(InvalidInput, match="sha"):
        release_tag(datetime(2026, 11, 27, tzinfo=UTC), "0123456")


# --- references --------------------------------------------------------------------------


def test_a_full_reference_parses_and_prints_back() -> None:
    text = f"registry.example.com:5000/robotics-serving/api-gateway:20261127-0123456@{DIGEST}"
    ref = parse_reference(text)
    assert ref == ImageRef(
        "registry.example.com:5000", "robotics-serving/api-gateway", "20261127-0123456", DIGEST
    )
    assert str(ref) == text
    assert ref.tagged == text.split("@")[0]
    assert str(ref.with_registry("registry-vpc.example.com").with_digest(DIGEST)).startswith(
        "registry-vpc.example.com/robotics-serving/api-gateway:"
    )


@pytest.mark.parametrize(
    "text",
    [
        "registry.example.com/../etc/passwd:1",
        "registry.example.com/robotics/../../x:1",
        "registry.example.com/Robotics-Serving/api:1",
        "registry.example.com/robotics-serving/API:1",
        "registry.example.com/robotics;rm -rf /:1",
        "registry.example.com/robotics/api:1;reboot",
        "registry.example.com/robotics/$(id):1",
        "registry.example.com/robotics/`id`:1",
        "registry.example.com/robotics/api:1|sh",
        "registry.example.com/robotics/api:1&&x",
        "registry.example.com/robotics/api:a b",
        "registry.example.com/robotics/api:" + "t" * 129,
        "registry.example.com/robotics/api@sha256:short",
        "api-gateway:1",
        "",
    ],
)
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_reference(text)


def test_a_tag_of_exactly_128_characters_is_fine() -> None:
    assert parse_reference("r.example.com/robotics/api:" + "t" * 128).tag == "t" * 128


def test_registry_urls_are_http_only_on_loopback() -> None:
    assert registry_base_url("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert registry_base_url("localhost:5000") == "http://localhost:5000"
    assert registry_base_url("registry.example.com") == "https://registry.example.com"
    assert registry_base_url("10.0.0.8:5000") == "https://10.0.0.8:5000"
    assert registry_base_url("http://mirror.local:5000/") == "http://mirror.local:5000"


# --- the registry client (MockTransport at the HTTP boundary) -----------------------------

CONFIG_DIGEST = "sha256:" + "c" * 64
MANIFEST = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
    "config": {"digest": CONFIG_DIGEST},
    "layers": [],
}
CONFIG = {"config": {"Labels": {"org.opencontainers.image.revision": SHA}}}


def basic_registry(password: str = "s3cret") -> httpx.MockTransport:
    expected = "Basic " + base64.b64encode(f"ci:{password}".encode()).decode()

    def handle(request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization") != expected:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="registry"'})
        if request.url.path == "/v2/robotics/api/manifests/20261127-0123456":
            return httpx.Response(200, json=MANIFEST, headers={"Docker-Content-Digest": DIGEST})
        if request.url.path == f"/v2/robotics/api/blobs/{CONFIG_DIGEST}":
            return httpx.Response(200, json=CONFIG)
        return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})

    return httpx.MockTransport(handle)


async def test_basic_auth_manifest_and_labels() -> None:
    async with RegistryClient(
        registry="127.0.0.1:5000", username="ci", password="s3cret", transport=basic_registry()
    ) as client:
        found = await client.manifest("robotics/api", "20261127-0123456")
        assert found is not None
        digest, manifest = found
        assert digest == DIGEST
        labels = await client.labels("robotics/api", manifest)
        assert labels["org.opencontainers.image.revision"] == SHA
        assert await client.manifest("robotics/api", "missing") is None


async def test_refused_credentials_name_the_registry_and_never_the_password() -> None:
    async with RegistryClient(
        registry="127.0.0.1:5000",
        username="ci",
        password="wrong-pw-123",
        transport=basic_registry(),
    ) as client:
        with pytest.raises(RegistryAuthFailed) as caught:
            await client.manifest("robotics/api", "20261127-0123456")
    assert "127.0.0.1:5000" in str(caught.value)
    assert "wrong-pw-123" not in str(caught.value)


async def test_bearer_token_challenge_is_answered() -> None:
    seen_scopes: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example.com":
            seen_scopes.append(request.url.params["scope"])
            assert request.headers["Authorization"].startswith("Basic ")
            return httpx.Response(200, json={"token": "tok"})
        if request.headers.get("Authorization") != "Bearer tok":
            return httpx.Response(
                401,
                headers={
                    "WWW-Authenticate": 'Bearer realm="https://auth.example.com/token",'
                    'service="registry.example.com",scope="repository:robotics/api:pull"'
                },
            )
        return httpx.Response(200, json=MANIFEST, headers={"Docker-Content-Digest": DIGEST})

    async with RegistryClient(
        registry="registry.example.com",
        username="ci",
        password="pw",
        transport=httpx.MockTransport(handle),
    ) as client:
        found = await client.manifest("robotics/api", "t1")
    assert found is not None and found[0] == DIGEST
    assert seen_scopes == ["repository:robotics/api:pull"]


async def test_an_index_is_followed_to_its_first_manifest() -> None:
    index_digest = "sha256:" + "d" * 64

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith(f"/manifests/{index_digest}"):
            return httpx.Response(
                200, json=MANIFEST, headers={"Docker-Content-Digest": index_digest}
            )
        if "/manifests/" in path:
            body = {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [{"digest": index_digest}],
            }
            return httpx.Response(200, content=json.dumps(body).encode())
        return httpx.Response(200, json=CONFIG)

    async with RegistryClient(
        registry="127.0.0.1:5000", username="u", password="p", transport=httpx.MockTransport(handle)
    ) as client:
        found = await client.manifest("robotics/api", "t")
        assert found is not None
        digest, manifest = found
        assert digest.startswith("sha256:")  # computed from the body when the header is absent
        assert (await client.labels("robotics/api", manifest))[
            "org.opencontainers.image.revision"
        ] == SHA


async def test_a_registry_that_does_not_answer_is_unavailable_not_missing() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with RegistryClient(
        registry="127.0.0.1:9", username="u", password="p", transport=httpx.MockTransport(refuse)
    ) as client:
        with pytest.raises(RegistryUnavailable, match=r"127\.0\.0\.1:9"):
            await client.manifest("robotics/api", "t")

    async with RegistryClient(
        registry="127.0.0.1:9",
        username="u",
        password="p",
        transport=httpx.MockTransport(lambda r: httpx.Response(503)),
    ) as client:
        with pytest.raises(RegistryUnavailable, match="503"):
            await client.manifest("robotics/api", "t")
