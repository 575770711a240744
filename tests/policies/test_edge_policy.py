"""Edge policy end to end through the gateway: JWT authorizer (JWKS file), scopes,
forwarded claims, IP rules with trusted proxies, CORS. Real RSA keys and signatures
made here with `cryptography`; the real demo upstream counts what reaches it."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from conftest import base_config, build_request
from edgeplane.config.loader import ConfigError, load_config

ISSUER = "https://auth.example.com/"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _uint(n: int) -> str:
    return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def sign(key, claims: dict, kid: str = "k1", alg: str = "RS256") -> str:
    header = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
    payload = b64(json.dumps(claims).encode())
    sig = key.sign(f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{payload}.{b64(sig)}"


def claims(**extra) -> dict:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": "orders-api", "sub": "user-42", "exp": now + 300, "iat": now - 5,
            "scope": "orders:read profile"}
    base.update(extra)
    return base


@pytest.fixture
def jwks_file(tmp_path, rsa_key):
    pub = rsa_key.public_key().public_numbers()
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig",
                                          "n": _uint(pub.n), "e": _uint(pub.e)}]}))
    return str(path)


def auth_config(port: int, jwks: str, **extra) -> dict:
    cfg = base_config(port, routes=[
        {"route": "GET /orders/{id}", "integration": {"type": "http", "upstream": "demo"},
         "auth": "users_jwt", "scopes": ["orders:read"], "forward_claims": {"x-user-id": "sub"}},
        {"route": "GET /admin", "integration": {"type": "http", "upstream": "demo"},
         "auth": "users_jwt", "scopes": ["admin"]},
        {"route": "GET /open", "integration": {"type": "http", "upstream": "demo"}},
    ])
    cfg["authorizers"] = {"users_jwt": {
        "type": "jwt", "issuer": ISSUER, "audience": ["orders-api"], "algorithms": ["RS256"],
        "jwks": {"file": jwks}}}
    cfg.update(extra)
    return cfg


async def test_jwt_valid_token_reaches_upstream_with_claims(upstream, gateway, client_factory, rsa_key, jwks_file):
    gw = await gateway(auth_config(upstream.port, jwks_file))
    c = await client_factory(gw.addresses[0])
    token = sign(rsa_key, claims())
    r = await c.request("GET", "/orders/7", headers={"Authorization": f"Bearer {token}",
                                                     "X-User-Id": "spoofed"})
    assert r.status == 200
    echo = r.json()
    assert echo["headers"]["x-user-id"] == "user-42"  # the client's spoofed value is gone
    # "Bearer " is optional, as in AWS.
    r = await c.request("GET", "/orders/8", headers={"Authorization": token})
    assert r.status == 200


@pytest.mark.parametrize("case", ["missing", "garbage", "expired", "wrong_iss", "wrong_aud",
                                  "tampered", "unknown_kid", "alg_none"])
async def test_jwt_refusals_are_401_and_never_reach_upstream(upstream, gateway, client_factory,
                                                             rsa_key, jwks_file, case):
    gw = await gateway(auth_config(upstream.port, jwks_file))
    c = await client_factory(gw.addresses[0])
    good = sign(rsa_key, claims())
    tokens = {
        "missing": None,
        "garbage": "not.a.jwt",
        "expired": sign(rsa_key, claims(exp=int(time.time()) - 10)),
        "wrong_iss": sign(rsa_key, claims(iss="https://evil.example.com/")),
        "wrong_aud": sign(rsa_key, claims(aud="other-api")),
        "tampered": good.split(".")[0] + "." + b64(json.dumps(claims(sub="admin")).encode())
                    + "." + good.split(".")[2],
        "unknown_kid": sign(rsa_key, claims(), kid="nope"),
        "alg_none": b64(b'{"alg":"none","kid":"k1"}') + "." + b64(json.dumps(claims()).encode()) + ".",
    }
    token = tokens[case]
    before = upstream.connection_count
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    r = await c.request("GET", "/orders/1", headers=headers)
    assert r.status == 401
    assert r.json() == {"message": "Unauthorized"}
    www = r.header("www-authenticate")
    assert www.startswith("Bearer") and 'error="invalid_token"' in www
    assert upstream.connection_count == before  # nothing was forwarded
    r = await c.request("GET", "/open")  # the connection stays usable
    assert r.status == 200


async def test_jwt_scope_missing_is_403_insufficient_scope(upstream, gateway, client_factory, rsa_key, jwks_file):
    gw = await gateway(auth_config(upstream.port, jwks_file))
    c = await client_factory(gw.addresses[0])
    r = await c.request("GET", "/admin", headers={"Authorization": f"Bearer {sign(rsa_key, claims())}"})
    assert r.status == 403
    assert 'error="insufficient_scope"' in r.header("www-authenticate")
    token = sign(rsa_key, claims(scope=None, scp=["admin"]))
    r = await c.request("GET", "/admin", headers={"Authorization": f"Bearer {token}"})
    assert r.status == 200


async def test_ip_rules_server_and_route_with_trusted_proxies(upstream, gateway, client_factory):
    cfg = base_config(upstream.port, routes=[
        {"route": "GET /internal", "integration": {"type": "http", "upstream": "demo"},
         "ip_rules": {"allow": ["10.0.0.0/8"]}},
        {"route": "$default", "integration": {"type": "http", "upstream": "demo"}},
    ])
    cfg["ip_rules"] = {"deny": ["192.0.2.0/24", "2001:db8::/32"]}
    cfg["trusted_proxies"] = ["127.0.0.1/32"]
    gw = await gateway(cfg)
    c = await client_factory(gw.addresses[0])
    assert (await c.request("GET", "/x")).status == 200  # peer 127.0.0.1, no XFF
    r = await c.request("GET", "/x", headers={"X-Forwarded-For": "192.0.2.7"})
    assert r.status == 403 and r.json() == {"message": "Forbidden"}
    r = await c.request("GET", "/internal", headers={"X-Forwarded-For": "10.1.2.3"})
    assert r.status == 200
    r = await c.request("GET", "/internal", headers={"X-Forwarded-For": "11.1.2.3"})
    assert r.status == 403


async def test_xff_not_believed_from_untrusted_peer(upstream, gateway, client_factory):
    cfg = base_config(upstream.port, routes=[
        {"route": "$default", "integration": {"type": "http", "upstream": "demo"},
         "ip_rules": {"allow": ["10.0.0.0/8"]}}])
    gw = await gateway(cfg)  # no trusted proxies: XFF is the client's claim only
    c = await client_factory(gw.addresses[0])
    r = await c.request("GET", "/x", headers={"X-Forwarded-For": "10.1.2.3"})
    assert r.status == 403


async def test_cors_preflight_answered_locally_and_headers_on_responses(upstream, gateway, client_factory):
    cfg = base_config(upstream.port, routes=[
        {"route": "ANY /api/{proxy+}", "integration": {"type": "http", "upstream": "demo"}}])
    cfg["cors"] = {"allow_origins": ["https://app.example.com", "https://*.example.org"],
                   "allow_methods": ["GET", "POST"], "allow_headers": ["content-type", "authorization"],
                   "expose_headers": ["x-request-id"], "max_age": 600, "allow_credentials": True}
    gw = await gateway(cfg)
    c = await client_factory(gw.addresses[0])
    before = upstream.connection_count
    r = await c.request("OPTIONS", "/api/items", headers={
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert r.status == 204
    assert r.header("access-control-allow-origin") == "https://app.example.com"
    assert "POST" in r.header("access-control-allow-methods")
    assert r.header("access-control-allow-credentials") == "true"
    assert r.header("access-control-max-age") == "600"
    assert "origin" in (r.header("vary") or "").lower()
    assert upstream.connection_count == before  # no upstream call for a preflight
    r = await c.request("OPTIONS", "/api/items", headers={
        "Origin": "https://evil.example.net", "Access-Control-Request-Method": "POST"})
    assert r.status == 403 and r.header("access-control-allow-origin") is None
    r = await c.request("GET", "/api/items", headers={"Origin": "https://a.b.example.org"})
    assert r.status == 200
    assert r.header("access-control-allow-origin") == "https://a.b.example.org"
    assert "x-request-id" in r.header("access-control-expose-headers").lower()
    r = await c.request("GET", "/api/items", headers={"Origin": "https://evil.example.net"})
    assert r.status == 200 and r.header("access-control-allow-origin") is None


def test_config_errors_for_policy_are_located(jwks_file):
    cfg = auth_config(9001, jwks_file)
    cfg["routes"][0]["auth"] = "nope"
    cfg["ip_rules"] = {"allow": ["10.0.0.0/33"]}
    cfg["authorizers"]["users_jwt"]["jwks"] = {"file": "/nonexistent/jwks.json"}
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    text = "\n".join(exc.value.errors)
    assert "routes[0].auth: unknown authorizer 'nope' (known: users_jwt)" in text
    assert "ip_rules.allow[0]" in text
    assert "authorizers.users_jwt.jwks.file: cannot read" in text


async def test_pipelined_requests_with_auth_answered_in_order(upstream, gateway, client_factory, rsa_key, jwks_file):
    gw = await gateway(auth_config(upstream.port, jwks_file))
    c = await client_factory(gw.addresses[0])
    token = sign(rsa_key, claims())
    await c.send(build_request("GET", "/orders/1", {"Authorization": f"Bearer {token}"})
                 + build_request("GET", "/orders/2")
                 + build_request("GET", "/orders/3", {"Authorization": f"Bearer {token}"}))
    statuses = [(await c.read_response()).status for _ in range(3)]
    assert statuses == [200, 401, 200]


class JwksServer:
    """A real JWKS endpoint on loopback that counts its fetches; keys can be swapped."""

    def __init__(self, keys: list[dict]):
        self.keys = keys
        self.fetches = 0
        self.server = None
        self.port = 0

    async def _handle(self, reader, writer):
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.fetches += 1
                body = json.dumps({"keys": self.keys}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"cache-control: max-age=300\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()


def jwk(key, kid: str) -> dict:
    pub = key.public_key().public_numbers()
    return {"kty": "RSA", "kid": kid, "alg": "RS256", "n": _uint(pub.n), "e": _uint(pub.e)}


async def test_jwks_url_rotation_without_restart_and_kid_flood_bounded(upstream, gateway, client_factory, rsa_key):
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with JwksServer([jwk(rsa_key, "k1")]) as jwks:
        cfg = auth_config(upstream.port, "unused")
        cfg["authorizers"]["users_jwt"]["jwks"] = {"url": f"http://127.0.0.1:{jwks.port}/.well-known/jwks.json"}
        gw = await gateway(cfg)
        assert jwks.fetches == 1  # fetched once at start
        c = await client_factory(gw.addresses[0])
        r = await c.request("GET", "/orders/1", headers={"Authorization": sign(rsa_key, claims())})
        assert r.status == 200
        # Rotation: the issuer starts signing with k2, and publishes it.
        jwks.keys = [jwk(rsa_key, "k1"), jwk(new_key, "k2")]
        token2 = sign(new_key, claims(), kid="k2")
        r = await c.request("GET", "/orders/2", headers={"Authorization": token2})
        assert r.status == 401  # unknown kid now; it triggers a refresh off the request path
        for _ in range(100):
            if jwks.fetches >= 2:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        r = await c.request("GET", "/orders/3", headers={"Authorization": token2})
        assert r.status == 200
        # A flood of made-up kids cannot hammer the issuer.
        fetches = jwks.fetches
        for i in range(30):
            r = await c.request("GET", "/orders/4",
                                headers={"Authorization": sign(new_key, claims(), kid=f"made-up-{i}")})
            assert r.status == 401
        await asyncio.sleep(0.1)
        assert jwks.fetches - fetches <= 1


async def test_jwks_url_down_at_start_gives_401_not_500(upstream, gateway, client_factory, rsa_key):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    cfg = auth_config(upstream.port, "unused")
    cfg["authorizers"]["users_jwt"]["jwks"] = {"url": f"http://127.0.0.1:{dead}/jwks"}
    gw = await gateway(cfg)
    c = await client_factory(gw.addresses[0])
    r = await c.request("GET", "/orders/1", headers={"Authorization": sign(rsa_key, claims())})
    assert r.status == 401
    assert (await c.request("GET", "/open")).status == 200


async def test_api_key_authorizer(upstream, gateway, client_factory, tmp_path):
    from edgeplane.policies.api_keys.store import generate_key

    plain, hashed = generate_key()
    other, other_hash = generate_key()
    keys = tmp_path / "api-keys.yaml"
    keys.write_text(f"keys:\n  - {{id: partner-acme, hash: '{hashed}', plan: gold}}\n"
                    f"  - {{id: old, hash: '{other_hash}', enabled: false}}\n")
    cfg = base_config(upstream.port, routes=[
        {"route": "GET /partners/{id}", "integration": {"type": "http", "upstream": "demo"},
         "auth": "partners"}])
    cfg["authorizers"] = {"partners": {"type": "api_key", "keys_file": str(keys)}}
    cfg["usage_plans"] = {"gold": {}}
    gw = await gateway(cfg)
    c = await client_factory(gw.addresses[0])
    assert (await c.request("GET", "/partners/1", headers={"X-API-Key": plain})).status == 200
    for headers in ({}, {"X-API-Key": "x" * 40}, {"X-API-Key": other}, {"X-API-Key": "short"}):
        r = await c.request("GET", "/partners/1", headers=headers)
        assert r.status == 403 and r.json() == {"message": "Forbidden"}


def test_api_key_file_errors_are_located(tmp_path):
    keys = tmp_path / "bad-keys.yaml"
    keys.write_text("keys:\n  - {id: a, hash: 'md5:00'}\n")
    cfg = base_config(9001)
    cfg["authorizers"] = {"partners": {"type": "api_key", "keys_file": str(keys)}}
    cfg["routes"][0]["auth"] = "partners"
    cfg["routes"][0]["scopes"] = ["x"]
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    text = "\n".join(exc.value.errors)
    assert "authorizers.partners.keys_file: keys[0].hash" in text
    assert "routes[0].auth: 'partners' is not a JWT authorizer" in text


class AuthorizerServer:
    """A real custom authorizer on loopback: decides by the Authorization value and
    counts its calls (so caching is proven by call counts)."""

    def __init__(self):
        self.calls = 0
        self.payloads: list[dict] = []

    async def _handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int([ln.split(b":")[1] for ln in head.split(b"\r\n")
                              if ln.lower().startswith(b"content-length")][0])
                payload = json.loads(await reader.readexactly(length))
                self.calls += 1
                self.payloads.append(payload)
                token = payload["headers"].get("authorization", "")
                if token == "slow":
                    await asyncio.sleep(2)
                if token == "boom":
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
                elif token == "junk":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nnope!")
                else:
                    body = json.dumps({"isAuthorized": token.startswith("good"),
                                       "context": {"tenant": "t-" + token}}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()


def custom_config(upstream_port: int, authz_port: int, **authz) -> dict:
    cfg = base_config(upstream_port, routes=[
        {"route": "POST /things/{id}", "integration": {"type": "http", "upstream": "demo"}, "auth": "custom"},
        {"route": "GET /things/{id}", "integration": {"type": "http", "upstream": "demo"}, "auth": "custom"},
    ])
    cfg["authorizers"] = {"custom": {"type": "http", "url": f"http://127.0.0.1:{authz_port}/authorize",
                                     "forward_context": {"x-tenant": "tenant"}, "timeout": "500ms", **authz}}
    return cfg


async def test_custom_authorizer_allow_deny_cache_and_context(upstream, gateway, client_factory):
    async with AuthorizerServer() as authz:
        gw = await gateway(custom_config(upstream.port, authz.port))
        c = await client_factory(gw.addresses[0])
        r = await c.request("POST", "/things/1?x=1", headers={"Authorization": "good-1", "X-Tenant": "forged"},
                            body=b"payload")
        assert r.status == 200
        echo = r.json()
        assert echo["headers"]["x-tenant"] == "t-good-1" and echo["body"] == "payload"
        p = authz.payloads[0]
        assert p["version"] == "2.0" and p["type"] == "REQUEST" and p["routeKey"] == "POST /things/{id}"
        assert p["identitySource"] == ["good-1"] and p["rawQueryString"] == "x=1"
        assert p["pathParameters"] == {"id": "1"} and p["requestContext"]["http"]["method"] == "POST"
        for _ in range(3):  # cached per identity: one call for all of these
            assert (await c.request("GET", "/things/2", headers={"Authorization": "good-1"})).status == 200
        assert authz.calls == 1
        r = await c.request("GET", "/things/3", headers={"Authorization": "bad"})
        assert r.status == 403 and r.json() == {"message": "Forbidden"}
        assert (await c.request("GET", "/things/3", headers={"Authorization": "bad"})).status == 403
        assert authz.calls == 2
        r = await c.request("GET", "/things/4")  # missing identity source: no call
        assert r.status == 401 and authz.calls == 2
        assert gw.stats()["authorizers"]["custom"]["calls"] == 2


@pytest.mark.parametrize("token", ["boom", "junk", "slow"])
async def test_custom_authorizer_failure_is_500_not_forwarded(upstream, gateway, client_factory, token):
    async with AuthorizerServer() as authz:
        gw = await gateway(custom_config(upstream.port, authz.port))
        c = await client_factory(gw.addresses[0])
        before = upstream.connection_count
        r = await c.request("GET", "/things/1", headers={"Authorization": token})
        assert r.status == 500 and r.json() == {"message": "Internal Server Error"}
        assert upstream.connection_count == before
        assert gw.stats()["errors"]["500"] == 1


async def test_custom_authorizer_route_key_makes_cache_per_route(upstream, gateway, client_factory):
    async with AuthorizerServer() as authz:
        gw = await gateway(custom_config(upstream.port, authz.port, identity_source=[
            "$request.header.Authorization", "$context.routeKey"]))
        c = await client_factory(gw.addresses[0])
        for _ in range(2):
            assert (await c.request("GET", "/things/1", headers={"Authorization": "good"})).status == 200
            assert (await c.request("POST", "/things/1", headers={"Authorization": "good"})).status == 200
        assert authz.calls == 2


async def test_custom_authorizer_result_ttl_zero_disables_cache(upstream, gateway, client_factory):
    async with AuthorizerServer() as authz:
        gw = await gateway(custom_config(upstream.port, authz.port, result_ttl=0))
        c = await client_factory(gw.addresses[0])
        for _ in range(3):
            assert (await c.request("GET", "/things/1", headers={"Authorization": "good"})).status == 200
        assert authz.calls == 3


async def test_access_log_names_the_principal(upstream, gateway, client_factory, rsa_key, jwks_file, tmp_path):
    log_path = tmp_path / "access.log"
    cfg = auth_config(upstream.port, jwks_file, access_log={"destination": "file", "path": str(log_path)})
    gw = await gateway(cfg)
    c = await client_factory(gw.addresses[0])
    assert (await c.request("GET", "/orders/1", headers={"Authorization": sign(rsa_key, claims())})).status == 200
    await gw.stop()
    line = json.loads(log_path.read_text().splitlines()[0])
    assert line["authorizerPrincipal"] == "user-42"


@pytest.mark.parametrize("body", [b"<html>not json</html>", b'{"keys": "nope"}', b"[" * 5000,
                                  b'{"keys": []}' + b" " * 200_000])
async def test_jwks_url_garbage_or_huge_keeps_serving_401(upstream, gateway, client_factory, rsa_key, body):
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = auth_config(upstream.port, "unused")
        cfg["authorizers"]["users_jwt"]["jwks"] = {"url": f"http://127.0.0.1:{port}/jwks"}
        gw = await gateway(cfg)
        c = await client_factory(gw.addresses[0])
        r = await c.request("GET", "/orders/1", headers={"Authorization": sign(rsa_key, claims())})
        assert r.status == 401
        assert gw.stats()["authorizers"]["users_jwt"]["failures"] >= 1
    finally:
        server.close()


async def test_hostile_claims_are_401(upstream, gateway, client_factory, rsa_key, jwks_file):
    gw = await gateway(auth_config(upstream.port, jwks_file))
    c = await client_factory(gw.addresses[0])
    nested = {"a": None}
    for _ in range(3000):
        nested = {"a": nested}
    for bad in (claims(exp="tomorrow"), claims(aud=123), claims(iss=["x"]), claims(deep=nested)):
        try:
            token = sign(rsa_key, bad)
        except RecursionError:
            continue  # json itself cannot encode it; nothing to send
        r = await c.request("GET", "/orders/1", headers={"Authorization": token})
        assert r.status == 401, bad.get("exp")


async def test_slow_jwks_url_is_bounded_at_start(upstream, gateway, client_factory, rsa_key):
    """A JWKS endpoint that never answers: start-up waits at most the 1.5 s fetch bound,
    then every token is 401 (never a hang, never a 500)."""
    release = asyncio.Event()

    async def hang(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await release.wait()
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = auth_config(upstream.port, "unused")
        cfg["authorizers"]["users_jwt"]["jwks"] = {"url": f"http://127.0.0.1:{port}/jwks"}
        gw = await asyncio.wait_for(gateway(cfg), 5)
        c = await client_factory(gw.addresses[0])
        r = await c.request("GET", "/orders/1", headers={"Authorization": sign(rsa_key, claims())})
        assert r.status == 401
        assert "no complete response" in gw.stats()["authorizers"]["users_jwt"]["last_error"]
    finally:
        release.set()
        server.close()
