# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The native request framer, compiled: `framing.RequestFramer`'s typed Cython twin.

Same interface, same rules, same answers byte for byte (the differential tests hold
them to it); `framing`'s docstring is the specification. What differs is only how:
the head is checked and cut in one pass of C loops over the read's bytes, with byte
class tables instead of regular expressions, and the only Python objects made per
head are what the protocol receives (method, target, version, the header list and its
tuples); common methods and the versions are shared constants. A chunked body is
decoded by the Python `ChunkedScanner` (the same object the twin uses).

Why our own typed parser and not llhttp driven through httptools: httptools calls back
into Python once per URL piece and per header, and the strict rules then need a second
look at the same bytes from Python (`codec._LlhttpGuard`); here one C pass does both
and the protocol gets one call per head.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcmp

from edgeplane.http.chunked import ChunkedScanner, HeadTooLarge, HttpParserError, HttpParserUpgrade
from edgeplane.http.framing import METHODS

cdef enum:
    IDLE = 0
    HEAD = 1
    BODY = 2
    CHUNKED = 3
    STOPPED = 4

# Byte classes (bit flags in one table).
cdef enum:
    C_TOKEN = 1  # tchar (RFC 9110)
    C_VALUE = 2  # field-value byte: HTAB, SP..~, obs-text
    C_TARGET = 4  # request-target byte: visible ASCII
    C_METHOD = 8  # A-Z _ -
    C_VERSION = 16  # what can follow the target's space in an unfinished line: H T P / 0-9 .
    C_SCHEME = 32  # scheme byte after the first: ALPHA DIGIT + . -

cdef unsigned char CLASS[256]
cdef unsigned char LOWER[256]


cdef void _init_tables():
    cdef int c
    for c in range(256):
        CLASS[c] = 0
        LOWER[c] = c + 32 if 65 <= c <= 90 else c
    for c in b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        CLASS[c] |= C_TOKEN
    CLASS[9] |= C_VALUE
    for c in range(0x20, 0x7F):
        CLASS[c] |= C_VALUE
    for c in range(0x80, 0x100):
        CLASS[c] |= C_VALUE
    for c in range(0x21, 0x7F):
        CLASS[c] |= C_TARGET
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-":
        CLASS[c] |= C_METHOD
    for c in b"HTP/0123456789.":
        CLASS[c] |= C_VERSION
    for c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-":
        CLASS[c] |= C_SCHEME


_init_tables()

cdef bytes B_GET = b"GET"
cdef bytes B_POST = b"POST"
cdef bytes B_PUT = b"PUT"
cdef bytes B_HEAD = b"HEAD"
cdef bytes B_DELETE = b"DELETE"
cdef bytes B_PATCH = b"PATCH"
cdef bytes B_OPTIONS = b"OPTIONS"
cdef bytes B_CONNECT = b"CONNECT"
cdef str V09 = "0.9"
cdef str V10 = "1.0"
cdef str V11 = "1.1"
cdef str V20 = "2.0"
cdef bytes B_EMPTY = b""
cdef object _METHODS = METHODS
cdef unsigned long long MAX_LENGTH = 9223372036854775807ULL  # 2**63 - 1

cdef const char* REQUEST_LINE_ERROR = "request line is not 'method SP target SP HTTP/x.y'"


cdef bytes _method(const unsigned char* p, Py_ssize_t n):
    """The method as a shared constant when it is a common one (no allocation)."""
    if n == 3:
        if memcmp(p, b"GET", 3) == 0:
            return B_GET
        if memcmp(p, b"PUT", 3) == 0:
            return B_PUT
    elif n == 4:
        if memcmp(p, b"POST", 4) == 0:
            return B_POST
        if memcmp(p, b"HEAD", 4) == 0:
            return B_HEAD
    elif n == 5 and memcmp(p, b"PATCH", 5) == 0:
        return B_PATCH
    elif n == 6 and memcmp(p, b"DELETE", 6) == 0:
        return B_DELETE
    elif n == 7:
        if memcmp(p, b"OPTIONS", 7) == 0:
            return B_OPTIONS
        if memcmp(p, b"CONNECT", 7) == 0:
            return B_CONNECT
    return PyBytes_FromStringAndSize(<const char*>p, n)


cdef Py_ssize_t _request_line(const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) noexcept:
    """The end of a syntactically valid request line at `pos` (past its CRLF), or -1
    (the twin's `_REQUEST_LINE.match`)."""
    cdef Py_ssize_t i = pos
    while i < n and CLASS[p[i]] & C_METHOD:
        i += 1
    if i == pos or i >= n or p[i] != 32:
        return -1
    i += 1
    cdef Py_ssize_t t = i
    while i < n and CLASS[p[i]] & C_TARGET:
        i += 1
    if i == t or n - i < 11 or memcmp(p + i, b" HTTP/", 6) != 0:
        return -1
    i += 6
    if not (48 <= p[i] <= 57 and p[i + 1] == 46 and 48 <= p[i + 2] <= 57 and p[i + 3] == 13 and p[i + 4] == 10):
        return -1
    return i + 5


cdef Py_ssize_t _header_lines(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end) noexcept:
    """`end` when `p[pos:end]` is whole valid header lines, else -1 (`_HEADER_LINES`)."""
    cdef Py_ssize_t i = pos, s
    while i < end:
        s = i
        while i < end and CLASS[p[i]] & C_TOKEN:
            i += 1
        if i == s or i >= end or p[i] != 58:
            return -1
        i += 1
        while i < end and CLASS[p[i]] & C_VALUE:
            i += 1
        if end - i < 2 or p[i] != 13 or p[i + 1] != 10:
            return -1
        i += 2
    return end


cdef bint _token_is(const unsigned char* p, Py_ssize_t a, Py_ssize_t b, const char* word, Py_ssize_t n) noexcept:
    """`p[a:b]`, lower-cased, equals `word` (lower-case, `n` bytes)."""
    cdef Py_ssize_t i
    if b - a != n:
        return False
    for i in range(n):
        if LOWER[p[a + i]] != <unsigned char>word[i]:
            return False
    return True


cdef enum:  # what `_connection` found among a Connection value's tokens
    T_CLOSE = 1
    T_KEEP_ALIVE = 2
    T_UPGRADE = 4


cdef int _connection(const unsigned char* p, Py_ssize_t va, Py_ssize_t vb) noexcept:
    """The known tokens of a comma-separated Connection value (blanks around each
    stripped, any case): the twin's `connection_tokens`."""
    cdef int found = 0
    cdef Py_ssize_t j = va, k, a, b
    while True:
        k = j
        while k < vb and p[k] != 44:
            k += 1
        a = j
        b = k
        while a < b and (p[a] == 32 or p[a] == 9):
            a += 1
        while b > a and (p[b - 1] == 32 or p[b - 1] == 9):
            b -= 1
        if _token_is(p, a, b, b"close", 5):
            found |= T_CLOSE
        elif _token_is(p, a, b, b"keep-alive", 10):
            found |= T_KEEP_ALIVE
        elif _token_is(p, a, b, b"upgrade", 7):
            found |= T_UPGRADE
        if k >= vb:
            return found
        j = k + 1


cdef int _last_coding(const unsigned char* p, Py_ssize_t va, Py_ssize_t vb) noexcept:
    """1 when the last transfer coding of a value is "chunked", else 2 (some other, or
    an empty one)."""
    cdef Py_ssize_t a = va, b = vb
    while a < b and p[b - 1] != 44:
        b -= 1
    a = b  # after the last comma (or the value's start)
    b = vb
    while a < b and (p[a] == 32 or p[a] == 9):
        a += 1
    while b > a and (p[b - 1] == 32 or p[b - 1] == 9):
        b -= 1
    return 1 if _token_is(p, a, b, b"chunked", 7) else 2


cdef bint _header_prefix(const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) noexcept:
    """`p[pos:n]` (no LF) can start a header line or the head's end (`HEADER_START`:
    `(?:TOKEN(?::VALUE\r?)?|\r)?`)."""
    cdef Py_ssize_t i = pos
    if i < n and p[i] == 13 and i + 1 == n:
        return True
    while i < n and CLASS[p[i]] & C_TOKEN:
        i += 1
    if i == n:  # nothing yet, or a name so far
        return True
    if i > pos and p[i] == 58:
        i += 1
        while i < n and CLASS[p[i]] & C_VALUE:
            i += 1
        return i == n or (p[i] == 13 and i + 1 == n)
    return False


cdef class RequestFramer:
    cdef object _cb
    cdef object _on_head
    cdef object _on_body
    cdef object _on_complete
    cdef Py_ssize_t _max_head
    cdef int _state
    cdef bytes _held
    cdef Py_ssize_t _vetted
    cdef bint _line_done
    cdef bytes _run
    cdef unsigned long long _left
    cdef object _chunks
    cdef bytes _method
    cdef str _version
    cdef bint _keep_alive
    cdef bint _upgrade

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
        self._run = B_EMPTY
        self._left = 0
        self._chunks = None
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
                if state == IDLE:
                    if p[pos] == 13 or p[pos] == 10 or PyBytes_GET_SIZE(self._run):
                        pos = self._skip_run(buf, p, pos, n)
                        if pos == n:
                            return
                    state = self._state = HEAD
                pos = self._head(buf, p, pos, n, held)
                if pos < 0:
                    return
                held = 0
                state = self._state
        except (HttpParserUpgrade, HttpParserError):
            self._state = STOPPED
            raise

    cdef Py_ssize_t _skip_run(self, bytes buf, const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) except -2:
        cdef Py_ssize_t end = pos
        while end < n and (p[end] == 13 or p[end] == 10):
            end += 1
        cdef bytes run = self._run + buf[pos:end]
        cdef bint complete = end < n
        if run and run != b"\r\n" and (run != b"\r" or complete):
            if run[:3] == b"\r\n\r" or run[:3] == b"\r\n\n":
                raise HttpParserError("more than one empty line before the request line")
            raise HttpParserError("bare CR or LF before the request line")
        self._run = B_EMPTY if complete else run
        return end

    cdef Py_ssize_t _head(self, bytes buf, const unsigned char* p, Py_ssize_t start, Py_ssize_t n,
                          Py_ssize_t held) except -2:
        cdef Py_ssize_t end = -1, i = start + 3
        cdef const unsigned char* lf
        while i < n:  # the head's end: the first CRLF CRLF, found line by line
            lf = <const unsigned char*>memchr(p + i, 10, n - i)
            if lf == NULL:
                break
            i = lf - p
            if p[i - 1] == 13 and p[i - 2] == 10 and p[i - 3] == 13:
                end = i - 3
                break
            i += 1
        if end < 0 or end + 4 - start > self._max_head:
            if n - start > self._max_head:
                raise HeadTooLarge("request head too large")
            self._vet_unfinished(buf, p, start, n)
            if not held:
                self._cb.on_message_begin()
            self._held = buf[start:] if start else buf
            return -1
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
        cdef unsigned long long number
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
                if length >= 0 or vb == va or not (48 <= p[va] <= 57):
                    raise HttpParserError("invalid or duplicate Content-Length")
                number = 0
                j = va
                while j < vb and 48 <= p[j] <= 57:
                    if j - va == 19:
                        raise HttpParserError("invalid or duplicate Content-Length")
                    number = number * 10 + (p[j] - 48)
                    j += 1
                while j < vb and (p[j] == 32 or p[j] == 9):
                    j += 1
                if j != vb:
                    raise HttpParserError("invalid or duplicate Content-Length")
                if number > MAX_LENGTH:
                    raise HttpParserError("Content-Length too large")
                length = <long long>number
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

    cdef int _vet_unfinished(self, bytes buf, const unsigned char* p, Py_ssize_t start, Py_ssize_t n) except -1:
        """The twin's `_vet_unfinished`: refuse an unfinished head once it cannot be
        the start of a valid one; whole lines are vetted once."""
        cdef Py_ssize_t pos = start + self._vetted, last = n - 1, line_end, i, s
        while last >= pos and p[last] != 10:
            last -= 1
        if last >= pos:
            if not self._line_done:
                line_end = _request_line(p, pos, n)
                if line_end < 0 or line_end > last + 1:
                    raise HttpParserError(REQUEST_LINE_ERROR.decode())
                s = pos
                while p[s] != 32:
                    s += 1
                if _method(p + pos, s - pos) not in _METHODS:
                    raise HttpParserError("invalid method")
                pos = line_end
                self._line_done = True
            if pos <= last and _header_lines(p, pos, last + 1) < 0:
                raise HttpParserError("invalid header line")
            pos = last + 1
            self._vetted = pos - start
        i = pos
        if self._line_done:
            if _header_prefix(p, pos, n):
                return 0
        else:  # `[A-Z_\-]*(?: [\x21-\x7e]*(?: [HTP/0-9.]*\r?)?)?`
            while i < n and CLASS[p[i]] & C_METHOD:
                i += 1
            if i == n:
                return 0
            if p[i] == 32:
                i += 1
                while i < n and CLASS[p[i]] & C_TARGET:
                    i += 1
                if i == n:
                    return 0
                if p[i] == 32:
                    i += 1
                    while i < n and CLASS[p[i]] & C_VERSION:
                        i += 1
                    if i == n or (p[i] == 13 and i + 1 == n):
                        return 0
        raise HttpParserError("invalid bytes in request head")


cdef const char* STATUS_LINE_ERROR = "status line is not 'HTTP/1.x SP 3DIGIT [SP reason]'"


cdef Py_ssize_t _status_line(const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) noexcept:
    """The end of a valid status line at `pos` (past its CRLF), or -1 (`_STATUS_LINE`)."""
    cdef Py_ssize_t i = pos + 12
    if n - pos < 14 or memcmp(p + pos, b"HTTP/1.", 7) != 0 or not (p[pos + 7] == 48 or p[pos + 7] == 49):
        return -1
    if p[pos + 8] != 32 or not (48 <= p[pos + 9] <= 57 and 48 <= p[pos + 10] <= 57 and 48 <= p[pos + 11] <= 57):
        return -1
    if p[i] == 32:
        i += 1
        while i < n and CLASS[p[i]] & C_VALUE:
            i += 1
    if n - i >= 2 and p[i] == 13 and p[i + 1] == 10:
        return i + 2
    return -1


cdef bint _status_prefix(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """`p[i:n]` (no LF) can start a status line (`_STATUS_START`)."""
    cdef const char* lit = "HTTP/1."
    cdef int k
    for k in range(7):
        if i == n:
            return True
        if p[i] != <unsigned char>lit[k]:
            return False
        i += 1
    if i == n:
        return True
    if not (p[i] == 48 or p[i] == 49):
        return False
    i += 1
    if i == n:
        return True
    if p[i] != 32:
        return False
    i += 1
    for k in range(3):
        if i == n:
            return True
        if not (48 <= p[i] <= 57):
            return False
        i += 1
    if i == n:
        return True
    if p[i] == 13:
        return i + 1 == n
    if p[i] != 32:
        return False
    i += 1
    while i < n and CLASS[p[i]] & C_VALUE:
        i += 1
    return i == n or (p[i] == 13 and i + 1 == n)


cdef enum:
    R_IDLE = 0
    R_HEAD = 1
    R_BODY = 2
    R_CHUNKED = 3
    R_UNTIL_CLOSE = 4
    R_STOPPED = 5


cdef class ResponseFramer:
    """`response_framing.ResponseFramer`'s compiled twin (its docstring is the rules)."""

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
    cdef object _chunks
    cdef int _status
    cdef bint _keep_alive

    def __init__(self, callbacks, Py_ssize_t max_head_bytes):
        self._cb = callbacks
        self._on_head = callbacks.on_head
        self._on_body = callbacks.on_body
        self._on_complete = callbacks.on_message_complete
        self._max_head = max_head_bytes
        self._state = R_IDLE
        self._held = B_EMPTY
        self._vetted = 0
        self._line_done = False
        self._left = 0
        self._chunks = None
        self._status = 0
        self._keep_alive = True

    def get_status_code(self):
        return self._status

    def should_keep_alive(self):
        return self._keep_alive

    def feed_data(self, data):
        cdef bytes buf = data if type(data) is bytes else bytes(data)
        cdef int state = self._state
        if state == R_STOPPED:
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
                if state == R_UNTIL_CLOSE:
                    self._on_body(buf[pos:] if pos else buf)
                    return
                if state == R_BODY:
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
                    state = self._state = R_IDLE
                    self._on_complete()
                    continue
                if state == R_CHUNKED:
                    end = self._chunks.feed(buf, pos)
                    if end < 0:
                        return
                    pos = end
                    self._chunks = None
                    state = self._state = R_IDLE
                    self._on_complete()
                    continue
                if state == R_IDLE:
                    while pos < n and (p[pos] == 13 or p[pos] == 10):  # empty lines between responses
                        pos += 1
                    if pos == n:
                        return
                    state = self._state = R_HEAD
                pos = self._head(buf, p, pos, n, held)
                if pos < 0:
                    return
                held = 0
                state = self._state
        except (HttpParserUpgrade, HttpParserError):
            self._state = R_STOPPED
            raise

    cdef Py_ssize_t _head(self, bytes buf, const unsigned char* p, Py_ssize_t start, Py_ssize_t n,
                          Py_ssize_t held) except -2:
        cdef Py_ssize_t end = -1, i = start + 3
        cdef const unsigned char* lf
        while i < n:
            lf = <const unsigned char*>memchr(p + i, 10, n - i)
            if lf == NULL:
                break
            i = lf - p
            if p[i - 1] == 13 and p[i - 2] == 10 and p[i - 3] == 13:
                end = i - 3
                break
            i += 1
        if end < 0 or end + 4 - start > self._max_head:
            if n - start > self._max_head:
                raise HeadTooLarge("response head too large")
            self._vet_unfinished(p, start, n)
            if not held:
                self._cb.on_message_begin()
            self._held = buf[start:] if start else buf
            return -1
        self._vetted = 0
        self._line_done = False
        end += 2
        cdef Py_ssize_t line_end = _status_line(p, start, end)
        if line_end < 0:
            raise HttpParserError(STATUS_LINE_ERROR.decode())
        cdef int status = (p[start + 9] - 48) * 100 + (p[start + 10] - 48) * 10 + (p[start + 11] - 48)
        cdef bint http10 = p[start + 7] == 48
        if _header_lines(p, line_end, end) < 0:
            raise HttpParserError("invalid header line")
        cdef list headers = []
        cdef Py_ssize_t a, b, va, vb, j
        cdef long long length = -1
        cdef unsigned long long number
        cdef int coding = 0, tokens = 0  # coding: 0 none, 1 chunked last, 2 another last
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
            headers.append((PyBytes_FromStringAndSize(<const char*>p + a, b - a),
                            PyBytes_FromStringAndSize(<const char*>p + va, vb - va)))
            if b - a == 14 and _token_is(p, a, b, b"content-length", 14):
                if length >= 0 or vb == va or not (48 <= p[va] <= 57):
                    raise HttpParserError("invalid or duplicate Content-Length")
                number = 0
                j = va
                while j < vb and 48 <= p[j] <= 57:
                    if j - va == 19:
                        raise HttpParserError("invalid or duplicate Content-Length")
                    number = number * 10 + (p[j] - 48)
                    j += 1
                while j < vb and (p[j] == 32 or p[j] == 9):
                    j += 1
                if j != vb:
                    raise HttpParserError("invalid or duplicate Content-Length")
                if number > MAX_LENGTH:
                    raise HttpParserError("Content-Length too large")
                length = <long long>number
            elif b - a == 17 and _token_is(p, a, b, b"transfer-encoding", 17):
                coding = _last_coding(p, va, vb)
            elif b - a == 10 and _token_is(p, a, b, b"connection", 10):
                tokens |= _connection(p, va, vb)
        if coding and length >= 0:
            raise HttpParserError("both Content-Length and Transfer-Encoding")
        cdef bint keep_alive = (tokens & T_KEEP_ALIVE) != 0 if http10 else not tokens & T_CLOSE
        end += 2
        cdef int state
        if status < 200 or status == 204 or status == 304:
            state = R_IDLE
        elif coding == 1:
            state = R_CHUNKED
        elif coding or length < 0:
            state = R_UNTIL_CLOSE
            keep_alive = False
        else:
            state = R_BODY if length else R_IDLE
        self._status = status
        self._keep_alive = keep_alive
        self._on_head(status, headers, keep_alive)
        if state == R_IDLE:
            self._state = R_IDLE
            self._on_complete()
            if status == 101:
                raise HttpParserUpgrade(end - held)
        elif state == R_CHUNKED:
            self._chunks = ChunkedScanner(self._on_body)
            self._state = R_CHUNKED
        else:
            self._left = <unsigned long long>length if length > 0 else 0
            self._state = state
        return end

    cdef int _vet_unfinished(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t n) except -1:
        cdef Py_ssize_t pos = start + self._vetted, last = n - 1, line_end, i, s
        while last >= pos and p[last] != 10:
            last -= 1
        if last >= pos:
            if not self._line_done:
                line_end = _status_line(p, pos, n)
                if line_end < 0 or line_end > last + 1:
                    raise HttpParserError(STATUS_LINE_ERROR.decode())
                pos = line_end
                self._line_done = True
            if pos <= last and _header_lines(p, pos, last + 1) < 0:
                raise HttpParserError("invalid header line")
            pos = last + 1
            self._vetted = pos - start
        if self._line_done:
            if _header_prefix(p, pos, n):
                return 0
        elif _status_prefix(p, pos, n):
            return 0
        raise HttpParserError("invalid bytes in response head")
