"""Micro-benchmark: what one access-log line costs on the request path (the budget
is about 1.5 us per line).

Usage: .venv/bin/python benches/log_line_bench.py [--rounds 5] [--n 200000]

A real `Gateway` is started (loopback, port 0) with `destination: file` on /dev/null, and
a real `Request` of a proxied GET (route, status 200, integration latency, user agent,
client request id) is logged through `AccessLog.record` as `ServerContext.request_done`
does, in each of these formats:

- default:  the default JSON shape (compiled like a mapping);
- aws-json: an AWS-style JSON template of 12 `$context` variables (compiled);
- clf:      a Common Log Format line of 9 variables (compiled);
- mapping:  a typed mapping of 8 variables (compiled).

What is timed is the hot-path part: render the line and append it to the buffer. The
buffer is handed to the writer thread every `buffer_bytes` (64 KiB), which is included;
the thread's write itself runs off the event loop and is not (but the GIL it takes back
after each write is: a writer that falls behind and drops batches makes the figure look
better than it is, so the lines it dropped are printed too). An empty call with the same
arguments is subtracted. Prints ns per line, best of --rounds.
"""

from __future__ import annotations

from micro import Peer, best_ns, cli, proxied_request, proxy_gateway

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


async def measure(fmt, rounds: int, n: int) -> tuple[float, int, int]:
    log: dict = {"destination": "file", "path": "/dev/null"}
    if fmt is not None:
        log["format"] = fmt
    async with proxy_gateway(access_log=log) as gw:
        ctx = gw._context
        assert ctx is not None
        req = proxied_request(gw)
        proto = Peer()
        access_log = ctx.access_log
        empty = lambda r, p: None  # noqa: E731
        base = best_ns(lambda: empty(req, proto), n, rounds)
        ns = best_ns(lambda: access_log.record(req, proto), n, rounds) - base
        access_log.flush(wait=10.0)
        return ns, access_log.dropped, access_log.lines


async def main(rounds: int, n: int) -> None:
    for name, fmt in FORMATS.items():
        ns, dropped, lines = await measure(fmt, rounds, n)
        print(f"{name:9s} {ns:6.0f} ns per line  ({dropped} of {lines} lines dropped by the writer)")


if __name__ == "__main__":
    cli(__doc__, main, 200_000)
