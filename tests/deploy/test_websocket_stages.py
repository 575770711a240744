"""WebSocket APIs on stages: a deployment's WebSocket API is reached under its stage
(`/prod/chat`), and a stage's canary assigns each connection to one side at `$connect`,
where it stays for its life, across a promotion. Real wsproto clients, real demo
upstreams as the backends (each counts what it received), real recorded deployments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import base_config
from edgeplane.runtime.demo_upstream import DemoUpstream
from ws_peers import WsClient

pytestmark = pytest.mark.timeout(60)


def chat(tmp_path: Path, backend: str, ports: dict[str, int]) -> dict:
    cfg = base_config(routes=[{"route": "GET /ping", "integration": {"type": "mock", "body": {"ok": True}}}])
    cfg["upstreams"] = {name: {"targets": [f"http://127.0.0.1:{port}"]} for name, port in ports.items()}
    route = {"integration": {"type": "http", "upstream": backend, "path": "/message"}, "return_response": True}
    cfg["websocket_apis"] = {"chat": {"path": "/chat", "route_selection": "$request.body.action", "routes": {
        "$connect": {"integration": {"type": "http", "upstream": backend, "path": "/connect"}},
        "sendMessage": route}}}
    cfg["stages"] = {"prod": {}, "dev": {}}
    cfg["data_dir"] = str(tmp_path / "data")
    return cfg


async def say(client: WsClient) -> dict:
    client.send_text('{"action": "sendMessage"}')
    echoed = json.loads(await client.recv())
    return {k: echoed["headers"].get(k) for k in ("x-stage", "x-canary")}


async def test_a_websocket_connection_stays_on_the_side_it_connected_to(gateway, tmp_path):
    from test_deployments import cli, deploy

    async with DemoUpstream() as a, DemoUpstream() as b:
        ports = {"chat_a": a.port, "chat_b": b.port}
        path = tmp_path / "api.yaml"
        path.write_text(yaml.safe_dump(chat(tmp_path, "chat_a", ports)))
        deploy(path, "prod", "chat on a")
        path.write_text(yaml.safe_dump(chat(tmp_path, "chat_b", ports)))
        d_b = deploy(path, "dev", "chat on b")
        cfg = chat(tmp_path, "chat_a", ports)
        cfg["stages"]["prod"]["canary"] = {"deployment": d_b, "percent": 50.0, "force_header": "x-side"}
        path.write_text(yaml.safe_dump(cfg))
        gw = await gateway(str(path))
        addr = gw.addresses[0]
        assert (await WsClient.connect(addr, "/chat")).status == 404  # only under a stage
        on_b = await WsClient.connect(addr, "/prod/chat", {"x-side": "always"})
        on_a = await WsClient.connect(addr, "/prod/chat", {"x-side": "never"})
        assert (on_a.status, on_b.status) == (101, 101)
        assert await say(on_b) == {"x-stage": "prod", "x-canary": "true"}
        assert await say(on_a) == {"x-stage": "prod", "x-canary": None}
        assert (a.requests, b.requests) == (2, 2)  # $connect and one message on each side
        # promoted: new connections go to b; the open ones stay where they connected
        done = cli("canary", "promote", "-c", str(path), "--stage", "prod")
        assert done.returncode == 0, done.stderr
        await gw.reload_from_source()
        fresh = await WsClient.connect(addr, "/prod/chat", {"x-side": "never"})
        assert fresh.status == 101 and await say(fresh) == {"x-stage": "prod", "x-canary": None}
        assert (a.requests, b.requests) == (2, 4)
        assert await say(on_a) == {"x-stage": "prod", "x-canary": None}
        assert await say(on_b) == {"x-stage": "prod", "x-canary": "true"}
        assert (a.requests, b.requests) == (3, 5)
        dev = await WsClient.connect(addr, "/dev/chat")
        assert dev.status == 101 and await say(dev) == {"x-stage": "dev", "x-canary": None}
        assert b.requests == 7  # dev serves deployment b
        for client in (on_a, on_b, fresh, dev):
            await client.aclose()


async def test_a_websocket_api_reaches_its_stages_own_upstream_target(gateway, tmp_path):
    async with DemoUpstream() as dev, DemoUpstream() as prod:
        cfg = chat(tmp_path, "chat", {"chat": 9})
        cfg["upstreams"]["chat"] = {"targets": ["http://127.0.0.1:${stageVariables.port}"]}
        cfg["stages"] = {"dev": {"variables": {"port": str(dev.port)}}, "prod": {"variables": {"port": str(prod.port)}}}
        gw = await gateway(cfg)
        for stage in ("dev", "prod"):
            client = await WsClient.connect(gw.addresses[0], f"/{stage}/chat")
            assert client.status == 101 and (await say(client))["x-stage"] == stage
            await client.aclose()
        assert (dev.requests, prod.requests) == (2, 2)  # $connect and one message each
