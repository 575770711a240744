"""The embedding surface: `async with Gateway(...)` drains for the configured
`drain_timeout`, and the constructor reads no EDGEPLANE_* environment."""

from __future__ import annotations

import asyncio

from conftest import RawClient, base_config
from edgeplane import Gateway


async def test_async_with_drains_for_the_configured_drain_timeout(upstream):
    # 1.5 s in flight when the block ends: longer than the old hard-coded 1 s drain.
    cfg = base_config(upstream.port, drain_timeout="5s")
    async with Gateway(cfg) as gw:
        client = await RawClient.connect(gw.addresses[0])
        pending = asyncio.ensure_future(client.request("GET", "/delay/1500"))
        await asyncio.sleep(0.2)
    r = await pending
    assert r.status == 200 and r.json()["path"] == "/delay/1500"


async def test_the_constructor_ignores_worker_environment(upstream, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPLANE_WORKER_INDEX", "3")
    monkeypatch.setenv("EDGEPLANE_WS_SOCKET_DIR", str(tmp_path))
    monkeypatch.setenv("EDGEPLANE_WS_HOST_TAG", "abcd0123")
    gw = Gateway(base_config(upstream.port))
    assert gw._ws_worker is None
