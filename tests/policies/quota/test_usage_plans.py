"""Usage plans through the real gateway: per-key plan throttle, quotas with 429 Limit
Exceeded, quota counts surviving a real restart, `edgeplane usage`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import base_config
from edgeplane import Gateway
from edgeplane.config.loader import ConfigError, load_config
from edgeplane.policies.api_keys.store import generate_key


@pytest.fixture
def keys(tmp_path):
    gold, gold_hash = generate_key()
    free, free_hash = generate_key()
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - {{id: acme, hash: '{gold_hash}', plan: gold}}\n"
                    f"  - {{id: hobby, hash: '{free_hash}', plan: free}}\n")
    return {"gold": gold, "free": free, "file": str(path)}


def plan_config(port: int, keys: dict, data_dir: str) -> dict:
    cfg = base_config(port, routes=[{"route": "GET /data", "auth": "partners",
                                     "integration": {"type": "http", "upstream": "demo"}}])
    cfg["authorizers"] = {"partners": {"type": "api_key", "keys_file": keys["file"]}}
    cfg["usage_plans"] = {"gold": {"throttle": {"rate": 0.5, "burst": 3}},
                          "free": {"quota": {"limit": 2, "period": "DAY"}}}
    cfg["data_dir"] = data_dir
    return cfg


async def test_plan_throttle_is_per_key(upstream, gateway, client_factory, keys, tmp_path):
    gw = await gateway(plan_config(upstream.port, keys, str(tmp_path / "data")))
    c = await client_factory(gw.addresses[0])
    for _ in range(3):
        assert (await c.request("GET", "/data", headers={"X-API-Key": keys["gold"]})).status == 200
    r = await c.request("GET", "/data", headers={"X-API-Key": keys["gold"]})
    assert r.status == 429 and r.json() == {"message": "Too Many Requests"}
    assert r.header("ratelimit").startswith('"plan";r=0')


async def test_quota_exhaustion_and_persistence_across_restart(upstream, client_factory, keys, tmp_path):
    data = str(tmp_path / "data")
    cfg = plan_config(upstream.port, keys, data)
    gw = Gateway(cfg)
    await gw.start()
    try:
        c = await client_factory(gw.addresses[0])
        assert (await c.request("GET", "/data", headers={"X-API-Key": keys["free"]})).status == 200
    finally:
        await gw.stop()  # flushes the counters
    gw = Gateway(cfg)  # a real restart: a new gateway on the same data dir
    await gw.start()
    try:
        c = await client_factory(gw.addresses[0])
        assert (await c.request("GET", "/data", headers={"X-API-Key": keys["free"]})).status == 200
        r = await c.request("GET", "/data", headers={"X-API-Key": keys["free"]})
        assert r.status == 429 and r.json() == {"message": "Limit Exceeded"}
        # The other key (another plan, no quota) is unaffected.
        assert (await c.request("GET", "/data", headers={"X-API-Key": keys["gold"]})).status == 200
    finally:
        await gw.stop()
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "edgeplane", "usage", "-c", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("hobby"))
    assert line.split()[-1] == "2"


def test_plan_config_errors_are_located(keys, tmp_path):
    cfg = plan_config(9001, keys, str(tmp_path))
    cfg["usage_plans"] = {"gold": {"quota": {"limit": 5, "period": "DAY", "offset": 3}}}
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    text = "\n".join(exc.value.errors)
    assert "usage_plans.gold.quota" in text
    assert "keys refer to usage plan 'free'" in text


@pytest.mark.timeout(60)
async def test_plan_throttle_holds_across_two_workers(upstream, keys, tmp_path):
    """With workers: 2 the plan's per-key bucket is in the shared keyed table: the gold
    key's burst of 3 holds for the whole server (per-process buckets would admit ~6)."""
    from test_processes import _start_serve, _statuses_on_new_connections, _stop, _worker_pids

    cfg = plan_config(upstream.port, keys, str(tmp_path / "data"))
    cfg["usage_plans"]["gold"]["throttle"]["rate"] = 0.01
    cfg["workers"] = 2
    proc, addr, admin, lines, drain = await _start_serve(tmp_path, cfg)
    try:
        await _worker_pids(admin)
        statuses = await _statuses_on_new_connections(addr, 12, "/data", {"X-API-Key": keys["gold"]})
        assert 3 <= statuses.count(200) <= 4 and set(statuses) == {200, 429}, statuses
    finally:
        assert await _stop(proc, drain) == 0


async def test_plan_route_throttle_replaces_the_plan_default_on_that_route(upstream, gateway, client_factory,
                                                                           keys, tmp_path):
    """AWS method throttling: `usage_plans.gold.routes` gives the plan its own per-key
    bucket on a route; other routes keep the plan's default bucket."""
    cfg = plan_config(upstream.port, keys, str(tmp_path / "data"))
    cfg["routes"].append({"route": "GET /search", "auth": "partners",
                          "integration": {"type": "http", "upstream": "demo"}})
    cfg["usage_plans"]["gold"]["routes"] = {"GET /search": {"rate": 0.01, "burst": 1}}
    gw = await gateway(cfg)
    c = await client_factory(gw.addresses[0])
    gold = {"X-API-Key": keys["gold"]}
    assert (await c.request("GET", "/search", headers=gold)).status == 200
    r = await c.request("GET", "/search", headers=gold)
    assert r.status == 429 and r.header("ratelimit-policy").startswith('"plan";q=1')
    for _ in range(3):   # /data: the plan's default bucket (burst 3), untouched by /search
        assert (await c.request("GET", "/data", headers=gold)).status == 200
    assert (await c.request("GET", "/data", headers=gold)).status == 429


def test_plan_route_throttle_errors_are_located(keys, tmp_path):
    cfg = plan_config(9001, keys, str(tmp_path))
    cfg["routes"].append({"route": "GET /open", "integration": {"type": "mock"}})
    cfg["usage_plans"]["gold"]["routes"] = {"GET /dta": {"rate": 1, "burst": 1},
                                            "GET /open": {"rate": 1, "burst": 1},
                                            "GET /data": {"rate": 0, "burst": 1}}
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    text = "\n".join(exc.value.errors)
    assert "usage_plans.gold.routes.GET /dta: no route has this key; did you mean 'GET /data'?" in text
    assert "usage_plans.gold.routes.GET /open: the route has no api_key authorizer" in text
    assert "usage_plans.gold.routes.GET /data" in text


@pytest.mark.timeout(60)
async def test_plan_route_throttle_holds_across_two_workers(upstream, keys, tmp_path):
    from test_processes import _start_serve, _statuses_on_new_connections, _stop, _worker_pids

    cfg = plan_config(upstream.port, keys, str(tmp_path / "data"))
    cfg["routes"].append({"route": "GET /search", "auth": "partners",
                          "integration": {"type": "http", "upstream": "demo"}})
    cfg["usage_plans"]["gold"]["routes"] = {"GET /search": {"rate": 0.01, "burst": 2}}
    cfg["workers"] = 2
    proc, addr, admin, lines, drain = await _start_serve(tmp_path, cfg)
    try:
        await _worker_pids(admin)
        statuses = await _statuses_on_new_connections(addr, 10, "/search", {"X-API-Key": keys["gold"]})
        assert 2 <= statuses.count(200) <= 3 and set(statuses) == {200, 429}, statuses
    finally:
        assert await _stop(proc, drain) == 0


async def test_plan_throttle_and_quota_refusals_are_in_the_metrics(upstream, gateway, client_factory, keys, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    gw = await gateway(plan_config(upstream.port, keys, str(tmp_path / "data")))
    c = await client_factory(gw.addresses[0])
    statuses = [(await c.request("GET", "/data", headers={"X-API-Key": keys["gold"]})).status for _ in range(5)]
    statuses += [(await c.request("GET", "/data", headers={"X-API-Key": keys["free"]})).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429, 429, 200, 200, 429, 429]
    admin = await client_factory(gw.admin_address)
    text = (await admin.request("GET", "/metrics")).body.decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("edgeplane_throttled_requests_total", (("level", "plan"),))] == 2
    assert samples[("edgeplane_quota_refusals_total", (("plan", "free"),))] == 2
