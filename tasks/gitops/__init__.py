"""The manifests repo: overlay commits and the release lock, over git.

A package along its seams; every public name stays importable as ``tasks.gitops.X``:

- ``repo``: the clone (git with deadlines and credentials kept out of argv and disk),
  fetches, history reads, the results (``CommitResult``, ``CommitInfo``);
- ``lease``: the release lock ``refs/leases/<svc>-<env>`` and its record (``Lease``);
- ``overlay``: the checked overlay edits and their pushes (``ManifestsRepo``);
- ``tasks``: the Prefect tasks the flows call, and ``manifests_repo()``, the factory of a
  run's clone;
- ``train``: a release train's leases (all in one atomic push) and its one-commit steps
  (``TrainRepo``, ``TrainMember``).
"""

from tasks.gitops.lease import EMPTY_TREE, LEASE_REFS, Lease, Leases, lease_ref
from tasks.gitops.overlay import Fence, ManifestsRepo
from tasks.gitops.repo import (
    IDENTITY,
    CommitInfo,
    CommitResult,
    Environment,
    OverlaySource,
    Repository,
    RollbackFacts,
)
from tasks.gitops.tasks import (
    Descends,
    block_lease,
    bump_image,
    clear_lease,
    commits_touching,
    current_image,
    descendant_check,
    descends,
    head_commit,
    image_at,
    is_ancestor,
    lease_holder,
    lease_name,
    manifests_repo,
    overlay_path,
    overlay_source,
    preview_production_change,
    previous_image,
    production_fence,
    promote,
    release_commits,
    release_lease,
    remove_clone,
    renew_lease,
    restore_overlay,
    revert_release,
    rollback_facts,
    set_canary,
    take_lease,
    take_over_lease,
)
from tasks.gitops.train import TrainFence, TrainMember, TrainRepo

__all__ = [
    "EMPTY_TREE",
    "IDENTITY",
    "LEASE_REFS",
    "CommitInfo",
    "CommitResult",
    "Descends",
    "Environment",
    "Fence",
    "Lease",
    "Leases",
    "ManifestsRepo",
    "OverlaySource",
    "Repository",
    "RollbackFacts",
    "TrainFence",
    "TrainMember",
    "TrainRepo",
    "block_lease",
    "bump_image",
    "clear_lease",
    "commits_touching",
    "current_image",
    "descendant_check",
    "descends",
    "head_commit",
    "image_at",
    "is_ancestor",
    "lease_holder",
    "lease_name",
    "lease_ref",
    "manifests_repo",
    "overlay_path",
    "overlay_source",
    "preview_production_change",
    "previous_image",
    "production_fence",
    "promote",
    "release_commits",
    "release_lease",
    "remove_clone",
    "renew_lease",
    "restore_overlay",
    "revert_release",
    "rollback_facts",
    "set_canary",
    "take_lease",
    "take_over_lease",
]
