"""One parsed client request and what happened to it, plus the lookups stages use.

Owns `Request` (per-request state, kept apart from the per-connection `HttpProtocol`, as
uvicorn does), reading the head fields the protocol acts on (`take_special_header`),
and the small readers of its header list. Header names are lower-case
bytes (the codec lowers them once); values are the bytes as received.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from edgeplane.http.fields import check_field

_DRAIN_BODY_MAX = 64 * 1024  # unread body we are willing to read and discard


# The head fields the protocol itself reads (`take_special_header`).
_SPECIAL_HEADERS = frozenset(
    (b"host", b"content-length", b"transfer-encoding", b"expect", b"x-request-id", b"traceparent")
)


class HeadRejected(Exception):
    """Raised while a head is read to refuse the request with `status`."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason


class Request:
    """One request and what happened to it (read by the proxy and the access log)."""

    __slots__ = (
        "method", "target", "path", "query", "version", "headers", "host", "host_count",
        "keep_alive", "content_length", "chunked", "expect_continue", "request_id",
        "body_buf", "body_size", "complete", "dispatched", "responded", "response_started",
        "route", "params", "route_key", "exchange", "t_start", "t_wall", "status",
        "response_length", "integration_latency", "integration_error", "upstream",
        "local_status", "local_reason", "error", "client_ip", "claims", "extra_response",
        "extra_upstream", "api_key", "pending", "websocket", "ws_log", "context", "auth_context", "hooks_failed",
        "integration_status", "auth_error", "trace_id", "ws_event", "span", "traceparent", "stage", "base_path",
        "canary", "integration_attempts", "cache_fill", "response_body",
    )

    def __init__(self, now: float) -> None:
        self.method = b""
        self.target = b""
        self.path = b""
        self.query = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.host: bytes | None = None
        self.host_count = 0
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.request_id: bytes = b""
        self.body_buf: list[bytes] | None = None
        self.body_size = 0
        self.complete = False
        self.dispatched = False
        self.responded = False
        self.response_started = False
        self.route: Any = None
        self.params: dict[str, bytes] | None = None
        self.route_key = "-"
        self.exchange: Any = None
        self.t_start = now
        self.t_wall = time.time()
        self.status = 0
        self.response_length = 0
        self.integration_latency: float | None = None
        self.integration_error: str | None = None
        self.upstream: str | None = None
        self.local_status = 0  # set when the request must be refused when it is answered
        self.local_reason = ""
        self.error: str | None = None  # the gateway's reason for an error status (logged)
        # Set by stages (see stages.py):
        self.client_ip: str | None = None  # when trusted proxies name another client
        self.claims: Any = None  # verified JWT claims (a read-only mapping, `jwt.verify.Claims`)
        self.extra_response = b""  # header lines for the response (CORS)
        self.extra_upstream: list[tuple[bytes, bytes]] | None = None  # forwarded claims
        self.api_key: Any = None  # apikeys.ApiKey of an API-key authorizer
        self.pending = False  # an asynchronous stage is running (see run_chain)
        self.websocket = False  # a WebSocket opening handshake (GET, 1.1, Upgrade: websocket)
        self.ws_log: dict | None = None  # a WebSocket's counters, logged when it closes
        self.context: dict[str, Any] | None = None  # plugins' per-request scratch (RequestView.context)
        self.auth_context: dict[str, Any] | None = None  # a custom authorizer's `context`
        self.hooks_failed = False  # a hook raised: the 500 skips the response hooks
        self.integration_status = 0  # the status the upstream answered (0: none)
        self.integration_attempts = 0  # tries of the integration (`upstream.retry`; 0: none)
        self.stage = "$default"  # the stage that served it (`routing.stages`)
        self.canary = False  # served by its stage's canary side (`routing.canary`)
        self.cache_fill: Any = None  # the response cache's tap on a miss (`policies.cache.stage.Fill`)
        self.response_body: bytes | None = None  # an upstream body held for a response mapping
        # The path as sent, when a stage's base path was taken off `path` ("/prod/users/7");
        # b"" otherwise (`routing.stages`)
        self.base_path = b""
        self.auth_error: str | None = None  # why an authorizer refused or failed
        self.trace_id: str | None = None  # W3C trace id (32 hex digits) with tracing on
        # The client's `traceparent` header, as sent; None after `Tracer.begin` unless valid.
        self.traceparent: bytes | None = None
        self.span: Any = None  # the request's server span (`observability.tracing`), when sampled
        # A WebSocket API's access-log event: (eventType, connectionId, messageId)
        self.ws_event: tuple[str, str, str | None] | None = None


def body_drainable(req: Request) -> bool:
    """Whether the unread rest of `req`'s body is small enough to read and drop, so the
    connection can stay open after answering early. Chunked bodies are never drained."""
    if req.chunked:
        return False
    if req.content_length is None:
        return True  # no body at all
    return not req.expect_continue and req.content_length - req.body_size <= _DRAIN_BODY_MAX



def head_end(req: Request, keep: bool) -> bytes:
    """The last lines of a response head to `req`: `Connection` as `keep` and the
    request's HTTP version need it, the gateway's own headers for it (CORS), its request
    id, and the blank line."""
    if not keep:
        connection = b"connection: close\r\n"
    elif req.version == "1.0":
        connection = b"connection: keep-alive\r\n"
    else:
        connection = b""
    return b"%b%bx-request-id: %b\r\n\r\n" % (connection, req.extra_response, req.request_id)


def log_extra(req: Request) -> dict[str, str]:
    """`extra=` for a log call about `req`: its id, the `requestId` of JSON log lines."""
    return {"request_id": req.request_id.decode("latin-1")}


def identity_header(source: str) -> bytes:
    """The lower-case header name of a `$request.header.NAME` identity source."""
    return source.rsplit(".", 1)[1].lower().encode()


def header(req: Request, name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case bytes), or None."""
    for key, value in req.headers:
        if key == name:
            return value
    return None


def cookie(req: Request, name: bytes) -> bytes | None:
    """The value of cookie `name` in the request's Cookie headers, or None."""
    for key, value in req.headers:
        if key == b"cookie":
            for part in value.split(b";"):
                k, _, v = part.strip().partition(b"=")
                if k == name:
                    return v
    return None


def header_all(req: Request, name: bytes) -> list[bytes]:
    """Every value of header `name`, in order."""
    return [value for key, value in req.headers if key == name]


def forwarded(pairs: list[tuple[bytes, str]], values: Any) -> list[tuple[bytes, bytes]]:
    """Header lines for `(header, key)` pairs taken from claims or an authorizer context:
    strings as they are (UTF-8), anything else as compact JSON (control characters
    escaped). Raises `fields.UnsafeField` for a string with control characters or
    longer than `fields.MAX_VALUE_BYTES`: such a value is never forwarded."""
    out = []
    for name, key in pairs:
        value = values.get(key)
        if value is not None:
            text = value if isinstance(value, str) else orjson.dumps(value).decode()
            raw = text.encode("utf-8", "replace")
            check_field(name, raw)
            out.append((name, raw))
    return out


def take_special_header(req: Request, name: bytes, value: bytes) -> None:
    """Read one of the `_SPECIAL_HEADERS` into `req` (the protocol calls it for those
    only); a value the gateway refuses raises `HeadRejected`."""
    if name == b"host":
        req.host = value
        req.host_count += 1
    elif name == b"content-length":
        req.content_length = int(value)  # the parser already checked the digits
    elif name == b"transfer-encoding":
        # Only plain "chunked" is forwarded (re-framed); llhttp would accept
        # "gzip, chunked" and refuse a non-final "chunked" (or "chunked" + HTAB) only
        # after the head was handed over (routed, maybe sent on): refused here, before.
        if value != b"chunked" and value.rstrip(b" ").lower() != b"chunked":
            raise HeadRejected(400, "unsupported Transfer-Encoding")
        req.chunked = True
    elif name == b"expect":
        if value.lower() == b"100-continue":
            req.expect_continue = True
        else:
            raise HeadRejected(417, "unsupported Expect value")
    elif name == b"x-request-id":
        req.request_id = value
    elif name == b"traceparent":  # W3C: a repeated one is invalid (b"")
        req.traceparent = value if req.traceparent is None else b""
