"""The authenticated admin API (`admin.auth`, `admin.tls`, `admin.insecure`, `admin.public_paths`).

Through real gateways on 127.0.0.1: bearer tokens (from a file, from the environment),
mTLS with certificates made here with `cryptography` (a server CA, a client CA and an
unrelated CA), both together, the public paths, the forwarded-call header on TCP and on
a worker's Unix socket; then the config errors and warnings, as `validate` and `serve`
report them.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import RawClient, Response, base_config
from edgeplane import Gateway
from edgeplane.config.loader import ConfigError, load_config
from edgeplane.config.model import AdminConfig, ListenAddress
from edgeplane.runtime.admin import admin_auth
from edgeplane.runtime.cli import main as cli_main

TOKEN = "adm-7f3c9e1b5d2a4c6e8f0a1b3c5d7e9f10"
ENV = "EDGEPLANE_TEST_ADMIN_TOKEN"
CHALLENGE = 'Bearer realm="edgeplane-admin"'
PRIVATE = [("GET", "/stats"), ("GET", "/routes"), ("GET", "/upstreams"),
           ("POST", "/@connections/x"), ("DELETE", "/@connections/x"), ("GET", "/@connections/x")]
UNKNOWN_ID = base64.urlsafe_b64encode(bytes(12)).decode()  # well formed, held by nobody

# ---------------------------------------------------------------------------
# certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer: tuple | None, *, ca: bool = False, ip: str | None = None):
    """(certificate, key): self-signed when `issuer` is None, else signed by (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    signer_cert, signer_key = issuer if issuer is not None else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(signer_cert.subject if signer_cert is not None else _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    return builder.sign(signer_key, hashes.SHA256()), key


@dataclass
class Pki:
    server_ca: str
    server: tuple[str, str]  # cert, key of 127.0.0.1
    client_ca: str
    client: tuple[str, str]  # signed by client_ca
    rogue: tuple[str, str]  # signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d: Path = tmp_path_factory.mktemp("admin-pki")

    def write(name: str, cert, key=None) -> tuple[str, str]:
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (d / f"{name}-key.pem").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
        return str(d / f"{name}.pem"), str(d / f"{name}-key.pem")

    server_ca = _cert("Admin Server CA", None, ca=True)
    client_ca = _cert("Admin Client CA", None, ca=True)
    other_ca = _cert("Other CA", None, ca=True)
    return Pki(server_ca=write("server-ca", server_ca[0])[0],
               server=write("server", *_cert("admin", server_ca, ip="127.0.0.1")),
               client_ca=write("client-ca", client_ca[0])[0],
               client=write("client", *_cert("operator", client_ca)),
               rogue=write("rogue", *_cert("operator", other_ca)))


def client_tls(pki: Pki, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.server_ca)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


# ---------------------------------------------------------------------------
# helpers


@pytest.fixture
def token_file(tmp_path) -> str:
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return str(path)


def admin_config(admin: dict, **extra) -> dict:
    cfg = base_config(None, routes=[{"route": "GET /ping", "integration": {"type": "mock"}}], **extra)
    cfg["admin"] = {"listen": "127.0.0.1:0", **admin}
    return cfg


async def call(addr, method: str, path: str, *, token: str | None = None, headers: dict | None = None,
               tls: ssl.SSLContext | None = None, body: bytes = b"") -> Response:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    if tls is None:
        client = await RawClient.connect(addr)
    else:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(addr[0], addr[1], ssl=tls, server_hostname="127.0.0.1"), 5)
        client = RawClient(reader, writer)
    try:
        return await client.request(method, path, headers=sent, body=body)
    finally:
        await client.close()


async def refused(addr, tls: ssl.SSLContext) -> bool:
    """The TLS handshake fails: no HTTP answer ever arrives (under TLS 1.3 the client
    learns it on its first read)."""
    try:
        await call(addr, "GET", "/healthz", tls=tls)
    except (ssl.SSLError, ConnectionError):
        return True
    return False


def assert_unauthorized(r: Response, *, invalid: bool = False) -> None:
    assert r.status == 401, (r.status, r.body)
    assert r.json() == {"message": "Unauthorized"}
    assert r.header("www-authenticate") == CHALLENGE + (', error="invalid_token"' if invalid else "")


def problems(admin: dict) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(admin_config(admin))
    return exc.value.errors


# ---------------------------------------------------------------------------
# bearer token


async def test_token_from_file_guards_every_private_path(gateway, token_file):
    gw = await gateway(admin_config({"auth": {"token_file": token_file}}))
    addr = gw.admin_address
    for method, path in PRIVATE:
        assert_unauthorized(await call(addr, method, path, body=b"m" if method == "POST" else b""))
        assert_unauthorized(await call(addr, method, path, token="wrong-token"), invalid=True)
    # What does not count as the token: another scheme, a prefix, two Authorization headers.
    assert_unauthorized(await call(addr, "GET", "/stats", headers={"Authorization": f"Basic {TOKEN}"}))
    assert_unauthorized(await call(addr, "GET", "/stats", token=TOKEN[:-1]), invalid=True)
    twice = (f"GET /stats HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\n"
             f"Authorization: Bearer {TOKEN}\r\n\r\n").encode()
    client = await RawClient.connect(addr)
    await client.send(twice)
    assert_unauthorized(await client.read_response())
    await client.close()
    # The right token: every endpoint answers (@connections: x is malformed, the id unknown).
    for path in ("/stats", "/routes", "/upstreams"):
        assert (await call(addr, "GET", path, token=TOKEN)).status == 200
    assert (await call(addr, "GET", "/routes", headers={"Authorization": f"bearer {TOKEN}"})).status == 200
    assert (await call(addr, "GET", "/@connections/x", token=TOKEN)).status == 400
    for method in ("GET", "POST", "DELETE"):
        assert (await call(addr, method, f"/@connections/{UNKNOWN_ID}", token=TOKEN)).status == 410
    # /healthz stays open for load balancers.
    r = await call(addr, "GET", "/healthz")
    assert r.status == 200 and r.json()["status"] == "ok"


async def test_token_from_environment(gateway, monkeypatch):
    monkeypatch.setenv(ENV, TOKEN)
    gw = await gateway(admin_config({"auth": {"token_env": ENV}}))
    assert_unauthorized(await call(gw.admin_address, "GET", "/stats"))
    assert_unauthorized(await call(gw.admin_address, "GET", "/stats", token="nope"), invalid=True)
    assert (await call(gw.admin_address, "GET", "/stats", token=TOKEN)).status == 200


async def test_public_paths(gateway, token_file):
    closed = await gateway(admin_config({"auth": {"token_file": token_file}, "public_paths": []}))
    assert_unauthorized(await call(closed.admin_address, "GET", "/healthz"))
    assert (await call(closed.admin_address, "GET", "/healthz", token=TOKEN)).status == 200
    every = await gateway(admin_config({"auth": {"token_file": token_file},
                                        "public_paths": list(AdminConfig.PUBLIC_PATH_CHOICES)}))
    for path in AdminConfig.PUBLIC_PATH_CHOICES:
        assert (await call(every.admin_address, "GET", path)).status == 200, path
    assert_unauthorized(await call(every.admin_address, "DELETE", f"/@connections/{UNKNOWN_ID}"))


async def test_forwarded_header_on_tcp_is_no_credential(gateway, token_file):
    gw = await gateway(admin_config({"auth": {"token_file": token_file}}))
    forwarded = {"x-edgeplane-forwarded": "1"}
    for method, path in PRIVATE:
        assert_unauthorized(await call(gw.admin_address, method, path, headers=forwarded))


# ---------------------------------------------------------------------------
# mTLS, TLS with a token, and both


async def test_mtls_with_public_healthz(gateway, pki):
    gw = await gateway(admin_config({
        "tls": {"cert": pki.server[0], "key": pki.server[1], "client_ca": pki.client_ca},
        "auth": {"mtls": True}}))
    addr = gw.admin_address
    r = await call(addr, "GET", "/stats", tls=client_tls(pki, pki.client))
    assert r.status == 200 and "requests_total" in r.json()
    # No certificate: the handshake completes (a load balancer reaches /healthz), every
    # other path is 401.
    assert (await call(addr, "GET", "/healthz", tls=client_tls(pki))).status == 200
    assert_unauthorized(await call(addr, "GET", "/stats", tls=client_tls(pki)))
    assert_unauthorized(await call(addr, "POST", "/@connections/x", tls=client_tls(pki), body=b"m"))
    # A certificate from another CA fails the handshake.
    assert await refused(addr, client_tls(pki, pki.rogue))
    # Plain HTTP on the TLS listener is no way around it.
    with pytest.raises(ConnectionError):
        await call(addr, "GET", "/stats")


async def test_mtls_without_public_paths_requires_a_certificate_in_the_handshake(gateway, pki):
    gw = await gateway(admin_config({
        "tls": {"cert": pki.server[0], "key": pki.server[1], "client_ca": pki.client_ca},
        "auth": {"mtls": True}, "public_paths": []}))
    assert await refused(gw.admin_address, client_tls(pki))
    assert await refused(gw.admin_address, client_tls(pki, pki.rogue))
    assert (await call(gw.admin_address, "GET", "/healthz", tls=client_tls(pki, pki.client))).status == 200


async def test_token_over_tls(gateway, pki, token_file):
    gw = await gateway(admin_config({"tls": {"cert": pki.server[0], "key": pki.server[1]},
                                     "auth": {"token_file": token_file}}))
    assert_unauthorized(await call(gw.admin_address, "GET", "/stats", tls=client_tls(pki)))
    assert (await call(gw.admin_address, "GET", "/stats", token=TOKEN, tls=client_tls(pki))).status == 200


async def test_mtls_and_token_are_both_required(gateway, pki, token_file):
    gw = await gateway(admin_config({
        "tls": {"cert": pki.server[0], "key": pki.server[1], "client_ca": pki.client_ca},
        "auth": {"mtls": True, "token_file": token_file}}))
    addr, with_cert, without = gw.admin_address, client_tls(pki, pki.client), client_tls(pki)
    assert (await call(addr, "GET", "/stats", token=TOKEN, tls=with_cert)).status == 200
    assert_unauthorized(await call(addr, "GET", "/stats", tls=with_cert))
    assert_unauthorized(await call(addr, "GET", "/stats", token="wrong", tls=with_cert), invalid=True)
    assert_unauthorized(await call(addr, "GET", "/stats", token=TOKEN, tls=without))
    assert_unauthorized(await call(addr, "GET", "/stats", tls=without))


# ---------------------------------------------------------------------------
# the workers' Unix sockets: forwarded @connections calls


async def test_forwarded_calls_between_workers_need_no_token_but_tcp_does(upstream, tmp_path, token_file):
    """Two workers of one host (in-process): a call on worker 0's TCP listener for a
    connection of worker 1 is forwarded over worker 1's Unix socket without a token;
    the forwarded header means nothing on TCP, in either direction."""
    cfg = admin_config({"auth": {"token_file": token_file}})
    cfg["upstreams"]["demo"] = {"targets": [f"http://127.0.0.1:{upstream.port}"]}
    cfg["websocket_apis"] = {"chat": {"path": "/chat", "routes": {"$default": {
        "integration": {"type": "http", "upstream": "demo"}, "return_response": True}}}}
    socket_dir = tmp_path / "ws"
    socket_dir.mkdir(mode=0o700)
    tag = os.urandom(4)
    workers = [Gateway(cfg, ws_worker=(i, str(socket_dir), tag)) for i in (0, 1)]
    peer = None
    try:
        for gw in workers:
            await gw.start()
        from wsutil import connect_peer

        peer = await connect_peer(workers[1].addresses[0][1], handshake=True, target="/chat")
        peer.send_text('{"action": "whoami"}')
        echoed = orjson.loads(await peer.recv_message())  # the demo upstream echoes the request
        conn_id = echoed["headers"]["x-connection-id"]
        assert base64.urlsafe_b64decode(conn_id)[0] == 1
        sock = socket_dir / "worker-1.sock"
        assert sock.stat().st_mode & 0o777 == 0o600
        w0 = workers[0].admin_address
        assert_unauthorized(await call(w0, "POST", f"/@connections/{conn_id}", body=b"no"))
        assert_unauthorized(await call(w0, "POST", f"/@connections/{conn_id}", body=b"no",
                                       headers={"x-edgeplane-forwarded": "1"}))
        # With the token: forwarded to worker 1 (a forwarded header sent over TCP does not
        # stop the forwarding either), which delivers it.
        r = await call(w0, "POST", f"/@connections/{conn_id}", token=TOKEN, body=b"hello",
                       headers={"x-edgeplane-forwarded": "1"})
        assert r.status == 200, r.body
        assert await peer.recv_message() == "hello"
        # The Unix socket itself: its mode is the credential, no token is asked.
        reader, writer = await asyncio.open_unix_connection(str(sock))
        unix = RawClient(reader, writer)
        r = await unix.request("GET", f"/@connections/{conn_id}", headers={"x-edgeplane-forwarded": "1"})
        await unix.close()
        assert r.status == 200 and r.json()["connectionId"] == conn_id
    finally:
        if peer is not None:
            peer.abort()
        for gw in workers:
            await gw.stop(drain_timeout=1.0)


# ---------------------------------------------------------------------------
# config: errors, warnings, validate and serve


def test_literal_token_is_refused_with_the_reason():
    errors = problems({"auth": {"token": TOKEN}})
    assert len(errors) == 1 and errors[0].startswith("admin.auth.token: a token is never written in the config"), errors
    assert "token_file" in errors[0] and "token_env" in errors[0] and TOKEN not in errors[0]


def test_token_sources_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nope.token"
    assert problems({"auth": {"token_file": str(missing)}}) == [
        f"admin.auth.token_file: file not found: {missing}"]
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    assert problems({"auth": {"token_file": str(empty)}}) == [f"admin.auth.token_file: file {empty} is empty"]
    spaced = tmp_path / "spaced.token"
    spaced.write_text("two words and more\n")
    (err,) = problems({"auth": {"token_file": str(spaced)}})
    assert err.startswith("admin.auth.token_file: the token in file") and "printable ASCII" in err
    assert "two words" not in err
    monkeypatch.delenv(ENV, raising=False)
    assert problems({"auth": {"token_env": ENV}}) == [f"admin.auth.token_env: environment variable {ENV} is not set"]
    monkeypatch.setenv(ENV, "  ")
    assert problems({"auth": {"token_env": ENV}}) == [f"admin.auth.token_env: environment variable {ENV} is empty"]
    monkeypatch.setenv(ENV, TOKEN)
    assert problems({"auth": {"token_env": ENV, "token_file": str(empty)}}) == [
        "admin.auth: token_file and token_env are both set: choose one"]


def test_a_listener_needs_auth_or_insecure():
    (loopback,) = problems({})
    assert loopback.startswith("admin: the admin listener '127.0.0.1:0' serves any local user")
    assert "add admin.auth" in loopback and "admin.insecure: true" in loopback
    (exposed,) = problems({"listen": "0.0.0.0:9901", "insecure": False})
    assert exposed.startswith("admin: the admin listener '0.0.0.0:9901' is not on a loopback address "
                              "and has no authentication")
    assert problems({"auth": {}}) == ["admin.auth: names no credential: set token_file or token_env "
                                      "(a bearer token), and/or mtls: true (a client certificate)"]
    assert load_config(admin_config({"listen": "[::1]:9901", "insecure": True})).warnings == ()
    assert load_config(admin_config({"listen": "localhost:9901", "insecure": True})).warnings == ()


def test_auth_shape_errors(pki, token_file):
    assert problems({"auth": {"token_file": token_file}, "insecure": True}) == [
        "admin.insecure: contradicts admin.auth (insecure: true means no credentials are asked): "
        "remove one of them"]
    assert problems({"auth": {"mtls": True}, "tls": {"cert": pki.server[0], "key": pki.server[1]}}) == [
        "admin.auth.mtls: needs admin.tls with client_ca (the CA file that client certificates must chain to)"]
    assert problems({"auth": {"token_file": token_file}, "tls": {
        "cert": pki.server[0], "key": pki.server[1], "client_ca": pki.client_ca}}) == [
        "admin.tls.client_ca: only used with admin.auth.mtls: true"]
    assert problems({"auth": {"token_file": token_file}, "public_paths": ["/healthz", "/health"]}) == [
        "admin.public_paths[1]: '/health' cannot be public: choose among /healthz, /ready, /routes, /stats, "
        "/upstreams (@connections always needs credentials)"]
    errors = problems({"auth": {"token_file": token_file}, "tls": {"cert": pki.server[0], "key": pki.client[1]}})
    assert len(errors) == 1 and errors[0].startswith("admin.tls: key ") and "does not match" in errors[0]


def test_warnings(tmp_path, token_file):
    cfg = load_config(admin_config({"listen": "0.0.0.0:9901", "insecure": True}))
    assert cfg.warnings == ("admin.insecure: the admin listener '0.0.0.0:9901' is not on a loopback "
                            "address: /stats, /routes, /upstreams and @connections are served to anyone "
                            "who reaches it",)
    assert load_config(admin_config({"insecure": True})).warnings == ()
    assert load_config(admin_config({"auth": {"token_file": token_file}})).warnings == ()
    clear = load_config(admin_config({"listen": "10.1.2.3:9901", "auth": {"token_file": token_file}}))
    assert clear.warnings == ("admin.auth: the bearer token crosses the network in clear text to the "
                              "admin listener '10.1.2.3:9901': add admin.tls",)
    weak = tmp_path / "weak.token"
    weak.write_text("short")
    weak.chmod(0o644)
    assert load_config(admin_config({"auth": {"token_file": str(weak)}})).warnings == (
        f"admin.auth.token_file: the token in file {weak} has only 5 characters: use at least 32 "
        "random ones (e.g. openssl rand -hex 32)",
        f"admin.auth.token_file: {weak} is readable by every user (mode 644): chmod o-r {weak}")


def test_token_stays_out_of_repr_and_raw(token_file):
    cfg = load_config(admin_config({"auth": {"token_file": token_file}}))
    assert cfg.admin.token == TOKEN.encode()
    assert TOKEN not in repr(cfg) and TOKEN not in orjson.dumps(cfg.raw).decode()


def test_hand_built_listener_without_credentials_fails_closed():
    with pytest.raises(ValueError, match="without credentials"):
        admin_auth(AdminConfig(listen=ListenAddress("127.0.0.1", 0)))
    assert admin_auth(AdminConfig(listen=ListenAddress("127.0.0.1", 0), insecure=True)) is None


def test_validate_prints_admin_errors_and_warnings(tmp_path, capsys):
    path = tmp_path / "gw.yaml"
    cfg = admin_config({"listen": "0.0.0.0:9901"})
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["validate", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:" in err and ": admin: the admin listener '0.0.0.0:9901' is not on a loopback address" in err
    cfg["admin"]["insecure"] = True
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["validate", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}:" in out
    assert "warning: admin.insecure: the admin listener '0.0.0.0:9901' is not on a loopback" in out


@pytest.mark.timeout(60)
async def test_serve_workers_check_the_token_and_warn_once_at_start(tmp_path):
    from test_processes import _start_serve, _stop

    shared = tmp_path / "shared.token"
    shared.write_text(TOKEN)
    shared.chmod(0o644)
    cfg = admin_config({"auth": {"token_file": str(shared)}}, workers=2)
    proc, _, admin, lines, drain = await _start_serve(tmp_path, cfg)
    try:
        pids = set()
        for _ in range(40):  # new connections: SO_REUSEPORT spreads them over both workers
            assert_unauthorized(await call(admin, "GET", "/stats"))
            r = await call(admin, "GET", "/stats", token=TOKEN)
            assert r.status == 200
            pids.add(r.json()["pid"])
            if len(pids) == 2:
                break
    finally:
        code = await _stop(proc, drain)
    assert code == 0, "".join(lines)
    assert len(pids) == 2, pids
    # Logged once, by the supervisor, not by every worker.
    warned = [ln for ln in lines if "WARNING" in ln and "admin.auth.token_file" in ln]
    assert len(warned) == 1 and "readable by every user" in warned[0], "".join(lines)
