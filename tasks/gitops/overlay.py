"""Overlay edits: each change to an environment is one checked commit, pushed.

Every change is one commit to the manifests repo, pushed with fetch-and-reapply on conflict,
after ``kubectl kustomize`` proved the overlay still renders and that only the intended
fields changed. Repeats are safe because each operation first looks at the repo: an image
already pinned, a canary already at its step or a folder already restored is a no-op that
returns the commit that made it so.
"""

from __future__ import annotations

import difflib
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import GitOpsError, InvalidInput, LeaseLost, OverlayRefused, PushConflict
from core.images import ImageRef
from core.kustomize import (
    CanarySettings,
    FieldChange,
    FieldPattern,
    ImageEntry,
    canary_fields,
    diff_manifests,
    image_fields,
    parse_canary,
    parse_rendered,
    render_canary,
    set_image,
    unexpected_changes,
)
from core.release import LeaseStep
from tasks.gitops.lease import Lease, Leases, lease_ref
from tasks.gitops.repo import (
    REJECTED_HINTS,
    CommitResult,
    _check_relpath,
    _message,
    _trailers,
)

_BEFORE_RE = re.compile(r"^[0-9a-f]{40}(\^|~[0-9]{1,4})?$")


@dataclass(frozen=True)
class Fence:
    """A production write under a lease: one atomic push moves the branch and the lease.

    ``holder`` must hold lease ``lease``; ``step`` says what the new commit is (recorded in
    the lease with it). ``expected`` is the writer's own idea of the lease (tests and callers
    that carry it); None reads it from the remote first. Either way the remote checks it.
    """

    lease: str
    holder: str
    step: Callable[[str], LeaseStep]
    expected: Lease | None = None


@dataclass(frozen=True)
class _Edit:
    """One overlay change: how to write it, which rendered fields it may change, its subject."""

    overlay: str
    apply: Callable[[Path], None]  # writes files under the work tree (re-run on a new head)
    allowed: list[FieldPattern]
    subject: str
    body: str
    trailers: str
    existing: Callable[[], str | None]  # the commit that already made this state, if any
    # Checked against each fetched head before the edit is applied (and again after a
    # rejected push): raises to refuse the write, e.g. Superseded.
    guard: Callable[[], None] | None = None


class ManifestsRepo(Leases):
    """A clone of the manifests repo and the operations the release needs on it."""

    def preview_image_change(self, overlay: str, image_name: str, image: ImageRef) -> str:
        """The unified diff setting ``images[name=image_name]`` would make (nothing written)."""
        path = f"{_check_relpath(overlay)}/kustomization.yaml"
        old = self.read_file(path)
        new = set_image(old, ImageEntry(image_name, image.name, image.tag, image.digest))
        return "".join(
            difflib.unified_diff(
                old.splitlines(keepends=True),
                new.splitlines(keepends=True),
                fromfile=f"a/{path}",
                tofile=f"b/{path}",
            )
        )

    def canary_settings(self, overlay: str, service: str) -> CanarySettings:
        return parse_canary(self.read_file(f"{_check_relpath(overlay)}/canary.yaml"), service)

    def _last_commit_with(self, path: str, needle: str | None) -> str | None:
        self._full_history()
        args = ["log", "-1", "--format=%H"]
        if needle:
            args.append(f"-S{needle}")
        out = self._git(*args, "HEAD", "--", path).strip()
        return out or None

    def _subject_of(self, sha: str) -> str:
        return self._git("log", "-1", "--format=%s", sha).strip()

    def _commit(self, edit: _Edit, fence: Fence | None = None) -> CommitResult:
        """Apply, check, commit and push ``edit``; on a rejected push start over on the new head.

        With a ``fence`` the push is atomic with the lease (see :class:`Fence`): a lease that
        is no longer the holder's raises LeaseLost and nothing lands.
        """
        last_reason = ""
        for attempt in range(self.max_push_attempts):
            self._update()
            if edit.guard is not None:
                edit.guard()
            lease = self._fence_lease(fence) if fence else None
            if not self._apply(edit):
                sha = edit.existing() or self._git("rev-parse", "HEAD").strip()
                return CommitResult(
                    sha=sha,
                    changed=False,
                    message=self._subject_of(sha),
                    lease_sha=lease.sha if lease else None,
                )
            # Render the head as it is, then our edit on top of it (applying is idempotent).
            self._git("reset", "-q", "--hard", "HEAD")
            before = parse_rendered(self._render_at_head(edit.overlay))
            self._apply(edit)
            self._check(edit, before)
            self._git("add", "-A", "--", edit.overlay)
            self._git("commit", "-q", "-m", _message(edit.subject, edit.body, edit.trailers))
            sha = self._git("rev-parse", "HEAD").strip()
            new_lease: str | None = None
            if fence is None or lease is None:
                code, out = self._git_status(
                    "push", "--porcelain", "origin", f"HEAD:refs/heads/{self.branch}"
                )
            else:
                record = lease.record.with_step(fence.step(sha), uuid.uuid4().hex)
                new_lease = self._lease_commit(fence.lease, record, lease.sha)
                ref = lease_ref(fence.lease)
                code, out = self._git_status(
                    "push",
                    "--porcelain",
                    "--atomic",
                    f"--force-with-lease={ref}:{lease.sha}",
                    "origin",
                    f"HEAD:refs/heads/{self.branch}",
                    f"{new_lease}:{ref}",
                )
            if code == 0:
                return CommitResult(
                    sha=sha, changed=True, message=edit.subject, lease_sha=new_lease
                )
            if not any(hint in out for hint in REJECTED_HINTS):
                self._git("reset", "-q", "--hard", f"origin/{self.branch}")
                raise GitOpsError(f"push to the manifests repo {self.url} failed: {out.strip()}")
            last_reason = out.strip()
            if fence is not None and lease is not None:
                self._check_still_held(fence, lease)
            time.sleep(self.push_backoff.delay(attempt))
        self._git("reset", "-q", "--hard", f"origin/{self.branch}")
        raise PushConflict(
            f"{edit.subject}: push still rejected after {self.max_push_attempts} attempts "
            f"({last_reason}); the manifests branch is busy, run the step again"
        )

    def _fence_lease(self, fence: Fence) -> Lease:
        """The lease a fenced write builds on: the writer's own idea of it, or the remote's."""
        lease = fence.expected or self._read_lease(fence.lease)
        if lease is None:
            raise LeaseLost(fence.lease, fence.holder, "nobody")
        if lease.holder != fence.holder:
            raise LeaseLost(fence.lease, fence.holder, lease.holder)
        return lease

    def _check_still_held(self, fence: Fence, lease: Lease) -> None:
        """After a refused atomic push: was it the lease (LeaseLost) or only the branch?"""
        now = self._read_lease(fence.lease)
        if now is None:
            self._git("reset", "-q", "--hard", f"origin/{self.branch}")
            raise LeaseLost(fence.lease, fence.holder, "nobody")
        if now.sha != lease.sha and (fence.expected is not None or now.holder != fence.holder):
            self._git("reset", "-q", "--hard", f"origin/{self.branch}")
            raise LeaseLost(fence.lease, fence.holder, now.holder)

    def _apply(self, edit: _Edit) -> bool:
        """Write the edit into the work tree; False when the overlay already says that."""
        try:
            edit.apply(self.workdir)
        except InvalidInput as exc:
            self._git("reset", "-q", "--hard", "HEAD")
            raise OverlayRefused(f"{edit.subject}: refused, nothing committed: {exc}") from exc
        return bool(self._git("status", "--porcelain", "--", edit.overlay).strip())

    def _render_at_head(self, overlay: str) -> str:
        try:
            return self._render(overlay)
        except OverlayRefused as exc:
            raise OverlayRefused(
                f"{exc} (at head {self._git('rev-parse', '--short', 'HEAD').strip()}, before "
                "our edit): fix the manifests repo first; nothing was committed"
            ) from exc

    def _check(self, edit: _Edit, before: list[dict[str, object]]) -> None:
        """Refuse (and undo locally) an edit that does not render or changes too much."""
        try:
            after = parse_rendered(self._render(edit.overlay))
            changes = diff_manifests(before, after)
            self._judge(edit, changes)
        except (OverlayRefused, InvalidInput) as exc:
            self._git("reset", "-q", "--hard", "HEAD")
            self._git("clean", "-q", "-ffdx")
            raise OverlayRefused(f"{edit.subject}: refused, nothing committed: {exc}") from exc

    @staticmethod
    def _judge(edit: _Edit, changes: list[FieldChange]) -> None:
        if not edit.allowed:  # a restore may change anything, as long as it renders
            return
        if not changes:
            raise OverlayRefused(
                f"the edit of {edit.overlay} changes nothing in the rendered manifests "
                "(does any workload use this image name?)"
            )
        unexpected = unexpected_changes(changes, edit.allowed)
        if unexpected:
            shown = "; ".join(str(c) for c in unexpected[:5])
            more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
            raise OverlayRefused(
                f"the edit of {edit.overlay} would change more than intended: {shown}{more}"
            )

    def set_image(
        self,
        *,
        overlay: str,
        image_name: str,
        image: ImageRef,
        subject: str,
        body: str = "",
        flow_run_id: str | None = None,
        source_sha: str | None = None,
        extra: Callable[[Path], None] | None = None,
        extra_allowed: list[FieldPattern] | None = None,
        fence: Fence | None = None,
        guard: Callable[[], None] | None = None,
    ) -> CommitResult:
        """Point ``images[name=image_name]`` of ``overlay`` at ``image`` (plus ``extra`` edits)."""
        overlay = _check_relpath(overlay)
        entry = ImageEntry(image_name, image.name, image.tag, image.digest)
        kustomization = f"{overlay}/kustomization.yaml"

        def apply(root: Path) -> None:
            path = root / kustomization
            if not path.is_file():
                raise OverlayRefused(f"{kustomization} does not exist in the manifests repo")
            text = path.read_text()
            new = set_image(text, entry)
            if new != text:
                path.write_text(new)
            if extra is not None:
                extra(root)

        def existing() -> str | None:
            return self._last_commit_with(kustomization, image.digest)

        edit = _Edit(
            overlay=overlay,
            apply=apply,
            allowed=image_fields(image=str(image)) + (extra_allowed or []),
            subject=subject,
            body=body,
            trailers=_trailers(flow_run_id, source_sha, image),
            existing=existing,
            guard=guard,
        )
        with self._session():
            return self._commit(edit, fence)

    def set_canary(
        self,
        *,
        overlay: str,
        service: str,
        image: ImageRef | None,
        settings: CanarySettings,
        subject: str,
        body: str = "",
        flow_run_id: str | None = None,
        source_sha: str | None = None,
        stable_image: ImageRef | None = None,
        fence: Fence | None = None,
    ) -> CommitResult:
        """Write canary replicas/weight (and the canary image, and for a promotion the stable one)."""
        edit = self.canary_edit(
            overlay=overlay,
            service=service,
            image=image,
            settings=settings,
            subject=subject,
            body=body,
            flow_run_id=flow_run_id,
            source_sha=source_sha,
            stable_image=stable_image,
        )
        with self._session():
            return self._commit(edit, fence)

    def canary_edit(
        self,
        *,
        overlay: str,
        service: str,
        image: ImageRef | None,
        settings: CanarySettings,
        subject: str,
        body: str = "",
        flow_run_id: str | None = None,
        source_sha: str | None = None,
        stable_image: ImageRef | None = None,
    ) -> _Edit:
        """The edit :meth:`set_canary` commits (a release train commits several at once)."""
        overlay = _check_relpath(overlay)
        canary_file = f"{overlay}/canary.yaml"
        kustomization = f"{overlay}/kustomization.yaml"
        entries = []
        if image is not None:
            entries.append(ImageEntry(f"{service}-canary", image.name, image.tag, image.digest))
        if stable_image is not None:
            entries.append(
                ImageEntry(service, stable_image.name, stable_image.tag, stable_image.digest)
            )

        def apply(root: Path) -> None:
            kpath, cpath = root / kustomization, root / canary_file
            for path in (kpath, cpath):
                if not path.is_file():
                    raise OverlayRefused(
                        f"{path.relative_to(root)} does not exist in the manifests repo"
                    )
            text = kpath.read_text()
            new = text
            for entry in entries:
                new = set_image(new, entry)
            if new != text:
                kpath.write_text(new)
            old_canary = cpath.read_text()
            if parse_canary(old_canary, service) != settings:
                cpath.write_text(render_canary(service, settings, previous=old_canary))

        def existing() -> str | None:
            return self._last_commit_with(overlay, None)

        allowed = canary_fields(service, settings)
        if image is not None:
            allowed += image_fields("Deployment", f"{service}-canary", image=str(image))
        if stable_image is not None:
            allowed += image_fields(image=str(stable_image))
        return _Edit(
            overlay=overlay,
            apply=apply,
            allowed=allowed,
            subject=subject,
            body=body,
            trailers=_trailers(flow_run_id, source_sha, stable_image or image),
            existing=existing,
        )

    def restore(
        self,
        *,
        overlay: str,
        before: str,
        subject: str,
        body: str,
        flow_run_id: str | None = None,
        fence: Fence | None = None,
    ) -> CommitResult:
        """Restore ``overlay`` to its tree in ``before`` (a commit, or a root tree), one commit."""
        overlay = _check_relpath(overlay)
        if not _BEFORE_RE.match(before):
            raise InvalidInput(
                f"invalid revision {before!r}: a 40-hex commit or tree sha, optionally with ^ or ~N"
            )

        def apply(root: Path) -> None:
            self._full_history()
            code, _ = self._git_status("cat-file", "-e", f"{before}^{{tree}}")
            if code != 0:
                raise GitOpsError(
                    f"{before} is not in the manifests repo; cannot restore {overlay} from it"
                )
            self._git("rm", "-r", "-q", "--ignore-unmatch", "--", overlay)
            self._git("checkout", before, "--", overlay)

        def existing() -> str | None:
            return self._last_commit_with(overlay, None)

        edit = _Edit(
            overlay=overlay,
            apply=apply,
            allowed=[],
            subject=subject,
            body=body,
            trailers=_trailers(flow_run_id, None, None),
            existing=existing,
        )
        with self._session():
            return self._commit(edit, fence)

    def revert(
        self,
        *,
        overlay: str,
        commits: list[str],
        subject: str,
        body: str,
        flow_run_id: str | None = None,
        source_sha: str | None = None,
        fence: Fence | None = None,
    ) -> CommitResult:
        """One commit reverting exactly ``commits`` (newest first), nothing else.

        Edits others made to the overlay in the meantime stay. A revert that does not apply
        cleanly (someone changed the same lines since) is refused, nothing committed. The
        commit's body names each reverted commit (``Undoes: <sha>``); a second call finds
        that commit and commits nothing.
        """
        overlay = _check_relpath(overlay)
        if not commits:
            raise InvalidInput("nothing to revert: no commits given")
        for sha in commits:
            if not re.fullmatch(r"[0-9a-f]{40}", sha):
                raise InvalidInput(f"{sha!r} is not a 40-hex commit id")

        def apply(root: Path) -> None:
            self._full_history()
            for sha in commits:
                code, _ = self._git_status("cat-file", "-e", f"{sha}^{{commit}}")
                if code != 0:
                    raise GitOpsError(
                        f"{sha} is not on the manifests branch {self.branch}; cannot revert it"
                    )
            self._revert_in_tree(commits, "the release's commits")

        def existing() -> str | None:
            self._full_history()
            out = self._git(
                "log",
                "-1",
                "--format=%H",
                "--fixed-strings",
                f"--grep=Undoes: {commits[0]}",
                "HEAD",
                "--",
                overlay,
            ).strip()
            return out or None

        undone = "\n".join(f"Undoes: {sha}" for sha in commits)
        edit = _Edit(
            overlay=overlay,
            apply=apply,
            allowed=[],
            subject=subject,
            body=f"{body.strip()}\n\n{undone}",
            trailers=_trailers(flow_run_id, source_sha, None),
            existing=existing,
        )
        with self._session():
            self._update()
            done = existing()
            if done is not None:
                return CommitResult(sha=done, changed=False, message=self._subject_of(done))
            return self._commit(edit, fence)
