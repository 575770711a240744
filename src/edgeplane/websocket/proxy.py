"""The WebSocket side of the `http` integration: an upgrade forwarded to the upstream,
checked, and turned into a frame-aware relay (`wsrelay`).

Owns the two handshakes of a proxied WebSocket (RFC 6455 section 4):

- **Client side, before anything is sent upstream:** `ws_handshake.client_handshake_error`
  (version 13 else 426, a 16-byte key else 400).
- **Upstream side:** the request goes upstream with `Connection: upgrade`,
  `Upgrade: websocket`, the client's key, version and offered subprotocols, and *without*
  `Sec-WebSocket-Extensions`: the gateway re-frames every message, so it offers no
  extension it cannot inspect (permessage-deflate is refused cleanly by not offering it).
- **The answer:** a 101 is accepted only if it says `Upgrade: websocket` and
  `Connection: upgrade`, carries the `Sec-WebSocket-Accept` computed from the client's key,
  selects no extension, and selects at most one subprotocol among those offered. Anything
  else is a 502 `{"message":"Bad Gateway"}` and the upstream connection is closed: a fake
  or broken 101 never reaches the client. A non-101 answer is relayed as an ordinary
  response and the client connection stays HTTP (`server.HttpProtocol.resume_http`).
- **After a valid 101:** the 101 (with the upstream's other end-to-end headers, such as
  Set-Cookie) goes to the client, both transports leave HTTP (`HttpProtocol.detach`,
  `TargetPool.detach`), and `wsrelay.start_relay` owns them, with the bytes each side sent
  right after its head. One access-log line per connection is written when it closes
  (status 101, bytes sent to the client, and a `websocket` object with the counters).

Invariants: the upstream connection used for an upgrade never returns to the pool; the
client sees a 101 only when the relay is about to start; every open relay is in
`ServerContext.websockets` until it closes, so a stopping gateway closes it with 1001.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from edgeplane.http.codec import header_tokens, header_value
from edgeplane.upstream.proxy import ProxyExchange
from edgeplane.websocket.handshake import accept_key, client_handshake_error
from edgeplane.websocket.relay import RelaySettings, start_relay

if TYPE_CHECKING:
    from edgeplane.upstream.pool import TargetPool, UpstreamConnection

_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
# What the gateway writes itself in the 101, or must not pass on.
_UPGRADE_SKIP = frozenset((
    b"connection", b"upgrade", b"keep-alive", b"transfer-encoding", b"content-length",
    b"sec-websocket-accept", b"sec-websocket-protocol", b"sec-websocket-extensions",
    b"sec-websocket-version", b"x-request-id", b"proxy-connection",
))


def relay_settings(limits: Any, send_timeout: float = 60.0) -> RelaySettings:
    """The relay's settings from a `model.WebSocketLimits` (None: the defaults, as AWS)
    and the server's `limits.send_timeout` (a side that does not read is cut off)."""
    if limits is None:
        return RelaySettings(send_timeout=send_timeout)
    return RelaySettings(
        send_timeout=send_timeout,
        max_message_bytes=limits.max_message_bytes, idle_timeout=limits.idle_timeout,
        max_lifetime=limits.max_lifetime, messages_per_second=limits.messages_per_second,
        message_burst=limits.message_burst, ping_interval=limits.ping_interval,
        pong_timeout=limits.pong_timeout)


class WsUpgradeExchange(ProxyExchange):
    """`ProxyExchange` for a WebSocket handshake: the same connect, head and failure
    paths; a 101 is validated and becomes a relay instead of a response."""

    __slots__ = ("settings", "accept", "offered", "upgrading", "relay")

    def __init__(self, integ: Any, proto: Any, req: Any, settings: Any) -> None:
        super().__init__(integ, proto, req)
        self.settings = settings
        # A handshake has no body: like any GET it is retried once on a fresh connection
        # when a reused one turns out closed before answering (the client's bytes after
        # the head wait in the server protocol meanwhile).
        self.replay = []
        headers = req.headers
        key = header_value(headers, b"sec-websocket-key") or b""
        self.accept = accept_key(key)
        self.offered = set(header_tokens(headers, b"sec-websocket-protocol"))
        self.upgrading = False
        self.relay: Any = None

    def start(self) -> None:
        error = client_handshake_error(self.req.headers)
        if error is not None:
            status, reason = error
            self.done = True
            extra = b"sec-websocket-version: 13\r\n" if status == 426 else b""
            self.proto.send_error(self.req, status, reason, extra=extra)
            return
        super().start()

    def build_head(self) -> bytes:
        # called once a connection is attached: `pool` is set
        tracer = self.proto.ctx.tracer
        head = self.integ.request_head(self.proto, self.req, cast("TargetPool", self.pool),
                                       tracer.outgoing(self.req, self) if tracer is not None else None)
        lines = [line for line in head[:-4].split(b"\r\n")
                 if not line[:25].lower().startswith(b"sec-websocket-extensions:")]
        return b"\r\n".join(lines) + b"\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"

    def on_connection(self, conn: UpstreamConnection) -> None:
        if not self.head and not self.done:
            self.pool = conn.pool
            try:
                self.head = self.build_head()
            except Exception as exc:  # the gateway's bug: a 500 with its traceback, the connection back
                conn.pool.release(conn, True)
                self.proto.internal_error(self.req, exc, f"route {self.req.route_key!r}: the upstream request head")
                return
        super().on_connection(conn)

    # -- the answer -----------------------------------------------------------------
    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.done or status != 101:
            super().on_response_head(status, headers)  # relayed as an ordinary answer
            return
        self.got_bytes = True
        lowered = [(name.lower(), value) for name, value in headers]  # the upstream's case
        problem = self._check_101(lowered)
        if problem is not None:
            self._upstream_failed(f"invalid WebSocket handshake from upstream: {problem}")
            return
        req = self.req
        parts = [_SWITCHING, b"sec-websocket-accept: ", self.accept, b"\r\n"]
        protocol = header_value(lowered, b"sec-websocket-protocol")
        if protocol:
            parts += (b"sec-websocket-protocol: ", protocol, b"\r\n")
        for (name, value), (lname, _) in zip(headers, lowered, strict=False):
            if lname not in _UPGRADE_SKIP and not lname.startswith(b"proxy-"):
                parts += (name, b": ", value, b"\r\n")
        parts += (b"x-request-id: ", req.request_id, b"\r\n\r\n")
        self.out.append(b"".join(parts))
        req.status = 101
        req.response_started = True
        self.upgrading = True  # the parser stops after this head: `on_upgraded` follows

    def _check_101(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """Why the upstream's 101 (`headers` with lower-case names) is not acceptable."""
        if b"websocket" not in header_tokens(headers, b"upgrade"):
            return "no 'Upgrade: websocket'"
        if b"upgrade" not in header_tokens(headers, b"connection"):
            return "no 'Connection: upgrade'"
        if header_value(headers, b"sec-websocket-accept") != self.accept:
            return "wrong Sec-WebSocket-Accept"
        if header_value(headers, b"sec-websocket-extensions"):
            return "an extension the gateway did not offer"
        chosen = header_tokens(headers, b"sec-websocket-protocol")
        if len(chosen) > 1 or (chosen and chosen[0] not in self.offered):
            return "a subprotocol the client did not offer"
        return None

    def on_response_complete(self, upstream_keep_alive: bool) -> None:
        if not self.upgrading:  # a 101 "message" ends at its head; the relay follows
            super().on_response_complete(upstream_keep_alive)

    def on_upgraded(self, conn: UpstreamConnection, tail: bytes) -> None:
        """The upstream's parser stopped after the 101: both sides become a relay."""
        if self.done or not self.upgrading or conn is not self.conn:
            conn.close("invalid_response")
            if not self.done:
                self._upstream_failed("upstream switched protocols unexpectedly")
            return
        self.done = True
        proto = self.proto
        req = self.req
        out = self.out
        if out:
            proto.write(b"".join(out))
            out.clear()
        self.conn = None
        cast("TargetPool", self.pool).detach(conn)  # set: `conn` is this exchange's connection
        req.integration_latency = None
        # Kept until the connection's log line: only what that line reads.
        self.head = b""
        req.headers = []
        req.body_buf = None
        paused = proto.write_paused
        client_transport, client_tail = proto.detach()
        relay = start_relay(proto.loop, client_transport, conn.transport, settings=self.settings,
                            client_tail=client_tail, upstream_tail=tail, on_closed=self._closed,
                            client_write_paused=paused)
        self.relay = relay
        if not relay.closed:
            proto.ctx.websockets.add(relay)
            if proto.ctx.draining:  # the gateway began stopping while this handshake ran
                relay.close(1001, "going away")

    def _closed(self, stats: Any) -> None:
        proto = self.proto
        proto.ctx.websockets.discard(self.relay)
        req = self.req
        req.response_length = stats.bytes_out
        req.ws_log = {
            "messagesIn": stats.messages_in, "bytesIn": stats.bytes_in,
            "messagesOut": stats.messages_out, "bytesOut": stats.bytes_out,
            "durationMs": round(stats.duration * 1000, 3), "closedBy": stats.closed_by,
            "closeCodeClient": stats.close_code_client, "closeCodeUpstream": stats.close_code_upstream,
        }
        req.error = stats.error
        code = stats.close_code_client if stats.close_code_client is not None else stats.close_code_upstream
        proto.ctx.count_websocket("proxied", stats.messages_in, stats.messages_out, code)
        proto.ctx.request_done(req, proto)
        self.relay = None

    def abort(self, reason: str) -> None:
        if self.relay is not None:
            return  # the relay owns both sides now
        super().abort(reason)
