"""Stages through a real gateway: `/{stage}/...` and custom-domain mappings choose the
stage; stage variables choose the upstream and shape the path; the access log names the
stage; an unknown stage is 404. Counted at real upstreams."""

from __future__ import annotations

import asyncio
import json

import pytest

from authorizer_peer import AuthorizerPeer
from conftest import RawClient, base_config
from edgeplane.config.loader import ConfigError, load_config
from edgeplane.runtime.demo_upstream import DemoUpstream

pytestmark = pytest.mark.timeout(60)


def staged(dev_port: int, prod_port: int, log_path=None) -> dict:
    cfg = base_config(routes=[
        {"route": "GET /users/{id}", "integration": {"type": "http", "upstream": "${stageVariables.backend}",
                                                      "path": "/${stageVariables.version}/users/{id}"}},
        {"route": "GET /health", "integration": {"type": "mock", "body": {"ok": True}}},
        {"route": "GET /version", "integration": {"type": "mock", "body": {"version": "${stageVariables.version}"},
                                                  "headers": {"x-backend": "${stageVariables.backend}"}}},
    ])
    cfg["upstreams"] = {"users_dev": {"targets": [f"http://127.0.0.1:{dev_port}"]},
                        "users_prod": {"targets": [f"http://127.0.0.1:{prod_port}"]}}
    cfg["stages"] = {"dev": {"variables": {"backend": "users_dev", "version": "v2-beta"}},
                     "prod": {"variables": {"backend": "users_prod", "version": "v1"}, "description": "production"}}
    cfg["domains"] = {"api.example.com": {"stage": "prod", "base_path": "v1"},
                      "dev.example.com": {"stage": "dev"}}
    if log_path is not None:
        cfg["access_log"] = {"destination": "file", "path": str(log_path),
                             "format": "$context.stage $context.path $context.status"}
    return cfg


async def get(addr, path: str, host: str = "gw.test"):
    return await RawClient.once(addr, "GET", path, host=host)


async def test_stages_by_base_path_and_by_domain_with_their_variables(gateway, tmp_path):
    async with DemoUpstream() as dev, DemoUpstream() as prod:
        log_path = tmp_path / "access.log"
        gw = await gateway(staged(dev.port, prod.port, log_path))
        addr = gw.addresses[0]
        r = await get(addr, "/dev/users/7")
        assert r.status == 200 and json.loads(r.body)["path"] == "/v2-beta/users/7"
        r = await get(addr, "/prod/users/7")
        assert r.status == 200 and json.loads(r.body)["path"] == "/v1/users/7"
        assert (dev.requests, prod.requests) == (1, 1)
        # an unknown stage, and a route that exists but without its stage: 404, as AWS answers
        for path in ("/qa/users/7", "/users/7"):
            r = await get(addr, path)
            assert (r.status, r.body) == (404, b'{"message":"Not Found"}')
        # a custom domain: its stage, under its base path (stripped), and nothing outside it
        r = await get(addr, "/v1/users/8", host="api.example.com")
        assert r.status == 200 and json.loads(r.body)["path"] == "/v1/users/8" and prod.requests == 2
        assert (await get(addr, "/users/8", host="api.example.com")).status == 404
        r = await get(addr, "/users/9", host="dev.example.com:8080")
        assert r.status == 200 and dev.requests == 2
        assert (await get(addr, "/prod/health")).status == 200  # a route without variables: in every stage
        r = await get(addr, "/dev/version")
        assert json.loads(r.body) == {"version": "v2-beta"} and r.header("x-backend") == "users_dev"
        gw._access_log.flush(wait=2.0)
        assert log_path.read_text().splitlines() == [
            "dev /dev/users/7 200", "prod /prod/users/7 200", "- /qa/users/7 404",
            "- /users/7 404", "prod /v1/users/8 200", "- /users/8 404", "dev /users/9 200",
            "prod /prod/health 200", "dev /dev/version 200"]


@pytest.mark.parametrize(("change", "error"), [
    (lambda c: c["stages"]["dev"]["variables"].pop("backend"),
     "routes[0].integration.upstream: stage 'dev' has no variable 'backend' (${stageVariables.backend}; "
     "its variables: version)"),
    (lambda c: c["stages"]["prod"]["variables"].update(backend="users_qa"),
     "routes[0].integration.upstream: in stage 'prod' this names upstream 'users_qa', which is not defined"),
    (lambda c: c["domains"]["api.example.com"].update(stage="qa"),
     "domains.api.example.com.stage: unknown stage 'qa'"),
    (lambda c: c["stages"]["dev"]["variables"].update(version="has space"),
     "stages.dev.variables.version: a value is at most 512 of"),
    (lambda c: c.update(stages={"a b": {}}), "stages.a b: a stage name is 1 to 128"),
    (lambda c: c["domains"].update({"*.example.com": {"stage": "dev"}}),
     "domains.*.example.com: a domain: '*.example.com' is not a valid host name"),
    (lambda c: c["domains"].update({"API.example.com.": {"stage": "dev"}}),
     "domains.API.example.com.: the same domain as 'api.example.com'"),
    (lambda c: c["domains"]["api.example.com"].update(base_path="a/../b"),
     "domains.api.example.com.base_path: a base path is segments"),
    (lambda c: c["stages"]["prod"]["variables"].update(version=".."),
     "routes[0].integration.path: in stage 'prod' this path is '/../users/{id}': a '.' or '..' segment"),
    (lambda c: c["stages"]["dev"]["variables"].update(version="x?admin=1"),
     "routes[0].integration.path: in stage 'dev' this path is '/x?admin=1/users/{id}': a query ('?')"),
    (lambda c: c["stages"]["dev"]["variables"].update(version=""),
     "routes[0].integration.path: in stage 'dev' this path is '//users/{id}': an empty segment"),
    (lambda c: (c.pop("stages"), c.pop("domains")),
     "routes[0].integration.upstream: ${stageVariables.backend} needs `stages`"),
])
def test_stage_errors_are_located_and_name_the_stage(change, error):
    cfg = staged(1, 2)
    change(cfg)
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert any(e.startswith(error) for e in exc.value.errors), exc.value.errors


async def test_routes_lists_each_stage_and_a_reload_changes_a_variable_live(gateway):
    async with DemoUpstream() as dev, DemoUpstream() as prod:
        cfg = staged(dev.port, prod.port)
        gw = await gateway(cfg)
        c = await RawClient.connect(gw.admin_address)
        try:
            listed = json.loads((await c.request("GET", "/routes")).body)["routes"]
        finally:
            await c.close()
        assert sorted((r["stage"], r["route"], r["upstream"]) for r in listed) == [
            ("dev", "GET /health", None), ("dev", "GET /users/{id}", "users_dev"), ("dev", "GET /version", None),
            ("prod", "GET /health", None), ("prod", "GET /users/{id}", "users_prod"), ("prod", "GET /version", None)]
        # point dev at the prod backend: the next request follows, the upstreams stay
        pools = gw._upstreams["users_prod"]
        cfg["stages"]["dev"]["variables"]["backend"] = "users_prod"
        await gw.reload(cfg)
        assert (await get(gw.addresses[0], "/dev/users/1")).status == 200
        assert (dev.requests, prod.requests) == (0, 1) and gw._upstreams["users_prod"] is pools


async def test_each_stage_has_its_own_throttle_buckets_and_authorizer_decisions(gateway, tmp_path):
    """A route throttle counts per stage (as AWS's stage route settings do), across a
    reload too; a custom authorizer's cached decision is its stage's."""
    # allows only in dev, and says so per stage
    server = await AuthorizerPeer(lambda event: {"isAuthorized": event["requestContext"]["stage"] == "dev"}).start()
    try:
        cfg = base_config(routes=[
            {"route": "GET /t", "throttle": {"rate": 0.001, "burst": 2}, "integration": {"type": "mock"}},
            {"route": "GET /secret", "auth": "custom", "integration": {"type": "mock"}}])
        cfg["authorizers"] = {"custom": {"type": "http", "result_ttl": "60s",
                                         "url": server.url}}
        cfg["stages"] = {"dev": {}, "prod": {}, "qa": {}}
        gw = await gateway(cfg)

        async def statuses(path: str, n: int, **headers) -> list[int]:
            c = await RawClient.connect(gw.addresses[0])
            try:
                return [(await c.request("GET", path, headers=headers or None)).status for _ in range(n)]
            finally:
                await c.close()

        assert [await statuses(f"/{s}/t", 3) for s in ("dev", "prod", "qa")] == [[200, 200, 429]] * 3
        await gw.reload(cfg)  # the buckets stay each stage's, and keep their counts
        assert [await statuses(f"/{s}/t", 1) for s in ("dev", "prod", "qa")] == [[429]] * 3
        assert await statuses("/dev/secret", 2, authorization="t") == [200, 200]
        assert await statuses("/prod/secret", 2, authorization="t") == [403, 403]
        # each stage asked once, then from its own cache
        assert [event["requestContext"]["stage"] for _, event in server.seen] == ["dev", "prod"]
    finally:
        server.close()


async def test_a_stages_default_route_throttle_and_a_routes_own(gateway):
    cfg = base_config(routes=[
        {"route": "GET /a", "integration": {"type": "mock"}},
        {"route": "GET /b", "integration": {"type": "mock"}},
        {"route": "GET /own", "throttle": {"rate": 0.001, "burst": 3}, "integration": {"type": "mock"}}])
    cfg["stages"] = {"dev": {"throttle": {"rate": 0.001, "burst": 1}}, "prod": {}}
    gw = await gateway(cfg)

    async def statuses(path: str, n: int) -> list[int]:
        c = await RawClient.connect(gw.addresses[0])
        try:
            return [(await c.request("GET", path)).status for _ in range(n)]
        finally:
            await c.close()

    # dev: each route without its own throttle gets the stage's, with its own bucket
    assert await statuses("/dev/a", 2) == [200, 429] and await statuses("/dev/b", 2) == [200, 429]
    assert await statuses("/dev/own", 4) == [200, 200, 200, 429]  # the route's own wins
    assert await statuses("/prod/a", 3) == [200, 200, 200]  # prod has no default


async def test_a_jwt_audience_from_a_stage_variable_and_no_cache_across_stages(gateway, tmp_path):
    import base64
    import hashlib
    import hmac
    import time

    secret = b"stages-test-secret-0123456789abcdef"

    def hs256(claims: dict) -> str:
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = b64(json.dumps(claims).encode())
        return f"{head}.{body}.{b64(hmac.new(secret, f'{head}.{body}'.encode(), hashlib.sha256).digest())}"

    (tmp_path / "secret").write_bytes(secret)
    cfg = base_config(routes=[{"route": "GET /me", "auth": "users", "integration": {"type": "mock"}}])
    cfg["authorizers"] = {"users": {"type": "jwt", "issuer": "https://auth.test/", "algorithms": ["HS256"],
                                    "audience": "${stageVariables.audience}",
                                    "hs_secret": {"file": str(tmp_path / "secret")}}}
    cfg["stages"] = {"dev": {"variables": {"audience": "api-dev"}}, "prod": {"variables": {"audience": "api"}}}
    gw = await gateway(cfg)
    dev_token = hs256({"iss": "https://auth.test/", "aud": "api-dev", "exp": int(time.time()) + 60})

    async def status(path: str) -> int:
        c = await RawClient.connect(gw.addresses[0])
        try:
            return (await c.request("GET", path, headers={"authorization": f"Bearer {dev_token}"})).status
        finally:
            await c.close()

    # verified (and cached) for dev; the same token is not let into prod from that cache
    assert [await status("/dev/me"), await status("/dev/me"), await status("/prod/me")] == [200, 200, 401]
    cfg["stages"]["prod"]["variables"].pop("audience")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert exc.value.errors[0].startswith("authorizers.users.audience: stage 'prod' has no variable 'audience'")


async def test_a_canary_takes_its_share_sticky_keys_stay_and_both_sides_are_counted(gateway, tmp_path):
    import math

    from prometheus_client.parser import text_string_to_metric_families

    async with DemoUpstream() as stable, DemoUpstream() as nxt:
        cfg = base_config(routes=[{"route": "GET /u", "integration": {"type": "http",
                                                                       "upstream": "${stageVariables.backend}"}}])
        cfg["upstreams"] = {"users": {"targets": [f"http://127.0.0.1:{stable.port}"]},
                            "users_next": {"targets": [f"http://127.0.0.1:{nxt.port}"]}}
        cfg["stages"] = {"prod": {"variables": {"backend": "users"},
                                  "canary": {"percent": 10.0, "variable_overrides": {"backend": "users_next"},
                                             "sticky": {"header": "x-user-id"}, "force_header": "x-edgeplane-canary"}}}
        cfg["access_log"] = {"destination": "file", "path": str(tmp_path / "a.log"),
                             "format": "$context.stage $context.isCanaryRequest"}
        gw = await gateway(cfg)
        n = 10_000

        async def one(k: int, headers: dict | None = None) -> None:
            c = await RawClient.connect(gw.addresses[0])
            try:
                for _ in range(k):
                    assert (await c.request("GET", "/prod/u", headers=headers)).status == 200
            finally:
                await c.close()

        await asyncio.gather(*(one(n // 8) for _ in range(8)))
        # random per request: within the binomial 99.9 % interval (3.29 sigma) of 10 %
        sigma = math.sqrt(n * 0.1 * 0.9)
        assert abs(nxt.requests - n * 0.1) <= 3.29 * sigma, (stable.requests, nxt.requests)
        assert stable.requests + nxt.requests == n
        # a sticky key always lands on the same side; the force header overrides it
        sides = set()
        for user in ("alice", "bob", "carol", "dave"):
            before = nxt.requests
            await one(20, {"x-user-id": user})
            sides.add(nxt.requests - before)
        assert sides <= {0, 20}
        before = nxt.requests
        await one(5, {"x-edgeplane-canary": "always"})
        await one(5, {"x-edgeplane-canary": "never", "x-user-id": "x"})
        assert nxt.requests - before == 5  # always: 5 to the canary; never: none, sticky key or not
        # both sides in the metrics and the access log
        c = await RawClient.connect(gw.admin_address)
        try:
            text = (await c.request("GET", "/metrics")).body.decode()
        finally:
            await c.close()
        counts = {s.labels["canary"]: s.value for f in text_string_to_metric_families(text)
                  if f.name == "edgeplane_requests" for s in f.samples if s.labels.get("stage") == "prod"}
        assert counts["true"] == nxt.requests and counts["false"] == stable.requests
        gw._access_log.flush(wait=2.0)
        lines = (tmp_path / "a.log").read_text().splitlines()
        assert lines.count("prod true") == nxt.requests and lines.count("prod false") == stable.requests


async def test_a_stage_may_log_in_its_own_format(gateway, tmp_path):
    cfg = base_config(routes=[{"route": "GET /m", "integration": {"type": "mock"}}])
    cfg["stages"] = {"dev": {"access_log": {"format": "dev-line $context.status $context.resourcePath"}},
                     "prod": {}}
    cfg["access_log"] = {"destination": "file", "path": str(tmp_path / "a.log"),
                         "format": "$context.stage $context.status"}
    gw = await gateway(cfg)
    for path in ("/dev/m", "/prod/m"):
        c = await RawClient.connect(gw.addresses[0])
        try:
            assert (await c.request("GET", path)).status == 200
        finally:
            await c.close()
    gw._access_log.flush(wait=2.0)
    assert (tmp_path / "a.log").read_text().splitlines() == ["dev-line 200 /m", "prod 200"]
    cfg["stages"]["dev"]["access_log"]["format"] = "$context.nope"
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert exc.value.errors[0].startswith("stages.dev.access_log.format: unknown variable $context.nope")


async def test_a_stage_may_log_to_a_destination_of_its_own(gateway, tmp_path):
    cfg = base_config(routes=[{"route": "GET /m", "integration": {"type": "mock"}}])
    cfg["stages"] = {"dev": {"access_log": {"destination": "file", "path": str(tmp_path / "dev.log")}},
                     "qa": {"access_log": {"destination": "file", "path": str(tmp_path / "qa.log"),
                                           "format": "qa $context.resourcePath"}},
                     "prod": {}}
    cfg["access_log"] = {"destination": "file", "path": str(tmp_path / "a.log"),
                         "format": "$context.stage $context.status"}
    gw = await gateway(cfg)
    for path in ("/dev/m", "/prod/m", "/qa/m", "/dev/m"):
        assert (await RawClient.once(gw.addresses[0], "GET", path)).status == 200
    gw._access_log.flush(wait=2.0)
    # dev: its own file, in the gateway's format; qa: its own file and format; prod: the gateway's
    assert (tmp_path / "dev.log").read_text().splitlines() == ["dev 200", "dev 200"]
    assert (tmp_path / "qa.log").read_text().splitlines() == ["qa /m"]
    assert (tmp_path / "a.log").read_text().splitlines() == ["prod 200"]
    m = await RawClient.once(gw.admin_address, "GET", "/metrics")
    assert b"edgeplane_access_log_lines_total 4.0" in m.body
    cfg["stages"]["dev"]["access_log"] = {"destination": "file"}
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert exc.value.errors[0].startswith("stages.dev.access_log: missing required key 'path'")


async def test_an_authorizer_url_from_a_stage_variable_calls_each_stages_own(gateway):
    dev = await AuthorizerPeer(lambda event: {"isAuthorized": True}).start()
    prod = await AuthorizerPeer(lambda event: {"isAuthorized": event["requestContext"]["stage"] == "prod"}).start()
    try:
        cfg = base_config(routes=[{"route": "GET /secret", "auth": "custom", "integration": {"type": "mock"}}])
        cfg["authorizers"] = {"custom": {"type": "http", "url": "${stageVariables.authorizer}",
                                         "result_ttl": "0s"}}
        cfg["stages"] = {"dev": {"variables": {"authorizer": dev.url}},
                         "prod": {"variables": {"authorizer": prod.url},
                                  "canary": {"percent": 0.0, "force_header": "x-canary",
                                             "variable_overrides": {"authorizer": dev.url}}}}
        gw = await gateway(cfg)

        async def status(path: str, **headers: str) -> int:
            r = await RawClient.once(gw.addresses[0], "GET", path, headers={"authorization": "t", **headers})
            return r.status

        assert [await status("/dev/secret"), await status("/prod/secret"),
                await status("/prod/secret", **{"x-canary": "always"})] == [200, 200, 200]
        assert (len(dev.seen), len(prod.seen)) == (2, 1)  # the canary side used its override
        assert [event["requestContext"]["stage"] for _, event in dev.seen] == ["dev", "prod"]
        # each stage's copy is its own authorizer: its own client, metrics and cache
        assert {"custom@dev", "custom@prod", "custom@prod:canary"} <= set(gw.config.authorizers)
    finally:
        dev.close()
        prod.close()
    # a resolved URL is checked per stage, located
    cfg["stages"]["dev"]["variables"]["authorizer"] = "ftp://x"
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert exc.value.errors[0].startswith("authorizers.custom.url: in stage 'dev' this is 'ftp://x': ")


async def test_an_upstream_target_from_a_stage_variable_is_each_stages_own(gateway):
    async with DemoUpstream() as dev, DemoUpstream() as prod, DemoUpstream() as nxt:
        cfg = base_config(routes=[{"route": "GET /u", "integration": {"type": "http", "upstream": "users"}}])
        cfg["upstreams"] = {"users": {"targets": ["http://127.0.0.1:${stageVariables.port}"]}}
        cfg["stages"] = {"dev": {"variables": {"port": str(dev.port)}},
                         "prod": {"variables": {"port": str(prod.port)},
                                  "canary": {"percent": 0.0, "force_header": "x-side",
                                             "variable_overrides": {"port": str(nxt.port)}}}}
        gw = await gateway(cfg)
        for path, headers in (("/dev/u", {}), ("/prod/u", {}), ("/prod/u", {"x-side": "always"})):
            assert (await RawClient.once(gw.addresses[0], "GET", path, headers=headers)).status == 200
        assert (dev.requests, prod.requests, nxt.requests) == (1, 1, 1)
        assert {"users@dev", "users@prod", "users@prod:canary"} == set(gw.config.upstreams)
    for variables, error in [
        ({}, "upstreams.users.targets[0]: stage 'dev' has no variable 'port' (${stageVariables.port})"),
        ({"port": "x"}, "upstreams.users.targets[0]: in stage 'dev' this is 'http://127.0.0.1:x': "),
    ]:
        cfg["stages"]["dev"]["variables"] = variables
        with pytest.raises(ConfigError) as exc:
            load_config(cfg)
        assert exc.value.errors[0].startswith(error), exc.value.errors


def test_targets_that_resolve_to_the_same_one_are_a_located_error():
    cfg = base_config(routes=[{"route": "GET /u", "integration": {"type": "http", "upstream": "users"}}])
    cfg["upstreams"] = {"users": {"targets": ["http://127.0.0.1:${stageVariables.port}", "http://127.0.0.1:9102"]}}
    cfg["stages"] = {"prod": {"variables": {"port": "9101"},
                              "canary": {"percent": 5.0, "variable_overrides": {"port": "9102"}}}}
    with pytest.raises(ConfigError) as exc:  # distinct on prod; the same on its canary side
        load_config(cfg)
    assert exc.value.errors == ["upstreams.users.targets[1]: in stage 'prod' (its canary) this is "
                                "'http://127.0.0.1:9102', a duplicate of an earlier target"]
