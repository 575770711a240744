# Included by _cframing.pyx: the byte-class tables, the shared constants and the C
# helpers both framers use (request line, header lines, Connection and
# Transfer-Encoding tokens, what can start an unfinished line).

cdef enum:  # a framer's state (`framing`'s _IDLE ... _STOPPED)
    IDLE = 0
    HEAD = 1
    BODY = 2
    CHUNKED = 3
    UNTIL_CLOSE = 4
    STOPPED = 5

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
cdef object _METHOD_PREFIXES = METHOD_PREFIXES
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


cdef long long _content_length(const unsigned char* p, Py_ssize_t va, Py_ssize_t vb, long long seen) except -2:
    """`framing.content_length`: the value `p[va:vb]` as a number, refused when it is not
    1-19 digits (blanks after them allowed), when one came before (`seen` >= 0) or past
    2**63 - 1."""
    cdef unsigned long long number = 0
    cdef Py_ssize_t j = va
    if seen >= 0 or vb == va or not (48 <= p[va] <= 57):
        raise HttpParserError("invalid or duplicate Content-Length")
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
    return <long long>number


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
