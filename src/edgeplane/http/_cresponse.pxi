# Included by _cframing.pyx: `response_framing.ResponseFramer`'s compiled twin and its
# status-line helpers.

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


cdef class ResponseFramer(HeadFramer):
    """`response_framing.ResponseFramer`'s compiled twin (its docstring is the rules)."""

    cdef int _status
    cdef bint _keep_alive

    def __init__(self, callbacks, Py_ssize_t max_head_bytes):
        super().__init__(callbacks, max_head_bytes)
        self._what = "response"
        self._first_error = STATUS_LINE_ERROR.decode()
        self._status = 0
        self._keep_alive = True

    def get_status_code(self):
        return self._status

    def should_keep_alive(self):
        return self._keep_alive

    cdef Py_ssize_t _between(self, bytes buf, const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) except -2:
        while pos < n and (p[pos] == 13 or p[pos] == 10):  # empty lines between responses
            pos += 1
        return pos

    cdef Py_ssize_t _first_line(self, const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) noexcept:
        return _status_line(p, pos, n)

    cdef int _first_prefix(self, const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) except -1:
        return 1 if _status_prefix(p, pos, n) else 0

    cdef Py_ssize_t _head(self, bytes buf, const unsigned char* p, Py_ssize_t start, Py_ssize_t n,
                          Py_ssize_t held) except -2:
        cdef Py_ssize_t end = self._head_end(p, start, n, held), i
        if end < 0 or end + 4 - start > self._max_head:
            return self._unfinished(buf, p, start, n, held)
        self._vetted = 0
        self._line_done = False
        end += 2
        cdef Py_ssize_t line_end = _status_line(p, start, end)
        if line_end < 0:
            raise HttpParserError(STATUS_LINE_ERROR.decode())
        cdef int status = (p[start + 9] - 48) * 100 + (p[start + 10] - 48) * 10 + (p[start + 11] - 48)
        cdef bint http10 = p[start + 7] == 48
        if status < 100:
            raise HttpParserError("invalid status code")
        if _header_lines(p, line_end, end) < 0:
            raise HttpParserError("invalid header line")
        cdef list headers = []
        cdef Py_ssize_t a, b, va, vb, j
        cdef long long length = -1
        cdef int tokens = 0
        cdef bint chunked = False
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
                length = _content_length(p, va, vb, length)
            elif b - a == 17 and _token_is(p, a, b, b"transfer-encoding", 17):
                j = vb
                while j > va and (p[j - 1] == 32 or p[j - 1] == 9):
                    j -= 1
                if chunked or not _token_is(p, va, j, b"chunked", 7):
                    raise HttpParserError("unsupported Transfer-Encoding")
                chunked = True
            elif b - a == 10 and _token_is(p, a, b, b"connection", 10):
                tokens |= _connection(p, va, vb)
        if chunked and length >= 0:
            raise HttpParserError("both Content-Length and Transfer-Encoding")
        cdef bint keep_alive = ((tokens & T_KEEP_ALIVE) != 0 and not chunked) if http10 else not tokens & T_CLOSE
        end += 2
        cdef int state
        if status < 200 or status == 204 or status == 304:
            state = IDLE
        elif chunked:
            state = CHUNKED
        elif length < 0:
            state = UNTIL_CLOSE
            keep_alive = False
        else:
            state = BODY if length else IDLE
        self._status = status
        self._keep_alive = keep_alive
        self._on_head(status, headers, keep_alive)
        if state == IDLE:
            self._state = IDLE
            self._on_complete()
            if status == 101:
                raise HttpParserUpgrade(end - held)
        elif state == CHUNKED:
            self._chunks = ChunkedScanner(self._on_body)
            self._state = CHUNKED
        else:
            self._left = <unsigned long long>length if length > 0 else 0
            self._state = state
        return end
