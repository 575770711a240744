"""Path and host normalisation (`http.paths`), as a sans-IO unit.

The cases come from RFC 3986 (5.2.4 dot-segment removal, 2.3 unreserved characters,
6.2.2 normalisation) and from how common upstream servers resolve what they receive:
they decode percent-escapes once, merge slashes, resolve dot segments, some treat a
backslash as a slash (IIS, Windows paths) and some strip `;params` (Tomcat, Jetty).
"""

from __future__ import annotations

import pytest

from edgeplane.http.paths import (
    STRICT,
    HostRejected,
    PathPolicy,
    PathRejected,
    normalize_host,
    normalize_path,
    split_target,
)

NORMALISED = [
    # (raw path, normalised)
    (b"/", b"/"),
    (b"/users/42", b"/users/42"),
    (b"//admin/x", b"/admin/x"),
    (b"/admin///x//", b"/admin/x/"),
    (b"/./admin/x", b"/admin/x"),
    (b"/admin/./x", b"/admin/x"),
    (b"/foo/../admin/x", b"/admin/x"),
    (b"/a/b/../../admin/x", b"/admin/x"),
    (b"/../admin/x", b"/admin/x"),  # above the root: stays at the root
    (b"/../../../../admin", b"/admin"),
    (b"/admin/x/..", b"/admin/"),
    (b"/admin/x/.", b"/admin/x/"),
    (b"/admin/..", b"/"),
    (b"/%61dmin/x", b"/admin/x"),
    (b"/%41%44%4d%49%4e", b"/ADMIN"),  # case is kept; only the escape goes
    (b"/x/%2e%2e/admin/x", b"/admin/x"),
    (b"/x/%2E%2E/admin/x", b"/admin/x"),
    (b"/x/.%2e/admin/x", b"/admin/x"),
    (b"/x/%2e./admin/x", b"/admin/x"),
    (b"/%2e/admin/x", b"/admin/x"),
    (b"/%7euser/%5f%2d", b"/~user/_-"),
    (b"/a%20b", b"/a%20b"),  # not unreserved: stays encoded
    (b"/a%3fb", b"/a%3Fb"),  # hex upper-cased (RFC 3986 6.2.2.1)
    (b"/%2561dmin", b"/%2561dmin"),  # decoded once only: "%25" is not unreserved
    (b"/.well-known/jwks.json", b"/.well-known/jwks.json"),
    (b"/a/..b/c", b"/a/..b/c"),  # "..b" is a name, not a dot segment
    (b"/caf\xc3\xa9", b"/caf\xc3\xa9"),
]


@pytest.mark.parametrize("raw,expected", NORMALISED)
def test_normalises(raw, expected):
    assert normalize_path(raw) == expected
    assert normalize_path(expected) == expected  # a fixed point


REFUSED = [
    (b"/admin%2Fx", "encoded slash"),
    (b"/admin%2fx", "encoded slash"),
    (b"/x/..%2Fadmin", "encoded slash"),
    (b"/admin%5Cx", "encoded slash"),
    (b"/admin\\x", "backslash"),
    (b"/x\\..\\admin", "backslash"),
    (b"/admin;/x", "path parameter"),
    (b"/admin;jsessionid=1/x", "path parameter"),
    (b"/admin%00/x", "control character"),
    (b"/admin%0d%0a/x", "control character"),
    (b"/admin%09", "control character"),
    (b"/admin%7f", "control character"),
    (b"/admin\x00", "control character"),
    (b"/admin\x7f", "control character"),
    (b"/bad%zz", "malformed percent"),
    (b"/bad%4", "malformed percent"),
    (b"/bad%", "malformed percent"),
]


@pytest.mark.parametrize("raw,why", REFUSED)
def test_refuses(raw, why):
    with pytest.raises(PathRejected, match=why):
        normalize_path(raw)


def test_keep_policies_encode_instead_of_refusing():
    keep = PathPolicy(escaped_slashes="keep", backslashes="keep", path_parameters="keep")
    assert normalize_path(b"/admin%2fx", keep) == b"/admin%2Fx"
    assert normalize_path(b"/a\\b", keep) == b"/a%5Cb"
    assert normalize_path(b"/admin;/x", keep) == b"/admin%3B/x"
    # kept encoded, never a separator: no dot segment can climb through them
    assert normalize_path(b"/x/..%2fadmin", keep) == b"/x/..%2Fadmin"
    with pytest.raises(PathRejected):  # control characters have no opt-out
        normalize_path(b"/a%00", keep)


def test_each_step_can_be_relaxed():
    assert normalize_path(b"//a//b", PathPolicy(merge_slashes=False)) == b"//a//b"
    assert normalize_path(b"/a/../b", PathPolicy(remove_dot_segments=False)) == b"/a/../b"
    assert normalize_path(b"/%61", PathPolicy(decode_unreserved=False)) == b"/%61"
    # dot segments still resolve in their encoded spelling when decoding is off
    assert normalize_path(b"/a/%2e%2e/b", PathPolicy(decode_unreserved=False)) == b"/b"
    assert PathPolicy(merge_slashes=False, decode_unreserved=False).relaxed == (
        "merge_slashes", "decode_unreserved")
    assert STRICT.relaxed == ()


def test_unchanged_paths_are_not_copied():
    path = b"/users/42/orders"
    assert normalize_path(path) is path


@pytest.mark.parametrize("raw,expected", [
    (b"api.example.com", b"api.example.com"),
    (b"API.Example.COM", b"api.example.com"),
    (b"api.example.com:8080", b"api.example.com:8080"),
    (b"api.example.com.", b"api.example.com."),
    (b"127.0.0.1:80", b"127.0.0.1:80"),
    (b"[::1]:8443", b"[::1]:8443"),
    (b"[FE80::1]", b"[fe80::1]"),
    (b"my_host", b"my_host"),
    (b"host:", b"host:"),  # RFC 3986: port = *DIGIT
])
def test_hosts(raw, expected):
    assert normalize_host(raw) == expected


@pytest.mark.parametrize("raw", [
    b"", b"exa%6dple.com", b"a b", b"host:99999", b"host:8o", b"[::1", b"::1", b"user@host",
    b"host/path", b"-host", b".host", b"host\x00", b"*.example.com", b"api.example.com..",
    b"api..example.com",
])
def test_bad_hosts(raw):
    with pytest.raises(HostRejected):
        normalize_host(raw)


def test_targets():
    assert split_target(b"/a//b?x=1", b"GET", b"Api.Example.com") == (b"/a/b", b"x=1", b"api.example.com")
    # absolute-form: the authority replaces Host, which must still be valid
    assert split_target(b"http://API.example.com/v1/../v2?q", b"GET", b"other.test") == (
        b"/v2", b"q", b"api.example.com")
    assert split_target(b"https://api.example.com", b"GET", b"x") == (b"/", b"", b"api.example.com")
    assert split_target(b"http://h.test?q=1", b"GET", b"h.test") == (b"/", b"q=1", b"h.test")
    assert split_target(b"*", b"OPTIONS", b"h.test") == (b"*", b"", b"h.test")
    for target, host in [
        (b"http://api.example.com/x", b""),  # an empty Host is invalid whatever the form
        (b"http://user@api.example.com/x", b"api.example.com"),
        (b"http:///x", b"h.test"),
        (b"/x#frag", b"h.test"),
        (b"*", b"h.test"),
        (b"x/y", b"h.test"),
    ]:
        with pytest.raises(PathRejected):
            split_target(target, b"GET", host)
