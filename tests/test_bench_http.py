"""The load generator's httpx transport (bench/_http.py) against a real HTTP server on 127.0.0.1.

The server is a small asyncio one written here so that each test can choose how it answers:
Content-Length or chunked bodies, keep-alive or ``Connection: close``, or a dropped connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from bench._http import LeanTransport

pytestmark = pytest.mark.anyio

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # request head -> keep the connection?


async def _serve(handler: Handler) -> tuple[asyncio.Server, list[int]]:
    connections: list[int] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                body = await reader.readexactly(length)
                if not await handler(head + body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    return server, connections


@pytest.fixture
async def served() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[str, list[int]]]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> tuple[str, list[int]]:
        server, connections = await _serve(handler)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}", connections

    yield start
    for server in servers:
        server.close()


def _client(base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, transport=LeanTransport(), timeout=5.0)


async def test_requests_and_answers_go_through_unchanged_on_one_connection(served) -> None:
    seen: list[bytes] = []

    async def echo(request: bytes, writer: asyncio.StreamWriter) -> bool:
        seen.append(request)
        body = b'{"echo": %d}' % len(request)
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/fhir+json\r\nLocation: /x/1\r\n")
        writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        return True

    base, connections = await served(echo)
    async with _client(base) as client:
        first = await client.post("/fhir/Patient?x=1", content=b'{"resourceType": "Patient"}', headers={"X-A": "b"})
        second = await client.get("/fhir/Patient/1")
    assert first.status_code == 201 and second.status_code == 201
    assert first.headers["location"] == "/x/1" and first.headers["content-type"] == "application/fhir+json"
    assert first.json() == {"echo": len(seen[0])}
    assert seen[0].startswith(b"POST /fhir/Patient?x=1 HTTP/1.1\r\n")
    assert b"\r\nx-a: b\r\n" in seen[0].lower() and seen[0].endswith(b'\r\n\r\n{"resourceType": "Patient"}')
    assert seen[1].startswith(b"GET /fhir/Patient/1 HTTP/1.1\r\n")
    assert connections == [1]  # keep-alive: both requests on one connection


async def test_a_chunked_answer_is_read_whole(served) -> None:
    async def chunked(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        return True

    base, _ = await served(chunked)
    async with _client(base) as client:
        assert (await client.get("/")).text == "hello world"
        assert (await client.get("/")).text == "hello world"


async def test_a_closed_connection_is_replaced_for_the_next_request(served) -> None:
    async def once(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        return False

    base, connections = await served(once)
    async with _client(base) as client:
        for _ in range(3):
            assert (await client.get("/")).text == "ok"
    assert connections == [1, 1, 1]


async def test_a_dropped_connection_and_no_server_are_httpx_errors(served) -> None:
    async def drop(request: bytes, writer: asyncio.StreamWriter) -> bool:
        return False  # closes without an answer

    base, _ = await served(drop)
    async with _client(base) as client:
        with pytest.raises(httpx.ReadError):
            await client.get("/")
    server, _ = await _serve(drop)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with _client(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/")


async def test_no_answer_in_time_is_a_read_timeout(served) -> None:
    async def silent(request: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    base, _ = await served(silent)
    async with httpx.AsyncClient(base_url=base, transport=LeanTransport(), timeout=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/")
