"""What the micro-benchmarks share: the timing loop, a started gateway in front of one
proxy route, the proxied request they time, and the command line.

Used by `metrics_bench.py`, `log_line_bench.py` and `tracing_bench.py` (run as scripts
from the repository: this folder is on their path).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from edgeplane import Gateway
from edgeplane.http.request import Request

HEADERS = [(b"host", b"api.example.com"), (b"user-agent", b"wrk/4.2.0 (Linux)"), (b"accept", b"*/*")]


def best_ns(fn: Callable[[], Any], n: int, rounds: int) -> float:
    """ns per call of `fn`, best of `rounds` runs of `n` calls."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e9


@asynccontextmanager
async def proxy_gateway(**extra: Any) -> AsyncIterator[Gateway]:
    """A started gateway (loopback, port 0; access log off unless `extra` says) with one
    proxy route, `GET /api/{proxy+}`, to an upstream nobody needs to answer."""
    cfg = {"listen": ["127.0.0.1:0"], "admin": {"listen": "127.0.0.1:0", "insecure": True},
           "access_log": {"destination": "off"},
           "upstreams": {"app": {"targets": ["http://127.0.0.1:9"]}},
           "routes": [{"route": "GET /api/{proxy+}", "integration": {"type": "http", "upstream": "app"}}],
           **extra}
    gw = Gateway(cfg)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop(drain_timeout=0.5)


def proxied_request(gw: Gateway, headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    """A request as it ends on the route: a proxied GET answered 200 (312 bytes), with
    an integration latency, a client request id and `headers`."""
    ctx = gw._context
    assert ctx is not None
    req = Request(time.perf_counter())
    req.method, req.path, req.version, req.status, req.response_length = b"GET", b"/api/users/7", "1.1", 200, 312
    req.integration_latency, req.integration_status, req.upstream = 0.0004, 200, "app 127.0.0.1:9"
    req.headers = list(headers if headers is not None else HEADERS)
    req.request_id = b"0f3a91c2-5b7e-4d10-8c3e-00000000002a"
    req.route = ctx.snapshot.routes[0]
    req.route_key = req.route.key
    return req


class Peer:
    """Stands for the client connection: what the timed code reads of it."""

    peer_ip = "127.0.0.1"
    client_cert_subject = None
    scheme = b"http"


def cli(doc: str, main: Callable[[int, int], Awaitable[None]], n: int) -> None:
    """`--rounds` and `--n` from the command line, then `main(rounds, n)`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=n)
    a = p.parse_args()
    asyncio.run(main(a.rounds, a.n))
