"""The dashboard at `GET /` of the admin listener, in a real headless browser.

Debian's `chromium` (installed by `scripts/test`, like prometheus), driven over the
DevTools protocol on a pipe (`headless_chromium`); the browser test skips, saying why,
only when chromium is missing. Through `edgeplane serve` with 2 workers, under live load
(real upstreams over loopback, 4xx and 5xx among the answers, WebSockets held open), it
signs in as a person would, checks that the charts draw and that the numbers shown are
what `/stats` says, that a rotated token brings the sign-in form back, and that a gateway
that is gone makes the page say it is stale. It also takes the screenshot kept as
`docs/dashboard.png` (`EDGEPLANE_DASHBOARD_SCREENSHOT=docs/dashboard.png` writes it there).

The other test needs no browser: `/` is never anonymous, and the admin API answers what
the page reads (`/routes` policies, `/upstreams` health, `/stats` refusals and hash).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import re
import socket
import time

import pytest
from test_processes import _start_serve, _stop

from conftest import RawClient, base_config
from headless_chromium import Chromium
from ws_peers import WsClient, WsUpstream

pytestmark = pytest.mark.timeout(90)

TOKEN = "dashboard-admin-token-0123456789abcdef"
ISSUER = "https://auth.dashboard.test/"
HS_SECRET = b"dashboard-hs256-secret-0123456789abcdef"
SCREENSHOT = os.environ.get("EDGEPLANE_DASHBOARD_SCREENSHOT")  # also write the PNG there (the docs' copy)


def _jwt() -> str:
    def part(obj: dict | bytes) -> str:
        raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    claims = {"iss": ISSUER, "aud": "dash", "sub": "u1", "exp": int(time.time()) + 600}
    signing = f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}"
    return f"{signing}.{part(hmac.new(HS_SECRET, signing.encode(), hashlib.sha256).digest())}"


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed: connections are refused


def config(tmp_path, demo_port: int, ws_port: int, **extra) -> dict:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    (tmp_path / "admin.token").chmod(0o600)
    (tmp_path / "hs.secret").write_bytes(HS_SECRET)
    cfg = base_config(demo_port, routes=[
        {"route": "GET /users/{id}", "integration": {"type": "http", "upstream": "demo"},
         "cors": {"allow_origins": ["https://app.example.com"]}},
        {"route": "GET /ping", "throttle": {"rate": 20, "burst": 5},
         "integration": {"type": "mock", "status": 200, "body": {"pong": True}}},
        {"route": "GET /me", "auth": "users", "integration": {"type": "mock", "body": {"me": True}}},
        {"route": "GET /teapot", "integration": {"type": "mock", "status": 418, "body": {}}},
        {"route": "GET /orders/{id}", "integration": {"type": "http", "upstream": "orders"}},
        {"route": "GET /chat", "integration": {"type": "http", "upstream": "chat"}},
    ], **extra)
    cfg["upstreams"]["orders"] = {"targets": [f"http://127.0.0.1:{demo_port}", f"http://127.0.0.1:{_dead_port()}"]}
    cfg["upstreams"]["chat"] = {"targets": [f"http://127.0.0.1:{ws_port}"]}
    cfg["authorizers"] = {"users": {"type": "jwt", "issuer": ISSUER, "audience": ["dash"], "algorithms": ["HS256"],
                                    "hs_secret": {"file": str(tmp_path / "hs.secret")}}}
    cfg["admin"] = {"listen": "127.0.0.1:0", "auth": {"token_file": str(tmp_path / "admin.token")}}
    return cfg


async def get(addr, path: str, token: str | None = TOKEN, method: str = "GET"):
    c = await RawClient.connect(addr)
    try:
        return await c.request(method, path, headers={"authorization": f"Bearer {token}"} if token else None)
    finally:
        await c.close()


async def load(addr, stop: asyncio.Event) -> None:
    """Requests over loopback until `stop`: 2xx, 401 (no token), 418, 429 (throttled),
    502 (the dead target of `orders`), 404s of the upstream; a new connection every 12
    requests, so both workers take a share."""
    bearer = {"authorization": f"Bearer {_jwt()}"}
    mix = [("/users/7", None), ("/users/8", None), ("/ping", None), ("/me", None), ("/me", bearer),
           ("/teapot", None), ("/orders/1", None), ("/users/7", None)]
    while not stop.is_set():
        c = await RawClient.connect(addr)
        try:
            for path, headers in random.choices(mix, k=12):
                await c.request("GET", path, headers=headers)
                await asyncio.sleep(0.01)
        except (ConnectionError, OSError, TimeoutError):
            pass  # a response that closed the connection: the next round opens another
        finally:
            await c.close()


async def test_the_dashboard_is_never_anonymous_and_reads_what_the_admin_api_says(upstream, gateway, tmp_path):
    ws_up = await WsUpstream("echo").start()
    try:
        gw = await gateway(config(tmp_path, upstream.port, ws_up.port))
        admin = gw.admin_address
        r = await get(admin, "/", token=None)  # a browser's plain navigation: the sign-in page
        assert r.status == 401
        assert r.header("www-authenticate") == 'Bearer realm="edgeplane-admin"'
        assert r.header("content-type") == "text/html; charset=utf-8"
        assert b'<form id="signin"' in r.body and b"data-stat" not in r.body  # nothing of the dashboard
        wrong = await get(admin, "/", token="not-the-token-0123456789")
        assert wrong.status == 401 and 'error="invalid_token"' in wrong.header("www-authenticate")
        assert b'<form id="signin"' in wrong.body

        page = await get(admin, "/")
        assert page.status == 200 and page.header("content-type") == "text/html; charset=utf-8"
        assert b'id="chart-rate"' in page.body
        csp = page.header("content-security-policy")
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp
        assert csp.count("'sha256-") == 4  # the two pages' scripts and styles, nothing else runs
        assert page.header("cache-control") == "no-store" and page.header("x-frame-options") == "DENY"
        # No external assets: every src/href is inline data, nothing else is loaded.
        assert re.findall(rb'(?:src|href)="(?!data:)[^"]*"', page.body) == []

        c = await RawClient.connect(gw.addresses[0])
        try:
            for _ in range(2):
                assert (await c.request("GET", "/me")).status == 401
            assert (await c.request("GET", "/me", headers={"authorization": f"Bearer {_jwt()}"})).status == 200
            answers = [(await c.request("GET", "/ping")).status for _ in range(8)]
            assert 429 in answers
        finally:
            await c.close()

        stats = (await get(admin, "/stats")).json()
        assert stats["refused"]["authorizer"] == {"users": 2}
        assert stats["refused"]["throttle"]["route"] == answers.count(429)
        metrics = (await get(admin, "/metrics")).body.decode()
        assert 'edgeplane_authorizer_decisions_total{authorizer="users",outcome="denied"} 2.0' in metrics
        assert f'edgeplane_config_info{{hash="{stats["config_hash"]}"}} 1.0' in metrics

        routes = {r["route"]: r for r in (await get(admin, "/routes")).json()["routes"]}
        assert routes["GET /me"]["auth"] == {"name": "users", "type": "jwt", "scopes": []}
        assert routes["GET /me"]["policies"] == ["jwt"]
        assert routes["GET /ping"]["throttle"] == [{"level": "route", "rate": 20.0, "burst": 5, "headers": True,
                                                    "key": None, "unresolved": "shared"}]
        users = routes["GET /users/{id}"]
        assert users["cors"]["allow_origins"] == ["https://app.example.com"] and users["cors"]["source"] == "route"
        assert users["upstream"] == "demo"
        assert routes["GET /teapot"]["cors"] is None and routes["GET /teapot"]["upstream"] is None

        answer = (await get(admin, "/upstreams")).json()
        assert answer["pid"] == os.getpid()
        targets = {t["target"]: t for u in answer["upstreams"] for t in u["targets"]}
        assert {t["health"] for t in targets.values()} == {"up"}  # nothing failed to connect yet
        assert all(t["max_connections"] == 1024 for t in targets.values())

        anonymous = base_config(upstream.port)  # insecure: true, on purpose
        open_gw = await gateway(anonymous)
        assert (await get(open_gw.admin_address, "/", token=None)).status == 200
    finally:
        await ws_up.stop()


SHOWN = """JSON.stringify(Object.fromEntries([...document.querySelectorAll('[data-stat]')]
                                         .map((e) => [e.dataset.stat, e.dataset.value ?? null])))"""


def expected(stats: dict) -> dict[str, str]:
    """What the page must show (its data-value attributes) for this `/stats` answer."""
    refused = stats.get("refused", {})
    last = stats["reloads"]["last"]
    return {"requests_total": str(stats["requests_total"]), "connections_total": str(stats["connections_total"]),
            "connections_open": str(stats["connections_open"]), "websockets_open": str(stats["websockets_open"]),
            "throttled": str(sum(refused.get("throttle", {}).values())),
            "authorizer_refusals": str(sum(refused.get("authorizer", {}).values())),
            "workers": str(stats["workers"]), "config_hash": stats["config_hash"],
            "last_reload": json.dumps(last["at"]) if last else ""}


async def test_the_dashboard_in_a_browser_under_live_load(upstream, tmp_path):
    browser = Chromium(tmp_path)  # skips, saying why, without chromium
    ws_up = await WsUpstream("echo").start()
    proc = drain = None
    stop = asyncio.Event()
    loads: list[asyncio.Task] = []
    sockets: list[WsClient] = []
    try:
        proc, addr, admin, lines, drain = await _start_serve(
            tmp_path, config(tmp_path, upstream.port, ws_up.port, workers=2, drain_timeout="1s"))
        for _ in range(3):
            sockets.append(await WsClient.connect(addr, "/chat"))
            assert sockets[-1].status == 101
        loads = [asyncio.create_task(load(addr, stop)) for _ in range(3)]
        page = await asyncio.to_thread(browser.page)

        async def js(expression: str):
            return await asyncio.to_thread(page.evaluate, expression)

        async def until(expression: str, timeout: float = 20.0):
            return await asyncio.to_thread(page.wait_for, expression, timeout)

        async def polls() -> int:
            return int(await js("document.body.dataset.polls"))

        async def next_polls(n: int) -> None:
            await until(f"Number(document.body.dataset.polls) >= {await polls() + n}")

        # A person opens the admin address: the sign-in page (401), then types the token.
        await asyncio.to_thread(page.navigate, f"http://{admin[0]}:{admin[1]}/")
        assert await js("performance.getEntriesByType('navigation')[0].responseStatus") == 401
        assert await js("document.title") == "edgeplane · sign in"
        await js(f"document.getElementById('token').value = {json.dumps(TOKEN)};"
                 "document.getElementById('signin').requestSubmit(); true")
        await until("Number(document.body.dataset.polls) >= 5", 30)

        # The charts draw: every series has points, the rate is live.
        drawn = json.loads(await js("""JSON.stringify(Object.fromEntries(
            [...document.querySelectorAll('svg.chart path.series')].map((p) => [p.closest('svg').id + ' ' +
             p.classList[1], [Number(p.dataset.points), p.getAttribute('d').split('L').length]])))"""))
        assert set(drawn) == {"chart-rate rate", "chart-latency p50", "chart-latency p99",
                              "chart-errors e4", "chart-errors e5"}
        assert all(points >= 3 and segments == points for points, segments in drawn.values()), drawn
        assert float(await js("document.querySelector('[data-live=rate]').textContent")) > 0
        rows = json.loads(await js("""JSON.stringify([...document.querySelectorAll('#routes tbody tr')].map((tr) =>
            [tr.dataset.route, [...tr.cells].map((td) => td.textContent.trim()),
             Number(tr.querySelector('svg.spark path').dataset.points)]))"""))
        api_routes = (await get(admin, "/routes")).json()["routes"]
        assert [r[0] for r in rows] == [r["route"] for r in api_routes]  # every route, in match order
        cells = {r[0]: r[1] for r in rows}
        assert cells["GET /me"][2].startswith("users · jwt")
        assert cells["GET /ping"][3] == "route 20/s, burst 5"
        assert cells["GET /users/{id}"][4] == "https://app.example.com"
        assert cells["GET /orders/{id}"][1] == "http → orders"
        assert all(sparkline >= 3 for _, _, sparkline in rows), rows
        targets = json.loads(await js("""JSON.stringify([...document.querySelectorAll('#upstreams tbody tr')]
            .map((tr) => [tr.dataset.target, tr.querySelector('.health').className]))"""))
        assert len(targets) == 4 and all(cls.split()[1] in ("up", "down", "failing") for _, cls in targets), targets

        # Under load, the requests shown lie between two /stats read around the poll that
        # showed them. Each worker adds the other's counts as of its last second, so the
        # poll starts more than a second after the first read (the second poll to end
        # after the pause started after it), and the second read comes 2.5 s later.
        before = (await get(admin, "/stats")).json()
        await asyncio.sleep(1.0)
        await next_polls(2)
        shown = json.loads(await js(SHOWN))
        await asyncio.sleep(2.5)
        after = (await get(admin, "/stats")).json()
        assert before["requests_total"] <= int(shown["requests_total"]) <= after["requests_total"]
        assert before["requests_total"] < after["requests_total"]  # the load is live

        height = await js("document.documentElement.scrollHeight")
        if SCREENSHOT:  # the docs' copy: a longer history makes fuller charts
            await until("Number(document.body.dataset.polls) >= 14", 40)
        png = await asyncio.to_thread(page.screenshot, 1400, height)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
        (tmp_path / "dashboard.png").write_bytes(png)
        if SCREENSHOT:
            with open(SCREENSHOT, "wb") as fh:
                fh.write(png)

        # The load stops: once every worker has written its counts (once a second) and the
        # page has polled since, it shows exactly what /stats says.
        stop.set()
        await asyncio.gather(*loads)
        await asyncio.sleep(1.5)
        await next_polls(2)
        stats = (await get(admin, "/stats")).json()
        shown = json.loads(await js(SHOWN))
        again = (await get(admin, "/stats")).json()
        assert expected(stats) == expected(again)  # nothing moves any more
        assert shown == expected(stats)
        assert shown["websockets_open"] == "3" and shown["workers"] == "2"
        assert int(shown["throttled"]) > 0 and int(shown["authorizer_refusals"]) > 0

        # A reload rotates the token: the next poll is refused and the page asks for the new one.
        (tmp_path / "admin.token").write_text("rotated-admin-token-0123456789abcdef\n")
        assert (await get(admin, "/config/reload", method="POST")).status == 200
        await until("document.getElementById('signin').open", 15)
        assert await js("document.getElementById('live').textContent") == "token required"
        n = await polls()
        await js("document.getElementById('signin-token').value = 'rotated-admin-token-0123456789abcdef';"
                 "document.getElementById('signin-form').requestSubmit(); true")
        await until(f"Number(document.body.dataset.polls) > {n} && !document.getElementById('signin').open")
        await next_polls(1)
        shown = json.loads(await js(SHOWN))
        stats = (await get(admin, "/stats", token="rotated-admin-token-0123456789abcdef")).json()
        assert stats["reloads"]["last"]["ok"] and shown["last_reload"] == expected(stats)["last_reload"]

        # The gateway goes away: the page keeps what it showed and says it is stale.
        for ws in sockets:
            await ws.aclose()
        sockets.clear()
        assert await _stop(proc, drain) == 0
        await until("document.getElementById('live').className === 'stale'", 20)
        assert (await js("document.getElementById('live').textContent")).startswith("stale: last update")
    finally:
        stop.set()
        await asyncio.gather(*loads, return_exceptions=True)
        for ws in sockets:
            await ws.aclose()
        browser.close()
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await ws_up.stop()
