"""A Python handler behind an AWS-style WebSocket API, with a real wsproto client: the
AWS WebSocket event for $connect, messages and $disconnect, and a $connect refused by a
non-2xx answer, as a Lambda refuses it."""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import base_config
from integrations.function import fn_handlers
from ws_peers import WsClient

pytestmark = pytest.mark.timeout(30)

H = "integrations.function.fn_handlers:ws_handler"


def config() -> dict:
    cfg = base_config(routes=[{"route": "GET /ping", "integration": {"type": "mock"}}])
    fn = {"type": "function", "handler": H}
    cfg["websocket_apis"] = {"chat": {"path": "/chat", "route_selection": "$request.body.action", "routes": {
        "$connect": {"integration": fn}, "$disconnect": {"integration": fn},
        "sendMessage": {"integration": fn, "return_response": True}}}}
    return cfg


async def test_a_function_serves_a_websocket_api(gateway):
    fn_handlers.WS_EVENTS.clear()
    gw = await gateway(config())
    refused = await WsClient.connect(gw.addresses[0], "/chat?token=wrong")
    assert refused.status == 403 and refused.body == b"no"
    client = await WsClient.connect(gw.addresses[0], "/chat?token=open-sesame", headers={"X-Team": "blue"})
    assert client.status == 101
    client.send_text(json.dumps({"action": "sendMessage", "data": "hi"}))
    answer = json.loads(await client.recv())
    assert answer["echo"] == "hi" and answer["route"] == "sendMessage"
    client.close()
    await client.recv()
    for _ in range(50):  # $disconnect is called after the close, best effort
        if fn_handlers.WS_EVENTS[-1]["requestContext"]["eventType"] == "DISCONNECT":
            break
        await asyncio.sleep(0.05)
    kinds = [e["requestContext"]["eventType"] for e in fn_handlers.WS_EVENTS]
    assert kinds == ["CONNECT", "CONNECT", "MESSAGE", "DISCONNECT"]
    connect, message, gone = fn_handlers.WS_EVENTS[1:]
    assert connect["headers"]["x-team"] == "blue" and connect["queryStringParameters"] == {"token": "open-sesame"}
    ids = {e["requestContext"]["connectionId"] for e in (connect, message, gone)}
    assert len(ids) == 1 and answer["connectionId"] in ids
    ctx = message["requestContext"]
    assert ctx["routeKey"] == "sendMessage" and ctx["messageId"] and ctx["connectedAt"] > 0
    assert json.loads(message["body"]) == {"action": "sendMessage", "data": "hi"}
    assert gone["requestContext"]["disconnectStatusCode"] == 1000
