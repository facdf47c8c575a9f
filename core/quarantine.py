"""Quarantined images: digests a rollback took out of production, kept out until lifted.

One file per service in the manifests repo, ``quarantine/<service>.yaml`` (no I/O here:
``tasks/quarantine.py`` reads and commits it):

    service: api-gateway
    quarantined:
    - digest: sha256:…
      image: registry/robotics-serving/api-gateway:20261127-abc1234@sha256:…
      rollback_commit: <the manifests commit that rolled it back>
      release: <the release (flow run) that was rolled back>
      reason: "rolled back: error_ratio …"
      at: 2026-12-07T03:12:44+00:00
    lifted:
    - digest: sha256:…
      rollback_commit: …
      reason: "…"           why it was lifted
      by: alice
      at: …

A release of a quarantined digest is refused before staging, naming the rollback.
"""

from __future__ import annotations

from datetime import datetime

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import InvalidInput

HEADER = (
    "# Image digests of this service that a rollback took out of production. A release of one\n"
    "# is refused before staging until `robotics-cd quarantine lift SERVICE DIGEST --reason ...`.\n"
)


class QuarantineEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    digest: str = Field(description="sha256:… of the image that was rolled back.")
    image: str = Field(default="", description="The full reference it was released as.")
    rollback_commit: str = Field(description="The manifests commit that rolled it back.")
    release: str = Field(default="", description="The release (flow run) rolled back.")
    reason: str = Field(default="", description="Why it was rolled back.")
    at: datetime


class LiftedEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    digest: str
    rollback_commit: str
    reason: str = Field(description="Why the quarantine was lifted.")
    by: str = Field(description="Who lifted it.")
    at: datetime


class QuarantineFile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    service: str
    quarantined: list[QuarantineEntry] = []
    lifted: list[LiftedEntry] = []

    def find(self, digest: str) -> QuarantineEntry | None:
        return next((e for e in self.quarantined if e.digest == digest), None)


def path_of(service: str) -> str:
    return f"quarantine/{service}.yaml"


def check_digest(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise InvalidInput(f"{digest!r} is not an image digest (sha256:<64 hex>)")
    return digest


def parse(text: str | None, service: str) -> QuarantineFile:
    if not text or not text.strip():
        return QuarantineFile(service=service)
    try:
        data = yaml.safe_load(text) or {}
        found = QuarantineFile.model_validate({"service": service, **data})
    except (yaml.YAMLError, ValidationError, TypeError) as exc:
        raise InvalidInput(
            f"{path_of(service)} in the manifests repo is not readable: {exc}"
        ) from exc
    if found.service != service:
        raise InvalidInput(f"{path_of(service)} names service {found.service!r}")
    return found


def render(qfile: QuarantineFile) -> str:
    body = qfile.model_dump(mode="json")
    return HEADER + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def add(qfile: QuarantineFile, entry: QuarantineEntry) -> QuarantineFile:
    """``qfile`` with ``entry``; unchanged when the digest is already quarantined."""
    check_digest(entry.digest)
    if qfile.find(entry.digest) is not None:
        return qfile
    return qfile.model_copy(update={"quarantined": [*qfile.quarantined, entry]})


def lift(
    qfile: QuarantineFile, digest: str, *, by: str, reason: str, at: datetime
) -> QuarantineFile:
    """``qfile`` without ``digest``, the lift recorded; InvalidInput when it is not there."""
    check_digest(digest)
    entry = qfile.find(digest)
    if entry is None:
        raise InvalidInput(f"{digest} is not quarantined for {qfile.service}")
    if not reason.strip():
        raise InvalidInput("lifting a quarantine needs a reason (--reason)")
    if not by.strip():
        raise InvalidInput("lifting a quarantine needs a name (--by)")
    record = LiftedEntry(
        digest=digest, rollback_commit=entry.rollback_commit, reason=reason, by=by, at=at
    )
    return qfile.model_copy(
        update={
            "quarantined": [e for e in qfile.quarantined if e.digest != digest],
            "lifted": [*qfile.lifted, record],
        }
    )


def refusal(qfile: QuarantineFile, digest: str) -> str | None:
    """The message refusing a release of ``digest``, or None when it is not quarantined."""
    entry = qfile.find(digest)
    if entry is None:
        return None
    release = f" (release {entry.release})" if entry.release else ""
    return (
        f"{qfile.service} image {digest} is quarantined: rollback commit "
        f"{entry.rollback_commit[:12]}{release} took it out of production at "
        f"{entry.at:%Y-%m-%d %H:%M:%S} UTC ({entry.reason.strip() or 'no reason recorded'}); "
        f"build a fix, or lift it: robotics-cd quarantine lift {qfile.service} {digest} "
        "--reason ..."
    )
