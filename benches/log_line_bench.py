"""Micro-benchmark: what one access-log line costs on the request path (issue 13's budget
is about 1.5 us per line).

Usage: .venv/bin/python benches/log_line_bench.py [--rounds 5] [--n 200000]

A real `Gateway` is started (loopback, port 0) with `destination: file` on /dev/null, and
a real `Request` of a proxied GET (route, status 200, integration latency, user agent,
client request id) is logged through `AccessLog.record` as `ServerContext.request_done`
does, in each of these formats:

- default:  the default JSON shape (a dict serialised by orjson);
- aws-json: an AWS-style JSON template of 12 `$context` variables (compiled);
- clf:      a Common Log Format line of 9 variables (compiled);
- mapping:  a typed mapping of 8 variables (compiled).

What is timed is the hot-path part: render the line and append it to the buffer. The
buffer is handed to the writer thread every `buffer_bytes` (64 KiB), which is included;
the thread's write itself runs off the event loop and is not. An empty call with the
same arguments is subtracted. Prints ns per line, best of --rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from edgeplane import Gateway
from edgeplane.http.request import Request

FORMATS = {
    "default": None,
    "aws-json": ('{"requestId":"$context.requestId","ip":"$context.identity.sourceIp",'
                 '"requestTime":"$context.requestTime","httpMethod":"$context.httpMethod",'
                 '"routeKey":"$context.routeKey","status":"$context.status","protocol":"$context.protocol",'
                 '"responseLength":"$context.responseLength","latency":"$context.responseLatency",'
                 '"integrationLatency":"$context.integrationLatency","ua":"$context.identity.userAgent",'
                 '"traceId":"$context.traceId"}'),
    "clf": ('$context.identity.sourceIp - - [$context.requestTime] "$context.httpMethod $context.path '
            '$context.protocol" $context.status $context.responseLength "$context.identity.userAgent" '
            '$context.requestId'),
    "mapping": {"id": "$context.requestId", "ip": "$context.identity.sourceIp", "method": "$context.httpMethod",
                "route": "$context.routeKey", "status": "$context.status", "bytes": "$context.responseLength",
                "ms": "$context.responseLatency", "upstream_ms": "$context.integrationLatency"},
}


def _best(fn, n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e9


class _Peer:
    peer_ip = "127.0.0.1"
    client_cert_subject = None


async def measure(fmt, rounds: int, n: int) -> float:
    log: dict = {"destination": "file", "path": "/dev/null"}
    if fmt is not None:
        log["format"] = fmt
    cfg = {"listen": ["127.0.0.1:0"], "admin": {"listen": "127.0.0.1:0", "insecure": True}, "access_log": log,
           "upstreams": {"app": {"targets": ["http://127.0.0.1:9"]}},
           "routes": [{"route": "GET /api/{proxy+}", "integration": {"type": "http", "upstream": "app"}}]}
    gw = Gateway(cfg)
    await gw.start()
    try:
        ctx = gw._context
        assert ctx is not None
        req = Request(time.perf_counter())
        req.method, req.path, req.version, req.status, req.response_length = b"GET", b"/api/users/7", "1.1", 200, 312
        req.integration_latency, req.integration_status, req.upstream = 0.0004, 200, "app 127.0.0.1:9"
        req.headers = [(b"host", b"api.example.com"), (b"user-agent", b"wrk/4.2.0 (Linux)"),
                       (b"accept", b"*/*")]
        req.request_id = b"0f3a91c2-5b7e-4d10-8c3e-00000000002a"
        req.route = ctx.snapshot.routes[0]
        req.route_key = req.route.key
        proto = _Peer()
        access_log = ctx.access_log
        empty = lambda r, p: None  # noqa: E731
        base = _best(lambda: empty(req, proto), n, rounds)
        return _best(lambda: access_log.record(req, proto), n, rounds) - base
    finally:
        await gw.stop(drain_timeout=0.5)


async def main(rounds: int, n: int) -> None:
    for name, fmt in FORMATS.items():
        ns = await measure(fmt, rounds, n)
        print(f"{name:9s} {ns:6.0f} ns per line")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=200_000)
    a = p.parse_args()
    asyncio.run(main(a.rounds, a.n))
