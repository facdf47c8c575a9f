"""Which release is newer, and whether a measurement measured the image it judges: pure.

Two releases of one service can race through staging (two pushes a second apart). The
rules here keep staging in the order of the source history and keep each verification
honest about which pods it measured:

- :func:`source_order`: how this release's source commit relates to the one an overlay
  records (its ``Source-Commit`` trailer);
- :func:`staging_may_write`: whether this release may put its image over that one;
- :func:`measured_pods_verdict`: whether every pod that served a measured window ran the
  digest being judged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class SourceOrder(StrEnum):
    """Where *ours* stands against *theirs* in the service's source history."""

    SAME = "same"  # one commit
    NEWER = "newer"  # ours descends from theirs: ours is the later change
    OLDER = "older"  # theirs descends from ours: theirs already contains ours
    UNRELATED = "unrelated"  # neither (a force-push rewrote the branch; or theirs is gone)


class SourceRelation(BaseModel):
    """Ours against theirs, and whether each is still on the service's release branch."""

    model_config = ConfigDict(frozen=True)
    order: SourceOrder
    ours_on_branch: bool = True
    theirs_on_branch: bool = True


def source_order(ours: str, theirs: str, is_ancestor: Callable[[str, str], bool]) -> SourceOrder:
    """``is_ancestor(a, b)``: a is b or an ancestor of b (``git merge-base --is-ancestor``)."""
    if ours == theirs:
        return SourceOrder.SAME
    if is_ancestor(theirs, ours):
        return SourceOrder.NEWER
    if is_ancestor(ours, theirs):
        return SourceOrder.OLDER
    return SourceOrder.UNRELATED


def staging_may_write(relation: SourceRelation) -> bool:
    """May a release put its image over the one staging runs?

    Never an older source commit over a newer one. The same commit is a rerun or a
    deliberate re-release. Unrelated histories (a force-push): the commit the branch holds
    wins; when both or neither are on it, the later release (this one) writes.
    """
    if relation.order == SourceOrder.OLDER:
        return False
    if relation.order == SourceOrder.UNRELATED:
        return relation.ours_on_branch or not relation.theirs_on_branch
    return True


class MeasuredPod(BaseModel):
    """A pod seen around a measured window, as the cluster reports it."""

    model_config = ConfigDict(frozen=True)
    name: str
    track: str | None = None
    image_ids: tuple[str, ...] = ()  # status.containerStatuses[].imageID
    started_at: datetime | None = None  # status.startTime
    seen: str = ""  # when it was listed: "start" or "end" of the window

    @property
    def digests(self) -> frozenset[str]:
        """The ``sha256:…`` digests its containers run (``…@sha256:…`` in an imageID)."""
        return frozenset(i.rsplit("@", 1)[1] for i in self.image_ids if "@sha256:" in i)

    def runs(self, digest: str) -> bool:
        return bool(self.digests) and self.digests == {digest}


def measured_pods_verdict(
    pods: Sequence[MeasuredPod], digest: str | None, *, what: str
) -> str | None:
    """None when the window measured only ``digest``: pods were listed at its start and at its
    end, and each of them ran exactly that digest. Otherwise the reason, naming the pods.

    ``digest`` None (an overlay that pins a tag only, like a seed image): every pod must run
    one and the same digest."""
    if not pods:
        return f"{what}: no pod of the service was found to measure"
    ends = {p.seen for p in pods}
    if not {"start", "end"} <= ends:
        missing = " and ".join(sorted({"start", "end"} - ends))
        return f"{what}: no pod of the service at the window's {missing}"
    if digest is None:
        seen = {d for p in pods for d in p.digests}
        if len(seen) == 1 and all(p.digests for p in pods):
            return None
        others = [p for p in pods if len(p.digests) != 1] or list(pods)
        shown = ", ".join(
            f"{p.name} ({', '.join(sorted(p.digests)) or 'no digest'})" for p in others[:4]
        )
        return f"{what}: the pods did not all run one image digest: {shown}"
    others = [p for p in pods if not p.runs(digest)]
    if not others:
        return None
    shown = ", ".join(
        f"{p.name} ({', '.join(sorted(p.digests)) or 'no image digest'}, at the {p.seen})"
        for p in others[:4]
    )
    return f"{what}: pods other than {digest[:19]}… served the window: {shown}"


class MeasuredWindow(BaseModel):
    """One measured window and the pods listed at its start and end: a record's evidence."""

    what: str  # "staging", "post-release watch 1", "rollback"
    digest: str | None  # the digest judged (None: the overlay pinned a tag only)
    start: datetime
    end: datetime
    pods: list[MeasuredPod] = []
