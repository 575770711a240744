"""Micro-benchmark: does the access-log writer keep up with a busy worker on a pipe?

Usage: .venv/bin/python benches/log_pipe_bench.py [--seconds 3] [--rate 50000]

stdout under Docker or systemd is a pipe, written in whole lines of at most PIPE_BUF a
write. Here the main thread plays a CPU-saturated event loop: it holds the GIL in a
Python loop and hands the writer (`runtime.log_writer.LineWriter`, default 1 MiB queue)
a 64 KiB batch of ~300-byte lines whenever --rate lines a second are due, for
--seconds; a `cat` process drains the pipe into /dev/null. Printed for the compiled
pipe helper (`runtime._cwrite`, one GIL release per batch) and for the Python loop
(one GIL round trip per write): lines submitted, lines dropped (the queue was full).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

from edgeplane.runtime import log_writer
from edgeplane.runtime.log_writer import LineWriter

LINE = b'{"requestId":"%012x","status":200,' + b'"x":"' + b"y" * 240 + b'"}\n'


def run(helper, seconds: float, rate: int) -> tuple[int, int]:
    log_writer._write_lines = helper
    read_fd, write_fd = os.pipe()
    cat = subprocess.Popen(["cat"], stdin=read_fd, stdout=subprocess.DEVNULL)
    os.close(read_fd)
    writer = LineWriter(write_fd, max_pending=1 << 20, owns_fd=True)
    per_batch = (64 * 1024) // len(LINE % 0)
    batch = b"".join(LINE % i for i in range(per_batch))
    submitted = 0
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        if submitted < (now - start) * rate:
            writer.submit(batch, per_batch)
            submitted += per_batch
        else:
            sum(range(200))  # the loop's own work, holding the GIL
    writer.close(timeout=10)
    cat.wait(10)
    return submitted, writer.dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rate", type=int, default=50_000)
    args = ap.parse_args()
    ways = {"python loop": None}
    try:
        from edgeplane.runtime._cwrite import write_lines
    except ImportError:
        print("(the compiled helper is not built: only the Python loop)")
    else:
        ways = {"compiled helper": write_lines, **ways}
    for name, helper in ways.items():
        submitted, dropped = run(helper, args.seconds, args.rate)
        print(f"{name:16s} {submitted:8d} lines submitted, {dropped:8d} dropped ({100 * dropped / submitted:.1f} %)")


if __name__ == "__main__":
    main()
