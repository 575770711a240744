"""Micro-benchmark: what the public plugin layer costs per request.

Usage: .venv/bin/python benches/plugin_bench.py [--rounds 5] [--n 200000]

A real `Gateway` is started (loopback, port 0) with a do-nothing integration plugin, so
`HttpProtocol.run_chain` can be timed on its own for routes that carry:

- builtin-0:    no stage (a route with no policy)
- builtin-ip:   one built-in stage (the IP-rules stage, allowed path)
- public-1:     one do-nothing public request stage (`def stage(request): return None`)
- public-ctx:   one public request stage that writes `request.context["k"] = 1`
- public-3:     three do-nothing public request stages

and `run_response_hooks` with one do-nothing response hook over a 4-header response
(the work a proxied or local answer does once per request on such a route).

Prints ns per request, best of --rounds; the "per plugin" figure is public-1 minus
builtin-0. Routes with only built-in policies never build a view or call a hook: their
extra cost from the plugin layer is the `route.response_hooks`/`route.log_hooks` tests
in the answer path, covered by the end-to-end `benches/run.py` ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from edgeplane import Gateway
from edgeplane.http.protocol import HttpProtocol
from edgeplane.http.request import Request
from edgeplane.plugins import Integration, Phase, Policy, RouteStage
from edgeplane.plugins.hooks import run_response_hooks


class Noop(Integration):
    type = "noop"
    schema = {"additionalProperties": False, "properties": {}}

    def compile(self, route: Any, ctx: Any, upstream_headers: Any, response_headers: Any) -> Any:
        return self

    def handle(self, proto: Any, req: Any) -> None:
        return None


def _nothing(request: Any) -> None:
    return None


def _context(request: Any) -> None:
    request.context["k"] = 1


class Stages(Policy):
    name = "bench"
    phase = Phase.TRANSFORM
    route_keys = {"bench": {"type": "string"}}

    def compile(self, route: Any, ctx: Any) -> Any:
        kind = route.policies.get("bench")
        if kind == "public-1":
            return RouteStage(request=_nothing, response=lambda r: None)
        if kind == "public-ctx":
            return _context
        return None


class Stages2(Stages):
    name = "bench2"
    route_keys = {"bench2": {"type": "string"}}

    def compile(self, route: Any, ctx: Any) -> Any:
        return _nothing if route.policies.get("bench2") else None


class Stages3(Stages2):
    name = "bench3"
    route_keys = {"bench3": {"type": "string"}}

    def compile(self, route: Any, ctx: Any) -> Any:
        return _nothing if route.policies.get("bench3") else None


def _config() -> dict[str, Any]:
    noop = {"type": "noop"}
    return {
        "listen": "127.0.0.1:0", "access_log": {"destination": "off"},
        "routes": [
            {"route": "GET /builtin-0", "integration": noop},
            {"route": "GET /builtin-ip", "integration": noop, "ip_rules": {"allow": ["127.0.0.0/8"]}},
            {"route": "GET /public-1", "integration": noop, "bench": "public-1"},
            {"route": "GET /public-ctx", "integration": noop, "bench": "public-ctx"},
            {"route": "GET /public-3", "integration": noop, "bench": "public-1", "bench2": "x", "bench3": "x"},
        ],
    }


def _time(fn: Any, n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e9


async def main(n: int, rounds: int) -> None:
    gw = Gateway(_config(), plugins=[Noop(), Stages(), Stages2(), Stages3()])
    await gw.start()
    try:
        proto = HttpProtocol(gw._context)  # type: ignore[arg-type]
        proto.peer_ip = "127.0.0.1"
        routes = {r.key.split(" ")[1][1:]: r for r in gw._snapshot.routes}  # type: ignore[union-attr]
        rows = []
        for name, route in routes.items():
            req = Request(0.0)
            req.route, req.route_key, req.params = route, route.key, {}
            req.method, req.path = b"GET", b"/" + name.encode()

            def loop(count: int, req: Request = req) -> None:
                run = proto.run_chain
                for _ in range(count):
                    req.client_ip = None
                    req.context = None
                    run(req, 0)
            rows.append((name, len(route.stages), _time(loop, n, rounds)))
        req = Request(0.0)
        req.route = routes["public-1"]
        headers = [("content-type", "application/json"), ("x-a", "1"), ("x-b", "2"), ("etag", "x")]

        def hooks(count: int) -> None:
            for _ in range(count):
                run_response_hooks(proto, req, 200, headers)
        hook_ns = _time(hooks, n, rounds)
    finally:
        await gw.stop()
    print(f"{'route':<12} {'stages':>6} {'ns/request':>11}")
    for name, stages, ns in rows:
        print(f"{name:<12} {stages:>6} {ns:>11.0f}")
    base = rows[0][2]
    public = dict((r[0], r[2]) for r in rows)
    print(f"one do-nothing public request stage: {public['public-1'] - base:.0f} ns per request")
    print(f"three: {(public['public-3'] - base) / 3:.0f} ns per stage")
    print(f"one do-nothing response hook over a 4-header head: {hook_ns:.0f} ns per response")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best is reported")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.rounds))
