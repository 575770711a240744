"""The gateway's own HTTP client: one request over an upstream pool, as a coroutine.

Owns `fetch()`, used off the request path (JWKS refresh; later the custom authorizer):
it speaks to the same `pool.TargetPool` connections as the proxy, through a
`ClientExchange` that implements the exchange callbacks the pool and
`UpstreamConnection` call, and resolves a future with `(status, headers, body)`.

Invariants:
- Bounded: the response body is cut off at `max_bytes` (the connection is then closed,
  not reused) and the whole call is bounded by `timeout`.
- The connection goes back to the pool reusable only when the response was read to its
  end and the upstream allows keep-alive, as in the proxy. The pool's hygiene rules hold
  here too, because they live in `pool.UpstreamConnection`, not in the exchange: the
  release from `on_response_complete` (a parser callback) takes effect only after the
  read is parsed; bytes after the response close the connection without failing this
  call (its answer was complete); a response head past `pool.MAX_RESPONSE_HEAD`, within
  one read or across reads, fails it through `on_upstream_failed`.
- The future is resolved exactly once; every later callback is ignored.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from edgeplane.config.model import Target
from edgeplane.http.fields import UnsafeField, field_line
from edgeplane.upstream.pool import PoolOverflow

if TYPE_CHECKING:
    from edgeplane.upstream.pool import TargetPool, UpstreamConnection


class FetchError(Exception):
    """The request failed: connect error, timeout, reset, bad response, too large."""


class ClientExchange:
    __slots__ = ("pool", "future", "conn", "head", "status", "headers", "body", "size",
                 "max_bytes", "cancelled", "wait_started", "out", "done")

    def __init__(self, pool: TargetPool, head: bytes, max_bytes: int) -> None:
        self.pool = pool
        self.future: asyncio.Future = pool.loop.create_future()
        self.conn: UpstreamConnection | None = None
        self.head = head
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.max_bytes = max_bytes
        self.cancelled = False
        self.wait_started = 0.0
        self.out: list[bytes] = []  # the pool flushes this after each read; unused here
        self.done = False

    # -- pool callbacks ---------------------------------------------------------------
    def on_connection(self, conn: UpstreamConnection) -> None:
        if self.done:
            self.pool.release(conn, True)
            return
        self.conn = conn
        conn.write(self.head)

    def on_connect_failed(self, status: int, reason: str) -> None:
        self._fail(reason)

    # -- connection callbacks ---------------------------------------------------------
    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if status >= 200:
            self.status = status
            self.headers = headers

    def on_response_body(self, chunk: bytes) -> None:
        if self.done or not self.status:
            return
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self._fail(f"response larger than {self.max_bytes} bytes")
            return
        self.body.append(chunk)

    def on_response_complete(self, keep_alive: bool) -> None:
        if self.done or not self.status:
            return  # an interim (1xx) response: the final one follows
        self.done = True
        conn, self.conn = self.conn, None
        if conn is not None:
            self.pool.release(conn, keep_alive)
        self.future.set_result((self.status, self.headers, b"".join(self.body)))

    def on_upstream_lost(self, conn: UpstreamConnection, reason: str) -> None:
        self.conn = None
        self._fail(reason.replace("_", " "))

    def on_upstream_failed(self, reason: str) -> None:
        self.conn = None
        self._fail(reason)

    def on_upstream_write_paused(self, paused: bool) -> None:
        pass  # requests are small; nothing to pause

    def flush(self) -> None:
        self.out.clear()

    def _fail(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self.cancelled = True
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close("client_aborted")
        if not self.future.done():
            self.future.set_exception(FetchError(reason))


async def fetch(pool: TargetPool, method: str, path: str, *, headers: dict[str, str] | None = None,
                body: bytes = b"", timeout: float = 1.5, max_bytes: int = 1 << 20) -> tuple[int, list, bytes]:
    """One request; returns (status, raw headers, body) or raises FetchError."""
    lines = [f"{method} {path} HTTP/1.1\r\nhost: {pool.authority.decode()}\r\n"
             f"user-agent: edgeplane\r\ncontent-length: {len(body)}\r\n".encode("latin-1")]
    try:  # every header value passes the choke point: nothing can add a line or a request
        lines += [field_line(k.encode("latin-1"), v.encode("utf-8")) for k, v in (headers or {}).items()]
    except (UnsafeField, UnicodeEncodeError) as exc:
        raise FetchError(f"refused to send the request: {exc}") from None
    head = b"".join(lines) + b"\r\n" + body
    exchange = ClientExchange(pool, head, max_bytes)
    try:
        conn = pool.acquire(exchange)
    except PoolOverflow:
        raise FetchError("upstream connection pool is full") from None
    if conn is not None:
        exchange.on_connection(conn)
    try:
        return await asyncio.wait_for(asyncio.shield(exchange.future), timeout)
    except TimeoutError:
        _abandon(exchange, "timeout")
        raise FetchError(f"no complete response within {timeout:g}s") from None
    except asyncio.CancelledError:
        _abandon(exchange, "cancelled")
        raise


def _abandon(exchange: ClientExchange, reason: str) -> None:
    exchange._fail(reason)
    future = exchange.future
    if future.done() and not future.cancelled():
        future.exception()  # retrieved: nobody waits for it any more


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def split_url(url: str) -> tuple[Target, str]:
    """An http(s) URL as (target, path with query); ValueError when it is not one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, parts.hostname, port), path
