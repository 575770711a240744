"""TLS: listener contexts selected by SNI, mTLS subjects, upstream client contexts,
and the development certificate of `edgeplane certs dev`.

Owns every `ssl.SSLContext` the gateway makes. Config loading calls `inspect_pair` to
validate a certificate/key pair (and learn its SAN DNS names); the gateway calls
`ListenerTls.from_config` once at start, the pools call `client_context` once per
upstream. Nothing here runs per request; `client_subject` runs once per TLS connection
and only when the client presented a certificate.

Invariants:
- one server context per configured certificate, all built alike (TLS 1.2+ or 1.3+,
  ALPN "http/1.1", the ssl module's secure default ciphers, the same client-CA
  settings), so switching `ssl_object.context` in the SNI callback changes only the
  certificate presented;
- SNI selection: exact host first, then a wildcard `*.example.com` that matches exactly
  one more label (`a.example.com`, not `example.com` nor `a.b.example.com`); an unknown
  name or no SNI at all gets the first certificate;
- upstream verification is on unless `verify: false` is written in the config.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from edgeplane.config.model import TlsConfig, UpstreamTls

__all__ = [
    "ALPN",
    "CertError",
    "ListenerTls",
    "client_context",
    "client_subject",
    "inspect_pair",
    "make_dev_cert",
    "server_context",
    "write_dev_cert",
]

ALPN = ["http/1.1"]
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class CertError(ValueError):
    """A certificate or key cannot be used; the message says why (no path in it)."""


@dataclass(frozen=True, slots=True)
class PairInfo:
    dns_names: tuple[str, ...]  # SAN DNS names, lower-case
    subject: str  # RFC 4514


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise CertError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise CertError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def _spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def inspect_pair(cert_path: str, key_path: str) -> PairInfo:
    """Check that `cert_path` holds a PEM certificate (chain), `key_path` its unencrypted
    private key, and that OpenSSL accepts the pair. Raises `CertError`."""
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "key")
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise CertError(f"{cert_path} is not a PEM certificate") from None
    leaf = certs[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertError(f"{key_path}: encrypted private keys are not supported") from None
    except (ValueError, Exception) as exc:  # cryptography raises ValueError or UnsupportedAlgorithm
        raise CertError(f"{key_path} is not a PEM private key") from exc
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise CertError(f"key {key_path} does not match certificate {cert_path}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        raise CertError(f"OpenSSL refuses {cert_path} / {key_path}: {exc.reason or exc}") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return PairInfo(names, leaf.subject.rfc4514_string())


def server_context(cert: str, key: str, min_version: str = "1.2", client_ca: str | None = None,
                   client_cert: str = "none") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # secure default ciphers, no compression
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(ALPN)
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if client_cert == "required" else ssl.CERT_OPTIONAL
    return ctx


class ListenerTls:
    """The contexts of the TLS listeners and the SNI choice between them."""

    __slots__ = ("default", "exact", "wildcard", "contexts")

    def __init__(self, entries: Iterable[tuple[ssl.SSLContext, Iterable[str]]]) -> None:
        self.contexts: list[ssl.SSLContext] = []
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}  # "example.com" for "*.example.com"
        for ctx, hosts in entries:
            self.contexts.append(ctx)
            for host in hosts:
                host = host.lower().rstrip(".")
                if host.startswith("*."):
                    self.wildcard.setdefault(host[2:], ctx)
                else:
                    self.exact.setdefault(host, ctx)
        self.default = self.contexts[0]
        self.default.sni_callback = self._on_sni

    @classmethod
    def from_config(cls, cfg: TlsConfig) -> ListenerTls:
        return cls(
            (server_context(c.cert, c.key, cfg.min_version, cfg.client_ca, cfg.client_cert), c.hosts)
            for c in cfg.certificates
        )

    def select(self, server_name: str | None) -> ssl.SSLContext:
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        ctx = self.exact.get(name)
        if ctx is not None:
            return ctx
        dot = name.find(".")
        if dot > 0:
            ctx = self.wildcard.get(name[dot + 1:])
            if ctx is not None:
                return ctx
        return self.default

    def _on_sni(self, ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        ctx = self.select(server_name)
        if ctx is not ssl_object.context:
            ssl_object.context = ctx
        return None


def client_subject(ssl_object: ssl.SSLObject | None) -> str | None:
    """RFC 4514 subject of the verified client certificate, or None without one."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def client_context(cfg: UpstreamTls) -> ssl.SSLContext:
    """Context toward https:// upstream targets: verification on unless told otherwise."""
    ctx = ssl.create_default_context(cafile=cfg.ca_file)
    if cfg.cert_file is not None:  # mTLS: the gateway shows its certificate to the backend
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    if not cfg.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(ALPN)
    return ctx


# ---------------------------------------------------------------------------
# development certificate


def make_dev_cert(hosts: Iterable[str], days: int = 90) -> tuple[bytes, bytes]:
    """A self-signed EC P-256 certificate for `hosts` (names and IP addresses go in the
    subjectAltName). Returns (certificate PEM, unencrypted PKCS#8 key PEM)."""
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise ValueError("at least one host is needed")
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h.lower()))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeplane development")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_dev_cert(out_dir: str, hosts: Iterable[str], *, force: bool = False,
                   days: int = 90) -> tuple[str, str]:
    """Write dev.pem and dev-key.pem (mode 0600) into `out_dir`; return their paths.
    Refuses to overwrite existing files unless `force`."""
    cert_path = os.path.join(out_dir, "dev.pem")
    key_path = os.path.join(out_dir, "dev-key.pem")
    if not force:
        for p in (cert_path, key_path):
            if os.path.exists(p):
                raise FileExistsError(f"{p} exists (use --force to overwrite)")
    cert_pem, key_pem = make_dev_cert(hosts, days)
    os.makedirs(out_dir, exist_ok=True)
    with open(cert_path, "wb") as fh:
        fh.write(cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    return cert_path, key_path
