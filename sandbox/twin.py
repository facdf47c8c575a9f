"""The twin server: one process that speaks the protocols that cannot run here.

It loads ``twin-config.json`` from the state dir, opens the Kubernetes object store, then
starts each component in ``COMPONENTS`` (a module with ``async def start(ctx)`` that starts
its own servers and background tasks and returns). When every component has started it
writes ``twin.ready`` (JSON: the ports it serves) so launchers can wait on it.

Config keys read here: ``components`` (a list narrowing what starts), ``kube_event_history``
(watch events kept for resumption, default 5000). The Kubernetes API component reads
``kube_port``, ``kube_token`` and ``kube_bookmark_seconds`` and writes ``<state>/kubeconfig``.

Run: ``python -m sandbox.twin --state DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

if TYPE_CHECKING:
    from sandbox.kube.store import ObjectStore

log = logging.getLogger("sandbox.twin")

COMPONENTS: tuple[str, ...] = (
    "sandbox.kube.api",  # Kubernetes API (issue 3)
    "sandbox.runtime",  # pods as containers, router, load, metrics, faults (issue 4)
    "sandbox.argocd",  # Argo CD REST (issue 5)
    "sandbox.github",  # GitHub REST + chat sink (issue 5)
    "sandbox.pytorchjob",  # PyTorchJob controller (issue 9)
    "sandbox.trainjob",  # Kubeflow Trainer v2 TrainJob controller (+ JobSet) (issue 23)
    "sandbox.docker_tcp",  # the Docker Engine on 127.0.0.1 TCP for flow-run Jobs (issue 19)
)


@dataclass
class TwinContext:
    state_dir: Path
    config: dict[str, Any]
    store: ObjectStore
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    served: dict[str, Any] = field(default_factory=dict)

    def port(self, key: str) -> int:
        """``config[key]`` if set (e.g. ``"argocd_port"``), else a free port on 127.0.0.1.

        Components should start with a minimal config, so a missing port is not an error.
        """
        from sandbox.procs import free_port

        configured = self.config.get(key)
        return int(configured) if configured else free_port()

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.append(task)
        return task

    async def serve(
        self,
        app: Any,
        port: int,
        name: str,
        *,
        ssl_certfile: Path | None = None,
        ssl_keyfile: Path | None = None,
    ) -> None:
        """Serve an ASGI app on 127.0.0.1:port (HTTPS if a cert is given) until it listens."""
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                log_level="warning",
                lifespan="off",
                ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
                # Long-lived watch streams must not hold the twin's shutdown.
                timeout_graceful_shutdown=2,
            )
        )
        self.spawn(server.serve(), f"http:{name}")
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"{name} did not start listening on 127.0.0.1:{port}")
        self.served[name] = port


async def run(state_dir: Path) -> None:
    config = json.loads((state_dir / "twin-config.json").read_text())
    from sandbox.kube.store import ObjectStore

    store = ObjectStore(
        state_dir / "kube", event_history=int(config.get("kube_event_history", 5000))
    )
    ctx = TwinContext(state_dir=state_dir, config=config, store=store)
    # "components" in twin-config.json narrows what starts (e.g. only "sandbox.kube.api").
    for name in config.get("components", COMPONENTS):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            log.warning("twin component %s not present; skipped", name)
            continue
        start = getattr(module, "start", None)
        if start is None:
            # A component still being written (a bare package): not an error, but visible.
            log.warning("twin component %s has no start(ctx) yet; skipped", name)
            continue
        await start(ctx)
        log.info("twin component %s started", name)
    (state_dir / "twin.ready").write_text(json.dumps(ctx.served))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for task in ctx.tasks:
        task.cancel()
    for task in ctx.tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    stop_hook = getattr(store, "close", None)
    if stop_hook:
        stop_hook()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    (args.state / "twin.ready").unlink(missing_ok=True)
    asyncio.run(run(args.state))


if __name__ == "__main__":
    main()
