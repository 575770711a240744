"""examples/plugins/tenant_header.py, loaded from a config file by module path, through a
real gateway in front of the real demo upstream: no edit to core code."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from conftest import RawClient
from edgeplane import ConfigError, Gateway, load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plugins"


@pytest.fixture
def example_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def _config_file(tmp_path: Path, upstream_port: int, access_log: Path) -> Path:
    path = tmp_path / "edgeplane.yaml"
    path.write_text(f"""\
listen: 127.0.0.1:0
plugins: ["tenant_header"]
access_log: {{destination: file, path: {access_log}}}
upstreams:
  demo: {{targets: ["http://127.0.0.1:{upstream_port}"]}}
routes:
  - route: ANY /orders/{{proxy+}}
    integration: {{type: http, upstream: demo}}
    tenant:
      allowed: [acme, globex]
      status: 403
      message: unknown tenant
  - route: GET /status
    integration: {{type: mock, body: {{ok: true}}}}
    tenant: {{header: X-Org, allowed: [acme], status: 404, message: no such org}}
  - route: GET /open
    integration: {{type: mock, body: {{open: true}}}}
""")
    return path


async def test_the_example_plugin_refuses_stamps_and_logs_through_a_real_gateway(
        example_path, upstream, tmp_path):
    log_file = tmp_path / "access.log"
    gw = Gateway(_config_file(tmp_path, upstream.port, log_file))
    await gw.start()
    try:
        client = await RawClient.connect(gw.addresses[0])
        # missing and unlisted tenants: the plugin's own status and message
        r = await client.request("GET", "/orders/1")
        assert (r.status, r.json()) == (403, {"message": "unknown tenant"})
        assert r.header("x-tenant") is None
        r = await client.request("GET", "/orders/1", headers={"X-Tenant": "initech"})
        assert (r.status, r.json()) == (403, {"message": "unknown tenant"})
        # allowed: proxied, and the upstream's answer is stamped
        r = await client.request("GET", "/orders/7?x=1", headers={"X-Tenant": "acme"})
        assert r.status == 200
        assert r.json()["path"] == "/orders/7"
        assert r.header("x-tenant") == "acme"
        # a local (mock) answer is stamped too; another route's header and status
        r = await client.request("GET", "/status", headers={"X-Org": "acme"})
        assert (r.status, r.json(), r.header("x-tenant")) == (200, {"ok": True}, "acme")
        r = await client.request("GET", "/status", headers={"X-Tenant": "acme"})
        assert (r.status, r.json()) == (404, {"message": "no such org"})
        # a route without `tenant:` is untouched
        r = await client.request("GET", "/open")
        assert (r.status, r.header("x-tenant")) == (200, None)
        client.writer.close()
    finally:
        await gw.stop()
    lines = [orjson.loads(line) for line in log_file.read_bytes().splitlines()]
    by_path = [(x["path"], x["status"], x.get("context")) for x in lines]
    assert ("/orders/7", 200, {"tenant": "acme"}) in by_path
    assert ("/orders/1", 403, None) in by_path
    assert gw.stats()["errors"].get("403") == 2


async def test_a_plugins_context_key_is_an_access_log_variable(example_path, upstream, tmp_path):
    log_file = tmp_path / "access.log"
    path = _config_file(tmp_path, upstream.port, log_file)
    path.write_text(path.read_text().replace(
        f"access_log: {{destination: file, path: {log_file}}}",
        f"access_log: {{destination: file, path: {log_file}, format: '$context.tenant $context.status'}}"))
    gw = Gateway(path)
    await gw.start()
    try:
        client = await RawClient.connect(gw.addresses[0])
        assert (await client.request("GET", "/orders/7", headers={"X-Tenant": "globex"})).status == 200
        assert (await client.request("GET", "/open")).status == 200
        client.writer.close()
    finally:
        await gw.stop()
    assert log_file.read_text().splitlines() == ["globex 200", "- 200"]
    # without the plugin, the name is unknown: a located error
    with pytest.raises(ConfigError) as exc:
        load_config({"listen": "127.0.0.1:0", "access_log": {"format": "$context.tenant"},
                     "routes": [{"route": "GET /x", "integration": {"type": "mock"}}]})
    assert exc.value.errors[0].startswith("access_log.format: unknown variable $context.tenant")


def test_the_example_plugins_config_errors_are_located(example_path, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("""\
listen: 127.0.0.1:0
plugins: ["tenant_header"]
routes:
  - route: GET /a
    integration: {type: mock}
    tenant: {allowed: ["  "], statuz: 403}
""")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.errors == [
        "routes[0].tenant: unknown key 'statuz', did you mean 'status'?",
        "routes[0].tenant.allowed[0]: a tenant name cannot be blank",
    ]
    assert [e.line for e in err.value.entries] == [6, 6]


def test_without_the_plugin_the_key_is_unknown(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config({"listen": "127.0.0.1:0",
                     "routes": [{"route": "GET /a", "integration": {"type": "mock"},
                                 "tenant": {"allowed": ["acme"]}}]})
    assert "routes[0]: unknown key 'tenant'" in err.value.errors[0]
