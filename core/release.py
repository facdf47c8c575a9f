"""What a release is, the rules it follows, and what it leaves behind: pure, no I/O.

The release flow (``flows/release.py``) keeps only the order of steps; every decision it
takes is a function here, tested on plain data:

- :func:`plan_release`: the parameter checks before any side effect;
- :func:`lease_ttl`, :func:`lease_is_free`: how long the production lease lasts, who may take it;
- :class:`LeaseRecord`, :func:`encode_lease`, :func:`decode_lease`: the lease's record (the
  format is documented in ``docs/leases.md`` and in ``tasks.gitops.lease``);
- :func:`resume_point`: where a re-executed release carries on, from its lease record;
- :func:`read_command`: what an operator's command (abort, promote now) means;
- :func:`ending`: the outcome, event, headline and final state of each way a release ends;
- :func:`commits_to_revert`, :func:`rollback_plan`: what a rollback must revert, and whether
  it may.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.analysis import IntervalVerdict
from core.approval import ApprovalDecision
from core.catalog import CanaryPolicy, Catalog
from core.errors import InvalidInput
from core.images import SHA_RE, parse_reference, validate_sha
from core.ordering import MeasuredWindow

LEASE_FORMAT = 2


class ReleasePlan(BaseModel):
    """The checked parameters of one release."""

    model_config = ConfigDict(frozen=True)
    service: str
    image: str = Field(description="As pushed: push-registry/repo:tag@digest.")
    pull_image: str = Field(description="As the cluster pulls it: pull-registry/repo:tag@digest.")
    tag: str
    digest: str
    source_sha: str
    github: str


class StepOutcome(BaseModel):
    promoted: bool
    reason: str


class ReleaseRecord(BaseModel):
    """The audit trail: source commit → image → manifest commits → Argo CD revisions →
    analyses → decision → outcome."""

    service: str
    flow_run_id: str
    source_sha: str
    image: str
    digest: str
    started_at: datetime
    staging_commit: str = ""
    staging_revision: str = ""
    smoke: list[dict[str, Any]] = []
    staging_metrics: IntervalVerdict | None = None
    decision: ApprovalDecision | None = None
    production_commits: list[str] = []
    production_revisions: list[str] = []
    steps: list[tuple[int, datetime]] = []
    analyses: list[IntervalVerdict] = []
    watch: list[IntervalVerdict] = []
    rollback_commit: str = ""
    rollback_verification: list[dict[str, Any]] = []
    measured: list[MeasuredWindow] = []  # which pods each verification window measured
    notes: list[str] = []
    outcome: str = "in progress"

    @classmethod
    def start(cls, plan: ReleasePlan, flow_run_id: str) -> ReleaseRecord:
        return cls(
            service=plan.service,
            flow_run_id=flow_run_id,
            source_sha=plan.source_sha,
            image=plan.image,
            digest=plan.digest,
            started_at=datetime.now(UTC),
        )


# --- plan checks ----------------------------------------------------------------------------


def plan_release(catalog: Catalog, service: str, image: str, source_sha: str) -> ReleasePlan:
    """Check the parameters before any side effect."""
    svc = catalog.service(service)
    ref = parse_reference(image)
    if not ref.tag or not ref.digest:
        raise InvalidInput(f"image {image!r} must carry a tag and a digest (name:tag@sha256:...)")
    if ref.repository != svc.image:
        raise InvalidInput(f"image {ref.repository!r} is not {service}'s repository {svc.image!r}")
    validate_sha(source_sha)
    for env in ("staging", "production"):
        if env not in svc.environments:
            raise InvalidInput(f"service {service!r} has no {env} environment in the catalog")
    pull = ref.with_registry(catalog.defaults.pull_registry)
    return ReleasePlan(
        service=service,
        image=str(ref),
        pull_image=str(pull),
        tag=ref.tag,
        digest=ref.digest,
        source_sha=source_sha,
        github=svc.github,
    )


# --- the production lease -----------------------------------------------------------------


LEASE_TTL_FLOOR = timedelta(seconds=90)


def lease_ttl(policy: CanaryPolicy) -> timedelta:
    """How long one renewal of the production lease lasts: three analysis intervals, and
    never under 90 s (longer than any single bounded call that blocks the flow: a git push
    a metrics query). The release renews it from its own progress (every poll of an interval,
    every poll of a sync), so a live release never loses it, and one that stopped making
    progress loses it within one TTL: that is how the reconciler tells a dead release from
    a live one, whatever its heartbeat thread says."""
    return max(policy.interval * 3, LEASE_TTL_FLOOR)


def renew_period(ttl: timedelta) -> timedelta:
    """How often a live holder renews: three chances per TTL."""
    return ttl / 3


class StepKind(StrEnum):
    CANARY = "canary"
    PROMOTE = "promote"
    ROLLBACK = "rollback"


class LeaseStep(BaseModel):
    """The last production step a release wrote under its lease."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    kind: StepKind
    weight: int | None = Field(default=None, description="Canary weight, for a canary step.")
    commit: str = Field(description="The manifests commit that wrote this step.")


class TrainRef(BaseModel):
    """The release train a lease was taken for, with every lease it took in the same push."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    name: str = Field(description="The train's name (its bundle).")
    leases: list[str] = Field(description="Every lease of the train, in dependency order.")


class LeaseRecord(BaseModel):
    """What the lease ref's commit says (format 2; format 1 had holder and times only)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    version: int = LEASE_FORMAT
    holder: str = Field(description="Flow run id of the release (or rollback) holding it.")
    taken_at: datetime
    expires_at: datetime
    before: str | None = Field(
        default=None,
        description="The manifests branch head when the lease was first taken: production "
        "as it was before this release. Never recomputed.",
    )
    commits: list[str] = Field(
        default_factory=list,
        description="The release's own commits on the branch, oldest first, appended by "
        "each fenced write (a rollback commit is recorded as the step, not here).",
    )
    step: LeaseStep | None = Field(default=None, description="The last step written.")
    release: str | None = Field(
        default=None,
        description="The flow run whose commits these are, when a rollback run took the "
        "lease over from it (None: the holder's own).",
    )
    host: str | None = Field(
        default=None, description="Host name of the process holding it (for liveness)."
    )
    pid: int | None = Field(default=None, description="Its process id on that host.")
    blocked: str | None = Field(
        default=None,
        description="Why production is blocked: a restore that could not be verified. A "
        "blocked lease never expires; only an operator clears it, with a reason.",
    )
    train: TrainRef | None = Field(
        default=None,
        description="Set when a release train holds it: the train and all its leases, taken "
        "and moved together in one atomic push.",
    )
    nonce: str = ""

    def expired(self, now: datetime) -> bool:
        return self.blocked is None and now >= self.expires_at

    @property
    def owner(self) -> str:
        """The release whose commits the record lists."""
        return self.release or self.holder

    @property
    def rolled_back(self) -> bool:
        return self.step is not None and self.step.kind == StepKind.ROLLBACK

    def renewed(self, now: datetime, ttl: timedelta, nonce: str) -> LeaseRecord:
        return self.model_copy(update={"expires_at": now + ttl, "nonce": nonce})

    def with_step(self, step: LeaseStep, nonce: str) -> LeaseRecord:
        """The record after a fenced write of ``step``: a forward commit joins ``commits``;
        a rollback commit is the step only (it is never itself a commit to revert)."""
        forward = step.kind != StepKind.ROLLBACK and step.commit not in self.commits
        commits = [*self.commits, step.commit] if forward else self.commits
        return self.model_copy(update={"commits": commits, "step": step, "nonce": nonce})


def describe_holder(record: LeaseRecord) -> str:
    """Who holds a lease, for a person: a release, or a release train and its services."""
    if record.train is not None:
        services = ", ".join(n.removesuffix("-production") for n in record.train.leases)
        return f"release train {record.train.name} (run {record.holder}; {services})"
    return f"release {record.holder}"


def encode_lease(name: str, record: LeaseRecord) -> str:
    """The lease commit's message: ``lease <name>``, a blank line, the record as JSON."""
    return f"lease {name}\n\n{record.model_dump_json()}\n"


def decode_lease(message: str) -> LeaseRecord:
    """The record in a lease commit's message (format 1 or 2); InvalidInput if unreadable."""
    _, _, body = message.partition("\n\n")
    try:
        data = json.loads(body.strip() or message.strip())
        record = LeaseRecord.model_validate(data)
    except (ValueError, ValidationError) as exc:
        raise InvalidInput(f"not a lease record: {exc}") from exc
    for sha in [record.before or "0" * 40, *record.commits]:
        if not SHA_RE.match(sha):
            raise InvalidInput(f"lease record holds {sha!r}, not a commit id")
    return record


def lease_is_free(record: LeaseRecord | None, me: str, now: datetime) -> bool:
    """May ``me`` take the lease: nobody holds it, ``me`` does already, or it expired. A
    blocked lease is free for nobody."""
    if record is not None and record.blocked:
        return False
    return record is None or record.holder == me or record.expired(now)


def new_lease(
    holder: str,
    now: datetime,
    ttl: timedelta,
    head: str,
    current: LeaseRecord | None,
    nonce: str,
) -> LeaseRecord:
    """The record ``holder`` writes when it takes the lease.

    Its own lease (a re-executed run) is renewed with everything it recorded: ``before``,
    the commits and the step stay. A free or expired lease starts a new record whose
    ``before`` is the branch head now.
    """
    if current is not None and current.holder == holder:
        return current.renewed(now, ttl, nonce)
    return LeaseRecord(holder=holder, taken_at=now, expires_at=now + ttl, before=head, nonce=nonce)


# --- re-execution ---------------------------------------------------------------------------


class Resume(StrEnum):
    START = "start"  # nothing written to production yet: canary from its first step
    CANARY = "canary"  # carry on the canary at the recorded weight
    WATCH = "watch"  # promoted: carry on with the post-release watch
    ROLLED_BACK = "rolled-back"  # the rollback commit is written: sync, verify, end


class ResumePoint(BaseModel):
    model_config = ConfigDict(frozen=True)
    at: Resume
    step_index: int = Field(default=0, description="Index in the policy's steps (canary).")
    commits: list[str] = Field(default_factory=list, description="Already written.")

    @property
    def resumed(self) -> bool:
        return bool(self.commits)


def resume_point(record: LeaseRecord, policy: CanaryPolicy) -> ResumePoint:
    """Where a release carries on, from its lease record: never back to step 1 once
    production runs a later step of it."""
    step = record.step
    if step is None or not record.commits:
        return ResumePoint(at=Resume.START)
    if step.kind == StepKind.ROLLBACK:
        return ResumePoint(at=Resume.ROLLED_BACK, commits=record.commits)
    if step.kind == StepKind.PROMOTE:
        return ResumePoint(at=Resume.WATCH, commits=record.commits)
    weight = step.weight or policy.steps[0]
    # The first policy step at or above the recorded weight (a policy edited mid-release
    # still never sends the canary back below what production already runs).
    index = next((i for i, w in enumerate(policy.steps) if w >= weight), len(policy.steps) - 1)
    return ResumePoint(at=Resume.CANARY, step_index=index, commits=record.commits)


# --- operator commands ----------------------------------------------------------------------


class CommandAction(StrEnum):
    ABORT = "abort"
    PROMOTE = "promote"
    IGNORE = "ignore"


class Command(BaseModel):
    model_config = ConfigDict(frozen=True)
    action: CommandAction
    reason: str


def read_command(command: dict[str, Any]) -> Command:
    """What an operator's command during the canary means (``robotics-cd abort/promote``)."""
    who, why = command.get("sender", "?"), command.get("reason", "")
    name = command.get("command")
    if name == "abort":
        return Command(action=CommandAction.ABORT, reason=f"aborted by {who}: {why}")
    if name == "promote":
        return Command(action=CommandAction.PROMOTE, reason=f"promoted now by {who}: {why}")
    return Command(action=CommandAction.IGNORE, reason=f"unknown command {name!r} from {who}")


# --- endings --------------------------------------------------------------------------------


class EndingKind(StrEnum):
    PROMOTED = "promoted"
    REJECTED = "rejected"
    SUPERSEDED = "superseded"
    ROLLED_BACK = "rolled-back"
    ROLLBACK_FAILED = "rollback-failed"


class Ending(BaseModel):
    """How a release ends: the record's outcome, the event, the chat headline, the state."""

    model_config = ConfigDict(frozen=True)
    outcome: str
    event: Literal["promoted", "rejected", "rolled-back", "rollback-failed"]
    headline: str
    state: Literal["completed", "failed"]
    state_name: str | None
    message: str


def ending(
    kind: EndingKind,
    plan: ReleasePlan,
    *,
    why: str = "",
    decision: ApprovalDecision | None = None,
) -> Ending:
    name = f"{plan.service}:{plan.tag}"
    if kind == EndingKind.PROMOTED:
        return Ending(
            outcome="promoted",
            event="promoted",
            headline=f"{name} promoted to production",
            state="completed",
            state_name="Promoted",
            message=f"promoted {name}",
        )
    if kind == EndingKind.REJECTED:
        if decision is None:
            raise ValueError("a rejected ending needs the decision")
        return Ending(
            outcome=decision.outcome(),
            event="rejected",
            headline=f"{name} {decision.outcome()}",
            state="completed",
            state_name="Rejected",
            message=decision.outcome(),
        )
    if kind == EndingKind.SUPERSEDED:
        return Ending(
            outcome=f"superseded: {why}",
            event="rejected",
            headline=f"{name} superseded: {why}",
            state="failed",
            state_name="Superseded",
            message=f"superseded: {why}",
        )
    if kind == EndingKind.ROLLBACK_FAILED:
        return Ending(
            outcome=f"rollback failed: {why}",
            event="rollback-failed",
            headline=f"{name}: ROLLBACK FAILED, production is blocked: {why}",
            state="failed",
            state_name="RollbackFailed",
            message=f"rollback failed, production blocked until an operator clears it: {why}",
        )
    return Ending(
        outcome=f"rolled back: {why}",
        event="rolled-back",
        headline=f"{name} rolled back: {why}",
        state="failed",
        state_name=None,
        message=f"rolled back: {why}",
    )


# --- rollback -------------------------------------------------------------------------------


def commits_to_revert(recorded: list[str], already_reverted: set[str]) -> list[str]:
    """The release's own commits a rollback reverts, newest first: every recorded commit
    not yet reverted (duplicates once). Nobody else's commit is ever in this list."""
    for sha in recorded:
        if not SHA_RE.match(sha):
            raise InvalidInput(f"{sha!r} is not a commit id")
    ordered = list(dict.fromkeys(recorded))
    return [sha for sha in reversed(ordered) if sha not in already_reverted]


class RollbackPlan(BaseModel):
    model_config = ConfigDict(frozen=True)
    revert: list[str] = Field(description="Commits to revert in one commit, newest first.")
    refused: str = Field(default="", description="Why nothing may be reverted (empty: go).")


def rollback_plan(
    release: str,
    *,
    me: str,
    holder: str | None,
    holder_expired: bool,
    recorded: list[str],
    already_reverted: set[str],
    later_releases: list[str],
) -> RollbackPlan:
    """What the rollback of ``release`` (run by ``me``) may do.

    - the production lease is held by another live run: refuse, production is its now;
    - another release committed to the overlay after this release's last commit: refuse,
      a late rollback must never overwrite a newer release;
    - otherwise revert the release's own commits not yet reverted (none: nothing to do).
    """
    if holder is not None and holder not in (release, me) and not holder_expired:
        return RollbackPlan(
            revert=[],
            refused=f"production's lease is held by {holder}, not by release {release}: "
            "a newer release owns production now; nothing rolled back",
        )
    newer = [r for r in dict.fromkeys(later_releases) if r not in (release, me)]
    if newer:
        return RollbackPlan(
            revert=[],
            refused=f"release {newer[-1]} changed production after release {release}: "
            "reverting the older release would overwrite it; nothing rolled back",
        )
    return RollbackPlan(revert=commits_to_revert(recorded, already_reverted))
