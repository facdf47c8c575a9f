"""Where a release's image came from, and whether that is good enough to ship it.

A release names an image by digest and the commit it was built from. Both are parameters,
so anyone who can start a run could name any image. An image is accepted only when

* the registry holds the exact digest (checked in ``tasks/images.py``; never overridable:
  Argo CD would sit in ImagePullBackOff until its progress deadline);
* its OCI revision label (``org.opencontainers.image.revision``) is the release's commit;
* a *completed* ``ci`` run of this service pushed that digest for that commit (found
  through the Prefect API, its persisted result naming the digest).

An operator may override the last two with a reason, which the release records. Image
signatures (cosign, notation) would be the stronger proof; they need services this
machine cannot reach.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from core.errors import InvalidInput

MIN_OVERRIDE_REASON = 10


@dataclass(frozen=True)
class CIRun:
    """What the Prefect API says about one ``ci`` run of the commit."""

    flow_run_id: str
    state: str  # the state type: COMPLETED, FAILED, RUNNING ...
    service: str
    sha: str
    event: str
    digest: str | None  # from its persisted result; None while it runs or when it failed


@dataclass(frozen=True)
class Provenance:
    accepted_by: str  # "ci run <id>" or "override: <reason>"
    overridden: bool = False


def judge(
    *,
    image: str,
    service: str,
    source_sha: str,
    digest: str,
    revision_label: str,
    ci_runs: Iterable[CIRun],
    override_reason: str | None = None,
) -> Provenance:
    """Accept the image's provenance, or raise :class:`InvalidInput` saying why not."""
    runs = list(ci_runs)
    problems: list[str] = []
    if revision_label != source_sha:
        problems.append(
            f"its revision label is {revision_label or '(none)'}, not the release's commit "
            f"{source_sha}"
        )
    proof = next(
        (
            r
            for r in runs
            if r.state == "COMPLETED"
            and r.service == service
            and r.sha == source_sha
            and r.event == "push"
            and r.digest == digest
        ),
        None,
    )
    if proof is None:
        seen = ", ".join(f"{r.flow_run_id} ({r.state}, {r.digest or 'no digest'})" for r in runs)
        problems.append(
            f"no completed ci run of {service} pushed {digest} for {source_sha}"
            + (f" (ci runs of the commit: {seen})" if seen else " (no ci run of the commit)")
        )
    if not problems and proof is not None:
        return Provenance(accepted_by=f"ci run {proof.flow_run_id}")
    reason = (override_reason or "").strip()
    if reason:
        if len(reason) < MIN_OVERRIDE_REASON:
            raise InvalidInput(
                f"provenance_override_reason {reason!r} is too short: say why this image may "
                f"ship without ci provenance (at least {MIN_OVERRIDE_REASON} characters)"
            )
        return Provenance(
            accepted_by=f"override: {reason} ({'; '.join(problems)})", overridden=True
        )
    raise InvalidInput(
        f"refusing to release {image}: {'; '.join(problems)}. Release an image the ci flow "
        "pushed, or set provenance_override_reason to record why this one may ship"
    )
