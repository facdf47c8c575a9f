"""Image references and the seed's tag scheme, as pure rules.

A reference is ``registry/namespace/name:tag@sha256:...``. Everything that reaches a command
line or a path goes through :func:`parse_reference` or the validators here first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from core.errors import InvalidInput

# The OCI distribution spec's grammar, anchored (no shell metacharacters, no "..", lowercase).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
REGISTRY_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9-]+)*(?::[0-9]{1,5})?$"
)
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def validate_repository(value: str) -> str:
    if len(value) > 255 or not REPOSITORY_RE.match(value):
        raise InvalidInput(
            f"invalid image repository {value!r}: lowercase letters, digits and . _ - "
            "separated by '/', no '..'"
        )
    return value


def validate_tag(value: str) -> str:
    if not TAG_RE.match(value):
        raise InvalidInput(
            f"invalid image tag {value!r}: letters, digits, '_', '.', '-', at most 128 characters"
        )
    return value


def validate_digest(value: str) -> str:
    if not DIGEST_RE.match(value):
        raise InvalidInput(f"invalid image digest {value!r}: expected sha256:<64 hex>")
    return value


def validate_registry(value: str) -> str:
    if not REGISTRY_RE.match(value):
        raise InvalidInput(f"invalid registry host {value!r}")
    return value


def validate_sha(value: str) -> str:
    if not SHA_RE.match(value):
        raise InvalidInput(f"invalid git sha {value!r}: expected 40 lowercase hex characters")
    return value


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        validate_registry(self.registry)
        validate_repository(self.repository)
        if self.tag is not None:
            validate_tag(self.tag)
        if self.digest is not None:
            validate_digest(self.digest)

    @property
    def name(self) -> str:
        """registry/repository, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def tagged(self) -> str:
        return f"{self.name}:{self.tag}" if self.tag else self.name

    def __str__(self) -> str:
        ref = self.tagged
        return f"{ref}@{self.digest}" if self.digest else ref

    def with_registry(self, registry: str) -> ImageRef:
        return ImageRef(registry, self.repository, self.tag, self.digest)

    def with_digest(self, digest: str) -> ImageRef:
        return ImageRef(self.registry, self.repository, self.tag, digest)


def parse_reference(text: str) -> ImageRef:
    """Parse ``registry/repo[:tag][@digest]``; the registry part is required."""
    if not text or len(text) > 512 or any(c.isspace() for c in text):
        raise InvalidInput(f"invalid image reference {text!r}")
    rest, digest = text, None
    if "@" in text:
        rest, digest = text.split("@", 1)
    if "/" not in rest:
        raise InvalidInput(f"image reference {text!r} names no registry")
    registry, path = rest.split("/", 1)
    tag: str | None = None
    if ":" in path:
        path, tag = path.rsplit(":", 1)
    return ImageRef(registry, path, tag, digest)


def release_tag(committed_at: datetime, sha: str) -> str:
    """The seed's tag: ``YYYYMMDD-<sha7>`` with the commit's committer date in UTC.

    Taking the date from the commit, not the clock, makes a rerun on another day name the
    same tag.
    """
    validate_sha(sha)
    if committed_at.tzinfo is None:
        raise InvalidInput("committer date must be timezone-aware")
    return f"{committed_at.astimezone(UTC):%Y%m%d}-{sha[:7]}"
