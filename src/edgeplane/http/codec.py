"""Request parsers for the downstream protocol: httptools (hot path) or h11.

Owns the choice of parser and what makes the two give the same answers through one
callback interface and one error type, httptools' (`HttpParserError`, and
`HttpParserUpgrade` for upgrade/CONNECT requests), whichever parser runs. Also owns
reading header values the gateway interprets itself (`header_value`, `header_tokens`:
lower-case names, comma-separated tokens). h11 also serves as the differential oracle in
the tests: both parsers get the same byte corpus and must agree on what is valid.

Strict rules, the same for both parsers where llhttp and h11 differ (each refusal a 400):
- Before a request line at most one empty line (CRLF) is ignored, as RFC 9112 2.2 asks;
  a second one, a bare CR or a bare LF is refused, also between pipelined requests.
  (llhttp skips any run of CR and LF, h11 refuses even one CRLF.)
- The request line is `method SP request-target SP HTTP/d.d` with single spaces, the
  method one of llhttp's HTTP methods (case-sensitive; PRI refused), the version one of
  0.9, 1.0, 1.1, 2.0. (llhttp also takes runs of spaces and the RTSP/ and ICE/
  protocols; h11 any token method and any d.d.)
- A chunk-size line is 1 to 16 hex digits, leading zeros included (every 64-bit size
  fits; llhttp takes any number of zeros, h11 up to 20 digits), then extensions `;name`
  or `;name=value` (a token or quoted-string) with nothing empty and no whitespace, then
  CRLF; at most `_CHUNK_LINE_MAX` bytes. (llhttp takes `5;;a` and `5;=a`, h11 anything
  after `;` and spaces before the CRLF.)
- The trailer section holds `name:value` lines with CRLF ends, no control characters or
  obs-fold, at most `_TRAILERS_MAX` bytes, and none of the fields llhttp acts on there
  (Content-Length, Transfer-Encoding, Connection, Proxy-Connection, Upgrade). (h11
  accepts bare LF, obs-fold and controls there, and ignores those fields.)

How: `ChunkedScanner` follows chunked framing on the raw bytes ahead of either parser and
refuses a bad size line or trailer before the parser delivers what follows it.
`LlhttpRequestParser` is httptools' parser with `_LlhttpGuard` as its callbacks: it
passes `on_url` and `on_header` straight to the protocol (no frame added per header) and
wraps the per-message ones to know, at each, the offset llhttp has reached in the read:
so it checks the bytes before each request line and the line itself, finds the head's
end (one `bytes.find`), and starts the scanner at the body when llhttp reports the first
chunk. Cost over bare httptools (timeit, one core): +0.8 us per request, +0.2 us per
body read, +1.1 us per chunk of a chunked body; nothing per body byte.

Invariants of the h11 adapter: it only parses; it never writes. After each request it
completes a synthetic response cycle inside h11 so the next pipelined request can be
parsed, and stops parsing once h11 says the connection must close. It calls
`on_message_begin` at the first byte of a request line, as llhttp does (so head timeouts
and head-size accounting work the same), and refuses, before h11 sees a complete head,
what llhttp refuses but h11 would accept: bare LF line ends, obs-fold, control
characters, more than one Content-Length (or a list), and Content-Length together with
Transfer-Encoding. A head over the size limit raises `HeadTooLarge`. HTTP/1.0 requests
with `Connection: keep-alive` keep the connection open, as with llhttp (h11 alone would
close it). Trailer fields are not passed to `on_header` (llhttp passes them).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, cast

import h11
import httptools

from edgeplane.http import native
from edgeplane.http.chunked import (
    _CHUNK_LINE_MAX,
    ChunkedScanner,
    HeadTooLarge,
    HttpParserError,
    HttpParserUpgrade,
)
from edgeplane.http.framing import METHODS, RUN, VERSIONS, check_run

if TYPE_CHECKING:
    from array import array

_SYNTHETIC_RESPONSE = h11.Response(status_code=200, headers=[(b"content-length", b"0")])


# Where h11 ends a head (it accepts LF or CRLF line ends), and what in a head llhttp
# refuses: a control character (HTAB aside), a CR not before LF, obs-fold.
_HEAD_END = re.compile(rb"\n\r?\n")
_HEAD_BAD = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|\n[ \t]")
_CONTENT_LENGTH = re.compile(rb"\ncontent-length[ \t]*:([^\r\n]*)")
_TRANSFER_ENCODING = re.compile(rb"\ntransfer-encoding[ \t]*:([^\r\n]*)")

def _check_head(head: bytes) -> bool:
    """Refuse a complete raw head that llhttp would refuse but h11 accepts. True when
    llhttp would refuse its framing only after the head is complete (the caller does)."""
    if head.count(b"\n") != head.count(b"\r\n"):
        raise HttpParserError("bare LF in request head")
    if _HEAD_BAD.search(head) is not None:
        raise HttpParserError("invalid character or obs-fold in request head")
    lower = head.lower()
    codings = _TRANSFER_ENCODING.findall(lower)
    lengths = _CONTENT_LENGTH.findall(lower)
    if lengths:
        if len(lengths) > 1 or b"," in lengths[0]:
            raise HttpParserError("duplicate Content-Length")
        if codings:
            raise HttpParserError("both Content-Length and Transfer-Encoding")
    # llhttp takes "chunked" only when nothing but SP follows it (h11 strips HTAB too)
    return any(coding.rstrip(b" ").endswith(b"\t") for coding in codings)


def _check_request_line(line: bytes) -> None:
    """`line` up to its LF, without it (so ending in CR): single spaces, HTTP/ protocol.
    PRI is refused here, at once: llhttp waits for the rest of an HTTP/2 preface and
    then refuses it, whatever the version."""
    if line.count(b" ") != 2 or line[-9:-4] != b"HTTP/" or line[:4] == b"PRI ":
        raise HttpParserError("request line is not 'method SP target SP HTTP/x.y'")


_RUN_PHASE, _HEAD_PHASE, _BODY_PHASE = range(3)


class _LlhttpGuard:
    """The callbacks llhttp calls (see the module docstring): the protocol's own for the
    URL and headers, wrapped ones that keep `pos` for the rest.

    `data` is the read being parsed; `pos` the offset in it up to which the bytes are
    accounted for: after the bytes before a request line (`_RUN_PHASE`), at the request
    line's start (`_HEAD_PHASE`), after the head and the body bytes delivered so far
    (`_BODY_PHASE`). What a read leaves unaccounted (a partial run, head or first size
    line) is carried into the next one by `after_read`.
    """

    __slots__ = (
        "on_url", "on_header", "_begin", "_head_done", "_body", "_done",
        "data", "pos", "phase", "run", "start", "line", "line_ok", "tail", "pending",
        "chunks", "chunk_end",
    )

    def __init__(self, proto: Any) -> None:
        self.on_url = proto.on_url  # llhttp calls these two directly
        self.on_header = proto.on_header
        self._begin = proto.on_message_begin
        self._head_done = proto.on_headers_complete
        self._body = proto.on_body
        self._done = proto.on_message_complete
        self.data = b""
        self.pos = 0
        self.phase = _RUN_PHASE
        self.run = b""  # bytes before the next request line, carried from earlier reads
        self.start = -1  # offset of the request line in `data`; -1: began in an earlier read
        self.line: bytearray | None = None  # the request line so far, when it spans reads
        self.line_ok = False  # the request line was checked
        self.tail = b""  # the head's last 3 bytes so far, when it spans reads
        self.pending = b""  # the body's start, before llhttp reports its first chunk
        self.chunks: ChunkedScanner | None = None
        self.chunk_end = -1  # where `chunks` found the body's end in `data`

    def on_message_begin(self) -> None:
        data = self.data
        pos = self.pos
        if self.run or data[pos] == 13 or data[pos] == 10:  # llhttp skipped CR/LF bytes
            end = RUN.match(data, pos).end()  # type: ignore[union-attr]  # always matches
            check_run(self.run + data[pos:end], True)
            self.run = b""
            pos = end
        self.pos = self.start = pos
        self.phase = _HEAD_PHASE
        self._begin()

    def on_headers_complete(self) -> None:
        data = self.data
        start = self.start
        if start >= 0:  # the whole head is in this read (the common case): no copies
            nl = data.find(b"\n", start)
            # llhttp checked the rest: 72 is the "H" of "HTTP/d.d" (not RTSP/, ICE/)
            if data[nl - 9] != 72 or data.count(b" ", start, nl) != 2:
                _check_request_line(data[start:nl])  # raises
            end = data.find(b"\r\n\r\n", nl - 1)
            if end < 0:  # llhttp saw a head end that the search did not
                raise HttpParserError("request head framing out of step")
        else:
            if not self.line_ok:
                _check_request_line(bytes(self.line or b"") + data[: data.find(b"\n")])
            tail = self.tail
            split = (tail + data[:3]).find(b"\r\n\r\n")  # a head end split across reads
            end = split - len(tail) if split >= 0 else data.find(b"\r\n\r\n")
            self.tail = b""
            self.line = None
            if split < 0 and end < 0:  # llhttp saw a head end that the search did not
                raise HttpParserError("request head framing out of step")
        self.pos = end + 4
        self.start = -1
        self.phase = _BODY_PHASE
        self._head_done()

    def on_body(self, chunk: bytes) -> None:
        self.pos += len(chunk)  # meaningful for Content-Length bodies; chunked use `chunks`
        self._body(chunk)

    def on_chunk_header(self) -> None:
        if self.chunks is None:  # the first size line: scan the body from its start
            chunks = self.chunks = ChunkedScanner()
            if self.pending:
                chunks.feed(self.pending)
                self.pending = b""
            self.chunk_end = chunks.feed(self.data, self.pos)

    def on_message_complete(self) -> None:
        if self.chunks is not None:
            if self.chunk_end < 0:
                raise HttpParserError("chunked framing out of step")
            self.pos = self.chunk_end
            self.chunks = None
            self.chunk_end = -1
        self.phase = _RUN_PHASE
        self._done()

    def after_read(self) -> None:
        """llhttp stopped short of the read's end: vet and carry what it left."""
        data = self.data
        pos = self.pos
        phase = self.phase
        if phase == _RUN_PHASE:
            end = RUN.match(data, pos).end()  # type: ignore[union-attr]  # always matches
            self.run += data[pos:end]
            check_run(self.run, False)
        elif phase == _HEAD_PHASE:
            if self.start >= 0:  # the head began in this read and goes on in the next
                self.line, self.line_ok, self.tail = None, False, b""
            if not self.line_ok:
                nl = data.find(b"\n", pos)
                if nl >= 0:
                    _check_request_line(bytes(self.line or b"") + data[pos:nl])
                    self.line_ok = True
                    self.line = None
                elif self.line is None:
                    self.line = bytearray(data[pos:])
                else:
                    self.line += data[pos:]
            self.tail = data[-3:] if len(data) - pos >= 3 else (self.tail + data[pos:])[-3:]
            self.start = -1
        else:  # a chunked body's first size line, not complete yet
            self.pending += data[pos:]
            if len(self.pending) > _CHUNK_LINE_MAX:
                raise HttpParserError("chunk size line too long")


_llhttp_feed = httptools.HttpRequestParser.feed_data


class LlhttpRequestParser(httptools.HttpRequestParser):
    """httptools' request parser held to the strict rules (see the module docstring)."""

    __slots__ = ("_guard",)

    def __init__(self, callbacks: Any) -> None:
        guard = _LlhttpGuard(callbacks)
        super().__init__(guard)
        self._guard = guard

    def feed_data(self, data: bytes | bytearray | memoryview | array[int]) -> None:
        # The guard searches the read (memoryview has no `find`); the server feeds bytes.
        raw = data if isinstance(data, bytes) else bytes(data)
        guard = self._guard
        guard.data = raw
        guard.pos = 0
        chunks = guard.chunks
        if chunks is not None:  # inside a chunked body: vet its lines before llhttp reads them
            if guard.chunk_end >= 0:
                raise HttpParserError("chunked framing out of step")
            guard.chunk_end = chunks.feed(raw)
        _llhttp_feed(self, raw)
        if guard.pos < len(raw) and guard.chunks is None:  # else the scanner carries it
            guard.after_read()
        guard.data = b""  # not kept alive while the connection idles


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",")]


class H11RequestParser:
    """An `httptools.HttpRequestParser` look-alike built on h11."""

    __slots__ = (
        "_conn", "_cb", "_method", "_version", "_keep_alive", "_upgrade", "_stopped", "_begun",
        "_max_head", "_run", "_chunks", "_bad_coding",
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
        self._run = b""  # bytes before the next request line (CR/LF), already taken from h11
        self._chunks: ChunkedScanner | None = None  # while a chunked body is being received
        self._bad_coding = False  # the head's Transfer-Encoding is one llhttp refuses

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
        try:
            data = bytes(data)
            chunks = self._chunks
            if chunks is not None and chunks.feed(data) >= 0:  # vetted before h11 reads it
                self._chunks = None
            conn = self._conn
            conn.receive_data(data)
            while True:
                if conn.their_state is h11.IDLE:
                    if not self._begin():
                        return
                    conn = self._conn  # a fresh one when an empty line was taken off
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
                    if self._chunks is not None:
                        raise HttpParserError("chunked framing out of step")
                    self._cb.on_message_complete()
                    # h11 proposes a switch on any Upgrade header; llhttp (and so
                    # `should_upgrade`) also needs "Connection: upgrade". Otherwise the
                    # synthetic response in `_finish_cycle` declines it.
                    if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL and self._upgrade:
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
        """Between requests: take off the empty line allowed before a request line, note
        the start of the next one and vet its head once it is complete. False when
        nothing is buffered (wait for more bytes)."""
        buf = self._conn.trailing_data[0]
        if not buf:
            return False
        if not self._begun:
            skip = RUN.match(buf).end()  # type: ignore[union-attr]  # always matches
            if skip or self._run:
                run = self._run + buf[:skip]
                check_run(run, skip < len(buf))
                if skip:
                    buf = buf[skip:]
                    self._restart(buf)
                self._run = b"" if buf else run
            if not buf:
                return False
            self._begun = True
            self._cb.on_message_begin()
        end = _HEAD_END.search(buf)
        if end is not None:
            self._bad_coding = _check_head(buf[: end.end()])
        return True

    def _restart(self, data: bytes) -> None:
        """Go on with a fresh h11 connection holding `data` (h11 has no way to drop
        buffered bytes; between requests nothing else of the old one matters)."""
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
        if data:
            self._conn.receive_data(data)

    def _on_request(self, event: h11.Request) -> None:
        cb = self._cb
        method = bytes(event.method)
        if method not in METHODS:
            raise HttpParserError("invalid method")
        if event.http_version not in VERSIONS:
            raise HttpParserError("invalid HTTP version")
        self._method = method
        self._version = event.http_version.decode()
        connection_tokens: list[bytes] = []
        upgrade = chunked = False
        if not self._begun:
            cb.on_message_begin()
        self._begun = False
        cb.on_url(bytes(event.target))
        for name, value in event.headers.raw_items():
            lname = name.lower()
            if lname == b"connection":
                connection_tokens.extend(_tokens(value))
            elif lname == b"upgrade":
                upgrade = True
            elif lname == b"transfer-encoding":
                chunked = True  # h11 refuses any coding but a lone "chunked"
            cb.on_header(bytes(name), bytes(value))
        if self._version == "1.0":
            self._keep_alive = b"keep-alive" in connection_tokens
        else:
            self._keep_alive = b"close" not in connection_tokens
        self._upgrade = self._method == b"CONNECT" or (upgrade and b"upgrade" in connection_tokens)
        if self._bad_coding:  # before the head is handled (the protocol refuses it there too)
            raise HttpParserError("Request has invalid `Transfer-Encoding`")
        cb.on_headers_complete()
        if chunked:  # after the head is handled, as llhttp reports its first chunk after it
            chunks = ChunkedScanner()
            if chunks.feed(self._conn.trailing_data[0]) < 0:
                self._chunks = chunks

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
            self._restart(conn.trailing_data[0])
        else:
            self._stopped = True


def new_request_parser(kind: str, callbacks: Any, max_head_bytes: int) -> Any:
    if kind == "native":
        return native.RequestFramer(callbacks, max_head_bytes)
    if kind == "h11":
        return H11RequestParser(callbacks, max_head_bytes)
    return LlhttpRequestParser(callbacks)


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
