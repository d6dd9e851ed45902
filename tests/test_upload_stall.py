"""Uploads through the upstream client (tornado_gateway.http.client) must not wait for the
server's delayed ACK.

The client writes a request in pieces (the head, then each body piece). Without TCP_NODELAY on
the upstream socket, Linux holds a short segment while an earlier short one is unacknowledged,
and the kernel of a server on a kept-alive connection delays that ACK by 40 ms: through the
gateway, an analyze upload's last piece sat in the gateway's socket that long in many requests.

These tests look at the socket, not at a clock: its option, and the bytes the kernel still
holds unsent right after each write (``SIOCOUTQNSD``).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import ssl
import struct
import sys
from typing import Any

import pytest
import tornado.test

from tornado_gateway.http import client as client_mod
from tornado_gateway.http.client import UpstreamHTTPClient

#: linux/sockios.h: bytes in the send queue not yet sent (written but held back).
SIOCOUTQNSD = 0x894B

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="SIOCOUTQNSD, TCP_QUICKACK")


class RecordingServer(asyncio.Protocol):
    """A raw HTTP/1.1 server: records each request body as received (framing included) and
    answers 200 with its length. On Linux it keeps its kernel in delayed-ACK mode, as a
    server's is on a kept-alive connection once it has answered."""

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies = bodies
        self.buf = b""
        self.sock: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.sock = transport.get_extra_info("socket")
        self._delay_acks()

    def _delay_acks(self) -> None:
        # Not a lasting setting: the kernel may return to quick ACKs, so it is set again
        # after every read.
        if hasattr(socket, "TCP_QUICKACK") and self.sock is not None:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)

    def data_received(self, data: bytes) -> None:
        self._delay_acks()
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            fields = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
            }
            if fields.get(b"transfer-encoding") == b"chunked":
                end = rest.find(b"\r\n0\r\n\r\n")  # the test's pieces hold no CR or LF
                if end < 0:
                    return
                body, self.buf = rest[: end + 7], rest[end + 7 :]
            else:
                length = int(fields.get(b"content-length", b"0"))
                if len(rest) < length:
                    return
                body, self.buf = rest[:length], rest[length:]
            self.bodies.append(body)
            answer = str(len(body)).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(answer), answer))


async def start_upstream(tls: bool = False) -> tuple[asyncio.AbstractServer, str, list[bytes]]:
    """The server on a free port of 127.0.0.1, its base URL, and its list of bodies."""
    context = None
    if tls:
        certs = os.path.dirname(tornado.test.__file__)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(os.path.join(certs, "test.crt"), os.path.join(certs, "test.key"))
    bodies: list[bytes] = []
    server = await asyncio.get_running_loop().create_server(
        lambda: RecordingServer(bodies), "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    return server, "%s://127.0.0.1:%d" % ("https" if tls else "http", port), bodies


def pooled_socket(client: UpstreamHTTPClient) -> Any:
    """The TCP socket under the client's one idle connection."""
    [conn] = [conn for idle in client._idle.values() for conn, _since in idle]
    return conn.transport.get_extra_info("socket")


def unsent(sock: Any) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0" * 4))[0]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_upstream_connections_disable_nagle(io_loop, tls):
    server, url, _bodies = await start_upstream(tls)
    client = UpstreamHTTPClient(force_instance=True)
    try:
        response = await client.fetch(url + "/", validate_cert=False)
        assert response.body == b"0"
        sock = pooled_socket(client)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        client.close()
        server.close()


@linux_only
@pytest.mark.timeout(10)
async def test_body_pieces_leave_at_once_on_a_kept_alive_connection(io_loop):
    """Each piece a body producer writes is on the wire when its write returns, even though
    the server has not yet acknowledged the head (or the piece before)."""
    server, url, bodies = await start_upstream()
    client = UpstreamHTTPClient(force_instance=True)
    pieces = [b"a" * 100, b"b" * 1000, b"c" * 10, b"d" * 3000]
    try:
        await client.fetch(url + "/", method="POST", body=b"warm")  # now a pooled connection
        sock = pooled_socket(client)
        held: list[int] = []

        async def produce(write: Any) -> None:
            for piece in pieces:
                await write(piece)
                held.append(unsent(sock))

        for _ in range(3):
            held.clear()
            response = await client.fetch(
                url + "/", method="POST", body_producer=produce,
                headers={"Content-Length": str(sum(map(len, pieces)))})
            assert response.body == b"4110"
            assert held == [0] * len(pieces), "bytes held in the socket after each write"
        assert client.stats["connected"] == 1
        assert bodies[1:] == [b"".join(pieces)] * 3
    finally:
        client.close()
        server.close()


@pytest.mark.timeout(10)
async def test_each_chunk_of_a_chunked_body_is_one_write(io_loop, monkeypatch):
    """Size line, data and CRLF leave together: with Nagle off, every write is a segment."""
    writes: list[bytes] = []
    original = client_mod._Upstream.write

    def recording_write(self: Any, data: bytes) -> Any:
        writes.append(bytes(data))
        return original(self, data)

    monkeypatch.setattr(client_mod._Upstream, "write", recording_write)
    server, url, bodies = await start_upstream()
    client = UpstreamHTTPClient(force_instance=True)
    pieces = [b"x" * 100, b"y" * 70_000, b"z"]

    async def produce(write: Any) -> None:
        for piece in pieces:
            await write(piece)

    try:
        await client.fetch(url + "/", method="POST", body_producer=produce)
    finally:
        client.close()
        server.close()
    framed = [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces]
    assert writes[0].startswith(b"POST / HTTP/1.1\r\n")
    assert writes[1:] == framed + [b"0\r\n\r\n"]
    assert bodies == [b"".join(framed) + b"0\r\n\r\n"]
