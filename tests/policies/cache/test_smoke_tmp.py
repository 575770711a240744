import pytest
from conftest import RawClient, base_config
from policies.cache.cache_peers import ScriptedUpstream

pytestmark = pytest.mark.timeout(30)

async def test_smoke(gateway):
    async with ScriptedUpstream() as up:
        cfg = base_config(routes=[{"route": "GET /c/{proxy+}", "integration": {"type": "http", "upstream": "app"},
                                   "cache": {"ttl": "60s"}}])
        cfg["upstreams"] = {"app": {"targets": [f"http://127.0.0.1:{up.port}"]}}
        gw = await gateway(cfg)
        addr = gw.addresses[0]
        r1 = await RawClient.once(addr, "GET", "/c/a?x=1")
        r2 = await RawClient.once(addr, "GET", "/c/a?x=1")
        print(r1.status, r1.headers, r1.body)
        print(r2.status, r2.headers, r2.body)
        assert r1.header("x-cache") == "Miss" and r2.header("x-cache") == "Hit"
        assert r1.body == r2.body
        assert up.count("/c/a?x=1") == 1
