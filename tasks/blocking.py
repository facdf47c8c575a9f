"""Blocking calls from async flows, off the event loop.

The release flows are async: while one step waits, the same loop renews the production
lease, watches for operator commands and answers cancellation. A sync task (GitPython, a
``time.sleep``-paced metrics window, a sync HTTP client) called inline would stop all of
that for as long as it runs: a staging window of a minute is a minute of no lease renewal.
Every blocking call an async flow makes goes through :func:`in_thread`;
tests/unit/test_async_flows.py holds the flows to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, overload

import anyio.to_thread
from prefect import Task

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
