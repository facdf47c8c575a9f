"""The cache rules of tasks, declared once in each task's decorator.

- Reads never cache (``NO_CACHE``): a lease, an overlay, a metrics window must be read anew.
- Writes do not rely on a cache either: each is idempotent by checking the state it would
  change (the lease records its commits, a bump finds the image already there).
- A measurement whose inputs hold the clock (a window ending "now + interval") is cached
  once per flow run (``once_per_run``), so a run resumed from the top after its approval
  reuses the first answer instead of measuring again.
"""

from __future__ import annotations

from typing import Any

from prefect.context import TaskRunContext


def once_per_run(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of a measurement: one per task, flow run and subject."""
    # Which service (or app) too: a release train checks several services in one run.
    subject = parameters.get("service") or parameters.get("app") or ""
    seen = parameters.get("seen", "")
    return f"{context.task.name}-{seen}-{context.task_run.flow_run_id}-{subject}"
