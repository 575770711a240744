"""IP allow/deny rules and the trusted-proxy view of X-Forwarded-For (sans-IO).

This module owns two policies. Both are built once from configuration strings (with
`ipaddress`, which also validates them) and are then immutable apart from a bounded
per-IP decision cache; neither touches sockets, asyncio or the clock.

1. **`IpRules(allow, deny)`** -- the IP filter of a server or a route.

   - Entries are IPv4/IPv6 addresses or CIDR networks (``10.0.0.0/8``, ``2001:db8::/32``,
     ``192.0.2.7``). A network with host bits set (``10.0.0.1/8``) is refused rather than
     silently widened. Anything invalid raises `ValueError` naming the entry, so the
     config loader can report it by location.
   - ``check(ip)``: **deny wins**; then, if the allow list is non-empty, the address must
     be in it. An empty allow list means "no allow list" (everyone not denied); to deny
     everyone, deny ``0.0.0.0/0`` and ``::/0``.
   - IPv4-mapped IPv6 addresses (``::ffff:192.0.2.7``, as a dual-stack socket reports IPv4
     peers) are IPv4 for every purpose: they match IPv4 entries, and an entry written as
     ``::ffff:192.0.2.0/120`` is the IPv4 network ``192.0.2.0/24``. Consequently an IPv6
     entry such as ``::/0`` does *not* match IPv4 clients.
   - An address that does not parse (a peer of ``"-"``, a Unix socket) fails closed:
     ``check`` is False whenever any rule is configured. With no rules at all ``check`` is
     always True, and ``bool(rules)`` is False so the caller can skip the stage entirely.
   - **Server-level and route-level rules combine by conjunction**: a request must pass
     both. ``server_rules & route_rules`` builds one equivalent `IpRules` (deny lists
     united, allow lists intersected -- an empty intersection of two non-empty allow
     lists denies everyone), so the compiled chain needs one stage and one lookup.

   Internally every address becomes one integer key (IPv4: its value; IPv6: its value
   plus 2**32, so the families never collide) and every list becomes sorted, merged,
   disjoint ``[lo, hi]`` ranges searched with `bisect`. ``check`` first consults a
   bounded dict of decisions per IP string (cleared whole when full), so the steady
   state costs one dict lookup; a miss costs one `ipaddress` parse and two bisects.

2. **`TrustedProxies(cidrs)`** and ``client_ip(peer_ip, xff_values)`` -- who the client
   really is.

   - X-Forwarded-For is believed only when the TCP peer is a trusted proxy; otherwise the
     peer address is returned unchanged (a client cannot spoof its address by sending
     XFF directly).
   - When believed, the XFF lines are concatenated in order (as ``a, b`` list syntax
     allows) and walked from the right, skipping trusted proxies; the first untrusted
     address is the client (nginx ``real_ip_recursive on``; Envoy's trusted-hops idea,
     expressed as CIDRs). If every entry is trusted, the leftmost is the client.
   - A malformed entry (empty, ``unknown``, with a port, non-ASCII, ...) stops the walk:
     the result is the last good address walked (the nearest trusted hop, or the peer).
     Entries are plain addresses only, as proxies write them.
   - Addresses taken from XFF are returned in canonical `ipaddress` form, IPv4-mapped
     ones as dotted IPv4. The peer address is returned as given.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable

__all__ = ["IpRules", "TrustedProxies", "parse_entry"]

_V6_OFFSET = 1 << 32  # IPv6 keys live above every IPv4 key
_MAPPED_LO = 0xFFFF_0000_0000  # ::ffff:0.0.0.0
_MAPPED_HI = _MAPPED_LO + 0xFFFF_FFFF  # ::ffff:255.255.255.255
_CACHE_MAX = 4096  # decisions remembered per IP string before the cache is reset

Range = tuple[int, int]


def _key(ip: str) -> int | None:
    """The integer key of an address string, or None when it is not an address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    value = int(addr)
    if addr.version == 4:
        return value
    if _MAPPED_LO <= value <= _MAPPED_HI:
        return value - _MAPPED_LO
    return value + _V6_OFFSET


def _canonical(key: int) -> str:
    """The address string of a key (IPv4 dotted form for IPv4 and mapped keys)."""
    if key < _V6_OFFSET:
        return str(ipaddress.IPv4Address(key))
    return str(ipaddress.IPv6Address(key - _V6_OFFSET))


def parse_entry(entry: object) -> Range:
    """One allow/deny/trusted entry -> its inclusive key range; ValueError if invalid."""
    if not isinstance(entry, str):
        raise ValueError(f"{entry!r} is not an IP address or CIDR string")
    text = entry.strip()
    if not text:
        raise ValueError("empty string is not an IP address or CIDR")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not an IPv4/IPv6 address or CIDR") from None
        raise ValueError(f"{entry!r} has host bits set (did you mean '{loose}'?)") from None
    lo, hi = int(net.network_address), int(net.broadcast_address)
    if net.version == 4:
        return lo, hi
    if _MAPPED_LO <= lo and hi <= _MAPPED_HI:  # an IPv4-mapped network is IPv4
        return lo - _MAPPED_LO, hi - _MAPPED_LO
    return lo + _V6_OFFSET, hi + _V6_OFFSET


def _merge(ranges: Iterable[Range]) -> tuple[Range, ...]:
    """Sorted, disjoint, non-adjacent ranges covering exactly the same keys."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1][1] = hi
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _intersect(a: tuple[Range, ...], b: tuple[Range, ...]) -> tuple[Range, ...]:
    out: list[Range] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def _parse_list(entries: Iterable[str], what: str) -> tuple[Range, ...]:
    if isinstance(entries, (str, bytes)):
        raise ValueError(f"{what} must be a list of addresses/CIDRs, not a single string")
    ranges = []
    for i, entry in enumerate(entries):
        try:
            ranges.append(parse_entry(entry))
        except ValueError as exc:
            raise ValueError(f"{what}[{i}]: {exc}") from None
    return _merge(ranges)


class _RangeSet:
    """Sorted disjoint ranges with a bisect membership test."""

    __slots__ = ("ranges", "_starts", "_ends")

    def __init__(self, ranges: tuple[Range, ...]) -> None:
        self.ranges = ranges
        self._starts = [lo for lo, _ in ranges]
        self._ends = [hi for _, hi in ranges]

    def __contains__(self, key: int) -> bool:
        i = bisect_right(self._starts, key) - 1
        return i >= 0 and key <= self._ends[i]

    def __bool__(self) -> bool:
        return bool(self.ranges)


class IpRules:
    """Allow/deny lists; ``check(ip)`` is True when the address may pass. See module doc."""

    __slots__ = ("_allow", "_deny", "_has_allow", "_active", "_cache")

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        allow_r = _parse_list(allow, "allow")
        deny_r = _parse_list(deny, "deny")
        self._init(allow_r, bool(allow_r), deny_r)

    def _init(self, allow: tuple[Range, ...], has_allow: bool, deny: tuple[Range, ...]) -> None:
        self._allow = _RangeSet(allow)
        self._deny = _RangeSet(deny)
        self._has_allow = has_allow
        self._active = has_allow or bool(deny)
        self._cache: dict[str, bool] = {}

    @classmethod
    def _from_ranges(cls, allow: tuple[Range, ...], has_allow: bool,
                     deny: tuple[Range, ...]) -> IpRules:
        self = cls.__new__(cls)
        self._init(allow, has_allow, deny)
        return self

    def __bool__(self) -> bool:
        """False when there are no rules at all (every address passes)."""
        return self._active

    def __and__(self, other: IpRules) -> IpRules:
        """Rules that pass exactly the addresses both ``self`` and ``other`` pass."""
        if not isinstance(other, IpRules):
            return NotImplemented
        deny = _merge(self._deny.ranges + other._deny.ranges)
        if self._has_allow and other._has_allow:
            allow = _intersect(self._allow.ranges, other._allow.ranges)
        elif self._has_allow:
            allow = self._allow.ranges
        else:
            allow = other._allow.ranges
        return IpRules._from_ranges(allow, self._has_allow or other._has_allow, deny)

    def check(self, ip: str) -> bool:
        """True when ``ip`` (a peer or client address string) passes the rules."""
        if not self._active:
            return True
        decision = self._cache.get(ip)
        if decision is None:
            decision = self._decide(ip)
            cache = self._cache
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[ip] = decision
        return decision

    def _decide(self, ip: str) -> bool:
        key = _key(ip)
        if key is None or key in self._deny:
            return False
        return not self._has_allow or key in self._allow

    def __repr__(self) -> str:
        def show(ranges: tuple[Range, ...]) -> str:
            return ", ".join(f"{_canonical(lo)}-{_canonical(hi)}" for lo, hi in ranges)
        allow = show(self._allow.ranges) if self._has_allow else "*"
        return f"IpRules(allow=[{allow}], deny=[{show(self._deny.ranges)}])"


class TrustedProxies:
    """Which peers' X-Forwarded-For is believed, and the client address it yields."""

    __slots__ = ("_ranges", "_cache")

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self._ranges = _RangeSet(_parse_list(cidrs, "trusted_proxies"))
        # IP string -> (key, canonical string) or None for malformed strings.
        self._cache: dict[str, tuple[int, str] | None] = {}

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def _lookup(self, ip: str) -> tuple[int, str] | None:
        cache = self._cache
        try:
            return cache[ip]
        except KeyError:
            pass
        key = _key(ip)
        found = None if key is None else (key, _canonical(key))
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[ip] = found
        return found

    def is_trusted(self, ip: str) -> bool:
        """True when ``ip`` is inside one of the trusted proxy networks."""
        found = self._lookup(ip)
        return found is not None and found[0] in self._ranges

    def client_ip(self, peer_ip: str, xff_values: list[bytes]) -> str:
        """The client address: ``peer_ip`` unless a trusted peer forwarded for someone."""
        if not xff_values or not self._ranges or not self.is_trusted(peer_ip):
            return peer_ip
        raw = xff_values[0] if len(xff_values) == 1 else b",".join(xff_values)
        ranges = self._ranges
        last = peer_ip
        end = len(raw)
        while True:  # walk the comma-separated list from the right, without splitting it all
            start = raw.rfind(b",", 0, end) + 1
            part = raw[start:end].strip(b" \t")
            try:
                text = part.decode("ascii")
            except UnicodeDecodeError:
                return last
            found = self._lookup(text) if text else None
            if found is None:
                return last
            key, canonical = found
            if key not in ranges:
                return canonical
            last = canonical
            if start == 0:
                return last
            end = start - 1

    def __repr__(self) -> str:
        return "TrustedProxies([" + ", ".join(
            f"{_canonical(lo)}-{_canonical(hi)}" for lo, hi in self._ranges.ranges) + "])"
