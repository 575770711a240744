"""JWKS hygiene: key sets with a repeated kid, a ROCA-weak RSA key (CVE-2017-15361) or
symmetric and asymmetric keys mixed are refused, by the parser, at config load (a located
error) and on a JWKS URL refresh (the last good set stays, a warning says why).

The ROCA keys are real: two primes of RSALib's form ``k * M + (65537**a mod M)`` (M the
primorial of the primes up to 167, built here independently of the module under test),
checked with a Miller-Rabin written here and again by OpenSSL when `cryptography` builds
the private key from them. The gateway tests run a real gateway, a real JWKS endpoint on
loopback, and real RS256/HS256 signatures."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import random
import time
from collections.abc import Callable
from math import lcm, prod

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from conftest import base_config
from edgeplane.config.loader import ConfigError, load_config
from edgeplane.policies.jwt.jwks import JwksRefused, parse_jwks
from edgeplane.policies.jwt.roca import FINGERPRINT_PRIMES, GENERATOR, has_roca_fingerprint

ISSUER = "https://auth.example.com/"
HS_KEY = b"an-hmac-key-of-at-least-32-bytes-for-hs256"

# ---------------------------------------------------------------- key material


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def int_b64(n: int, size: int | None = None) -> str:
    return b64(n.to_bytes(size or (n.bit_length() + 7) // 8, "big"))


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict:
    pn = key.public_key().public_numbers()
    return {"kty": "RSA", "kid": kid, "alg": "RS256", "n": int_b64(pn.n), "e": int_b64(pn.e)}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict:
    pn = key.public_key().public_numbers()
    return {"kty": "EC", "kid": kid, "crv": "P-256", "x": int_b64(pn.x, 32), "y": int_b64(pn.y, 32)}


def oct_jwk(kid: str, secret: bytes = HS_KEY) -> dict:
    return {"kty": "oct", "kid": kid, "k": b64(secret)}


def small_primes(limit: int) -> list[int]:
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\0\0"
    for i in range(2, int(limit ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytearray(len(sieve[i * i::i]))
    return [i for i, flag in enumerate(sieve) if flag]


TRIAL_PRIMES = small_primes(2000)
# RSALib's M for the fingerprint: the primorial 167# (2 * 3 * 5 * ... * 167).
PRIMORIAL = prod(small_primes(167))


def is_probable_prime(n: int, rng: random.Random, rounds: int = 40) -> bool:
    """Miller-Rabin with random bases after trial division (error below 4**-rounds)."""
    if n < 2:
        return False
    for p in TRIAL_PRIMES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def roca_prime(rng: random.Random, bits: int = 1024) -> int:
    """A prime of RSALib's form k*M + (65537**a mod M), in [1.5 * 2**(bits-1), 2**bits)
    so that two of them make a modulus of exactly 2*bits bits."""
    low, high = 3 << (bits - 2), 1 << bits
    while True:
        p = rng.randrange(low // PRIMORIAL + 1, high // PRIMORIAL) * PRIMORIAL \
            + pow(65537, rng.randrange(1, 1 << 64), PRIMORIAL)
        # p % 65537 != 1 keeps e = 65537 invertible modulo p - 1 (65537 is prime).
        if low <= p < high and p % 65537 != 1 and is_probable_prime(p, rng):
            return p


def roca_key(seed: int) -> rsa.RSAPrivateKey:
    """A working 2048-bit RSA key with ROCA's prime structure."""
    rng = random.Random(seed)
    p = roca_prime(rng)
    q = roca_prime(rng)
    while q == p:
        q = roca_prime(rng)
    e = 65537
    d = pow(e, -1, lcm(p - 1, q - 1))
    public = rsa.RSAPublicNumbers(e, p * q)
    # OpenSSL checks the numbers (p and q prime, p*q == n, e*d == 1) when it builds the key.
    return rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public).private_key()


@pytest.fixture(scope="module")
def roca_keys() -> list[rsa.RSAPrivateKey]:
    return [roca_key(seed) for seed in (2017, 15361)]


@pytest.fixture(scope="module")
def good_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


# ---------------------------------------------------------------- the ROCA check


def test_fingerprint_subgroups_are_the_powers_of_65537():
    """The module's precomputed subgroups equal a brute-force enumeration, and the
    published roca-detect masks for a sample of its primes."""
    from edgeplane.policies.jwt import roca

    assert GENERATOR == 65537
    assert FINGERPRINT_PRIMES == tuple(small_primes(167)[1:])  # 3..167: 38 primes
    for prime, mask in roca._SUBGROUPS:
        powers = {pow(65537, i, prime) for i in range(prime - 1)}
        assert mask == sum(1 << x for x in powers), prime
    published = {3: 6, 5: 30, 7: 126, 11: 1026, 13: 5658, 17: 107286, 19: 199410,
                 167: 187072209578355573530071658587684226515959365500926}
    masks = dict(roca._SUBGROUPS)
    for prime, mask in published.items():
        assert masks[prime] == mask, prime


def test_roca_structured_keys_are_flagged(roca_keys):
    for key in roca_keys:
        n = key.public_key().public_numbers().n
        assert n.bit_length() == 2048
        assert has_roca_fingerprint(n)
        numbers = key.private_numbers()
        # Each prime alone has the structure too: it is the primes that are weak.
        assert has_roca_fingerprint(numbers.p) and has_roca_fingerprint(numbers.q)


def test_generated_keys_are_not_flagged(good_key):
    keys = [good_key] + [rsa.generate_private_key(65537, bits) for bits in (2048, 2048, 2048, 3072, 4096)]
    for key in keys:
        assert not has_roca_fingerprint(key.public_key().public_numbers().n)


def test_one_roca_prime_is_not_enough(roca_keys):
    """The fingerprint is of the modulus: a ROCA prime times an ordinary one fails it
    (all 38 residues would have to fall in the subgroups by chance, about 2**-27.8)."""
    rng = random.Random(7)
    ordinary = rng.getrandbits(1024) | (3 << 1022) | 1
    while not is_probable_prime(ordinary, rng):
        ordinary += 2
    assert not has_roca_fingerprint(roca_keys[0].private_numbers().p * ordinary)


# ---------------------------------------------------------------- the parser


def test_parser_refuses_a_roca_key_naming_it(roca_keys, good_key):
    doc = {"keys": [rsa_jwk(good_key, "fine"), rsa_jwk(roca_keys[0], "infineon-1")]}
    with pytest.raises(JwksRefused) as exc:
        parse_jwks(json.dumps(doc))
    text = str(exc.value)
    assert "keys[1] (kid 'infineon-1')" in text and "ROCA" in text and "CVE-2017-15361" in text
    assert "'fine'" not in text


def test_parser_refuses_repeated_kids_naming_them(good_key):
    other = rsa.generate_private_key(65537, 2048)
    doc = {"keys": [rsa_jwk(good_key, "a"), rsa_jwk(other, "b"), rsa_jwk(other, "a"),
                    {"kty": "RSA", "kid": "b", "use": "enc"}]}
    with pytest.raises(JwksRefused) as exc:
        parse_jwks(doc)
    text = str(exc.value)
    # An unusable entry still counts: the set names one kid for two keys.
    assert "kid 'a' names 2 keys (keys[0], keys[2])" in text
    assert "kid 'b' names 2 keys (keys[1], keys[3])" in text
    # Keys without a kid are not duplicates of each other.
    no_kids = {"keys": [{k: v for k, v in rsa_jwk(key, "x").items() if k != "kid"}
                        for key in (good_key, other)]}
    assert len(parse_jwks(no_kids)) == 2


def test_parser_refuses_mixed_key_types_unless_allowed(good_key):
    p256 = ec.generate_private_key(ec.SECP256R1())
    doc = {"keys": [rsa_jwk(good_key, "r1"), ec_jwk(p256, "e1"), oct_jwk("h1")]}
    with pytest.raises(JwksRefused) as exc:
        parse_jwks(doc)
    text = str(exc.value)
    assert "symmetric keys (oct kid 'h1')" in text
    assert "asymmetric keys (RSA kid 'r1', EC kid 'e1')" in text
    assert "allow_mixed_key_types" in text
    mixed = parse_jwks(doc, allow_mixed_key_types=True)
    assert mixed.kids == {"r1", "e1", "h1"}
    # One kind alone is fine either way.
    assert parse_jwks({"keys": [oct_jwk("h1"), oct_jwk("h2", b"k" * 32)]}).kids == {"h1", "h2"}
    assert parse_jwks({"keys": doc["keys"][:2]}).kids == {"r1", "e1"}
    # The opt-out covers the mix only, never a repeated kid or a ROCA key.
    with pytest.raises(JwksRefused, match="kid 'r1' names 2 keys"):
        parse_jwks({"keys": doc["keys"] + [rsa_jwk(good_key, "r1")]}, allow_mixed_key_types=True)


def test_parser_lists_every_problem_at_once(roca_keys, good_key):
    doc = {"keys": [rsa_jwk(roca_keys[1], "weak"), rsa_jwk(good_key, "dup"), rsa_jwk(good_key, "dup"),
                    oct_jwk("hmac")]}
    with pytest.raises(JwksRefused) as exc:
        parse_jwks(doc)
    problems = str(exc.value).split("; ")
    assert any("kid 'dup' names 2 keys" in p for p in problems)
    assert any("(kid 'weak')" in p and "ROCA" in p for p in problems)
    assert any("oct kid 'hmac'" in p for p in problems)


# ---------------------------------------------------------------- through the gateway


def sign_rs256(key: rsa.RSAPrivateKey, kid: str, **extra) -> str:
    now = int(time.time())
    header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid}).encode())
    payload = b64(json.dumps({"iss": ISSUER, "aud": "orders-api", "sub": "user-42",
                              "exp": now + 300, "iat": now - 5, **extra}).encode())
    signature = key.sign(f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{payload}.{b64(signature)}"


def sign_hs256(secret: bytes, kid: str) -> str:
    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    payload = b64(json.dumps({"iss": ISSUER, "aud": "orders-api", "sub": "svc-7",
                              "exp": now + 300}).encode())
    return f"{header}.{payload}.{b64(hmac.digest(secret, f'{header}.{payload}'.encode(), 'sha256'))}"


def jwt_config(upstream_port: int, jwks: dict, **authorizer) -> dict:
    cfg = base_config(upstream_port, routes=[
        {"route": "GET /orders/{id}", "integration": {"type": "http", "upstream": "demo"}, "auth": "users_jwt"},
    ])
    cfg["authorizers"] = {"users_jwt": {"type": "jwt", "issuer": ISSUER, "audience": ["orders-api"],
                                        "algorithms": ["RS256"], "jwks": jwks, **authorizer}}
    cfg.pop("admin", None)  # these tests read gw.stats() directly: no admin listener needed
    return cfg


def write_jwks(tmp_path, keys: list[dict]) -> str:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    return str(path)


BAD_SETS: dict[str, tuple[Callable[..., list[dict]], tuple[str, ...]]] = {
    # name: (keys given (good RSA key, a ROCA key, another RSA key), text the refusal must hold)
    "mixed": (lambda good, weak, other: [rsa_jwk(good, "k2"), oct_jwk("h1")],
              ("symmetric keys (oct kid 'h1')", "RSA kid 'k2'")),
    "duplicate_kid": (lambda good, weak, other: [rsa_jwk(good, "k2"), rsa_jwk(other, "k2")],
                      ("kid 'k2' names 2 keys (keys[0], keys[1])",)),
    "roca": (lambda good, weak, other: [rsa_jwk(good, "k1b"), rsa_jwk(weak, "k2")],
             ("keys[1] (kid 'k2')", "ROCA", "CVE-2017-15361")),
}


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.mark.parametrize("case", sorted(BAD_SETS))
async def test_gateway_refuses_a_bad_jwks_file_with_a_located_error(
        upstream, gateway, tmp_path, good_key, roca_keys, other_key, case):
    build, needles = BAD_SETS[case]
    cfg = jwt_config(upstream.port, {"file": write_jwks(tmp_path, build(good_key, roca_keys[0], other_key))})
    with pytest.raises(ConfigError) as exc:
        await gateway(cfg)
    located = [e for e in exc.value.errors if e.startswith("authorizers.users_jwt.jwks.file: invalid JWKS: ")]
    assert located, exc.value.errors
    for needle in needles:
        assert needle in located[0], (needle, located[0])


async def test_mixed_jwks_file_loads_with_the_opt_out(upstream, gateway, client_factory, tmp_path,
                                                      good_key, monkeypatch):
    monkeypatch.setenv("EDGEPLANE_TEST_HS_SECRET", "s" * 32)
    jwks = {"file": write_jwks(tmp_path, [rsa_jwk(good_key, "k1"), oct_jwk("h1")]),
            "allow_mixed_key_types": True}
    cfg = jwt_config(upstream.port, jwks, algorithms=["RS256", "HS256"],
                     hs_secret={"env": "EDGEPLANE_TEST_HS_SECRET"})
    gw = await gateway(cfg)
    c = await client_factory(gw.addresses[0])
    assert (await c.request("GET", "/orders/1", headers={"Authorization": sign_rs256(good_key, "k1")})).status == 200
    assert (await c.request("GET", "/orders/2", headers={"Authorization": sign_hs256(HS_KEY, "h1")})).status == 200
    # The key still decides the algorithm: an HS256 token naming the RSA kid is refused.
    assert (await c.request("GET", "/orders/3", headers={"Authorization": sign_hs256(HS_KEY, "k1")})).status == 401
    # Without the opt-out the same file is refused.
    jwks["allow_mixed_key_types"] = False
    with pytest.raises(ConfigError, match=r"authorizers\.users_jwt\.jwks\.file: invalid JWKS: .*oct kid 'h1'"):
        load_config(cfg)


def test_opt_out_must_be_a_boolean(tmp_path, good_key):
    cfg = jwt_config(9, {"file": write_jwks(tmp_path, [rsa_jwk(good_key, "k1")]), "allow_mixed_key_types": "yes"})
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert any(e.startswith("authorizers.users_jwt.jwks.allow_mixed_key_types") for e in exc.value.errors), \
        exc.value.errors


class JwksServer:
    """A real JWKS endpoint on loopback; `keys` can be swapped between fetches."""

    def __init__(self, keys: list[dict]):
        self.keys = keys
        self.fetches = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.fetches += 1
                body = json.dumps({"keys": self.keys}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def __aenter__(self) -> JwksServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition the gateway reaches off the request path (a background refresh)."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


def refusal_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "edgeplane.jwks" and r.levelno == logging.WARNING
            and "refused the served key set" in r.getMessage()]


@pytest.mark.parametrize("case", sorted(BAD_SETS))
async def test_jwks_url_serving_a_bad_set_keeps_the_last_good_one(
        upstream, gateway, client_factory, caplog, good_key, roca_keys, other_key, case):
    caplog.set_level(logging.WARNING, logger="edgeplane.jwks")
    build, needles = BAD_SETS[case]
    old_key = rsa.generate_private_key(65537, 2048)
    async with JwksServer([rsa_jwk(old_key, "k1")]) as jwks:
        gw = await gateway(jwt_config(upstream.port, {"url": jwks.url}))
        c = await client_factory(gw.addresses[0])
        assert (await c.request("GET", "/orders/1", headers={"Authorization": sign_rs256(old_key, "k1")})).status == 200
        # The issuer now serves a bad set without k1; a token naming k2 makes the gateway
        # refresh at once (off the request path).
        jwks.keys = build(good_key, roca_keys[0], other_key)
        signer = roca_keys[0] if case == "roca" else good_key
        k2_token = sign_rs256(signer, "k2")
        assert (await c.request("GET", "/orders/2", headers={"Authorization": k2_token})).status == 401
        stats = lambda: gw.stats()["authorizers"]["users_jwt"]  # noqa: E731
        await wait_until(lambda: stats()["failures"] >= 1)
        assert jwks.fetches >= 2
        for needle in needles:
            assert needle in stats()["last_error"], (needle, stats()["last_error"])
        warnings = refusal_warnings(caplog)
        assert warnings and all(n in warnings[0] for n in needles), warnings
        assert "keeping 1 keys" in warnings[0]
        # The old set is still the one in force: a fresh token signed with k1 (not a cache
        # hit) passes, and the bad set's k2 is still unknown.
        fresh = sign_rs256(old_key, "k1", sub="user-43")
        assert (await c.request("GET", "/orders/3", headers={"Authorization": fresh})).status == 200
        assert (await c.request("GET", "/orders/4", headers={"Authorization": k2_token})).status == 401
        assert stats()["keys"] == 1


async def test_jwks_url_bad_at_start_answers_401_like_no_keys(upstream, gateway, client_factory, caplog,
                                                             good_key, other_key):
    caplog.set_level(logging.WARNING, logger="edgeplane.jwks")
    async with JwksServer([rsa_jwk(good_key, "k1"), rsa_jwk(other_key, "k1")]) as jwks:
        gw = await gateway(jwt_config(upstream.port, {"url": jwks.url}))
        c = await client_factory(gw.addresses[0])
        for key in (good_key, other_key):
            r = await c.request("GET", "/orders/1", headers={"Authorization": sign_rs256(key, "k1")})
            assert r.status == 401 and r.json() == {"message": "Unauthorized"}
        stats = gw.stats()["authorizers"]["users_jwt"]
        assert stats["keys"] == 0 and stats["failures"] >= 1
        assert "kid 'k1' names 2 keys" in stats["last_error"]
        assert any("keeping no keys" in w and "kid 'k1'" in w for w in refusal_warnings(caplog))
        # Once the issuer fixes its set, the next retry (its backoff: 1 s, 2 s...) adopts it.
        jwks.keys = [rsa_jwk(good_key, "k1")]
        await wait_until(lambda: gw.stats()["authorizers"]["users_jwt"]["keys"] == 1)
        r = await c.request("GET", "/orders/2", headers={"Authorization": sign_rs256(good_key, "k1")})
        assert r.status == 200
