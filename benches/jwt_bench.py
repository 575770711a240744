"""Micro-benchmark of JWT verification: uncached vs cached, for RS256, ES256 and EdDSA.

Usage: .venv/bin/python benches/jwt_bench.py [--seconds 0.5]

Prints verifications/s for a full verification (`JwtVerifier.verify`: parse, signature,
claims) and for a cache hit (`CachedVerifier.verify` on a token it has seen), and the
cost of one hit in microseconds. The hit path is what every request with a known token
pays; the issue's budget for it is 2 µs.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import orjson  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402

from edgeplane.policies.jwt.jwks import parse_jwks  # noqa: E402
from edgeplane.policies.jwt.verify import CachedVerifier, JwtConfig, JwtVerifier, VerificationCache  # noqa: E402

ISS = "https://auth.example.com/"
AUD = "orders-api"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def ib64(n: int, size: int | None = None) -> str:
    return b64(n.to_bytes(size or (n.bit_length() + 7) // 8, "big"))


def setup(now: float) -> dict[str, str]:
    rsa_key = rsa.generate_private_key(65537, 2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rn = rsa_key.public_key().public_numbers()
    en = ec_key.public_key().public_numbers()
    jwks = {"keys": [
        {"kty": "RSA", "kid": "r", "n": ib64(rn.n), "e": ib64(rn.e)},
        {"kty": "EC", "kid": "e", "crv": "P-256", "x": ib64(en.x, 32), "y": ib64(en.y, 32)},
        {"kty": "OKP", "kid": "d", "crv": "Ed25519",
         "x": b64(ed_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))},
    ]}
    payload = b64(orjson.dumps({"iss": ISS, "aud": AUD, "sub": "user-1", "exp": now + 86400,
                                "iat": now, "scope": "orders:read orders:write"}))

    def tok(alg: str, kid: str, sign) -> str:
        si = b64(orjson.dumps({"alg": alg, "typ": "JWT", "kid": kid})) + "." + payload
        return si + "." + b64(sign(si.encode()))

    def es(data: bytes) -> bytes:
        r, s = decode_dss_signature(ec_key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    tokens = {
        "RS256": tok("RS256", "r", lambda d: rsa_key.sign(d, padding.PKCS1v15(), hashes.SHA256())),
        "ES256": tok("ES256", "e", es),
        "EdDSA": tok("EdDSA", "d", ed_key.sign),
    }
    return {"jwks": jwks, "tokens": tokens}


def rate(fn, seconds: float) -> float:
    n, batch = 0, 64
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            fn()
        n += batch
        t = time.perf_counter()
        if t >= deadline:
            return n / (t - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    args = ap.parse_args()
    now = time.time()
    s = setup(now)
    keyset = parse_jwks(s["jwks"])
    config = JwtConfig(issuer=ISS, audiences=[AUD], algorithms=["RS256", "ES256", "EdDSA"])
    verifier = JwtVerifier(config, lambda: keyset)
    print(f"python {sys.version.split()[0]}; {args.seconds}s per figure")
    print(f"{'alg':6} {'uncached/s':>12} {'cached/s':>12} {'hit µs':>8} {'verify µs':>10}")
    for alg, token in s["tokens"].items():
        verifier.verify(token, now)  # sanity: it verifies
        uncached = rate(lambda: verifier.verify(token, now), args.seconds)  # noqa: B023 (called here, in the loop)
        cv = CachedVerifier(verifier, VerificationCache())
        cv.verify(token, now)
        cached = rate(lambda: cv.verify(token, now), args.seconds)  # noqa: B023 (called here, in the loop)
        print(f"{alg:6} {uncached:12,.0f} {cached:12,.0f} {1e6 / cached:8.3f} {1e6 / uncached:10.1f}")
    # A full cache (10,000 distinct tokens) hit at random positions: dict size must not matter.
    cv = CachedVerifier(verifier, VerificationCache())
    base = s["tokens"]["EdDSA"]
    claims = verifier.verify(base, now)
    many = []
    for i in range(10_000):
        t = f"{base[:-6]}{i:06d}"  # distinct keys, put directly (no signature needed)
        cv.cache.put(t, claims, now, keyset.get("d"), keyset, now + 3600)
        many.append(t)
    probe = many[5000]
    cached = rate(lambda: cv.verify(probe, now), args.seconds)
    print(f"full cache ({len(cv.cache):,} entries): {cached:,.0f} hits/s, {1e6 / cached:.3f} µs/hit "
          "(includes the lambda call of the loop)")


if __name__ == "__main__":
    main()
