"""A lean HTTP/1.1 transport for httpx, for the load generator of :mod:`bench.api`.

The load generator shares this 2-core machine with the server it measures, so every microsecond of
CPU it spends per request is taken from the server. With httpx's default transport (httpcore + h11
on anyio) a request costs the generator about 0.5 ms of CPU, more than a read costs our server; at
16 clients the generator used about 1.4 of the 2 cores, and the figures measured it as much as the
server. This transport keeps httpx's client API (``httpx.AsyncClient(transport=LeanTransport())``,
the same requests, headers, ``httpx.Response`` objects and ``httpx.HTTPError`` exceptions) and
replaces what sits under it: one keep-alive connection per transport (each bench client has its own,
as before), an :class:`asyncio.Protocol` and llhttp's response parser (``httptools``, already
installed for uvicorn) instead of a connection pool, h11 and anyio streams.

It is a benchmark tool, not a general client: plain ``http://`` only, one request at a time per
transport (what a bench client does), responses read whole (``Content-Length`` or chunked; a
response delimited by closing the connection is not supported: neither server sends one).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
import httpx

__all__ = ["LeanTransport"]


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: writes a request, parses its response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes, bool]] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.closed = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(httpx.ReadError(f"the server closed the connection: {exc or 'end of stream'}"))

    # -- httptools callbacks ------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            keep = self.parser.should_keep_alive()
            waiter.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body), keep))

    # -- use ----------------------------------------------------------------------------------------
    def send(self, data: bytes) -> asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes, bool]]:
        assert self.transport is not None
        self.headers, self.body = [], []
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class LeanTransport(httpx.AsyncBaseTransport):
    """httpx transport over one keep-alive connection (see the module docstring)."""

    def __init__(self) -> None:
        self._connection: _Connection | None = None

    async def _connect(self, url: httpx.URL, timeout: float | None) -> _Connection:
        connection = self._connection
        if connection is not None and not connection.closed:
            return connection
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(loop.create_connection(_Connection, url.host, url.port or 80), timeout)
        except (OSError, TimeoutError) as exc:
            raise httpx.ConnectError(f"cannot connect to {url.host}:{url.port}: {exc}") from exc
        self._connection = protocol
        return protocol

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol("LeanTransport speaks plain http:// only")
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        connection = await self._connect(request.url, timeouts.get("connect"))
        body = request.content  # bench requests carry bytes (or nothing)
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.url.raw_path)]
        head.extend(b"%s: %s\r\n" % (name, value) for name, value in request.headers.raw)
        head.append(b"\r\n")
        waiter = connection.send(b"".join(head) + body)
        read_timeout = timeouts.get("read")
        timer = None
        if read_timeout is not None:
            timer = asyncio.get_running_loop().call_later(
                read_timeout, connection._fail, httpx.ReadTimeout(f"no answer in {read_timeout} s")
            )
        try:
            status, headers, content, keep_alive = await waiter
        except BaseException:
            connection.close()  # a request left half-answered: the connection cannot be reused
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not keep_alive:
            connection.close()
        return httpx.Response(
            status,
            headers=headers,
            stream=httpx.ByteStream(content),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
