"""OpenAPI import and export: an AWS-style PetStore definition (HTTP_PROXY routes, a JWT
authorizer verified against a real JWKS endpoint with real RS256 tokens, CORS, a
validator with a model, gateway responses, a mapping, a Lambda route) imports, serves
real requests through a real gateway, exports as valid OpenAPI, and round-trips."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from conftest import RawClient
from edgeplane.config.loader import load_config
from edgeplane.openapi.exporter import export_openapi
from edgeplane.openapi.importer import import_openapi

pytestmark = pytest.mark.timeout(30)
HERE = Path(__file__).parent


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Jwks:
    """A real JWKS endpoint at ISSUER/.well-known/jwks.json, with an RSA key that signs."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Jwks:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def issuer(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def token(self, scope: str) -> str:
        now = int(time.time())
        head = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "k1"}).encode())
        body = b64(json.dumps({"iss": self.issuer, "aud": "petstore", "sub": "ann", "scope": scope,
                               "iat": now, "exp": now + 600}).encode())
        sig = self.key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{head}.{body}.{b64(sig)}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        numbers = self.key.public_key().public_numbers()
        jwk = {"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
               "n": b64(numbers.n.to_bytes(256, "big")), "e": b64(numbers.e.to_bytes(3, "big"))}
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                ok = head.startswith(b"GET /.well-known/jwks.json ")
                body = json.dumps({"keys": [jwk]}).encode() if ok else b"{}"
                writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                             % (200 if ok else 404, len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def petstore(upstream_port: int, issuer: str) -> dict:
    text = (HERE / "petstore.yaml").read_text()
    return yaml.safe_load(text.replace("UPSTREAM", f"http://127.0.0.1:{upstream_port}").replace("ISSUER", issuer))


async def test_an_aws_style_definition_imports_and_serves(gateway, upstream):
    async with Jwks() as jwks:
        config, report = import_openapi(petstore(upstream.port, jwks.issuer), "openapi.lambda_handlers")
        assert any("x-amazon-apigateway-policy: not supported" in line for line in report)
        assert any("x-amazon-apigateway-throttle is not supported" in line for line in report)
        assert any("JWKS URL taken as ISSUER/.well-known/jwks.json" in line for line in report)
        assert any("Lambda 'hello'" in line for line in report)
        config["listen"], config["admin"]["listen"] = ["127.0.0.1:0"], "127.0.0.1:0"
        config["access_log"] = {"destination": "off"}
        gw = await gateway(config)
        addr = gw.addresses[0]
        listed = await RawClient.once(addr, "GET", "/pets?type=dog")
        got = listed.json()
        assert (listed.status, got["path"], got["query"]) == (200, "/petstore/pets", "type=dog")
        assert got["headers"]["x-source"] == "gateway"
        assert (await RawClient.once(addr, "GET", "/pets/7")).json()["path"] == "/petstore/pets/7"
        refused = await RawClient.once(addr, "POST", "/pets", body=b'{"type": "dog", "price": 30}')
        assert refused.status == 401 and refused.json()["hint"] == "log in"
        assert refused.header("access-control-allow-origin") == "https://petstore.example"
        auth = {"authorization": f"Bearer {jwks.token('pets:write')}", "content-type": "application/json"}
        created = await RawClient.once(addr, "POST", "/pets", auth, body=b'{"type": "dog", "price": 30}')
        assert created.status == 200 and created.json()["method"] == "POST"
        cheap = await RawClient.once(addr, "POST", "/pets", auth, body=b'{"type": "dog", "price": 3}')
        assert (cheap.status, cheap.json()) == (400, {"message": "Invalid request body"})
        no_scope = {**auth, "authorization": f"Bearer {jwks.token('pets:read')}"}
        assert (await RawClient.once(addr, "POST", "/pets", no_scope, body=b"{}")).status == 403
        preflight = await RawClient.once(addr, "OPTIONS", "/pets", {"origin": "https://petstore.example",
                                                                     "access-control-request-method": "POST"})
        assert preflight.header("access-control-allow-origin") == "https://petstore.example"
        assert (await RawClient.once(addr, "GET", "/hello")).json() == {"hello": "/hello"}


def test_export_is_valid_openapi_and_the_round_trip_is_stable():
    from openapi_spec_validator import validate

    first, _ = import_openapi(petstore(8080, "https://auth.example"), "openapi.lambda_handlers")
    load_config(first)
    exported = export_openapi(first)
    validate(exported)
    second, _ = import_openapi(exported, "openapi.lambda_handlers")
    assert second == first
    assert export_openapi(second) == exported


def test_what_a_black_box_review_found(tmp_path, capsys):
    """AND security, REST path mappings, recursive models, malformed definitions, and an
    export of routes AWS cannot say in one operation each ($default, {proxy+}, host-bound
    and conditional routes, route policies) round-tripping."""
    from edgeplane.runtime.cli import main

    doc = {"openapi": "3.0.1", "info": {"title": "t", "version": "1"},
           "components": {"schemas": {"Node": {"type": "object", "properties": {
               "child": {"$ref": "#/components/schemas/Node"}}}},
               "securitySchemes": {"a": {"type": "apiKey", "name": "x-a", "in": "header"},
                                   "b": {"type": "apiKey", "name": "x-b", "in": "header"}}},
           "x-amazon-apigateway-request-validators": {"all": {"validateRequestBody": True}},
           "paths": {"/{proxy+}": {"post": {
               "security": [{"a": [], "b": []}], "x-amazon-apigateway-request-validator": "all",
               "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Node"}}}},
               "x-amazon-apigateway-integration": {
                   "type": "http_proxy", "uri": "http://127.0.0.1:9001/{proxy}",
                   "requestParameters": {"integration.request.path.proxy": "method.request.path.proxy",
                                         "integration.request.header.x-id": "context.requestId"}}}}}}
    config, report = import_openapi(doc)
    assert any("needs a and b at once" in line for line in report)
    route = config["routes"][0]
    assert route["request_parameters"] == {"overwrite:header.x-id": "$context.requestId"}
    assert "$defs" in config["models"]["Node"]  # a recursive model stays a reference
    config["authorizers"]["a"]["keys_file"] = str(tmp_path / "keys.yaml")
    (tmp_path / "keys.yaml").write_text("keys: []\n")
    load_config(config)
    bad = tmp_path / "bad.yaml"
    bad.write_text("openapi: 3.0.1\npaths: {/x: [1, 2]}\ncomponents: null\n")
    assert main(["import", "openapi", str(bad)]) in (0, 1)
    assert "Traceback" not in capsys.readouterr().err
    raw = {"listen": ["127.0.0.1:8080"], "upstreams": {"app": {"targets": ["http://127.0.0.1:9001"]}},
           "routes": [{"route": "ANY /{proxy+}", "integration": {"type": "http", "upstream": "app"}},
                      {"route": "$default", "integration": {"type": "mock"}},
                      {"route": "GET /u", "integration": {"type": "http", "upstream": "app"},
                       "ip_rules": {"deny": ["10.0.0.0/8"]}},
                      {"route": "GET /u", "host": "api.test", "integration": {"type": "mock"}},
                      {"route": "GET /u", "match": {"query": {"v": "2"}}, "integration": {"type": "mock"}}]}
    path = tmp_path / "api.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out.yaml"
    assert main(["export", "openapi", "-c", str(path), "-o", str(out)]) == 0
    back, _ = import_openapi(yaml.safe_load(out.read_text()))
    key = lambda r: (r["route"], str(r.get("host")), str(r.get("match")))  # noqa: E731
    assert sorted(back["routes"], key=key) == sorted(raw["routes"], key=key)
