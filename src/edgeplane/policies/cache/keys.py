"""The cache key of a request: what makes two requests share an entry.

Owns `KeyMaker`: host, normalised path, the X-Forwarded-Host, X-Forwarded-Proto and
Forwarded headers when the client sent them (the upstream sees them: a value an
attacker chose must not land in everyone's entry), then either the whole query string
or the route's `key` parameters (every occurrence, percent-decoded), then (unless
the route is `public`) the caller's identity as its authorizer established it, then,
for a response that named `Vary`, the values of those request headers.

Identity, by authorizer type:
- jwt: every claim except the ones that change per token (`exp`, `iat`, `nbf`, `jti`,
  `auth_time`), so two tokens of one caller share entries and two callers never do;
- api_key: the key's id;
- http (custom): the authorizer's identity-source values and the `context` it returned.

Invariants: the parts are joined with NUL, which a request value cannot contain, so two
different requests never make one key; the path part is also returned alone, for an
admin flush of one path.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson

from edgeplane.http.request import Request, header_all

_VOLATILE = frozenset(("exp", "iat", "nbf", "jti", "auth_time"))
_ABSENT = b"\x01"  # a parameter the request does not have: distinct from an empty value
# Headers the gateway forwards upstream that can change what the upstream answers for
# one URL (absolute links, schemes): part of every key when the client sent them.
_FORWARDED = (b"x-forwarded-host", b"x-forwarded-proto", b"forwarded")


def _query_values(query: bytes, name: bytes) -> bytes:
    """Every value of query parameter `name`, in order, names and values compared and
    kept percent-decoded (`pag%65=1` is `page=1`): the upstream reads the whole query,
    so a repeated parameter (`?page=1&page=2`) must not share the entry of `?page=1`."""
    found = []
    for part in query.split(b"&"):
        k, eq, v = part.partition(b"=")
        if unquote_to_bytes(k.replace(b"+", b" ")) == name:
            found.append(unquote_to_bytes(v.replace(b"+", b" ")) if eq else b"")
    return b"\x02".join(found) if found else _ABSENT


def _cookie_values(req: Request, name: bytes) -> bytes:
    found = []
    for key, value in req.headers:
        if key == b"cookie":
            for part in value.split(b";"):
                k, _, v = part.strip().partition(b"=")
                if k == name:
                    found.append(v)
    return b"\x02".join(found) if found else _ABSENT


class KeyMaker:
    __slots__ = ("params", "identity", "sources", "_last")

    def __init__(self, params: tuple[tuple[str, str], ...] | None, identity: bool,
                 sources: tuple[tuple[str, bytes], ...] = ()) -> None:
        # (kind, name as bytes) of `cache.key`; None: the whole query string
        self.params = tuple((kind, name.encode("latin-1")) for kind, name in params) if params is not None else None
        self.identity = identity  # the route's authorizer decides who shares entries
        self.sources = sources  # a custom authorizer's identity sources: ("header"|"querystring", name)
        # The last verified claims object and its digest: the JWT verification cache hands
        # the same object to every request of one token, so this skips re-hashing it.
        self._last: tuple[Any, bytes] = (None, b"")

    def make(self, req: Request) -> bytes:
        host = (req.host or b"").lower()
        parts = [host, req.path]
        for name, value in req.headers:
            if name in _FORWARDED:
                parts.append(name + b"=" + value)
        params = self.params
        if params is None:
            parts.append(req.query)
        else:
            for kind, name in params:
                if kind == "querystring":
                    parts.append(_query_values(req.query, name))
                elif kind == "header":
                    parts.append(b"\x02".join(header_all(req, name)) or _ABSENT)
                elif kind == "path":
                    parts.append((req.params or {}).get(name.decode("latin-1"), _ABSENT))
                else:
                    parts.append(_cookie_values(req, name))
        if self.identity:
            parts.append(self._identity(req))
        return b"\x00".join(parts)

    def _identity(self, req: Request) -> bytes:
        claims = req.claims
        if claims is not None:
            last, digest = self._last
            if last is claims:
                return digest
            mapping = getattr(claims, "claims", claims)  # `jwt.verify.Claims` or a plain mapping
            stable = {k: v for k, v in mapping.items() if k not in _VOLATILE}
            raw = b"jwt:" + orjson.dumps(stable, option=orjson.OPT_SORT_KEYS)
            digest = hashlib.blake2b(raw, digest_size=16).hexdigest().encode()
            self._last = (claims, digest)
            return digest
        elif req.api_key is not None:
            raw = b"key:" + str(req.api_key.id).encode()
        else:
            values: list[Any] = []
            for kind, name in self.sources:
                if kind == "header":
                    values.append([v.decode("latin-1") for v in header_all(req, name)])
                else:
                    values.append(_query_values(req.query, name).decode("latin-1"))
            raw = b"http:" + orjson.dumps([values, req.auth_context], option=orjson.OPT_SORT_KEYS)
        return hashlib.blake2b(raw, digest_size=16).hexdigest().encode()


def variant(primary: bytes, names: tuple[bytes, ...], req: Request) -> bytes:
    """The key of the variant of `primary` that `req` selects (`Vary: names`)."""
    return primary + b"\x00vary\x00" + b"\x00".join(b",".join(header_all(req, n)) for n in names)
