"""The gateway's own log as JSON (`log.format: json`), through a real `edgeplane serve`:
every line a worker and the supervisor write is one JSON object, and a line about a
request carries its id."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from test_authorizer_metrics import SECRET, hs256
from test_processes import _start_serve, _stop

from conftest import RawClient, base_config

pytestmark = pytest.mark.timeout(60)


async def test_json_log_lines_carry_the_request_id(upstream, tmp_path):
    (tmp_path / "secret").write_bytes(SECRET)
    cfg = base_config(upstream.port, routes=[
        {"route": "GET /me", "auth": "users", "forward_claims": {"x-user-name": "name"},
         "integration": {"type": "http", "upstream": "demo"}}])
    cfg["authorizers"] = {"users": {"type": "jwt", "issuer": "https://auth.test/", "audience": "api",
                                    "algorithms": ["HS256"], "hs_secret": {"file": str(tmp_path / "secret")}}}
    cfg["log"] = {"format": "json"}
    cfg["workers"] = 2
    proc, addr, _, lines, drain = await _start_serve(tmp_path, cfg)
    try:
        # a valid token whose claim would split the upstream request: refused 400, logged
        token = hs256({"iss": "https://auth.test/", "aud": "api", "exp": int(time.time()) + 60,
                       "name": "Mallory\r\nx-admin: yes"})
        c = await RawClient.connect(addr)
        try:
            r = await c.request("GET", "/me", headers={"authorization": f"Bearer {token}",
                                                       "x-request-id": "json-log-req-1"})
        finally:
            await c.close()
        assert r.status == 400
        found = None
        for _ in range(100):
            objects = [json.loads(x) for x in lines if x.startswith("{")]
            found = next((o for o in objects if o.get("requestId") == "json-log-req-1"), None)
            if found is not None:
                break
            await asyncio.sleep(0.05)
        assert found is not None, lines
        assert found["level"] == "warning" and found["logger"] == "edgeplane.jwks"
        assert "forwarded claim" in found["message"] and found["pid"] != proc.pid  # a worker's
        assert found["time"].endswith("Z")
        assert await _stop(proc, drain) == 0
        # every line is a JSON object, the ready line too (its message is the usual text)
        text = [x for x in lines if x.strip()]
        assert text and all(isinstance(json.loads(x), dict) for x in text), text
        assert any(json.loads(x)["message"].startswith("edgeplane ready: 2 workers") for x in text)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
