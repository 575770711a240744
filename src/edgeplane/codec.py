"""Request parsers for the downstream protocol: httptools (hot path) or h11.

Owns the choice of parser and the adapter that makes h11 look like
`httptools.HttpRequestParser`, so `server.HttpProtocol` has one set of callbacks
(`on_message_begin`, `on_url`, `on_header`, `on_headers_complete`, `on_body`,
`on_message_complete`) and one error type (`httptools.HttpParserError`, with
`httptools.HttpParserUpgrade` for upgrade/CONNECT requests) whichever parser runs.

h11 also serves as the differential oracle in the tests: both parsers get the same byte
corpus and must agree on what is a valid request.

Invariants of the h11 adapter: it only parses; it never writes. After each request it
completes a synthetic response cycle inside h11 so the next pipelined request can be
parsed, and stops parsing once h11 says the connection must close.
"""

from __future__ import annotations

from typing import Any

import h11
import httptools

HttpParserError = httptools.HttpParserError
HttpParserUpgrade = httptools.HttpParserUpgrade

_SYNTHETIC_RESPONSE = h11.Response(status_code=200, headers=[(b"content-length", b"0")])


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",")]


class H11RequestParser:
    """An `httptools.HttpRequestParser` look-alike built on h11."""

    __slots__ = ("_conn", "_cb", "_method", "_version", "_keep_alive", "_upgrade", "_stopped")

    def __init__(self, callbacks: Any, max_head_bytes: int = 64 * 1024) -> None:
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self._cb = callbacks
        self._method = b""
        self._version = "1.1"
        self._keep_alive = True
        self._upgrade = False
        self._stopped = False

    def get_method(self) -> bytes:
        return self._method

    def get_http_version(self) -> str:
        return self._version

    def should_keep_alive(self) -> bool:
        return self._keep_alive

    def should_upgrade(self) -> bool:
        return self._upgrade

    def feed_data(self, data: bytes) -> None:
        if self._stopped:
            return
        conn = self._conn
        try:
            conn.receive_data(bytes(data))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    return
                if event is h11.PAUSED:
                    if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                        self._stopped = True
                        raise HttpParserUpgrade(0)
                    return
                etype = type(event)
                if etype is h11.Request:
                    self._on_request(event)
                elif etype is h11.Data:
                    self._cb.on_body(bytes(event.data))
                elif etype is h11.EndOfMessage:
                    self._cb.on_message_complete()
                    if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                        self._stopped = True
                        raise HttpParserUpgrade(0)
                    self._finish_cycle()
                    if self._stopped:
                        return
                elif etype is h11.ConnectionClosed:
                    return
        except h11.RemoteProtocolError as exc:
            self._stopped = True
            raise HttpParserError(str(exc)) from None

    def _on_request(self, event: h11.Request) -> None:
        cb = self._cb
        self._method = bytes(event.method)
        self._version = event.http_version.decode()
        connection_tokens: list[bytes] = []
        upgrade = False
        cb.on_message_begin()
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
        else:
            self._stopped = True


def new_request_parser(kind: str, callbacks: Any, max_head_bytes: int) -> Any:
    if kind == "h11":
        return H11RequestParser(callbacks, max_head_bytes)
    return httptools.HttpRequestParser(callbacks)
