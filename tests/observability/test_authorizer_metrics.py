"""Authorizer outcomes in `/metrics`: allowed, denied, error and cache hits, by authorizer.

Real HS256 tokens signed here, a real custom authorizer over HTTP (and one whose URL
nobody listens on), a real API key file; the counts are checked against the requests
sent, through `prometheus_client`'s parser.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time

import pytest
from test_metrics import scrape, value

from authorizer_peer import AuthorizerPeer
from conftest import RawClient, base_config

pytestmark = pytest.mark.timeout(60)

SECRET = b"metrics-test-secret-0123456789abcdef"


def hs256(claims: dict) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def get(addr, path: str, token: str | None = None, key: str | None = None) -> int:
    headers = {}
    if token is not None:
        headers["authorization"] = token
    if key is not None:
        headers["x-api-key"] = key
    return (await RawClient.once(addr, "GET", path, headers)).status


async def test_each_authorizer_counts_allowed_denied_error_and_cache_hits(upstream, gateway, tmp_path):
    # allows the identity `Bearer good`, denies anything else (AWS simple responses)
    server = await AuthorizerPeer(lambda event: {"isAuthorized": event["identitySource"] == ["Bearer good"]}).start()
    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / "keys.yaml").write_text(
        "keys:\n  - id: partner-1\n    hash: sha256:" + hashlib.sha256(b"partner-key-0123456789").hexdigest() + "\n")
    mock = {"type": "mock", "status": 200, "body": {}}
    cfg = base_config(upstream.port, routes=[
        {"route": "GET /jwt", "auth": "users", "integration": mock},
        {"route": "GET /custom", "auth": "custom", "integration": mock},
        {"route": "GET /down", "auth": "down", "integration": mock},
        {"route": "GET /key", "auth": "partners", "integration": mock},
    ])
    cfg["authorizers"] = {
        "users": {"type": "jwt", "issuer": "https://auth.test/", "audience": "api", "algorithms": ["HS256"],
                  "hs_secret": {"file": str(tmp_path / "secret")}},
        "custom": {"type": "http", "url": server.url, "result_ttl": "60s"},
        "down": {"type": "http", "url": f"http://127.0.0.1:{closed_port()}/authorize", "timeout": "2s"},
        "partners": {"type": "api_key", "keys_file": str(tmp_path / "keys.yaml")},
    }
    try:
        gw = await gateway(cfg)
        addr = gw.addresses[0]
        good = "Bearer " + hs256({"iss": "https://auth.test/", "aud": "api", "sub": "u1",
                                  "exp": int(time.time()) + 300})
        # JWT: the same good token 3 times (verified once, then 2 cache hits), 1 missing,
        # 1 forged (a new token: no cache hit).
        statuses = [await get(addr, "/jwt", good) for _ in range(3)]
        statuses += [await get(addr, "/jwt"), await get(addr, "/jwt", good[:-4] + "AAAA")]
        assert statuses == [200, 200, 200, 401, 401]
        # custom: allowed twice (asked once, then from its cache), denied once, no identity once
        statuses = [await get(addr, "/custom", "Bearer good") for _ in range(2)]
        statuses += [await get(addr, "/custom", "Bearer bad"), await get(addr, "/custom")]
        assert statuses == [200, 200, 403, 401]
        # an authorizer that cannot be reached is an error (500, as AWS answers)
        assert await get(addr, "/down", "Bearer good") == 500
        # API key: one good, one bad
        assert [await get(addr, "/key", key="partner-key-0123456789"),
                await get(addr, "/key", key="nope")] == [200, 403]

        _, fam = await scrape(gw.admin_address)

        def decisions(name: str) -> dict:
            return {o: value(fam, "edgeplane_authorizer_decisions_total", authorizer=name, outcome=o)
                    for o in ("allowed", "denied", "error")}

        def hits(name: str) -> float:
            return value(fam, "edgeplane_authorizer_cache_hits_total", authorizer=name)

        assert decisions("users") == {"allowed": 3, "denied": 2, "error": 0} and hits("users") == 2
        assert decisions("custom") == {"allowed": 2, "denied": 2, "error": 0} and hits("custom") == 1
        assert decisions("down") == {"allowed": 0, "denied": 0, "error": 1} and hits("down") == 0
        assert decisions("partners") == {"allowed": 1, "denied": 1, "error": 0}
        # a reload that keeps the authorizers keeps their series going up
        await gw.reload(cfg)
        assert await get(addr, "/jwt", good) == 200
        _, fam = await scrape(gw.admin_address)
        assert decisions("users")["allowed"] == 4
    finally:
        server.close()
