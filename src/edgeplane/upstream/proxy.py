"""The `http` integration: forward one request upstream and relay the response.

Owns proxy semantics (RFC 9110 7.6): hop-by-hop headers removed (Connection and every
header it names, Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-*),
X-Forwarded-For/-Proto/-Host appended, Host rewritten unless `preserve_host`, the path
rewritten from the integration's template, the request id sent upstream and echoed back;
and the relay state machine of one exchange (`ProxyExchange`), driven by callbacks from
the client side (`server.HttpProtocol`) and the upstream side (`pool.UpstreamConnection`).

Invariants:
- Bodies stream both ways; nothing buffers a whole body. Before a connection is attached
  the request body is buffered and client reading pauses past `_BUFFER_MAX`; after, each
  side pauses reading the other while its own write buffer is above the high-water mark.
- An exchange ends exactly once (`done`): by a complete response, a local error reply,
  or an abort. After that it ignores every callback.
- The upstream connection is returned to the pool reusable only when the response was
  read to its end, the request was fully sent and the upstream allows keep-alive.
- Without a `retries` policy, a retry happens at most once, only for an idempotent
  request on a reused connection that failed before any response byte, and only when
  the body sent so far is still held. With one (`upstream.retry`), a failure it names
  is tried again on another endpoint, within its attempts and the upstream's budget,
  and never after a byte of the response reached the client.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from edgeplane.http.protocol import P_BUFFER, P_UPSTREAM, T_BODY_RATE, T_UPSTREAM
from edgeplane.http.request import body_drainable, head_end
from edgeplane.http.responses import CONTINUE_100, STATUS_LINES
from edgeplane.plugins.hooks import hooked_head
from edgeplane.upstream.cluster import NoEndpoint
from edgeplane.upstream.pool import PoolOverflow
from edgeplane.upstream.request_head import build_head, compile_path_template, response_lines
from edgeplane.upstream.retry import arm_try_timer, retry
from edgeplane.upstream.retry import done as retry_done

if TYPE_CHECKING:
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.upstream.cluster import Upstream
    from edgeplane.upstream.pool import TargetPool, UpstreamConnection

log = logging.getLogger("edgeplane.proxy")

RESPONSE_SKIP = frozenset((
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"content-length", b"x-request-id",
))
_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
_BUFFER_MAX = 64 * 1024  # request body held while no connection is attached
_REPLAY_MAX = 64 * 1024  # request body kept for a possible retry
_HOLD_MAX = 1024 * 1024  # response body held for a response mapping that reads it
_CHUNK_END = b"0\r\n\r\n"


class HttpIntegration:
    """Compiled once per route: where and how to forward."""

    __slots__ = ("upstream", "template", "timeout", "preserve_host", "name", "claim_headers",
                 "response_skip", "websocket", "websocket_exchange", "replay_all", "idle_timeout", "retries",
                 "hold_response")

    def __init__(self, upstream: Upstream, path: str | None, timeout: float, preserve_host: bool,
                 claim_headers: frozenset[bytes] = frozenset(),
                 gateway_response_headers: frozenset[bytes] = frozenset(), websocket: Any = None,
                 websocket_exchange: Any = None, idle_timeout: float | None = None, retries: Any = None,
                 hold_response: bool = False):
        # A response mapping reads `$response.body`: the response is held to its end (at
        # most `_HOLD_MAX`), then answered with a Content-Length.
        self.hold_response = hold_response
        # `wsrelay.RelaySettings` for WebSocket handshakes on this route (see ws_proxy).
        self.websocket = websocket
        # The exchange class for those handshakes (`websocket.proxy.WsUpgradeExchange`,
        # passed in because it subclasses `ProxyExchange` from this module).
        self.websocket_exchange = websocket_exchange
        self.claim_headers = claim_headers  # header names the route's authorizer sets
        # Upstream response headers the gateway owns on this route (CORS, as AWS does).
        self.response_skip = RESPONSE_SKIP | gateway_response_headers
        self.upstream = upstream
        self.template = compile_path_template(path)
        self.timeout = timeout  # for the response head, once the request is sent
        # while a body moves, either way: no byte for this long ends the exchange
        self.idle_timeout = idle_timeout if idle_timeout is not None else timeout
        self.preserve_host = preserve_host
        self.name = upstream.name
        # The route's `retries`, over its upstream's (`upstream.retry`). With `methods: all`
        # a non-idempotent request's body is kept for a retry too.
        self.retries = retries
        first = upstream.upstreams[0] if hasattr(upstream, "upstreams") else upstream
        policy = retries or (first.cfg.resilience.retries if hasattr(first, "cfg") else None)
        self.replay_all = policy is not None and policy.methods == "all"

    def handle(self, proto: HttpProtocol, req: Request) -> None:
        if req.websocket and self.websocket is not None:
            exchange: ProxyExchange = self.websocket_exchange(self, proto, req, self.websocket)
        else:
            exchange = ProxyExchange(self, proto, req)
        req.exchange = exchange
        exchange.start()

    def request_head(self, proto: HttpProtocol, req: Request, pool: TargetPool,
                     trace: list[bytes] | None = None) -> bytes:
        """The upstream head (`request_head.build`)."""
        return build_head(self.template, self.preserve_host, self.claim_headers, proto, req, pool, trace)


class ProxyExchange:
    __slots__ = (
        "integ", "proto", "req", "pool", "conn", "timeout", "head", "replay", "replay_size",
        "retried", "done", "cancelled", "wait_started", "request_sent", "got_bytes",
        "chunked_out", "close_delimited", "head_only", "skip_interim", "keep_alive",
        "t_dispatch", "buffered", "upstream_paused", "out", "awaiting_body", "window_bytes",
        "upstream_deadline", "span", "attempt", "tried", "retrying", "held_back", "try_timer", "skip_body", "held",
        "head_sent",
    )

    def __init__(self, integ: HttpIntegration, proto: HttpProtocol, req: Request) -> None:
        self.integ = integ
        self.proto = proto
        self.req = req
        self.pool: TargetPool | None = None
        self.conn: UpstreamConnection | None = None
        self.timeout = integ.timeout
        self.head = b""
        self.replay: list[bytes] | None = [] if req.method in _IDEMPOTENT or integ.replay_all else None
        self.replay_size = 0
        self.retried = False
        self.done = False
        self.cancelled = False
        self.wait_started = 0.0
        self.request_sent = False
        self.got_bytes = False
        self.chunked_out = False
        self.head_sent = False  # the client's response head left the gateway (not just `out`)
        self.close_delimited = False
        self.head_only = req.method == b"HEAD"
        self.skip_interim = False
        self.keep_alive = True
        self.t_dispatch = 0.0
        self.buffered = 0
        self.upstream_paused = False
        # The body is being read before an upstream connection is taken (`start`).
        self.awaiting_body = False
        self.window_bytes = 0  # body bytes received when the current rate window began
        self.upstream_deadline = 0.0  # loop time the integration timeout passes (once acquired)
        self.span: Any = None  # the integration's CLIENT span (`observability.tracing`), when sampled
        # Response bytes produced while parsing one upstream read; written to the client
        # in one call per read (`flush`), so a small response costs one send.
        self.out: list[bytes] = []
        self.attempt = 1  # tries so far (`retries.attempts` bounds them)
        req.integration_attempts = 1
        self.tried: tuple[TargetPool, ...] = ()  # the endpoints of the earlier tries
        self.retrying: Any = None  # the upstream whose budget counts this exchange's retry in flight
        self.held_back = False  # reading the client was paused for the upstream in this body window
        self.try_timer: Any = None  # `retries.per_try_timeout` of the attempt in flight
        self.skip_body = False  # the client's status has no body (a hook made it 204/304)
        self.held: Any = None  # (status, headers, body chunks) while `integ.hold_response` holds them

    # -- start ------------------------------------------------------------------------
    def start(self) -> None:
        proto = self.proto
        req = self.req
        self.t_dispatch = time.perf_counter()
        if req.complete:
            self._acquire(False)
            return
        if req.expect_continue:
            proto.write(CONTINUE_100)
        # Request buffering (nginx's proxy_request_buffering, bounded): the body is read
        # before an upstream connection is taken, up to `limits.request_buffering` bytes;
        # a larger body is streamed once that much arrived. A client trickling its body
        # therefore never holds an upstream connection, and is cut by the rate rule.
        limits = proto.ctx.limits
        self.buffered = sum(map(len, req.body_buf)) if req.body_buf else 0
        self.window_bytes = req.body_size
        if self.buffered < limits.request_buffering:
            self.awaiting_body = True
            proto.set_deadline(T_BODY_RATE, limits.min_body_window)
            return
        self._acquire(False)

    def on_body_window(self) -> None:
        """The connection timer in the body phase (`T_BODY_RATE`): the body must have
        grown by `limits.min_body_bytes` in the window that just ended, else 408."""
        proto = self.proto
        req = self.req
        if self.done:
            return
        now = proto.loop.time()
        if req.complete or self.got_bytes:  # the rate rule is over: the response's deadlines
            proto.set_deadline(T_UPSTREAM, self.integ.idle_timeout if self.got_bytes else self.timeout)
            return
        limits = proto.ctx.limits
        held_back, self.held_back = self.held_back or bool(proto._pause & P_UPSTREAM), False
        if held_back:
            pass  # the gateway paused reading because the upstream reads slowly: not the client's doing
        elif req.body_size - self.window_bytes < limits.min_body_bytes:
            self.abort("client sent the request body too slowly")
            proto.fail_active(req, 408, "request body arrived slower than limits.min_body_rate")
            return
        self.window_bytes = req.body_size
        window = limits.min_body_window
        if self.upstream_deadline:
            if now >= self.upstream_deadline:
                self.on_timeout()
                return
            window = min(window, self.upstream_deadline - now)
        proto.set_deadline(T_BODY_RATE, window)

    def _acquire(self, fresh: bool) -> None:
        self.awaiting_body = False
        if not fresh:  # the first attempt (a retry keeps the deadline it has)
            proto = self.proto
            if self.req.complete:
                proto.set_deadline(T_UPSTREAM, self.timeout)
            else:  # streaming the body: the rate timer also watches the idle deadline
                self.upstream_deadline = proto.loop.time() + self.integ.idle_timeout
                self.window_bytes = self.req.body_size
                proto.set_deadline(T_BODY_RATE, min(proto.ctx.limits.min_body_window, self.timeout))
        try:
            pool = self.integ.upstream.pick(self.tried, self.req, self.proto.peer_ip)
        except NoEndpoint as exc:
            self._fail(503, str(exc))
            return
        self.pool = pool
        limit = pool.owner.tripped(pool) if pool.owner is not None else None
        if limit is not None:  # the upstream's circuit breaker: 503 at once, nothing queued
            self._fail(503, f"upstream {pool.upstream}: circuit breaker open ({limit})")
            return
        try:
            conn = pool.acquire(self, fresh)
        except PoolOverflow:
            self._fail(503, "upstream connection pool is full")
            return
        if conn is not None:
            self.on_connection(conn)

    def on_connection(self, conn: UpstreamConnection) -> None:
        """`conn` is ours (the pool set conn.exchange): send what we have."""
        pool: TargetPool = self.pool  # type: ignore[assignment]  # set by `_acquire` before any connection
        if self.done:
            pool.release(conn, True)
            return
        self.conn = conn
        req = self.req
        proto = self.proto
        if not self.head:
            try:
                tracer = proto.ctx.tracer
                self.head = self.integ.request_head(proto, req, pool, tracer and tracer.outgoing(req, self))
            except Exception as exc:  # a value it must not write (UnsafeField), or a bug: 500, logged
                self.conn = None
                pool.release(conn, True)
                proto.internal_error(req, exc, f"route {req.route_key!r}: the upstream request head")
                return
        req.upstream = pool.name
        arm_try_timer(self)
        # A retry: what was sent before goes again on the fresh connection (`replay`, as
        # framed then), followed by what arrived while no connection was attached.
        sent = list(self.replay) if self.replay else []  # (a copy: `_keep_for_replay` appends to it)
        body = req.body_buf
        if body:
            req.body_buf = None
            frames = [self._frame(c) for c in body] if req.chunked else body
            self._keep_for_replay(body)
            conn.write(b"".join([self.head, *sent, *frames]))
            proto.resume_reading(P_BUFFER)
        else:
            conn.write(b"".join([self.head, *sent]) if sent else self.head)
        self.buffered = 0
        if req.complete:
            self._request_done()

    def on_connect_failed(self, status: int, reason: str) -> None:
        if not self.done and not retry(self, "connect-failure", reason):
            self._fail(status, reason)

    # -- request body -----------------------------------------------------------------
    def _frame(self, chunk: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(chunk), chunk)

    def _keep_for_replay(self, chunks: list[bytes]) -> None:
        if self.replay is None:
            return
        for chunk in chunks:
            self.replay_size += len(chunk)
            if self.replay_size > _REPLAY_MAX:
                self.replay = None
                return
            self.replay.append(self._frame(chunk) if self.req.chunked else chunk)

    def on_request_body(self, chunk: bytes) -> None:
        if self.done:
            return
        conn = self.conn
        if conn is None:
            req = self.req
            if req.body_buf is None:
                req.body_buf = [chunk]
            else:
                req.body_buf.append(chunk)
            self.buffered += len(chunk)
            if self.awaiting_body:
                if self.buffered >= self.proto.ctx.limits.request_buffering:
                    self._acquire(False)  # large: stream it from here, under the rate rule
            elif self.buffered > _BUFFER_MAX:
                self.proto.pause_reading(P_BUFFER)
            return
        if self.replay is not None:
            self._keep_for_replay([chunk])
        conn.write(self._frame(chunk) if self.req.chunked else chunk)
        if self.upstream_deadline:  # the body moves: the idle deadline starts again
            self.upstream_deadline = self.proto.loop.time() + self.integ.idle_timeout

    def on_request_complete(self) -> None:
        if self.awaiting_body and not self.done:
            self._acquire(False)  # the whole body is here: now take a connection
            return
        if not self.done and self.conn is not None:
            if self.req.chunked:
                self._request_done()
            else:
                self.request_sent = True

    def _request_done(self) -> None:
        replay = self.replay
        # (on a retry the last-chunk went with the replayed body: never twice, or the
        # upstream would read a second request from it)
        if self.req.chunked and not (replay and replay[-1] is _CHUNK_END):
            self.conn.write(_CHUNK_END)  # type: ignore[union-attr]  # set: called once connected
            if replay is not None:
                replay.append(_CHUNK_END)
        self.request_sent = True

    def request_stalled(self) -> bool:
        return not self.req.complete and not self.got_bytes

    # -- response ---------------------------------------------------------------------
    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.done:
            return
        self.got_bytes = True
        if status < 200:
            if status == 101:
                self._upstream_failed("upstream switched protocols unexpectedly")
                return
            self.skip_interim = True  # 1xx: dropped; the final response follows
            return
        req = self.req
        line = STATUS_LINES.get(status)
        if line is None:
            self._upstream_failed(f"invalid status {status} from upstream")
            return
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        pool: TargetPool = self.pool  # type: ignore[assignment]  # set: a connection answered
        pool.answered(status)
        if status >= 500 and retry(self, str(status), f"upstream answered {status}"):
            return  # that answer is dropped with its connection; another endpoint is tried
        fill = req.cache_fill  # the response cache's tap (`policies.cache.stage.Fill`)
        if fill is not None:
            if fill.rescues(status):  # `stale_if_error`: the stale entry answers instead
                self._upstream_failed(f"upstream answered {status}")
                return
            fill.head(status, headers)
        if self.integ.hold_response and not self.head_only:
            self.held = [status, headers, [], 0]  # answered at its end: a mapping reads its body
            return
        self._emit_head(status, headers)

    def _emit_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The client's response head from the upstream's: the route's hooks, then framing."""
        req = self.req
        proto = self.proto
        line = STATUS_LINES[status]
        req.integration_latency = time.perf_counter() - self.t_dispatch
        req.integration_status = status
        if req.route.response_hooks:
            try:
                upstream_status = status
                status, headers = hooked_head(proto, req, status, headers)
                line = STATUS_LINES[status]
                # a hook made it a 204/304: the upstream's body is not the client's to read
                self.skip_body = status in (204, 304) and upstream_status not in (204, 304)
            except Exception as exc:  # a plugin's bug: 500, logged with its traceback
                proto.internal_error(req, exc, f"a response hook of route {req.route_key!r}")
                return
        parts, content_length, upstream_chunked = response_lines(line, headers, self.integ.response_skip)
        keep = req.keep_alive and not proto.ctx.draining
        if self.head_only or status == 204 or status == 304:
            if content_length is not None and status != 204 and not self.skip_body:
                parts += (b"content-length: ", content_length, b"\r\n")
        elif content_length is not None and not upstream_chunked:
            parts += (b"content-length: ", content_length, b"\r\n")
        elif req.version == "1.1":
            parts.append(b"transfer-encoding: chunked\r\n")
            self.chunked_out = True
            self.close_delimited = not upstream_chunked
        else:
            self.close_delimited = not upstream_chunked
            keep = False  # HTTP/1.0 client: the body ends when we close
        parts.append(head_end(req, keep))
        self.keep_alive = keep
        req.status = status
        req.response_started = True
        self.out.append(b"".join(parts))
        if self.head_only:
            # llhttp cannot be told the request was HEAD: end here, fresh parser next.
            conn: UpstreamConnection = self.conn  # type: ignore[assignment]  # set: its parser called us
            conn.reset_parser = True
            self.on_response_complete(conn.parser.should_keep_alive())

    def on_response_body(self, chunk: bytes) -> None:
        if self.done or self.skip_interim or self.skip_body:
            return
        held = self.held
        if held is not None:
            held[2].append(chunk)
            held[3] += len(chunk)
            if held[3] > _HOLD_MAX:
                self._upstream_failed(f"response body past {_HOLD_MAX} bytes on a route that maps it")
            else:  # the body moves: the idle deadline, not the head's, is what holds now
                self.proto.set_deadline(T_UPSTREAM, self.integ.idle_timeout)
            return
        self.req.response_length += len(chunk)
        fill = self.req.cache_fill
        if fill is not None:
            fill.body(chunk)
        if self.chunked_out:
            self.out.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self.out.append(chunk)

    def flush(self) -> None:
        """End of one upstream read: send what it produced; the response is alive."""
        out = self.out
        if out and not self.done:
            self.proto.write(out[0] if len(out) == 1 else b"".join(out))
            self.head_sent = self.req.response_started
            out.clear()
            if not self.proto.write_paused:  # else the client's send deadline stands
                self.proto.set_deadline(T_UPSTREAM, self.integ.idle_timeout)

    def on_response_complete(self, upstream_keep_alive: bool) -> None:
        if self.done:
            return
        if self.skip_interim:
            self.skip_interim = False
            return
        if self.held is not None:  # the whole body is here: the head (mapped), then the body
            status, headers, chunks, _ = self.held
            self.held = None
            body = self.req.response_body = b"".join(chunks)
            if status not in (204, 304):  # (their Content-Length is not this body's)
                headers = [(n, v) for n, v in headers if n.lower() not in (b"content-length", b"transfer-encoding")]
                headers.append((b"content-length", b"%d" % len(body)))
            self._emit_head(status, headers)
            if self.done:
                return
            if body:
                self.on_response_body(body)
        self.done = True
        if self.retrying is not None or self.try_timer is not None:
            retry_done(self)
        req = self.req
        proto = self.proto
        if req.cache_fill is not None:
            req.cache_fill.complete()
        out = self.out
        if self.chunked_out:
            out.append(_CHUNK_END)
        if out:
            proto.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        conn: UpstreamConnection = self.conn  # type: ignore[assignment]  # set: its parser called us
        self.conn = None
        if self.upstream_paused:
            conn.transport.resume_reading()
        self.pool.release(conn,  # type: ignore[union-attr]
                          upstream_keep_alive and self.request_sent, "not_reusable")
        # The upstream may answer before the whole body arrived: read the rest only
        # when it is small; otherwise close after this response.
        keep = self.keep_alive and (req.complete or body_drainable(req))
        if proto._pause & P_UPSTREAM:
            proto.resume_reading(P_UPSTREAM)
        proto.finish_response(req, keep)

    # -- failures ---------------------------------------------------------------------
    def on_upstream_lost(self, conn: UpstreamConnection, reason: str) -> None:
        """The upstream closed or reset `conn` while it was ours."""
        if self.done or conn is not self.conn:
            return
        self.conn = None
        held_to_close = self.held is not None and not any(  # a held body without CL or chunked ends here
            n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.held[1])
        if (self.close_delimited and self.req.response_started or held_to_close) and reason == "upstream_closed":
            # The body was delimited by the close: that is its proper end (a reset is
            # not: the body may be cut short, and the client's connection is dropped).
            self.conn = conn
            self.on_response_complete(False)
            return
        if (
            not self.got_bytes
            and not self.retried
            and self.replay is not None
            and conn.requests > 1
            and self.req.method in _IDEMPOTENT  # (`retries.methods: all` keeps a POST's body too)
        ):
            # A reused keep-alive connection raced with the upstream closing it.
            self.retried = True
            self._acquire(True)  # the same head and held body go again
            return
        why = "upstream closed the connection" if reason == "upstream_closed" else "upstream reset the connection"
        if not self.got_bytes and retry(self, "reset", why):
            return
        self._upstream_failed(why)

    def on_upstream_failed(self, reason: str) -> None:
        """Unparsable response (the connection is already closed)."""
        if not self.done:
            self.conn = None
            self._upstream_failed(reason)

    def _upstream_failed(self, reason: str) -> None:
        if self.conn is not None:
            self.conn.close("invalid_response")
            self.conn = None
        self._fail(502, reason)

    def on_timeout(self) -> None:
        if self.done:
            return
        if self.conn is not None:
            self.conn.close("timeout")
            self.conn = None
        elif self.pool is not None:
            self.cancelled = True
        self._fail(504, "integration timeout")

    def _fail(self, status: int, reason: str) -> None:
        self.done = True
        if self.retrying is not None or self.try_timer is not None:
            retry_done(self)
        req = self.req
        proto = self.proto
        req.integration_error = reason
        proto.resume_reading(P_UPSTREAM | P_BUFFER)
        fill = req.cache_fill
        if fill is not None:
            if fill.serve_stale(proto, req):
                return  # `stale_if_error`: the stale entry answered
            fill.fail(status, reason)  # its waiters get this answer too
        if req.response_started and not self.head_sent:
            # The upstream's head went no further than `out` (its framing failed in the
            # same read): the client still gets a clean error instead of a cut response.
            self.out.clear()
            req.response_started = False
        if req.response_started:
            # The client already has the upstream's status line: it is what the access
            # log keeps (with the error); /stats counts the cut, not a 502 never sent.
            req.error = reason
            proto.ctx.count_error("upstream_aborted")
            proto.ctx.request_done(req, proto)
            req.responded = True
            proto.abort()
            return
        proto.send_error(req, status, reason)

    def abort(self, reason: str) -> None:
        """The client side is gone or failed: drop the upstream side."""
        if self.done:
            return
        self.done = True
        self.cancelled = True
        if self.retrying is not None or self.try_timer is not None:
            retry_done(self)
        if self.req.integration_error is None:
            self.req.integration_error = reason
        if self.req.cache_fill is not None:
            self.req.cache_fill.abandon()
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.close("client_aborted")

    # -- flow control -----------------------------------------------------------------
    def pause_upstream(self) -> None:
        conn = self.conn
        if conn is not None and not self.upstream_paused:
            self.upstream_paused = True
            conn.transport.pause_reading()

    def resume_upstream(self) -> None:
        conn = self.conn
        if conn is not None and self.upstream_paused:
            self.upstream_paused = False
            conn.transport.resume_reading()

    def on_upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self.held_back = True  # this body window does not count against the client
            self.proto.pause_reading(P_UPSTREAM)
        else:
            if self.upstream_deadline:  # the upstream took bytes: the body moves
                self.upstream_deadline = self.proto.loop.time() + self.integ.idle_timeout
            self.proto.resume_reading(P_UPSTREAM)
