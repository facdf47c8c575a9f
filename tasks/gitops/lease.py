"""The release lock: a lease ref ``refs/leases/<svc>-<env>`` in the manifests remote.

Moved only by compare-and-swap pushes (``--force-with-lease=<ref>:<expected>``). Its commit's
message holds the holder (a flow run id), when it was taken and when it expires. It lives
outside every process, so it survives a suspended flow run, a crashed worker and a restarted
server.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from core.errors import GitOpsError, LeaseHeld
from tasks.gitops.repo import REJECTED_HINTS, Repository

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"


class Lease(BaseModel):
    """The release lock of one service and environment, as read from its ref."""

    model_config = ConfigDict(frozen=True)
    name: str = Field(description="<service>-<environment>")
    holder: str = Field(description="The flow run id holding the lease.")
    taken_at: datetime
    expires_at: datetime
    sha: str = Field(description="The lease commit (the value a compare-and-swap expects).")

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at


class Leases(Repository):
    """The lease operations on a manifests repo clone."""

    def _lease_ref(self, name: str) -> str:
        return f"refs/leases/{name}"

    def read_lease(self, name: str) -> Lease | None:
        with self._session():
            return self._read_lease(name)

    def _read_lease(self, name: str) -> Lease | None:
        self._ensure_clone()
        ref = self._lease_ref(name)
        local = f"refs/robotics-cd/leases/{name}"
        code, out = self._git_status(
            "fetch", "-q", "--no-tags", "--no-write-fetch-head", "origin", f"+{ref}:{local}"
        )
        if code != 0:
            if "couldn't find remote ref" in out:
                self._git_status("update-ref", "-d", local)
                return None
            raise GitOpsError(f"cannot read lease {name}: {out.strip()}")
        sha = self._git("rev-parse", local).strip()
        raw = self._git("log", "-1", "--format=%b", sha).strip()
        try:
            data = json.loads(raw)
            return Lease(
                name=name,
                holder=str(data["holder"]),
                taken_at=datetime.fromisoformat(data["taken_at"]),
                expires_at=datetime.fromisoformat(data["expires_at"]),
                sha=sha,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise GitOpsError(
                f"lease {name} ({sha[:12]}) holds no readable lease record; delete the ref "
                f"{ref} in the manifests remote if no release is running"
            ) from exc

    def _cas(self, name: str, expected: str | None, new: str | None) -> bool:
        """Move the lease ref from ``expected`` to ``new`` (None: absent) on the remote, atomically."""
        ref = self._lease_ref(name)
        lease_arg = f"--force-with-lease={ref}:{expected or ''}"
        code, out = self._git_status(
            "push", "--porcelain", lease_arg, "origin", f"{new or ''}:{ref}"
        )
        if code == 0:
            return True
        if any(hint in out for hint in REJECTED_HINTS):
            return False
        raise GitOpsError(f"cannot update lease {name}: {out.strip()}")

    def _lease_commit(self, name: str, holder: str, taken_at: datetime, ttl: timedelta) -> str:
        record = {
            "holder": holder,
            "taken_at": taken_at.isoformat(),
            "expires_at": (self.clock() + ttl).isoformat(),
            "nonce": uuid.uuid4().hex,  # two identical records must still be distinct commits
        }
        # The empty tree must exist as an object before a commit can point at it.
        self._git("hash-object", "-t", "tree", "-w", "--stdin", stdin="")
        return self._git(
            "commit-tree", EMPTY_TREE, "-m", f"lease {name}\n\n{json.dumps(record)}"
        ).strip()

    def take_lease(self, name: str, holder: str, ttl: timedelta) -> Lease:
        """Take the lease (or renew it when ``holder`` has it); LeaseHeld when another run does."""
        with self._session():
            for _ in range(3):
                current = self._read_lease(name)
                now = self.clock()
                if current and current.holder != holder and not current.expired(now):
                    raise LeaseHeld(name, current.holder, current.expires_at.isoformat())
                taken_at = current.taken_at if current and current.holder == holder else now
                new = self._lease_commit(name, holder, taken_at, ttl)
                if self._cas(name, current.sha if current else None, new):
                    taken = self._read_lease(name)
                    if taken is None or taken.sha != new:
                        continue
                    return taken
            current = self._read_lease(name)
            if current is not None:
                raise LeaseHeld(name, current.holder, current.expires_at.isoformat())
            raise GitOpsError(f"lease {name}: compare-and-swap kept failing; try again")

    def renew_lease(self, name: str, holder: str, ttl: timedelta) -> Lease:
        with self._session():
            current = self._read_lease(name)
            if current is None:
                raise GitOpsError(f"lease {name} is not held by {holder} (nobody holds it)")
            if current.holder != holder:
                raise LeaseHeld(name, current.holder, current.expires_at.isoformat())
            new = self._lease_commit(name, holder, current.taken_at, ttl)
            if not self._cas(name, current.sha, new):
                now = self._read_lease(name)
                raise LeaseHeld(
                    name,
                    now.holder if now else "nobody",
                    now.expires_at.isoformat() if now else "-",
                )
            renewed = self._read_lease(name)
            if renewed is None:
                raise GitOpsError(f"lease {name} vanished right after renewal")
            return renewed

    def release_lease(self, name: str, holder: str) -> bool:
        """Delete the lease if ``holder`` has it; False when nobody held it."""
        with self._session():
            current = self._read_lease(name)
            if current is None:
                return False
            if current.holder != holder:
                raise LeaseHeld(name, current.holder, current.expires_at.isoformat())
            if not self._cas(name, current.sha, None):
                now = self._read_lease(name)
                if now is None:
                    return False
                raise LeaseHeld(name, now.holder, now.expires_at.isoformat())
            return True
