"""The access-log writer on a real pipe, with the compiled pipe helper (`_cwrite`) and
with its Python loop: every line arrives, whole, in order, and no read the other end
gets cuts a line (each write ends at a line end); a line longer than PIPE_BUF is cut
at PIPE_BUF by both (it cannot stay whole); a write that fails (the reader went away)
counts what was not written."""

from __future__ import annotations

import os
import threading

import pytest

from edgeplane.runtime import log_writer
from edgeplane.runtime.log_writer import LineWriter

try:
    from edgeplane.runtime._cwrite import write_lines  # type: ignore[import-not-found]
except ImportError:
    write_lines = None

WAYS = [None] + ([write_lines] if write_lines is not None else [])
IDS = ["python-loop"] + (["compiled"] if write_lines is not None else [])


def _lines(n: int) -> list[bytes]:
    return [b"%06d " % i + b"x" * ((i * 37) % 300 + 1) + b"\n" for i in range(n)]


@pytest.mark.parametrize("helper", WAYS, ids=IDS)
def test_every_line_arrives_whole_and_in_order(monkeypatch, helper):
    monkeypatch.setattr(log_writer, "_write_lines", helper)
    read_fd, write_fd = os.pipe()
    got: list[bytes] = []

    def reader() -> None:
        while chunk := os.read(read_fd, 1 << 20):
            got.append(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    writer = LineWriter(write_fd, max_pending=64 << 20, owns_fd=True)
    lines = _lines(3000)
    for i in range(0, len(lines), 50):  # batches of 50 lines, as the loop hands them over
        assert writer.submit(b"".join(lines[i : i + 50]), len(lines[i : i + 50]))
    writer.close(timeout=10)
    thread.join(10)
    os.close(read_fd)
    assert b"".join(got) == b"".join(lines)
    assert writer.dropped == 0
    for chunk in got:  # a read may join several writes, but never cuts a line
        assert chunk.endswith(b"\n")


@pytest.mark.parametrize("helper", WAYS, ids=IDS)
def test_a_reader_that_goes_away_is_counted(monkeypatch, helper):
    monkeypatch.setattr(log_writer, "_write_lines", helper)
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # EPIPE at the first write (Python ignores SIGPIPE)
    writer = LineWriter(write_fd, max_pending=1 << 20, owns_fd=True)
    assert writer.submit(b"one\ntwo\nthree\n", 3)
    writer.close(timeout=5)
    assert writer.dropped == 3 and writer.failed


@pytest.mark.skipif(write_lines is None, reason="the compiled helper is not built here")
def test_the_helper_cuts_at_line_ends_like_the_loop():
    read_fd, write_fd = os.pipe()
    try:
        data = b"a" * 10 + b"\n" + b"b" * 5 + b"\n" + b"c" * 30 + b"\n"
        assert write_lines(write_fd, memoryview(data), 20) == (len(data), 0)
        # writes of at most 20 bytes ending at a line end, a longer line cut at 20
        assert os.read(read_fd, 1000) == data
        assert write_lines(write_fd, memoryview(b""), 20) == (0, 0)
    finally:
        os.close(read_fd)
        os.close(write_fd)
