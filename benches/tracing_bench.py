"""Micro-benchmark: what tracing costs a request that is not sampled (the budget is
under 1 us at 1 % sampling), and what tracing off costs (nothing but a None test).

Usage: .venv/bin/python benches/tracing_bench.py [--rounds 5] [--n 200000]

A real `Gateway` is started (loopback, port 0, access log off) with `tracing` at
`sample_ratio: 0.01` and an OTLP endpoint nobody listens on (the export runs off the
request path and is not timed). A real `Request` of a proxied GET with 5 headers is
passed through what the request path calls:

- off:        `ServerContext.request_done` with tracing off (`ctx.tracer` None), less the
              same call's cost with the metrics alone: the None test;
- unsampled:  `Tracer.finish` of a request without `traceparent` (a new trace id, the
              1 % draw) plus `Tracer.outgoing` (the `traceparent` the upstream gets):
              the whole cost per request at 1 % (the 1 % sampled ones pay more, below);
- continued:  the same with a `traceparent` header to parse (parent not sampled);
- sampled:    `finish` of a request with its SERVER span and the integration's CLIENT
              span, handed to the exporter (its encoding and POST run off the path).

Prints ns per request, best of --rounds, an empty call with the same arguments taken off.
"""

from __future__ import annotations

from micro import Peer, best_ns, cli, proxied_request, proxy_gateway


class _Exchange:
    span = None
    pool = None
    t_dispatch = 0.0

    class integ:  # noqa: N801 - stands for the integration
        name = "app"


async def main(rounds: int, n: int) -> None:
    tracing = {"sample_ratio": 0.01, "otlp": {"endpoint": "http://127.0.0.1:9/v1/traces"}}
    async with proxy_gateway(tracing=tracing) as gw:
        ctx = gw._context
        assert ctx is not None and ctx.tracer is not None
        tracer = ctx.tracer
        tracer.exporter.submit = lambda spans: None  # not timed: the export runs off the path
        req = proxied_request(gw, [(b"host", b"api.example.com"), (b"user-agent", b"wrk/4.2.0"),
                                   (b"accept", b"*/*"), (b"x-tenant", b"acme"), (b"cookie", b"a=b")])
        peer, exchange = Peer(), _Exchange()
        empty = lambda r, p: None  # noqa: E731
        base = best_ns(lambda: empty(req, peer), n, rounds)

        def done_off():
            ctx.request_done(req, peer)

        saved, ctx.tracer = ctx.tracer, None
        off = best_ns(done_off, n, rounds)
        ctx.tracer = saved

        def count_only():
            ctx.count(req)

        metrics = best_ns(count_only, n, rounds)
        tracer.ratio = 0.0  # the draw, never sampled: the 99 % case

        def unsampled():
            req.trace_id = None
            tracer.outgoing(req, exchange)
            tracer.finish(req, peer)

        cost_unsampled = best_ns(unsampled, n, rounds) - base
        req.traceparent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"  # as the parser keeps it
        cost_continued = best_ns(unsampled, n, rounds) - base
        req.traceparent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

        def sampled():
            req.trace_id = None
            exchange.span = None
            tracer.outgoing(req, exchange)
            tracer.finish(req, peer)

        cost_sampled = best_ns(sampled, max(n // 10, 1000), rounds) - base
        print(f"tracing off (request_done less the metrics): {off - metrics:6.0f} ns per request")
        print(f"unsampled, new trace (1 % draw):             {cost_unsampled:6.0f} ns per request")
        print(f"unsampled, continued traceparent:            {cost_continued:6.0f} ns per request")
        print(f"sampled (2 spans to the exporter's queue):    {cost_sampled:6.0f} ns per request")
        print(f"at 1 %: {cost_unsampled * 0.99 + cost_sampled * 0.01:.0f} ns per request on average")


if __name__ == "__main__":
    cli(__doc__, main, 200_000)
