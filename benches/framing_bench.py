"""Micro-benchmark: what parsing one request head and one response costs, per parser.

Usage: .venv/bin/python benches/framing_bench.py [--rounds 5] [--n 100000]

A typical proxied exchange's two messages are fed whole, one read each, to every parser
of that leg, with callbacks that keep what they are given (as the gateway's do: a header
list, a body):
- request (`GET` with 6 headers, as wrk and browsers send): the native framer compiled
  and its pure-Python twin (`http.parser: native`), httptools/llhttp with the codec's
  strict guard (`httptools`), and h11 (`h11`, fewer rounds: it is ~50x slower);
- response (200, 4 headers, a 2-byte body): the native response framer compiled and its
  twin, and bare httptools (what parsed responses before the native framer).

Prints ns per message, best of --rounds. The compiled rows are skipped, saying so, when
the compiled framer is not built (or EDGEPLANE_NO_EXTENSIONS is set).
"""

from __future__ import annotations

import argparse
import timeit

import httptools

from edgeplane.http import framing, native, response_framing
from edgeplane.http.codec import new_request_parser

REQUEST = (b"GET /api/items/42?expand=1 HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: Mozilla/5.0 (X11)\r\n"
           b"Accept: application/json\r\nAccept-Encoding: gzip, deflate\r\nX-Request-Id: 4f2a9c\r\n"
           b"Connection: keep-alive\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
            b"Date: Sat, 05 Dec 2026 05:00:00 GMT\r\nServer: demo\r\n\r\nok")


class Keep:
    """Callbacks that keep what they get, as the protocol's do (per header for llhttp)."""

    def __init__(self) -> None:
        self.headers: list = []
        self.body = b""

    def on_message_begin(self) -> None:
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        pass

    def on_head(self, *args) -> None:
        self.head = args

    def on_body(self, chunk: bytes) -> None:
        self.body = chunk

    def on_message_complete(self) -> None:
        pass


def best_ns(feed, n: int, rounds: int) -> float:
    return min(timeit.repeat(feed, number=n, repeat=rounds)) / n * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=100_000)
    args = ap.parse_args()
    print(f"native framers: {native.WHY}")
    requests = {"native (pure Python twin)": lambda cb: framing.RequestFramer(cb, 65536),
                "httptools + strict guard": lambda cb: new_request_parser("httptools", cb, 65536),
                "h11": lambda cb: new_request_parser("h11", cb, 65536)}
    responses = {"native (pure Python twin)": lambda cb: response_framing.ResponseFramer(cb, 65536),
                 "httptools (bare)": lambda cb: httptools.HttpResponseParser(cb)}
    if native.COMPILED:
        requests = {"native (compiled)": lambda cb: native.RequestFramer(cb, 65536), **requests}
        responses = {"native (compiled)": lambda cb: native.ResponseFramer(cb, 65536), **responses}
    else:
        print("(compiled rows skipped: the compiled framer is not running)")
    for leg, parsers, raw in (("request head", requests, REQUEST), ("response", responses, RESPONSE)):
        for name, make in parsers.items():
            parser = make(Keep())
            n = args.n // 50 if name == "h11" else args.n
            print(f"{leg:13s} {name:28s} {best_ns(lambda p=parser, r=raw: p.feed_data(r), n, args.rounds):8.0f} ns")


if __name__ == "__main__":
    main()
