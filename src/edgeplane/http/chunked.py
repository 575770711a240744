"""Chunked request bodies, and the parse errors every request parser raises.

Owns `ChunkedScanner`, a sans-IO follower of one chunked body held to the strict rules
of `codec` (its docstring lists them: size-line syntax, extensions, trailers and their
limits), and the error types: httptools' own (`HttpParserError`, `HttpParserUpgrade`),
so the protocol catches one family whichever parser runs, and `HeadTooLarge` (431).

Two uses: ahead of llhttp and h11 it only vets the framing lines (chunk data is skipped
by count, never looked at); inside the native framer (`framing`) it is the decoder too:
with a `sink`, each run of chunk data is handed to it as it is passed, in stream order,
before any later line of the same read is judged.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import httptools

HttpParserError = httptools.HttpParserError
HttpParserUpgrade = httptools.HttpParserUpgrade


class HeadTooLarge(HttpParserError):
    """The request head outgrew the parser's limit (answered 431)."""


TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # an RFC 9110 token (the framers' header names too)
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;%b(?:=(?:%b|%b))?)*\r\n" % (TOKEN, TOKEN, _QUOTED))
_TRAILER_LINE = re.compile(rb"(%b):[\t\x20-\x7e\x80-\xff]*\r\n" % TOKEN)
# Fields llhttp acts on even in trailers (its "special" headers); framing and connection
# control have no place there (RFC 9110 6.5.1), and h11 would ignore them.
_TRAILER_REFUSED = frozenset(
    (b"content-length", b"transfer-encoding", b"connection", b"proxy-connection", b"upgrade")
)
_CHUNK_LINE_MAX = 1024
_TRAILERS_MAX = 8192


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedScanner:
    """Follows one chunked body on the raw bytes, ahead of the parser (sans-IO).

    `feed` scans bytes in stream order and raises `HttpParserError` at the first size
    line or trailer line the strict rules refuse. Chunk data is skipped by count, never
    looked at. Partial lines are carried between reads, up to the line limits.
    """

    __slots__ = ("_state", "_left", "_carry", "_trailers", "_sink")

    def __init__(self, sink: Callable[[bytes], object] | None = None) -> None:
        self._sink = sink  # receives the chunk data (None: skipped unseen)
        self._state = _SIZE
        self._left = 0  # chunk data bytes still to skip
        self._carry = b""  # the start of a line that continues in the next read
        self._trailers = 0  # trailer-section bytes so far

    def feed(self, data: bytes, pos: int = 0) -> int:
        """Scan `data[pos:]`. Returns the offset just past the body's end (after the
        trailer section's empty line), or -1 when the body goes on past `data`."""
        n = len(data)
        state = self._state
        while pos < n:
            if state == _DATA:
                left = self._left
                if n - pos < left:
                    self._left = left - (n - pos)
                    if self._sink is not None:
                        self._sink(data[pos:] if pos else data)
                    pos = n
                    break
                if self._sink is not None:
                    self._sink(data[pos : pos + left])
                pos += left
                state = _DATA_END
                if data.startswith(b"\r\n", pos):  # the usual case, without a line search
                    pos += 2
                    state = _SIZE
                continue
            if state == _DONE:
                break
            if state == _SIZE and not self._carry:  # the usual case, without a line search
                m = _CHUNK_SIZE_LINE.match(data, pos)
                if m is not None and m.end() - pos <= _CHUNK_LINE_MAX:
                    pos = m.end()
                    self._left = int(m[1], 16)
                    if self._left:
                        state = _DATA
                    elif data.startswith(b"\r\n", pos):  # the last chunk, no trailers
                        self._state = _DONE
                        return pos + 2
                    else:
                        state = _TRAILER
                    continue
            nl = data.find(b"\n", pos)
            if nl < 0 or self._carry:  # a line split across reads
                line = self._whole_line(data, pos, nl, state)
                if line is None:
                    break
                text, lo, hi = line, 0, len(line)
            else:
                text, lo, hi = data, pos, nl + 1
            pos = nl + 1
            if state != _TRAILER and hi - lo > _CHUNK_LINE_MAX:
                raise HttpParserError("chunk size line too long")
            if state == _SIZE:
                m = _CHUNK_SIZE_LINE.fullmatch(text, lo, hi)
                if m is None:
                    raise HttpParserError("invalid chunk size line")
                self._left = int(m[1], 16)
                state = _DATA if self._left else _TRAILER
            elif state == _DATA_END:
                if hi - lo != 2 or not text.startswith(b"\r\n", lo):
                    raise HttpParserError("chunk data not followed by CRLF")
                state = _SIZE
            elif hi - lo == 2 and text.startswith(b"\r\n", lo):  # the trailer section's end
                self._state = _DONE
                return pos
            else:
                self._trailers += hi - lo
                m = _TRAILER_LINE.fullmatch(text, lo, hi)
                if m is None or m.group(1).lower() in _TRAILER_REFUSED:
                    raise HttpParserError("invalid trailer field")
                if self._trailers > _TRAILERS_MAX:
                    raise HttpParserError("trailer section too large")
        self._state = state
        return -1

    def _whole_line(self, data: bytes, pos: int, nl: int, state: int) -> bytes | None:
        """Carry the start of a line that ends in a later read; the whole line once it
        ends in this one."""
        if nl < 0:
            carry = self._carry = self._carry + data[pos:]
            limit = _TRAILERS_MAX - self._trailers if state == _TRAILER else _CHUNK_LINE_MAX
            if len(carry) > limit:
                raise HttpParserError("chunk size line or trailer section too long")
            return None
        line = self._carry + data[pos : nl + 1]
        self._carry = b""
        return line
