"""What a release is and what it leaves behind, as plain data (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.analysis import IntervalVerdict
from core.approval import ApprovalDecision


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
