"""Bytes the gateway writes itself: status lines, the Date header, local replies.

Owns:
- `STATUS_LINES`: precomputed `HTTP/1.1 <code> <reason>\\r\\n` for every code 100..599;
- `DateHeader`: the `date:` header line, rebuilt at most once a second by a loop timer;
- `GATEWAY_MESSAGES`: the AWS gateway-response message for each local-reply status;
- `local_reply()`: a complete response (head and body) for mocks and gateway errors.

Invariants: everything returned is `bytes`; nothing here touches a transport; header
names are lower-case; a local reply always carries a Content-Length (never chunked), so
the connection can stay open after it unless the caller says otherwise.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

import orjson


def _reason(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


STATUS_LINES: dict[int, bytes] = {
    code: f"HTTP/1.1 {code} {_reason(code)}\r\n".encode() for code in range(100, 600)
}

# AWS API Gateway's gateway responses (AWS-SEMANTICS.md) plus the HTTP statuses a
# front door needs on its own (400, 408, 431, 505).
GATEWAY_MESSAGES: dict[int, str] = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Endpoint request timed out",
    505: "HTTP Version Not Supported",
}

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
JSON_TYPE = b"application/json"

# Statuses whose responses never carry a body (RFC 9110 6.4.1).
NO_BODY_STATUSES = frozenset({204, 304}) | frozenset(range(100, 200))


class DateHeader:
    """The `date:` header line, refreshed once a second (DESIGN.md hot-path habits)."""

    __slots__ = ("line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self.line = b""
        self.refresh()

    def refresh(self) -> None:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self.line = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"


def error_body(message: str) -> bytes:
    return orjson.dumps({"message": message})


_ERROR_BODIES = {code: error_body(msg) for code, msg in GATEWAY_MESSAGES.items()}


def gateway_error_body(status: int) -> bytes:
    body = _ERROR_BODIES.get(status)
    return body if body is not None else error_body(_reason(status))


def local_reply(
    status: int,
    body: bytes,
    *,
    content_type: bytes = JSON_TYPE,
    keep_alive: bool,
    http10: bool = False,
    date: bytes,
    request_id: bytes | None = None,
    extra: bytes = b"",
    head_only: bool = False,
) -> bytes:
    """A whole response. `extra` is pre-rendered header lines (`name: value\\r\\n`...)."""
    parts = [STATUS_LINES[status], date, b"server: edgeplane\r\n"]
    if status in NO_BODY_STATUSES:
        body = b""
    else:
        parts.append(b"content-type: " + content_type + b"\r\n")
        parts.append(b"content-length: " + str(len(body)).encode() + b"\r\n")
    if request_id is not None:
        parts.append(b"x-request-id: " + request_id + b"\r\n")
    if extra:
        parts.append(extra)
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    elif http10:
        parts.append(b"connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if body and not head_only:
        parts.append(body)
    return b"".join(parts)
