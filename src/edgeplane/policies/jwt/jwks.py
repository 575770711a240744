"""JSON Web Key Sets: parsing, key identity, and the refresh policy (sans-IO).

This module owns three things and does no I/O (no sockets, no files, no clock):

1. **Parsing** (`parse_jwks`) of a JWK Set (RFC 7517) into verification keys (`Key`):

   - ``kty: RSA`` (``n``, ``e``; modulus 2048..8192 bits, odd exponent >= 3),
     ``kty: EC`` (``crv`` P-256 / P-384 / P-521, ``x``, ``y`` of the curve's exact length,
     point on the curve), ``kty: OKP`` (``crv: Ed25519``, 32-byte ``x``) and
     ``kty: oct`` (``k``, at least 32 bytes, for HS*).
   - Each key keeps ``kid``, ``kty``, ``crv``, and the optional ``alg`` and ``use``.
     Keys with ``use: enc``, with ``key_ops`` lacking ``verify``, with an ``alg`` that does
     not fit their type or with private members (``d``, ``p``...) are *skipped*, each
     with a reason in `KeySet.errors`. One such entry never hides the good ones.
   - The document as a whole is refused (`JwksError`) when it is over
     `MAX_JWKS_BYTES` (150,000 bytes, the AWS limit), holds more than `MAX_KEYS` (100)
     entries, is not ``{"keys": [...]}``, or leaves no usable key.
   - Hygiene: the set is refused (`JwksRefused`, every problem listed, each naming its
     kids) when two entries share a ``kid`` (which key a token means would be a guess),
     when an RSA key has the ROCA fingerprint (CVE-2017-15361, `roca`: its private key
     can be computed from the public one), or when it mixes symmetric (``oct``) and
     asymmetric keys, an algorithm-confusion risk, unless the caller passes
     ``allow_mixed_key_types=True``. Only the mix has an opt-out. Refusing the whole set,
     rather than skipping the entries, is deliberate: an issuer publishing such a set is
     misconfigured or compromised, and a URL refresh then keeps the last good set.
   - Base64url members are strict: the unpadded URL-safe alphabet only.

2. **Key identity.** `Key.thumbprint` is the RFC 7638 SHA-256 thumbprint of the public
   material (for ``oct`` keys, of the secret: never log it). `KeySet.version` is a
   fingerprint of every (kid, thumbprint, alg) in the set: equal versions mean equal
   verification behaviour, so caches compare one string per hit and only look deeper
   when it changes. A `KeySet` is immutable; a refresh builds a new one.

3. **When to fetch** (`RefreshPolicy`, `cache_control_max_age`): pure decisions taking
   ``now`` (any monotonic clock, seconds). The URL fetcher (elsewhere) asks
   `RefreshPolicy.due`/`delay`, calls `begin` before a fetch and `on_success`/`on_failure`
   after it. A failed fetch never discards keys: the caller keeps the last good `KeySet`.
   An unknown ``kid`` may force a fetch at most once per ``unknown_kid_interval``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from edgeplane.policies.jwt.roca import has_roca_fingerprint

__all__ = [
    "MAX_JWKS_BYTES",
    "MAX_KEYS",
    "JwksError",
    "JwksRefused",
    "Key",
    "KeySet",
    "RefreshPolicy",
    "b64url_decode",
    "cache_control_max_age",
    "parse_jwks",
]

MAX_JWKS_BYTES = 150_000
MAX_KEYS = 100
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
MIN_OCT_BYTES = 32

# crv -> (cryptography curve, coordinate length in bytes)
EC_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}
# The algorithms each kind of key can verify (the key decides, never the token header).
EC_ALG_FOR_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")


class JwksError(ValueError):
    """The JWK Set as a whole is unusable (too big, not a set, no usable key)."""


class JwksRefused(JwksError):
    """The JWK Set parses but fails the hygiene checks (repeated kid, ROCA key, mixed
    symmetric and asymmetric keys). The message names the offending kids."""


_B64URL = re.compile(rb"[A-Za-z0-9_-]*")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64_INDEX = {c: i for i, c in enumerate(_B64_ALPHABET)}


def b64url_decode(data: str | bytes) -> bytes:
    """Strict unpadded base64url: alphabet ``A-Za-z0-9-_`` only, no ``=``, no white space,
    canonical trailing bits. Raises ValueError otherwise."""
    if isinstance(data, str):
        try:
            data = data.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("not base64url") from None
    n = len(data)
    rem = n & 3
    if rem == 1 or _B64URL.fullmatch(data) is None:
        raise ValueError("not base64url")
    if rem:
        # The unused low bits of the last character must be zero (canonical encoding),
        # so one value has exactly one spelling.
        mask = 0x0F if rem == 2 else 0x03
        if _B64_INDEX[data[-1]] & mask:
            raise ValueError("not canonical base64url")
        data += b"=" * (4 - rem)
    return base64.urlsafe_b64decode(data)


def _b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True, eq=False)
class Key:
    """One verification key. `public_key` is a cryptography public key object, or the
    secret bytes for ``kty: oct``. `algorithms` is the set this key may verify: the
    key's type and curve decide it, narrowed to `alg` when the JWK names one."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    use: str | None
    public_key: Any
    thumbprint: str
    algorithms: frozenset[str]
    #: "jwks" for keys from a key set, "config" for a configured HS* secret.
    source: str = "jwks"

    def __repr__(self) -> str:  # never print secret material
        return f"Key(kid={self.kid!r}, kty={self.kty!r}, crv={self.crv!r}, alg={self.alg!r})"


class KeySet:
    """An immutable set of `Key` objects, by kid. `errors` lists skipped entries."""

    __slots__ = ("keys", "errors", "version", "_by_kid", "_thumbprints", "sole")

    def __init__(self, keys: Iterable[Key], errors: Iterable[str] = ()) -> None:
        self.keys: tuple[Key, ...] = tuple(keys)
        self.errors: tuple[str, ...] = tuple(errors)
        self._by_kid: dict[str, Key] = {k.kid: k for k in self.keys if k.kid is not None}
        self._thumbprints = frozenset(k.thumbprint for k in self.keys)
        #: The only key, when the set holds exactly one (used for tokens without kid).
        self.sole: Key | None = self.keys[0] if len(self.keys) == 1 else None
        h = hashlib.sha256()
        for line in sorted(f"{k.kid}\0{k.thumbprint}\0{k.alg}" for k in self.keys):
            h.update(line.encode("utf-8"))
            h.update(b"\n")
        #: Fingerprint of the set's verification behaviour (equal sets, equal versions).
        self.version: str = h.hexdigest()[:32]

    def get(self, kid: str | None) -> Key | None:
        """The key with this kid; with ``kid=None`` the sole key of a one-key set."""
        if kid is None:
            return self.sole
        return self._by_kid.get(kid)

    def has(self, key: Key) -> bool:
        """True when this set still holds `key` (same kid and same material)."""
        if key.kid is None:
            return key.thumbprint in self._thumbprints
        mine = self._by_kid.get(key.kid)
        return mine is not None and mine.thumbprint == key.thumbprint

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._by_kid)

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"KeySet(kids={sorted(self._by_kid)!r}, version={self.version!r}, errors={len(self.errors)})"


def _thumbprint(members: dict[str, str]) -> str:
    # RFC 7638: required members only, lexicographic order, no white space.
    canon = orjson.dumps(members, option=orjson.OPT_SORT_KEYS)
    return _b64url_encode(hashlib.sha256(canon).digest())


def _member(jwk: dict, name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"missing or non-string '{name}'")
    try:
        return b64url_decode(value)
    except ValueError:
        raise ValueError(f"'{name}' is not base64url") from None


def _opt_str(jwk: dict, name: str) -> str | None:
    value = jwk.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"'{name}' must be a string")
    return value


def parse_key(jwk: Any) -> Key:
    """One JWK -> `Key`. Raises ValueError with a short reason if it is unusable."""
    if not isinstance(jwk, dict):
        raise ValueError("not a JSON object")
    kty = _opt_str(jwk, "kty")
    kid = _opt_str(jwk, "kid")
    alg = _opt_str(jwk, "alg")
    use = _opt_str(jwk, "use")
    if use is not None and use != "sig":
        raise ValueError(f"use '{use}' is not 'sig'")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError("key_ops does not allow 'verify'")
    crv: str | None = None
    if kty in ("RSA", "EC", "OKP"):
        for member in PRIVATE_MEMBERS:
            if member in jwk:
                raise ValueError(f"holds private key member '{member}'")
    if kty == "RSA":
        n_raw, e_raw = _member(jwk, "n"), _member(jwk, "e")
        n, e = int.from_bytes(n_raw, "big"), int.from_bytes(e_raw, "big")
        bits = n.bit_length()
        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise ValueError(f"RSA modulus of {bits} bits (allowed {MIN_RSA_BITS}..{MAX_RSA_BITS})")
        if e < 3 or not e & 1 or e >= n:
            raise ValueError("bad RSA exponent")
        public: Any = rsa.RSAPublicNumbers(e, n).public_key()
        algs = RSA_ALGS
        tp = _thumbprint({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]})
    elif kty == "EC":
        crv = _opt_str(jwk, "crv")
        if crv not in EC_CURVES:
            raise ValueError(f"unsupported EC curve {crv!r}")
        curve, size = EC_CURVES[crv]
        x, y = _member(jwk, "x"), _member(jwk, "y")
        if len(x) != size or len(y) != size:
            raise ValueError(f"EC coordinates must be {size} bytes for {crv}")
        try:
            public = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + x + y)
        except ValueError:
            raise ValueError("EC point is not on the curve") from None
        algs = frozenset({EC_ALG_FOR_CURVE[crv]})
        tp = _thumbprint({"crv": crv, "kty": "EC", "x": jwk["x"], "y": jwk["y"]})
    elif kty == "OKP":
        crv = _opt_str(jwk, "crv")
        if crv != "Ed25519":
            raise ValueError(f"unsupported OKP curve {crv!r}")
        x = _member(jwk, "x")
        if len(x) != 32:
            raise ValueError("Ed25519 'x' must be 32 bytes")
        public = ed25519.Ed25519PublicKey.from_public_bytes(x)
        algs = frozenset({"EdDSA"})
        tp = _thumbprint({"crv": crv, "kty": "OKP", "x": jwk["x"]})
    elif kty == "oct":
        public = _member(jwk, "k")
        if len(public) < MIN_OCT_BYTES:
            raise ValueError(f"oct key shorter than {MIN_OCT_BYTES} bytes")
        algs = HMAC_ALGS
        tp = _thumbprint({"k": jwk["k"], "kty": "oct"})
    else:
        raise ValueError(f"unsupported kty {kty!r}")
    if alg is not None:
        if alg not in algs:
            raise ValueError(f"alg '{alg}' does not fit a {kty} key" + (f" on {crv}" if crv else ""))
        algs = frozenset({alg})
    return Key(kid=kid, kty=kty, crv=crv, alg=alg, use=use, public_key=public,
               thumbprint=tp, algorithms=algs)


def secret_key(secret: bytes, kid: str | None = None) -> Key:
    """A `Key` for an HS* shared secret configured outside any JWKS."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_OCT_BYTES:
        raise ValueError(f"HMAC secret must be at least {MIN_OCT_BYTES} bytes")
    secret = bytes(secret)
    tp = _thumbprint({"k": _b64url_encode(secret), "kty": "oct"})
    return Key(kid=kid, kty="oct", crv=None, alg=None, use="sig", public_key=secret,
               thumbprint=tp, algorithms=HMAC_ALGS, source="config")


def parse_jwks(data: bytes | str | dict, *, allow_mixed_key_types: bool = False) -> KeySet:
    """A JWK Set document (bytes, str or already-decoded dict) -> `KeySet`.

    Raises `JwksError` when the document is unusable as a whole, `JwksRefused` when it
    fails the hygiene checks (see the module docstring); bad entries are skipped and
    described in `KeySet.errors`."""
    if isinstance(data, (bytes, bytearray, memoryview, str)):
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if len(raw) > MAX_JWKS_BYTES:
            raise JwksError(f"JWKS document is {len(raw)} bytes (limit {MAX_JWKS_BYTES})")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise JwksError("JWKS document is not valid JSON") from None
    else:
        doc = data
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError('JWKS document is not an object with a "keys" list')
    entries = doc["keys"]
    if len(entries) > MAX_KEYS:
        raise JwksError(f"JWKS holds {len(entries)} keys (limit {MAX_KEYS})")
    keys: list[Key] = []
    errors: list[str] = []
    refusals = _repeated_kids(entries)
    for i, jwk in enumerate(entries):
        label = f"keys[{i}]"
        if isinstance(jwk, dict) and isinstance(jwk.get("kid"), str):
            label += f" (kid {jwk['kid']!r})"
        try:
            key = parse_key(jwk)
        except (ValueError, TypeError, OverflowError) as exc:
            errors.append(f"{label}: {exc}")
            continue
        if key.kty == "RSA" and has_roca_fingerprint(key.public_key.public_numbers().n):
            refusals.append(f"{label}: RSA key with the ROCA weakness (CVE-2017-15361): its "
                            "private key can be computed from the public key; replace it")
            continue
        keys.append(key)
    symmetric = [k for k in keys if k.kty == "oct"]
    asymmetric = [k for k in keys if k.kty != "oct"]
    if symmetric and asymmetric and not allow_mixed_key_types:
        refusals.append(
            f"mixes symmetric keys ({_names(symmetric)}) with asymmetric keys "
            f"({_names(asymmetric)}), an algorithm-confusion risk; keep HMAC keys in a set "
            "of their own (or opt in with allow_mixed_key_types)")
    if refusals:
        raise JwksRefused("; ".join(refusals))
    if not keys:
        detail = "; ".join(errors) if errors else "the set is empty"
        raise JwksError(f"JWKS has no usable key: {detail}")
    return KeySet(keys, errors)


def _repeated_kids(entries: list[Any]) -> list[str]:
    """One refusal per kid that more than one entry names. Every entry counts, usable or
    not: a set where one kid means two keys is ambiguous whichever of them we could use."""
    where: dict[str, list[int]] = {}
    for i, jwk in enumerate(entries):
        if isinstance(jwk, dict) and isinstance(jwk.get("kid"), str):
            where.setdefault(jwk["kid"], []).append(i)
    return [f"kid {kid!r} names {len(idx)} keys ({', '.join(f'keys[{i}]' for i in idx)}); "
            "a kid must name one key"
            for kid, idx in where.items() if len(idx) > 1]


def _names(keys: list[Key], limit: int = 8) -> str:
    """``kty kid 'a', ...`` for a refusal message: at most `limit` names, then a count."""
    shown = [f"{k.kty} kid {k.kid!r}" if k.kid is not None else f"{k.kty} key without kid"
             for k in keys[:limit]]
    if len(keys) > limit:
        shown.append(f"and {len(keys) - limit} more")
    return ", ".join(shown)


def cache_control_max_age(value: str | bytes | None) -> float | None:
    """Seconds a response may be reused per its Cache-Control header: ``max-age=N`` -> N,
    ``no-store`` / ``no-cache`` -> 0, absent or unparsable -> None."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("latin-1")
    max_age: float | None = None
    for part in value.split(","):
        name, _, arg = part.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-store", "no-cache"):
            return 0.0
        if name == "max-age" and max_age is None:
            arg = arg.strip().strip('"')
            if arg.isascii() and arg.isdigit():
                max_age = float(arg)
    return max_age


class RefreshPolicy:
    """When to fetch a JWKS URL (sans-IO; every method takes ``now`` in seconds).

    - Start: due at once.
    - After a success: next fetch after `interval`, or after the response's
      Cache-Control max-age when given, clamped to [`min_interval`, `max_interval`].
    - After a failure: exponential backoff from `backoff_initial` doubling up to
      `backoff_max` (never beyond the normal interval). Keys are not touched here: the
      caller keeps the last good set.
    - Unknown kid: `unknown_kid(now)` returns True (and makes a fetch due now) at most
      once per `unknown_kid_interval`, never while a fetch runs or during backoff.
    - At most one fetch at a time: `due` is False between `begin` and its outcome.
    """

    __slots__ = ("interval", "min_interval", "max_interval", "unknown_kid_interval",
                 "backoff_initial", "backoff_max", "next_at", "in_flight", "failures",
                 "last_unknown_kid_at", "last_success_at", "retry_not_before")

    def __init__(self, interval: float = 300.0, *, min_interval: float = 30.0,
                 max_interval: float = 86_400.0, unknown_kid_interval: float = 30.0,
                 backoff_initial: float = 1.0, backoff_max: float = 300.0) -> None:
        if not 0 < min_interval <= max_interval:
            raise ValueError("need 0 < min_interval <= max_interval")
        if interval <= 0 or unknown_kid_interval < 0 or backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("bad refresh policy intervals")
        self.interval = float(interval)
        self.min_interval = float(min_interval)
        self.max_interval = float(max_interval)
        self.unknown_kid_interval = float(unknown_kid_interval)
        self.backoff_initial = float(backoff_initial)
        self.backoff_max = float(backoff_max)
        self.next_at = float("-inf")
        self.in_flight = False
        self.failures = 0
        self.last_unknown_kid_at = float("-inf")
        self.last_success_at: float | None = None
        self.retry_not_before = float("-inf")

    def due(self, now: float) -> bool:
        return not self.in_flight and now >= self.next_at

    def delay(self, now: float) -> float:
        """Seconds until the next fetch is due (0 if due; inf while one runs)."""
        if self.in_flight:
            return float("inf")
        return max(0.0, self.next_at - now)

    def begin(self, now: float) -> None:
        self.in_flight = True

    def on_success(self, now: float, max_age: float | None = None) -> float:
        """Record a good fetch; returns the time of the next one."""
        ttl = self.interval if max_age is None else max_age
        ttl = min(self.max_interval, max(self.min_interval, ttl))
        self.in_flight = False
        self.failures = 0
        self.last_success_at = now
        self.retry_not_before = float("-inf")
        self.next_at = now + ttl
        return self.next_at

    def on_failure(self, now: float) -> float:
        """Record a failed fetch (network, status, size, garbage); returns the retry time."""
        self.in_flight = False
        self.failures += 1
        backoff = min(self.backoff_max, self.backoff_initial * 2.0 ** min(self.failures - 1, 60))
        backoff = min(backoff, self.interval)
        self.next_at = self.retry_not_before = now + backoff
        return self.next_at

    def unknown_kid(self, now: float) -> bool:
        """A token named a kid we do not hold. True = fetch now (the caller should wake
        its refresher); False = too soon, keep answering 401."""
        if self.in_flight or now < self.retry_not_before:
            return False
        if now - self.last_unknown_kid_at < self.unknown_kid_interval:
            return False
        self.last_unknown_kid_at = now
        self.next_at = min(self.next_at, now)
        return True
