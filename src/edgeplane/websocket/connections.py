"""WebSocket API connections: the connection protocol, the registry of open connections,
connection ids, and the @connections operations (in process, across workers, across hosts).

Owns:
- `WsConnection`: one accepted client, an asyncio protocol over wsproto's frame layer
  (see `ws_api` for what its messages do).
- `ConnectionRegistry`: one per worker process. Mints connection ids, holds the open
  connections by id, runs the @connections operations on them (`local`), and sends an
  operation for a connection it does not hold to its owner (`call`): to another worker of
  this host over that worker's admin Unix socket (`admin.WorkerForwarder`), or to another
  host through Redis pub/sub (`ws_bus.RedisBus`).
- Connection ids: 16 characters of base64url over 12 bytes = worker index (1 byte), host
  tag (4 bytes, shared by the workers of one supervisor), random (7 bytes). So any worker
  can tell where a connection lives from its id alone; an id whose owner is gone (its
  worker restarted, its host stopped) is answered 410, as AWS does for a stale id.

Invariants:
- An operation is answered by the worker that holds the connection, or 410; never
  forwarded twice (a forwarded call is served locally or refused).
- Every task the registry starts (backend calls, $disconnect, forwarded calls) is tracked
  until done, so `drain` can wait for them before the upstream pools close.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, cast

import orjson
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError

from edgeplane.upstream.client import FetchError
from edgeplane.websocket.route import WsRoute

if TYPE_CHECKING:
    from edgeplane.config.model import WebSocketLimits
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request

log = logging.getLogger("edgeplane.websocket")


class WsApi(Protocol):
    """What a connection reads of its compiled API (`websocket.api.WsApi`)."""

    name: str
    registry: ConnectionRegistry
    limits: WebSocketLimits
    selector: Any
    routes: dict[str, WsRoute]
    default: WsRoute | None
    disconnect: WsRoute | None


MAX_IN_FLIGHT = 16  # messages of one connection at their backend at once
CLOSE_WAIT = 2.0  # after our close frame, how long the client has to answer before we cut
_MAX_BUFFERED = 8 * 1024 * 1024  # bytes queued to a client that does not read: then dropped
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16}$")
_INF = float("inf")
# Client headers not passed to the $connect backend (hop-by-hop, the handshake's own,
# framing, and the context headers the gateway sets itself).
CONTEXT_HEADERS = frozenset((
    b"x-connection-id", b"x-route-key", b"x-event-type", b"x-message-id", b"x-source-ip",
    b"x-connected-at", b"x-api-id", b"x-request-id", b"x-authorizer-claims", b"x-api-key-id",
    b"x-disconnect-status-code", b"x-disconnect-reason", b"x-stage", b"x-canary",
))
_CONNECT_SKIP = CONTEXT_HEADERS | {
    b"host", b"connection", b"upgrade", b"keep-alive", b"te", b"trailer", b"transfer-encoding",
    b"content-length", b"expect", b"proxy-connection", b"proxy-authorization", b"user-agent",
    b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
}


def connect_headers(req: Request, proto: HttpProtocol, skip: frozenset[bytes] = frozenset()) -> dict[str, str]:
    """The client's end-to-end headers of the upgrade request, for the $connect backend
    (without the headers in `skip`: those the authorizer sets)."""
    out: dict[str, str] = {}
    for name, value in req.headers:
        if name in _CONNECT_SKIP or name in skip or name.startswith(b"proxy-"):
            continue
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        out[key] = out[key] + ("; " if name == b"cookie" else ", ") + text if key in out else text
    xff = out.get("x-forwarded-for")
    out["x-forwarded-for"] = f"{xff}, {proto.peer_ip}" if xff else proto.peer_ip
    return out


def context_headers(api_name: str, conn_id: str, route_key: str, event: str, message_id: str | None,
                    source_ip: str, connected_at: float, req: Request) -> dict[str, str]:
    """The context every backend call carries (AWS's $context for WebSocket APIs)."""
    h = {"x-connection-id": conn_id, "x-route-key": route_key, "x-event-type": event,
         "x-source-ip": source_ip, "x-connected-at": str(int(connected_at * 1000)),
         "x-api-id": api_name, "x-request-id": req.request_id.decode("latin-1"),
         "x-stage": req.stage}  # the stage the connection was opened on (its canary side: req.canary)
    if req.canary:
        h["x-canary"] = "true"
    if message_id is not None:
        h["x-message-id"] = message_id
    if req.claims is not None:  # ASCII JSON: no raw UTF-8 or control characters in a header
        claims = getattr(req.claims, "claims", req.claims)  # jwt.Claims: its payload mapping
        h["x-authorizer-claims"] = json.dumps(dict(claims), ensure_ascii=True, separators=(",", ":"),
                                              default=str)
    if req.api_key is not None:
        h["x-api-key-id"] = req.api_key.id
    for name, value in req.extra_upstream or ():  # a custom authorizer's forwarded context
        h[name.decode("latin-1")] = value.decode("latin-1")
    return h


def error_message(message: str, conn_id: str, request_id: str) -> bytes:
    """An error sent to the client as a message, shaped like AWS's."""
    return orjson.dumps({"message": message, "connectionId": conn_id, "requestId": request_id})


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{int(epoch * 1000) % 1000:03d}Z"


# ---------------------------------------------------------------------------- connection

class WsConnection(asyncio.Protocol):
    ws_kind = "api"  # its `kind` label in the metrics
    __slots__ = (
        "api", "registry", "proto", "req", "id", "transport", "ws", "loop", "limits",
        "source_ip", "user_agent", "connected_at", "started", "last_active", "base_headers",
        "parts", "size", "in_flight", "reading_paused", "bytes_sent", "tokens", "tokens_at",
        "close_code", "close_reason", "closing", "closed", "close_deadline", "_timer",
        "_timer_at", "next_ping", "pong_due", "write_paused_at", "messages_in", "messages_out",
        "bytes_in", "pending_pong", "frame",
    )

    def __init__(self, api: WsApi, proto: HttpProtocol, req: Request, conn_id: str,
                 transport: asyncio.Transport) -> None:
        self.api = api
        self.registry = api.registry
        self.proto = proto
        self.req = req
        self.id = conn_id
        self.transport = transport
        self.ws = Connection(ConnectionType.SERVER)
        self.loop = proto.loop
        self.limits = api.limits
        self.source_ip = req.client_ip or proto.peer_ip
        ua = next((v for k, v in req.headers if k == b"user-agent"), b"")
        self.user_agent = ua.decode("latin-1")
        self.connected_at = time.time()
        now = self.loop.time()
        self.started = self.last_active = now
        self.base_headers = context_headers(api.name, conn_id, "", "MESSAGE", None, self.source_ip,
                                            self.connected_at, req)
        self.parts: list[Any] = []
        self.size = 0
        self.in_flight = 0
        self.reading_paused = False
        self.bytes_sent = 0
        self.tokens = float(self.limits.message_burst)
        self.tokens_at = now
        self.close_code: int | None = None
        self.close_reason = ""
        self.closing = False
        self.closed = False
        self.close_deadline = _INF
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _INF
        interval = self.limits.ping_interval
        self.next_ping = now + interval if interval > 0 else _INF
        self.pong_due = _INF
        self.write_paused_at = _INF
        self.pending_pong: Any = None  # the newest ping received while writes were paused
        self.frame = 0  # bytes of the frame being received (max_frame_bytes)
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0

    def start(self, tail: bytes, write_paused: bool = False) -> None:
        self.registry.add(self)
        self.proto.ctx.websockets.add(self)
        if write_paused:  # asyncio paused the HTTP protocol's writes and will not say so again
            self.pause_writing()
        self._schedule()
        if tail:
            self.data_received(tail)

    # ------------------------------------------------------------------ input
    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.bytes_in += len(data)
        ws = self.ws
        try:
            ws.receive_data(data)
        except LocalProtocolError:
            return  # closed already: nothing more is read
        for event in ws.events():
            kind = type(event)
            if kind is TextMessage or kind is BytesMessage:
                if not self.closing:
                    self._on_data(event)
            elif kind is Ping:
                self.last_active = self.loop.time()
                if self.write_paused_at != _INF:
                    self.pending_pong = event  # RFC 6455 5.5.3: the newest is enough
                elif ws.state is ConnectionState.OPEN:
                    self._write(ws.send(cast(Ping, event).response()))
            elif kind is Pong:
                self.pong_due = _INF
            elif kind is CloseConnection:
                self._on_close(cast(CloseConnection, event))
                return

    def _on_data(self, event: Any) -> None:
        data = event.data
        n = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
        self.size += n
        self.frame += n  # wsproto hands a frame over in pieces as its bytes arrive
        if self.frame > self.limits.max_frame_bytes:  # AWS: 32 KB frames
            self.parts = []
            self.close(1009, "frame too big")
            return
        if event.frame_finished:
            self.frame = 0
        if self.size > self.limits.max_message_bytes:
            self.parts = []
            self.close(1009, "message too big")
            return
        self.parts.append(data)
        if event.message_finished:
            parts, self.parts = self.parts, []
            self.size = 0
            self._on_message("".join(parts) if isinstance(data, str) else b"".join(parts))

    def _on_message(self, msg: str | bytes) -> None:
        now = self.loop.time()
        self.last_active = now
        self.messages_in += 1
        registry = self.registry
        registry.stats["messages_received"] += 1
        message_id = registry.next_message_id()
        rate = self.limits.messages_per_second
        if rate is not None:
            tokens = min(float(self.limits.message_burst), self.tokens + (now - self.tokens_at) * rate)
            self.tokens_at = now
            if tokens < 1.0:
                self.tokens = tokens
                registry.stats["messages_throttled"] += 1
                self.send(error_message("Too Many Requests", self.id, message_id))
                return
            self.tokens = tokens - 1.0
        api = self.api
        if isinstance(msg, str):
            key = api.selector.select(msg)
            body = msg.encode("utf-8", "surrogatepass")
            ctype = "application/json" if key is not None else "text/plain; charset=utf-8"
        else:
            key, body, ctype = None, msg, "application/octet-stream"
        route = api.routes.get(key) if key is not None else None
        if route is None:
            route = api.default
        if route is None or not route.has_backend:
            registry.stats["messages_unrouted"] += 1
            self.send(error_message("Forbidden", self.id, message_id))
            return
        self.in_flight += 1
        if self.in_flight >= MAX_IN_FLIGHT and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        registry.track(self.loop.create_task(self._integrate(route, body, ctype, message_id)))

    async def _integrate(self, route: WsRoute, body: bytes, ctype: str, message_id: str) -> None:
        t0 = time.perf_counter()
        headers = dict(self.base_headers)
        headers["x-route-key"] = route.key
        headers["x-message-id"] = message_id
        headers["content-type"] = ctype
        try:
            status, _, answer = await route.call(headers, body, self.limits.max_message_bytes)
        except FetchError as exc:
            status, answer = 0, b""
            log.debug("websocket %s: %s integration failed: %s", self.id, route.key, exc)
        finally:
            self.in_flight -= 1
            if self.reading_paused and self.in_flight < MAX_IN_FLIGHT // 2 and not self.closed:
                self.reading_paused = False
                self.transport.resume_reading()
        sent = b""
        if not 200 <= status < 300:
            self.registry.stats["integration_failures"] += 1
            self.send(error_message("Internal server error", self.id, message_id))
        elif route.return_response and answer:
            self.send(answer)
            sent = answer
        access_log = self.proto.ctx.access_log
        if access_log.enabled:  # one line per routed message (eventType MESSAGE), as AWS logs them
            access_log.record_message(self.req, self.proto, route.key, self.id, message_id, t0, status,
                                      len(body), len(sent))

    def _on_close(self, event: CloseConnection) -> None:
        ws = self.ws
        state = ws.state
        if state is ConnectionState.REMOTE_CLOSING:  # the client closes: answer, then cut
            if self.close_code is None:
                self.close_code, self.close_reason = int(event.code), event.reason or ""
            self._write(ws.send(event.response()))
        elif state is ConnectionState.OPEN:  # a protocol error wsproto found: send its code
            self.close_code, self.close_reason = int(event.code), event.reason or ""
            self._write(ws.send(CloseConnection(code=event.code, reason=event.reason)))
        self.closing = True
        self.transport.close()
        # close() waits for the write buffer to drain: bound it for a client not reading
        self.close_deadline = min(self.close_deadline, self.loop.time() + CLOSE_WAIT)
        self._schedule()

    # ------------------------------------------------------------------ output
    def _write(self, data: bytes) -> None:
        if self.closed:  # the client left while a backend call was running
            return
        self.bytes_sent += len(data)
        self.transport.write(data)

    def send(self, data: bytes | str) -> bool:
        """Send one message (text when it is UTF-8, else binary); False if closed."""
        if self.closed or self.closing or self.ws.state is not ConnectionState.OPEN:
            return False
        if isinstance(data, bytes):
            try:
                event: Any = TextMessage(data=data.decode("utf-8"))
            except UnicodeDecodeError:
                event = BytesMessage(data=data)
        else:
            event = TextMessage(data=data)
        self._write(self.ws.send(event))
        self.messages_out += 1
        self.registry.stats["messages_sent"] += 1
        self.last_active = self.loop.time()
        if self.transport.get_write_buffer_size() > _MAX_BUFFERED:
            self.close_code, self.close_reason = 1006, "client is not reading"
            self.transport.abort()
        return True

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the client has `CLOSE_WAIT` seconds to answer."""
        if self.closing or self.closed:
            return
        self.closing = True
        self.close_code, self.close_reason = code, reason
        if self.ws.state is ConnectionState.OPEN:
            self._write(self.ws.send(CloseConnection(code=code, reason=reason)))
        self.close_deadline = self.loop.time() + CLOSE_WAIT
        self._schedule()

    def pause_writing(self) -> None:
        self.write_paused_at = self.loop.time()
        self._schedule()

    def resume_writing(self) -> None:
        self.write_paused_at = _INF
        ping, self.pending_pong = self.pending_pong, None
        if ping is not None and not self.closed and self.ws.state is ConnectionState.OPEN:
            self._write(self.ws.send(ping.response()))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        registry = self.registry
        registry.remove(self)
        ctx = self.proto.ctx
        ctx.websockets.discard(self)
        code = self.close_code if self.close_code is not None else 1006
        reason = self.close_reason if self.close_code is not None else "connection lost"
        route = self.api.disconnect
        if route is not None and route.has_backend:
            registry.track(self.loop.create_task(self._disconnect(route, code, reason)))
        req = self.req
        req.status = 101
        req.response_length = self.bytes_sent
        if code not in (1000, 1001, 1005):
            req.error = f"websocket closed {code}: {reason}"
        if hasattr(req, "ws_log"):  # the `websocket` object of the access-log line
            req.ws_log = {"connectionId": self.id, "api": self.api.name,
                          "messagesIn": self.messages_in, "bytesIn": self.bytes_in,
                          "messagesOut": self.messages_out, "bytesOut": self.bytes_sent,
                          "durationMs": round((self.loop.time() - self.started) * 1000, 3),
                          "closeCode": code, "closeReason": reason}
        req.ws_event = ("DISCONNECT", self.id, None)
        ctx.count_websocket("api", self.messages_in, self.messages_out, code)
        ctx.request_done(req, self.proto)

    async def _disconnect(self, route: WsRoute, code: int, reason: str) -> None:
        headers = dict(self.base_headers)
        headers.update({"x-route-key": "$disconnect", "x-event-type": "DISCONNECT",
                        "x-disconnect-status-code": str(code),
                        "x-disconnect-reason": reason.encode("ascii", "replace").decode()})
        try:
            await route.call(headers, b"", 64 * 1024)
        except FetchError as exc:  # best effort, as AWS
            self.registry.stats["integration_failures"] += 1
            log.debug("websocket %s: $disconnect failed: %s", self.id, exc)

    # ------------------------------------------------------------------ timer
    def _schedule(self) -> None:
        lim = self.limits
        at = min(self.started + lim.max_lifetime, self.last_active + lim.idle_timeout, self.next_ping,
                 self.pong_due, self.write_paused_at + self.proto.ctx.limits.send_timeout,
                 self.close_deadline)
        if self._timer is None or at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = self.loop.time()
        lim = self.limits
        if now >= self.close_deadline:
            if self.transport.is_closing():  # closed but not drained: the client is not reading
                self.transport.abort()
                return
            self.transport.close()  # the client did not answer our close frame
            self.close_deadline = now + CLOSE_WAIT  # and then at most this long to drain
            self._schedule()
            return
        if not self.closing:
            if now >= self.started + lim.max_lifetime:
                self.close(1001, "connection lifetime reached")
                return
            if now >= self.last_active + lim.idle_timeout:
                self.close(1001, "idle timeout")
                return
        if now >= self.pong_due or now >= self.write_paused_at + self.proto.ctx.limits.send_timeout:
            self.close_code = 1006
            self.close_reason = "ping not answered" if now >= self.pong_due else "client stopped reading"
            self.transport.abort()
            return
        if now >= self.next_ping:
            if self.ws.state is ConnectionState.OPEN:
                self._write(self.ws.send(Ping(payload=b"")))
                if self.pong_due == _INF:
                    self.pong_due = now + lim.pong_timeout
            self.next_ping = now + lim.ping_interval
        self._schedule()

    # ------------------------------------------------------------------ management
    def describe(self) -> dict[str, Any]:
        idle = self.loop.time() - self.last_active
        return {"connectionId": self.id, "api": self.api.name,
                "connectedAt": _iso(self.connected_at), "lastActiveAt": _iso(time.time() - idle),
                "identity": {"sourceIp": self.source_ip, "userAgent": self.user_agent}}


# ---------------------------------------------------------------------------- registry

def parse_id(conn_id: str) -> tuple[int, bytes] | None:
    """(worker index, host tag) of a well-formed connection id, else None."""
    if not _ID_RE.match(conn_id):
        return None
    try:
        raw = base64.urlsafe_b64decode(conn_id)
    except (binascii.Error, ValueError):
        return None
    return raw[0], raw[1:5]


BAD_ID = ("invalid connection id: expected 16 characters of A-Z, a-z, 0-9, '-' and '_' "
          "(as the gateway sends in X-Connection-Id)")


class ConnectionRegistry:
    """This worker's open WebSocket API connections and the @connections operations."""

    def __init__(self, loop: asyncio.AbstractEventLoop, worker_index: int = 0,
                 host_tag: bytes | None = None) -> None:
        if not 0 <= worker_index <= 255:
            raise ValueError(f"worker index must be 0..255, got {worker_index}")
        self.loop = loop
        self.index = worker_index
        self.host_tag = host_tag if host_tag is not None else os.urandom(4)
        self.conns: dict[str, WsConnection] = {}
        self.apis: dict[str, Any] = {}  # name -> ws_api.WsApi (filled by build_websocket_apis)
        self.tasks: set[asyncio.Task] = set()
        self.forwarder: Any = None  # admin.WorkerForwarder: the other workers of this host
        self.bus: Any = None  # RedisBus: other hosts
        self._prefix = os.urandom(5).hex()
        self._counter = 0
        self.stats = {"opened": 0, "messages_received": 0, "messages_sent": 0,
                      "messages_unrouted": 0, "messages_throttled": 0, "integration_failures": 0,
                      "management_calls": 0, "forwarded_calls": 0}

    def new_id(self) -> str:
        raw = bytes((self.index,)) + self.host_tag + os.urandom(7)
        return base64.urlsafe_b64encode(raw).decode()

    def next_message_id(self) -> str:
        self._counter += 1
        return f"{self._prefix}{self._counter:010x}"

    def add(self, conn: WsConnection) -> None:
        self.conns[conn.id] = conn
        self.stats["opened"] += 1

    def remove(self, conn: WsConnection) -> None:
        if self.conns.get(conn.id) is conn:
            del self.conns[conn.id]

    def track(self, task: asyncio.Task) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def max_message_bytes(self) -> int:
        return max((api.limits.max_message_bytes for api in self.apis.values()), default=128 * 1024)

    # ------------------------------------------------------------------ operations
    def local(self, method: str, conn_id: str, body: bytes = b"") -> tuple[int, bytes]:
        """An @connections operation on a connection this worker holds (else 410)."""
        self.stats["management_calls"] += 1
        conn = self.conns.get(conn_id)
        if conn is None or conn.closing or conn.closed:
            return 410, orjson.dumps({"message": "Gone"})
        if method == "GET":
            return 200, orjson.dumps(conn.describe())
        if method == "DELETE":
            conn.close(1000, "closed by the @connections API")
            return 204, b""
        if len(body) > conn.limits.max_message_bytes:
            return 413, orjson.dumps({"message": "Request Entity Too Large"})
        if not conn.send(body):
            return 410, orjson.dumps({"message": "Gone"})
        return 200, b""

    def answer_now(self, method: str, conn_id: str, body: bytes = b"",
                   forwarded: bool = False) -> tuple[int, bytes] | None:
        """The answer when no other process must be asked (else None: use `call`)."""
        owner = parse_id(conn_id)
        if owner is None:
            return 400, orjson.dumps({"message": BAD_ID})
        index, tag = owner
        if tag == self.host_tag and index == self.index:
            return self.local(method, conn_id, body)
        if forwarded or (self.forwarder if tag == self.host_tag else self.bus) is None:
            return 410, orjson.dumps({"message": "Gone"})  # never forwarded twice
        return None

    async def call(self, method: str, conn_id: str, body: bytes = b"",
                   forwarded: bool = False) -> tuple[int, bytes]:
        """An @connections operation wherever the connection lives: this worker, another
        worker of this host (its admin Unix socket), another host (Redis)."""
        now = self.answer_now(method, conn_id, body, forwarded)
        if now is not None:
            return now
        index, tag = cast("tuple[int, bytes]", parse_id(conn_id))  # well-formed: answer_now checked it
        self.stats["forwarded_calls"] += 1
        if tag == self.host_tag:
            return await self.forwarder.call(index, method, conn_id, body)
        return await self.bus.call(tag, index, method, conn_id, body)

    # ------------------------------------------------------------------ lifecycle
    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self.conns.values()):
            conn.close(code, reason)

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for backend calls and $disconnect calls still running."""
        if self.tasks:
            done, pending = await asyncio.wait(list(self.tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    def telemetry(self) -> dict[str, Any]:
        return {"open": len(self.conns), **self.stats,
                "apis": {name: sum(1 for c in self.conns.values() if c.api.name == name)
                         for name in self.apis}}
