"""Micro-benchmark: what the response cache costs per request, part by part (the
end-to-end figure is `run.py --scenario cache-hit` against `mock` and the peers).

Usage: .venv/bin/python benches/cache_bench.py [--rounds 5] [--n 200000]

A real `Gateway` is started with the route `GET /api/{proxy+}` cached (`cache: {ttl:
300s}`), and a real `Request` routed to it (three headers, no query) is passed to:

- key:        `KeyMaker.make(req)`: the default key (host, path, query);
- key+jwt:    the same on a route with an authorizer: the caller's identity added from
              verified claims (the same claims object each time, as the JWT cache hands
              out; the first call hashes them);
- lookup-hit: the stage's lookup of a stored entry (`MemoryStore.get`) and its freshness
              test, without writing the answer;
- miss-fill:  what a miss adds on top of proxying: the `Fill` (made, fed the upstream
              head with its Cache-Control and a 2-byte body, completed: the verdict, the
              entry built and stored, the in-flight slot freed);
- bypass:     the stage on a POST (what other methods pay on a cached ANY route).

Prints ns per call, best of --rounds.
"""

from __future__ import annotations

import time

from edgeplane.policies.cache.keys import KeyMaker
from edgeplane.policies.cache.stage import Fill
from micro import best_ns, cli, proxied_request, proxy_gateway

UPSTREAM_HEAD = [(b"content-type", b"text/plain"), (b"content-length", b"2"),
                 (b"date", b"Sat, 05 Dec 2026 00:00:00 GMT"), (b"cache-control", b"max-age=60")]


async def main(rounds: int, n: int) -> None:
    routes = [{"route": "GET /api/{proxy+}", "integration": {"type": "http", "upstream": "app"},
               "cache": {"ttl": "300s"}}]
    async with proxy_gateway(routes=routes) as gw:
        req = proxied_request(gw)
        stage = req.route.stages[-1]
        store = stage.store
        keys = stage.keys
        key = keys.make(req)
        claims = {"iss": "https://auth.test/", "sub": "user-1", "aud": "api", "scope": "read",
                  "exp": int(time.time()) + 600, "iat": int(time.time())}
        jwt_keys = KeyMaker(None, True)
        jwt_req = proxied_request(gw)
        jwt_req.claims = claims

        def fill() -> None:
            f = Fill(stage, req, key, key, None, False)
            req.cache_fill = stage.inflight[key] = f
            f.head(200, UPSTREAM_HEAD)
            f.body(b"ok")
            f.complete()

        fill()
        entry = store.get(key)
        assert entry is not None and store.stats.stored == 1

        def lookup() -> bool:
            item = store.get(keys.make(req))
            return item is not None and time.time() < item.fresh_until

        post = proxied_request(gw)
        post.method = b"POST"
        results = {
            "key": best_ns(lambda: keys.make(req), n, rounds),
            "key+jwt": best_ns(lambda: jwt_keys.make(jwt_req), n, rounds),
            "lookup-hit": best_ns(lookup, n, rounds),
            "miss-fill": best_ns(fill, n // 4, rounds),
            "bypass": best_ns(lambda: stage(None, post), n, rounds),
        }
        for name, ns in results.items():
            print(f"{name:<11} {ns:8.0f} ns")


if __name__ == "__main__":
    cli(__doc__, main, 200_000)
