"""The manifests repo: overlay commits and the release lock, over git.

A package along its seams; every public name stays importable as ``tasks.gitops.X``:

- ``repo``: the clone (git with deadlines and credentials kept out of argv and disk),
  fetches, history reads, the results (``CommitResult``, ``CommitInfo``);
- ``lease``: the release lock ``refs/leases/<svc>-<env>`` and its record (``Lease``);
- ``overlay``: the checked overlay edits and their pushes (``ManifestsRepo``);
- ``tasks``: the Prefect tasks the flows call, and ``manifests_repo()``, the factory of a
  run's clone.
"""

from tasks.gitops.lease import EMPTY_TREE, Lease, Leases
from tasks.gitops.overlay import ManifestsRepo
from tasks.gitops.repo import IDENTITY, CommitInfo, CommitResult, Environment, Repository
from tasks.gitops.tasks import (
    bump_image,
    commits_touching,
    current_image,
    descendant_check,
    descends,
    head_commit,
    is_ancestor,
    lease_holder,
    lease_name,
    manifests_repo,
    overlay_path,
    preview_production_change,
    previous_image,
    promote,
    release_commits,
    release_lease,
    remove_clone,
    renew_lease,
    restore_overlay,
    set_canary,
    take_lease,
)

__all__ = [
    "EMPTY_TREE",
    "IDENTITY",
    "CommitInfo",
    "CommitResult",
    "Environment",
    "Lease",
    "Leases",
    "ManifestsRepo",
    "Repository",
    "bump_image",
    "commits_touching",
    "current_image",
    "descendant_check",
    "descends",
    "head_commit",
    "is_ancestor",
    "lease_holder",
    "lease_name",
    "manifests_repo",
    "overlay_path",
    "preview_production_change",
    "previous_image",
    "promote",
    "release_commits",
    "release_lease",
    "remove_clone",
    "renew_lease",
    "restore_overlay",
    "set_canary",
    "take_lease",
]
