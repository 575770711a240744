# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The native framers, compiled: typed Cython twins of `framing.RequestFramer` (here),
`response_framing.ResponseFramer` (`_cresponse.pxi`) and `chunked.ChunkedScanner`
(`_cchunked.pxi`), with the tables and helpers they share (`_cwire.pxi`).

Same interface, same rules, same answers byte for byte (the differential tests hold
them to it); `framing`'s docstring is the specification. What differs is only how:
the head is checked and cut in one pass of C loops over the read's bytes, with byte
class tables instead of regular expressions, and the only Python objects made per
head are what the protocol receives (method, target, version, the header list and its
tuples); common methods and the versions are shared constants. Chunked bodies are
followed by `ChunkedScanner`, `chunked.ChunkedScanner`'s compiled twin.

Why our own typed parser and not llhttp driven through httptools: httptools calls back
into Python once per URL piece and per header, and the strict rules then need a second
look at the same bytes from Python (`codec._LlhttpGuard`); here one C pass does both
and the protocol gets one call per head.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcmp

from edgeplane.http.chunked import HeadTooLarge, HttpParserError, HttpParserUpgrade
from edgeplane.http.framing import METHOD_PREFIXES, METHODS, check_run

include "_cwire.pxi"
include "_cchunked.pxi"


cdef class HeadFramer:
    """`framing.HeadFramer`'s compiled twin: the read loop over a message's states, the
    unfinished head carried and vetted. Subclasses override the `cdef` hooks."""

    cdef object _cb
    cdef object _on_head
    cdef object _on_body
    cdef object _on_complete
    cdef Py_ssize_t _max_head
    cdef int _state
    cdef bytes _held
    cdef Py_ssize_t _vetted
    cdef bint _line_done
    cdef unsigned long long _left
    cdef ChunkedScanner _chunks
    cdef str _what  # "request" or "response", in messages
    cdef str _first_error  # the refusal of a first line

    def __init__(self, callbacks, Py_ssize_t max_head_bytes):
        self._cb = callbacks
        self._on_head = callbacks.on_head
        self._on_body = callbacks.on_body
        self._on_complete = callbacks.on_message_complete
        self._max_head = max_head_bytes
        self._state = IDLE
        self._held = B_EMPTY
        self._vetted = 0
        self._line_done = False
        self._left = 0
        self._chunks = None

    def feed_data(self, data):
        cdef bytes buf = data if type(data) is bytes else bytes(data)
        cdef int state = self._state
        if state == STOPPED:
            return
        cdef Py_ssize_t held = PyBytes_GET_SIZE(self._held)
        if held:
            buf = self._held + buf
            self._held = B_EMPTY
        cdef Py_ssize_t pos = 0, n = PyBytes_GET_SIZE(buf), end
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
        cdef unsigned long long left
        try:
            while pos < n:
                if state == BODY:
                    left = self._left
                    if <unsigned long long>(n - pos) <= left:
                        self._on_body(buf[pos:] if pos else buf)
                        self._left = left - <unsigned long long>(n - pos)
                        if self._left:
                            return
                        pos = n
                    else:
                        self._on_body(buf[pos:pos + <Py_ssize_t>left])
                        pos += <Py_ssize_t>left
                        self._left = 0
                    state = self._state = IDLE
                    self._on_complete()
                    continue
                if state == CHUNKED:
                    end = self._chunks.feed(buf, pos)
                    if end < 0:
                        return
                    pos = end
                    self._chunks = None
                    state = self._state = IDLE
                    self._on_complete()
                    continue
                if state == UNTIL_CLOSE:
                    self._on_body(buf[pos:] if pos else buf)
                    return
                if state == IDLE:
                    pos = self._between(buf, p, pos, n)
                    if pos == n:
                        return
                    state = self._state = HEAD
                pos = self._head(buf, p, pos, n, held)
                if pos < 0:
                    return
                state = self._state
        except (HttpParserUpgrade, HttpParserError):
            self._state = STOPPED
            raise

    cdef Py_ssize_t _between(self, bytes buf, const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) except -2:
        return pos

    cdef Py_ssize_t _head(self, bytes buf, const unsigned char* p, Py_ssize_t start, Py_ssize_t n,
                          Py_ssize_t held) except -2:
        return -1

    cdef Py_ssize_t _first_line(self, const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) noexcept:
        """The end of a whole valid first line at `pos`, or -1."""
        return -1

    cdef int _check_first(self, const unsigned char* p, Py_ssize_t pos) except -1:
        """Refuse a whole first line its syntax accepts (the request's method table)."""
        return 0

    cdef int _first_prefix(self, const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) except -1:
        """1 when `p[pos:n]` (no LF) can start a first line, else 0."""
        return 0

    cdef Py_ssize_t _head_end(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t n,
                              Py_ssize_t held) noexcept:
        """The offset of the head's first CRLF CRLF, or -1; found line by line, from
        where the read began (a carried head had none)."""
        cdef Py_ssize_t i = start + 3 if start + 3 > held else held
        cdef const unsigned char* lf
        while i < n:
            lf = <const unsigned char*>memchr(p + i, 10, n - i)
            if lf == NULL:
                return -1
            i = lf - p
            if p[i - 1] == 13 and p[i - 2] == 10 and p[i - 3] == 13:
                return i - 3
            i += 1
        return -1

    cdef Py_ssize_t _unfinished(self, bytes buf, const unsigned char* p, Py_ssize_t start, Py_ssize_t n,
                                Py_ssize_t held) except -2:
        if n - start > self._max_head:
            raise HeadTooLarge(f"{self._what} head too large")
        self._vet_unfinished(p, start, n)
        if start >= held:  # the head began in this read (a carried one starts at 0)
            self._cb.on_message_begin()
        self._held = buf[start:] if start else buf
        return -1

    cdef int _vet_unfinished(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t n) except -1:
        """Refuse an unfinished head once it cannot be the start of a valid one; whole
        lines are vetted once."""
        cdef Py_ssize_t pos = start + self._vetted, last = n - 1, line_end
        while last >= pos and p[last] != 10:
            last -= 1
        if last >= pos:
            if not self._line_done:
                line_end = self._first_line(p, pos, n)
                if line_end < 0 or line_end > last + 1:
                    raise HttpParserError(self._first_error)
                self._check_first(p, pos)
                pos = line_end
                self._line_done = True
            if pos <= last and _header_lines(p, pos, last + 1) < 0:
                raise HttpParserError("invalid header line")
            pos = last + 1
            self._vetted = pos - start
        cdef int start_ok
        if self._line_done:
            if _header_prefix(p, pos, n):
                return 0
        else:
            start_ok = self._first_prefix(p, pos, n)
            if start_ok == 1:
                return 0
            if start_ok == 2:  # the syntax holds, the method cannot (the twin's order)
                raise HttpParserError("invalid method")
        raise HttpParserError(f"invalid bytes in {self._what} head")


cdef class RequestFramer(HeadFramer):
    """`framing.RequestFramer`'s compiled twin (its docstring is the rules)."""

    cdef bytes _run
    cdef bytes _method
    cdef str _version
    cdef bint _keep_alive
    cdef bint _upgrade

    def __init__(self, callbacks, Py_ssize_t max_head_bytes):
        super().__init__(callbacks, max_head_bytes)
        self._what = "request"
        self._first_error = REQUEST_LINE_ERROR.decode()
        self._run = B_EMPTY
        self._method = B_EMPTY
        self._version = V11
        self._keep_alive = True
        self._upgrade = False

    def get_method(self):
        return self._method

    def get_http_version(self):
        return self._version

    def should_keep_alive(self):
        return self._keep_alive

    def should_upgrade(self):
        return self._upgrade

    cdef Py_ssize_t _between(self, bytes buf, const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) except -2:
        if p[pos] == 13 or p[pos] == 10 or PyBytes_GET_SIZE(self._run):
            return self._skip_run(buf, p, pos, n)
        return pos

    cdef Py_ssize_t _first_line(self, const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) noexcept:
        return _request_line(p, pos, n)

    cdef int _check_first(self, const unsigned char* p, Py_ssize_t pos) except -1:
        cdef Py_ssize_t s = pos
        while p[s] != 32:
            s += 1
        if _method(p + pos, s - pos) not in _METHODS:
            raise HttpParserError("invalid method")
        return 0

    cdef int _first_prefix(self, const unsigned char* p, Py_ssize_t i, Py_ssize_t n) except -1:
        """What can start a request line: its syntax (`framing._LINE_START`: method
        bytes, SP, target bytes, SP, version bytes, CR), then the start of a method of
        the table (`_check_first_start`): 1, or 0 (syntax), or 2 (method)."""
        cdef Py_ssize_t pos = i, m
        cdef bint method_ok
        while i < n and CLASS[p[i]] & C_METHOD:
            i += 1
        m = i
        if i < n:
            if p[i] != 32:
                return 0
            i += 1
            while i < n and CLASS[p[i]] & C_TARGET:
                i += 1
            if i < n:
                if p[i] != 32:
                    return 0
                i += 1
                while i < n and CLASS[p[i]] & C_VERSION:
                    i += 1
                if not (i == n or (p[i] == 13 and i + 1 == n)):
                    return 0
        if m == n:
            method_ok = PyBytes_FromStringAndSize(<const char*>p + pos, m - pos) in _METHOD_PREFIXES
        else:
            method_ok = _method(p + pos, m - pos) in _METHODS
        return 1 if method_ok else 2

    cdef Py_ssize_t _skip_run(self, bytes buf, const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) except -2:
        cdef Py_ssize_t end = pos
        while end < n and (p[end] == 13 or p[end] == 10):
            end += 1
        cdef bytes run = self._run + buf[pos:end]
        cdef bint complete = end < n
        check_run(run, complete)  # (the rare path: the rule is the twin's own function)
        self._run = B_EMPTY if complete else run
        return end

    cdef Py_ssize_t _head(self, bytes buf, const unsigned char* p, Py_ssize_t start, Py_ssize_t n,
                          Py_ssize_t held) except -2:
        cdef Py_ssize_t end = self._head_end(p, start, n, held), i
        if end < 0 or end + 4 - start > self._max_head:
            return self._unfinished(buf, p, start, n, held)
        self._vetted = 0
        self._line_done = False
        end += 2  # past the last header line's CRLF
        cdef Py_ssize_t line_end = _request_line(p, start, end)
        if line_end < 0:
            raise HttpParserError(REQUEST_LINE_ERROR.decode())
        cdef Py_ssize_t sp1 = start
        while p[sp1] != 32:
            sp1 += 1
        cdef bytes method = _method(p + start, sp1 - start)
        if method not in _METHODS:
            raise HttpParserError("invalid method")
        cdef str version
        cdef unsigned char major = p[line_end - 5], minor = p[line_end - 3]
        if major == 49 and minor == 49:
            version = V11
        elif major == 49 and minor == 48:
            version = V10
        elif major == 48 and minor == 57:
            version = V09
        elif major == 50 and minor == 48:
            version = V20
        else:
            raise HttpParserError("invalid HTTP version")
        cdef Py_ssize_t t0 = sp1 + 1, t1 = line_end - 11  # the target: [t0, t1), before " HTTP/d.d\r\n"
        cdef unsigned char first = p[t0]
        cdef Py_ssize_t k
        cdef bint scheme = False
        if first != 47 and first != 42 and method is not B_CONNECT:
            if 65 <= first <= 90 or 97 <= first <= 122:  # a letter: absolute-form "scheme://"
                k = t0 + 1
                while k < t1 and CLASS[p[k]] & C_SCHEME:
                    k += 1
                scheme = t1 - k >= 3 and p[k] == 58 and p[k + 1] == 47 and p[k + 2] == 47
            if not scheme:
                raise HttpParserError("invalid request target")
        if _header_lines(p, line_end, end) < 0:
            raise HttpParserError("invalid header line")
        cdef bytes target = PyBytes_FromStringAndSize(<const char*>p + t0, t1 - t0)
        cdef list headers = []
        cdef Py_ssize_t a, b, va, vb, j
        cdef bytes name, value
        cdef char* out
        cdef long long length = -1
        cdef bint chunked = False, upgrade_header = False
        cdef int tokens = 0
        i = line_end
        while i < end:
            a = i
            while p[i] != 58:
                i += 1
            b = i
            i += 1
            while p[i] == 32 or p[i] == 9:
                i += 1
            va = i
            while p[i] != 13:
                i += 1
            vb = i
            i += 2
            name = PyBytes_FromStringAndSize(NULL, b - a)
            out = PyBytes_AS_STRING(name)
            for j in range(b - a):
                out[j] = <char>LOWER[p[a + j]]
            value = PyBytes_FromStringAndSize(<const char*>p + va, vb - va)
            headers.append((name, value))
            if b - a == 14 and _token_is(p, a, b, b"content-length", 14):
                length = _content_length(p, va, vb, length)
            elif b - a == 17 and _token_is(p, a, b, b"transfer-encoding", 17):
                j = vb
                while j > va and p[j - 1] == 32:
                    j -= 1
                if chunked or not _token_is(p, va, j, b"chunked", 7):
                    raise HttpParserError("Request has invalid `Transfer-Encoding`")
                chunked = True
            elif b - a == 10 and _token_is(p, a, b, b"connection", 10):
                tokens |= _connection(p, va, vb)
            elif b - a == 7 and vb > va and _token_is(p, a, b, b"upgrade", 7):
                upgrade_header = True
        if chunked and length >= 0:
            raise HttpParserError("both Content-Length and Transfer-Encoding")
        cdef bint keep_alive = (tokens & T_KEEP_ALIVE) != 0 if version is V10 else not tokens & T_CLOSE
        cdef bint upgrade = method is B_CONNECT or (upgrade_header and tokens & T_UPGRADE)
        self._method = method
        self._version = version
        self._keep_alive = keep_alive
        self._upgrade = upgrade
        end += 2  # past the empty line
        self._on_head(method, target, version, headers, keep_alive, upgrade)
        if upgrade:
            self._state = IDLE
            self._on_complete()
            raise HttpParserUpgrade(end - held)
        if chunked:
            self._chunks = ChunkedScanner(self._on_body)
            self._state = CHUNKED
        elif length > 0:
            self._left = <unsigned long long>length
            self._state = BODY
        else:
            self._state = IDLE
            self._on_complete()
        return end


include "_cresponse.pxi"
