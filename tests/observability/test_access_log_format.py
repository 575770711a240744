"""`access_log.format` through a real gateway: AWS JSON templates, line formats, typed
mappings, located errors, a destination that blocks, Python logging and the embedder's
callback. Lines are read back from real files (and a real FIFO nobody reads)."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest
from test_metrics import scrape, value

from conftest import RawClient, base_config
from edgeplane import Gateway
from edgeplane.config.loader import ConfigError, load_config

pytestmark = pytest.mark.timeout(60)

AWS_JSON = ('{ "requestId":"$context.requestId", "ip": "$context.identity.sourceIp", '
            '"requestTime":"$context.requestTime", "httpMethod":"$context.httpMethod", '
            '"routeKey":"$context.routeKey", "status": $context.status, "protocol":"$context.protocol", '
            '"responseLength":"$context.responseLength", "integrationStatus": $context.integrationStatus, '
            '"integrationError":"$context.integrationErrorMessage", "ua": "$context.identity.userAgent", '
            '"latency": $context.responseLatency, "domain": "$context.domainName", "stage": "$context.stage", '
            '"type": "$context.error.responseType" }')


def config(port: int, log_path, fmt) -> dict:
    cfg = base_config(port, routes=[
        {"route": "GET /users/{id}", "integration": {"type": "http", "upstream": "demo"}},
        {"route": "GET /teapot", "integration": {"type": "mock", "status": 418, "body": {}}},
    ])
    cfg["access_log"] = {"destination": "file", "path": str(log_path), "format": fmt}
    return cfg


async def get(addr, path: str, headers: dict | None = None):
    return await RawClient.once(addr, "GET", path, headers)


async def lines_of(gw: Gateway, log_path, n: int) -> list[str]:
    for _ in range(100):
        gw._access_log.flush(wait=2.0)
        text = log_path.read_text() if log_path.exists() else ""
        if text.count("\n") >= n:
            return text.splitlines()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{n} lines not written: {text!r}")


async def test_an_aws_json_template_quoted_values_stay_strings_unquoted_become_json(upstream, gateway, tmp_path):
    log_path = tmp_path / "access.log"
    gw = await gateway(config(upstream.port, log_path, AWS_JSON))
    r = await get(gw.addresses[0], "/users/7", {"user-agent": 'evil"agent\\\u00e9',
                                                "x-request-id": "client-id-1"})
    assert r.status == 200
    assert (await get(gw.addresses[0], "/nowhere")).status == 404
    first, second = (json.loads(x) for x in await lines_of(gw, log_path, 2))
    assert first["requestId"] == "client-id-1" and first["ip"] == "127.0.0.1"
    assert first["status"] == 200 and first["integrationStatus"] == 200  # unquoted: numbers
    assert first["responseLength"] == str(len(r.body))  # quoted in the template: a string, as AWS
    assert first["routeKey"] == "GET /users/{id}" and first["protocol"] == "HTTP/1.1"
    assert first["ua"] == 'evil"agent\\\u00e9'  # escaped in the line, the same value read back
    assert first["integrationError"] == "-" and first["type"] == "-"  # absent inside a string: '-'
    assert first["stage"] == "$default" and first["domain"] == "gw.test"  # the Host the client sent
    assert isinstance(first["latency"], float)
    assert second["status"] == 404 and second["type"] == "RESOURCE_NOT_FOUND"
    assert second["integrationStatus"] is None and second["routeKey"] == "-"


async def test_a_line_format_escapes_what_could_forge_a_line(upstream, gateway, tmp_path):
    log_path = tmp_path / "access.log"
    clf = ('$context.identity.sourceIp - - [$context.requestTime] "$context.httpMethod $context.routeKey '
           '$context.protocol" $context.status $context.responseLength $context.requestId '
           '"$context.identity.userAgent"')
    gw = await gateway(config(upstream.port, log_path, clf))
    await get(gw.addresses[0], "/teapot", {"user-agent": 'a" 200 0 forged "x', "x-request-id": "r1"})
    (line,) = await lines_of(gw, log_path, 1)
    assert line.startswith('127.0.0.1 - - [')
    assert line.endswith('] "GET GET /teapot HTTP/1.1" 418 2 r1 "a\\x22 200 0 forged \\x22x"')


async def test_a_mapping_format_is_typed_with_claims_and_plugin_free_names(upstream, gateway, tmp_path):
    log_path = tmp_path / "access.log"
    fmt = {"id": "$context.requestId", "status": "$context.status", "route": "route=$context.routeKey",
           "int": "$context.integrationLatency", "err": "$context.error.message", "v": 2}
    gw = await gateway(config(upstream.port, log_path, fmt))
    await get(gw.addresses[0], "/teapot", {"x-request-id": "m1"})
    (line,) = await lines_of(gw, log_path, 1)
    assert json.loads(line) == {"id": "m1", "status": 418, "route": "route=GET /teapot", "int": None,
                                "err": None, "v": 2}


def test_unknown_variables_and_broken_templates_are_located_errors(tmp_path):
    def errors(fmt) -> list[str]:
        cfg = base_config(1, routes=[{"route": "GET /x", "integration": {"type": "mock"}}])
        cfg["access_log"] = {"format": fmt}
        with pytest.raises(ConfigError) as exc:
            load_config(cfg)
        return exc.value.errors

    (err,) = errors('$context.requestId $context.nope')
    assert err.startswith("access_log.format: unknown variable $context.nope (at offset 19)")
    (err,) = errors({"id": "$context.requestId", "who": "$context.authorizer.claims"})
    assert err.startswith("access_log.format.who: unknown variable $context.authorizer.claims")
    (err,) = errors('{"status": $context.status')
    assert err.startswith("access_log.format: the format starts with '{' but is not a JSON template")
    (err,) = errors({"nested": {"a": "$context.status"}})
    assert err.startswith("access_log.format.nested: a value must be a string")
    (err,) = errors({"big": 2**70})
    assert err.startswith("access_log.format.big: a constant JSON cannot hold")
    (err,) = errors("$context.status\t$context.path")
    assert err.startswith("access_log.format: a format cannot contain control characters")
    fmt = "$context.authorizer.claims.email $context.authorizer.tenant"
    ok = load_config(base_config(1, access_log={"format": fmt}))
    assert ok.access_log.render is not None


async def test_a_destination_that_blocks_never_stalls_requests_and_drops_are_counted(upstream, gateway, tmp_path):
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, but never read: the pipe fills
    try:
        cfg = config(upstream.port, fifo, {"id": "$context.requestId", "pad": "x" * 900})
        cfg["access_log"].update(queue_bytes="16KiB", buffer_bytes="4KiB")
        gw = await gateway(cfg)
        c = await RawClient.connect(gw.addresses[0])
        try:
            for _ in range(600):  # ~560 KiB of lines against a 64 KiB pipe and a 16 KiB queue
                assert (await c.request("GET", "/teapot")).status == 418
        finally:
            await c.close()
        gw._access_log.flush()  # the writer is blocked: do not wait for it
        stats = gw.stats()
        assert stats["access_log_lines"] == 600
        assert stats["access_log_dropped"] > 400  # most of it: only the pipe and the queue took any
        _, fam = await scrape(gw.admin_address)
        assert value(fam, "edgeplane_access_log_dropped_lines_total") == stats["access_log_dropped"]
        assert value(fam, "edgeplane_access_log_lines_total") == 600
    finally:
        os.close(reader)


async def test_embedders_get_records_by_callback_and_lines_through_python_logging(upstream, caplog):
    got: list[dict] = []
    cfg = config(upstream.port, None, "$context.status $context.routeKey")
    cfg["access_log"] = {"destination": "logging", "format": "$context.status $context.routeKey"}
    gw = Gateway(cfg, access_log_callback=got.extend)
    caplog.set_level(logging.INFO, logger="edgeplane.access")
    await gw.start()
    try:
        assert (await get(gw.addresses[0], "/teapot")).status == 418
        gw._access_log.flush(wait=2.0)
        for _ in range(100):
            if any(r.name == "edgeplane.access" for r in caplog.records):
                break
            await asyncio.sleep(0.02)
    finally:
        await gw.stop(drain_timeout=1.0)
    assert [r.getMessage() for r in caplog.records if r.name == "edgeplane.access"] == ["418 GET /teapot"]
    assert len(got) == 1 and got[0]["status"] == 418 and got[0]["routeKey"] == "GET /teapot"
