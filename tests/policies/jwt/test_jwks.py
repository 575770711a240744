"""JWK Set parsing (each kty, skipped entries, limits), key identity and RefreshPolicy."""

from __future__ import annotations

import base64

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from edgeplane.policies.jwt.jwks import (
    MAX_JWKS_BYTES,
    JwksError,
    KeySet,
    RefreshPolicy,
    b64url_decode,
    cache_control_max_age,
    parse_jwks,
    secret_key,
)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def int_b64(n: int) -> str:
    return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, **extra) -> dict:
    pn = key.public_key().public_numbers()
    return {"kty": "RSA", "kid": kid, "n": int_b64(pn.n), "e": int_b64(pn.e), **extra}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str, crv: str, **extra) -> dict:
    size = {"P-256": 32, "P-384": 48, "P-521": 66}[crv]
    pn = key.public_key().public_numbers()
    return {"kty": "EC", "kid": kid, "crv": crv, "x": b64(pn.x.to_bytes(size, "big")),
            "y": b64(pn.y.to_bytes(size, "big")), **extra}


def ed_jwk(key: ed25519.Ed25519PrivateKey, kid: str, **extra) -> dict:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(raw), **extra}


@pytest.fixture(scope="module")
def keys():
    return {
        "rsa": rsa.generate_private_key(65537, 2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "p521": ec.generate_private_key(ec.SECP521R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
    }


def full_set(keys) -> dict:
    return {"keys": [
        rsa_jwk(keys["rsa"], "r1", alg="RS256", use="sig"),
        ec_jwk(keys["p256"], "e256", "P-256"),
        ec_jwk(keys["p384"], "e384", "P-384"),
        ec_jwk(keys["p521"], "e521", "P-521"),
        ed_jwk(keys["ed"], "ed1"),
        {"kty": "oct", "kid": "h1", "k": b64(b"s" * 32)},
    ]}


def test_parses_every_kty(keys):
    ks = parse_jwks(orjson.dumps(full_set(keys)), allow_mixed_key_types=True)
    assert ks.errors == ()
    assert ks.kids == {"r1", "e256", "e384", "e521", "ed1", "h1"}
    assert ks.get("r1").kty == "RSA" and ks.get("r1").algorithms == {"RS256"}
    assert ks.get("e256").crv == "P-256" and ks.get("e256").algorithms == {"ES256"}
    assert ks.get("e384").algorithms == {"ES384"}
    assert ks.get("e521").algorithms == {"ES512"}
    assert ks.get("ed1").algorithms == {"EdDSA"}
    assert ks.get("h1").algorithms == {"HS256", "HS384", "HS512"}
    assert ks.get("h1").public_key == b"s" * 32
    assert ks.get("nope") is None and ks.get(None) is None
    assert "ss" not in repr(ks.get("h1"))
    # a dict and bytes give the same set
    assert parse_jwks(full_set(keys), allow_mixed_key_types=True).version == ks.version


def test_rsa_without_alg_allows_rs_and_ps(keys):
    ks = parse_jwks({"keys": [rsa_jwk(keys["rsa"], "r")]})
    assert ks.get("r").algorithms == {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    assert ks.sole is ks.get("r") and ks.get(None) is ks.sole


def test_bad_entries_are_skipped_with_reasons(keys):
    good = ec_jwk(keys["p256"], "good", "P-256")
    off_curve = dict(ec_jwk(keys["p256"], "off", "P-256"))
    off_curve["y"] = b64(b"\x01" * 32)
    small_rsa = rsa.generate_private_key(65537, 1024)
    doc = {"keys": [
        good,
        "not an object",
        {"kty": "XYZ", "kid": "x"},
        {"kty": "RSA", "kid": "nomod", "e": "AQAB"},
        rsa_jwk(keys["rsa"], "enc", use="enc"),
        rsa_jwk(keys["rsa"], "ops", key_ops=["encrypt"]),
        rsa_jwk(small_rsa, "small"),
        rsa_jwk(keys["rsa"], "wrongalg", alg="ES256"),
        rsa_jwk(keys["rsa"], "priv", d="AQAB"),
        off_curve,
        ec_jwk(keys["p384"], "shortcoords", "P-384") | {"crv": "P-256"},
        ec_jwk(keys["p256"], "curve-alg", "P-256", alg="ES384"),
        {"kty": "OKP", "crv": "X25519", "kid": "x25519", "x": b64(b"\x00" * 32)},
        {"kty": "OKP", "crv": "Ed25519", "kid": "edshort", "x": b64(b"\x00" * 31)},
        {"kty": "oct", "kid": "short", "k": b64(b"k" * 16)},
        {"kty": "oct", "kid": "padded", "k": b64(b"k" * 32) + "="},
        {"kty": "RSA", "kid": 7, "n": "AQAB", "e": "AQAB"},
    ]}
    ks = parse_jwks(doc)
    assert ks.kids == {"good"}
    assert len(ks.errors) == len(doc["keys"]) - 1
    text = "\n".join(ks.errors)
    for needle in ("not a JSON object", "unsupported kty", "'n'", "use 'enc'", "key_ops",
                   "1024 bits", "does not fit", "private key member 'd'", "not on the curve",
                   "must be 32 bytes", "X25519", "32 bytes",
                   "shorter than 32", "not base64url", "'kid' must be a string"):
        assert needle in text, needle


@pytest.mark.parametrize("doc", [b"nope", b"[]", b'{"keys": {}}', b'{"keys": []}',
                                 b'{"keys": [{"kty": "oct"}]}', b"\xff\xfe"])
def test_unusable_documents_raise(doc):
    with pytest.raises(JwksError):
        parse_jwks(doc)


def test_size_and_count_limits(keys):
    jwk = {"kty": "oct", "k": b64(b"k" * 32)}
    with pytest.raises(JwksError, match="keys"):
        parse_jwks({"keys": [dict(jwk, kid=str(i)) for i in range(101)]})
    assert len(parse_jwks({"keys": [dict(jwk, kid=str(i)) for i in range(100)]})) == 100
    big = orjson.dumps({"keys": [dict(jwk, kid="a")], "pad": "x" * MAX_JWKS_BYTES})
    with pytest.raises(JwksError, match="bytes"):
        parse_jwks(big)


def test_version_tracks_kids_and_material(keys):
    a = parse_jwks(full_set(keys), allow_mixed_key_types=True)
    same = parse_jwks({"keys": list(reversed(full_set(keys)["keys"]))}, allow_mixed_key_types=True)
    assert a.version == same.version
    fewer = parse_jwks({"keys": full_set(keys)["keys"][1:]}, allow_mixed_key_types=True)
    assert fewer.version != a.version
    rekeyed = parse_jwks({"keys": [ec_jwk(keys["p384"], "e256", "P-384")]})
    assert not rekeyed.has(a.get("e256"))
    assert fewer.has(a.get("e256")) and not fewer.has(a.get("r1"))


def test_secret_key():
    k = secret_key(b"x" * 32)
    assert k.kty == "oct" and k.source == "config" and k.kid is None
    with pytest.raises(ValueError):
        secret_key(b"short")


@pytest.mark.parametrize("text,ok", [("", b""), ("QQ", b"A"), ("QUI", b"AB"), ("QUJD", b"ABC"),
                                     ("-_8", b"\xfb\xff"), ("QQ==", None), ("Q", None),
                                     ("QR", None), ("Q+I", None), ("Q/I", None), ("Q I", None),
                                     ("é", None)])
def test_b64url_strict(text, ok):
    if ok is None:
        with pytest.raises(ValueError):
            b64url_decode(text)
    else:
        assert b64url_decode(text) == ok


@pytest.mark.parametrize("value,expected", [
    (None, None), ("", None), ("public, max-age=600", 600.0), ("max-age=\"60\"", 60.0),
    ("MAX-AGE=5, must-revalidate", 5.0), ("no-store", 0.0), ("max-age=300, no-cache", 0.0),
    (b"max-age=42", 42.0), ("max-age=abc", None), ("max-age=-1", None), ("private", None),
])
def test_cache_control_max_age(value, expected):
    assert cache_control_max_age(value) == expected


def test_refresh_policy_interval_and_max_age():
    p = RefreshPolicy(300, min_interval=30, max_interval=3600)
    assert p.due(0.0) and p.delay(0.0) == 0
    p.begin(0.0)
    assert not p.due(0.0) and p.delay(0.0) == float("inf")
    assert p.on_success(0.0) == 300.0
    assert not p.due(299.0) and p.due(300.0) and p.delay(100.0) == 200.0
    p.begin(300.0)
    assert p.on_success(300.0, max_age=600.0) == 900.0      # honoured
    p.begin(900.0)
    assert p.on_success(900.0, max_age=0.0) == 930.0        # no-store clamped to min
    p.begin(930.0)
    assert p.on_success(930.0, max_age=10**9) == 4530.0     # clamped to max


def test_refresh_policy_backoff_keeps_retrying():
    p = RefreshPolicy(300, backoff_initial=1, backoff_max=60)
    retries = []
    now = 0.0
    for _ in range(10):
        p.begin(now)
        now = p.on_failure(now)
        retries.append(now)
    gaps = [b - a for a, b in zip([0.0] + retries, retries, strict=False)]
    assert gaps == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert p.failures == 10
    p.begin(now)
    p.on_success(now)
    assert p.failures == 0 and p.next_at == now + 300


def test_refresh_policy_unknown_kid_is_rate_limited():
    p = RefreshPolicy(300, unknown_kid_interval=30)
    p.begin(0.0)
    p.on_success(0.0)
    assert p.unknown_kid(10.0) is True and p.due(10.0)
    p.begin(10.0)
    assert p.unknown_kid(11.0) is False           # a fetch is running
    p.on_success(11.0)
    assert p.unknown_kid(20.0) is False           # within the interval
    assert not p.due(20.0)
    assert p.unknown_kid(40.0) is True            # interval passed
    p.begin(40.0)
    p.on_failure(40.0)                            # backoff until 41
    assert p.unknown_kid(40.5) is False
    assert p.unknown_kid(75.0) is True


def test_refresh_policy_validates():
    with pytest.raises(ValueError):
        RefreshPolicy(300, min_interval=10, max_interval=5)
    with pytest.raises(ValueError):
        RefreshPolicy(0)


def test_keyset_is_plain_value():
    ks = KeySet([])
    assert len(ks) == 0 and ks.sole is None and ks.kids == frozenset()
