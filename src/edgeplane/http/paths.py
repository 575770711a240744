"""Request-target normalisation: the path and the host every later stage sees.

Owns `normalize_path` and `normalize_host`, sans-IO functions the server calls once per
request, before routing. Route matching, path parameters, `{proxy+}`, the access log and
the path sent upstream all read the result, so a route cannot be reached, or missed, by
spelling its path or host differently (the way Envoy's `normalize_path`,
`merge_slashes` and `path_with_escaped_slashes_action` close the same hole).

What `normalize_path` does, in this order, with the default (strict) `PathPolicy`:
1. refuses control characters (raw or percent-encoded: %00-%1F, %7F) and malformed
   percent escapes (`%G1`, a trailing `%`);
2. decodes percent-encoded unreserved characters (RFC 3986 2.3: ALPHA DIGIT - . _ ~),
   so `/%61dmin` is `/admin`; other escapes stay encoded, with upper-case hex;
3. `%2F` and `%5C` (encoded slash and backslash), a raw backslash, and `;` (path
   parameters, which Tomcat-style servers strip, so `/admin;/x` would mean `/admin/x`)
   are each refused (400), or, when their policy is `keep`, kept as `%2F`, `%5C`, `%5C`
   and `%3B`: upstreams then never treat them as separators;
4. merges repeated slashes (`//admin///x` -> `/admin/x`);
5. removes dot segments per RFC 3986 5.2.4, percent-encoded dots included
   (`/x/%2e%2e/admin` -> `/admin`); `..` above the root stays at the root.

Invariants:
- Under one policy the result is a fixed point (normalising it again changes nothing),
  except that `backslashes: keep` writes `%5C`, which `escaped_slashes: reject` refuses.
- The fast path is one scan for the bytes that can need work (`%`, `/.`, `//`, `\\`, `;`);
  a path with none of them is returned as is, with no copy.
- No per-request regex: percent escapes are walked by `bytes.split`; segments by
  `bytes.split` and a list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# Anything normalisation may change or refuse: a byte that is not a plain path byte
# (controls, space, %, ;, backslash) or the start of a dot segment or an empty one. One
# search is the whole cost of a path that needs nothing (the common case).
_NEEDS_WORK = re.compile(rb"[^!-$&-:<-\[\]-~\x80-\xff]|/\.|//")
# A valid Host: a DNS-style name or an IP literal, then an optional port. `%` is
# refused (an encoded host would route differently from its decoded spelling).
_HOST = re.compile(rb"(?:[a-z0-9](?:[a-z0-9\-._~]*)|\[[0-9a-f:.]+\])(?::[0-9]{0,5})?")

Action = Literal["reject", "keep"]


@dataclass(frozen=True, slots=True)
class PathPolicy:
    """`http.path_normalization`: each step can be relaxed; the defaults are strict."""

    merge_slashes: bool = True
    remove_dot_segments: bool = True
    decode_unreserved: bool = True
    escaped_slashes: Action = "reject"  # %2F and %5C
    backslashes: Action = "reject"  # a raw "\"
    path_parameters: Action = "reject"  # ";"

    @property
    def relaxed(self) -> tuple[str, ...]:
        """The steps switched off (a spelling of a path that then reaches a route
        differently from its canonical form: `validate` warns when authorizers exist)."""
        return tuple(name for name in ("merge_slashes", "remove_dot_segments", "decode_unreserved")
                     if not getattr(self, name))


STRICT = PathPolicy()


class PathRejected(ValueError):
    """The path cannot be normalised safely; the message is the client's 400 reason."""


def normalize_path(path: bytes, policy: PathPolicy = STRICT) -> bytes:
    """The normalised form of an origin-form path (no query), or PathRejected."""
    if _NEEDS_WORK.search(path) is None:
        return path
    if _CONTROL.search(path) is not None:
        raise PathRejected("control character in path")
    if b"%" in path:
        path = _percent(path, policy)
    if b"\\" in path:
        if policy.backslashes == "reject":
            raise PathRejected("backslash in path")
        path = path.replace(b"\\", b"%5C")
    if b";" in path:
        if policy.path_parameters == "reject":
            raise PathRejected("';' (path parameter) in path")
        path = path.replace(b";", b"%3B")
    if policy.merge_slashes and b"//" in path:
        path = _merge(path)
    if policy.remove_dot_segments and (b"/." in path or b"%2E" in path):
        path = _remove_dots(path)
    return path


def _merge(path: bytes) -> bytes:
    while b"//" in path:
        path = path.replace(b"//", b"/")
    return path


def _percent(path: bytes, policy: PathPolicy) -> bytes:
    parts = path.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            raise PathRejected("malformed percent-encoding in path")
        code = int(part[:2], 16)
        if code < 0x20 or code == 0x7F:
            raise PathRejected("encoded control character in path")
        if code == 0x2F or code == 0x5C:
            if policy.escaped_slashes == "reject":
                raise PathRejected("encoded slash or backslash in path")
        elif code in _UNRESERVED and policy.decode_unreserved:
            out.append(bytes((code,)))
            out.append(part[2:])
            continue
        out.append(b"%" + part[:2].upper())
        out.append(part[2:])
    return b"".join(out)


def _remove_dots(path: bytes) -> bytes:
    """RFC 3986 5.2.4 over segments; a segment that is `.`/`..` in any spelling
    (`%2E`, `.%2E`, ...) counts, since upstreams decode before resolving."""
    segments = path.split(b"/")
    out: list[bytes] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments[1:], 1):
        dots = seg.replace(b"%2E", b".") if b"%2E" in seg else seg
        if dots == b".":
            if i == last:
                out.append(b"")  # "/a/." -> "/a/"
        elif dots == b"..":
            if out:
                out.pop()
            if i == last:
                out.append(b"")  # "/a/b/.." -> "/a/"
        else:
            out.append(seg)
    return b"/" + b"/".join(out)


class HostRejected(PathRejected):
    """The Host (or the absolute-form authority) is not a valid host[:port]."""


def normalize_host(host: bytes) -> bytes:
    """The lower-cased host[:port], or HostRejected (empty, bad characters, bad port)."""
    host = host.lower()
    if _HOST.fullmatch(host) is None or b".." in host:  # ".." : an empty DNS label
        raise HostRejected("invalid Host header" if host else "empty Host header")
    colon = host.rfind(b":")
    if colon > host.rfind(b"]") and colon + 1 < len(host) and int(host[colon + 1:]) > 65535:
        raise HostRejected("invalid port in Host header")
    return host


_HOSTS: dict[bytes, bytes] = {}  # raw Host value -> normalised; bounded by _HOSTS_MAX
_HOSTS_MAX = 1024


def _remember_host(raw: bytes) -> bytes:
    host = normalize_host(raw)  # raises for a bad one: never remembered
    if len(_HOSTS) >= _HOSTS_MAX:  # many spellings (a scan): start over, stay bounded
        _HOSTS.clear()
    _HOSTS[raw] = host
    return host


def split_target(target: bytes, method: bytes, host: bytes | None,
                 policy: PathPolicy = STRICT) -> tuple[bytes, bytes, bytes | None]:
    """(normalised path, query, normalised host) of a request target (RFC 9112 3.2):
    origin-form, absolute-form (whose authority replaces Host, which must still be
    valid), or `*` for OPTIONS. Raises PathRejected (a 400) for anything else."""
    if host is not None:
        known = _HOSTS.get(host)  # hosts repeat: each spelling is validated once
        host = known if known is not None else _remember_host(host)
    if target[:1] == b"/":
        if b"#" in target:
            raise PathRejected("fragment in request target")
        q = target.find(b"?")
        if q < 0:
            return normalize_path(target, policy), b"", host
        return normalize_path(target[:q], policy), target[q + 1:], host
    lowered = target[:8].lower()
    if lowered.startswith(b"http://") or lowered == b"https://":
        scheme_end = target.index(b"//") + 2
        authority_end = len(target)
        for stop in (b"/", b"?", b"#"):
            at = target.find(stop, scheme_end)
            if 0 <= at < authority_end:
                authority_end = at
        authority = target[scheme_end:authority_end]
        if b"@" in authority:
            raise PathRejected("userinfo in request target")
        if not authority:
            raise PathRejected("invalid absolute-form target")
        rest = target[authority_end:]
        if b"#" in rest:
            raise PathRejected("fragment in request target")
        path, sep, query = rest.partition(b"?")
        return normalize_path(path or b"/", policy), query, normalize_host(authority)
    if target == b"*" and method == b"OPTIONS":
        return b"*", b"", host
    raise PathRejected("invalid request target")
