"""Hot reload inside one gateway (`Gateway.reload`, `POST /config/reload`).

Through a real gateway on loopback: kept-alive raw clients, the demo upstream, a real
WebSocket upstream, real API-key files and certificates rewritten between reloads.
The signal and multi-worker paths are in test_lifecycle.py (real processes).
"""

from __future__ import annotations

import asyncio
import json
import ssl

import orjson
import pytest
import yaml

from conftest import RawClient, base_config
from edgeplane.config.loader import ConfigError
from edgeplane.runtime.reload import ReloadRefused
from jwks_peer import EmptyJwks

pytestmark = pytest.mark.timeout(60)


def mock(route: str, body: dict) -> dict:
    return {"route": route, "integration": {"type": "mock", "status": 200, "body": body}}


async def admin(gw, method: str, path: str) -> tuple[int, dict]:
    c = await RawClient.connect(gw.admin_address)
    try:
        r = await c.request(method, path)
        return r.status, orjson.loads(r.body)
    finally:
        await c.close()


async def test_the_next_request_on_a_kept_alive_connection_routes_on_the_new_config(upstream, gateway):
    gw = await gateway(base_config(upstream.port, routes=[mock("GET /v", {"v": 1})]))
    c = await RawClient.connect(gw.addresses[0])
    assert (await c.request("GET", "/v")).json() == {"v": 1}
    report = await gw.reload(base_config(upstream.port, routes=[mock("GET /v", {"v": 2}),
                                                                 mock("GET /new", {"new": True})]))
    assert report["routes"] == 2 and len(report["hash"]) == 12
    assert (await c.request("GET", "/v")).json() == {"v": 2}  # same connection
    assert (await c.request("GET", "/new")).json() == {"new": True}
    await c.close()
    stats = gw.stats()["reloads"]
    assert stats["ok"] == 1 and stats["failed"] == 0 and stats["last"]["hash"] == report["hash"]


async def test_a_refused_config_changes_nothing(upstream, gateway, caplog):
    gw = await gateway(base_config(upstream.port, routes=[mock("GET /v", {"v": 1})]))
    bad = base_config(upstream.port, routes=[{"route": "GET /v", "integration": {"type": "http",
                                                                                  "upstream": "nope"}}])
    with pytest.raises(ConfigError) as exc:
        await gw.reload(bad)
    assert any("unknown upstream 'nope'" in e for e in exc.value.errors)
    with pytest.raises(ReloadRefused, match="workers"):
        await gw.reload(base_config(upstream.port, routes=[mock("GET /v", {"v": 3})], workers=2))
    c = await RawClient.connect(gw.addresses[0])
    assert (await c.request("GET", "/v")).json() == {"v": 1}
    await c.close()
    assert gw.stats()["reloads"]["failed"] == 2
    assert any("refused; the running config" in r.getMessage() for r in caplog.records)


async def test_the_admin_call_reloads_from_the_file(upstream, gateway, tmp_path):
    path = tmp_path / "edgeplane.yaml"
    path.write_text(yaml.safe_dump(base_config(upstream.port, routes=[mock("GET /v", {"v": 1})])))
    gw = await gateway(str(path))
    path.write_text(yaml.safe_dump(base_config(upstream.port, routes=[mock("GET /v", {"v": 2})])))
    status, body = await admin(gw, "POST", "/config/reload")
    assert status == 200 and body["routes"] == 1
    c = await RawClient.connect(gw.addresses[0])
    assert (await c.request("GET", "/v")).json() == {"v": 2}
    path.write_text("routes: [\n")  # broken YAML
    status, body = await admin(gw, "POST", "/config/reload")
    assert status == 422 and body["errors"] and "keeps serving" in body["message"]
    assert (await c.request("GET", "/v")).json() == {"v": 2}
    await c.close()


async def test_an_unchanged_upstream_keeps_its_pool_and_a_changed_one_drains(upstream, gateway):
    from edgeplane.runtime.demo_upstream import DemoUpstream

    cfg = base_config(upstream.port)
    gw = await gateway(cfg)
    c = await RawClient.connect(gw.addresses[0])
    assert (await c.request("GET", "/users/1")).status == 200
    report = await gw.reload(base_config(upstream.port, routes=cfg["routes"] + [mock("GET /x", {})]))
    assert report["upstreams_kept"] == ["demo"]
    assert (await c.request("GET", "/users/2")).status == 200
    target = gw.upstream_telemetry()[0]["targets"][0]
    assert target["opened"] == 1 and target["reused"] >= 1  # the idle connection carried over
    async with DemoUpstream() as other:
        report = await gw.reload(base_config(other.port))
        assert report["upstreams_new"] == ["demo"] and report["upstreams_retired"] == ["demo"]
        r = await c.request("GET", "/users/3")
        assert r.status == 200 and r.json()["headers"]["host"] == f"127.0.0.1:{other.port}"
    await c.close()


async def test_throttle_buckets_of_unchanged_limits_keep_their_tokens(upstream, gateway):
    def cfg(burst: int, extra: list) -> dict:
        return base_config(upstream.port, routes=[
            {**mock("GET /t", {}), "throttle": {"rate": 0.001, "burst": burst}}, *extra])

    gw = await gateway(cfg(1, []))
    c = await RawClient.connect(gw.addresses[0])
    assert (await c.request("GET", "/t")).status == 200
    assert (await c.request("GET", "/t")).status == 429
    await gw.reload(cfg(1, [mock("GET /other", {})]))  # this limit unchanged: still empty
    assert (await c.request("GET", "/t")).status == 429
    await gw.reload(cfg(2, [mock("GET /other", {})]))  # a new limit: a new, full bucket
    assert (await c.request("GET", "/t")).status == 200
    await c.close()


async def test_api_keys_are_read_again(upstream, gateway, tmp_path):
    from edgeplane.policies.api_keys.store import generate_key

    first, first_hash = generate_key()
    second, second_hash = generate_key()
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - {{id: one, hash: '{first_hash}'}}\n")
    cfg = base_config(upstream.port, routes=[{**mock("GET /p", {}), "auth": "partners"}])
    cfg["authorizers"] = {"partners": {"type": "api_key", "keys_file": str(keys)}}
    gw = await gateway(cfg)
    c = await RawClient.connect(gw.addresses[0])
    assert (await c.request("GET", "/p", {"X-API-Key": first})).status == 200
    assert (await c.request("GET", "/p", {"X-API-Key": second})).status == 403
    keys.write_text(f"keys:\n  - {{id: one, hash: '{first_hash}', enabled: false}}\n"
                    f"  - {{id: two, hash: '{second_hash}'}}\n")
    await gw.reload(cfg)
    assert (await c.request("GET", "/p", {"X-API-Key": second})).status == 200  # added
    assert (await c.request("GET", "/p", {"X-API-Key": first})).status == 403  # revoked
    await c.close()


async def test_listeners_are_added_and_removed(upstream, gateway):
    gw = await gateway(base_config(upstream.port, routes=[mock("GET /v", {})]))
    first = gw.addresses[0]
    cfg = base_config(upstream.port, routes=[mock("GET /v", {})])
    cfg["listen"] = [f"127.0.0.1:{first[1]}", "127.0.0.1:0"]
    await gw.reload(cfg)
    assert len(gw.addresses) == 2
    added = gw.addresses[1]
    c = await RawClient.connect(added)
    assert (await c.request("GET", "/v")).status == 200
    await c.close()
    cfg["listen"] = ["127.0.0.1:0"]
    await gw.reload(cfg)  # the fixed-port listener goes; a new ephemeral one comes
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection(*first), 2)


async def test_a_websocket_opened_before_a_reload_keeps_working(gateway):
    from ws_peers import WsClient, WsUpstream

    up = await WsUpstream("echo").start()
    try:
        cfg = base_config(up.port, routes=[{"route": "GET /ws", "integration": {"type": "http",
                                                                                 "upstream": "demo"}}])
        gw = await gateway(cfg)
        ws = await WsClient.connect(gw.addresses[0], "/ws")
        assert ws.status == 101
        ws.send_text("before")
        assert await ws.recv() == "before"
        await gw.reload(base_config(up.port, routes=[mock("GET /ws", {"gone": True})]))
        ws.send_text("after")
        assert await ws.recv() == "after"  # still relayed on the route it opened with
        c = await RawClient.connect(gw.addresses[0])
        assert (await c.request("GET", "/ws")).json() == {"gone": True}  # new requests: new route
        await c.close()
        await ws.aclose()
    finally:
        await up.stop()


async def test_a_rotated_certificate_is_served_on_the_next_handshake(upstream, gateway, tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Reload CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def write_leaf(cn: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("api.example.test")]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        (tmp_path / "api.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / "api-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    def peer_cn(writer) -> str:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    write_leaf("first")
    cfg = base_config(upstream.port, routes=[mock("GET /v", {})])
    cfg["tls"] = {"listen": ["127.0.0.1:0"], "certificates": [
        {"cert": str(tmp_path / "api.pem"), "key": str(tmp_path / "api-key.pem")}]}
    gw = await gateway(cfg)
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))

    async def served_cn() -> str:
        _, writer = await asyncio.open_connection(*gw.tls_addresses[0], ssl=client,
                                                  server_hostname="api.example.test")
        try:
            return peer_cn(writer)
        finally:
            writer.close()

    assert await served_cn() == "first"
    write_leaf("second")
    await gw.reload(json.loads(json.dumps(cfg)))
    assert await served_cn() == "second"


async def test_a_request_routed_before_its_upstream_changed_is_still_served(upstream, gateway):
    from edgeplane.runtime.demo_upstream import DemoUpstream

    route = {"route": "ANY /api/{proxy+}", "integration": {"type": "http", "upstream": "demo",
                                                             "path": "/{proxy}", "timeout": "5s"}}
    gw = await gateway(base_config(upstream.port, routes=[route]))
    c = await RawClient.connect(gw.addresses[0])
    # routed on the old config, its body still arriving (held before a connection is taken)
    await c.send(b"POST /api/echo HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 10\r\n\r\n01234")
    async with DemoUpstream() as other:
        report = await gw.reload(base_config(other.port, routes=[route]))
        assert report["upstreams_retired"] == ["demo"]
        await c.send(b"56789")
        r = await c.read_response(timeout=5)
        assert r.status == 200 and r.json()["body"] == "0123456789"  # by the old upstream
        assert r.json()["headers"]["host"] == f"127.0.0.1:{upstream.port}"
        r = await c.request("POST", "/api/echo", body=b"next")
        assert r.json()["headers"]["host"] == f"127.0.0.1:{other.port}"  # the next: the new one
    await c.close()


async def test_an_unchanged_jwt_authorizer_keeps_its_key_set_source(upstream, gateway):
    """A JWKS URL is not fetched again for an authorizer whose settings did not change;
    a changed one gets a new source (and fetches)."""
    server = await EmptyJwks().start()
    url = server.url

    def cfg(audience: str, extra: list) -> dict:
        c = base_config(upstream.port, routes=[{**mock("GET /me", {}), "auth": "users"}, *extra])
        c["authorizers"] = {"users": {"type": "jwt", "issuer": "https://auth.test/", "audience": [audience],
                                      "algorithms": ["RS256"], "jwks": {"url": url}}}
        return c

    try:
        gw = await gateway(cfg("api", []))
        assert server.fetches == 1
        source = gw._runtime.state["jwt"]["users"]
        await gw.reload(cfg("api", [mock("GET /other", {})]))
        await asyncio.sleep(0.1)  # the scenario: a fetch, if any, would have gone out
        assert server.fetches == 1 and gw._runtime.state["jwt"]["users"] is source  # kept, not refetched
        await gw.reload(cfg("api-v2", []))  # the authorizer changed: a new source
        assert server.fetches == 2 and gw._runtime.state["jwt"]["users"] is not source
    finally:
        server.close()


async def test_a_reload_that_cannot_bind_answers_422_and_changes_nothing(upstream, gateway, tmp_path):
    path = tmp_path / "edgeplane.yaml"
    cfg = base_config(upstream.port, routes=[mock("GET /v", {"v": 1})])
    path.write_text(yaml.safe_dump(cfg))
    gw = await gateway(str(path))
    cfg["routes"] = [mock("GET /v", {"v": 2})]
    cfg["listen"] = [f"127.0.0.1:{gw.addresses[0][1]}", f"127.0.0.1:{upstream.port}"]  # taken
    path.write_text(yaml.safe_dump(cfg))
    status, body = await admin(gw, "POST", "/config/reload")
    assert status == 422 and str(upstream.port) in body["errors"][0]
    c = await RawClient.connect(gw.addresses[0])
    assert (await c.request("GET", "/v")).json() == {"v": 1}
    await c.close()
    assert gw.stats()["reloads"]["failed"] == 1


async def test_refused_reload_errors_name_file_line_and_route(upstream, gateway, tmp_path):
    path = tmp_path / "edgeplane.yaml"
    path.write_text(yaml.safe_dump(base_config(upstream.port, routes=[mock("GET /v", {"v": 1})])))
    gw = await gateway(str(path))
    path.write_text(yaml.safe_dump(base_config(upstream.port, routes=[
        {"route": "GET /v", "integration": {"type": "http", "upstream": "nope"}}])))
    status, body = await admin(gw, "POST", "/config/reload")
    assert status == 422
    assert any(e.startswith(f"{path}:") and "routes[0] (GET /v).integration.upstream" in e
               for e in body["errors"]), body["errors"]


async def test_a_reload_that_fails_while_applied_leaves_the_running_authorizers_open(gateway):
    """The new runtime takes over the unchanged authorizer clients; when the reload then
    fails (here: a listener it cannot bind), they go back to the running config, open."""
    import socket

    from authorizer_peer import AuthorizerPeer

    peer = await AuthorizerPeer(lambda event: {"isAuthorized": event["headers"].get("authorization") == "good"}
                                ).start()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        cfg = base_config(routes=[{"route": "GET /h", "auth": "custom", "integration": {"type": "mock"}}])
        cfg["authorizers"] = {"custom": {"type": "http", "url": peer.url, "result_ttl": "0s"}}
        gw = await gateway(cfg)
        assert (await RawClient.once(gw.addresses[0], "GET", "/h", headers={"authorization": "good"})).status == 200
        broken = {**cfg, "listen": ["127.0.0.1:0", f"127.0.0.1:{taken.getsockname()[1]}"]}
        with pytest.raises(OSError):
            await gw.reload(broken)
        for credential, status in (("good", 200), ("bad", 403)):  # not cached: the client is called
            r = await RawClient.once(gw.addresses[0], "GET", "/h", headers={"authorization": credential})
            assert r.status == status, r.body
        assert len(peer.seen) == 3
    finally:
        taken.close()
        peer.close()
