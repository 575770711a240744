"""No spelling of a protected route's path or host reaches the upstream as something
that resolves into it; no forwarded value adds a header or a request upstream.

Black-box through a real gateway on loopback: raw request targets (both parsers), a
recording raw upstream that keeps every byte it receives, and JWTs signed with a real
RSA key whose claims carry each control character.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from conftest import PARSERS, RawClient, RawUpstream, base_config, build_request

pytestmark = pytest.mark.timeout(60)

PROTECTED = {"route": "ANY /admin/{proxy+}",
             "integration": {"type": "mock", "status": 403, "body": {"message": "protected"}}}


class Recorder:
    """A raw upstream that answers 200 to each request head and keeps every byte."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.upstream = RawUpstream(self._serve)

    async def _serve(self, reader, writer):
        while True:
            data = await reader.read(65536)
            if not data:
                return
            self.received += data
            for _ in range(data.count(b"\r\n\r\n")):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nupstream")
            await writer.drain()

    def request_lines(self) -> list[bytes]:
        return [line for line in self.received.split(b"\r\n")
                if line.split(b" ")[-1:] == [b"HTTP/1.1"] and b" " in line]


BYPASSES = [
    "//admin/x", "/./admin/x", "/foo/../admin/x", "/%61dmin/x", "/x/%2e%2e/admin/x",
    "/x/%2E%2E/admin/x", "/x/.%2e/admin/x", "/%2e/admin/x", "///admin//x", "/a/b/../../admin/x",
    "/../admin/x", "/admin;/x", "/admin;a=b/x", "/admin%2Fx", "/admin%2fx", "/x/..%2fadmin/x",
    "/admin%5cx", "/x\\..\\admin\\x", "\\admin\\x", "/admin\\x", "/admin%00/x", "/admin%0a/x",
    "/%41dmin/x/../../admin/x", "/admin/%2e%2e%2fx", "http://gw.test//admin/x",
    "http://gw.test/x/../admin/x", "HTTP://gw.test/%61dmin/x",
]


@pytest.mark.parametrize("parser", PARSERS)
async def test_no_spelling_of_a_protected_path_reaches_the_upstream(gateway, parser):
    rec = Recorder()
    async with rec.upstream:
        gw = await gateway(base_config(rec.upstream.port, routes=[
            PROTECTED, {"route": "$default", "integration": {"type": "http", "upstream": "demo"}}],
            http={"parser": parser}))
        for target in BYPASSES:
            c = await RawClient.connect(gw.addresses[0])
            await c.send(f"GET {target} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode())
            try:
                r = await c.read_response(timeout=5)
                status = r.status
            except ConnectionError:
                status = 0  # refused by the parser without an answer: nothing forwarded either
            finally:
                await c.close()
            assert status in (400, 403), (target, status)
        # The upstream saw nothing at all: every spelling hit the route or was refused.
        assert rec.received == b"", bytes(rec.received)


async def test_the_normalised_path_is_what_the_upstream_and_the_log_see(upstream, gateway):
    gw = await gateway(base_config(upstream.port))
    c = await RawClient.connect(gw.addresses[0])
    r = await c.request("GET", "/x/..//%75sers/./42?a=%2e")
    assert r.status == 200
    assert r.json()["path"] == "/users/42" and r.json()["query"] == "a=%2e"  # query untouched
    # {proxy+} is filled from the normalised path too
    r = await c.request("GET", "/files/a/b/../c//d")
    assert r.json()["path"] == "/v2/a/c/d"
    await c.close()


async def test_relaxed_normalisation_is_a_warning_with_authorizers(tmp_path, rsa_key):
    from edgeplane.config.loader import load_config_text

    text = json.dumps(base_config(9, routes=[
        {"route": "GET /a", "integration": {"type": "mock"}, "auth": "k"}],
        authorizers={"k": {"type": "jwt", "issuer": "https://auth.test/", "audience": ["api"],
                           "algorithms": ["RS256"], "jwks": {"file": _jwks(tmp_path, rsa_key)}}},
        http={"path_normalization": {"merge_slashes": False, "escaped_slashes": "keep"}}))
    config = load_config_text(text)
    assert config.path_policy.merge_slashes is False
    assert config.path_policy.escaped_slashes == "keep"
    assert [w.split(":")[0] for w in config.warnings] == ["http.path_normalization"]
    assert "merge_slashes" in config.warnings[0]


# --------------------------------------------------------------------------- hosts

HOST_ROUTES = [
    {"route": "GET /v1/items", "host": "api.example.com",
     "integration": {"type": "mock", "status": 200, "body": {"route": "exact"}}},
    {"route": "GET /v1/items", "host": "*.example.com",
     "integration": {"type": "mock", "status": 200, "body": {"route": "wildcard"}}},
    {"route": "GET /{proxy+}", "integration": {"type": "mock", "status": 200, "body": {"route": "any"}}},
]


@pytest.mark.parametrize("host,expected", [
    ("api.example.com", "exact"), ("API.Example.com", "exact"), ("Api.example.com", "exact"),
    ("api.example.com:8080", "exact"), ("API.EXAMPLE.COM.", "exact"),
    ("WWW.Example.Com", "wildcard"), ("other.test", "any"),
])
async def test_hosts_match_case_insensitively(gateway, host, expected):
    gw = await gateway(base_config(None, routes=HOST_ROUTES))
    c = await RawClient.connect(gw.addresses[0])
    r = await c.request("GET", "/v1/items", host=host)
    assert (r.status, r.json()) == (200, {"route": expected})
    await c.close()


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("head", [
    b"GET http://api.example.com/v1/items HTTP/1.1\r\nHost: \r\n\r\n",
    b"GET http://api.example.com/v1/items HTTP/1.1\r\nHost:  \r\n\r\n",
    b"GET http://api.example.com/v1/items HTTP/1.1\r\nHost:\t\r\n\r\n",
    b"GET /v1/items HTTP/1.1\r\nHost: \r\n\r\n",
    b"GET /v1/items HTTP/1.1\r\nHost: exa%6dple.com\r\n\r\n",
    b"GET /v1/items HTTP/1.1\r\nHost: api.example.com:99999\r\n\r\n",
    b"GET /v1/items HTTP/1.1\r\nHost: [::1\r\n\r\n",
    b"GET http://user@api.example.com/v1/items HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
])
async def test_invalid_hosts_are_400(gateway, parser, head):
    gw = await gateway(base_config(None, routes=HOST_ROUTES, http={"parser": parser}))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(head)
    r = await c.read_response()
    assert r.status == 400, head
    await c.close()


async def test_absolute_form_authority_wins(gateway):
    gw = await gateway(base_config(None, routes=HOST_ROUTES))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(b"GET http://API.example.com/v1/items HTTP/1.1\r\nHost: other.test\r\n\r\n")
    r = await c.read_response()
    assert (r.status, r.json()) == (200, {"route": "exact"})
    await c.close()


# --------------------------------------------------------------------------- injection

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _token(key, **claims) -> str:
    now = int(time.time())
    payload = {"iss": "https://auth.test/", "aud": "api", "sub": "u1", "exp": now + 300, **claims}
    head = _b64(json.dumps({"alg": "RS256", "kid": "k1"}).encode())
    body = _b64(json.dumps(payload).encode())
    sig = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{_b64(sig)}"


def _jwks(tmp_path, key) -> str:
    pub = key.public_key().public_numbers()
    n = pub.n.to_bytes((pub.n.bit_length() + 7) // 8, "big")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "n": _b64(n),
                                          "e": _b64(pub.e.to_bytes(3, "big"))}]}))
    return str(path)


INJECTIONS = [
    "alice\r\nX-Admin: true",
    "a\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x",
    "alice\nX-Admin: true",
    "alice\rX-Admin: true",
    "alice\x00",
    "alice\x1b[31m",
    "alice\x7f",
    "alice\x0bx",
]


async def test_forwarded_claims_cannot_add_headers_or_requests(gateway, tmp_path, rsa_key, caplog):
    rec = Recorder()
    async with rec.upstream:
        cfg = base_config(rec.upstream.port, routes=[
            {"route": "GET /me", "integration": {"type": "http", "upstream": "demo"}, "auth": "jwt",
             "forward_claims": {"x-user-name": "name"}}])
        cfg["authorizers"] = {"jwt": {"type": "jwt", "issuer": "https://auth.test/", "audience": ["api"],
                                      "algorithms": ["RS256"], "jwks": {"file": _jwks(tmp_path, rsa_key)}}}
        gw = await gateway(cfg)
        c = await RawClient.connect(gw.addresses[0])
        for name in INJECTIONS:
            r = await c.request("GET", "/me", {"Authorization": f"Bearer {_token(rsa_key, name=name)}"})
            assert r.status == 400, repr(name[:40])
        refusals = [r.getMessage() for r in caplog.records if "forwarded claim" in r.getMessage()]
        assert len(refusals) == len(INJECTIONS)
        assert all("value contains control characters" in line for line in refusals)
        assert rec.received == b""
        # Ordinary values still pass, UTF-8 and tabs included.
        token = _token(rsa_key, name="Zoë\tB")
        r = await c.request("GET", "/me", {"Authorization": f"Bearer {token}"})
        assert r.status == 200
        await c.close()
        await asyncio.sleep(0)
        assert rec.request_lines() == [b"GET /me HTTP/1.1"]
        assert b"x-user-name: Zo\xc3\xab\tB\r\n" in rec.received
        assert b"x-admin" not in rec.received.lower()


async def test_client_headers_with_control_characters_never_reach_the_upstream(gateway):
    rec = Recorder()
    async with rec.upstream:
        gw = await gateway(base_config(rec.upstream.port, routes=[
            {"route": "$default", "integration": {"type": "http", "upstream": "demo"}}]))
        for head in [b"GET / HTTP/1.1\r\nHost: gw.test\r\nX-A: a\rX-Admin: 1\r\n\r\n",
                     b"GET / HTTP/1.1\r\nHost: gw.test\r\nX-A: a\x00b\r\n\r\n",
                     b"GET / HTTP/1.1\r\nHost: gw.test\r\nX-Request-Id: a\x01\r\n\r\n",
                     b"GET / HTTP/1.1\r\nHost: gw.test\nX-Admin: 1\r\n\r\n"]:
            c = await RawClient.connect(gw.addresses[0])
            await c.send(head)
            r = await c.read_response()
            assert r.status == 400, head
            await c.close()
        assert rec.received == b""


async def test_build_request_helper_is_plain():
    # guards the helper the tests above rely on: no stray bytes of its own
    assert build_request("GET", "/x") == b"GET /x HTTP/1.1\r\nHost: gw.test\r\n\r\n"


def test_the_choke_point():
    from edgeplane.http.fields import MAX_VALUE_BYTES, UnsafeField, check_field, field_line
    from edgeplane.http.request import forwarded

    assert field_line(b"x-user", "Zoë\tB".encode()) == "x-user: Zoë\tB\r\n".encode()
    for name, value in [(b"x-a", b"a\r\nb"), (b"x-a", b"\x00"), (b"x a", b"v"), (b"", b"v"),
                        (b"x:a", b"v"), (b"x-a", b"v" * (MAX_VALUE_BYTES + 1))]:
        with pytest.raises(UnsafeField):
            check_field(name, value)
    check_field(b"x-a", b"v" * MAX_VALUE_BYTES)
    # non-string claims are compact JSON: control characters come out escaped
    assert forwarded([(b"x-roles", "roles")], {"roles": ["a\nb"]}) == [(b"x-roles", b'["a\\nb"]')]
    with pytest.raises(UnsafeField):
        forwarded([(b"x-name", "name")], {"name": "a\r\nb"})


async def test_the_gateways_own_client_refuses_unsafe_values():
    from edgeplane.config.model import PoolConfig, Target
    from edgeplane.upstream.client import FetchError, fetch
    from edgeplane.upstream.pool import TargetPool

    rec = Recorder()
    async with rec.upstream:
        pool = TargetPool(Target("http", "127.0.0.1", rec.upstream.port), PoolConfig(),
                          asyncio.get_running_loop(), upstream="ws-backend")
        try:
            with pytest.raises(FetchError, match="control characters"):
                await fetch(pool, "POST", "/x", headers={"x-route-key": "a\r\nX-Admin: 1"})
            status, _, _ = await fetch(pool, "POST", "/x", headers={"x-name": "Zoë"})
            assert status == 200
            assert rec.request_lines() == [b"POST /x HTTP/1.1"]
            assert "x-name: Zoë\r\n".encode() in rec.received
        finally:
            await pool.close()


@pytest.mark.parametrize("parser", PARSERS)
async def test_trailer_fields_never_become_upstream_headers(gateway, parser):
    rec = Recorder()
    async with rec.upstream:
        gw = await gateway(base_config(rec.upstream.port, routes=[
            {"route": "ANY /{proxy+}", "host": "internal.example.com",
             "integration": {"type": "mock", "status": 403}},
            {"route": "$default", "integration": {"type": "http", "upstream": "demo",
                                                  "preserve_host": True}}],
            http={"parser": parser}))
        c = await RawClient.connect(gw.addresses[0])
        await c.send(b"POST /x HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\nHost: internal.example.com\r\nX-Request-Id: a b\r\n"
                     b"Authorization: Bearer forged\r\n\r\n")
        r = await c.read_response()
        assert r.status == 200
        await c.close()
        head = bytes(rec.received).split(b"\r\n\r\n", 1)[0].lower()
        assert b"host: gw.test\r\n" in head and b"internal.example.com" not in rec.received
        assert b"forged" not in rec.received and b"x-request-id: a b" not in head
