"""The public plugin API end to end: request stages (sync and async), response and log
hooks, local replies, and what happens when a plugin is wrong or raises."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from conftest import RawClient, base_config
from edgeplane import ConfigError, Gateway
from edgeplane.plugins import LocalReply, Phase, PluginError, Policy, RequestView, ResponseView, RouteStage


class Probe(Policy):
    """A test policy: the route key `probe` names the behaviour to compile."""

    name = "probe"
    phase = Phase.TRANSFORM
    route_keys = {"probe": {"type": "string"}}

    def __init__(self, hooks: dict[str, Any]) -> None:
        self.hooks = hooks

    def compile(self, route: Any, ctx: Any) -> Any:
        kind = route.policies.get("probe")
        return self.hooks[kind] if kind is not None else None


def _config(upstream_port: int, *routes: tuple[str, str, dict]) -> dict:
    return base_config(upstream_port, routes=[
        {"route": key, "integration": integ, "probe": kind} for key, kind, integ in routes])


HTTP = {"type": "http", "upstream": "demo"}
MOCK = {"type": "mock", "body": {"mock": True}}


async def _started(config: dict, hooks: dict[str, Any]) -> Gateway:
    gw = Gateway(config, plugins=[Probe(hooks)])
    await gw.start()
    return gw


async def test_a_request_view_reads_the_request_and_shares_context(upstream):
    seen: dict[str, Any] = {}

    def look(request: RequestView) -> None:
        seen.update(method=request.method, path=request.path, params=request.path_params,
                    query=request.query, raw=request.raw_query, agent=request.header("USER-AGENT"),
                    missing=request.header("x-none", "dflt"), ip=request.source_ip,
                    route=request.route_key, rid=request.request_id, identity=request.identity)
        request.context["seen"] = True

    def stamp(response: ResponseView) -> None:
        response.set_header("x-seen", str(response.request.context.get("seen")))
        response.remove_header("x-upstream-only")

    gw = await _started(_config(upstream.port, ("GET /items/{id}", "look", HTTP)),
                        {"look": RouteStage(request=look, response=stamp)})
    try:
        client = await RawClient.connect(gw.addresses[0])
        r = await client.request("GET", "/items/42?a=1&b=two", headers={"User-Agent": "t/1",
                                                                        "X-Request-Id": "rid-1"})
        assert r.status == 200 and r.header("x-seen") == "True"
        assert seen == {"method": "GET", "path": "/items/42", "params": {"id": "42"},
                        "query": {"a": "1", "b": "two"}, "raw": "a=1&b=two", "agent": "t/1",
                        "missing": "dflt", "ip": "127.0.0.1", "route": "GET /items/{id}",
                        "rid": "rid-1", "identity": None}
    finally:
        await gw.stop()


async def test_async_request_stages_continue_or_answer(upstream):
    async def slow_ok(request: RequestView) -> None:
        await asyncio.sleep(0.01)
        request.context["waited"] = True

    async def slow_no(request: RequestView) -> LocalReply:
        await asyncio.sleep(0.01)
        return LocalReply(451, {"message": "not here"}, headers={"X-Why": "law"})

    gw = await _started(_config(upstream.port, ("POST /ok", "ok", HTTP), ("GET /no", "no", MOCK)),
                        {"ok": slow_ok, "no": slow_no})
    try:
        client = await RawClient.connect(gw.addresses[0])
        r = await client.request("POST", "/ok", body=b"held while the stage waits")
        assert r.status == 200 and r.json()["body"] == "held while the stage waits"
        r = await client.request("GET", "/no")  # same connection: it carried on
        assert (r.status, r.json(), r.header("x-why")) == (451, {"message": "not here"}, "law")
    finally:
        await gw.stop()


async def test_a_response_hook_changes_the_upstream_status_and_headers(upstream):
    def teapot(response: ResponseView) -> None:
        response.status = 418
        response.add_header("X-Added", "1")

    gw = await _started(_config(upstream.port, ("GET /t", "t", HTTP)), {"t": RouteStage(response=teapot)})
    try:
        client = await RawClient.connect(gw.addresses[0])
        r = await client.request("GET", "/t")
        assert (r.status, r.header("x-added")) == (418, "1")
        assert r.json()["path"] == "/t"  # the body still streams through
    finally:
        await gw.stop()


async def test_a_log_hook_gets_the_access_log_record(upstream):
    records: list[dict] = []

    def tag(request: RequestView) -> None:
        request.context["tenant"] = "acme"

    gw = await _started(_config(upstream.port, ("GET /l", "l", MOCK)),
                        {"l": RouteStage(request=tag, log=records.append)})
    try:
        client = await RawClient.connect(gw.addresses[0])
        assert (await client.request("GET", "/l")).status == 200
        assert len(records) == 1
        assert records[0]["status"] == 200 and records[0]["routeKey"] == "GET /l"
        assert records[0]["context"] == {"tenant": "acme"}
    finally:
        await gw.stop()


@pytest.mark.parametrize("kind", ["raise", "async_raise", "bad_return", "sync_coroutine",
                                  "response_raise", "header_injection"])
async def test_a_broken_plugin_is_a_500_with_a_traceback_and_the_next_request_is_fine(
        upstream, caplog, kind):
    def boom(request: RequestView) -> None:
        raise RuntimeError("plugin bug")

    async def async_boom(request: RequestView) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("plugin bug")

    async def _coro() -> None:
        return None

    def sync_coroutine(request: RequestView) -> Any:
        return _coro()  # declared sync, returns a coroutine

    def inject(response: ResponseView) -> None:
        response.set_header("X-Evil", "a\r\nSet-Cookie: x=1")

    def response_raise(response: ResponseView) -> None:
        raise KeyError("missing")

    hooks = {"raise": boom, "async_raise": async_boom, "bad_return": lambda request: 42,
             "sync_coroutine": sync_coroutine, "response_raise": RouteStage(response=response_raise),
             "header_injection": RouteStage(response=inject)}
    gw = await _started(_config(upstream.port, ("GET /bad", kind, HTTP), ("GET /good", "none", MOCK)),
                        {**hooks, "none": None})
    try:
        client = await RawClient.connect(gw.addresses[0])
        with caplog.at_level(logging.ERROR, logger="edgeplane"):
            r = await client.request("GET", "/bad", headers={"X-Request-Id": "req-500"})
        assert (r.status, r.json()) == (500, {"message": "Internal Server Error"})
        assert r.header("x-evil") is None and r.header("set-cookie") is None
        errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info is not None
        assert "req-500" in errors[0].getMessage()
        r = await client.request("GET", "/good")  # the connection and the worker carry on
        assert r.status == 200
        assert gw.stats()["errors"]["internal"] == 1
    finally:
        await gw.stop()


async def test_a_sync_coroutine_is_named_in_the_log(upstream, caplog):
    async def _coro() -> None:
        return None

    gw = await _started(_config(upstream.port, ("GET /c", "c", MOCK)), {"c": lambda request: _coro()})
    try:
        client = await RawClient.connect(gw.addresses[0])
        assert (await client.request("GET", "/c")).status == 500
        text = "".join(rec.exc_text or "" for rec in caplog.records) + caplog.text
        assert "declared synchronous but returned coroutine; declare it `async def`" in text
    finally:
        await gw.stop()


async def test_async_response_or_log_hooks_are_refused_at_load(upstream):
    async def late(response: ResponseView) -> None:
        return None

    for stage in (RouteStage(response=late), RouteStage(log=late)):
        gw = Gateway(_config(upstream.port, ("GET /x", "x", MOCK)), plugins=[Probe({"x": stage})])
        with pytest.raises(PluginError, match="is `async def`"):
            await gw.start()
        await gw.stop()


def test_two_plugins_claiming_one_key_are_refused_naming_both():
    class Other(Probe):
        name = "other"

    with pytest.raises(ConfigError) as err:
        Gateway(base_config(None, routes=[]), plugins=[Probe({}), Other({})])
    assert err.value.errors == [
        "plugins: route key 'probe' is claimed by both test_public_api.Probe and test_public_api.Other"]


def test_a_plugin_module_that_cannot_be_imported_is_a_located_error():
    with pytest.raises(ConfigError) as err:
        Gateway({**base_config(None, routes=[]), "plugins": ["no_such_module_x"]})
    assert err.value.errors == [
        "plugins[0]: cannot import plugin module 'no_such_module_x': No module named 'no_such_module_x'"]


def test_a_plugin_loader_that_raises_is_a_located_error_with_a_logged_traceback(caplog):
    class Fragile(Policy):
        name = "fragile"
        route_keys = {"fragile": {"type": "integer"}}

        def load_route(self, key: str, value: Any, path: tuple[Any, ...], ctx: Any) -> Any:
            return 100 // value

    cfg = base_config(None, routes=[{"route": "GET /a", "integration": {"type": "mock"}, "fragile": 0}])
    with caplog.at_level(logging.ERROR, logger="edgeplane.config"), pytest.raises(ConfigError) as err:
        Gateway(cfg, plugins=[Fragile()])
    assert err.value.errors == [
        "routes[0].fragile: plugin 'fragile' failed on this value: "
        "ZeroDivisionError: integer division or modulo by zero"]
    assert [r.exc_info is not None for r in caplog.records] == [True]
