"""Request validation through a real gateway in front of the real demo upstream: required
headers and query parameters, JSON bodies against named models (whole, chunked, late),
AWS's messages, optional detail, nothing buffered elsewhere, located errors."""

from __future__ import annotations

import json

import pytest

from conftest import RawClient, base_config
from edgeplane.config.loader import ConfigError, load_config

pytestmark = pytest.mark.timeout(30)

ORDER = {"type": "object", "required": ["id", "items"], "additionalProperties": False,
         "properties": {"id": {"type": "string", "pattern": "^ord-[0-9]+$"},
                        "items": {"type": "array", "minItems": 1,
                                  "items": {"type": "object", "required": ["sku", "qty"],
                                            "properties": {"sku": {"type": "string"},
                                                           "qty": {"type": "integer", "minimum": 1}}}}}}


def config(port: int, validation: dict, models: dict | None = None) -> dict:
    cfg = base_config(port, routes=[{"route": "POST /orders", "integration": {"type": "http", "upstream": "demo"},
                                     "request_validation": validation}])
    cfg["models"] = models if models is not None else {"Order": ORDER}
    return cfg


async def test_required_parameters(gateway, upstream):
    gw = await gateway(config(upstream.port, {"required": {"headers": ["X-Api-Version"], "querystring": ["page"]}}))
    addr = gw.addresses[0]
    missing = await RawClient.once(addr, "POST", "/orders")
    assert (missing.status, missing.json()) == (400, {"message": "Missing required request parameters: "
                                                                  "[X-Api-Version, page]"})
    ok = await RawClient.once(addr, "POST", "/orders?page=", {"x-api-version": "2"})
    assert ok.status == 200 and ok.json()["path"] == "/orders"


async def test_the_body_must_match_its_model(gateway, upstream):
    gw = await gateway(config(upstream.port, {"body": "Order"}))
    addr = gw.addresses[0]
    good = json.dumps({"id": "ord-1", "items": [{"sku": "A", "qty": 2}]}).encode()
    r = await RawClient.once(addr, "POST", "/orders", {"content-type": "application/json"}, body=good)
    assert r.status == 200 and r.json()["body"] == good.decode()  # the upstream got it whole
    wrong_item = json.dumps({"id": "ord-1", "items": [{"sku": 1}]}).encode()
    for bad in (b'{"id": "x", "items": []}', b"not json", b"", wrong_item):
        refused = await RawClient.once(addr, "POST", "/orders", body=bad)
        assert (refused.status, refused.json()) == (400, {"message": "Invalid request body"}), bad
    # a chunked body that arrives after the head is read whole, then validated and sent on
    c = await RawClient.connect(addr)
    await c.send(b"POST /orders HTTP/1.1\r\nhost: gw.test\r\ntransfer-encoding: chunked\r\n\r\n")
    await c.send(b"%x\r\n%b\r\n0\r\n\r\n" % (len(good), good))
    assert (await c.read_response()).status == 200
    await c.send(b"POST /orders HTTP/1.1\r\nhost: gw.test\r\ntransfer-encoding: chunked\r\n\r\n"
                 b"5\r\n{\"id\"\r\n0\r\n\r\n")
    assert (await c.read_response()).status == 400
    await c.close()


async def test_detail_names_what_is_wrong(gateway, upstream):
    gw = await gateway(config(upstream.port, {"body": "Order", "detail": True}))
    body = b'{"id": "bad", "items": [{"sku": "A", "qty": 0}]}'
    r = await RawClient.once(gw.addresses[0], "POST", "/orders", body=body)
    got = r.json()
    assert r.status == 400 and got["message"] == "Invalid request body"
    assert any(e.startswith("id:") for e in got["errors"]) and any(e.startswith("items/0/qty:") for e in got["errors"])


def test_mistakes_are_located():
    with pytest.raises(ConfigError) as exc:
        load_config(config(1, {"body": "Ordr"}))
    assert exc.value.errors == ["routes[0].request_validation.body: unknown model 'Ordr' (models: Order)"]
    with pytest.raises(ConfigError) as exc:
        load_config(config(1, {"body": "Order"}, {"Order": {"type": "objekt"}}))
    assert exc.value.errors[0].startswith("models.Order: not a valid JSON Schema")
