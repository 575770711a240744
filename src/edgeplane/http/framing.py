"""The native request framer, pure-Python reference: client bytes to heads and bodies.

Owns edgeplane's own HTTP/1.1 request parser (`http.parser: native`). One callback per
request head instead of one per header: where llhttp calls the protocol for the URL,
each header and each stage of a message, this hands over a whole parsed head at once.
`_cframing` (typed Cython) is its compiled twin with the same interface and the same
answers byte for byte; `native.RequestFramer` is whichever of the two runs.

Interface (both twins): `RequestFramer(callbacks, max_head_bytes)`, `feed_data(bytes)`,
and httptools' getters of the last head (`get_method`, `get_http_version`,
`should_keep_alive`, `should_upgrade`). The callbacks:
- `on_message_begin()`: only when a head is still unfinished at the end of a read (so
  the head deadline starts at its first byte); a head that arrives whole goes straight to
- `on_head(method, target, version, headers, keep_alive, upgrade)`: `headers` a new list
  of (lower-cased name, value) with the value's leading blanks removed (trailing ones
  kept, as llhttp does), `version` one of "0.9", "1.0", "1.1", "2.0";
- `on_body(chunk)` per run of body bytes, `on_message_complete()`.
Errors raise `HttpParserError` (400), `HeadTooLarge` (431) or, after an upgrade or
CONNECT head, `HttpParserUpgrade(offset of the bytes after the head in this read)`.

The rules are `codec`'s strict ones (its docstring), the same as the other two parsers:
- before a request line at most one CRLF; a bare CR or LF is refused;
- `METHOD SP target SP HTTP/d.d CRLF`: the method from llhttp's table, the target
  visible ASCII starting with "/", "*" or a scheme ("http://..."), the version one of
  llhttp's four;
- header lines `token ":" OWS value CRLF`, the value without controls (HTAB aside);
  no obs-fold, no bare CR or LF;
- one Content-Length of digits (trailing blanks allowed), or one Transfer-Encoding that
  is "chunked" (any case, trailing spaces allowed), never both; a chunked body follows
  `chunked.ChunkedScanner`'s rules, its trailer fields are checked and dropped;
- keep-alive and upgrade as llhttp decides them: the Connection tokens close,
  keep-alive, upgrade (HTTP/1.0 keeps the connection only with keep-alive; HTTP/1.1
  unless close), an upgrade is CONNECT or "Connection: upgrade" with a non-empty Upgrade;
- the head (request line to its empty line, raw bytes) is at most `max_head_bytes`.

Invariants: an unfinished head is refused at the read that makes it impossible by its
syntax (what is there so far cannot start a valid head: bytes that cannot become a
method of the table, a control character, a bare LF), not only once it is complete,
so garbage gets its 400 at once; a field's value (a Content-Length's digits) is judged
when the head is complete. Whole lines of an unfinished head are vetted once each
(`_vetted`) and the head's end is searched for only in the new bytes; the line still
unfinished is looked at again at each read, and the carried bytes are copied once per
read, so a head sent a byte at a time costs time quadratic in its length (bounded by
`max_head_bytes`: ~0.05 s for 10 KiB one byte per read). After an error or an upgrade
nothing more is parsed.
"""

from __future__ import annotations

import re
from typing import Any

from edgeplane.http.chunked import TOKEN, ChunkedScanner, HeadTooLarge, HttpParserError, HttpParserUpgrade

METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH"
    b" SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY"
    b" SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)  # llhttp 9's table for HTTP, PRI and the RTSP/ICE methods left out: every request parser refuses the rest
# Every start of a method in the table: an unfinished request line is refused as soon as
# its first bytes cannot become one (a TLS ClientHello, "XYZ"), as llhttp does.
METHOD_PREFIXES = frozenset(m[:i] for m in METHODS for i in range(len(m) + 1))
VERSIONS = {b"0.9": "0.9", b"1.0": "1.0", b"1.1": "1.1", b"2.0": "2.0"}  # the ones llhttp parses

_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"
_REQUEST_LINE = re.compile(rb"([A-Z_\-]+) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])\r\n")
HEADER_LINES = re.compile(rb"(?:%b:%b\r\n)*" % (TOKEN, _VALUE))
HEADER_LINE = re.compile(rb"(%b):[ \t]*(%b)\r\n" % (TOKEN, _VALUE))
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://")
# What can start a request line / a header line that is not complete yet.
_LINE_START = re.compile(rb"[A-Z_\-]*(?: [\x21-\x7e]*(?: [HTP/0-9.]*\r?)?)?")
HEADER_START = re.compile(rb"(?:%b(?::%b\r?)?|\r)?" % (TOKEN, _VALUE))
RUN = re.compile(rb"[\r\n]*")
LENGTH_DIGITS = re.compile(rb"[0-9]{1,19}[ \t]*")
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection", b"upgrade"))

_IDLE, _HEAD, _BODY, _CHUNKED, _UNTIL_CLOSE, _STOPPED = range(6)


def check_run(run: bytes, complete: bool) -> None:
    """The bytes seen before a request line: nothing or one CRLF (every request parser
    holds this rule). `complete`: the request line has started (else more may come, so
    a lone CR may still become CRLF)."""
    if not run or run == b"\r\n" or (run == b"\r" and not complete):
        return
    if run[:3] == b"\r\n\r" or run[:3] == b"\r\n\n":
        raise HttpParserError("more than one empty line before the request line")
    raise HttpParserError("bare CR or LF before the request line")


def content_length(value: bytes, seen: int) -> int:
    """A Content-Length value as a number, refused when it is not 1-19 digits (blanks
    after them allowed), when another came before (`seen` >= 0) or past 2**63 - 1."""
    if seen >= 0 or LENGTH_DIGITS.fullmatch(value) is None:
        raise HttpParserError("invalid or duplicate Content-Length")
    length = int(value)
    if length > 2**63 - 1:
        raise HttpParserError("Content-Length too large")
    return length


def connection_tokens(value: bytes) -> list[bytes]:
    return [t.strip(b" \t").lower() for t in value.split(b",")]


class HeadFramer:
    """What the request and the response framer share: the read loop over a message's
    states (a head, a Content-Length body, a chunked body, a body until close), the
    unfinished head carried between reads and vetted line by line. A subclass says how
    a head is parsed (`_head`), what may come between messages (`_between`) and what
    its first line looks like (`_FIRST_LINE`, `_FIRST_START`, `_check_first`)."""

    __slots__ = ("_cb", "_max_head", "_state", "_held", "_vetted", "_line_done", "_left", "_chunks")
    _FIRST_LINE: re.Pattern[bytes]  # a whole first line (request or status line)
    _FIRST_START: re.Pattern[bytes]  # what can start one that is not complete yet
    _FIRST_ERROR = ""  # the refusal of a first line
    _WHAT = ""  # "request" or "response", in messages

    def __init__(self, callbacks: Any, max_head_bytes: int) -> None:
        self._cb = callbacks
        self._max_head = max_head_bytes
        self._state = _IDLE
        self._held = b""  # an unfinished head, carried into the next read
        self._vetted = 0  # bytes of `_held` (whole lines) already vetted
        self._line_done = False  # the first line is among the vetted lines
        self._left = 0  # Content-Length body bytes still to come
        self._chunks: ChunkedScanner | None = None

    def feed_data(self, data: bytes) -> None:
        state = self._state
        if state == _STOPPED:
            return
        held = len(self._held)
        if held:  # an unfinished head: the read goes on from it
            data = self._held + data
            self._held = b""
        pos = 0
        n = len(data)
        cb = self._cb
        try:
            while pos < n:
                if state == _BODY:
                    left = self._left
                    if n - pos <= left:
                        cb.on_body(data[pos:] if pos else data)
                        self._left = left - (n - pos)
                        if self._left:
                            return
                        pos = n
                    else:
                        cb.on_body(data[pos : pos + left])
                        pos += left
                        self._left = 0
                    state = self._state = _IDLE
                    cb.on_message_complete()
                    continue
                if state == _CHUNKED:
                    end = self._chunks.feed(data, pos)  # type: ignore[union-attr]  # set with the state
                    if end < 0:
                        return
                    pos = end
                    self._chunks = None
                    state = self._state = _IDLE
                    cb.on_message_complete()
                    continue
                if state == _UNTIL_CLOSE:
                    cb.on_body(data[pos:] if pos else data)
                    return
                if state == _IDLE:
                    pos = self._between(data, pos)
                    if pos == n:
                        return
                    state = self._state = _HEAD
                pos = self._head(data, pos, held)
                if pos < 0:  # unfinished: carried
                    return
                state = self._state
        except (HttpParserUpgrade, HttpParserError):
            self._state = _STOPPED
            raise

    def _between(self, data: bytes, pos: int) -> int:
        """Where the next message starts in `data` (len(data): not in this read)."""
        raise NotImplementedError

    def _head(self, data: bytes, start: int, held: int) -> int:
        """Parse the head at `start`: the offset after it, or -1 when it is not complete
        in `data` (carried). `held`: how many bytes of `data` came from earlier reads (a
        carried head starts at 0; offsets reported to the caller are in its read, so
        `held` is taken off them for every head of this read, not only the first)."""
        raise NotImplementedError

    def _check_first(self, line: re.Match[bytes]) -> None:
        """Refuse a whole first line its pattern accepts (the request's method table)."""

    def _check_first_start(self, data: bytes, pos: int) -> None:
        """Refuse the start of a first line its pattern accepts (the same table)."""

    def _unfinished(self, data: bytes, start: int, held: int) -> int:
        if len(data) - start > self._max_head:
            raise HeadTooLarge(f"{self._WHAT} head too large")
        self._vet_unfinished(data, start)
        if start >= held:  # the head began in this read (a carried one starts at 0)
            self._cb.on_message_begin()
        self._held = data[start:]
        return -1

    def _vet_unfinished(self, data: bytes, start: int) -> None:
        """Refuse an unfinished head as soon as its bytes cannot start a valid one."""
        pos = start + self._vetted
        last = data.rfind(b"\n", pos)
        if last >= 0:  # whole lines not vetted yet
            if not self._line_done:
                line = self._FIRST_LINE.match(data, pos)
                if line is None or line.end() > last + 1:
                    raise HttpParserError(self._FIRST_ERROR)
                self._check_first(line)
                pos = line.end()
                self._line_done = True
            if pos <= last and HEADER_LINES.fullmatch(data, pos, last + 1) is None:
                raise HttpParserError("invalid header line")
            pos = last + 1
            self._vetted = pos - start
        tail = HEADER_START if self._line_done else self._FIRST_START
        if tail.fullmatch(data, pos) is None:
            raise HttpParserError(f"invalid bytes in {self._WHAT} head")
        if not self._line_done:
            self._check_first_start(data, pos)


class RequestFramer(HeadFramer):
    __slots__ = ("_run", "_method", "_version", "_keep_alive", "_upgrade")
    _FIRST_LINE = _REQUEST_LINE
    _FIRST_START = _LINE_START
    _FIRST_ERROR = "request line is not 'method SP target SP HTTP/x.y'"
    _WHAT = "request"

    def __init__(self, callbacks: Any, max_head_bytes: int) -> None:
        super().__init__(callbacks, max_head_bytes)
        self._run = b""  # CR/LF bytes before the next request line, carried
        self._method = b""
        self._version = "1.1"
        self._keep_alive = True
        self._upgrade = False

    def get_method(self) -> bytes:
        return self._method

    def get_http_version(self) -> str:
        return self._version

    def should_keep_alive(self) -> bool:
        return self._keep_alive

    def should_upgrade(self) -> bool:
        return self._upgrade

    def _between(self, data: bytes, pos: int) -> int:
        byte = data[pos]
        if byte == 13 or byte == 10 or self._run:
            return self._skip_run(data, pos)
        return pos

    def _check_first(self, line: re.Match[bytes]) -> None:
        if line[1] not in METHODS:
            raise HttpParserError("invalid method")

    def _check_first_start(self, data: bytes, pos: int) -> None:
        space = data.find(b" ", pos)
        if data[pos:] not in METHOD_PREFIXES if space < 0 else data[pos:space] not in METHODS:
            raise HttpParserError("invalid method")

    def _skip_run(self, data: bytes, pos: int) -> int:
        end = RUN.match(data, pos).end()  # type: ignore[union-attr]  # always matches
        run = self._run + data[pos:end]
        complete = end < len(data)
        check_run(run, complete)
        self._run = b"" if complete else run
        return end

    def _head(self, data: bytes, start: int, held: int) -> int:
        """Parse the head starting at `start`; the offset after it (its body follows),
        or -1 when it is not complete in `data` (it is carried)."""
        end = data.find(b"\r\n\r\n", max(start, held - 3))  # (a carried head had none)
        if end < 0 or end + 4 - start > self._max_head:
            return self._unfinished(data, start, held)
        self._vetted = 0
        self._line_done = False
        end += 2  # past the last header line's CRLF
        line = _REQUEST_LINE.match(data, start)
        if line is None or line.end() > end:
            raise HttpParserError(self._FIRST_ERROR)
        method, target, number = line.groups()
        if method not in METHODS:
            raise HttpParserError("invalid method")
        version = VERSIONS.get(number)
        if version is None:
            raise HttpParserError("invalid HTTP version")
        first = target[0]
        if first != 47 and first != 42 and _SCHEME.match(target) is None and method != b"CONNECT":
            raise HttpParserError("invalid request target")
        lines_at = line.end()
        if HEADER_LINES.fullmatch(data, lines_at, end) is None:
            raise HttpParserError("invalid header line")
        headers = [(name.lower(), value) for name, value in HEADER_LINE.findall(data, lines_at, end)]
        length = -1
        chunked = False
        connection: list[bytes] = []
        upgrade_header = False
        for name, value in headers:
            if name in _FRAMING:
                if name == b"content-length":
                    length = content_length(value, length)
                elif name == b"transfer-encoding":
                    if chunked or value.rstrip(b" ").lower() != b"chunked":
                        raise HttpParserError("Request has invalid `Transfer-Encoding`")
                    chunked = True
                elif name == b"connection":
                    connection += connection_tokens(value)
                elif value:  # upgrade
                    upgrade_header = True
        if chunked and length >= 0:
            raise HttpParserError("both Content-Length and Transfer-Encoding")
        if version == "1.0":
            keep_alive = b"keep-alive" in connection
        else:
            keep_alive = b"close" not in connection
        upgrade = method == b"CONNECT" or (upgrade_header and b"upgrade" in connection)
        self._method = method
        self._version = version
        self._keep_alive = keep_alive
        self._upgrade = upgrade
        end += 2  # past the empty line
        cb = self._cb
        cb.on_head(method, target, version, headers, keep_alive, upgrade)
        if upgrade:  # llhttp ends the message at the head and stops
            self._state = _IDLE
            cb.on_message_complete()
            raise HttpParserUpgrade(end - held)
        if chunked:
            self._chunks = ChunkedScanner(cb.on_body)
            self._state = _CHUNKED
        elif length > 0:
            self._left = length
            self._state = _BODY
        else:
            self._state = _IDLE
            cb.on_message_complete()
        return end
