"""Upstream resilience through real gateways and real misbehaving upstreams: a dead
target (nothing listens), targets answering 503, slow targets. Outlier detection ejects
and returns endpoints, the panic threshold, retries landing on another endpoint within
their budget, and the `least_request` and `random` policies. Counted at the upstreams."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from conftest import RawClient, base_config

pytestmark = pytest.mark.timeout(60)


class StatusUpstream:
    """An HTTP/1.1 upstream answering every request with `status` (after `delay` s),
    keep-alive, counting what it received."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.status, self.delay, self.requests, self.port = status, delay, 0, 0
        self.health, self.checks = 200, 0  # what GET /healthz answers, and how often it was asked
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> StatusUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                if head.startswith(b"GET /healthz "):
                    self.checks += 1
                    writer.write(b"HTTP/1.1 %d X\r\ncontent-length: 0\r\n\r\n" % self.health)
                    continue
                self.requests += 1
                if self.delay:
                    await asyncio.sleep(self.delay)
                body = json.dumps({"port": self.port}).encode()
                writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                             % (self.status, len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then closed: connects are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def config(ports: list[int], **upstream: object) -> dict:
    cfg = base_config(routes=[{"route": "ANY /api/{proxy+}", "integration": {"type": "http", "upstream": "app"}}])
    cfg["upstreams"] = {"app": {"targets": [f"http://127.0.0.1:{p}" for p in ports], **upstream}}
    return cfg


async def statuses(addr, n: int, method: str = "GET", concurrency: int = 1) -> list[int]:
    out: list[int] = []

    async def one_client(k: int) -> None:
        c = await RawClient.connect(addr)
        try:
            for _ in range(k):
                out.append((await c.request(method, "/api/x", body=b"{}" if method == "POST" else b"")).status)
        finally:
            await c.close()

    await asyncio.gather(*(one_client(n // concurrency) for _ in range(concurrency)))
    return out


async def telemetry(gw) -> dict:
    r = await RawClient.once(gw.admin_address, "GET", "/upstreams")
    return {u["name"]: u for u in json.loads(r.body)["upstreams"]}["app"]


async def test_a_dead_target_of_three_costs_no_client_a_502_with_retries_and_ejection(gateway):
    async with StatusUpstream() as a, StatusUpstream() as b:
        dead = dead_port()
        gw = await gateway(config([a.port, dead, b.port],
                                  outlier_detection={"consecutive_connect_failures": 1, "base_ejection_time": "30s"},
                                  retries={"retry_on": ["connect-failure"], "attempts": 2}))
        # 30 clients at once: several find the dead target before the first refused connect
        # ejects it; each goes again (a connect-failure retry is outside the retry budget)
        assert await statuses(gw.addresses[0], 300, concurrency=30) == [200] * 300
        assert a.requests + b.requests == 300
        app = await telemetry(gw)
        dead_target = app["targets"][1]
        assert dead_target["health"] == "ejected" and dead_target["outlier"]["ejections"] == 1
        assert app["retries"]["total"] >= 1 and app["retries"]["refused_by_budget"] == 0


async def test_without_retries_502s_stop_once_the_dead_target_is_ejected(gateway):
    async with StatusUpstream() as a, StatusUpstream() as b:
        gw = await gateway(config([a.port, dead_port(), b.port],
                                  outlier_detection={"consecutive_connect_failures": 2}))
        got = await statuses(gw.addresses[0], 300)
        # a refused connect skips the target for a second (as before) and ejects it at
        # the second one: the clients see at most that many 502s, all early
        assert got.count(502) <= 2 and 502 not in got[10:], got[:12]


async def test_a_503_is_retried_on_another_endpoint_and_the_attempts_are_logged(gateway, tmp_path):
    async with StatusUpstream(503) as bad, StatusUpstream() as good:
        cfg = config([bad.port, good.port], retries={"retry_on": [503], "attempts": 2,
                                                     "backoff": {"base": "1ms", "max": "5ms"}})
        cfg["access_log"] = {"destination": "file", "path": str(tmp_path / "a.log"),
                             "format": "$context.status $context.integration.attempts $context.httpMethod"}
        gw = await gateway(cfg)
        assert await statuses(gw.addresses[0], 20) == [200] * 20
        assert bad.requests == 10 and good.requests == 20  # every other first try hit the bad one
        # not idempotent: a POST is not sent twice, and its 503 reaches the client
        posted = await statuses(gw.addresses[0], 4, "POST")
        assert sorted(posted) == [200, 200, 503, 503]
        gw._access_log.flush(wait=2.0)
        lines = (tmp_path / "a.log").read_text().splitlines()
        assert lines.count("200 2 GET") == 10 and lines.count("200 1 GET") == 10
        assert lines.count("503 1 POST") == 2


async def test_an_ejected_endpoint_returns_after_its_ejection_time(gateway):
    async with StatusUpstream(503) as flaky, StatusUpstream() as good:
        gw = await gateway(config([flaky.port, good.port],
                                  outlier_detection={"consecutive_5xx": 2, "base_ejection_time": "500ms"}))
        await statuses(gw.addresses[0], 4)  # two 503s from it, in turn
        assert flaky.requests == 2 and (await telemetry(gw))["targets"][0]["health"] == "ejected"
        await statuses(gw.addresses[0], 10)
        assert flaky.requests == 2  # out: everything to the other
        flaky.status = 200
        await asyncio.sleep(0.6)
        await statuses(gw.addresses[0], 10)
        assert flaky.requests == 7  # back in the rotation
        assert (await telemetry(gw))["targets"][0]["health"] == "up"


async def test_the_panic_threshold_uses_every_endpoint_when_too_few_are_healthy(gateway):
    async with StatusUpstream(503) as x, StatusUpstream(503) as y, StatusUpstream() as z:
        gw = await gateway(config([x.port, y.port, z.port], panic_threshold=50,
                                  outlier_detection={"consecutive_5xx": 1, "max_ejection_percent": 100,
                                                     "base_ejection_time": "30s"}))
        await statuses(gw.addresses[0], 3)  # x and y each answer one 503: both ejected
        before = (x.requests, y.requests)
        await statuses(gw.addresses[0], 30)
        # one healthy of three (33 % < 50 %): panic, all three share the load
        assert x.requests > before[0] and y.requests > before[1] and z.requests > 10


async def test_the_retry_budget_stops_a_retry_storm(gateway):
    async with StatusUpstream(503) as bad, StatusUpstream(503) as worse:
        gw = await gateway(config([bad.port, worse.port],
                                  retries={"retry_on": [503], "attempts": 3, "budget": 0.0,
                                           "min_retry_concurrency": 1, "backoff": {"base": "20ms", "max": "20ms"}}))
        got = await statuses(gw.addresses[0], 40, concurrency=8)
        assert got.count(503) == 40
        app = await telemetry(gw)
        # at most one retry in flight at a time: most failures were not retried
        assert app["retries"]["refused_by_budget"] > 0 and app["retries"]["active"] == 0
        assert bad.requests + worse.requests == 40 + app["retries"]["total"]


async def test_least_request_sends_less_to_a_slow_endpoint(gateway):
    async with StatusUpstream(delay=0.05) as slow, StatusUpstream() as fast:
        gw = await gateway(config([slow.port, fast.port], lb={"policy": "least_request"}))
        assert await statuses(gw.addresses[0], 200, concurrency=10) == [200] * 200
        assert slow.requests < fast.requests / 3, (slow.requests, fast.requests)


async def test_random_spreads_over_every_endpoint(gateway):
    async with StatusUpstream() as a, StatusUpstream() as b, StatusUpstream() as c:
        gw = await gateway(config([a.port, b.port, c.port], lb={"policy": "random"}))
        await statuses(gw.addresses[0], 600)
        # each within 5 standard deviations of 200 (binomial, p = 1/3)
        assert all(abs(u.requests - 200) < 5 * (600 * (1 / 3) * (2 / 3)) ** 0.5 for u in (a, b, c))


async def test_health_and_retries_are_in_the_metrics(gateway):
    from prometheus_client.parser import text_string_to_metric_families

    async with StatusUpstream() as a:
        dead = dead_port()
        gw = await gateway(config([a.port, dead], outlier_detection={"consecutive_connect_failures": 1},
                                  retries={"retry_on": ["connect-failure"]}))
        assert await statuses(gw.addresses[0], 10) == [200] * 10
        text = (await RawClient.once(gw.admin_address, "GET", "/metrics")).body.decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        dead_labels = (("target", f"http://127.0.0.1:{dead}"), ("upstream", "app"))
        live_labels = (("target", f"http://127.0.0.1:{a.port}"), ("upstream", "app"))
        assert samples[("edgeplane_upstream_endpoint_healthy", dead_labels)] == 0
        assert samples[("edgeplane_upstream_endpoint_healthy", live_labels)] == 1
        assert samples[("edgeplane_upstream_ejections_total", dead_labels)] == 1
        assert samples[("edgeplane_upstream_retries_total", (("upstream", "app"),))] == 1


async def test_active_health_checks_take_a_failing_target_out_and_back(gateway):
    async with StatusUpstream() as sick, StatusUpstream() as well:
        gw = await gateway(config([sick.port, well.port], health_check={
            "path": "/healthz", "interval": "50ms", "timeout": "40ms", "healthy": 2, "unhealthy": 2}))
        sick.health = 503
        for _ in range(100):  # two failed checks, 50 ms apart
            if (await telemetry(gw))["targets"][0]["health"] == "unhealthy":
                break
            await asyncio.sleep(0.02)
        before = sick.requests
        assert await statuses(gw.addresses[0], 20) == [200] * 20
        assert sick.requests == before and well.requests >= 20  # no request to the unhealthy one
        sick.health = 200
        for _ in range(100):
            if (await telemetry(gw))["targets"][0]["health"] == "up":
                break
            await asyncio.sleep(0.02)
        await statuses(gw.addresses[0], 20)
        assert sick.requests >= before + 9  # back in the rotation
        assert sick.checks >= 4


async def test_a_circuit_breaker_answers_503_at_once_past_its_limit(gateway):
    async with StatusUpstream(delay=0.3) as slow:
        gw = await gateway(config([slow.port], circuit_breaker={"max_requests": 2}))
        got = await asyncio.gather(*(RawClient.once(gw.addresses[0], "GET", "/api/x") for _ in range(6)))
        assert sorted(r.status for r in got) == [200, 200, 503, 503, 503, 503]
        assert {r.body for r in got if r.status == 503} == {b'{"message":"Service Unavailable"}'}
        assert slow.requests == 2  # refused, not queued: they never reached the upstream
        assert (await telemetry(gw))["circuit_breaker_open"] == {"max_requests": 4}


@pytest.mark.parametrize("kind", ["ring_hash", "maglev"])
def test_consistent_hashing_moves_only_the_keys_of_an_endpoint_that_leaves(kind):
    from edgeplane.upstream.hashing import HashRing, Maglev, hash64

    names = [f"http://10.0.0.{i}:80" for i in range(5)]
    table = (HashRing if kind == "ring_hash" else Maglev)(names, [1] * 5)
    keys = [hash64(f"user-{k}".encode()) for k in range(10_000)]
    before = [table.pick(h, lambda i: True) for h in keys]
    shares = [before.count(i) / len(keys) for i in range(5)]
    assert all(0.14 < s < 0.26 for s in shares), shares  # each near 20 %
    after = [table.pick(h, lambda i: i != 2) for h in keys]
    moved = [k for k in range(len(keys)) if before[k] != after[k]]
    assert all(before[k] == 2 for k in moved)  # only the keys of the endpoint that left
    assert len(moved) == before.count(2)  # ... and all of them: the measured share is its own, ~20 %


async def test_ring_hash_keeps_each_user_on_one_endpoint(gateway):
    async with StatusUpstream() as a, StatusUpstream() as b, StatusUpstream() as c:
        sticky = {"policy": "ring_hash", "key": "$request.header.x-user"}
        gw = await gateway(config([a.port, b.port, c.port], lb=sticky))
        seen: dict[str, set[int]] = {}
        for _ in range(3):
            for user in range(20):
                r = await RawClient.once(gw.addresses[0], "GET", "/api/x", headers={"x-user": f"u{user}"})
                seen.setdefault(f"u{user}", set()).add(json.loads(r.body)["port"])
        assert all(len(ports) == 1 for ports in seen.values())
        assert len({p for ports in seen.values() for p in ports}) == 3  # spread over all three


async def test_a_unix_socket_target(gateway, tmp_path):
    path = str(tmp_path / "app.sock")
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nunix")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_unix_server(serve, path)
    try:
        cfg = base_config(routes=[{"route": "GET /u", "integration": {"type": "http", "upstream": "local"}}])
        cfg["upstreams"] = {"local": {"targets": [f"unix:{path}"]}}
        gw = await gateway(cfg)
        c = await RawClient.connect(gw.addresses[0])
        try:
            for _ in range(2):  # the second on the pooled connection
                r = await c.request("GET", "/u")
                assert (r.status, r.body) == (200, b"unix")
        finally:
            await c.close()
        assert len(heads) == 2 and b"host: localhost\r\n" in heads[0]
        pool = gw._upstreams["local"].pools[0]
        assert (pool.opened, pool.reused, pool.name) == (1, 1, f"unix:{path}")
    finally:
        server.close()
    from edgeplane.config.loader import ConfigError, load_config

    cfg["upstreams"]["local"]["targets"] = ["unix:relative.sock"]
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert "a Unix socket target is 'unix:/absolute/path.sock'" in exc.value.errors[0]


async def test_a_routes_retries_replace_its_upstreams(gateway):
    async with StatusUpstream(503) as bad, StatusUpstream() as good:
        cfg = config([bad.port, good.port], retries={"retry_on": ["connect-failure"]})  # no 503 here ...
        cfg["routes"].append({"route": "GET /again/{proxy+}", "integration": {
            "type": "http", "upstream": "app", "retries": {"retry_on": [503], "backoff": {"base": "1ms"}}}})
        gw = await gateway(cfg)
        assert sorted(await statuses(gw.addresses[0], 4)) == [200, 200, 503, 503]  # /api: the upstream's
        c = await RawClient.connect(gw.addresses[0])
        try:  # ... but this route's policy retries a 503 on the other endpoint
            assert [(await c.request("GET", "/again/x")).status for _ in range(4)] == [200] * 4
        finally:
            await c.close()


async def test_a_per_try_timeout_moves_a_slow_answer_to_another_endpoint(gateway):
    async with StatusUpstream(delay=0.5) as slow, StatusUpstream() as fast:
        gw = await gateway(config([slow.port, fast.port],
                                  outlier_detection={"consecutive_5xx": 2, "base_ejection_time": "30s"},
                                  retries={"retry_on": [504], "per_try_timeout": "100ms",
                                           "backoff": {"base": "1ms", "max": "1ms"}}))
        assert await statuses(gw.addresses[0], 20) == [200] * 20
        app = await telemetry(gw)
        # each try that waited on the slow one went on to the fast one; after two it was ejected
        assert slow.requests == 2 and app["retries"]["total"] == 2
        assert app["targets"][0]["health"] == "ejected"
        # without 504 in retry_on, the per-try timeout answers 504 at once
        gw2 = await gateway(config([slow.port], retries={"retry_on": ["reset"], "per_try_timeout": "100ms"}))
        r = await RawClient.once(gw2.addresses[0], "GET", "/api/x")
        assert (r.status, r.body) == (504, b'{"message":"Endpoint request timed out"}')


class Recorder:
    """An upstream that records each request whole (head and de-chunked or sized body).
    `behaviour` decides per request: "ok" answers 200 echoing the body, "reset" closes
    after reading the whole request, "503-early" answers 503 before reading the body."""

    def __init__(self, behaviour: str = "ok") -> None:
        self.behaviour, self.requests, self.port = behaviour, [], 0

    async def __aenter__(self) -> Recorder:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.behaviour == "503-early":
                    self.requests.append((head.split(b"\r\n")[0], None))
                    writer.write(b"HTTP/1.1 503 X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    await writer.drain()
                    return
                lower = head.lower()
                body = b""
                if b"transfer-encoding: chunked" in lower:
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        chunk = await reader.readexactly(size + 2)
                        if size == 0:
                            break
                        body += chunk[:-2]
                elif b"content-length:" in lower:
                    length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                    body = await reader.readexactly(length)
                self.requests.append((head.split(b"\r\n")[0], body))
                if self.behaviour == "reset":
                    return
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


async def test_a_retried_chunked_body_reaches_the_next_endpoint_once_and_whole(gateway):
    """Each request's last-chunk goes once: a second one would be read as another request,
    whose answer would go to the next client on that connection."""
    async with Recorder("reset") as first, Recorder() as second:
        gw = await gateway(config([first.port, second.port], retries={"retry_on": ["reset"]}))
        for i in range(4):
            c = await RawClient.connect(gw.addresses[0])
            try:
                body = f"body-{i}".encode()
                r = await c.request("PUT", "/api/x", headers={"Transfer-Encoding": "chunked"},
                                    body=b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
                assert (r.status, r.body) == (200, body)
            finally:
                await c.close()
        assert [b for _, b in second.requests] == [f"body-{i}".encode() for i in range(4)]
        assert all(line.startswith(b"PUT /api/x ") for line, _ in second.requests)


async def test_body_bytes_that_arrive_while_a_retry_waits_are_sent_with_it(gateway):
    async with Recorder("503-early") as first, Recorder() as second:
        cfg = config([first.port, second.port], retries={"retry_on": [503], "methods": "all",
                                                         "backoff": {"base": "300ms", "max": "300ms"}})
        cfg["limits"] = {"request_buffering": 0}
        gw = await gateway(cfg)
        reader, writer = await asyncio.open_connection(*gw.addresses[0])
        writer.write(b"POST /api/x HTTP/1.1\r\nhost: gw\r\ncontent-length: 30\r\n\r\n")
        for part in (b"a" * 10, b"b" * 10, b"c" * 10):  # the first try is answered 503 meanwhile
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.2)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        body = await reader.readexactly(30)
        writer.close()
        assert head.startswith(b"HTTP/1.1 200") and body == b"a" * 10 + b"b" * 10 + b"c" * 10
        assert [b for _, b in second.requests] == [body]


async def test_a_split_keeps_each_upstreams_retry_count(gateway):
    async with StatusUpstream(503) as blue, StatusUpstream() as green:
        cfg = base_config(routes=[{"route": "GET /s", "integration": {
            "type": "http", "split": [{"upstream": "blue", "weight": 1}, {"upstream": "green", "weight": 1}]}}])
        retries = {"retry_on": [503], "attempts": 2, "backoff": {"base": "1ms", "max": "1ms"}}
        cfg["upstreams"] = {"blue": {"targets": [f"http://127.0.0.1:{blue.port}"], "retries": retries},
                            "green": {"targets": [f"http://127.0.0.1:{green.port}"], "retries": retries}}
        gw = await gateway(cfg)
        for _ in range(10):
            await RawClient.once(gw.addresses[0], "GET", "/s")
        r = await RawClient.once(gw.admin_address, "GET", "/upstreams")
        active = {u["name"]: u["retries"]["active"] for u in json.loads(r.body)["upstreams"]}
        assert active == {"blue": 0, "green": 0}


async def test_a_busy_target_is_not_marked_unhealthy(gateway):
    async with StatusUpstream(delay=0.6) as busy, StatusUpstream(delay=0.6) as other:
        gw = await gateway(config([busy.port, other.port], pool={"max_connections": 1}, health_check={
            "interval": "50ms", "timeout": "40ms", "healthy": 1, "unhealthy": 2}))
        slow = [asyncio.ensure_future(RawClient.once(gw.addresses[0], "GET", "/api/x")) for _ in range(2)]
        await asyncio.sleep(0.4)  # both targets' only connection is busy; checks go on meanwhile
        targets = (await telemetry(gw))["targets"]
        assert [t["health"] for t in targets] == ["up", "up"]
        assert all(t["active_check"]["passes"] >= 3 for t in targets)
        assert [r.status for r in await asyncio.gather(*slow)] == [200, 200]
