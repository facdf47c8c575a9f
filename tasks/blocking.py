"""Blocking calls from async flows, off the event loop.

Also the lease renewal that runs beside a long step (:func:`renewing_every`).

The release flows are async: while one step waits, the same loop renews the production
lease, watches for operator commands and answers cancellation. A sync task (GitPython, a
``time.sleep``-paced metrics window, a sync HTTP client) called inline would stop all of
that for as long as it runs: a staging window of a minute is a minute of no lease renewal.
Every blocking call an async flow makes goes through :func:`in_thread`;
tests/unit/test_async_flows.py holds the flows to it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar, overload

import anyio
import anyio.to_thread
from prefect import Task

from core.errors import LeaseLost, RoboticsCDError
from tasks.logs import run_logger

P = ParamSpec("P")
T = TypeVar("T")


# A Task's own overload first: mypy reads its parameters from ``Task[P, T]`` directly (its
# overloaded ``__call__`` would lose them and reject keyword arguments spread from a dict).
@overload
async def in_thread(fn: Task[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...
@overload
async def in_thread(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...
async def in_thread(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a worker thread. The thread runs in a copy of the caller's
    context (anyio copies it), so a Prefect task called there is still a task run of this
    flow run, with its logger and its cache policy."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


@asynccontextmanager
async def renewing_every(
    renew: Callable[[], object], *, period: timedelta, until: timedelta, what: str
) -> AsyncIterator[None]:
    """Call ``renew`` (blocking: in a worker thread) every ``period`` while the block runs,
    for at most ``until``: a block stuck past its own deadline stops renewing, so the
    reconciler sees its holder dead. A lost lease is raised into the block; any other
    failure (a slow remote) is logged and the next renewal tries again."""
    seconds = period.total_seconds()
    stop_at = time.monotonic() + until.total_seconds()

    async def loop() -> None:
        while time.monotonic() + seconds < stop_at:
            await anyio.sleep(seconds)
            try:
                await anyio.to_thread.run_sync(renew)
            except LeaseLost:
                raise
            except RoboticsCDError as exc:
                run_logger("robotics_cd.lease").warning("%s failed, retrying: %s", what, exc)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(loop)
            try:
                yield
            finally:
                group.cancel_scope.cancel()
    except BaseExceptionGroup as raised:
        # anyio wraps even the block's own error in a group; the caller's handlers
        # (Superseded, ControlPlaneLost, LeaseLost, ...) must see the error itself.
        if len(raised.exceptions) == 1:
            raise raised.exceptions[0]  # noqa: B904 (the group is only a wrapper)
        raise
