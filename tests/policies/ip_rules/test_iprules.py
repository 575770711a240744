"""IP allow/deny rules (IPv4, IPv6, mapped, CIDR edges, deny wins, combination) and the
trusted-proxy walk of X-Forwarded-For."""

from __future__ import annotations

import ipaddress
import random

import pytest

from edgeplane.policies.ip_rules.rules import IpRules, TrustedProxies, parse_entry

# -- IpRules: semantics ------------------------------------------------------------------


def test_no_rules_allows_everything_and_is_falsy() -> None:
    rules = IpRules()
    assert not rules
    assert rules.check("192.0.2.1")
    assert rules.check("2001:db8::1")
    assert rules.check("-")  # nothing configured: nothing to fail closed on


def test_empty_allow_list_means_no_allow_list() -> None:
    rules = IpRules(allow=[], deny=["192.0.2.0/24"])
    assert rules
    assert rules.check("198.51.100.1")
    assert not rules.check("192.0.2.9")


def test_allow_list_restricts() -> None:
    rules = IpRules(allow=["10.0.0.0/8", "192.0.2.7"])
    assert rules.check("10.0.0.0")
    assert rules.check("10.255.255.255")
    assert rules.check("192.0.2.7")
    assert not rules.check("192.0.2.8")
    assert not rules.check("11.0.0.0")
    assert not rules.check("9.255.255.255")
    assert not rules.check("2001:db8::1")  # an IPv4 allow list says nothing for IPv6


def test_deny_wins_over_allow() -> None:
    rules = IpRules(allow=["10.0.0.0/8"], deny=["10.1.0.0/16", "10.2.3.4"])
    assert rules.check("10.0.0.1")
    assert not rules.check("10.1.0.0")
    assert not rules.check("10.1.255.255")
    assert rules.check("10.2.0.0")
    assert rules.check("10.0.255.255")
    assert not rules.check("10.2.3.4")
    assert rules.check("10.2.3.5")
    both = IpRules(allow=["192.0.2.1"], deny=["192.0.2.1"])
    assert not both.check("192.0.2.1")


@pytest.mark.parametrize(("cidr", "inside", "outside"), [
    ("192.0.2.0/24", ["192.0.2.0", "192.0.2.255"], ["192.0.1.255", "192.0.3.0"]),
    ("192.0.2.128/25", ["192.0.2.128", "192.0.2.255"], ["192.0.2.127", "192.0.3.0"]),
    ("192.0.2.5/32", ["192.0.2.5"], ["192.0.2.4", "192.0.2.6"]),
    ("0.0.0.0/0", ["0.0.0.0", "255.255.255.255"], ["::1", "2001:db8::"]),
    ("2001:db8::/32", ["2001:db8::", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"],
     ["2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db9::", "192.0.2.1"]),
    ("2001:db8::1/128", ["2001:db8::1", "2001:DB8:0:0:0:0:0:1"], ["2001:db8::2", "2001:db8::"]),
    ("::/0", ["::", "::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"],
     ["0.0.0.0", "::ffff:192.0.2.1"]),
])
def test_cidr_edges(cidr: str, inside: list[str], outside: list[str]) -> None:
    rules = IpRules(allow=[cidr])
    for ip in inside:
        assert rules.check(ip), ip
    for ip in outside:
        assert not rules.check(ip), ip


def test_ipv4_mapped_ipv6_is_ipv4() -> None:
    rules = IpRules(allow=["192.0.2.0/24"], deny=["192.0.2.66"])
    assert rules.check("::ffff:192.0.2.1")
    assert rules.check("::FFFF:c000:0201")
    assert not rules.check("::ffff:192.0.2.66")
    assert not rules.check("::ffff:198.51.100.1")
    # A mapped network in the config is the IPv4 network.
    mapped = IpRules(deny=["::ffff:192.0.2.0/120"])
    assert not mapped.check("192.0.2.200")
    assert not mapped.check("::ffff:192.0.2.200")
    assert mapped.check("192.0.3.0")
    # The deprecated IPv4-compatible form is plain IPv6, not IPv4.
    assert IpRules(deny=["192.0.2.1"]).check("::192.0.2.1")


def test_ipv6_forms_and_scope() -> None:
    rules = IpRules(allow=["fe80::/10", "::1"])
    assert rules.check("::1")
    assert rules.check("0:0:0:0:0:0:0:1")
    assert rules.check("fe80::1%eth0")
    assert not rules.check("127.0.0.1")


@pytest.mark.parametrize("bad_ip", ["-", "", "localhost", "1.2.3", "01.2.3.4", "1.2.3.4 ",
                                    "::g", "/tmp/sock", "1.2.3.4/32"])
def test_unparseable_address_fails_closed(bad_ip: str) -> None:
    assert not IpRules(deny=["192.0.2.0/24"]).check(bad_ip)
    assert not IpRules(allow=["0.0.0.0/0", "::/0"]).check(bad_ip)


@pytest.mark.parametrize(("entry", "message"), [
    ("10.0.0.1/8", "host bits set (did you mean '10.0.0.0/8'?)"),
    ("2001:db8::1/32", "did you mean '2001:db8::/32'?"),
    ("10.0.0.0/33", "not an IPv4/IPv6 address or CIDR"),
    ("300.1.1.1", "not an IPv4/IPv6 address or CIDR"),
    ("example.com", "not an IPv4/IPv6 address or CIDR"),
    ("10.0.0.0/", "not an IPv4/IPv6 address or CIDR"),
    ("", "empty"),
    ("   ", "empty"),
    (42, "not an IP address or CIDR string"),
    (None, "not an IP address or CIDR string"),
])
def test_invalid_entries(entry: object, message: str) -> None:
    with pytest.raises(ValueError, match="deny\\[1\\]") as info:
        IpRules(deny=["192.0.2.1", entry])  # type: ignore[list-item]
    assert message in str(info.value)
    with pytest.raises(ValueError, match="allow\\[0\\]"):
        IpRules(allow=[entry])  # type: ignore[list-item]


def test_single_string_instead_of_list_is_refused() -> None:
    with pytest.raises(ValueError, match="single string"):
        IpRules(allow="10.0.0.0/8")  # type: ignore[arg-type]


def test_entries_are_stripped_and_overlaps_merge() -> None:
    rules = IpRules(allow=[" 10.0.0.0/9 ", "10.128.0.0/9", "10.0.0.0/8", "11.0.0.0/8"])
    assert rules.check("10.127.255.255")
    assert rules.check("10.128.0.0")
    assert rules.check("11.255.255.255")
    assert not rules.check("12.0.0.0")
    assert parse_entry("192.0.2.0/31") == (0xC0000200, 0xC0000201)


def test_decision_cache_is_bounded_and_consistent() -> None:
    rules = IpRules(allow=["10.0.0.0/8"])
    for i in range(10000):
        ip = f"10.{i >> 8 & 255}.{i & 255}.1"
        assert rules.check(ip)
        assert not rules.check(f"11.{i >> 8 & 255}.{i & 255}.1")
    assert len(rules._cache) <= 4096
    assert rules.check("10.0.0.1") and rules.check("10.0.0.1")


# -- combination -------------------------------------------------------------------------


def test_combined_rules_must_pass_both() -> None:
    server = IpRules(allow=["10.0.0.0/8"], deny=["10.9.0.0/16"])
    route = IpRules(allow=["10.1.0.0/16", "10.9.0.0/16", "192.0.2.0/24"], deny=["10.1.2.3"])
    both = server & route
    assert both.check("10.1.0.1")
    assert not both.check("10.1.2.3")   # route deny
    assert not both.check("10.9.0.1")   # server deny, though route allows
    assert not both.check("10.2.0.1")   # server allows, route does not
    assert not both.check("192.0.2.1")  # route allows, server does not


def test_combining_with_empty_rules() -> None:
    empty = IpRules()
    deny_only = IpRules(deny=["192.0.2.0/24"])
    allow_only = IpRules(allow=["192.0.2.0/24"])
    assert not (empty & empty)
    assert (empty & deny_only).check("198.51.100.1")
    assert not (deny_only & empty).check("192.0.2.1")
    assert not (allow_only & empty).check("198.51.100.1")
    assert not (allow_only & deny_only).check("192.0.2.1")
    # Two disjoint allow lists leave nobody.
    nobody = IpRules(allow=["10.0.0.0/8"]) & IpRules(allow=["11.0.0.0/8"])
    assert nobody
    assert not nobody.check("10.0.0.1") and not nobody.check("11.0.0.1")


def _random_net(rng: random.Random) -> str:
    if rng.random() < 0.6:
        prefix = rng.randint(20, 32)
        addr = ipaddress.IPv4Address(rng.choice([0x0A000000, 0xC0000200]) | rng.getrandbits(12))
        return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))
    prefix = rng.randint(112, 128)
    addr = ipaddress.IPv6Address(0x20010DB8 << 96 | rng.getrandbits(20))
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def _oracle(allow: list[str], deny: list[str], ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    nets = lambda xs: [ipaddress.ip_network(x) for x in xs]  # noqa: E731
    if any(addr in n for n in nets(deny) if n.version == addr.version):
        return False
    return not allow or any(addr in n for n in nets(allow) if n.version == addr.version)


def test_randomised_against_ipaddress_oracle() -> None:
    rng = random.Random(4)
    for _ in range(60):
        a_allow = [_random_net(rng) for _ in range(rng.randint(0, 4))]
        a_deny = [_random_net(rng) for _ in range(rng.randint(0, 4))]
        b_allow = [_random_net(rng) for _ in range(rng.randint(0, 4))]
        b_deny = [_random_net(rng) for _ in range(rng.randint(0, 4))]
        a, b = IpRules(a_allow, a_deny), IpRules(b_allow, b_deny)
        ab = a & b
        for _ in range(80):
            if rng.random() < 0.6:
                ip = str(ipaddress.IPv4Address(rng.choice([0x0A000000, 0xC0000200])
                                               | rng.getrandbits(12)))
                if rng.random() < 0.2:
                    ip = "::ffff:" + ip
            else:
                ip = str(ipaddress.IPv6Address(0x20010DB8 << 96 | rng.getrandbits(20)))
            want_a = _oracle(a_allow, a_deny, ip)
            want_b = _oracle(b_allow, b_deny, ip)
            assert a.check(ip) == want_a, (a_allow, a_deny, ip)
            assert ab.check(ip) == (want_a and want_b), (a_allow, a_deny, b_allow, b_deny, ip)


# -- TrustedProxies / X-Forwarded-For --------------------------------------------------


PROXIES = TrustedProxies(["10.0.0.0/8", "2001:db8:ffff::/48"])


def test_xff_ignored_from_untrusted_peer() -> None:
    assert PROXIES.client_ip("203.0.113.9", [b"198.51.100.1"]) == "203.0.113.9"
    assert PROXIES.client_ip("203.0.113.9", [b"10.0.0.1, 1.1.1.1"]) == "203.0.113.9"


def test_no_trusted_proxies_never_believes_xff() -> None:
    none = TrustedProxies()
    assert not none
    assert none.client_ip("10.0.0.1", [b"198.51.100.1"]) == "10.0.0.1"


def test_no_xff_returns_peer() -> None:
    assert PROXIES.client_ip("10.0.0.1", []) == "10.0.0.1"


def test_single_trusted_hop() -> None:
    assert PROXIES.client_ip("10.0.0.1", [b"198.51.100.1"]) == "198.51.100.1"


def test_walk_skips_trusted_hops_and_ignores_spoofed_left_part() -> None:
    # The client sent "1.1.1.1" itself; 198.51.100.7 is who reached the first proxy.
    xff = [b"1.1.1.1, 198.51.100.7, 10.0.0.5, 10.0.0.6"]
    assert PROXIES.client_ip("10.0.0.1", xff) == "198.51.100.7"
    assert PROXIES.client_ip("10.0.0.1", [b"1.1.1.1,198.51.100.7,10.0.0.5"]) == "198.51.100.7"


def test_all_trusted_returns_leftmost() -> None:
    assert PROXIES.client_ip("10.0.0.1", [b"10.0.0.3, 10.0.0.2"]) == "10.0.0.3"


def test_multiple_header_lines_concatenate_in_order() -> None:
    lines = [b"1.1.1.1, 198.51.100.7", b"10.0.0.5", b"10.0.0.6"]
    assert PROXIES.client_ip("10.0.0.1", lines) == "198.51.100.7"
    lines = [b"198.51.100.7", b"203.0.113.1, 10.0.0.5"]
    assert PROXIES.client_ip("10.0.0.1", lines) == "203.0.113.1"


@pytest.mark.parametrize(("xff", "want"), [
    ([b"198.51.100.1, garbage, 10.0.0.5"], "10.0.0.5"),
    ([b"198.51.100.1, unknown"], "10.0.0.1"),
    ([b"198.51.100.1, , 10.0.0.5"], "10.0.0.5"),
    ([b"198.51.100.1,"], "10.0.0.1"),
    ([b""], "10.0.0.1"),
    ([b"198.51.100.1:4711"], "10.0.0.1"),
    ([b"[2001:db8::1]"], "10.0.0.1"),
    ([b"198.51.100.1, 10.0.0.5:80"], "10.0.0.1"),
    ([b"\xff\xfe, 10.0.0.5"], "10.0.0.5"),
    ([b"1.2.3.4 5.6.7.8"], "10.0.0.1"),
    ([b"198.51.100.1/32"], "10.0.0.1"),
])
def test_malformed_entries_stop_the_walk(xff: list[bytes], want: str) -> None:
    assert PROXIES.client_ip("10.0.0.1", xff) == want


def test_whitespace_and_tabs_around_entries() -> None:
    assert PROXIES.client_ip("10.0.0.1", [b" \t198.51.100.1 \t, 10.0.0.5 "]) == "198.51.100.1"


def test_ipv6_and_mapped_addresses_in_the_chain() -> None:
    assert PROXIES.client_ip("2001:db8:ffff::1", [b"2001:DB8::0:1"]) == "2001:db8::1"
    # A dual-stack listener reports an IPv4 proxy as mapped; the mapped peer is trusted.
    assert PROXIES.client_ip("::ffff:10.0.0.1", [b"198.51.100.1"]) == "198.51.100.1"
    # Mapped entries in XFF come back as IPv4, and mapped trusted hops are skipped.
    assert PROXIES.client_ip("10.0.0.1", [b"::ffff:198.51.100.1, ::ffff:10.0.0.9"]) \
        == "198.51.100.1"
    assert PROXIES.client_ip("10.0.0.1", [b"2001:db8::5, 2001:db8:ffff::2"]) == "2001:db8::5"


def test_untrusted_peer_string_forms() -> None:
    assert PROXIES.client_ip("-", [b"198.51.100.1"]) == "-"
    assert not PROXIES.is_trusted("-")
    assert PROXIES.is_trusted("10.1.2.3")
    assert not PROXIES.is_trusted("11.1.2.3")


def test_trusted_proxies_validation() -> None:
    with pytest.raises(ValueError, match=r"trusted_proxies\[1\].*host bits"):
        TrustedProxies(["10.0.0.0/8", "192.168.1.1/24"])
    with pytest.raises(ValueError, match="single string"):
        TrustedProxies("10.0.0.0/8")  # type: ignore[arg-type]


def test_client_ip_feeds_ip_rules() -> None:
    rules = IpRules(deny=["198.51.100.0/24"])
    assert not rules.check(PROXIES.client_ip("10.0.0.1", [b"198.51.100.1"]))
    # A spoofed XFF from an untrusted peer cannot launder a denied peer address.
    assert not rules.check(PROXIES.client_ip("198.51.100.2", [b"203.0.113.1"]))


def test_huge_chain_of_trusted_hops() -> None:
    xff = b", ".join([b"198.51.100.1"] + [b"10.0.0.2"] * 2000)
    assert PROXIES.client_ip("10.0.0.1", [xff]) == "198.51.100.1"
