"""Micro-benchmark: what counting a request in the metrics costs (issue 13's budget is
under 0.5 us per request on `plain`).

Usage: .venv/bin/python benches/metrics_bench.py [--rounds 5] [--n 500000]

A real `Gateway` is started (loopback, port 0; access log off) and a real `Request`,
routed to a proxy route and answered 200 with an integration latency, is passed to:

- count:     `ServerContext.count(req)`: what every ended request pays for the metrics
             (the route's arrays, the method and status cells, two histograms, bytes);
- done-off:  `ServerContext.request_done(req, proto)` with the access log off: count
             plus the log's enabled test (the whole per-request cost of observability
             on `plain` today);
- baseline:  an empty function call with the same arguments, subtracted from both.

Prints ns per request, best of --rounds. The scrape side (collecting the series,
rendering the exposition) runs off the request path: once a second per worker (its
file) and on each scrape; its time is printed too, for the bench's routes.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from edgeplane import Gateway
from edgeplane.http.request import Request


def _best(fn, n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e9


async def main(rounds: int, n: int) -> None:
    cfg = {"listen": ["127.0.0.1:0"], "admin": {"listen": "127.0.0.1:0", "insecure": True},
           "access_log": {"destination": "off"},
           "upstreams": {"app": {"targets": ["http://127.0.0.1:9"]}},
           "routes": [{"route": "GET /api/{proxy+}", "integration": {"type": "http", "upstream": "app"}}]}
    gw = Gateway(cfg)
    await gw.start()
    try:
        ctx = gw._context
        assert ctx is not None
        req = Request(time.perf_counter())
        req.method, req.status, req.response_length, req.integration_latency = b"GET", 200, 2, 0.0004
        req.route = ctx.snapshot.routes[0]
        empty = lambda r: None  # noqa: E731

        base = _best(lambda: empty(req), n, rounds)
        count = _best(lambda: ctx.count(req), n, rounds) - base
        done = _best(lambda: ctx.request_done(req, None), n, rounds) - base
        print(f"count (ServerContext.count):               {count:6.0f} ns per request")
        print(f"request_done, access log off (count + log): {done:6.0f} ns per request")
        t0 = time.perf_counter()
        for _ in range(100):
            gw._metrics.scrape(gw, "")
        print(f"a scrape (collect + text exposition):       {(time.perf_counter() - t0) * 10:6.2f} ms")
    finally:
        await gw.stop(drain_timeout=0.5)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=500_000)
    a = p.parse_args()
    asyncio.run(main(a.rounds, a.n))
