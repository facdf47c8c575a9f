"""One address in front of several Prefect API servers: a small TCP balancer (asyncio).

It works at the connection level, as nginx's ``stream`` module does, so HTTP keep-alive,
WebSockets (the UI's and the event stream's) and anything else pass untouched. Each backend
is health-checked every ``--interval`` seconds (``GET /api/health``); a new connection goes
round-robin to a healthy backend. When none is healthy, the connection waits up to
``--hold`` seconds for one, then gets ``503`` with ``Retry-After``: Prefect's client retries
503s with backoff, so a restart of every server is a pause, not an error.

``GET /_balancer`` on the balancer's own address answers its state as JSON (backends, health,
connections served), for ``sandbox status`` and the tests.

Run: ``python -m sandbox.balancer --port 4200 --backend 127.0.0.1:4201 --backend ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
from dataclasses import asdict, dataclass

import httpx

STATUS_PATH = b"GET /_balancer"


@dataclass
class Backend:
    host: str
    port: int
    healthy: bool = False
    connections: int = 0
    failures: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class Balancer:
    def __init__(
        self, backends: list[Backend], *, interval: float = 1.0, hold: float = 10.0
    ) -> None:
        self.backends = backends
        self.interval = interval
        self.hold = hold
        self._turn = itertools.cycle(range(len(backends)))
        self._health_changed = asyncio.Event()

    async def check_health(self) -> None:
        async with httpx.AsyncClient(timeout=max(self.interval * 2, 2.0)) as client:
            while True:
                for backend in self.backends:
                    try:
                        response = await client.get(f"http://{backend.address}/api/health")
                        healthy = response.status_code == 200
                    except httpx.HTTPError:
                        healthy = False
                    if healthy != backend.healthy:
                        backend.healthy = healthy
                        self._health_changed.set()
                await asyncio.sleep(self.interval)

    async def _pick(self) -> Backend | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold
        while True:
            for _ in self.backends:
                backend = self.backends[next(self._turn)]
                if backend.healthy:
                    return backend
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            self._health_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._health_changed.wait(), timeout=min(remaining, 0.5))

    def state(self) -> dict[str, object]:
        return {"backends": [asdict(b) for b in self.backends]}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await asyncio.wait_for(reader.read(65536), timeout=30)
        except (TimeoutError, ConnectionError):
            writer.close()
            return
        if not first:
            writer.close()
            return
        if first.startswith(STATUS_PATH):
            await _answer(writer, 200, json.dumps(self.state()))
            return
        for _attempt in range(len(self.backends) + 1):
            backend = await self._pick()
            if backend is None:
                await _answer(writer, 503, '{"detail": "no Prefect API server is healthy"}')
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(backend.host, backend.port)
            except OSError:
                backend.healthy = False
                backend.failures += 1
                continue
            backend.connections += 1
            up_writer.write(first)
            await asyncio.gather(
                _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
            )
            return
        await _answer(writer, 503, '{"detail": "no Prefect API server accepted the connection"}')


async def _answer(writer: asyncio.StreamWriter, code: int, body: str) -> None:
    reason = {200: "OK", 503: "Service Unavailable"}[code]
    data = body.encode()
    writer.write(
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while chunk := await src.read(65536):
            dst.write(chunk)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        # A closed side ends the other one too: a half-open pair would leak.
        dst.close()


async def serve(port: int, backends: list[Backend], *, interval: float, hold: float) -> None:
    balancer = Balancer(backends, interval=interval, hold=hold)
    server = await asyncio.start_server(balancer.handle, "127.0.0.1", port, reuse_address=True)
    health = asyncio.create_task(balancer.check_health())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    health.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", action="append", required=True, help="host:port")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--hold", type=float, default=10.0)
    args = parser.parse_args(argv)
    backends = [Backend(b.rsplit(":", 1)[0], int(b.rsplit(":", 1)[1])) for b in args.backend]
    asyncio.run(serve(args.port, backends, interval=args.interval, hold=args.hold))


if __name__ == "__main__":
    main()
