"""The CLI as users run it (subprocesses), and the access log as written to a file."""

from __future__ import annotations

import json
import subprocess
import sys

import orjson
import yaml

from conftest import REPO, base_config

ROOT = REPO


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeplane", *args], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)


def test_validate_default_config_ok():
    res = run_cli("validate", "-c", "conf/edgeplane.yaml")
    assert res.returncode == 0, res.stderr
    assert "OK (4 routes, 1 upstreams)" in res.stdout


def test_validate_lists_every_error_by_location(tmp_path):
    bad = {
        "listen": ["127.0.0.1:8080"],
        "upstreams": {"users": {"targets": ["http://127.0.0.1:9001"]},
                      "static": {"targets": ["http://127.0.0.1:9002"]}},
        "routes": [
            {"route": "GET /a", "integration": {"type": "http", "upstream": "users"}},
            {"route": "GET /b", "integration": {"type": "http", "upstream": "users"}},
            {"route": "GET /c", "integration": {"type": "http", "upstream": "userz"}},
            {"route": "GET /a", "integration": {"type": "mock"}},
            {"route": "GET /d", "integration": {"type": "http", "upstream": "users", "tiemout": 3}},
        ],
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    res = run_cli("validate", "-c", str(path))
    assert res.returncode == 1
    err = res.stderr
    assert "routes[2] (GET /c).integration.upstream: unknown upstream 'userz' (known: static, users)" in err
    assert "routes[3] (GET /a): duplicate of routes[0]" in err
    assert "routes[4] (GET /d).integration: unknown key 'tiemout'" in err
    assert "Traceback" not in err


def test_validate_yaml_syntax_error_has_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("listen: [\n  routes: {\n")
    res = run_cli("validate", "-c", str(path))
    assert res.returncode == 1
    assert ":3:1: YAML syntax error" in res.stderr and "Traceback" not in res.stderr


def test_validate_missing_file():
    res = run_cli("validate", "-c", "/nonexistent/edgeplane.yaml")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "/nonexistent/edgeplane.yaml" in res.stderr


def test_routes_prints_priority_order(tmp_path):
    cfg = base_config(9001, routes=[
        {"route": "$default", "integration": {"type": "mock"}},
        {"route": "ANY /files/{proxy+}", "integration": {"type": "mock"}},
        {"route": "GET /files/{name}", "integration": {"type": "mock"}},
        {"route": "GET /files/readme", "integration": {"type": "mock"}},
    ])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_cli("routes", "-c", str(path))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    order = [out.index(p) for p in ("/files/readme", "/files/{name}", "/files/{proxy+}", "$default")]
    assert order == sorted(order)


def test_routes_names_each_routes_integration_and_policies_from_the_registry(tmp_path):
    cfg = base_config(9001, routes=[
        {"route": "GET /open", "integration": {"type": "mock"}, "cors": False},
        {"route": "GET /files/{name}", "integration": {"type": "http", "upstream": "demo", "path": "/v2/{name}"},
         "ip_rules": {"deny": ["10.0.0.0/8"]}, "throttle": {"rate": 5, "burst": 5}},
    ], cors={"allow_origins": ["https://app.example"]})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_cli("routes", "-c", str(path))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["#", "HOST", "METHOD", "PATH", "INTEGRATION", "POLICIES", "ROUTE"]
    files = next(line for line in lines if "/files/{name}" in line)
    assert "http -> demo path=/v2/{name} timeout=29s" in files and "ip_rules, cors, throttle" in files
    open_route = next(line for line in lines if "/open" in line)
    assert "mock 200 (0 bytes application/json)" in open_route
    assert open_route.split()[-2] == "-"  # cors: false on this route, and nothing else


def test_schema_is_json_schema():
    res = run_cli("schema")
    assert res.returncode == 0
    schema = json.loads(res.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "routes" in schema["properties"] and "listen" in schema["properties"]


def test_help_lists_every_command_and_option():
    res = run_cli("--help")
    for cmd in ("serve", "validate", "routes", "schema", "demo-upstream"):
        assert cmd in res.stdout
    res = run_cli("serve", "--help")
    for opt in ("--config", "--workers", "--log-level", "--parser", "--demo-upstream"):
        assert opt in res.stdout


def test_serve_with_bad_config_exits_nonzero(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("listen: nope\n")
    res = run_cli("serve", "-c", str(path))
    assert res.returncode == 1
    assert "listen" in res.stderr and "Traceback" not in res.stderr


async def test_access_log_file_fields(upstream, gateway, client_factory, tmp_path):
    log_path = tmp_path / "access.log"
    gw = await gateway(base_config(upstream.port, access_log={
        "destination": "file", "path": str(log_path), "flush_interval": "50ms"}))
    c = await client_factory(gw.addresses[0])
    r1 = await c.request("GET", "/users/9?q=1", headers={"X-Request-Id": "req-1"})
    r2 = await c.request("GET", "/ping")
    assert r1.status == 200 and r2.status == 200
    bad = await client_factory(gw.addresses[0])
    await bad.send(b"GET /x HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n")
    r3 = await bad.read_response()
    assert r3.status == 400
    await gw.stop()
    lines = [orjson.loads(x) for x in log_path.read_bytes().splitlines()]
    assert len(lines) == 3
    by_id = {ln["requestId"]: ln for ln in lines}
    first = by_id["req-1"]
    assert first["httpMethod"] == "GET" and first["path"] == "/users/9"
    assert first["routeKey"] == "GET /users/{id}" and first["status"] == 200
    assert first["protocol"] == "HTTP/1.1" and first["sourceIp"] == "127.0.0.1"
    assert first["upstream"] == f"http://127.0.0.1:{upstream.port}"
    assert first["integrationLatency"] is not None and first["responseLatency"] >= first["integrationLatency"]
    assert first["responseLength"] == len(r1.body)
    assert "/" in first["requestTime"] and first["requestTimeEpoch"] > 1.7e12
    mock = next(ln for ln in lines if ln["path"] == "/ping")
    assert mock["integrationLatency"] is None and mock["upstream"] is None
    err = next(ln for ln in lines if ln["status"] == 400)
    assert err["error"].startswith("malformed request")
    assert gw.stats()["errors"]["400"] == 1


def test_routes_lists_websocket_apis():
    res = run_cli("routes", "-c", "conf/examples/full.yaml")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "WebSocket APIs (checked before the routes above):" in out
    assert "/chat  websocket_apis.chat  selection $request.body.action" in out
    assert "sendMessage    http -> users POST /message timeout=29s  return_response" in out



def _busy_port():
    """A listening socket on a free loopback port, held so no one else can bind it."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def test_serve_reads_stdin_and_listen_admin_override_the_file(tmp_path):
    """`serve -c - --listen A --listen B --admin C`: the file's own addresses are held by
    another socket here, so the gateway can only start on the overriding ones."""
    import asyncio
    import re

    from conftest import RawClient

    ready = re.compile(r"edgeplane ready: 1 worker on 127\.0\.0\.1:(\d+), 127\.0\.0\.1:(\d+); "
                       r"admin 127\.0\.0\.1:(\d+)")
    with _busy_port() as data, _busy_port() as admin:
        text = yaml.safe_dump({
            "listen": f"127.0.0.1:{data.getsockname()[1]}",
            "admin": {"listen": f"127.0.0.1:{admin.getsockname()[1]}", "insecure": True},
            "access_log": {"destination": "off"},
            "routes": [{"route": "GET /ping", "integration": {"type": "mock", "status": 200, "body": {"ok": True}}}],
        })
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeplane", "serve", "-c", "-", "--listen", "127.0.0.1:0",
            "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", cwd=tmp_path,
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(text.encode())
        proc.stdin.close()
        lines: list[str] = []
        try:
            while not (m := ready.search(lines[-1] if lines else "")):
                line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
                assert line, "serve exited before ready:\n" + "".join(lines)
                lines.append(line)
            ports = [int(p) for p in m.groups()]
            assert data.getsockname()[1] not in ports and admin.getsockname()[1] not in ports
            for port in ports[:2]:
                c = await RawClient.connect(("127.0.0.1", port))
                assert (await c.request("GET", "/ping")).status == 200
                await c.close()
            c = await RawClient.connect(("127.0.0.1", ports[2]))
            assert (await c.request("GET", "/healthz")).status == 200  # admin.insecure from the file stays
            await c.close()
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def test_serve_override_errors_name_no_line_of_the_file(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text('listen: "127.0.0.1:0"\nadmin: {listen: "127.0.0.1:0", insecure: true}\n')
    res = run_cli("serve", "-c", str(path), "--listen", "nowhere", "--admin", "127.0.0.1:99999")
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert lines[0] == f"{path}: invalid configuration (2 errors):"
    assert lines[1].startswith(f"{path}: admin.listen (set by an override): ")
    assert lines[2].startswith(f"{path}: listen[0] (set by an override): ")


def test_routes_reads_stdin():
    text = yaml.safe_dump(base_config(9001, routes=[{"route": "GET /from-stdin", "integration": {"type": "mock"}}]))
    res = subprocess.run([sys.executable, "-m", "edgeplane", "routes", "-c", "-"], input=text,
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "/from-stdin" in res.stdout
    res = subprocess.run([sys.executable, "-m", "edgeplane", "routes", "-c", "-"], input="listen: 5\n",
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 1
    assert res.stderr.splitlines()[1].startswith("<stdin>:1:1: listen: ")
