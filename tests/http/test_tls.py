"""TLS termination, SNI, mTLS, https upstreams and `edgeplane certs dev`.

Real handshakes on loopback; every certificate is made here with `cryptography`: a CA,
leaf certificates for `api.example.test` and `*.wild.test`, a client CA with a client
certificate, an upstream certificate for 127.0.0.1 / `up.internal`, and a second,
unrelated CA for the wrong-CA cases.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import base_config
from edgeplane.config.loader import ConfigError, load_config
from edgeplane.http.tls import ListenerTls, inspect_pair
from edgeplane.runtime.cli import main as cli_main

# ---------------------------------------------------------------------------
# a small PKI


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeplane tests")])


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _make_ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _make_leaf(ca_cert, ca_key, cn: str, dns: list[str] = (), ips: list[str] = ()):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


@dataclass
class Pair:
    cert: str
    key: str


@dataclass
class Pki:
    ca: str
    other_ca: str
    client_ca: str
    api: Pair
    wild: Pair
    client: Pair
    upstream: Pair
    nosan: Pair


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d: Path = tmp_path_factory.mktemp("pki")

    def write(name: str, cert, key=None) -> str:
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (d / f"{name}-key.pem").write_bytes(_key_pem(key))
        return str(d / f"{name}.pem")

    def pair(name: str, cert, key) -> Pair:
        write(name, cert, key)
        return Pair(str(d / f"{name}.pem"), str(d / f"{name}-key.pem"))

    ca, ca_key = _make_ca("Test Root CA")
    other, _ = _make_ca("Other Root CA")
    cca, cca_key = _make_ca("Client CA")
    return Pki(
        ca=write("ca", ca), other_ca=write("other-ca", other), client_ca=write("client-ca", cca),
        api=pair("api", *_make_leaf(ca, ca_key, "api.example.test", dns=["api.example.test"])),
        wild=pair("wild", *_make_leaf(ca, ca_key, "*.wild.test", dns=["*.wild.test"])),
        client=pair("client", *_make_leaf(cca, cca_key, "partner-7")),
        upstream=pair("upstream", *_make_leaf(ca, ca_key, "upstream", dns=["up.internal"],
                                              ips=["127.0.0.1"])),
        nosan=pair("nosan", *_make_leaf(ca, ca_key, "nosan")),
    )


def tls_config(pki: Pki, **extra) -> dict:
    return {
        "listen": ["127.0.0.1:0"],
        "certificates": [{"cert": pki.api.cert, "key": pki.api.key},
                         {"cert": pki.wild.cert, "key": pki.wild.key}],
        **extra,
    }


def client_ctx(cafile: str, *, check_hostname: bool = True, cert: Pair | None = None,
               max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = check_hostname
    ctx.set_alpn_protocols(["http/1.1"])
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    if max_version is not None:
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = max_version
    return ctx


async def handshake(addr, ctx: ssl.SSLContext, server_name: str | None):
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(addr[0], addr[1], ssl=ctx, server_hostname=server_name), 5)
    return reader, writer


def peer_cn(writer) -> str:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


async def https_get(addr, ctx: ssl.SSLContext, server_name: str | None, path: str,
                    host: str = "api.example.test") -> tuple[int, dict, bytes]:
    reader, writer = await handshake(addr, ctx, server_name)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower().decode(): v.strip().decode()
               for k, _, v in (ln.partition(b":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def refused(addr, ctx: ssl.SSLContext) -> bool:
    """The TLS handshake fails: no HTTP response bytes ever arrive."""
    try:
        reader, writer = await handshake(addr, ctx, "api.example.test")
    except (ssl.SSLError, ConnectionError):
        return True
    try:
        writer.write(b"GET /ping HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(-1), 5)
    except (ssl.SSLError, ConnectionError):
        return True
    finally:
        writer.close()
    return data == b""


# ---------------------------------------------------------------------------
# listeners and SNI


async def test_sni_selects_certificate_and_default(pki, gateway):
    gw = await gateway(base_config(None, routes=[
        {"route": "GET /ping", "integration": {"type": "mock", "body": {"ok": True}}}],
        tls=tls_config(pki)))
    addr = gw.tls_addresses[0]
    verifying = client_ctx(pki.ca)
    _, w = await handshake(addr, verifying, "api.example.test")
    assert peer_cn(w) == "api.example.test"
    w.close()
    _, w = await handshake(addr, verifying, "eu.wild.test")  # wildcard from the SAN
    assert peer_cn(w) == "*.wild.test"
    assert w.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    assert w.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    w.close()
    no_name = client_ctx(pki.ca, check_hostname=False)  # chain still verified
    for name in ("unknown.test", "a.b.wild.test", "wild.test", None):
        _, w = await handshake(addr, no_name, name)
        assert peer_cn(w) == "api.example.test", name
        w.close()


def test_sni_selection_rules(pki):
    class Ctx:  # ListenerTls only sets sni_callback on the default context
        sni_callback = None

    ca, cb = Ctx(), Ctx()
    sel = ListenerTls([(ca, ["api.example.test"]), (cb, ["*.wild.test", "Exact.Wild.Test"])])
    assert sel.select("API.example.test.") is ca
    assert sel.select("x.wild.test") is cb and sel.select("exact.wild.test") is cb
    assert sel.select("x.y.wild.test") is ca and sel.select("wild.test") is ca
    assert sel.select(None) is ca and sel.select("") is ca


async def test_https_request_forwards_proto_https(pki, upstream, gateway):
    gw = await gateway(base_config(upstream.port, tls=tls_config(pki)))
    status, _, body = await https_get(gw.tls_addresses[0], client_ctx(pki.ca), "api.example.test",
                                      "/users/1")
    assert status == 200
    assert orjson.loads(body)["headers"]["x-forwarded-proto"] == "https"
    # the plain listener still serves plain HTTP with "http"
    reader, writer = await asyncio.open_connection(*gw.addresses[0])
    writer.write(b"GET /users/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert b'"x-forwarded-proto":"http"' in data


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
async def test_old_tls_versions_refused(pki, gateway):
    gw = await gateway(base_config(None, routes=[
        {"route": "GET /ping", "integration": {"type": "mock"}}],
        tls=tls_config(pki, min_version="1.3")))
    addr = gw.tls_addresses[0]
    try:
        old = client_ctx(pki.ca, max_version=ssl.TLSVersion.TLSv1_1)
    except (ssl.SSLError, ValueError):
        old = None
    if old is not None:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await handshake(addr, old, "api.example.test")
    with pytest.raises((ssl.SSLError, ConnectionError)):  # min_version 1.3 refuses 1.2
        await handshake(addr, client_ctx(pki.ca, max_version=ssl.TLSVersion.TLSv1_2), "api.example.test")
    _, w = await handshake(addr, client_ctx(pki.ca), "api.example.test")
    assert w.get_extra_info("ssl_object").version() == "TLSv1.3"
    w.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
async def test_tls11_refused_by_default_listener(pki, gateway):
    gw = await gateway(base_config(None, routes=[
        {"route": "GET /ping", "integration": {"type": "mock"}}], tls=tls_config(pki)))
    try:
        old = client_ctx(pki.ca, max_version=ssl.TLSVersion.TLSv1_1)
    except (ssl.SSLError, ValueError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(gw.tls_addresses[0], old, "api.example.test")


# ---------------------------------------------------------------------------
# mTLS


async def test_mtls_required(pki, gateway, tmp_path):
    log_path = tmp_path / "access.log"
    gw = await gateway(base_config(None, routes=[
        {"route": "GET /ping", "integration": {"type": "mock", "body": {"ok": True}}}],
        tls=tls_config(pki, client_ca=pki.client_ca, client_cert="required"),
        access_log={"destination": "file", "path": str(log_path), "flush_interval": "50ms"}))
    addr = gw.tls_addresses[0]
    # Without a client certificate the handshake fails (under TLS 1.3 the client learns
    # it on its first read: an alert or a closed connection, never an HTTP answer).
    assert await refused(addr, client_ctx(pki.ca))
    # A certificate from another CA is refused too.
    assert await refused(addr, client_ctx(pki.ca, cert=pki.api))
    status, _, body = await https_get(addr, client_ctx(pki.ca, cert=pki.client),
                                      "api.example.test", "/ping")
    assert status == 200 and orjson.loads(body) == {"ok": True}
    await gw.stop()
    lines = [orjson.loads(x) for x in log_path.read_bytes().splitlines()]
    assert [ln["clientCertSubject"] for ln in lines] == ["O=edgeplane tests,CN=partner-7"]


async def test_mtls_optional(pki, gateway, tmp_path):
    log_path = tmp_path / "access.log"
    gw = await gateway(base_config(None, routes=[
        {"route": "GET /ping", "integration": {"type": "mock"}}],
        tls=tls_config(pki, client_ca=pki.client_ca, client_cert="optional"),
        access_log={"destination": "file", "path": str(log_path), "flush_interval": "50ms"}))
    addr = gw.tls_addresses[0]
    assert (await https_get(addr, client_ctx(pki.ca), "api.example.test", "/ping"))[0] == 200
    assert (await https_get(addr, client_ctx(pki.ca, cert=pki.client), "x.wild.test", "/ping"))[0] == 200
    await gw.stop()
    subjects = [orjson.loads(x)["clientCertSubject"] for x in log_path.read_bytes().splitlines()]
    assert subjects == [None, "O=edgeplane tests,CN=partner-7"]


# ---------------------------------------------------------------------------
# https upstreams


class TlsOrigin:
    """A tiny HTTPS origin (asyncio.start_server with an SSL context)."""

    def __init__(self, pair: Pair) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pair.cert, pair.key)
        self.requests: list[bytes] = []
        self.sni: list[str | None] = []
        self.ctx.sni_callback = lambda obj, name, ctx: self.sni.append(name)

    async def _handle(self, reader, writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                body = b'{"origin":"tls"}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> TlsOrigin:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()


def upstream_config(port: int, tls: dict | None, host: str = "127.0.0.1") -> dict:
    up: dict = {"targets": [f"https://{host}:{port}"]}
    if tls is not None:
        up["tls"] = tls
    cfg = base_config(None, routes=[{"route": "ANY /{proxy+}",
                                     "integration": {"type": "http", "upstream": "secure"}}])
    cfg["upstreams"] = {"secure": up}
    return cfg


@pytest.mark.parametrize(("tls", "status"), [
    ({"ca_file": "CA"}, 200),
    ({"ca_file": "CA", "server_name": "up.internal"}, 200),
    ({"ca_file": "OTHER"}, 502),
    (None, 502),  # system trust store: the test CA is not in it
    ({"ca_file": "OTHER", "verify": False}, 200),
])
async def test_https_upstream_verification(pki, gateway, client_factory, tls, status):
    if tls is not None and "ca_file" in tls:
        tls = {**tls, "ca_file": pki.ca if tls["ca_file"] == "CA" else pki.other_ca}
    async with TlsOrigin(pki.upstream) as origin:
        gw = await gateway(upstream_config(origin.port, tls))
        c = await client_factory(gw.addresses[0])
        for _ in range(2):  # the second request reuses the pooled TLS connection
            r = await c.request("GET", "/hello")
            assert r.status == status
        if status == 200:
            assert r.json() == {"origin": "tls"}
            assert len(origin.requests) == 2
            assert b"host: 127.0.0.1:%d" % origin.port in origin.requests[0]
            pool = gw._upstreams["secure"].pools[0]
            assert pool.opened == 1 and pool.reused == 1
            expected_sni = (tls or {}).get("server_name")  # IP targets send no SNI
            assert origin.sni[0] == expected_sni
        else:
            assert r.json() == {"message": "Bad Gateway"} or r.status == 502
            assert origin.requests == []


# ---------------------------------------------------------------------------
# config validation


def tls_errors(cfg: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    return info.value.errors


def test_tls_config_loads(pki):
    cfg = load_config(base_config(None, tls=tls_config(
        pki, listen="127.0.0.1:0", min_version=1.3, client_ca=pki.client_ca)))
    assert cfg.tls.min_version == "1.3" and cfg.tls.client_cert == "required"
    assert cfg.tls.certificates[0].hosts == ("api.example.test",)
    assert cfg.tls.certificates[1].hosts == ("*.wild.test",)
    explicit = load_config(base_config(None, tls={
        "listen": ["127.0.0.1:0"], "certificates": [
            {"cert": pki.nosan.cert, "key": pki.nosan.key},
            {"cert": pki.api.cert, "key": pki.api.key, "hosts": ["API.Example.test", "*.x.test"]}]}))
    assert explicit.tls.certificates[0].hosts == ()
    assert explicit.tls.certificates[1].hosts == ("api.example.test", "*.x.test")


def test_tls_config_errors_by_location(pki, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    errors = tls_errors(base_config(None, tls={
        "listen": ["127.0.0.1:8443"],
        "certificates": [
            {"cert": str(tmp_path / "missing.pem"), "key": pki.api.key},
            {"cert": pki.api.cert, "key": pki.wild.key},
            {"cert": str(bad), "key": pki.api.key},
            {"cert": pki.api.cert, "key": str(tmp_path / "nokey.pem")},
            {"cert": pki.nosan.cert, "key": pki.nosan.key},
            {"cert": pki.api.cert, "key": pki.api.key, "hosts": ["a.*.test"]},
        ],
        "min_version": "1.1",
        "client_cert": "required",
    }))
    joined = "\n".join(errors)
    assert "tls.certificates[0]: certificate file not found:" in joined
    assert "tls.certificates[1]: key " in joined and "does not match certificate" in joined
    assert "tls.certificates[2]: " in joined and "is not a PEM certificate" in joined
    assert "tls.certificates[3]: key file not found:" in joined
    assert "tls.certificates[4]: " in joined and "set 'hosts'" in joined
    assert "tls.certificates[5].hosts[0]: invalid host" in joined
    assert "tls.min_version: must be '1.2' or '1.3', got '1.1'" in joined
    assert "tls.client_cert: needs 'client_ca'" in joined
    assert "Traceback" not in joined


def test_tls_listen_collision_and_upstream_tls_errors(pki, tmp_path):
    errors = tls_errors(base_config(None, listen=["127.0.0.1:8080"], tls={
        **tls_config(pki), "listen": ["127.0.0.1:8080"], "client_ca": str(tmp_path / "nope.pem")}))
    assert any(e.startswith("tls.listen[0]: '127.0.0.1:8080' collides with listen") for e in errors)
    assert any(e.startswith("tls.client_ca: file not found") for e in errors)
    cfg = upstream_config(9443, {"ca_file": str(tmp_path / "nope.pem"), "server_name": "bad name"})
    cfg["upstreams"]["plain"] = {"targets": ["http://127.0.0.1:9001"], "tls": {"verify": False}}
    errors = tls_errors(cfg)
    assert "upstreams.secure.tls.ca_file: file not found: " + str(tmp_path / "nope.pem") in errors
    assert any(e.startswith("upstreams.secure.tls.server_name: invalid server name") for e in errors)
    assert "upstreams.plain.tls: only used with https:// targets" in errors
    ok = load_config(upstream_config(9443, None, host="api.example.test"))
    target = ok.upstreams["secure"].targets[0]
    assert (target.scheme, target.port) == ("https", 9443)
    assert load_config(upstream_config(443, None)).upstreams["secure"].targets[0].authority == "127.0.0.1"


# ---------------------------------------------------------------------------
# edgeplane certs dev


async def test_certs_dev_writes_a_working_certificate(tmp_path, gateway, capsys):
    out = tmp_path / "certs"
    assert cli_main(["certs", "dev", "--out", str(out), "--hosts", "localhost,127.0.0.1"]) == 0
    printed = capsys.readouterr().out
    cert, key = out / "dev.pem", out / "dev-key.pem"
    assert str(cert) in printed and str(key) in printed
    assert key.stat().st_mode & 0o077 == 0
    info = inspect_pair(str(cert), str(key))
    assert info.dns_names == ("localhost",)
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert isinstance(parsed.public_key(), ec.EllipticCurvePublicKey)
    lifetime = parsed.not_valid_after_utc - parsed.not_valid_before_utc
    assert datetime.timedelta(days=89) < lifetime <= datetime.timedelta(days=91)
    # refuses to overwrite without --force
    assert cli_main(["certs", "dev", "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    # the files load and serve: a client trusting dev.pem verifies both names
    gw = await gateway(base_config(None, routes=[
        {"route": "GET /ping", "integration": {"type": "mock", "body": {"ok": True}}}],
        tls={"listen": "127.0.0.1:0", "certificates": [{"cert": str(cert), "key": str(key)}]}))
    ctx = client_ctx(str(cert))
    for name in ("localhost", "127.0.0.1"):
        status, _, body = await https_get(gw.tls_addresses[0], ctx, name, "/ping")
        assert status == 200 and orjson.loads(body) == {"ok": True}


async def test_https_upstream_with_a_client_certificate(pki, gateway, client_factory, tmp_path):
    """mTLS to the backend: an origin that requires a client certificate from the client CA."""
    async with TlsOrigin(pki.upstream) as origin:
        origin.ctx.verify_mode = ssl.CERT_REQUIRED
        origin.ctx.load_verify_locations(pki.client_ca)
        gw = await gateway(upstream_config(origin.port, {"ca_file": pki.ca, "cert_file": pki.client.cert,
                                                         "key_file": pki.client.key}))
        c = await client_factory(gw.addresses[0])
        r = await c.request("GET", "/hello")
        assert r.status == 200 and r.json() == {"origin": "tls"}
        # without it, the origin refuses the handshake: 502
        gw2 = await gateway(upstream_config(origin.port, {"ca_file": pki.ca}))
        c2 = await client_factory(gw2.addresses[0])
        assert (await c2.request("GET", "/hello")).status == 502
        assert len(origin.requests) == 1
    errors = tls_errors(upstream_config(9443, {"cert_file": pki.client.cert}))
    assert any("upstreams.secure.tls: give both 'cert_file' and 'key_file'" in e for e in errors)
    errors = tls_errors(upstream_config(9443, {"cert_file": pki.client.cert, "key_file": pki.api.key}))
    assert any(e.startswith("upstreams.secure.tls.cert_file: cannot load the client certificate and key")
               for e in errors)
