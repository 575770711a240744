# Included by _cframing.pyx: `chunked.ChunkedScanner`'s compiled twin (chunk-size
# lines, extensions, trailers; the same strict rules, the same answers).

cdef enum:
    K_SIZE = 0
    K_DATA = 1
    K_DATA_END = 2
    K_TRAILER = 3
    K_DONE = 4

cdef Py_ssize_t CHUNK_LINE_MAX = 1024
cdef Py_ssize_t TRAILERS_MAX = 8192


cdef inline int _hex(unsigned char c) noexcept:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    if 65 <= c <= 70:
        return c - 55
    return -1


cdef Py_ssize_t _size_line(const unsigned char* p, Py_ssize_t pos, Py_ssize_t n,
                           unsigned long long* size) noexcept:
    """The end (past its CRLF) of a valid chunk-size line at `pos`, its size in `size`;
    -1 when there is none (`chunked._CHUNK_SIZE_LINE`: 1-16 hex digits, then `;token`
    or `;token=token|quoted-string` extensions, then CRLF)."""
    cdef Py_ssize_t i = pos, t
    cdef unsigned long long v = 0
    cdef int d
    cdef unsigned char c
    while i < n and i - pos < 16:
        d = _hex(p[i])
        if d < 0:
            break
        v = v * 16 + <unsigned long long>d
        i += 1
    if i == pos:
        return -1
    while i < n and p[i] == 59:  # ;
        i += 1
        t = i
        while i < n and CLASS[p[i]] & C_TOKEN:
            i += 1
        if i == t:
            return -1
        if i < n and p[i] == 61:  # =
            i += 1
            if i < n and p[i] == 34:  # a quoted-string
                i += 1
                while True:
                    if i >= n:
                        return -1
                    c = p[i]
                    if c == 34:
                        i += 1
                        break
                    if c == 92:  # a quoted-pair: HTAB, SP..~, obs-text after the backslash
                        if i + 1 >= n or not (p[i + 1] == 9 or 0x20 <= p[i + 1] <= 0x7E or p[i + 1] >= 0x80):
                            return -1
                        i += 2
                        continue
                    if c == 9 or c == 32 or c == 33 or 0x23 <= c <= 0x5B or 0x5D <= c <= 0x7E or c >= 0x80:
                        i += 1
                        continue
                    return -1
            else:
                t = i
                while i < n and CLASS[p[i]] & C_TOKEN:
                    i += 1
                if i == t:
                    return -1
    if n - i >= 2 and p[i] == 13 and p[i + 1] == 10:
        size[0] = v
        return i + 2
    return -1


cdef bint _trailer_ok(const unsigned char* p, Py_ssize_t lo, Py_ssize_t hi) noexcept:
    """`p[lo:hi]` is a trailer line `token ":" VALUE CRLF` whose name is not one of the
    fields refused there (`chunked._TRAILER_LINE`, `_TRAILER_REFUSED`)."""
    cdef Py_ssize_t i = lo, b
    while i < hi and CLASS[p[i]] & C_TOKEN:
        i += 1
    if i == lo or i >= hi or p[i] != 58:
        return False
    b = i
    i += 1
    while i < hi and CLASS[p[i]] & C_VALUE:
        i += 1
    if not (hi - i == 2 and p[i] == 13 and p[i + 1] == 10):
        return False
    return not (_token_is(p, lo, b, b"content-length", 14) or _token_is(p, lo, b, b"transfer-encoding", 17)
                or _token_is(p, lo, b, b"connection", 10) or _token_is(p, lo, b, b"proxy-connection", 16)
                or _token_is(p, lo, b, b"upgrade", 7))


cdef class ChunkedScanner:
    """`chunked.ChunkedScanner`'s compiled twin: the same `feed`, the same answers."""

    cdef int _state
    cdef unsigned long long _left
    cdef bytes _carry
    cdef Py_ssize_t _trailers
    cdef object _sink

    def __init__(self, sink=None):
        self._sink = sink
        self._state = K_SIZE
        self._left = 0
        self._carry = B_EMPTY
        self._trailers = 0

    cpdef Py_ssize_t feed(self, bytes data, Py_ssize_t pos=0) except -2:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), nl, lo, hi, e
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef const unsigned char* tp
        cdef const unsigned char* found
        cdef int state = self._state
        cdef unsigned long long left, size = 0
        cdef bytes text, line
        while pos < n:
            if state == K_DATA:
                left = self._left
                if <unsigned long long>(n - pos) < left:
                    self._left = left - <unsigned long long>(n - pos)
                    if self._sink is not None:
                        self._sink(data[pos:] if pos else data)
                    pos = n
                    break
                if self._sink is not None:
                    self._sink(data[pos:pos + <Py_ssize_t>left])
                pos += <Py_ssize_t>left
                state = K_DATA_END
                if n - pos >= 2 and p[pos] == 13 and p[pos + 1] == 10:
                    pos += 2
                    state = K_SIZE
                continue
            if state == K_DONE:
                break
            if state == K_SIZE and not PyBytes_GET_SIZE(self._carry):
                e = _size_line(p, pos, n, &size)
                if e >= 0 and e - pos <= CHUNK_LINE_MAX:
                    pos = e
                    self._left = size
                    if size:
                        state = K_DATA
                    elif n - pos >= 2 and p[pos] == 13 and p[pos + 1] == 10:
                        self._state = K_DONE
                        return pos + 2
                    else:
                        state = K_TRAILER
                    continue
            found = <const unsigned char*>memchr(p + pos, 10, n - pos)
            nl = found - p if found != NULL else -1
            if nl < 0 or PyBytes_GET_SIZE(self._carry):  # a line split across reads
                line = self._whole_line(data, pos, nl, state)
                if line is None:
                    break
                text, lo, hi = line, 0, PyBytes_GET_SIZE(line)
            else:
                text, lo, hi = data, pos, nl + 1
            tp = <const unsigned char*>PyBytes_AS_STRING(text)
            pos = nl + 1
            if state != K_TRAILER and hi - lo > CHUNK_LINE_MAX:
                raise HttpParserError("chunk size line too long")
            if state == K_SIZE:
                if _size_line(tp, lo, hi, &size) != hi:
                    raise HttpParserError("invalid chunk size line")
                self._left = size
                state = K_DATA if size else K_TRAILER
            elif state == K_DATA_END:
                if hi - lo != 2 or not (tp[lo] == 13 and tp[lo + 1] == 10):
                    raise HttpParserError("chunk data not followed by CRLF")
                state = K_SIZE
            elif hi - lo == 2 and tp[lo] == 13 and tp[lo + 1] == 10:  # the trailer section's end
                self._state = K_DONE
                return pos
            else:
                self._trailers += hi - lo
                if not _trailer_ok(tp, lo, hi):
                    raise HttpParserError("invalid trailer field")
                if self._trailers > TRAILERS_MAX:
                    raise HttpParserError("trailer section too large")
        self._state = state
        return -1

    cdef bytes _whole_line(self, bytes data, Py_ssize_t pos, Py_ssize_t nl, int state):
        cdef bytes carry
        cdef Py_ssize_t limit
        if nl < 0:
            carry = self._carry = self._carry + data[pos:]
            limit = TRAILERS_MAX - self._trailers if state == K_TRAILER else CHUNK_LINE_MAX
            if PyBytes_GET_SIZE(carry) > limit:
                raise HttpParserError("chunk size line or trailer section too long")
            return None
        line = self._carry + data[pos:nl + 1]
        self._carry = B_EMPTY
        return line
