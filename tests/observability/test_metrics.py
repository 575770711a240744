"""`GET /metrics`: Prometheus series through a real gateway, parsed with prometheus_client.

In process (one worker) and through `edgeplane serve` with 2 workers: the values are
checked against the requests sent, and a worker killed with SIGKILL must not make a
counter go down.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from test_processes import _start_serve, _stop

from conftest import RawClient, base_config
from jwks_peer import EmptyJwks

pytestmark = pytest.mark.timeout(90)


async def scrape(admin, accept: str | None = None) -> tuple[str, dict[str, list]]:
    c = await RawClient.connect(admin)
    try:
        r = await c.request("GET", "/metrics", headers={"accept": accept} if accept else None)
    finally:
        await c.close()
    assert r.status == 200, r.body
    text = r.body.decode()
    parse = parse_openmetrics if accept and "openmetrics" in accept else text_string_to_metric_families
    return r.header("content-type") or "", {f.name: f.samples for f in parse(text)}


def value(families, sample: str, **labels) -> float:
    name = sample
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in families:
            name = sample[: -len(suffix)]
    found = [s.value for s in families.get(name, []) if s.name == sample
             and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(found)


async def send(addr, path: str, n: int, method: str = "GET") -> None:
    for _ in range(n):  # a new connection each: with workers, both take a share
        c = await RawClient.connect(addr)
        try:
            await c.request(method, path)
        finally:
            await c.close()


def routes(upstream_port: int | None) -> list[dict]:
    return [
        {"route": "GET /users/{id}", "integration": {"type": "http", "upstream": "demo"}},
        {"route": "ANY /mock", "integration": {"type": "mock", "status": 201, "body": {"ok": True}}},
        {"route": "GET /teapot", "integration": {"type": "mock", "status": 418, "body": {}}},
    ]


async def test_one_gateway_counts_requests_by_route_method_and_status(upstream, gateway):
    gw = await gateway(base_config(upstream.port, routes=routes(upstream.port)))
    addr, admin = gw.addresses[0], gw.admin_address
    await send(addr, "/users/1", 5)
    await send(addr, "/mock", 3, method="POST")
    await send(addr, "/mock", 2, method="DELETE")
    await send(addr, "/teapot", 4)
    await send(addr, "/nowhere", 2)
    content_type, fam = await scrape(admin)
    assert content_type.startswith("text/plain; version=0.0.4")
    req = "edgeplane_requests_total"
    assert value(fam, req, route="GET /users/{id}", method="GET", status="2xx") == 5
    assert value(fam, req, route="ANY /mock", method="POST", status="2xx") == 3
    assert value(fam, req, route="ANY /mock", method="DELETE", status="2xx") == 2
    assert value(fam, req, route="GET /teapot", status="418") == 4  # 4xx: the exact code
    assert value(fam, req, route="$unmatched", status="404") == 2
    assert value(fam, req) == 16  # and nothing else: the scrape itself is not a data request
    # histograms: every request in exactly one bucket; the integration only for the proxy
    dur = "edgeplane_request_duration_seconds"
    assert value(fam, dur + "_count", route="GET /users/{id}") == 5
    assert value(fam, dur + "_bucket", route="GET /users/{id}", le="+Inf") == 5
    assert value(fam, dur + "_sum", route="GET /users/{id}") > 0
    assert value(fam, "edgeplane_integration_duration_seconds_count", route="GET /users/{id}") == 5
    assert value(fam, "edgeplane_integration_duration_seconds_count", route="ANY /mock") == 0
    assert value(fam, "edgeplane_response_bytes_total", route="ANY /mock") == 5 * len(b'{"ok":true}')
    # the pool: one target, five requests, connections kept alive and reused
    target = f"http://127.0.0.1:{upstream.port}"
    assert value(fam, "edgeplane_upstream_requests_total", upstream="demo", target=target) == 5
    assert value(fam, "edgeplane_upstream_connections_opened_total", upstream="demo", target=target) >= 1
    assert value(fam, "edgeplane_upstream_connections_reused_total", upstream="demo", target=target) >= 1
    assert value(fam, "edgeplane_build_info", version=__import__("edgeplane").__version__) == 1
    assert len(fam["edgeplane_config_info"]) == 1
    # OpenMetrics when asked, parsed by the OpenMetrics parser (which checks # EOF etc.)
    content_type, om = await scrape(admin, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert value(om, req, route="GET /teapot", status="418") == 4


async def test_a_reload_keeps_the_counts_of_a_route_that_stays(upstream, gateway):
    gw = await gateway(base_config(upstream.port, routes=routes(upstream.port)))
    await send(gw.addresses[0], "/mock", 3)
    await gw.reload(base_config(upstream.port, routes=[*routes(upstream.port),
                                                       {"route": "GET /new", "integration": {"type": "mock"}}]))
    await send(gw.addresses[0], "/mock", 2)
    await send(gw.addresses[0], "/new", 1)
    _, fam = await scrape(gw.admin_address)
    assert value(fam, "edgeplane_requests_total", route="ANY /mock") == 5
    assert value(fam, "edgeplane_requests_total", route="GET /new") == 1
    assert value(fam, "edgeplane_reloads_total", result="success") == 1


async def test_two_workers_are_one_view_and_a_killed_worker_takes_nothing_away(upstream, tmp_path):
    cfg = base_config(upstream.port, routes=routes(upstream.port), workers=2)
    proc, addr, admin, lines, drain = await _start_serve(tmp_path, cfg)
    try:
        await send(addr, "/users/7", 40)
        await send(addr, "/teapot", 10)
        await asyncio.sleep(1.3)  # every worker has written its counts (once a second)
        for _ in range(6):  # whichever worker answers, it shows both
            _, fam = await scrape(admin)
            assert value(fam, "edgeplane_requests_total", route="GET /users/{id}", status="2xx") == 40
            assert value(fam, "edgeplane_requests_total", route="GET /teapot", status="418") == 10
            assert value(fam, "edgeplane_request_duration_seconds_count") == 50
        pids = set()
        for _ in range(20):
            c = await RawClient.connect(admin)
            try:
                pids.add((await c.request("GET", "/healthz")).json()["pid"])
            finally:
                await c.close()
        assert len(pids) == 2
        os.kill(min(pids), signal.SIGKILL)
        await asyncio.sleep(2.5)  # restarted, with its predecessor's counts as its base
        await send(addr, "/users/7", 10)
        await asyncio.sleep(1.3)
        for _ in range(6):
            _, fam = await scrape(admin)
            assert value(fam, "edgeplane_requests_total", route="GET /users/{id}", status="2xx") == 50
        await _stop(proc, drain)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_stats_is_one_view_of_every_worker_with_a_breakdown(upstream, tmp_path):
    from test_processes import _get_json

    cfg = base_config(upstream.port, routes=routes(upstream.port), workers=2)
    proc, addr, admin, lines, drain = await _start_serve(tmp_path, cfg)
    try:
        await send(addr, "/teapot", 12)
        await asyncio.sleep(1.3)
        for _ in range(4):
            _, merged = await _get_json(admin, "/stats")
            assert merged["workers"] == 2 and len(merged["pids"]) == 2 and merged["pid"] in merged["pids"]
            assert merged["requests_total"] == 12  # both workers' shares, whichever answers
        _, detailed = await _get_json(admin, "/stats?per_worker=1")
        per = detailed["per_worker"]
        assert sorted(w["pid"] for w in per) == detailed["pids"]
        assert sum(w["requests_total"] for w in per) == detailed["requests_total"]
        await _stop(proc, drain)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_jwks_fetches_survive_a_reload_that_replaces_the_source(upstream, gateway):
    """A changed authorizer gets a new JWKS source whose own count starts at 0; the
    series goes on from where the old one was."""
    server = await EmptyJwks().start()
    url = server.url

    def cfg(audience: str) -> dict:
        c = base_config(upstream.port, routes=[{"route": "GET /me", "auth": "users",
                                                "integration": {"type": "mock"}}])
        c["authorizers"] = {"users": {"type": "jwt", "issuer": "https://auth.test/", "audience": [audience],
                                      "algorithms": ["RS256"], "jwks": {"url": url}}}
        return c

    try:
        gw = await gateway(cfg("api"))
        _, fam = await scrape(gw.admin_address)
        assert value(fam, "edgeplane_jwks_fetches_total", authorizer="users") == 1
        # an empty key set counts as a failed fetch: the series says what /stats says
        failures = gw.stats()["authorizers"]["users"]["failures"]
        assert value(fam, "edgeplane_jwks_fetch_failures_total", authorizer="users") == failures == 1
        await gw.reload(cfg("api-v2"))  # a new source, which fetches once more
        _, fam = await scrape(gw.admin_address)
        assert value(fam, "edgeplane_jwks_fetches_total", authorizer="users") == 2
    finally:
        server.close()


async def test_proxied_websocket_messages_and_close_codes(gateway):
    from ws_peers import WsClient, WsUpstream

    up = await WsUpstream("echo").start()
    try:
        gw = await gateway(base_config(up.port, routes=[{"route": "GET /ws", "integration": {"type": "http",
                                                                                             "upstream": "demo"}}]))
        ws = await WsClient.connect(gw.addresses[0], "/ws")
        for i in range(3):
            ws.send_text(f"m{i}")
            assert await ws.recv() == f"m{i}"
        _, fam = await scrape(gw.admin_address)
        assert value(fam, "edgeplane_websockets_open", kind="proxied") == 1
        assert value(fam, "edgeplane_websockets_open", kind="api") == 0
        ws.close(1000)  # a close frame: the code is the client's
        for _ in range(50):  # the relay counts when it has closed both legs
            _, fam = await scrape(gw.admin_address)
            if value(fam, "edgeplane_websocket_closes_total", kind="proxied"):
                break
            await asyncio.sleep(0.05)
        assert value(fam, "edgeplane_websocket_messages_total", kind="proxied", direction="received") == 3
        assert value(fam, "edgeplane_websocket_messages_total", kind="proxied", direction="sent") == 3
        assert value(fam, "edgeplane_websocket_closes_total", kind="proxied", code="1000") == 1
        await ws.aclose()
    finally:
        await up.stop()
