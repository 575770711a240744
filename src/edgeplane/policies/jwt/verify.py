"""JWT verification with the AWS HTTP API JWT-authorizer semantics, and its caches (sans-IO).

This module owns turning a bearer token into verified `Claims` or a `JwtError`, plus the
header helpers of the 401/403 answer. It does no I/O and reads no clock: callers pass
``now`` (seconds since the epoch, as the ``exp``/``nbf``/``iat`` claims are) and a
``keyset_provider`` returning the current `edgeplane.jwks.KeySet` (or None when the
authorizer only uses an HS* secret).

Invariants of `JwtVerifier.verify`:

- A token longer than ``max_token_bytes`` is refused before any parsing.
- Compact JWS only: exactly three strict unpadded base64url segments; header and
  payload are JSON objects; ``crit`` (no extension is understood) is refused.
- **The key decides the algorithm.** The header ``alg`` must be in the authorizer's
  allow-list (``none`` never is) *and* among the algorithms the resolved key can verify:
  RSA keys RS*/PS*, EC keys the one ES* of their curve (ES256 needs P-256...), Ed25519
  EdDSA, ``oct`` keys / the configured secret HS*; a JWK ``alg`` narrows it to itself.
  So an HS256 token "signed" with an RSA public key is refused: no RSA key verifies
  HS256. Header ``jwk``/``jku``/``x5u``/``x5c`` are ignored: keys only come from the
  configured set or secret.
- Keys are found by ``kid`` in the key set. An HS* token uses the configured secret
  when it has no ``kid`` or when there is no (or an empty) key set; any other token
  without ``kid`` uses the sole key of a one-key set. An unknown kid is `JwtError` kind
  ``unknown_kid`` so the caller may ask its `RefreshPolicy` for a re-fetch.
- The payload is parsed only after the signature verifies. Claim types are checked
  (``exp``/``nbf``/``iat`` numbers, not booleans; ``iss``/``sub``/``client_id``/
  ``scope`` strings; ``aud`` a string or list of strings; ``scp`` a list of strings or a
  space-separated string).
- Claims as AWS checks them: ``iss`` equals the issuer; ``aud`` holds a configured
  audience, or without ``aud`` the ``client_id`` is one; ``exp`` is required and
  ``now < exp + leeway``; ``nbf`` and ``iat``, when present, are ``<= now + leeway``.

Every failure is `JwtError` (HTTP 401, ``invalid_token``); nothing else escapes
`verify` for any input. Descriptions are fixed strings safe to send to clients.

Caches (`VerificationCache`, `CachedVerifier`): a bounded LRU from the token (the str or
bytes value itself as the dict key, no hashing of our own: pass one type consistently,
``"t"`` and ``b"t"`` are different keys) to its `Claims`, each entry living
until ``min(exp + leeway, verified_at + ttl)`` and only while its key is still in the
current key set (checked when the set's version changes); and a bounded negative cache
of recent failures (not time-dependent ones such as "not yet valid"), valid only for
the key-set version it was made under, so a rotation re-verifies at once. Tokens over
``max_token_bytes`` never become cache keys. A hit does one dict lookup, two compares
and an LRU move (about 0.2 µs, benches/jwt_bench.py). Each negative hit raises a fresh
`JwtError` (never one shared instance).
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from edgeplane.policies.jwt.jwks import HMAC_ALGS, Key, KeySet, b64url_decode, secret_key

__all__ = [
    "ALGORITHMS",
    "CachedVerifier",
    "Claims",
    "JwtConfig",
    "JwtError",
    "JwtVerifier",
    "VerificationCache",
    "check_scopes",
    "extract_bearer",
    "www_authenticate",
]

# alg -> (family, hash class, ECDSA coordinate size or 0)
ALGORITHMS: dict[str, tuple[str, Any, int]] = {
    "RS256": ("RS", hashes.SHA256, 0), "RS384": ("RS", hashes.SHA384, 0), "RS512": ("RS", hashes.SHA512, 0),
    "PS256": ("PS", hashes.SHA256, 0), "PS384": ("PS", hashes.SHA384, 0), "PS512": ("PS", hashes.SHA512, 0),
    "ES256": ("ES", hashes.SHA256, 32), "ES384": ("ES", hashes.SHA384, 48), "ES512": ("ES", hashes.SHA512, 66),
    "EdDSA": ("Ed", None, 0),
    "HS256": ("HS", "sha256", 0), "HS384": ("HS", "sha384", 0), "HS512": ("HS", "sha512", 0),
}
_HS_MIN_SECRET = {"HS256": 32, "HS384": 48, "HS512": 64}

# JwtError kinds (all map to 401 invalid_token).
OVERSIZED = "oversized"
MALFORMED = "malformed"
ALG_NOT_ALLOWED = "alg_not_allowed"
ALG_KEY_MISMATCH = "alg_key_mismatch"
UNKNOWN_KID = "unknown_kid"
CRIT = "unsupported_crit"
BAD_SIGNATURE = "bad_signature"
BAD_CLAIM = "bad_claim"
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"
BAD_ISSUER = "bad_issuer"
BAD_AUDIENCE = "bad_audience"
# Failures that may turn into successes with time alone: never negatively cached.
_TIME_DEPENDENT = frozenset({NOT_YET_VALID})


class JwtError(Exception):
    """A token was refused. `kind` is a machine code (module constants), `description`
    a short client-safe text for ``error_description``. Always HTTP 401 invalid_token."""

    __slots__ = ("kind", "description")
    status = 401
    error = "invalid_token"

    def __init__(self, kind: str, description: str) -> None:
        super().__init__(kind, description)
        self.kind = kind
        self.description = description

    def __str__(self) -> str:
        return f"{self.kind}: {self.description}"


class Claims:
    """Verified claims. `claims` is a read-only mapping of the payload (treat nested
    values as read-only too: one `Claims` is shared by every cache hit). `scopes` is the
    tuple from ``scope`` (split on spaces) then ``scp``, without repeats."""

    __slots__ = ("claims", "scopes", "alg", "kid", "exp", "_scope_set")

    def __init__(self, payload: dict, alg: str, kid: str | None) -> None:
        self.claims: Mapping[str, Any] = MappingProxyType(payload)
        self.alg = alg
        self.kid = kid
        self.exp: float = payload["exp"]
        scopes: list[str] = []
        scope = payload.get("scope")
        if scope:
            scopes.extend(scope.split())
        scp = payload.get("scp")
        if isinstance(scp, str):
            scopes.extend(scp.split())
        elif scp:
            scopes.extend(scp)
        self.scopes: tuple[str, ...] = tuple(dict.fromkeys(scopes))
        self._scope_set = frozenset(self.scopes)

    def get(self, name: str, default: Any = None) -> Any:
        return self.claims.get(name, default)

    def __getitem__(self, name: str) -> Any:
        return self.claims[name]

    def __contains__(self, name: object) -> bool:
        return name in self.claims

    def __repr__(self) -> str:
        return f"Claims(sub={self.claims.get('sub')!r}, kid={self.kid!r}, alg={self.alg!r})"


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """One JWT authorizer's verification settings. Raises ValueError when inconsistent."""

    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256",)
    leeway: float = 0.0
    max_token_bytes: int = 8192
    hs_secret: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.issuer, str) or not self.issuer:
            raise ValueError("issuer must be a non-empty string")
        audiences = (self.audiences,) if isinstance(self.audiences, str) else tuple(self.audiences)
        if not audiences or not all(isinstance(a, str) and a for a in audiences):
            raise ValueError("audience must hold at least one non-empty string")
        if len(audiences) > 50:
            raise ValueError("at most 50 audiences per authorizer")
        object.__setattr__(self, "audiences", audiences)
        algs = (self.algorithms,) if isinstance(self.algorithms, str) else tuple(self.algorithms)
        if not algs:
            raise ValueError("algorithms must not be empty")
        for alg in algs:
            if alg not in ALGORITHMS:
                raise ValueError(f"unsupported algorithm {alg!r} (known: {', '.join(ALGORITHMS)})")
        object.__setattr__(self, "algorithms", algs)
        if isinstance(self.leeway, bool) or not isinstance(self.leeway, (int, float)) or not 0 <= self.leeway <= 3600:
            raise ValueError("leeway must be between 0 and 3600 seconds")
        if isinstance(self.max_token_bytes, bool) or not isinstance(self.max_token_bytes, int) \
                or not 256 <= self.max_token_bytes <= 65536:
            raise ValueError("max_token_bytes must be between 256 and 65536")
        hs = [a for a in algs if a in HMAC_ALGS]
        if self.hs_secret is not None:
            if not isinstance(self.hs_secret, (bytes, bytearray)):
                raise ValueError("hs_secret must be bytes")
            object.__setattr__(self, "hs_secret", bytes(self.hs_secret))
            if not hs:
                raise ValueError("hs_secret is set but no HS* algorithm is allowed")
            for alg in hs:
                if len(self.hs_secret) < _HS_MIN_SECRET[alg]:
                    raise ValueError(f"{alg} needs a secret of at least {_HS_MIN_SECRET[alg]} bytes")


def _err(kind: str, description: str) -> JwtError:
    return JwtError(kind, description)


def _json_object(segment: bytes, what: str) -> dict:
    try:
        obj = orjson.loads(b64url_decode(segment))
    except (ValueError, orjson.JSONDecodeError):
        raise _err(MALFORMED, f"the token {what} is not valid base64url JSON") from None
    if not isinstance(obj, dict):
        raise _err(MALFORMED, f"the token {what} is not a JSON object")
    return obj


def _is_number(v: Any) -> bool:
    return (type(v) is int or type(v) is float) and v == v and v not in (float("inf"), float("-inf"))


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


class JwtVerifier:
    """Verifies tokens against one `JwtConfig` and the current key set."""

    __slots__ = ("config", "_provider", "_allowed", "_secret", "_audiences", "_issuer", "_leeway",
                 "_max", "calls")

    def __init__(self, config: JwtConfig,
                 keyset_provider: Callable[[], KeySet | None] | KeySet | None = None) -> None:
        self.config = config
        if keyset_provider is None or isinstance(keyset_provider, KeySet):
            fixed = keyset_provider
            self._provider: Callable[[], KeySet | None] = lambda: fixed
        else:
            self._provider = keyset_provider
        self._allowed = frozenset(config.algorithms)
        self._secret: Key | None = secret_key(config.hs_secret) if config.hs_secret is not None else None
        self._audiences = frozenset(config.audiences)
        self._issuer = config.issuer
        self._leeway = float(config.leeway)
        self._max = config.max_token_bytes
        #: Number of full verifications attempted (for tests and metrics).
        self.calls = 0

    def keyset(self) -> KeySet | None:
        return self._provider()

    def verify(self, token: str | bytes, now: float, keyset: KeySet | None = None) -> Claims:
        """Verify `token` at time `now` -> `Claims`, or raise `JwtError`.
        `keyset` overrides the provider (the cached verifier passes the one it read)."""
        self.calls += 1
        if len(token) > self._max:
            raise _err(OVERSIZED, "the token is too large")
        if isinstance(token, str):
            try:
                raw = token.encode("ascii")
            except UnicodeEncodeError:
                raise _err(MALFORMED, "the token is not a compact JWS") from None
        elif isinstance(token, (bytes, bytearray)):
            raw = bytes(token)
        else:
            raise _err(MALFORMED, "the token is not a compact JWS")
        parts = raw.split(b".")
        if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2]:
            raise _err(MALFORMED, "the token is not a compact JWS")
        header = _json_object(parts[0], "header")

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            raise _err(ALG_NOT_ALLOWED, "the token algorithm is not allowed")
        if "crit" in header:
            raise _err(CRIT, "the token has unsupported critical headers")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _err(MALFORMED, "the token kid is not a string")

        key = self._resolve_key(kid, alg, self._provider() if keyset is None else keyset)
        if alg not in key.algorithms:
            raise _err(ALG_KEY_MISMATCH, "the token algorithm does not match the key")

        try:
            signature = b64url_decode(parts[2])
        except ValueError:
            raise _err(MALFORMED, "the token signature is not valid base64url") from None
        signing_input = raw[: len(parts[0]) + 1 + len(parts[1])]
        if not _check_signature(alg, key, signing_input, signature):
            raise _err(BAD_SIGNATURE, "the token signature is invalid")

        payload = _json_object(parts[1], "payload")
        self._check_claims(payload, now)
        return Claims(payload, alg, kid)

    def _resolve_key(self, kid: str | None, alg: str, keyset: KeySet | None) -> Key:
        if kid is None:
            if self._secret is not None and alg in HMAC_ALGS:
                return self._secret
            key = keyset.sole if keyset is not None else None
            if key is None:
                raise _err(UNKNOWN_KID, "the token has no kid")
            return key
        key = keyset.get(kid) if keyset is not None else None
        if key is None:
            if self._secret is not None and alg in HMAC_ALGS and (keyset is None or not keyset.keys):
                return self._secret
            raise _err(UNKNOWN_KID, "the token kid is not a known key")
        return key

    def _check_claims(self, c: dict, now: float) -> None:
        leeway = self._leeway
        exp = c.get("exp")
        if exp is None:
            raise _err(BAD_CLAIM, "the token has no exp claim")
        if not _is_number(exp):
            raise _err(BAD_CLAIM, "the token exp claim is not a number")
        for name in ("nbf", "iat"):
            v = c.get(name)
            if v is not None and not _is_number(v):
                raise _err(BAD_CLAIM, f"the token {name} claim is not a number")
        for name in ("iss", "sub", "client_id", "scope", "jti"):
            v = c.get(name)
            if v is not None and not isinstance(v, str):
                raise _err(BAD_CLAIM, f"the token {name} claim is not a string")
        scp = c.get("scp")
        if scp is not None and not (isinstance(scp, str) or _is_str_list(scp)):
            raise _err(BAD_CLAIM, "the token scp claim is not a list of strings")
        aud = c.get("aud")
        if aud is not None and not (isinstance(aud, str) or _is_str_list(aud)):
            raise _err(BAD_CLAIM, "the token aud claim is not a string or a list of strings")

        if now >= exp + leeway:
            raise _err(EXPIRED, "the token has expired")
        nbf = c.get("nbf")
        if nbf is not None and nbf > now + leeway:
            raise _err(NOT_YET_VALID, "the token is not valid yet")
        iat = c.get("iat")
        if iat is not None and iat > now + leeway:
            raise _err(NOT_YET_VALID, "the token was issued in the future")
        if c.get("iss") != self._issuer:
            raise _err(BAD_ISSUER, "the token issuer is not accepted")
        if aud is not None:
            ok = aud in self._audiences if isinstance(aud, str) else not self._audiences.isdisjoint(aud)
        else:
            client_id = c.get("client_id")
            ok = client_id is not None and client_id in self._audiences
        if not ok:
            raise _err(BAD_AUDIENCE, "the token audience is not accepted")


def _check_signature(alg: str, key: Key, data: bytes, sig: bytes) -> bool:
    family, hash_cls, size = ALGORITHMS[alg]
    pub = key.public_key
    try:
        if family == "HS":
            if len(pub) < _HS_MIN_SECRET[alg]:
                return False
            return hmac.compare_digest(hmac.digest(pub, data, hash_cls), sig)
        if family == "RS":
            pub.verify(sig, data, padding.PKCS1v15(), hash_cls())
        elif family == "PS":
            h = hash_cls()
            pub.verify(sig, data, padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h)
        elif family == "ES":
            # JWS ECDSA signatures are raw r||s, each exactly the curve's size.
            if len(sig) != 2 * size:
                return False
            r = int.from_bytes(sig[:size], "big")
            s = int.from_bytes(sig[size:], "big")
            pub.verify(encode_dss_signature(r, s), data, ec.ECDSA(hash_cls()))
        else:  # EdDSA
            pub.verify(sig, data)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def check_scopes(claims: Claims | Mapping[str, Any], route_scopes: Iterable[str]) -> bool:
    """True when the route needs no scope or the token holds at least one of them."""
    if not route_scopes:
        return True
    if isinstance(claims, Claims):
        have = claims._scope_set
    else:
        items: list[str] = []
        scope = claims.get("scope")
        if isinstance(scope, str):
            items.extend(scope.split())
        scp = claims.get("scp")
        if isinstance(scp, str):
            items.extend(scp.split())
        elif isinstance(scp, list):
            items.extend(s for s in scp if isinstance(s, str))
        have = frozenset(items)
    return any(s in have for s in route_scopes)


def _quote(value: str) -> str:
    # Printable ASCII only (no CR/LF can reach a header), quotes and backslashes escaped.
    cleaned = "".join(ch for ch in value if " " <= ch <= "~")
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def www_authenticate(error: str, description: str = "", scope: str | Iterable[str] = "") -> str:
    """``WWW-Authenticate`` value per RFC 6750, e.g.
    ``Bearer error="invalid_token", error_description="the token has expired"``;
    ``scope`` (a string or the route's scopes) is added first when non-empty."""
    if not isinstance(scope, str):
        scope = " ".join(scope)
    params = []
    if scope:
        params.append("scope=" + _quote(scope))
    if error:
        params.append("error=" + _quote(error))
    if description:
        params.append("error_description=" + _quote(description))
    return "Bearer " + ", ".join(params) if params else "Bearer"


def extract_bearer(value: str | bytes | None) -> str | bytes:
    """The token from an Authorization value: a ``Bearer`` prefix (any case) is optional;
    surrounding white space is removed. Returns "" (or b"") when there is no token."""
    if value is None:
        return ""
    v = value.strip()
    if isinstance(v, (bytes, bytearray)):
        if v[:6].lower() == b"bearer" and (len(v) == 6 or v[6:7] in (b" ", b"\t")):
            return bytes(v[6:].strip())
        return bytes(v)
    if v[:6].lower() == "bearer" and (len(v) == 6 or v[6:7] in (" ", "\t")):
        return v[6:].strip()
    return v


class _Entry:
    __slots__ = ("claims", "expires_at", "key", "version")

    def __init__(self, claims: Claims, expires_at: float, key: Key, version: str | None) -> None:
        self.claims = claims
        self.expires_at = expires_at
        self.key = key
        self.version = version


class VerificationCache:
    """Bounded LRU: token -> verified `Claims`, valid until `expires_at` while its key
    stays in the key set. Plus a bounded negative cache: token -> `JwtError`, valid for
    `negative_ttl` under the key-set version it was made with."""

    __slots__ = ("max_entries", "ttl", "negative_max_entries", "negative_ttl", "_pos", "_neg",
                 "hits", "negative_hits", "evictions")

    def __init__(self, max_entries: int = 10_000, ttl: float = 300.0,
                 negative_max_entries: int = 1_000, negative_ttl: float = 10.0) -> None:
        if max_entries < 0 or negative_max_entries < 0 or ttl < 0 or negative_ttl < 0:
            raise ValueError("cache sizes and TTLs must be >= 0")
        self.max_entries = max_entries
        self.ttl = float(ttl)
        self.negative_max_entries = negative_max_entries
        self.negative_ttl = float(negative_ttl)
        self._pos: OrderedDict[Any, _Entry] = OrderedDict()
        self._neg: OrderedDict[Any, tuple[JwtError, float, str | None]] = OrderedDict()
        self.hits = 0
        self.negative_hits = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._pos)

    def get(self, token: Any, now: float, keyset: KeySet | None) -> Claims | None:
        """Cached claims for `token`, or None. Drops the entry when it expired or its key
        left `keyset`."""
        e = self._pos.get(token)
        if e is None:
            return None
        if now < e.expires_at:
            version = keyset.version if keyset is not None else None
            if e.version == version:
                self._pos.move_to_end(token)
                self.hits += 1
                return e.claims
            # The set changed: keep the entry only if its key is still there, unchanged.
            if e.key.source == "config" or (keyset is not None and keyset.has(e.key)):
                e.version = version
                self._pos.move_to_end(token)
                self.hits += 1
                return e.claims
        del self._pos[token]
        return None

    def put(self, token: Any, claims: Claims, now: float, key: Key, keyset: KeySet | None,
            valid_until: float) -> None:
        if self.max_entries == 0 or self.ttl == 0:
            return
        expires_at = min(valid_until, now + self.ttl)
        if expires_at <= now:
            return
        pos = self._pos
        pos[token] = _Entry(claims, expires_at, key, keyset.version if keyset is not None else None)
        pos.move_to_end(token)
        while len(pos) > self.max_entries:
            pos.popitem(last=False)
            self.evictions += 1

    def get_negative(self, token: Any, now: float, keyset: KeySet | None) -> JwtError | None:
        n = self._neg.get(token)
        if n is None:
            return None
        err, expires_at, version = n
        if now < expires_at and version == (keyset.version if keyset is not None else None):
            self.negative_hits += 1
            # A fresh exception each time: re-raising one instance would grow its
            # traceback without bound and keep old frames alive.
            return JwtError(err.kind, err.description)
        del self._neg[token]
        return None

    def put_negative(self, token: Any, error: JwtError, now: float, keyset: KeySet | None) -> None:
        if self.negative_max_entries == 0 or self.negative_ttl == 0 or error.kind in _TIME_DEPENDENT:
            return
        neg = self._neg
        neg[token] = (JwtError(error.kind, error.description), now + self.negative_ttl,
                      keyset.version if keyset is not None else None)
        neg.move_to_end(token)
        while len(neg) > self.negative_max_entries:
            neg.popitem(last=False)

    def clear(self) -> None:
        self._pos.clear()
        self._neg.clear()


class CachedVerifier:
    """`JwtVerifier` behind a `VerificationCache`: cache hit, else negative hit (re-raise),
    else verify and fill one of the two."""

    __slots__ = ("verifier", "cache", "_provider", "_leeway", "_max", "misses")

    def __init__(self, verifier: JwtVerifier, cache: VerificationCache | None = None) -> None:
        self.verifier = verifier
        self.cache = cache if cache is not None else VerificationCache()
        self._provider = verifier._provider
        self._leeway = verifier._leeway
        self._max = verifier._max
        self.misses = 0

    def verify(self, token: str | bytes, now: float) -> Claims:
        keyset = self._provider()
        cache = self.cache
        # Fast path, inlined from VerificationCache.get: one dict lookup, two compares.
        e = cache._pos.get(token)
        if e is not None and now < e.expires_at and e.version == (keyset.version if keyset is not None else None):
            cache._pos.move_to_end(token)
            cache.hits += 1
            return e.claims
        if e is not None:
            claims = cache.get(token, now, keyset)
            if claims is not None:
                return claims
        if len(token) > self._max:  # refuse huge tokens before they become cache keys
            raise _err(OVERSIZED, "the token is too large")
        err = cache.get_negative(token, now, keyset)
        if err is not None:
            raise err
        self.misses += 1
        try:
            claims = self.verifier.verify(token, now, keyset)
        except JwtError as exc:
            cache.put_negative(token, exc, now, keyset)
            raise
        key = self.verifier._resolve_key(claims.kid, claims.alg, keyset)
        cache.put(token, claims, now, key, keyset, claims.exp + self._leeway)
        return claims
