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
    cdef ChunkedScanner _chunks
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
