# cython: language_level=3, boundscheck=False, wraparound=False
"""Whole-line writes to a pipe with the GIL released once: the access-log writer's
compiled helper (`log_writer`; without it the writer loops `os.write` in Python).

Why: on a pipe, a socket or a terminal (stdout under Docker or systemd) the writer
must write at most PIPE_BUF bytes a time, ending at a line end, so lines from several
workers never interleave. From Python each such write gives the GIL up and takes it
back, and while the event loop is busy taking it back waits for the switch interval
(5 ms): at some 50,000 lines a second the queue filled and most lines were dropped.
Here the whole batch is written in one stretch without the GIL.
"""

from libc.errno cimport EINTR, errno
from posix.unistd cimport write


def write_lines(int fd, const unsigned char[::1] data, Py_ssize_t chunk):
    """Write `data` to `fd` in writes of at most `chunk` bytes, each ending at a line
    end (a line longer than `chunk` is cut at `chunk`), as `os.write` loops would.
    Returns (bytes written, the errno that stopped it or 0)."""
    cdef Py_ssize_t n = data.shape[0], done = 0, end, k
    cdef ssize_t w
    cdef int err = 0
    if n == 0:
        return 0, 0
    cdef const unsigned char* p = &data[0]
    with nogil:
        while done < n:
            end = n - done
            if end > chunk:
                k = chunk
                while k > 0 and p[done + k - 1] != 10:
                    k -= 1
                end = k if k > 0 else chunk
            w = write(fd, p + done, end)
            if w < 0:
                if errno == EINTR:
                    continue
                err = errno
                break
            done += w
    return done, err
