"""The production lease: ``refs/leases/<service>-<env>`` in the manifests remote.

The release lock of one service and environment, and the memory of the release holding it.
It lives outside every process, so it survives a suspended flow run, a crashed worker and a
restarted server, and every production write checks it atomically on the remote.

Format (version 2; the same text is in ``docs/leases.md``)
-----------------------------------------------------------

The ref points at a commit whose tree is git's empty tree and whose parent is the previous
lease commit of the same ref (absent for the first one), so ``git log refs/leases/<name>``
is the lease's history. Its message is::

    lease <service>-<env>

    {"version": 2, "holder": "<flow run id>", "taken_at": "<ISO 8601 UTC>",
     "expires_at": "<ISO 8601 UTC>", "before": "<40-hex commit>",
     "commits": ["<40-hex>", ...], "step": {"kind": "canary|promote|rollback",
     "weight": 25, "commit": "<40-hex>"}, "release": null, "nonce": "<hex>"}

(one line of JSON; ``core.release.LeaseRecord`` is the schema, ``encode_lease`` /
``decode_lease`` write and read it). ``before`` is the manifests branch head when the lease
was first taken: production before this release, never recomputed. ``commits`` are the
release's own commits on the branch, oldest first, each appended by the push that made it;
``step`` is the last production step written. ``release`` is set when a rollback run took
the lease over from a release (then ``commits`` are that release's). Format 1 records (holder
and times only) still read, as records without ``before`` or commits.

Moves
-----

- *take* (:meth:`Leases.take_lease`): compare-and-swap from the current lease commit (or from
  absent) to a new one; the holder's own lease is renewed with its record intact.
- *renew*, *release* (delete), *take over* (:meth:`Leases.take_over_lease`, for a run acting
  for a dead release): compare-and-swap likewise.
- *fenced write* (``ManifestsRepo`` edits with a ``Fence``): ONE
  ``git push --atomic --force-with-lease=refs/leases/<name>:<lease commit>`` that moves
  ``refs/heads/main`` to the new manifests commit *and* the lease ref to a new lease commit
  recording it. Git checks an unchanged ref only on the client side, so the lease always
  moves; a writer whose lease was taken over is refused by the remote, and nothing of its
  write lands.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from core.errors import GitOpsError, InvalidInput, LeaseHeld, LeaseLost
from core.release import LeaseRecord, LeaseStep, decode_lease, encode_lease, new_lease
from tasks.gitops.repo import REJECTED_HINTS, Repository

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
LEASE_REFS = "refs/leases"


def lease_ref(name: str) -> str:
    return f"{LEASE_REFS}/{name}"


class Lease(BaseModel):
    """The lease of one service and environment as read from its ref: the record and the
    lease commit (the value the next compare-and-swap expects)."""

    model_config = ConfigDict(frozen=True)
    name: str = Field(description="<service>-<environment>")
    sha: str = Field(description="The lease commit (the value a compare-and-swap expects).")
    record: LeaseRecord

    @property
    def holder(self) -> str:
        return self.record.holder

    @property
    def taken_at(self) -> datetime:
        return self.record.taken_at

    @property
    def expires_at(self) -> datetime:
        return self.record.expires_at

    @property
    def before(self) -> str | None:
        return self.record.before

    @property
    def commits(self) -> list[str]:
        return list(self.record.commits)

    @property
    def step(self) -> LeaseStep | None:
        return self.record.step

    def expired(self, now: datetime) -> bool:
        return self.record.expired(now)


def _nonce() -> str:
    return uuid.uuid4().hex  # two identical records must still be distinct commits


class Leases(Repository):
    """The lease operations on a manifests repo clone."""

    def read_lease(self, name: str) -> Lease | None:
        with self._session():
            return self._read_lease(name)

    def _read_lease(self, name: str) -> Lease | None:
        self._ensure_clone()
        ref = lease_ref(name)
        local = f"refs/robotics-cd/leases/{name}"
        code, out = self._git_status(
            "fetch", "-q", "--no-tags", "--no-write-fetch-head", "origin", f"+{ref}:{local}"
        )
        if code != 0:
            if "couldn't find remote ref" in out:
                self._git_status("update-ref", "-d", local)
                return None
            raise GitOpsError(f"cannot read lease {name} from {self.url}: {out.strip()}")
        sha = self._git("rev-parse", local).strip()
        message = self._git("log", "-1", "--format=%B", sha)
        try:
            record = decode_lease(message)
        except InvalidInput as exc:
            raise GitOpsError(
                f"lease {name} ({sha[:12]}) holds no readable lease record ({exc}); delete the "
                f"ref {ref} in the manifests remote if no release is running"
            ) from exc
        return Lease(name=name, sha=sha, record=record)

    def _lease_commit(self, name: str, record: LeaseRecord, parent: str | None) -> str:
        # The empty tree must exist as an object before a commit can point at it.
        self._git("hash-object", "-t", "tree", "-w", "--stdin", stdin="")
        args = ["commit-tree", EMPTY_TREE]
        # The chain is history only: a lease commit this clone never fetched is left out.
        if parent and self._git_status("cat-file", "-e", f"{parent}^{{commit}}")[0] == 0:
            args += ["-p", parent]
        return self._git(*args, "-F", "-", stdin=encode_lease(name, record)).strip()

    def _cas(self, name: str, expected: str | None, new: str | None) -> bool:
        """Move the lease ref from ``expected`` to ``new`` (None: absent) on the remote, atomically."""
        ref = lease_ref(name)
        lease_arg = f"--force-with-lease={ref}:{expected or ''}"
        code, out = self._git_status(
            "push", "--porcelain", lease_arg, "origin", f"{new or ''}:{ref}"
        )
        if code == 0:
            return True
        if any(hint in out for hint in REJECTED_HINTS):
            return False
        raise GitOpsError(f"cannot update lease {name} on {self.url}: {out.strip()}")

    def _held(self, lease: Lease) -> LeaseHeld:
        train = lease.record.train.name if lease.record.train else None
        return LeaseHeld(lease.name, lease.holder, lease.expires_at.isoformat(), train=train)

    def _blocked(self, lease: Lease) -> LeaseHeld:
        return LeaseHeld(
            lease.name,
            lease.holder,
            f"an operator clears it (blocked: {lease.record.blocked}; "
            f"`robotics-cd lease clear <service> --reason ...`)",
        )

    def block_lease(self, name: str, holder: str, reason: str) -> Lease:
        """``holder`` marks its lease blocked: production could not be restored and verified.
        The record (before, commits, step) stays, so an operator sees what to undo."""
        with self._session():
            for _ in range(3):
                current = self._read_lease(name)
                if current is None or current.holder != holder:
                    raise LeaseLost(name, holder, current.holder if current else "nobody")
                record = current.record.model_copy(update={"blocked": reason, "nonce": _nonce()})
                new = self._lease_commit(name, record, current.sha)
                if self._cas(name, current.sha, new):
                    blocked = self._read_lease(name)
                    if blocked is not None:
                        return blocked
            raise GitOpsError(f"lease {name}: compare-and-swap kept failing; try again")

    def clear_lease(self, name: str, operator: str, reason: str) -> Lease | None:
        """An operator unblocks a lease: the block is lifted and the lease expires now, its
        record (before, the release's commits) kept, so the reconciler's next pass restores
        whatever of the release production still runs (or just frees it). The clearing, who
        and why, is kept under ``refs/leases-cleared/<name>/<time>``."""
        with self._session():
            current = self._read_lease(name)
            if current is None:
                return None
            now = self.clock()
            audit = self._lease_commit(
                name,
                current.record.model_copy(
                    update={"blocked": f"cleared by {operator}: {reason}", "nonce": _nonce()}
                ),
                current.sha,
            )
            stamp = now.strftime("%Y%m%dT%H%M%SZ")
            code, out = self._git_status(
                "push", "--porcelain", "origin", f"{audit}:refs/leases-cleared/{name}/{stamp}"
            )
            if code != 0:
                raise GitOpsError(f"cannot record the clearing of lease {name}: {out.strip()}")
            record = current.record.model_copy(
                update={"blocked": None, "expires_at": now, "nonce": _nonce()}
            )
            if not self._cas(name, current.sha, self._lease_commit(name, record, current.sha)):
                raise GitOpsError(f"lease {name} moved while it was being cleared; try again")
            return current

    def take_lease(self, name: str, holder: str, ttl: timedelta) -> Lease:
        """Take the lease, or renew it with its record when ``holder`` has it already (a
        re-executed run finds its ``before``, commits and step again); LeaseHeld when another
        run holds it and it has not expired."""
        with self._session():
            for _ in range(3):
                current = self._read_lease(name)
                now = self.clock()
                if current and current.record.blocked:
                    raise self._blocked(current)
                if current and current.holder != holder and not current.expired(now):
                    raise self._held(current)
                head = self._update()
                record = new_lease(
                    holder, now, ttl, head, current.record if current else None, _nonce()
                ).model_copy(update={"host": socket.gethostname(), "pid": os.getpid()})
                new = self._lease_commit(name, record, current.sha if current else None)
                if self._cas(name, current.sha if current else None, new):
                    taken = self._read_lease(name)
                    if taken is None or taken.sha != new:
                        continue
                    return taken
            current = self._read_lease(name)
            if current is not None:
                raise self._held(current)
            raise GitOpsError(f"lease {name}: compare-and-swap kept failing; try again")

    def take_over_lease(self, name: str, holder: str, release: str, ttl: timedelta) -> Lease:
        """``holder`` (a rollback run) takes the lease of ``release`` over, keeping its record
        (``before``, commits, step) and naming ``release`` in it. Allowed when ``release`` or
        ``holder`` holds it, when it expired, or when nobody does (then a new record with no
        commits). LeaseHeld when another live run holds it."""
        with self._session():
            for _ in range(3):
                current = self._read_lease(name)
                now = self.clock()
                if current is None:
                    record = LeaseRecord(
                        holder=holder,
                        taken_at=now,
                        expires_at=now + ttl,
                        before=self._update(),
                        release=release,
                        nonce=_nonce(),
                    )
                elif current.record.blocked:
                    raise self._blocked(current)
                elif current.holder == holder:
                    record = current.record.renewed(now, ttl, _nonce())
                elif current.record.owner == release or current.expired(now):
                    keep = current.record.owner == release
                    record = LeaseRecord(
                        holder=holder,
                        taken_at=now,
                        expires_at=now + ttl,
                        before=current.before if keep else self._update(),
                        commits=current.commits if keep else [],
                        step=current.step if keep else None,
                        release=release,
                        nonce=_nonce(),
                    )
                else:
                    raise self._held(current)
                new = self._lease_commit(name, record, current.sha if current else None)
                if self._cas(name, current.sha if current else None, new):
                    taken = self._read_lease(name)
                    if taken is not None and taken.sha == new:
                        return taken
            current = self._read_lease(name)
            if current is not None:
                raise self._held(current)
            raise GitOpsError(f"lease {name}: compare-and-swap kept failing; try again")

    def renew_lease(self, name: str, holder: str, ttl: timedelta) -> Lease:
        with self._session():
            current = self._read_lease(name)
            if current is None:
                raise LeaseLost(name, holder, "nobody")
            if current.holder != holder:
                raise LeaseLost(name, holder, current.holder)
            record = current.record.renewed(self.clock(), ttl, _nonce())
            new = self._lease_commit(name, record, current.sha)
            if not self._cas(name, current.sha, new):
                now = self._read_lease(name)
                raise LeaseLost(name, holder, now.holder if now else "nobody")
            renewed = self._read_lease(name)
            if renewed is None:
                raise LeaseLost(name, holder, "nobody")
            return renewed

    def release_lease(self, name: str, holder: str) -> bool:
        """Delete the lease if ``holder`` has it; False when nobody held it."""
        with self._session():
            current = self._read_lease(name)
            if current is None:
                return False
            if current.holder != holder:
                raise self._held(current)
            if not self._cas(name, current.sha, None):
                now = self._read_lease(name)
                if now is None:
                    return False
                raise self._held(now)
            return True
