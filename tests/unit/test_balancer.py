"""The Prefect balancer against tiny in-process backends: health-checked round-robin, bytes
passed both ways after an Upgrade (as a WebSocket is), and 503 + Retry-After when no
backend is healthy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import httpx

from sandbox.balancer import Backend, Balancer


class FakeServer:
    """Answers ``/api/health`` (200, or 503 when ``sick``); any other request gets a
    ``101 Switching Protocols`` naming the server, then its bytes echoed back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sick = False
        self.port = 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /api/health"):
            code = b"503 Service Unavailable" if self.sick else b"200 OK"
            writer.write(b"HTTP/1.1 " + code + b"\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()
            return
        writer.write(f"HTTP/1.1 101 Switching Protocols\r\nX-Server: {self.name}\r\n\r\n".encode())
        await writer.drain()
        while chunk := await reader.read(1024):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def balanced(*servers: FakeServer) -> AsyncIterator[tuple[Balancer, int]]:
    for server in servers:
        await server.start()
    balancer = Balancer([Backend("127.0.0.1", s.port) for s in servers], interval=0.05, hold=0.5)
    front = await asyncio.start_server(balancer.handle, "127.0.0.1", 0)
    health = asyncio.create_task(balancer.check_health())
    try:
        await asyncio.wait_for(_until(lambda: any(b.healthy for b in balancer.backends)), 5)
        yield balancer, front.sockets[0].getsockname()[1]
    finally:
        health.cancel()
        front.close()
        for server in servers:
            assert server.server is not None
            server.server.close()


async def _until(check: Callable[[], bool]) -> None:
    while not check():
        await asyncio.sleep(0.02)


async def _upgrade(port: int, payload: bytes) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /api/events/in HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode()
    writer.write(payload)
    await writer.drain()
    echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
    writer.close()
    server = next(line for line in head.split("\r\n") if line.startswith("X-Server"))
    return server.split(": ", 1)[1], echoed


async def test_upgraded_connections_pass_both_ways_and_alternate_servers():
    a, b = FakeServer("a"), FakeServer("b")
    async with balanced(a, b) as (balancer, port):
        await asyncio.wait_for(_until(lambda: all(x.healthy for x in balancer.backends)), 5)
        served = [await _upgrade(port, f"frame {i}".encode()) for i in range(4)]
    assert [echo for _, echo in served] == [f"frame {i}".encode() for i in range(4)]
    assert {name for name, _ in served} == {"a", "b"}


async def test_a_sick_server_gets_no_new_connections():
    a, b = FakeServer("a"), FakeServer("b")
    b.sick = True
    async with balanced(a, b) as (_, port):
        served = {(await _upgrade(port, b"x"))[0] for _ in range(4)}
    assert served == {"a"}


async def test_no_healthy_server_means_503_with_retry_after():
    a = FakeServer("a")
    async with balanced(a) as (balancer, port):
        a.sick = True
        await asyncio.wait_for(_until(lambda: not balancer.backends[0].healthy), 5)
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/api/flows/filter")
            state = (await client.get(f"http://127.0.0.1:{port}/_balancer")).json()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert state["backends"][0]["healthy"] is False
