"""Upstream connections and their pools, with connection-level telemetry.

Owns `UpstreamConnection` (the asyncio Protocol toward one upstream target, parsing
responses with the native response framer, `http.native.ResponseFramer`) and
`TargetPool` (the connections to one target). The named upstream that picks among its
targets is `upstream.cluster.Upstream`.

Invariants (in the manner of aiohttp's connector):
- A connection is in exactly one of: connecting, idle (in `idle`), busy (has an
  `exchange`), closed. `in_use` counts busy ones; `len(idle) + in_use + connecting`
  never exceeds `max_connections`.
- Handing out is synchronous: there is no await between taking a connection from
  `idle` (or from a finished connect) and attaching it to its exchange.
- A connection is handed to the next exchange (or idled) only after the parser has
  finished with the read that completed the previous response, never from inside a
  parser callback: a release during `feed_data` is recorded (`release_pending`) and
  completed by `data_received`. Otherwise the rest of that read would be parsed as the
  next exchange's response -- a response delivered to the wrong client.
- A connection is reused only when provably clean. Bytes after the end of a response
  in the same read (the parser begins another message, reports body bytes, or fails
  after the response completed) close it (`excess_data`), as do bytes arriving while
  it is idle (`unsolicited_data`); both are logged once at warning and counted in
  `closed_by_reason`. The exchange that already completed is not failed: its client
  got a good response. CR/LF after a response are not counted as dirty: the framer
  skips them without a callback (RFC 9112 2.2 lets a recipient ignore empty lines
  before a message), they cannot be parsed as a response, so they cannot reach another
  client.
- A connection the upstream closed, or whose response was not read to its end, is never
  handed out again.
- A response head is bounded (`MAX_RESPONSE_HEAD` raw bytes, across reads; the framer
  refuses it before it reaches the exchange): such an upstream is dropped as an
  invalid response (502), not relayed.
- Waiters are served first-in first-out; a waiter whose client went away is skipped.
- Connects and sweeps are the only tasks/timers; the request path uses callbacks.

Known inherent race (not solvable at this layer; nginx and Envoy share it): bytes an
upstream sends in a later read, after the connection was handed to the next exchange,
cannot be told apart from that exchange's response. Only bytes that arrive with the
response, or while the connection is idle, are caught.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import resource
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from edgeplane.http.chunked import HeadTooLarge, HttpParserError, HttpParserUpgrade
from edgeplane.http.native import ResponseFramer

if TYPE_CHECKING:
    from edgeplane.config.model import PoolConfig, Target

log = logging.getLogger("edgeplane.pool")

_ids = itertools.count(1)
_fd_logged = [float("-inf")]  # loop time of the last out-of-descriptors line
MAX_RESPONSE_HEAD = 64 * 1024  # bytes of one upstream response head (Envoy: 60 KiB)


class PoolOverflow(Exception):
    """Every connection is busy and the wait queue is full."""


class _StopParsing(Exception):
    """Raised from a parser callback to stop parsing this read; the connection's state
    (closed, released, head size) tells `_parse_failed` why."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "pool", "id", "loop", "transport", "parser", "exchange", "created", "connect_time",
        "requests", "bytes_in", "bytes_out", "idle_since", "closed", "close_reason",
        "reset_parser", "local_port", "in_feed",
        "release_pending",
    )

    def __init__(self, pool: TargetPool) -> None:
        self.pool = pool
        self.id = next(_ids)
        self.loop = pool.loop
        # None until `connection_made`: only connected connections are handed out or written to.
        self.transport = cast(asyncio.Transport, None)
        self.parser = ResponseFramer(self, MAX_RESPONSE_HEAD)
        self.exchange: Any = None
        self.created = self.loop.time()
        self.connect_time = 0.0
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.idle_since = self.created
        self.closed = False
        self.close_reason = ""
        self.reset_parser = False
        self.local_port = 0
        self.in_feed = False  # inside `parser.feed_data`: a release must wait until it returns
        self.release_pending = False  # released reusable during the current feed

    # -- transport events --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("sockname")
        if isinstance(sock, tuple):  # (a Unix socket's name is a path)
            self.local_port = sock[1]

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        exchange = self.exchange
        if exchange is None:
            self._excess("unsolicited_data", "while idle")
            return
        self.in_feed = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.in_feed = False
            # A 101 head was parsed: the rest belongs to the new protocol. Only a
            # WebSocket exchange can take it; anywhere else it is an invalid response.
            upgraded = getattr(self.exchange, "on_upgraded", None)
            if upgraded is None:
                self._parse_failed("upstream switched protocols unexpectedly")
                return
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            upgraded(self, data[offset:])
            return
        except HeadTooLarge:
            self.in_feed = False
            self._parse_failed("upstream response head too large")
            return
        except HttpParserError as exc:
            self.in_feed = False
            self._parse_failed(f"invalid response from upstream: {exc}")
            return
        except _StopParsing:
            self.in_feed = False
            self._parse_failed("invalid response from upstream: bytes after the response")
            return
        except Exception:  # the gateway's bug in a response callback: logged, never the next client's
            self.in_feed = False
            log.exception("error while handling a response from upstream %s (target %s)",
                          self.pool.upstream, self.pool.name)
            self._parse_failed("gateway error while handling the upstream response")
            return
        self.in_feed = False
        if exchange.out:
            exchange.flush()
        if self.reset_parser:
            self.reset_parser = False
            self.parser = ResponseFramer(self, MAX_RESPONSE_HEAD)
        if self.release_pending:
            # The response ended in this read and nothing followed it: reusable now.
            self.release_pending = False
            if not self.closed:
                self.pool.reuse(self)

    def _parse_failed(self, reason: str) -> None:
        """The parser stopped (a callback raised) or failed on this read."""
        self.release_pending = False
        if self.closed:
            return  # closed while parsing (its exchange or the pool saw to it)
        exchange = self.exchange
        if exchange is None:
            # The response ended earlier in this read: these are bytes after it. Its
            # exchange completed and its client got a good response; only we close.
            self._excess("excess_data", "with the response")
            return
        self.close("invalid_response")
        exchange.on_upstream_failed(reason)

    def _excess(self, reason: str, when: str) -> None:
        pool = self.pool
        log.warning("upstream sent data after the end of the response; connection closed "
                    "(upstream %s, target %s, %s)", pool.upstream, pool.name, when)
        self.close(reason)

    def eof_received(self) -> bool | None:
        self._lost("upstream_closed")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost("upstream_reset" if exc is not None else "upstream_closed")

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        exchange = self.exchange
        self.closed = True
        self.close_reason = reason
        self.exchange = None
        self.pool.on_closed(self, reason)
        if exchange is not None:
            exchange.on_upstream_lost(self, reason)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.on_upstream_write_paused(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.on_upstream_write_paused(False)

    # -- parser callbacks (forwarded to the exchange) -----------------------------
    # `exchange` is None inside a feed only once the response was released (or the
    # connection closed): whatever the parser reports after that is excess, so parsing
    # stops there (`_StopParsing`) and `_parse_failed` decides.
    def on_message_begin(self) -> None:  # a head continues in the next read
        if self.exchange is None:
            raise _StopParsing

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        exchange = self.exchange
        if exchange is None:
            raise _StopParsing
        exchange.on_response_head(status, headers)

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # After a HEAD response (ended at its head) llhttp may still expect a body:
            # bytes here were sent past the end of that response.
            raise _StopParsing
        exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.on_response_complete(self.parser.should_keep_alive())

    # -- used by the exchange ---------------------------------------------------------
    def write(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.transport.write(data)

    def usable(self) -> bool:
        return not self.closed and not self.transport.is_closing()

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.exchange = None
        if self.transport is not None:
            self.transport.close()
        self.pool.on_closed(self, reason)

    def telemetry(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "local_port": self.local_port,
            "state": "busy" if self.exchange is not None else "idle",
            "connect_time_ms": round(self.connect_time * 1000, 3),
            "requests": self.requests,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "age_s": round(now - self.created, 3),
        }


class TargetPool:
    """Connections to one target."""

    __slots__ = (
        "target", "cfg", "loop", "idle", "in_use", "connecting", "waiters", "conns",
        "opened", "reused", "requests", "connect_failures", "closed_by_reason",
        "down_until", "closing", "retiring", "_tasks", "host", "port", "authority", "name", "ssl",
        "server_hostname", "upstream", "detector", "index", "owner",
    )

    def __init__(self, target: Target, cfg: PoolConfig, loop: asyncio.AbstractEventLoop,
                 ssl_context: ssl.SSLContext | None = None, server_name: str | None = None,
                 upstream: str = "", address: str | None = None) -> None:
        self.target = target
        self.upstream = upstream  # the upstream's name, for logs
        # https targets: TLS with this context; SNI and the verified name default to the host.
        self.ssl = ssl_context
        self.server_hostname = (server_name or target.host) if ssl_context is not None else None
        # `address`: one of the addresses a hostname target resolved to (`upstream.dns`):
        # connected to, while Host and SNI stay the target's name
        self.host = address or target.host
        self.port = target.port
        self.authority = target.authority.encode()
        self.name = str(target) if address is None else f"{target} ({address})"  # for logs and labels
        self.cfg = cfg
        self.loop = loop
        self.idle: list[UpstreamConnection] = []  # a stack: the warmest connection first
        self.in_use = 0
        self.connecting = 0
        self.waiters: deque[Any] = deque()
        self.conns: set[UpstreamConnection] = set()
        self.opened = 0
        self.reused = 0
        self.requests = 0
        self.connect_failures = 0
        self.closed_by_reason: dict[str, int] = {}
        self.down_until = 0.0
        self.closing = False
        self.retiring = False  # a reload replaced it: serve what was routed here, keep nothing
        self._tasks: set[asyncio.Task] = set()
        # Passive health (`upstream.health`), set by the upstream with `outlier_detection`.
        self.detector: Any = None
        self.index = 0  # this target's place in its upstream (the detector's endpoint)
        self.owner: Any = None  # its `cluster.Upstream` (retry policy and budget)

    def answered(self, status: int) -> None:
        """An answer from this target: 5xx counts toward its ejection, anything else resets."""
        if self.detector is not None:
            if status >= 500:
                self.detector.on_5xx(self.index, self.loop.time())
            else:
                self.detector.on_success(self.index)

    def acquire(self, exchange: Any, fresh: bool = False) -> UpstreamConnection | None:
        """A ready connection now, or None and `exchange.on_connection()` later (or
        `exchange.on_connect_failed()`, at once when the pool is already closed)."""
        if self.closing:  # a request routed before a reload removed this upstream
            exchange.on_connect_failed(503, "upstream connection pool closed")
            return None
        if not fresh:
            idle = self.idle
            while idle:
                conn = idle.pop()
                if not conn.closed and not conn.transport.is_closing():
                    self.in_use += 1
                    self.reused += 1
                    self.requests += 1
                    conn.requests += 1
                    conn.exchange = exchange
                    return conn
        # Waiters beyond what pending and still-allowed connects will serve are queued;
        # that queue is what `max_waiters` bounds.
        room = max(self.cfg.max_connections - self._total(), 0)
        if len(self.waiters) - self.connecting - room >= self.cfg.max_waiters:
            raise PoolOverflow
        exchange.wait_started = self.loop.time()
        self.waiters.append(exchange)
        self._maybe_connect()
        return None

    def _total(self) -> int:
        return len(self.idle) + self.in_use + self.connecting

    def _maybe_connect(self) -> None:
        if self.closing:
            return
        # One connect per waiter that has none coming, up to the cap; an idle
        # connection is closed to make room for a fresh one when the cap is reached.
        while self.connecting < len(self.waiters):
            if self._total() >= self.cfg.max_connections:
                if not self.idle:
                    return
                self.idle.pop(0).close("replaced")
            self.connecting += 1
            task = self.loop.create_task(self._connect())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        loop = self.loop
        started = time.perf_counter()
        try:
            opening = (loop.create_unix_connection(lambda: UpstreamConnection(self), self.host)
                       if self.target.scheme == "unix" else
                       loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port,
                                              ssl=self.ssl, server_hostname=self.server_hostname))
            _, conn = await asyncio.wait_for(opening, self.cfg.connect_timeout)
        except (TimeoutError, OSError) as exc:
            self.connecting -= 1
            self.connect_failures += 1
            self.down_until = loop.time() + 1.0
            if self.detector is not None:
                self.detector.on_connect_failure(self.index, loop.time())
            timed_out = isinstance(exc, asyncio.TimeoutError)
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason = f"TLS verification failed: {exc.verify_message}"
            elif isinstance(exc, ssl.SSLError):
                reason = f"TLS handshake failed: {exc.reason or exc}"
            elif getattr(exc, "errno", None) in (errno.EMFILE, errno.ENFILE):
                # The gateway's own limit, not the upstream's fault: logged as such, once a
                # second (every proxied request fails alike while it lasts).
                reason = "connect failed: out of file descriptors"
                if loop.time() - _fd_logged[0] >= 1.0:
                    _fd_logged[0] = loop.time()
                    log.error("out of file descriptors: upstream connect to %s failed; limit %d "
                              "(raise it, or lower limits.max_connections)", self.target,
                              resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            else:
                reason = "connect timeout" if timed_out else f"connect failed: {exc.strerror or exc}"
            if not reason.endswith("descriptors"):
                log.warning("upstream %s: %s", self.target, reason)
            waiter = self._next_waiter()
            if waiter is not None:
                waiter.on_connect_failed(504 if timed_out else 502, reason)
            return
        except asyncio.CancelledError:
            self.connecting -= 1
            raise
        self.connecting -= 1
        self.opened += 1
        if self.detector is not None:
            self.detector.connect_failures[self.index] = 0
        conn.connect_time = time.perf_counter() - started
        self.conns.add(conn)
        if self.closing:
            conn.close("shutdown")
            return
        self.in_use += 1
        self._hand_over(conn)

    def _next_waiter(self) -> Any:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.cancelled:
                return waiter
        return None

    def _hand_over(self, conn: UpstreamConnection) -> None:
        """`conn` is counted in `in_use`: give it to the first waiter, else idle it."""
        waiter = self._next_waiter()
        if waiter is None:
            self._put_idle(conn)
            return
        self.requests += 1
        conn.requests += 1
        conn.exchange = waiter
        waiter.on_connection(conn)

    def _put_idle(self, conn: UpstreamConnection) -> None:
        """`conn`, counted in `in_use`, becomes idle -- or is closed when the idle list is
        full, and then `on_closed` takes it out of `in_use`: counted down once either way."""
        if self.closing or self.retiring or len(self.idle) >= self.cfg.max_idle:
            conn.close("shutdown" if self.closing else "retired" if self.retiring else "idle_pool_full")
            return
        self.in_use -= 1
        conn.idle_since = self.loop.time()
        self.idle.append(conn)

    def release(self, conn: UpstreamConnection, reusable: bool, reason: str = "not_reusable") -> None:
        """The exchange is done with `conn`."""
        conn.exchange = None
        if conn.closed:
            return  # on_closed already took it out of in_use
        if not reusable or conn.transport.is_closing():
            conn.close(reason)
        elif conn.in_feed:
            # Called from a parser callback: the rest of this read is still to be parsed
            # and must not become the next exchange's response. `conn.data_received`
            # calls `reuse` once the read is parsed and proved clean.
            conn.release_pending = True
        else:
            self.reuse(conn)

    def reuse(self, conn: UpstreamConnection) -> None:
        """`conn`, counted in `in_use` and released clean, goes to a waiter or idles."""
        if conn.transport.is_closing():
            conn.close("not_reusable")
        elif self.waiters:
            self.reused += 1
            self._hand_over(conn)
        else:
            self._put_idle(conn)

    def detach(self, conn: UpstreamConnection) -> None:
        """`conn` leaves the pool for good, transport open (a WebSocket relay owns it)."""
        conn.closed = True
        conn.close_reason = "upgraded"
        conn.exchange = None
        self.conns.discard(conn)
        self.in_use -= 1
        counts = self.closed_by_reason
        counts["upgraded"] = counts.get("upgraded", 0) + 1
        if self.waiters:
            self._maybe_connect()

    def on_closed(self, conn: UpstreamConnection, reason: str) -> None:
        counts = self.closed_by_reason
        counts[reason] = counts.get(reason, 0) + 1
        self.conns.discard(conn)
        if conn.exchange is not None or not self._remove_idle(conn):
            # Busy (or just released by a close): it was counted in use.
            self.in_use -= 1
        if self.waiters:
            self._maybe_connect()

    def _remove_idle(self, conn: UpstreamConnection) -> bool:
        try:
            self.idle.remove(conn)
        except ValueError:
            return False
        return True

    def sweep(self, now: float) -> None:
        """Called about once a second: expire idle connections and stale waiters."""
        limit = now - self.cfg.idle_timeout
        for conn in [c for c in self.idle if c.idle_since < limit]:
            conn.close("idle_timeout")
        waiters = self.waiters
        wait_limit = now - self.cfg.wait_timeout
        while waiters and (waiters[0].cancelled or waiters[0].wait_started < wait_limit):
            waiter = waiters.popleft()
            if not waiter.cancelled:
                waiter.on_connect_failed(503, "no upstream connection available in time")

    def cancel_waiter(self, exchange: Any) -> None:
        exchange.cancelled = True

    def retire(self) -> None:
        """A reload replaced this pool: requests already routed here are still served
        (queued ones get connections), idle connections close, released ones too."""
        self.retiring = True
        for conn in list(self.idle):
            conn.close("retired")

    def busy(self) -> bool:
        return bool(self.in_use or self.connecting or any(not w.cancelled for w in self.waiters))

    async def close(self) -> None:
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self.idle):
            conn.close("shutdown")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # Requests still queued (a cancelled connect was theirs) get an answer, not a hang.
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.cancelled:
                waiter.on_connect_failed(503, "upstream connection pool closed")

    def telemetry(self, now: float) -> dict[str, Any]:
        return {
            "target": self.name,
            # down: a connect failed within the last second, so `Upstream.pick` skips it
            "health": "down" if self.down_until > now else "up",
            "max_connections": self.cfg.max_connections,
            "opened": self.opened,
            "reused": self.reused,
            "requests": self.requests,
            "connect_failures": self.connect_failures,
            "closed": dict(sorted(self.closed_by_reason.items())),
            "in_use": self.in_use,
            "idle": len(self.idle),
            "connecting": self.connecting,
            "waiters": sum(1 for w in self.waiters if not w.cancelled),
            "connections": [c.telemetry(now) for c in sorted(self.conns, key=lambda c: c.id)],
        }
