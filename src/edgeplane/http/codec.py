"""Request parsers for the downstream protocol: httptools (hot path) or h11.

Owns the choice of parser and the adapter that makes h11 look like
`httptools.HttpRequestParser`, so `server.HttpProtocol` has one set of callbacks
(`on_message_begin`, `on_url`, `on_header`, `on_headers_complete`, `on_body`,
`on_message_complete`) and one error type (`httptools.HttpParserError`, with
`httptools.HttpParserUpgrade` for upgrade/CONNECT requests) whichever parser runs.

Also owns reading header values the gateway interprets itself (`header_value`,
`header_tokens`: lower-case names, comma-separated tokens), for the proxy's
Connection handling and the WebSocket handshakes.

h11 also serves as the differential oracle in the tests: both parsers get the same byte
corpus and must agree on what is a valid request.

Invariants of the h11 adapter: it only parses; it never writes. After each request it
completes a synthetic response cycle inside h11 so the next pipelined request can be
parsed, and stops parsing once h11 says the connection must close. It calls
`on_message_begin` at the first byte of a request, as llhttp does (so head timeouts and
head-size accounting work the same), and refuses, before h11 sees a complete head,
what llhttp refuses but h11 would accept: bare LF line ends, obs-fold, control
characters, more than one Content-Length (or a list), and Content-Length together with
Transfer-Encoding. A head over the size limit raises `HeadTooLarge`. HTTP/1.0 requests
with `Connection: keep-alive` keep the connection open, as with llhttp (h11 alone would
close it).
"""

from __future__ import annotations

import re
from typing import Any, cast

import h11
import httptools

HttpParserError = httptools.HttpParserError
HttpParserUpgrade = httptools.HttpParserUpgrade


class HeadTooLarge(HttpParserError):
    """The request head outgrew the parser's limit (answered 431)."""


_SYNTHETIC_RESPONSE = h11.Response(status_code=200, headers=[(b"content-length", b"0")])


# Where h11 ends a head (it accepts LF or CRLF line ends), and what in a head llhttp
# refuses: a control character (HTAB aside), a CR not before LF, obs-fold.
_HEAD_END = re.compile(rb"\n\r?\n")
_HEAD_BAD = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|\n[ \t]")
_CONTENT_LENGTH = re.compile(rb"\ncontent-length[ \t]*:([^\r\n]*)")
_TRANSFER_ENCODING = re.compile(rb"\ntransfer-encoding[ \t]*:")


def _check_head(head: bytes) -> None:
    """Refuse a complete raw head that llhttp would refuse but h11 accepts."""
    if head.count(b"\n") != head.count(b"\r\n"):
        raise HttpParserError("bare LF in request head")
    if _HEAD_BAD.search(head) is not None:
        raise HttpParserError("invalid character or obs-fold in request head")
    lower = head.lower()
    lengths = _CONTENT_LENGTH.findall(lower)
    if lengths:
        if len(lengths) > 1 or b"," in lengths[0]:
            raise HttpParserError("duplicate Content-Length")
        if _TRANSFER_ENCODING.search(lower) is not None:
            raise HttpParserError("both Content-Length and Transfer-Encoding")


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",")]


class H11RequestParser:
    """An `httptools.HttpRequestParser` look-alike built on h11."""

    __slots__ = (
        "_conn", "_cb", "_method", "_version", "_keep_alive", "_upgrade", "_stopped", "_begun",
        "_max_head",
    )

    def __init__(self, callbacks: Any, max_head_bytes: int = 64 * 1024) -> None:
        self._max_head = max_head_bytes
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self._cb = callbacks
        self._method = b""
        self._version = "1.1"
        self._keep_alive = True
        self._upgrade = False
        self._stopped = False
        self._begun = False  # on_message_begin called for the request being received

    def get_method(self) -> bytes:
        return self._method

    def get_http_version(self) -> str:
        return self._version

    def should_keep_alive(self) -> bool:
        return self._keep_alive

    def should_upgrade(self) -> bool:
        return self._upgrade

    def _tail_offset(self, data: bytes) -> int:
        # Where the bytes after the upgrade request start in `data` (httptools' offset).
        return max(0, len(data) - len(self._conn.trailing_data[0]))

    def feed_data(self, data: bytes) -> None:
        if self._stopped:
            return
        conn = self._conn
        try:
            conn.receive_data(bytes(data))
            while True:
                if conn.their_state is h11.IDLE and not self._begin():
                    return
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    return
                if event is h11.PAUSED:
                    if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                        self._stopped = True
                        raise HttpParserUpgrade(self._tail_offset(data))
                    return
                etype = type(event)
                if etype is h11.Request:
                    self._on_request(cast(h11.Request, event))
                elif etype is h11.Data:
                    self._cb.on_body(bytes(cast(h11.Data, event).data))
                elif etype is h11.EndOfMessage:
                    self._cb.on_message_complete()
                    if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                        self._stopped = True
                        raise HttpParserUpgrade(self._tail_offset(data))
                    self._finish_cycle()
                    if self._stopped:
                        return
                    conn = self._conn
                elif etype is h11.ConnectionClosed:
                    return
        except h11.RemoteProtocolError as exc:
            self._stopped = True
            if exc.error_status_hint == 431:
                raise HeadTooLarge(str(exc)) from None
            raise HttpParserError(str(exc)) from None
        except HttpParserError:
            self._stopped = True
            raise

    def _begin(self) -> bool:
        """Between requests: note the start of the next one and vet its head once it is
        complete. False when nothing is buffered (wait for more bytes)."""
        buf = self._conn.trailing_data[0]
        if not buf:
            return False
        if not self._begun:
            self._begun = True
            self._cb.on_message_begin()
        end = _HEAD_END.search(buf)
        if end is not None:
            _check_head(buf[: end.end()])
        return True

    def _on_request(self, event: h11.Request) -> None:
        cb = self._cb
        self._method = bytes(event.method)
        self._version = event.http_version.decode()
        connection_tokens: list[bytes] = []
        upgrade = False
        if not self._begun:
            cb.on_message_begin()
        self._begun = False
        cb.on_url(bytes(event.target))
        for name, value in event.headers.raw_items():
            if name.lower() == b"connection":
                connection_tokens.extend(_tokens(value))
            elif name.lower() == b"upgrade":
                upgrade = True
            cb.on_header(bytes(name), bytes(value))
        if self._version == "1.0":
            self._keep_alive = b"keep-alive" in connection_tokens
        else:
            self._keep_alive = b"close" not in connection_tokens
        self._upgrade = self._method == b"CONNECT" or (upgrade and b"upgrade" in connection_tokens)
        cb.on_headers_complete()

    def _finish_cycle(self) -> None:
        conn = self._conn
        conn.send(_SYNTHETIC_RESPONSE)
        conn.send(h11.EndOfMessage())
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        elif self._keep_alive:
            # HTTP/1.0 with "Connection: keep-alive": h11 always closes after HTTP/1.0,
            # llhttp keeps it open. Go on with a fresh h11 connection and the bytes
            # already received.
            data = conn.trailing_data[0]
            self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
            self._conn.receive_data(data)
        else:
            self._stopped = True


def new_request_parser(kind: str, callbacks: Any, max_head_bytes: int) -> Any:
    if kind == "h11":
        return H11RequestParser(callbacks, max_head_bytes)
    return httptools.HttpRequestParser(callbacks)


def header_tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Lower-cased comma-separated tokens of every `name` header. Names are compared as
    they are: request headers are lower-cased by the server; lower-case others first."""
    out = []
    for n, v in headers:
        if n == name:
            out += [t.strip().lower() for t in v.split(b",") if t.strip()]
    return out


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first `name` header's value, stripped; None when absent (names as above)."""
    for n, v in headers:
        if n == name:
            return v.strip()
    return None
