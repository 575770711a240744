"""JWT verification (every algorithm, alg confusion, malformed input, claim checks),
scopes, header helpers and the verification caches. Real keys, real signatures."""

from __future__ import annotations

import base64
import hmac

import orjson
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from conftest import REPO
from edgeplane.policies.jwt import verify as J
from edgeplane.policies.jwt.jwks import KeySet, parse_jwks
from edgeplane.policies.jwt.verify import (
    CachedVerifier,
    Claims,
    JwtConfig,
    JwtError,
    JwtVerifier,
    VerificationCache,
    check_scopes,
    extract_bearer,
    www_authenticate,
)

NOW = 1_700_000_000.0
ISS = "https://auth.example.com/"
AUD = "orders-api"
HS_SECRET = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"  # 64 bytes
ALL_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
            "EdDSA", "HS256", "HS384", "HS512")
HASH = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def int_b64(n: int, size: int | None = None) -> str:
    return b64(n.to_bytes(size or (n.bit_length() + 7) // 8, "big"))


def raw_sign(alg: str, key, data: bytes) -> bytes:
    if alg.startswith("HS"):
        return hmac.digest(key, data, "sha" + alg[2:])
    if alg == "EdDSA":
        return key.sign(data)
    h = HASH[alg[2:]]()
    if alg.startswith("RS"):
        return key.sign(data, padding.PKCS1v15(), h)
    if alg.startswith("PS"):
        return key.sign(data, padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h)
    size = (key.curve.key_size + 7) // 8
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(h)))
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def make_token(alg: str, key, payload: dict | bytes, kid: str | None = None, **header) -> str:
    hdr = {"alg": alg, "typ": "JWT", **header}
    if kid is not None:
        hdr["kid"] = kid
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    signing_input = b64(orjson.dumps(hdr)) + "." + b64(body)
    return signing_input + "." + b64(raw_sign(alg, key, signing_input.encode()))


def claims(**over) -> dict:
    c = {"iss": ISS, "aud": AUD, "sub": "user-1", "exp": NOW + 3600, "iat": NOW - 10,
         "scope": "orders:read profile"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


class Keys:
    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(65537, 2048)
        self.p256 = ec.generate_private_key(ec.SECP256R1())
        self.p384 = ec.generate_private_key(ec.SECP384R1())
        self.p521 = ec.generate_private_key(ec.SECP521R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.oct = b"jwks-oct-secret-" * 4  # 64 bytes
        pn = self.rsa.public_key().public_numbers()
        jwks = [{"kty": "RSA", "kid": "rsa", "n": int_b64(pn.n), "e": int_b64(pn.e)}]
        for kid, k, crv, size in (("p256", self.p256, "P-256", 32), ("p384", self.p384, "P-384", 48),
                                  ("p521", self.p521, "P-521", 66)):
            n = k.public_key().public_numbers()
            jwks.append({"kty": "EC", "kid": kid, "crv": crv, "x": int_b64(n.x, size), "y": int_b64(n.y, size)})
        jwks.append({"kty": "OKP", "kid": "ed", "crv": "Ed25519",
                     "x": b64(self.ed.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))})
        jwks.append({"kty": "oct", "kid": "oct", "k": b64(self.oct)})
        self.jwks = {"keys": jwks}
        self.keyset = parse_jwks(self.jwks, allow_mixed_key_types=True)

    def for_alg(self, alg: str):
        """(private key, kid) that legitimately signs `alg`."""
        if alg[:2] in ("RS", "PS"):
            return self.rsa, "rsa"
        if alg[:2] == "ES":
            return {"ES256": (self.p256, "p256"), "ES384": (self.p384, "p384"), "ES512": (self.p521, "p521")}[alg]
        if alg == "EdDSA":
            return self.ed, "ed"
        return self.oct, "oct"


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def verifier(keys: Keys, algorithms=ALL_ALGS, keyset: KeySet | None = None, **cfg) -> JwtVerifier:
    config = JwtConfig(issuer=ISS, audiences=cfg.pop("audiences", (AUD, "other")), algorithms=algorithms, **cfg)
    return JwtVerifier(config, lambda: keyset if keyset is not None else keys.keyset)


def refused(v, token, kind: str, now: float = NOW) -> JwtError:
    with pytest.raises(JwtError) as info:
        v.verify(token, now)
    assert info.value.kind == kind, info.value
    assert info.value.status == 401 and info.value.error == "invalid_token"
    return info.value


# ---------------------------------------------------------------- algorithms

@pytest.mark.parametrize("alg", ALL_ALGS)
def test_every_algorithm_round_trips(keys, alg):
    key, kid = keys.for_alg(alg)
    token = make_token(alg, key, claims(), kid=kid)
    v = verifier(keys)
    c = v.verify(token, NOW)
    assert isinstance(c, Claims)
    assert c["sub"] == "user-1" and c.alg == alg and c.kid == kid and c.exp == NOW + 3600
    assert c.scopes == ("orders:read", "profile")
    assert v.verify(token.encode(), NOW)["sub"] == "user-1"   # bytes work too
    with pytest.raises(TypeError):
        c.claims["sub"] = "x"                               # read-only view


@pytest.mark.parametrize("alg", ALL_ALGS)
def test_tampered_payload_and_signature(keys, alg):
    key, kid = keys.for_alg(alg)
    token = make_token(alg, key, claims(), kid=kid)
    h, p, s = token.split(".")
    forged = b64(orjson.dumps(claims(sub="admin")))
    refused(verifier(keys), f"{h}.{forged}.{s}", J.BAD_SIGNATURE)
    sig = bytearray(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
    sig[len(sig) // 2] ^= 0x01
    refused(verifier(keys), f"{h}.{p}.{b64(bytes(sig))}", J.BAD_SIGNATURE)
    refused(verifier(keys), f"{h}.{p}.{b64(bytes(sig[:-1]))}", J.BAD_SIGNATURE)


def test_algorithm_not_in_allow_list(keys):
    token = make_token("ES256", keys.p256, claims(), kid="p256")
    refused(verifier(keys, algorithms=("RS256",)), token, J.ALG_NOT_ALLOWED)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "", None, 1, "HS1"])
def test_alg_none_and_junk_rejected(keys, alg):
    hdr = b64(orjson.dumps({"alg": alg, "kid": "rsa"}))
    body = b64(orjson.dumps(claims()))
    refused(verifier(keys), f"{hdr}.{body}.{b64(b'x')}", J.ALG_NOT_ALLOWED)
    refused(verifier(keys), f"{hdr}.{body}.", J.MALFORMED)  # empty signature segment


def test_config_refuses_none():
    with pytest.raises(ValueError, match="unsupported algorithm"):
        JwtConfig(issuer=ISS, audiences=[AUD], algorithms=["none"])


def test_hs256_with_rsa_public_key_pem_as_secret_is_rejected(keys):
    pem = keys.rsa.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    token = make_token("HS256", pem, claims(), kid="rsa")
    # Even with both algorithms allowed, the RSA key only verifies RS*/PS*.
    refused(verifier(keys, algorithms=("RS256", "HS256")), token, J.ALG_KEY_MISMATCH)
    # And with the raw JWK modulus bytes as the secret.
    der = keys.rsa.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    refused(verifier(keys, algorithms=("RS256", "HS256")), make_token("HS256", der, claims(), kid="rsa"),
            J.ALG_KEY_MISMATCH)


def test_es256_header_with_p384_key_rejected(keys):
    token = make_token("ES384", keys.p384, claims(), kid="p384")
    h, p, s = token.split(".")
    h2 = b64(orjson.dumps({"alg": "ES256", "kid": "p384"}))
    refused(verifier(keys), f"{h2}.{p}.{s}", J.ALG_KEY_MISMATCH)
    # An ES256 signature made with a P-256 key but pointing at the P-384 kid.
    refused(verifier(keys), make_token("ES256", keys.p256, claims(), kid="p384"), J.ALG_KEY_MISMATCH)


@pytest.mark.parametrize("alg,kid", [("RS256", "ed"), ("EdDSA", "rsa"), ("HS256", "p256"),
                                     ("ES512", "oct"), ("PS256", "p521")])
def test_any_alg_key_type_mismatch_rejected(keys, alg, kid):
    hdr = b64(orjson.dumps({"alg": alg, "kid": kid}))
    refused(verifier(keys), f"{hdr}.{b64(orjson.dumps(claims()))}.{b64(b'sig')}", J.ALG_KEY_MISMATCH)


def test_jwk_alg_pins_header_alg(keys):
    jwks = {"keys": [dict(keys.jwks["keys"][0], alg="PS256")]}
    v = verifier(keys, keyset=parse_jwks(jwks))
    refused(v, make_token("RS256", keys.rsa, claims(), kid="rsa"), J.ALG_KEY_MISMATCH)
    assert v.verify(make_token("PS256", keys.rsa, claims(), kid="rsa"), NOW)["sub"] == "user-1"


def test_unknown_crit_rejected(keys):
    token = make_token("RS256", keys.rsa, claims(), kid="rsa", crit=["exp"], exp=1)
    refused(verifier(keys), token, J.CRIT)
    refused(verifier(keys), make_token("RS256", keys.rsa, claims(), kid="rsa", crit=[]), J.CRIT)


def test_header_key_material_is_ignored(keys):
    # An attacker embeds their own key in the header: it must not be used.
    attacker = ec.generate_private_key(ec.SECP256R1())
    n = attacker.public_key().public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "x": int_b64(n.x, 32), "y": int_b64(n.y, 32)}
    token = make_token("ES256", attacker, claims(), kid="p256", jwk=jwk, jku="https://evil/jwks")
    refused(verifier(keys), token, J.BAD_SIGNATURE)


# ---------------------------------------------------------------- kid and secrets

def test_unknown_kid(keys):
    refused(verifier(keys), make_token("RS256", keys.rsa, claims(), kid="gone"), J.UNKNOWN_KID)
    refused(verifier(keys), make_token("RS256", keys.rsa, claims()), J.UNKNOWN_KID)  # no kid, many keys
    hdr = b64(orjson.dumps({"alg": "RS256", "kid": 5}))
    refused(verifier(keys), f"{hdr}.{b64(orjson.dumps(claims()))}.{b64(b'x')}", J.MALFORMED)


def test_no_kid_uses_sole_key(keys):
    single = parse_jwks({"keys": [keys.jwks["keys"][0]]})
    v = verifier(keys, keyset=single)
    assert v.verify(make_token("RS256", keys.rsa, claims()), NOW)["sub"] == "user-1"


def test_configured_hs_secret(keys):
    config = JwtConfig(issuer=ISS, audiences=[AUD], algorithms=["HS256", "HS512"], hs_secret=HS_SECRET)
    v = JwtVerifier(config, None)
    assert v.verify(make_token("HS256", HS_SECRET, claims()), NOW)["sub"] == "user-1"
    assert v.verify(make_token("HS512", HS_SECRET, claims(), kid="any"), NOW)["sub"] == "user-1"
    refused(v, make_token("HS256", b"w" * 64, claims()), J.BAD_SIGNATURE)
    refused(v, make_token("RS256", keys.rsa, claims()), J.ALG_NOT_ALLOWED)
    with pytest.raises(ValueError, match="at least 64"):
        JwtConfig(issuer=ISS, audiences=[AUD], algorithms=["HS512"], hs_secret=b"x" * 32)
    with pytest.raises(ValueError, match="no HS"):
        JwtConfig(issuer=ISS, audiences=[AUD], algorithms=["RS256"], hs_secret=HS_SECRET)


def test_secret_does_not_verify_asymmetric_kids(keys):
    # With a JWKS present, an HS token naming an RSA kid gets no help from the secret.
    config = JwtConfig(issuer=ISS, audiences=[AUD], algorithms=["RS256", "HS256"], hs_secret=HS_SECRET)
    v = JwtVerifier(config, keys.keyset)
    refused(v, make_token("HS256", HS_SECRET, claims(), kid="rsa"), J.ALG_KEY_MISMATCH)
    refused(v, make_token("HS256", HS_SECRET, claims(), kid="unknown"), J.UNKNOWN_KID)
    assert v.verify(make_token("HS256", HS_SECRET, claims()), NOW)["sub"] == "user-1"


# ---------------------------------------------------------------- malformed input

def good(keys) -> str:
    return make_token("ES256", keys.p256, claims(), kid="p256")


@pytest.mark.parametrize("mangle", [
    lambda t: t[: len(t) // 2],                     # truncated
    lambda t: t.rsplit(".", 1)[0],                  # two segments
    lambda t: t + ".xyz",                           # four segments
    lambda t: "." + t.split(".", 1)[1],             # empty header
    lambda t: t.replace(".", "..", 1),
    lambda t: t.split(".")[0] + "==." + t.split(".", 1)[1],   # padding
    lambda t: t[:5] + "+" + t[6:],                  # standard alphabet
    lambda t: t[:5] + "!" + t[6:],
    lambda t: " " + t,
    lambda t: t + "é",
    lambda t: "",
    lambda t: "a.b.c",
])
def test_malformed_tokens(keys, mangle):
    token = mangle(good(keys))
    with pytest.raises(JwtError) as info:
        verifier(keys).verify(token, NOW)
    assert info.value.kind in (J.MALFORMED, J.BAD_SIGNATURE)


@pytest.mark.parametrize("header", [b"[]", b'"RS256"', b"1", b"null", b"{", b"\xff"])
def test_header_not_json_object(keys, header):
    refused(verifier(keys), f"{b64(header)}.{b64(orjson.dumps(claims()))}.{b64(b'x')}", J.MALFORMED)


@pytest.mark.parametrize("payload", [b"[]", b'"x"', b"42", b"{", b"\xff\xfe", b"[" * 2000 + b"]" * 2000])
def test_payload_not_json_object(keys, payload):
    # Properly signed, so only the payload parsing can refuse it.
    refused(verifier(keys), make_token("ES256", keys.p256, payload, kid="p256"), J.MALFORMED)


def test_oversized_token_rejected_without_parsing(keys):
    v = verifier(keys, max_token_bytes=1024)
    refused(v, "x" * 1025, J.OVERSIZED)                         # not even a JWS: size first
    refused(v, make_token("ES256", keys.p256, claims(pad="p" * 2000), kid="p256"), J.OVERSIZED)
    assert v.calls == 2
    refused(verifier(keys), "a" * 8193, J.OVERSIZED)            # 8 KiB default


# ---------------------------------------------------------------- claims

@pytest.mark.parametrize("over", [
    {"exp": "1999999999"}, {"exp": True}, {"exp": None}, {"nbf": "0"}, {"iat": False},
    {"iat": [1]}, {"iss": 1}, {"aud": 5}, {"aud": [AUD, 5]}, {"aud": {"a": AUD}},
    {"scope": ["orders:read"]}, {"scp": [1]}, {"scp": {"x": 1}}, {"sub": 12}, {"client_id": 3},
])
def test_wrong_claim_types(keys, over):
    refused(verifier(keys), make_token("EdDSA", keys.ed, claims(**over), kid="ed"), J.BAD_CLAIM)


def test_huge_integer_claim_is_malformed_not_a_crash(keys):
    body = orjson.dumps(claims()).replace(b'"sub":"user-1"', b'"sub":' + b"9" * 400)
    err = refused(verifier(keys), make_token("EdDSA", keys.ed, body, kid="ed"), J.MALFORMED)
    assert "payload" in err.description


def test_expiry_and_leeway(keys):
    token = make_token("EdDSA", keys.ed, claims(exp=NOW), kid="ed")
    refused(verifier(keys), token, J.EXPIRED)
    assert verifier(keys).verify(token, NOW - 0.5)
    assert verifier(keys, leeway=30).verify(token, NOW + 29)
    refused(verifier(keys, leeway=30), token, J.EXPIRED, now=NOW + 30)


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_not_yet_valid_and_leeway(keys, claim):
    token = make_token("EdDSA", keys.ed, claims(**{claim: NOW + 20}), kid="ed")
    refused(verifier(keys), token, J.NOT_YET_VALID)
    assert verifier(keys, leeway=20).verify(token, NOW)
    assert verifier(keys).verify(token, NOW + 20)


def test_wrong_issuer(keys):
    refused(verifier(keys), make_token("EdDSA", keys.ed, claims(iss="https://evil/"), kid="ed"), J.BAD_ISSUER)
    refused(verifier(keys), make_token("EdDSA", keys.ed, claims(iss=None), kid="ed"), J.BAD_ISSUER)


def test_audience(keys):
    v = verifier(keys)
    assert v.verify(make_token("EdDSA", keys.ed, claims(aud=["x", "other"]), kid="ed"), NOW)
    refused(v, make_token("EdDSA", keys.ed, claims(aud="nope"), kid="ed"), J.BAD_AUDIENCE)
    refused(v, make_token("EdDSA", keys.ed, claims(aud=[]), kid="ed"), J.BAD_AUDIENCE)
    # The client_id fallback applies only when aud is absent.
    assert v.verify(make_token("EdDSA", keys.ed, claims(aud=None, client_id=AUD), kid="ed"), NOW)
    refused(v, make_token("EdDSA", keys.ed, claims(aud=None, client_id="nope"), kid="ed"), J.BAD_AUDIENCE)
    refused(v, make_token("EdDSA", keys.ed, claims(aud=None), kid="ed"), J.BAD_AUDIENCE)
    refused(v, make_token("EdDSA", keys.ed, claims(aud="nope", client_id=AUD), kid="ed"), J.BAD_AUDIENCE)


def test_config_validation():
    for bad in (dict(issuer=""), dict(audiences=[]), dict(audiences=["a"] * 51), dict(leeway=-1),
                dict(max_token_bytes=10), dict(algorithms=[])):
        args = dict(issuer=ISS, audiences=[AUD]) | bad
        with pytest.raises(ValueError):
            JwtConfig(**args)
    assert JwtConfig(issuer=ISS, audiences=AUD).audiences == (AUD,)


# ---------------------------------------------------------------- scopes and headers

def test_scopes(keys):
    v = verifier(keys)
    c = v.verify(make_token("EdDSA", keys.ed, claims(scope="a b"), kid="ed"), NOW)
    assert check_scopes(c, ["b"]) and check_scopes(c, ["x", "a"]) and not check_scopes(c, ["c"])
    assert check_scopes(c, []) and check_scopes(c, ())
    c2 = v.verify(make_token("EdDSA", keys.ed, claims(scope=None, scp=["orders:read", "x"]), kid="ed"), NOW)
    assert c2.scopes == ("orders:read", "x") and check_scopes(c2, ["orders:read"])
    c3 = v.verify(make_token("EdDSA", keys.ed, claims(scope=None, scp="s1 s2"), kid="ed"), NOW)
    assert check_scopes(c3, ["s2"])
    c4 = v.verify(make_token("EdDSA", keys.ed, claims(scope=None), kid="ed"), NOW)
    assert c4.scopes == () and not check_scopes(c4, ["a"])
    assert check_scopes({"scope": "a b", "scp": ["c"]}, ["c"]) and not check_scopes({}, ["a"])


def test_www_authenticate():
    assert www_authenticate("invalid_token", "the token has expired") == \
        'Bearer error="invalid_token", error_description="the token has expired"'
    assert www_authenticate("insufficient_scope", "missing scope", ["a:read", "b"]) == \
        'Bearer scope="a:read b", error="insufficient_scope", error_description="missing scope"'
    assert www_authenticate("invalid_token", 'say "hi"\\\r\nSet-Cookie: x') == \
        'Bearer error="invalid_token", error_description="say \\"hi\\"\\\\Set-Cookie: x"'
    assert www_authenticate("", "") == "Bearer"


@pytest.mark.parametrize("value,expected", [
    ("Bearer abc.def.ghi", "abc.def.ghi"), ("bearer abc", "abc"), ("BEARER   abc  ", "abc"),
    ("abc.def.ghi", "abc.def.ghi"), ("  abc ", "abc"), ("Bearer", ""), ("", ""), (None, ""),
    ("Bearerabc", "Bearerabc"), ("Bearer\tabc", "abc"),
    (b"Bearer abc", b"abc"), (b"abc", b"abc"), (b"bearer", b""),
])
def test_extract_bearer(value, expected):
    assert extract_bearer(value) == expected


# ---------------------------------------------------------------- caches

class Holder:
    """A mutable key-set provider, as the JWKS refresher will be."""

    def __init__(self, keyset: KeySet) -> None:
        self.keyset = keyset

    def __call__(self) -> KeySet:
        return self.keyset


def cached(keys, holder=None, **cache_args) -> CachedVerifier:
    holder = holder or Holder(keys.keyset)
    v = JwtVerifier(JwtConfig(issuer=ISS, audiences=[AUD], algorithms=ALL_ALGS), holder)
    return CachedVerifier(v, VerificationCache(**cache_args))


def test_cache_hit_skips_verification(keys):
    cv = cached(keys)
    token = make_token("RS256", keys.rsa, claims(), kid="rsa")
    first = cv.verify(token, NOW)
    for i in range(5):
        assert cv.verify(token, NOW + i) is first
    assert cv.verifier.calls == 1 and cv.cache.hits == 5 and cv.misses == 1


def test_cache_entry_lives_until_exp_or_ttl(keys):
    cv = cached(keys, ttl=60)
    long = make_token("RS256", keys.rsa, claims(exp=NOW + 3600), kid="rsa")
    short = make_token("RS256", keys.rsa, claims(exp=NOW + 10), kid="rsa")
    cv.verify(long, NOW)
    cv.verify(short, NOW)
    cv.verify(long, NOW + 59)
    cv.verify(short, NOW + 9)
    assert cv.verifier.calls == 2
    cv.verify(long, NOW + 61)                 # ttl passed: verified again
    assert cv.verifier.calls == 3
    with pytest.raises(JwtError) as info:     # exp passed: never served from cache
        cv.verify(short, NOW + 10)
    assert info.value.kind == J.EXPIRED and cv.verifier.calls == 4


def test_cache_eviction_bound(keys):
    cv = cached(keys, max_entries=3)
    tokens = [make_token("EdDSA", keys.ed, claims(sub=f"u{i}"), kid="ed") for i in range(5)]
    for t in tokens:
        cv.verify(t, NOW)
    assert len(cv.cache) == 3 and cv.cache.evictions == 2
    cv.verify(tokens[2], NOW)                 # hit; now most recently used
    cv.verify(tokens[0], NOW)                 # evicted earlier: verified, evicts tokens[3]
    assert cv.verifier.calls == 6
    cv.verify(tokens[2], NOW)
    assert cv.verifier.calls == 6
    cv.verify(tokens[3], NOW)
    assert cv.verifier.calls == 7


def test_kid_removal_drops_entries(keys):
    holder = Holder(keys.keyset)
    cv = cached(keys, holder)
    rsa_token = make_token("RS256", keys.rsa, claims(), kid="rsa")
    ed_token = make_token("EdDSA", keys.ed, claims(), kid="ed")
    cv.verify(rsa_token, NOW)
    cv.verify(ed_token, NOW)
    holder.keyset = parse_jwks({"keys": [k for k in keys.jwks["keys"] if k["kid"] != "rsa"]},
                               allow_mixed_key_types=True)
    assert cv.verify(ed_token, NOW)["sub"] == "user-1"          # key still there: still a hit
    assert cv.verifier.calls == 2
    with pytest.raises(JwtError) as info:
        cv.verify(rsa_token, NOW)
    assert info.value.kind == J.UNKNOWN_KID and cv.verifier.calls == 3


def test_kid_rekeyed_drops_entries(keys):
    holder = Holder(keys.keyset)
    cv = cached(keys, holder)
    token = make_token("EdDSA", keys.ed, claims(), kid="ed")
    cv.verify(token, NOW)
    other = ed25519.Ed25519PrivateKey.generate()
    jwk = {"kty": "OKP", "kid": "ed", "crv": "Ed25519",
           "x": b64(other.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))}
    holder.keyset = parse_jwks({"keys": [jwk]})
    with pytest.raises(JwtError) as info:
        cv.verify(token, NOW)
    assert info.value.kind == J.BAD_SIGNATURE


def test_negative_cache(keys):
    holder = Holder(keys.keyset)
    cv = cached(keys, holder, negative_ttl=10, negative_max_entries=2)
    forged = make_token("EdDSA", ed25519.Ed25519PrivateKey.generate(), claims(), kid="ed")
    errors = []
    for i in range(5):
        with pytest.raises(JwtError) as info:
            cv.verify(forged, NOW + i)
        errors.append(info.value)
    assert cv.verifier.calls == 1 and cv.cache.negative_hits == 4
    assert all((e.kind, e.description) == (errors[0].kind, errors[0].description) for e in errors)
    assert errors[-1].__traceback__ is not None and errors[-1] is not errors[0]
    with pytest.raises(JwtError):
        cv.verify(forged, NOW + 10)          # negative TTL passed
    assert cv.verifier.calls == 2
    # bounded
    for i in range(3):
        with pytest.raises(JwtError):
            cv.verify(f"junk{i}", NOW)
    assert len(cv.cache._neg) == 2


def test_negative_cache_cleared_by_rotation(keys):
    holder = Holder(parse_jwks({"keys": [k for k in keys.jwks["keys"] if k["kid"] != "ed"]},
                               allow_mixed_key_types=True))
    cv = cached(keys, holder)
    token = make_token("EdDSA", keys.ed, claims(), kid="ed")
    for _ in range(3):
        with pytest.raises(JwtError):
            cv.verify(token, NOW)
    assert cv.verifier.calls == 1
    holder.keyset = keys.keyset              # the refresher brought the new kid
    assert cv.verify(token, NOW + 1)["sub"] == "user-1"


def test_not_yet_valid_is_not_negatively_cached(keys):
    cv = cached(keys)
    token = make_token("EdDSA", keys.ed, claims(nbf=NOW + 5), kid="ed")
    with pytest.raises(JwtError):
        cv.verify(token, NOW)
    assert cv.verify(token, NOW + 5)["sub"] == "user-1"


def test_oversized_token_never_becomes_a_cache_key(keys):
    cv = cached(keys)
    with pytest.raises(JwtError) as info:
        cv.verify("x" * 10_000, NOW)
    assert info.value.kind == J.OVERSIZED
    assert len(cv.cache._neg) == 0 and cv.verifier.calls == 0


def test_disabled_caches(keys):
    cv = cached(keys, max_entries=0, negative_max_entries=0)
    token = make_token("EdDSA", keys.ed, claims(), kid="ed")
    cv.verify(token, NOW)
    cv.verify(token, NOW)
    assert cv.verifier.calls == 2


def test_config_secret_entries_survive_jwks_change(keys):
    holder = Holder(keys.keyset)
    config = JwtConfig(issuer=ISS, audiences=[AUD], algorithms=["EdDSA", "HS256"], hs_secret=HS_SECRET)
    cv = CachedVerifier(JwtVerifier(config, holder))
    token = make_token("HS256", HS_SECRET, claims())
    cv.verify(token, NOW)
    holder.keyset = parse_jwks({"keys": [keys.jwks["keys"][4]]})
    cv.verify(token, NOW)
    assert cv.verifier.calls == 1


def test_mutated_tokens_only_ever_raise_jwt_error(keys):
    """Every single-character mutation and truncation of real tokens: JwtError or success."""
    import random
    rng = random.Random(4)
    v = verifier(keys)
    alphabet = "ABCxyz019-_.=+/ \x00é"
    for alg in ("RS256", "ES256", "EdDSA", "HS256"):
        key, kid = keys.for_alg(alg)
        token = make_token(alg, key, claims(), kid=kid)
        for _ in range(150):
            i = rng.randrange(len(token))
            mutated = [token[:i] + rng.choice(alphabet) + token[i + 1:], token[:i], token[i:]]
            for t in mutated:
                for candidate in (t, t.encode("utf-8")):
                    try:
                        v.verify(candidate, NOW)
                    except JwtError:
                        pass


def test_bench_runs():
    """benches/jwt_bench.py never rots (tiny measuring time; figures are not asserted)."""
    import subprocess
    import sys
    bench = REPO / "benches" / "jwt_bench.py"
    out = subprocess.run([sys.executable, str(bench), "--seconds", "0.01"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    for alg in ("RS256", "ES256", "EdDSA"):
        assert alg in out
