"""Route key syntax, trie matching precedence, parameter capture and static checks."""

from __future__ import annotations

import re

import pytest

from edgeplane.config.model import Integration, RouteConfig
from edgeplane.routing.router import (
    ParsedKey,
    RouteKeyError,
    Router,
    Segment,
    check_routes,
    compile_routes,
    format_table,
    parse_route_key,
)

MOCK = Integration(type="mock")


def rc(key: str, index: int = 0, host: str | None = None, integration: Integration = MOCK) -> RouteConfig:
    parsed = parse_route_key(key)
    return RouteConfig(key=key, method=parsed.method, path=parsed.path, host=host,
                       integration=integration, index=index)


def build(*specs: str | tuple[str, str]) -> Router[str]:
    """Routes from keys (or (key, host) pairs); the payload is "key@host"."""
    routes = []
    for i, spec in enumerate(specs):
        key, host = (spec, None) if isinstance(spec, str) else spec
        routes.append(rc(key, i, host))
    return compile_routes([(r, f"{r.key}@{r.host}" if r.host else r.key) for r in routes])


def hit(router: Router[str], method: str, path: str, host: str | None = None):
    found = router.match(method.encode(), path.encode(), host.encode() if host else None)
    return None if found is None else found[0]


# -- parse_route_key ---------------------------------------------------------


def test_parse_simple_key():
    p = parse_route_key("GET /users/{id}")
    assert p == ParsedKey("GET /users/{id}", "GET",
                          (Segment("literal", "users"), Segment("param", "id")), False)
    assert p.path == "/users/{id}"
    assert p.param_names == ("id",)
    assert not p.is_default and not p.is_any


def test_parse_any_greedy_root_and_default():
    p = parse_route_key("ANY /files/{proxy+}")
    assert p.method is None and p.is_any and p.greedy
    assert p.segments == (Segment("literal", "files"), Segment("greedy", "proxy"))
    assert p.param_names == ("proxy",)
    root = parse_route_key("GET /")
    assert root.segments == () and root.path == "/"
    d = parse_route_key("$default")
    assert d.is_default and d.segments is None and d.method is None and d.path is None


def test_parse_accepts_any_token_method():
    assert parse_route_key("PURGE /cache").method == "PURGE"
    assert parse_route_key("M-SEARCH /x").method == "M-SEARCH"


def test_shape_ignores_param_names():
    assert parse_route_key("GET /users/{id}").shape == parse_route_key("GET /users/{uid}").shape
    assert parse_route_key("GET /users/{id}").shape != parse_route_key("GET /users/{id+}").shape


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("GET /a/{p+}/b", "must be the last segment"),
        ("GET /a{b}", "whole path segment"),
        ("GET /a/{b}c", "whole path segment"),
        ("GET /{id}/{id}", "duplicate parameter {id}"),
        ("GET /a//b", "empty path segment"),
        ("GET /a/", "trailing '/'"),
        ("GET /a?b=1", "'?' is not allowed"),
        ("GET /a#frag", "'#' is not allowed"),
        ("GET /a b", "no spaces in the path"),
        ("GET  /a", "exactly one space"),
        ("get /a", "must be upper-case"),
        ("GET a", "must start with '/'"),
        ("GET", "expected 'METHOD /path'"),
        ("/users", "expected 'METHOD /path'"),
        ("", "expected 'METHOD /path'"),
        ("G(T /a", "invalid method"),
        ("GET /{}", "invalid parameter name"),
        ("GET /{1a}", "invalid parameter name"),
        ("GET /café", "percent-encoded"),
        ("$connect", "unknown special route key"),
    ],
)
def test_parse_rejects(key, fragment):
    with pytest.raises(RouteKeyError) as exc:
        parse_route_key(key)
    assert fragment in str(exc.value)


# -- matching: precedence ----------------------------------------------------


def test_literal_beats_param_beats_greedy():
    r = build("GET /a/{x}", "GET /a/b", "GET /a/{p+}")
    assert hit(r, "GET", "/a/b") == "GET /a/b"
    assert hit(r, "GET", "/a/c") == "GET /a/{x}"
    assert hit(r, "GET", "/a/c/d") == "GET /a/{p+}"


def test_order_in_config_does_not_matter():
    r1 = build("GET /a/{p+}", "GET /a/{x}", "GET /a/b")
    r2 = build("GET /a/b", "GET /a/{x}", "GET /a/{p+}")
    for path in ("/a/b", "/a/z", "/a/z/y"):
        assert hit(r1, "GET", path) == hit(r2, "GET", path)


def test_backtracking_to_param_branch():
    r = build("GET /a/b/c", "GET /a/{x}/d")
    assert hit(r, "GET", "/a/b/c") == "GET /a/b/c"
    assert r.match(b"GET", b"/a/b/d", None) == ("GET /a/{x}/d", {"x": b"b"})


def test_backtracking_to_greedy_higher_up():
    r = build("GET /a/b/c", "GET /{p+}")
    assert r.match(b"GET", b"/a/b/x", None) == ("GET /{p+}", {"p": b"a/b/x"})


def test_method_miss_backtracks_to_less_specific_route():
    r = build("POST /users/me", "GET /users/{id}")
    assert r.match(b"GET", b"/users/me", None) == ("GET /users/{id}", {"id": b"me"})
    assert hit(r, "POST", "/users/me") == "POST /users/me"
    assert hit(r, "DELETE", "/users/me") is None


def test_exact_method_beats_any():
    r = build("ANY /items", "GET /items")
    assert hit(r, "GET", "/items") == "GET /items"
    assert hit(r, "POST", "/items") == "ANY /items"
    assert hit(r, "BREW", "/items") == "ANY /items"


def test_methods_are_case_sensitive_and_head_is_not_get():
    r = build("GET /x")
    assert hit(r, "get", "/x") is None
    assert hit(r, "HEAD", "/x") is None


def test_default_is_last_resort():
    r = build("$default", "GET /a/{p+}")
    assert hit(r, "GET", "/a/b") == "GET /a/{p+}"
    assert hit(r, "POST", "/a/b") == "$default"
    assert hit(r, "GET", "/zzz") == "$default"
    assert r.match(b"GET", b"/zzz", None) == ("$default", {})


def test_default_takes_non_path_targets():
    r = build("GET /{p+}", "$default")
    assert hit(r, "OPTIONS", "*") == "$default"
    assert hit(build("ANY /{p+}"), "OPTIONS", "*") is None


def test_no_match_returns_none():
    r = build("GET /a", "GET /b/{x}")
    assert hit(r, "GET", "/c") is None
    assert hit(r, "GET", "/b") is None
    assert hit(r, "GET", "/b/x/y") is None
    assert hit(compile_routes([]), "GET", "/") is None


def test_root_route():
    r = build("GET /", "GET /{x}")
    assert hit(r, "GET", "/") == "GET /"
    assert hit(r, "GET", "/a") == "GET /{x}"


def test_empty_segments_and_trailing_slash_do_not_match_params():
    r = build("GET /users/{id}", "GET /users")
    assert hit(r, "GET", "/users/") is None
    assert hit(r, "GET", "/users//") is None
    assert hit(r, "GET", "//users") is None


# -- matching: captures ------------------------------------------------------


def test_param_capture_is_raw_bytes():
    r = build("GET /users/{id}/orders/{oid}")
    assert r.match(b"GET", b"/users/a%20b/orders/7", None) == (
        "GET /users/{id}/orders/{oid}", {"id": b"a%20b", "oid": b"7"})


def test_param_names_are_per_route_on_shared_nodes():
    r = build("GET /users/{id}", "DELETE /users/{uid}", "GET /users/{user}/posts")
    assert r.match(b"GET", b"/users/1", None)[1] == {"id": b"1"}
    assert r.match(b"DELETE", b"/users/1", None)[1] == {"uid": b"1"}
    assert r.match(b"GET", b"/users/1/posts", None)[1] == {"user": b"1"}


def test_greedy_capture():
    r = build("ANY /files/{proxy+}")
    assert r.match(b"GET", b"/files/a/b/c", None) == ("ANY /files/{proxy+}", {"proxy": b"a/b/c"})
    assert r.match(b"GET", b"/files/a", None)[1] == {"proxy": b"a"}
    assert r.match(b"GET", b"/files/a/", None)[1] == {"proxy": b"a/"}


def test_greedy_takes_its_bare_prefix_with_the_trailing_slash():
    r = build("ANY /files/{proxy+}")
    assert hit(r, "GET", "/files") is None
    # "/files/" has no route key of its own: it belongs to the greedy route (empty capture)
    assert r.match(b"GET", b"/files/", None) == ("ANY /files/{proxy+}", {"proxy": b""})
    assert hit(r, "GET", "/files//") is None  # (merged to "/files/" by normalisation first)


def test_greedy_combined_with_params():
    r = build("GET /t/{tenant}/{rest+}")
    assert r.match(b"GET", b"/t/acme/x/y", None)[1] == {"tenant": b"acme", "rest": b"x/y"}


def test_match_returns_fresh_params_dict():
    r = build("GET /a")
    first = r.match(b"GET", b"/a", None)[1]
    first["x"] = b"1"
    assert r.match(b"GET", b"/a", None)[1] == {}


# -- matching: hosts ---------------------------------------------------------


def test_host_exact_beats_wildcard_beats_hostless():
    r = build(("GET /x", "api.example.com"), ("GET /x", "*.example.com"), "GET /x")
    assert hit(r, "GET", "/x", "api.example.com") == "GET /x@api.example.com"
    assert hit(r, "GET", "/x", "www.example.com") == "GET /x@*.example.com"
    assert hit(r, "GET", "/x", "a.b.example.com") == "GET /x@*.example.com"
    assert hit(r, "GET", "/x", "example.com") == "GET /x"  # wildcard excludes the apex
    assert hit(r, "GET", "/x", "other.org") == "GET /x"
    assert hit(r, "GET", "/x", None) == "GET /x"


def test_host_port_and_trailing_dot_are_ignored():
    r = build(("GET /x", "api.example.com"), "GET /x")
    assert hit(r, "GET", "/x", "api.example.com:8080") == "GET /x@api.example.com"
    assert hit(r, "GET", "/x", "api.example.com.") == "GET /x@api.example.com"


def test_host_config_is_case_insensitive():
    r = build(("GET /x", "API.Example.com"))
    assert hit(r, "GET", "/x", "api.example.com") == "GET /x@API.Example.com"


def test_longest_wildcard_first():
    r = build(("GET /x", "*.example.com"), ("GET /x", "*.eu.example.com"))
    assert hit(r, "GET", "/x", "a.eu.example.com") == "GET /x@*.eu.example.com"
    assert hit(r, "GET", "/x", "eu.example.com") == "GET /x@*.example.com"


def test_host_trie_falls_through_to_hostless_routes():
    r = build(("GET /special", "api.example.com"), "GET /{p+}")
    assert hit(r, "GET", "/special", "api.example.com") == "GET /special@api.example.com"
    assert hit(r, "GET", "/other", "api.example.com") == "GET /{p+}"
    assert hit(r, "GET", "/special", "www.example.com") == "GET /{p+}"


def test_host_default_before_hostless_routes_global_default_last():
    r = build(("GET /a", "api.example.com"), ("$default", "api.example.com"), "GET /b", "$default")
    assert hit(r, "GET", "/a", "api.example.com") == "GET /a@api.example.com"
    assert hit(r, "GET", "/b", "api.example.com") == "$default@api.example.com"
    assert hit(r, "GET", "/b", "x.org") == "GET /b"
    assert hit(r, "GET", "/zz", "x.org") == "$default"


def test_hostless_router_ignores_host():
    r = build("GET /x")
    assert hit(r, "GET", "/x", "anything.example:81") == "GET /x"


# -- table / format ------------------------------------------------------------


def test_table_is_in_priority_order():
    r = build("$default", "GET /a/{p+}", "ANY /a/b", "GET /a/b", "GET /a/{x}",
              ("GET /a/b", "*.example.com"), ("GET /a/b", "api.example.com"))
    keys = [(t.host, t.key) for t in r.table()]
    assert keys == [
        ("api.example.com", "GET /a/b"),
        ("*.example.com", "GET /a/b"),
        (None, "GET /a/b"),
        (None, "ANY /a/b"),
        (None, "GET /a/{x}"),
        (None, "GET /a/{p+}"),
        (None, "$default"),
    ]
    assert len(r) == 7


def test_format_table():
    routes = [rc("$default", 0, integration=Integration(type="http", upstream="demo")),
              rc("GET /ping", 1, integration=Integration(type="mock", body=b'{"ok":true}')),
              rc("ANY /files/{proxy+}", 2, host="api.example.com",
                 integration=Integration(type="http", upstream="files", path="/v2/{proxy}"))]
    text = format_table(routes)
    lines = text.splitlines()
    assert lines[0].split() == ["#", "HOST", "METHOD", "PATH", "INTEGRATION", "POLICIES", "ROUTE"]
    assert lines[1].split() == ["1", "api.example.com", "ANY", "/files/{proxy+}", "http", "-", "routes[2]"]
    assert lines[2].split() == ["2", "(any)", "GET", "/ping", "mock", "-", "routes[1]"]
    assert lines[3].split() == ["3", "(any)", "*", "$default", "http", "-", "routes[0]"]
    assert format_table(compile_routes([(r, None) for r in routes])) == text
    described = format_table(routes, lambda r: (f"to {r.integration.upstream}", "p1, p2")).splitlines()
    assert "to files" in described[1] and "p1, p2" in described[1]
    assert "no routes" in format_table([])


# -- check_routes --------------------------------------------------------------


def test_duplicate_same_shape_names_earlier_route():
    routes = [rc("GET /a", 0), rc("GET /users/{id}", 1), rc("POST /users/{id}", 2),
              rc("GET /users/{uid}", 3)]
    assert check_routes(routes) == [
        "routes[3]: duplicate of routes[1] ('GET /users/{id}'): same host, method and path shape"
    ]


def test_duplicate_default_per_host():
    routes = [rc("$default", 0), rc("$default", 1, host="a.com"), rc("$default", 2),
              rc("$default", 3, host="A.com")]
    errors = check_routes(routes)
    assert errors == [
        "routes[2]: duplicate of routes[0] ('$default'): same host, method and path shape",
        "routes[3]: duplicate of routes[1] ('$default'): same host, method and path shape",
    ]


def test_not_duplicates():
    routes = [rc("GET /users/{id}", 0), rc("ANY /users/{id}", 1), rc("GET /users/{id+}", 2),
              rc("GET /users/{id}", 3, host="api.example.com"),
              rc("GET /users/{id}", 4, host="*.example.com"), rc("GET /users/me", 5),
              rc("HEAD /users/{id}", 6)]
    assert check_routes(routes) == []


def test_unreachable_connect_route():
    errors = check_routes([rc("CONNECT /tunnel", 0)])
    assert len(errors) == 1 and errors[0].startswith("routes[0]: unreachable route 'CONNECT /tunnel'")


def test_compile_rejects_duplicates():
    with pytest.raises(ValueError, match="duplicate"):
        compile_routes([(rc("GET /a/{x}", 0), 1), (rc("GET /a/{y}", 1), 2)])


@pytest.mark.parametrize("key,why", [
    ("GET /caf%c3%a9", "write 'caf%C3%A9'"),
    ("GET /%61dmin", "write 'admin'"),
    ("GET /a/../b", "dot segment"),
    ("GET /a/%2E", "dot segment"),
    ("GET /a%00", "refused (encoded control character"),
    ("GET /x;y", "write 'x%3By'"),
])
def test_literals_must_be_written_as_requests_are_matched(key, why):
    # requests are normalised before matching: a literal in another spelling never matches
    with pytest.raises(RouteKeyError, match=re.escape(why)):
        parse_route_key(key)
    assert parse_route_key("GET /caf%C3%A9/.well-known").key == "GET /caf%C3%A9/.well-known"
