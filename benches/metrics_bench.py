"""Micro-benchmark: what counting a request in the metrics costs (the budget is
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

import time

from micro import best_ns, cli, proxied_request, proxy_gateway


async def main(rounds: int, n: int) -> None:
    async with proxy_gateway() as gw:
        ctx = gw._context
        assert ctx is not None
        req = proxied_request(gw)
        req.response_length = 2
        empty = lambda r: None  # noqa: E731

        base = best_ns(lambda: empty(req), n, rounds)
        count = best_ns(lambda: ctx.count(req), n, rounds) - base
        done = best_ns(lambda: ctx.request_done(req, None), n, rounds) - base
        print(f"count (ServerContext.count):               {count:6.0f} ns per request")
        print(f"request_done, access log off (count + log): {done:6.0f} ns per request")
        t0 = time.perf_counter()
        for _ in range(100):
            gw._metrics.scrape(gw, "")
        print(f"a scrape (collect + text exposition):       {(time.perf_counter() - t0) * 10:6.2f} ms")


if __name__ == "__main__":
    cli(__doc__, main, 500_000)
