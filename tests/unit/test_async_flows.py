"""The async flows never block their event loop on a sync call.

While a release waits on a metrics window or a git push, the same loop renews its
production lease and watches for operator commands: a sync task called inline (GitPython,
a ``time.sleep``-paced window, a sync HTTP client) stops both for as long as it runs. So
every blocking call in an async function of ``flows/`` goes through
``tasks.blocking.in_thread``.

"Blocking" here: a Prefect task whose function is sync, or a sync function of the same
flow module that makes such a call (followed to a fixpoint). Lambdas are handed to
``in_thread`` (or to ``measured``, which runs them there), so their bodies are not inline.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import time
from types import ModuleType
from typing import Any

import anyio
import pytest
from prefect import Task

import flows
from tasks.blocking import in_thread


def _flow_modules() -> list[ModuleType]:
    return [
        importlib.import_module(f"flows.{info.name}")
        for info in pkgutil.iter_modules(flows.__path__)
    ]


def _callee(mod: ModuleType, call: ast.Call) -> tuple[str, Any]:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id, mod.__dict__.get(func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        base = mod.__dict__.get(func.value.id)
        return f"{func.value.id}.{func.attr}", getattr(base, func.attr, None)
    if isinstance(func, ast.Attribute) and func.attr == "fn":  # a task's function, bare
        label, task = _callee(mod, ast.Call(func=func.value, args=[], keywords=[]))
        return f"{label}.fn", task
    return "", None


def _inline_calls(mod: ModuleType, fn: ast.AST) -> list[ast.Call]:
    """The calls in ``fn``'s body that run on its own thread (not inside a lambda or a
    nested function)."""
    out: list[ast.Call] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(child, ast.Call):
                out.append(child)
            visit(child)

    visit(fn)
    return out


def _blocking_calls(mod: ModuleType) -> list[str]:
    tree = ast.parse(inspect.getsource(mod))
    local_sync = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}

    def is_sync_task(obj: Any) -> bool:
        return isinstance(obj, Task) and not inspect.iscoroutinefunction(obj.fn)

    blocking: set[str] = set()
    changed = True
    while changed:  # a sync helper of the module that calls a sync task blocks too
        changed = False
        for name, node in local_sync.items():
            if name in blocking:
                continue
            for call in _inline_calls(mod, node):
                label, obj = _callee(mod, call)
                if is_sync_task(obj) or label in blocking:
                    blocking.add(name)
                    changed = True
                    break

    found = []
    for flow_node in ast.walk(tree):
        if not isinstance(flow_node, ast.AsyncFunctionDef):
            continue
        for call in _inline_calls(mod, flow_node):
            label, obj = _callee(mod, call)
            if is_sync_task(obj) or label in blocking:
                found.append(
                    f"{mod.__name__}:{call.lineno} {flow_node.name}() calls {label} inline"
                )
    return found


@pytest.mark.parametrize("mod", _flow_modules(), ids=lambda m: m.__name__)
def test_async_flows_run_their_blocking_calls_in_a_thread(mod: ModuleType) -> None:
    assert _blocking_calls(mod) == []


def test_the_rule_sees_a_sync_task_called_inline() -> None:
    """The check itself: a module with an async function calling a sync task is caught,
    and the same call through in_thread is not."""
    mod = ModuleType("flows_probe")
    source = (
        "async def bad():\n    blocking()\n"
        "async def good():\n    await in_thread(blocking)\n"
        "def helper():\n    blocking()\n"
        "async def via_helper():\n    helper()\n"
    )
    exec(compile(source, "flows_probe", "exec"), mod.__dict__)
    mod.__dict__["blocking"] = Task(lambda: None, name="blocking")
    mod.__dict__["in_thread"] = in_thread
    inspect_getsource = inspect.getsource
    try:
        inspect.getsource = lambda m: source  # type: ignore[assignment]
        found = _blocking_calls(mod)
    finally:
        inspect.getsource = inspect_getsource
    assert [f.split(" ", 1)[1] for f in found] == [
        "bad() calls blocking inline",
        "via_helper() calls helper inline",
    ]


def test_in_thread_keeps_the_loop_serving_while_the_call_blocks() -> None:
    """A one-second blocking call in a thread: the loop ticks meanwhile."""
    import time

    ticks = 0

    def sleep_and_return(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    async def main() -> float:
        nonlocal ticks

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            slept = await in_thread(sleep_and_return, 0.5)
            tg.cancel_scope.cancel()
        return slept

    assert anyio.run(main) == 0.5
    assert ticks >= 3  # inline, the loop would have ticked once, before the call


def test_the_renewal_runs_beside_the_block_and_stops_at_its_limit() -> None:
    """Every period while the block runs, at most ``until``; a failure of the remote is
    retried at the next period; a lost lease ends the block with LeaseLost."""
    from datetime import timedelta

    from core.errors import GitOpsError, LeaseLost
    from tasks.blocking import renewing_every

    calls: list[float] = []

    def renew() -> None:
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise GitOpsError("the remote is slow")

    async def until_calls(n: int) -> None:
        with anyio.fail_after(30):
            async with renewing_every(
                renew, period=timedelta(seconds=0.05), until=timedelta(seconds=60), what="t"
            ):
                while len(calls) < n:
                    await anyio.sleep(0.01)

    anyio.run(until_calls, 4)  # kept renewing after the failed second call

    calls.clear()

    async def stuck() -> float:
        start = time.monotonic()
        async with renewing_every(
            renew, period=timedelta(seconds=0.05), until=timedelta(seconds=0.3), what="t"
        ):
            await anyio.sleep(0.8)  # past its limit: renewals stop, the block goes on
        return start

    start = anyio.run(stuck)
    # none after the limit (a sleep may overrun a little under load; the block runs 0.8 s)
    assert calls and all(at - start < 0.55 for at in calls)

    def lost() -> None:
        raise LeaseLost("api-gateway-production", "me", "someone-else")

    async def held() -> None:
        async with renewing_every(
            lost, period=timedelta(seconds=0.05), until=timedelta(seconds=5), what="t"
        ):
            await anyio.sleep(2)

    with pytest.raises(LeaseLost):  # itself, not wrapped: the flow's `except LeaseLost` sees it
        anyio.run(held)


def test_the_blocks_own_error_comes_out_of_the_renewal_unwrapped() -> None:
    """anyio wraps a task group's errors in an ExceptionGroup, the host's own included: a
    Superseded or ControlPlaneLost raised by a sync under renewal came out of `renewing` as
    an ExceptionGroup, which the release's handlers do not match (it fell to the generic
    rollback, named "ExceptionGroup: unhandled errors in a TaskGroup")."""
    from datetime import timedelta

    from core.errors import ControlPlaneLost
    from tasks.blocking import renewing_every

    async def block() -> None:
        async with renewing_every(
            lambda: None, period=timedelta(seconds=0.05), until=timedelta(seconds=5), what="t"
        ):
            await anyio.sleep(0.12)
            raise ControlPlaneLost("Argo CD did not answer")

    with pytest.raises(ControlPlaneLost, match="did not answer"):
        anyio.run(block)
