"""Demo upstream HTTP/1.1 server: owns `DemoUpstream` and the `demo-upstream` entry point.

A small, fast origin used by the demo, the test suite and the benchmarks (the
benchmarks put the gateway or nginx in front of it, so it must cost little CPU
per request).  It is a raw `asyncio.Protocol` over `httptools.HttpRequestParser`
with precomputed status lines and response bytes; it creates no tasks.

Endpoints (any method):
  * `/` and `/2b`          -> 200, body `ok` (2 bytes), for benchmarks.
  * `/status/{code}`       -> that status (100..599, else 400), JSON `{"status": code}`
                              (no body for 1xx/204/304).
  * `/delay/{ms}`          -> waits `ms` milliseconds (loop.call_later), then echoes.
  * `/bytes/{n}`           -> n bytes of `x`, application/octet-stream (n <= 64 MiB, else 400);
                              written in 64 KiB pieces honouring pause_writing/resume_writing.
  * `/stream/{n}`          -> chunked response with n JSON-line chunks `{"chunk": i}\\n`
                              (n <= 10000, else 400).
  * `/close`               -> 200 with `connection: close`, closes after the response.
  * anything else          -> echo: JSON `{"method", "path", "query", "headers", "body", "body_length"}`.

HEAD gets the same headers without a body.  Keep-alive follows HTTP/1.0 and 1.1
rules, pipelined requests are answered in order, `Expect: 100-continue` is
honoured, malformed requests get 400 and the connection is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from email.utils import formatdate

import httptools
import orjson

from edgeplane.http.responses import STATUS_LINES

__all__ = ["DemoUpstream", "main"]

SERVER_NAME = b"edgeplane-demo"
MAX_BYTES = 64 * 1024 * 1024
MAX_STREAM_CHUNKS = 10_000
MAX_DELAY_MS = 600_000
MAX_REQUEST_BODY = 64 * 1024 * 1024
WRITE_PIECE = 64 * 1024
MAX_QUEUED_RESPONSES = 128

# --------------------------------------------------------------------------- precomputed bytes


_STATUS_200 = STATUS_LINES[200]
_CONN_KEEP = b""
_CONN_CLOSE = b"connection: close\r\n"
_CONN_KEEP_10 = b"connection: keep-alive\r\n"
_CT_JSON = b"content-type: application/json\r\n"
_CT_OCTET = b"content-type: application/octet-stream\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_PIECE_X = b"x" * WRITE_PIECE
_STATUS_BODIES: dict[int, bytes] = {code: b'{"status": %d}' % code for code in range(100, 600)}

_date_second = -1
_date_line = b""


def _date() -> bytes:
    """`date:` + `server:` header lines, recomputed at most once per second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = (
            b"date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\nserver: " + SERVER_NAME + b"\r\n"
        )
    return _date_line


_bytes_cache: dict[int, bytes] = {}
_BYTES_CACHE_SIZE = 8


def _xbytes(n: int) -> bytes:
    """b"x" * n for n <= WRITE_PIECE, keeping the few most recent sizes."""
    b = _bytes_cache.get(n)
    if b is None:
        if len(_bytes_cache) >= _BYTES_CACHE_SIZE:
            del _bytes_cache[next(iter(_bytes_cache))]
        b = _bytes_cache[n] = _PIECE_X[:n]
    return b


def _bytes_parts(head: bytes, n: int) -> Iterator[bytes]:
    yield head
    full, rem = divmod(n, WRITE_PIECE)
    for _ in range(full):
        yield _PIECE_X
    if rem:
        yield _xbytes(rem)


def _stream_parts(head: bytes, n: int) -> Iterator[bytes]:
    yield head
    for i in range(n):
        line = b'{"chunk": %d}\n' % i
        yield b"%x\r\n%s\r\n" % (len(line), line)
    yield b"0\r\n\r\n"


def _int_arg(path: bytes, prefix_len: int) -> int | None:
    rest = path[prefix_len:]
    if not rest or len(rest) > 12 or not rest.isdigit():
        return None
    return int(rest)


# --------------------------------------------------------------------------- protocol


class _Pending:
    """One queued response: an iterator of byte pieces, possibly not ready yet (delay)."""

    __slots__ = ("parts", "ready", "close", "handle")

    def __init__(self, parts: Iterator[bytes] | None, ready: bool, close: bool) -> None:
        self.parts = parts
        self.ready = ready
        self.close = close
        self.handle: asyncio.TimerHandle | None = None


class _DemoProtocol(asyncio.Protocol):
    __slots__ = (
        "_server",
        "_loop",
        "_transport",
        "_parser",
        "_queue",
        "_paused",
        "_reading_paused",
        "_closing",
        "_url",
        "_headers",
        "_body",
        "_body_len",
        "_lost",
    )

    def __init__(self, server: DemoUpstream) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[_Pending] = deque()
        self._paused = False
        self._reading_paused = False
        self._closing = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_len = 0
        self._lost: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._server._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._closing = True
        for p in self._queue:
            if p.handle is not None:
                p.handle.cancel()
        self._queue.clear()
        self._server._conns.discard(self)
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused = False
        self._flush()
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No upgrade support: answer what was parsed, then close.
            self._enqueue_close()
        except httptools.HttpParserError:
            if not self._closing:
                self._send(self._simple(400, b'{"error": "bad request"}', _CONN_CLOSE), close=True)
        self._update_reading()

    def eof_received(self) -> bool | None:
        # Let queued responses finish; close once they are written.
        if not self._closing:
            self._enqueue_close()
        return True

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []
        self._body_len = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._closing:
            return
        for name, value in self._headers:
            if len(name) == 6 and name.lower() == b"expect":
                if value.strip().lower() == b"100-continue" and self._parser.get_http_version() == "1.1":
                    self._send(_CONTINUE)
                break

    def on_body(self, body: bytes) -> None:
        if self._closing:
            return
        self._body_len += len(body)
        if self._body_len > MAX_REQUEST_BODY:
            self._send(self._simple(413, b'{"error": "request body too large"}', _CONN_CLOSE), close=True)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._closing:
            return
        self._server.requests += 1
        parser = self._parser
        # Upgrade/CONNECT are not supported: answer (echo) and close.
        close = not parser.should_keep_alive() or parser.should_upgrade()
        if close:
            conn = _CONN_CLOSE
        elif parser.get_http_version() == "1.0":
            conn = _CONN_KEEP_10
        else:
            conn = _CONN_KEEP
        url = self._url
        qpos = url.find(b"?")
        path = url if qpos < 0 else url[:qpos]
        if path[:1] != b"/" and b"://" in path:  # absolute-form request target
            try:
                path = httptools.parse_url(url).path or b"/"
            except httptools.HttpParserInvalidURLError:
                pass
        head_only = parser.get_method() == b"HEAD"

        if path == b"/2b" or path == b"/":
            data = b"".join((_STATUS_200, _date(), conn, b"content-length: 2\r\n\r\n"))
            self._send(data if head_only else data + b"ok", close)
        elif path.startswith(b"/status/"):
            code = _int_arg(path, 8)
            if code is None or not 100 <= code <= 599:
                self._send(self._simple(400, b'{"error": "bad status code"}', conn, head_only), close)
            elif code < 200 or code == 204 or code == 304:
                self._send(b"".join((STATUS_LINES[code], _date(), conn, b"\r\n")), close)
            else:
                self._send(self._simple(code, _STATUS_BODIES[code], conn, head_only), close)
        elif path.startswith(b"/delay/"):
            ms = _int_arg(path, 7)
            if ms is None or ms > MAX_DELAY_MS:
                self._send(self._simple(400, b'{"error": "bad delay"}', conn, head_only), close)
            else:
                self._delayed(self._echo(path, url, qpos, conn, head_only), ms / 1000.0, close)
        elif path.startswith(b"/bytes/"):
            n = _int_arg(path, 7)
            if n is None or n > MAX_BYTES:
                self._send(self._simple(400, b'{"error": "bad size"}', conn, head_only), close)
            else:
                head = b"".join((_STATUS_200, _date(), conn, _CT_OCTET, b"content-length: %d\r\n\r\n" % n))
                if head_only or n == 0:
                    self._send(head, close)
                elif n <= 16384:
                    self._send(head + _xbytes(n), close)
                else:
                    self._send_parts(_bytes_parts(head, n), close)
        elif path.startswith(b"/stream/"):
            n = _int_arg(path, 8)
            if n is None or n > MAX_STREAM_CHUNKS:
                self._send(self._simple(400, b'{"error": "bad chunk count"}', conn, head_only), close)
            else:
                head = b"".join((_STATUS_200, _date(), conn, b"content-type: application/x-ndjson\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n"))
                if head_only:
                    self._send(head, close)
                else:
                    self._send_parts(_stream_parts(head, n), close)
        elif path == b"/close":
            self._send(self._echo(path, url, qpos, _CONN_CLOSE, head_only), True)
        else:
            self._send(self._echo(path, url, qpos, conn, head_only), close)

    # -- responses ---------------------------------------------------------------------------

    @staticmethod
    def _simple(code: int, body: bytes, conn: bytes, head_only: bool = False) -> bytes:
        head = b"".join(
            (STATUS_LINES[code], _date(), conn, _CT_JSON, b"content-length: %d\r\n\r\n" % len(body))
        )
        return head if head_only else head + body

    def _echo(self, path: bytes, url: bytes, qpos: int, conn: bytes, head_only: bool) -> bytes:
        headers: dict[str, str] = {}
        for name, value in self._headers:
            k = name.decode("latin-1").lower()
            v = value.decode("latin-1")
            prev = headers.get(k)
            headers[k] = v if prev is None else prev + ", " + v
        body = b"".join(self._body)
        payload = orjson.dumps(
            {
                "method": self._parser.get_method().decode("latin-1"),
                "path": path.decode("utf-8", "replace"),
                "query": "" if qpos < 0 else url[qpos + 1 :].decode("utf-8", "replace"),
                "headers": headers,
                "body": body.decode("utf-8", "replace"),
                "body_length": len(body),
            }
        )
        return self._simple(200, payload, conn, head_only)

    def _send(self, data: bytes, close: bool = False) -> None:
        if close:
            self._closing = True
        if self._queue or self._paused:
            self._queue.append(_Pending(iter((data,)), True, close))
            return
        transport = self._transport
        if transport is None:
            return
        transport.write(data)
        if close:
            transport.close()

    def _send_parts(self, parts: Iterator[bytes], close: bool) -> None:
        if close:
            self._closing = True
        self._queue.append(_Pending(parts, True, close))
        self._flush()

    def _delayed(self, data: bytes, delay: float, close: bool) -> None:
        if close:
            self._closing = True
        p = _Pending(iter((data,)), False, close)
        p.handle = self._loop.call_later(delay, self._ready, p)
        self._queue.append(p)

    def _enqueue_close(self) -> None:
        self._closing = True
        self._queue.append(_Pending(None, True, True))
        self._flush()

    def _ready(self, p: _Pending) -> None:
        p.ready = True
        p.handle = None
        self._flush()
        self._update_reading()

    def _flush(self) -> None:
        q = self._queue
        while q:
            transport = self._transport
            if transport is None:
                return
            p = q[0]
            if not p.ready:
                return
            if p.parts is not None:
                for piece in p.parts:
                    transport.write(piece)
                    if self._paused:
                        return
            q.popleft()
            if p.close:
                q.clear()
                transport.close()
                return

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None:
            return
        want_pause = self._paused or len(self._queue) > MAX_QUEUED_RESPONSES
        if want_pause != self._reading_paused:
            self._reading_paused = want_pause
            try:
                if want_pause:
                    transport.pause_reading()
                else:
                    transport.resume_reading()
            except RuntimeError:  # transport closing
                pass


# --------------------------------------------------------------------------- server


class DemoUpstream:
    """The demo origin server. `await start()` binds (port 0 picks a free port), `await stop()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_DemoProtocol] = set()
        self.requests = 0  # requests received, for tests that count at the upstream

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _DemoProtocol(self), self.host, self.port, backlog=4096, reuse_address=True
        )
        sockets = self._server.sockets or ()
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        conns = list(self._conns)
        for proto in conns:
            transport = proto._transport
            if transport is not None:
                transport.abort()
        if conns:
            await asyncio.gather(*(proto._lost for proto in conns))
        if server is not None:
            await server.wait_closed()

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    async def __aenter__(self) -> DemoUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# --------------------------------------------------------------------------- CLI


async def _serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
    upstream = DemoUpstream(host, port)
    await upstream.start()
    print(f"demo upstream listening on {upstream.url}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await upstream.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeplane demo-upstream", description="Run the demo upstream HTTP server.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9001, help="port to bind, 0 for any free port (default 9001)")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve(args.host, args.port))
    else:
        uvloop.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
