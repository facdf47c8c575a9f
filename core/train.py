"""Release trains: several services promoted, or rolled back, as one. Pure, no I/O.

The ``release-train`` flow keeps only the order of steps; every rule it follows is here,
tested on plain data:

- :func:`parse_bundle`: a bundle file (``bundles/<name>.yaml`` in the manifests repo, or the
  CLI's ``--service name=image`` list) checked before anything is written;
- :func:`plan_train`: the bundle against the catalog: every service known, every image the
  service's own, the dependency order (no cycle), the train's steps;
- :func:`train_steps`, :func:`weights_at`: the train's step list, and at train step *i* each
  service's weight: the largest of its own steps not above the train's step;
- :class:`TrainAnalysis`: lockstep judgement. Every service is judged on the same window; one
  service past its failure or inconclusive limit rolls the whole train back; the train moves
  on only when every service has passed the step.

Bundle file::

    # bundles/fleet-v2.yaml
    reason: the planner's v2 API and the gateway that calls it
    steps: [20, 50, 100]          # optional: the train's own steps
    services:
      api-gateway: 127.0.0.1:5000/robotics-serving/api-gateway:20261207-abc1234@sha256:...
      fleet-planner:
        image: 127.0.0.1:5000/robotics-fleet/fleet-planner:20261207-def5678@sha256:...
        source_sha: <40-hex commit the image was built from>   # optional
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import PurePosixPath
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.analysis import Decision, IntervalVerdict, Verdict
from core.approval import ApprovalDecision
from core.catalog import NAME_RE, Catalog
from core.dependencies import dependency_order, describe_cycle, find_cycle
from core.errors import InvalidInput
from core.images import parse_reference, validate_sha
from core.release import ReleaseRecord

BUNDLES_DIR = "bundles"


# --- the bundle -----------------------------------------------------------------------------


class BundleService(BaseModel):
    """One service of a bundle: the image to release (``registry/repo:tag@digest``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    image: str = Field(
        description="registry/repository:tag[@sha256:...] as pushed by CI; a train is started "
        "with the digest the registry holds for the tag (pinned before anything is written)."
    )
    source_sha: str | None = Field(
        default=None, description="The commit the image was built from (40 hex), if known."
    )

    @field_validator("image")
    @classmethod
    def _pinned(cls, value: str) -> str:
        ref = parse_reference(value)
        if not ref.tag:
            raise ValueError(f"image {value!r} must carry a tag (name:tag[@sha256:...])")
        return value

    @field_validator("source_sha")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        return validate_sha(value) if value is not None else None


Steps = list[Annotated[int, Field(ge=1, le=100)]]


class Bundle(BaseModel):
    """Services released together: what a bundle file or the CLI asks for."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="The train's name (the bundle file's name without .yaml).")
    services: dict[str, BundleService] = Field(min_length=1)
    reason: str = Field(default="", description="Why these services go together.")
    steps: Steps | None = Field(default=None, description="The train's own canary steps.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a DNS-1123 label (lowercase letters, digits, '-')")
        return value


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{where}: {message}" if where else message


def bundle_name(path: str) -> str:
    """``bundles/fleet-v2.yaml`` → ``fleet-v2``; InvalidInput for a path outside ``bundles/``."""
    p = PurePosixPath(path)
    if len(p.parts) != 2 or p.parts[0] != BUNDLES_DIR or p.suffix not in (".yaml", ".yml"):
        raise InvalidInput(f"{path!r} is not a bundle file (bundles/<name>.yaml)")
    return p.stem


def is_bundle_path(path: str) -> bool:
    try:
        bundle_name(path)
    except InvalidInput:
        return False
    return True


def parse_bundle(text: str, *, file: str) -> Bundle:
    """A bundle file's content, checked; InvalidInput naming the file and the field."""
    name = bundle_name(file)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict):
        raise InvalidInput(f"{file}: must be a mapping with 'services' (service: image)")
    if "name" in raw:
        raise InvalidInput(f"{file}: name: the bundle's name is its file name ({name})")
    services: dict[str, Any] = {
        str(svc): ({"image": entry} if isinstance(entry, str) else entry)
        for svc, entry in raw["services"].items()
    }
    try:
        return Bundle.model_validate({**raw, "name": name, "services": services})
    except ValidationError as exc:
        raise InvalidInput(f"{file}: {_first_error(exc)}") from None


def bundle_from_args(name: str, pairs: list[str], reason: str) -> Bundle:
    """The CLI's ``--service api-gateway=<image>`` list as a bundle."""
    services: dict[str, dict[str, str]] = {}
    for pair in pairs:
        svc, sep, image = pair.partition("=")
        if not sep or not svc or not image:
            raise InvalidInput(f"--service {pair!r}: expected SERVICE=IMAGE")
        if svc in services:
            raise InvalidInput(f"--service {svc} is given twice")
        services[svc] = {"image": image}
    try:
        return Bundle.model_validate({"name": name, "services": services, "reason": reason})
    except ValidationError as exc:
        raise InvalidInput(_first_error(exc)) from None


# --- the plan -------------------------------------------------------------------------------


class TrainService(BaseModel):
    """One service of a planned train, resolved against the catalog."""

    model_config = ConfigDict(frozen=True)
    service: str
    image: str = Field(description="As pushed: push-registry/repo:tag@digest.")
    pull_image: str = Field(description="As the cluster pulls it.")
    tag: str
    digest: str
    source_sha: str | None
    steps: list[int] = Field(description="The service's own canary steps.")
    weights: list[int] = Field(description="Its weight at each train step.")
    canary_replicas: int
    failure_limit: int
    inconclusive_limit: int


class TrainPlan(BaseModel):
    """A checked train: the services in dependency order, the steps, the window."""

    model_config = ConfigDict(frozen=True)
    name: str
    reason: str
    services: list[TrainService] = Field(description="In dependency order.")
    steps: list[int] = Field(description="The train's steps (percent).")
    interval: timedelta = Field(description="The one analysis window every service shares.")
    analyses_per_step: int
    post_release_watch: timedelta
    approvers: list[str] = Field(description="Who may approve the bundle.")

    @property
    def order(self) -> list[str]:
        return [s.service for s in self.services]

    @property
    def rollback_order(self) -> list[str]:
        return list(reversed(self.order))

    def service(self, name: str) -> TrainService:
        for svc in self.services:
            if svc.service == name:
                return svc
        raise InvalidInput(f"{name!r} is not a service of train {self.name}")

    def weights(self, index: int) -> dict[str, int]:
        """Each service's weight at train step ``index``."""
        return {s.service: s.weights[index] for s in self.services}


def _check_steps(steps: list[int], what: str) -> list[int]:
    if not steps or steps != sorted(set(steps)) or steps[-1] != 100:
        raise InvalidInput(f"{what} {steps} must rise strictly and end at 100")
    return steps


def train_steps(own: Mapping[str, list[int]], steps: list[int] | None = None) -> list[int]:
    """The train's step list: given, or every service's steps merged.

    At each train step every service must have a step of its own at or below it (it must be
    on its canary from the first train step on), so a train step below some service's first
    step is refused, and the default starts at the largest first step.
    """
    for svc, mine in own.items():
        _check_steps(list(mine), f"{svc}'s steps")
    floor = max(mine[0] for mine in own.values())
    if steps is not None:
        _check_steps(list(steps), "the train's steps")
        if steps[0] < floor:
            low = sorted(s for s, mine in own.items() if mine[0] > steps[0])
            raise InvalidInput(
                f"the train's first step {steps[0]}% is below the first step of "
                f"{', '.join(low)} ({floor}%): every service needs a step of its own at "
                "each train step"
            )
        return list(steps)
    return sorted({w for mine in own.values() for w in mine if w >= floor})


def weight_at(own: list[int], train_step: int) -> int:
    """The largest of a service's own steps that does not exceed the train's step."""
    below = [w for w in own if w <= train_step]
    if not below:
        raise InvalidInput(f"no step of {own} is at or below the train's step {train_step}%")
    return max(below)


def weights_at(own: Mapping[str, list[int]], train: list[int]) -> dict[str, list[int]]:
    """Each service's weight at every train step."""
    return {svc: [weight_at(list(mine), step) for step in train] for svc, mine in own.items()}


def plan_train(catalog: Catalog, bundle: Bundle) -> TrainPlan:
    """Check a bundle against the catalog before any side effect: every service known and
    releasable, every image the service's own repository, no dependency cycle."""
    unknown = sorted(s for s in bundle.services if s not in catalog.services)
    if unknown:
        known = ", ".join(sorted(catalog.services)) or "none"
        raise InvalidInput(
            f"train {bundle.name}: {', '.join(unknown)} not in the catalog (it has: {known}); "
            "nothing written"
        )
    graph = catalog.dependency_graph()
    cycle = find_cycle(graph)
    if cycle:
        raise InvalidInput(
            f"train {bundle.name}: dependency cycle {describe_cycle(cycle)}; nothing written"
        )
    order = dependency_order(graph, bundle.services)
    policies = {name: catalog.canary_policy(name) for name in order}
    own = {name: list(policies[name].steps) for name in order}
    steps = train_steps(own, bundle.steps)
    weights = weights_at(own, steps)
    services: list[TrainService] = []
    approvers: list[str] = []
    for name in order:
        svc = catalog.service(name)
        entry = bundle.services[name]
        ref = parse_reference(entry.image)
        if ref.repository != svc.image:
            raise InvalidInput(
                f"train {bundle.name}: image {ref.repository!r} is not {name}'s repository "
                f"{svc.image!r}"
            )
        for env in ("staging", "production"):
            if env not in svc.environments:
                raise InvalidInput(f"service {name!r} has no {env} environment in the catalog")
        services.append(
            TrainService(
                service=name,
                image=str(ref),
                pull_image=str(ref.with_registry(catalog.defaults.pull_registry)),
                tag=ref.tag or "",
                digest=ref.digest or "",
                source_sha=entry.source_sha,
                steps=own[name],
                weights=weights[name],
                canary_replicas=policies[name].canary_replicas,
                failure_limit=policies[name].failure_limit,
                inconclusive_limit=policies[name].inconclusive_limit,
            )
        )
        approvers += [a for a in svc.approvers if a not in approvers]
    return TrainPlan(
        name=bundle.name,
        reason=bundle.reason,
        services=services,
        steps=steps,
        interval=max(p.interval for p in policies.values()),
        analyses_per_step=max(p.analyses_per_step for p in policies.values()),
        post_release_watch=max(p.post_release_watch for p in policies.values()),
        approvers=approvers,
    )


# --- lockstep judgement ---------------------------------------------------------------------


class ServiceCount(BaseModel):
    model_config = ConfigDict(extra="forbid")
    failure_limit: int
    inconclusive_limit: int
    passes_in_step: int = 0
    failures: int = 0
    inconclusives: int = 0


class TrainAnalysis(BaseModel):
    """The train's canary over intervals. Each interval every service is judged on the same
    window (``record`` takes all of them at once); one service past its own failure or
    inconclusive limit rolls every service back; the train moves to its next step only when
    every service has ``analyses_per_step`` passing intervals at this step.

    Bounded: it decides within :attr:`max_intervals` (every step's passes plus the largest
    failure and inconclusive allowance of any service, plus one).
    """

    model_config = ConfigDict(extra="forbid")
    steps: list[int]
    analyses_per_step: int
    services: dict[str, ServiceCount]
    step_index: int = 0
    history: list[dict[str, IntervalVerdict]] = Field(default_factory=list)
    decision: Decision | None = None
    reason: str = ""
    failed: list[str] = Field(default_factory=list, description="Who made it roll back.")

    @classmethod
    def start(cls, plan: TrainPlan) -> TrainAnalysis:
        return cls(
            steps=list(plan.steps),
            analyses_per_step=plan.analyses_per_step,
            services={
                s.service: ServiceCount(
                    failure_limit=s.failure_limit, inconclusive_limit=s.inconclusive_limit
                )
                for s in plan.services
            },
        )

    @property
    def finished(self) -> bool:
        return self.decision in (Decision.PROMOTE, Decision.ROLLBACK)

    @property
    def max_intervals(self) -> int:
        slack = max(c.failure_limit + c.inconclusive_limit for c in self.services.values())
        return len(self.steps) * self.analyses_per_step + slack + 1

    def record(self, verdicts: Mapping[str, IntervalVerdict]) -> Decision:
        """Count one window's verdicts (one per service, the same window) and decide."""
        if self.finished:
            raise ValueError(f"analysis already ended: {self.decision} ({self.reason})")
        missing = sorted(set(self.services) - set(verdicts))
        if missing:
            raise InvalidInput(f"no verdict for {', '.join(missing)} in this window")
        ends = {v.end for v in verdicts.values()}
        if len(ends) != 1:
            raise InvalidInput("every service of a train is judged on the same window")
        self.history.append(dict(verdicts))
        reasons: list[str] = []
        for name in sorted(self.services):
            count, verdict = self.services[name], verdicts[name]
            if verdict.verdict == Verdict.FAIL:
                count.failures += 1
                if count.failures > count.failure_limit:
                    self.failed.append(name)
                    reasons.append(
                        f"{name}: {count.failures} failed intervals > failure limit "
                        f"{count.failure_limit}: {verdict.reason}"
                    )
            elif verdict.verdict == Verdict.INCONCLUSIVE:
                count.inconclusives += 1
                if count.inconclusives > count.inconclusive_limit:
                    self.failed.append(name)
                    reasons.append(
                        f"{name}: {count.inconclusives} inconclusive intervals > inconclusive "
                        f"limit {count.inconclusive_limit}: {verdict.reason}"
                    )
            else:
                count.passes_in_step += 1
        at = self.steps[self.step_index]
        if reasons:
            return self._set(Decision.ROLLBACK, f"train step {at}%: " + "; ".join(reasons))
        waiting = sorted(
            n for n, c in self.services.items() if c.passes_in_step < self.analyses_per_step
        )
        if waiting:
            return self._set(
                Decision.CONTINUE,
                f"train step {at}%: waiting for {', '.join(waiting)} to pass "
                f"{self.analyses_per_step} interval(s)",
            )
        if self.step_index + 1 >= len(self.steps):
            return self._set(Decision.PROMOTE, f"every service passed every step up to {at}%")
        self.step_index += 1
        for count in self.services.values():
            count.passes_in_step = 0
        return self._set(
            Decision.NEXT_STEP,
            f"every service passed {at}%; next train step {self.steps[self.step_index]}%",
        )

    def _set(self, decision: Decision, reason: str) -> Decision:
        self.decision, self.reason = decision, reason
        return decision


def all_or_nothing(outcomes: Mapping[str, bool]) -> tuple[bool, list[str]]:
    """The train's verdict from each service's (passed?) outcome: it goes on only when every
    service passed; otherwise every service rolls back, and these are the ones that failed."""
    failed = sorted(s for s, ok in outcomes.items() if not ok)
    return (not failed and bool(outcomes)), failed


# --- the record -----------------------------------------------------------------------------


class TrainRecord(BaseModel):
    """The train's one record: each service's own release record (staging, analyses), and
    what the train did as one: the bundle smoke test, the approval, its production commits,
    its steps, the rollback."""

    name: str
    flow_run_id: str
    reason: str
    order: list[str] = Field(description="The services in dependency order.")
    started_at: datetime
    services: dict[str, ReleaseRecord] = Field(default_factory=dict)
    bundle_smoke: list[dict[str, Any]] = Field(default_factory=list)
    decision: ApprovalDecision | None = None
    production_commits: list[str] = Field(default_factory=list)
    steps: list[tuple[int, dict[str, int], datetime]] = Field(
        default_factory=list, description="(train step %, each service's weight, when)."
    )
    rollback_commit: str = ""
    failed: list[str] = Field(default_factory=list, description="The services that failed.")
    notes: list[str] = Field(default_factory=list)
    outcome: str = "in progress"


def render_train_record(record: TrainRecord, *, run_url: str | None = None) -> str:
    """The record as markdown (the train's artifact), linking each service's analyses."""
    lines = [
        f"# Release train {record.name}: {record.outcome}",
        "",
        f"- Run: {run_url or record.flow_run_id}",
        f"- Reason: {record.reason or '(none given)'}",
        f"- Order (rollback runs it backwards): {' → '.join(record.order)}",
    ]
    if record.decision is not None:
        lines.append(f"- Approval: {record.decision.outcome()}")
    if record.bundle_smoke:
        ok = sum(1 for r in record.bundle_smoke if r.get("ok"))
        lines.append(f"- Bundle smoke test (staging): {ok}/{len(record.bundle_smoke)} passed")
        for r in record.bundle_smoke:
            url = r.get("url") or r.get("path")
            status = r.get("status") or "no answer"
            verdict = "ok" if r.get("ok") else "FAILED"
            detail = f" ({r['error']})" if r.get("error") and not r.get("ok") else ""
            lines.append(
                f"  - {r.get('service')}: GET {url} (Host: {r.get('host')}) → {status} "
                f"{verdict}{detail}"
            )
    lines += ["", "| service | image | staging commit | analyses |", "|---|---|---|---|"]
    for name in record.order:
        svc = record.services.get(name)
        if svc is None:
            continue
        lines.append(
            f"| {name} | `{svc.image}` | `{svc.staging_commit[:12]}` | "
            f"{len(svc.analyses)} (artifact `train-{record.name}-{name}-analyses`) |"
        )
    if record.steps:
        lines += ["", "| train step | weights | at |", "|---|---|---|"]
        for step, weights, at in record.steps:
            shown = ", ".join(f"{s} {w}%" for s, w in weights.items())
            lines.append(f"| {step}% | {shown} | {at:%H:%M:%S} |")
    if record.production_commits:
        lines += [
            "",
            "Production commits: " + ", ".join(f"`{c[:12]}`" for c in record.production_commits),
        ]
    if record.rollback_commit:
        lines.append(f"Rollback commit (one, for every service): `{record.rollback_commit[:12]}`")
    if record.failed:
        lines.append(f"Failed: {', '.join(record.failed)}")
    for note in record.notes:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"
