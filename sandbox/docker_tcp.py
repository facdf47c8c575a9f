"""The sandbox's Docker Engine on 127.0.0.1 TCP, for flow runs that have no docker.sock.

A flow run in a Kubernetes Job (issue 19) reaches the engine through the ``DockerHost``
block's URL, never a mounted ``/var/run/docker.sock``. Debian's dockerd listens on its unix
socket only (the machine's dockerd is shared, so the sandbox does not restart it with
``-H tcp://``); this twin component listens on ``127.0.0.1:<docker_tcp_port>`` and copies
bytes both ways to the unix socket, connection by connection. Everything the Engine API does
over a socket works through it: streamed builds, pushes, ``attach`` and ``exec`` upgrades
(the copy is byte-for-byte, half-closes included).

Loopback only, no TLS and no auth, like the unix socket it stands for: anything that can
connect to 127.0.0.1 is root on this machine through it, as anything that can open the
socket is. On ACK its place is taken by a remote builder: docs/remote-builds.md.

Config keys: ``docker_tcp_port`` (no key: the component does not start) and
``docker_unix_socket`` (default ``/var/run/docker.sock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

log = logging.getLogger("sandbox.docker_tcp")

DEFAULT_SOCKET = "/var/run/docker.sock"
CHUNK = 256 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close the other side (what the peer does next is its own)."""
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


def forwarder(socket_path: str) -> Any:
    """A ``start_server`` callback joining each TCP connection to a new unix connection."""

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            engine_r, engine_w = await asyncio.open_unix_connection(socket_path)
        except OSError as exc:
            log.warning("docker engine at %s unreachable: %s", socket_path, exc)
            await _close(client_w)
            return
        try:
            await asyncio.gather(_pipe(client_r, engine_w), _pipe(engine_r, client_w))
        finally:
            await _close(engine_w)
            await _close(client_w)

    return handle


async def serve(port: int, socket_path: str) -> asyncio.Server:
    return await asyncio.start_server(forwarder(socket_path), "127.0.0.1", port)


async def start(ctx: Any) -> None:
    """Twin component entry point: listen when the config names a port."""
    port = ctx.config.get("docker_tcp_port")
    if not port:
        return
    socket_path = str(ctx.config.get("docker_unix_socket") or DEFAULT_SOCKET)
    server = await serve(int(port), socket_path)

    async def keep() -> None:
        async with server:
            await server.serve_forever()

    ctx.spawn(keep(), "docker-tcp")
    ctx.served["docker_tcp"] = int(port)
    log.info("docker engine %s on tcp://127.0.0.1:%s", socket_path, port)
