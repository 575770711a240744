"""Sans-IO HTTP caching rules (RFC 9111) as a shared cache applies them: what a response
may be stored for, and what a client's request asks of the cache.

Owns `Cache-Control` parsing (both directions), `Vary`, and the storability verdict.
Nothing here does I/O or reads the clock (the caller passes `now`).

Invariants:
- a response marked `no-store`, `no-cache`, `private`, with `Set-Cookie`, `Vary: *`, a
  status not in the route's list, or no freshness left is never stored;
- freshness is the route's `ttl`, shortened (never lengthened) by `s-maxage`, else
  `max-age`, else `Expires` (an invalid one meaning already expired);
- a response to a request carrying `Authorization`, on a route without an authorizer,
  is stored only when it says so (`public`, `s-maxage` or `must-revalidate`, RFC 9111
  section 3.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parsedate_to_datetime


def parse_cache_control(values: list[bytes]) -> dict[bytes, bytes | None]:
    """Every directive of the `Cache-Control` lines `values`, lower-case name -> argument
    (quotes removed) or None. A repeated directive keeps its first value."""
    out: dict[bytes, bytes | None] = {}
    for value in values:
        for part in value.split(b","):
            name, eq, arg = part.strip().partition(b"=")
            name = name.strip().lower()
            if not name or name in out:
                continue
            out[name] = arg.strip().strip(b'"') if eq else None
    return out


def seconds(arg: bytes | None) -> int | None:
    """A delta-seconds argument, or None when it is missing or malformed."""
    if arg is None or not arg.isdigit():
        return None
    return int(arg)


def vary_names(values: list[bytes]) -> tuple[bytes, ...] | None:
    """The lower-case header names of `Vary` lines, sorted; None for `Vary: *`."""
    names: set[bytes] = set()
    for value in values:
        for part in value.split(b","):
            name = part.strip().lower()
            if name == b"*":
                return None
            if name:
                names.add(name)
    return tuple(sorted(names))


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a response may be stored, for how long, and why not."""

    store: bool
    fresh_for: float = 0.0  # seconds
    vary: tuple[bytes, ...] = ()
    reason: str = ""


def _expires_in(expires: bytes, date: bytes | None, now: float) -> float:
    """Seconds from the response's Date (else `now`) to its Expires; an invalid Expires
    (`0`, garbage) means already expired (RFC 9111 5.3)."""
    try:
        until = parsedate_to_datetime(expires.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0.0
    start = now
    if date is not None:
        try:
            start = parsedate_to_datetime(date.decode("latin-1")).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            pass
    return until - start


def verdict(status: int, headers: list[tuple[bytes, bytes]], ttl: float, statuses: frozenset[int],
            request_authorized_by_header: bool, now: float = 0.0) -> Verdict:
    """Whether the response (`status`, raw `headers`) to a GET may be stored."""
    if status not in statuses:
        return Verdict(False, reason=f"status {status} is not cached on this route")
    cache_control: list[bytes] = []
    vary: list[bytes] = []
    expires = date = None
    for name, value in headers:
        lname = name.lower()
        if lname == b"cache-control":
            cache_control.append(value)
        elif lname == b"vary":
            vary.append(value)
        elif lname == b"expires":
            expires = value
        elif lname == b"date":
            date = value
        elif lname == b"set-cookie":
            return Verdict(False, reason="the response sets a cookie")
    cc = parse_cache_control(cache_control)
    for refused in (b"no-store", b"no-cache", b"private"):
        if refused in cc:
            return Verdict(False, reason=f"Cache-Control: {refused.decode()}")
    fresh = ttl
    limit = seconds(cc.get(b"s-maxage")) if b"s-maxage" in cc else seconds(cc.get(b"max-age"))
    if limit is not None:
        fresh = min(fresh, float(limit))
    elif expires is not None:  # RFC 9111 4.2.1: Expires - Date, when no max-age says otherwise
        fresh = min(fresh, _expires_in(expires, date, now))
    if fresh <= 0:
        return Verdict(False, reason="no freshness left (max-age=0)")
    if request_authorized_by_header and not (b"public" in cc or b"s-maxage" in cc or b"must-revalidate" in cc):
        return Verdict(False, reason="the request carried Authorization and the response is not public")
    names = vary_names(vary)
    if names is None:
        return Verdict(False, reason="Vary: *")
    return Verdict(True, fresh, names)


def request_directives(headers: list[tuple[bytes, bytes]]) -> tuple[bool, bool]:
    """(refresh, no_store) asked by a client: `Cache-Control: max-age=0` or `no-cache`
    (or `Pragma: no-cache` without Cache-Control) asks for a refresh; `no-store` asks
    that nothing of this exchange be stored."""
    values = [v for k, v in headers if k == b"cache-control"]
    if not values:
        pragma = [v for k, v in headers if k == b"pragma"]
        return any(b"no-cache" in v.lower() for v in pragma), False
    cc = parse_cache_control(values)
    refresh = b"no-cache" in cc or (b"max-age" in cc and seconds(cc[b"max-age"]) == 0)
    return refresh, b"no-store" in cc
