"""The native response framer, pure-Python reference: upstream bytes to heads and bodies.

Owns parsing what an upstream answers (`upstream.pool.UpstreamConnection`): one callback
per response head instead of llhttp's one per header. `_cframing.ResponseFramer` is the
compiled twin (same interface, same answers: `tests/upstream/test_response_framer.py`);
`native.ResponseFramer` is whichever runs.

Interface: `ResponseFramer(callbacks, max_head_bytes)`, `feed_data(bytes)`,
`get_status_code()`, `should_keep_alive()`. Callbacks: `on_message_begin()` (only when a
head is unfinished at the end of a read), `on_head(status, headers, keep_alive)` with
`headers` a new list of (name as sent, value without leading blanks), `on_body(chunk)`,
`on_message_complete()`. Errors raise `HttpParserError`, `HeadTooLarge`, or after a 101
head `HttpParserUpgrade(offset of the bytes after it in this read)`.

Rules (llhttp's where it is strict; stricter where it is lax, as Envoy is -- each
refusal is the upstream's fault, answered 502 by the proxy):
- empty lines (CR, LF) between responses are skipped, as llhttp does;
- the status line is `HTTP/1.0` or `HTTP/1.1`, SP, three digits, then optionally SP and
  a reason without control characters (HTAB aside), CRLF. (llhttp also takes the
  RTSP/ and ICE/ protocols, HTTP/2.0 and controls in the reason);
- header lines, Content-Length and Connection as for requests (`framing`); a
  Content-Length with a Transfer-Encoding, or two Content-Lengths, are refused;
- the status is 100 to 999 (0xx is refused: taken for an interim 1xx, its body would
  be read as the next response); the proxy answers 502 for one it does not know;
- the only transfer coding is "chunked", in one Transfer-Encoding field: any other
  (gzip, "gzip, chunked") is refused, since the gateway re-frames bodies and cannot pass
  a coding on (llhttp reads such a body until close and the coding would be lost);
- the body: none after 1xx, 204 and 304 (a 101 stops the framer: what follows is the
  new protocol's); chunked (held to `chunked.ChunkedScanner`'s strict rules; trailer
  fields are checked and dropped: llhttp would report them as headers after the head);
  Content-Length bytes; otherwise everything until the connection closes (never
  complete, not keep-alive). A HEAD response's missing body is the caller's to know
  (`reset` after the head);
- keep-alive: HTTP/1.1 unless "Connection: close", HTTP/1.0 only with keep-alive and
  without a Transfer-Encoding (RFC 9112 6.1: that framing is suspect, close after).
"""

from __future__ import annotations

import re
from typing import Any

from edgeplane.http.chunked import ChunkedScanner, HttpParserError, HttpParserUpgrade
from edgeplane.http.framing import (
    _BODY,
    _CHUNKED,
    _IDLE,
    _UNTIL_CLOSE,
    HEADER_LINE,
    HEADER_LINES,
    RUN,
    HeadFramer,
    connection_tokens,
    content_length,
)

_REASON = rb"[\t\x20-\x7e\x80-\xff]*"
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: %b)?\r\n" % _REASON)
# What can start a status line that is not complete yet.
_STATUS_START = re.compile(rb"(?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[01](?: (?:[0-9](?:[0-9](?:[0-9](?:\r| %b\r?)?)?)?"
                           rb")?)?)?)?)?)?)?)?)?)?" % _REASON)
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))


class ResponseFramer(HeadFramer):
    __slots__ = ("_status", "_keep_alive")
    _FIRST_LINE = _STATUS_LINE
    _FIRST_START = _STATUS_START
    _FIRST_ERROR = "status line is not 'HTTP/1.x SP 3DIGIT [SP reason]'"
    _WHAT = "response"

    def __init__(self, callbacks: Any, max_head_bytes: int) -> None:
        super().__init__(callbacks, max_head_bytes)
        self._status = 0
        self._keep_alive = True

    def get_status_code(self) -> int:
        return self._status

    def should_keep_alive(self) -> bool:
        return self._keep_alive

    def _between(self, data: bytes, pos: int) -> int:
        byte = data[pos]
        if byte == 13 or byte == 10:  # empty lines between responses are skipped
            return RUN.match(data, pos).end()  # type: ignore[union-attr]  # always matches
        return pos

    def _head(self, data: bytes, start: int, held: int) -> int:
        end = data.find(b"\r\n\r\n", max(start, held - 3))  # (a carried head had none)
        if end < 0 or end + 4 - start > self._max_head:
            return self._unfinished(data, start, held)
        self._vetted = 0
        self._line_done = False
        end += 2
        line = _STATUS_LINE.match(data, start)
        if line is None or line.end() > end:
            raise HttpParserError(self._FIRST_ERROR)
        minor, digits = line.groups()
        status = int(digits)
        if status < 100:  # 0xx is no status (RFC 9110 15); taken for a 1xx it would hide a body
            raise HttpParserError("invalid status code")
        lines_at = line.end()
        if HEADER_LINES.fullmatch(data, lines_at, end) is None:
            raise HttpParserError("invalid header line")
        headers = HEADER_LINE.findall(data, lines_at, end)
        length = -1
        chunked = False
        connection: list[bytes] = []
        for name, value in headers:
            lname = name.lower()
            if lname in _FRAMING:
                if lname == b"content-length":
                    length = content_length(value, length)
                elif lname == b"transfer-encoding":
                    if chunked or value.strip(b" \t").lower() != b"chunked":
                        raise HttpParserError("unsupported Transfer-Encoding")
                    chunked = True
                else:
                    connection += connection_tokens(value)
        if chunked and length >= 0:
            raise HttpParserError("both Content-Length and Transfer-Encoding")
        if minor == b"0":  # HTTP/1.0 with a Transfer-Encoding: faulty framing, close after (RFC 9112 6.1)
            keep_alive = b"keep-alive" in connection and not chunked
        else:
            keep_alive = b"close" not in connection
        end += 2
        cb = self._cb
        if status < 200 or status == 204 or status == 304:
            state = _IDLE
        elif chunked:
            state = _CHUNKED
        elif length < 0:
            state = _UNTIL_CLOSE
            keep_alive = False
        else:
            state = _BODY if length else _IDLE
        self._status = status
        self._keep_alive = keep_alive
        cb.on_head(status, headers, keep_alive)
        if state == _IDLE:
            self._state = _IDLE
            cb.on_message_complete()
            if status == 101:
                raise HttpParserUpgrade(end - held)
        elif state == _CHUNKED:
            self._chunks = ChunkedScanner(cb.on_body)
            self._state = _CHUNKED
        else:
            self._left = length
            self._state = state
        return end
