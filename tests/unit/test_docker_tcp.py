"""The sandbox's TCP door to the Docker Engine's unix socket (sandbox/docker_tcp.py), on a
stand-in unix server: bytes both ways unchanged, a half-close passed on (an Engine API
``attach`` ends its stdin that way and still reads the output), and a dead socket closes
the client's connection instead of hanging it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sandbox import docker_tcp
from sandbox.procs import free_port


async def _echo_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    received = await reader.read()  # to EOF: the client half-closed
    writer.write(b"got:" + received)
    await writer.drain()
    writer.close()


async def test_bytes_and_a_half_close_cross_the_forwarder(tmp_path: Path) -> None:
    socket_path = str(tmp_path / "engine.sock")
    engine = await asyncio.start_unix_server(_echo_until_eof, socket_path)
    port = free_port()
    server = await docker_tcp.serve(port, socket_path)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = bytes(range(256)) * 4096  # 1 MiB, more than one chunk
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
        assert answer == b"got:" + payload
        writer.close()
    finally:
        server.close()
        engine.close()


async def test_an_engine_that_does_not_answer_closes_the_client(tmp_path: Path) -> None:
    port = free_port()
    server = await docker_tcp.serve(port, str(tmp_path / "absent.sock"))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""
        writer.close()
    finally:
        server.close()
