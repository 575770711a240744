"""A real Prometheus server scrapes the gateway's admin listener, with the admin token.

Debian's `prometheus` (installed by `scripts/test` like redis-server); the test skips,
saying why, only when it is missing. Prometheus scrapes every second; the test asks
its HTTP API for a counter and a rate.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request

import pytest

from conftest import RawClient, base_config

pytestmark = pytest.mark.timeout(90)

PROMETHEUS = shutil.which("prometheus")
TOKEN = "prometheus-scrape-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


async def _until(check, timeout: float, what: str):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while loop.time() < deadline:
        try:
            last = await asyncio.to_thread(check)
        except OSError as exc:  # Prometheus still starting
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(0.25)
    raise AssertionError(f"{what} not reached in {timeout}s (last: {last!r})")


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (scripts/test installs it "
                                               "with apt-get; by hand: apt-get install prometheus)")
async def test_prometheus_scrapes_the_metrics_with_the_admin_token(upstream, gateway, tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    cfg = base_config(upstream.port, routes=[
        {"route": "GET /teapot", "integration": {"type": "mock", "status": 418, "body": {}}},
        {"route": "GET /users/{id}", "integration": {"type": "http", "upstream": "demo"}}])
    cfg["admin"] = {"listen": "127.0.0.1:0", "auth": {"token_file": str(token_file)}}
    gw = await gateway(cfg)
    admin = gw.admin_address
    port = _free_port()
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: edgeplane
    metrics_path: /metrics
    authorization: {{type: Bearer, credentials_file: {token_file}}}
    static_configs: [{{targets: ["{admin[0]}:{admin[1]}"]}}]
""")
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    try:
        for _ in range(7):
            c = await RawClient.connect(gw.addresses[0])
            await c.request("GET", "/teapot")
            await c.close()

        def target_up():
            targets = _api(port, "/api/v1/targets")["data"]["activeTargets"]
            return targets and targets[0]["health"] == "up"

        await _until(target_up, 30, "the scrape target up (authenticated)")

        def teapots():
            result = _api(port, "/api/v1/query",
                          query='edgeplane_requests_total{route="GET /teapot",status="418"}')["data"]["result"]
            return result and float(result[0]["value"][1]) == 7

        await _until(teapots, 15, "the 418 count seen by Prometheus")

        async def load() -> None:  # a steady stream, so the rate is positive
            for _ in range(60):
                c = await RawClient.connect(gw.addresses[0])
                await c.request("GET", "/users/1")
                await c.close()
                await asyncio.sleep(0.05)

        task = asyncio.ensure_future(load())

        def rate():
            query = 'sum(rate(edgeplane_requests_total{route="GET /users/{id}"}[5s]))'
            result = _api(port, "/api/v1/query", query=query)["data"]["result"]
            return result and float(result[0]["value"][1]) > 0

        await _until(rate, 20, "a positive request rate")
        await task
        # a histogram quantile works over the exported buckets
        q = _api(port, "/api/v1/query",
                 query="histogram_quantile(0.99, sum by (le) (rate(edgeplane_request_duration_seconds_bucket[5s])))")
        assert q["status"] == "success"
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
