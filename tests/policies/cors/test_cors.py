"""CORS policy: origin matching (exact, wildcard sub-domains, scheme wildcards, '*'),
preflight decisions and rendered headers, actual-response headers, Vary, validation."""

from __future__ import annotations

import pytest

from edgeplane.policies.cors.policy import CORS_RESPONSE_HEADERS, CorsPolicy, header, is_preflight


def parse_block(block: bytes) -> dict[bytes, bytes]:
    """Rendered ``name: value\\r\\n`` lines -> dict; asserts the framing is exact."""
    assert block == b"" or block.endswith(b"\r\n")
    out: dict[bytes, bytes] = {}
    for line in block.split(b"\r\n")[:-1]:
        name, sep, value = line.partition(b": ")
        assert sep and name == name.lower() and name not in out, line
        out[name] = value
    return out


def pf(policy: CorsPolicy, origin: bytes | None = b"https://app.example.com",
       method: bytes | None = b"PUT", req_headers: bytes | list[bytes] | None = None,
       ) -> tuple[int, dict[bytes, bytes]]:
    headers = [(b"host", b"api.example.com")]
    if origin is not None:
        headers.append((b"origin", origin))
    if method is not None:
        headers.append((b"access-control-request-method", method))
    if isinstance(req_headers, bytes):
        headers.append((b"access-control-request-headers", req_headers))
    elif req_headers:
        headers += [(b"access-control-request-headers", v) for v in req_headers]
    status, block = policy.preflight(headers)
    if status == 403:
        assert block == b""
    return status, parse_block(block)


EXACT = CorsPolicy(
    allow_origins=["https://app.example.com", "http://localhost:3000"],
    allow_methods=["GET", "PUT", "DELETE"],
    allow_headers=["Authorization", "X-Request-Id", "content-type"],
    expose_headers=["X-Request-Id", "Date"],
    max_age=600,
)

# -- helpers -----------------------------------------------------------------------------


def test_header_helper() -> None:
    hs = [(b"a", b"1"), (b"origin", b"x"), (b"origin", b"y")]
    assert header(hs, b"origin") == b"x"
    assert header(hs, b"b") is None
    assert header([], b"a") is None


@pytest.mark.parametrize(("method", "headers", "want"), [
    (b"OPTIONS", [(b"origin", b"o"), (b"access-control-request-method", b"PUT")], True),
    (b"OPTIONS", [(b"access-control-request-method", b"PUT"), (b"origin", b"o")], True),
    (b"OPTIONS", [(b"origin", b"o")], False),
    (b"OPTIONS", [(b"access-control-request-method", b"PUT")], False),
    (b"OPTIONS", [], False),
    (b"GET", [(b"origin", b"o"), (b"access-control-request-method", b"PUT")], False),
    (b"options", [(b"origin", b"o"), (b"access-control-request-method", b"PUT")], False),
])
def test_is_preflight(method: bytes, headers: list[tuple[bytes, bytes]], want: bool) -> None:
    assert is_preflight(method, headers) is want


# -- preflight: exact origins --------------------------------------------------------------


def test_allowed_preflight_renders_every_header() -> None:
    status, h = pf(EXACT, req_headers=b"authorization, x-request-id")
    assert status == 204
    assert h == {
        b"access-control-allow-origin": b"https://app.example.com",
        b"access-control-allow-methods": b"GET, PUT, DELETE",
        b"access-control-allow-headers": b"Authorization, X-Request-Id, content-type",
        b"access-control-max-age": b"600",
        b"vary": b"origin",
    }


def test_preflight_without_request_headers() -> None:
    status, h = pf(EXACT, origin=b"http://localhost:3000", method=b"DELETE")
    assert status == 204
    assert h[b"access-control-allow-origin"] == b"http://localhost:3000"
    assert b"access-control-allow-credentials" not in h


@pytest.mark.parametrize("origin", [
    b"https://evil.example.com", b"http://app.example.com", b"https://app.example.com:8443",
    b"https://app.example.com.evil.com", b"https://app.example.co", b"null", b"",
    b"https://app.example.com/", b"http://localhost:3001", b"http://localhost",
])
def test_disallowed_origin_is_403_without_cors_headers(origin: bytes) -> None:
    assert pf(EXACT, origin=origin)[0] == 403


def test_origin_case_insensitive_and_echoed_as_sent() -> None:
    status, h = pf(EXACT, origin=b"HTTPS://App.Example.COM")
    assert status == 204
    assert h[b"access-control-allow-origin"] == b"HTTPS://App.Example.COM"


@pytest.mark.parametrize("method", [b"PATCH", b"put", b"OPTIONS", b"P UT", b"", b"PUT\x00"])
def test_disallowed_method_is_403(method: bytes) -> None:
    assert pf(EXACT, method=method)[0] == 403


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"POST"])
def test_safelisted_methods_always_pass(method: bytes) -> None:
    policy = CorsPolicy(allow_origins=["https://app.example.com"], allow_methods=["DELETE"])
    assert pf(policy, method=method)[0] == 204


@pytest.mark.parametrize("req_headers", [
    b"x-other", b"authorization, x-other", [b"authorization", b"x-other"],
    b"authorization, bad header", b"x-request-id, \xff",
])
def test_disallowed_request_header_is_403(req_headers: bytes | list[bytes]) -> None:
    assert pf(EXACT, req_headers=req_headers)[0] == 403


def test_request_headers_case_whitespace_and_multiple_lines() -> None:
    status, _ = pf(EXACT, req_headers=[b"Authorization ,\tX-REQUEST-ID", b" , content-type,"])
    assert status == 204


def test_missing_origin_or_method_in_preflight_is_403() -> None:
    assert pf(EXACT, origin=None)[0] == 403
    assert pf(EXACT, method=None)[0] == 403


def test_first_origin_header_counts() -> None:
    headers = [(b"origin", b"https://evil.com"), (b"origin", b"https://app.example.com"),
               (b"access-control-request-method", b"PUT")]
    assert EXACT.preflight(headers) == (403, b"")


# -- preflight: wildcards and '*' --------------------------------------------------------------


WILD = CorsPolicy(allow_origins=["https://*.example.com", "http://*.dev.test:8080"],
                  allow_methods=["GET"], allow_credentials=True)


@pytest.mark.parametrize(("origin", "ok"), [
    (b"https://a.example.com", True),
    (b"https://a.b.example.com", True),
    (b"https://A-1.Example.com", True),
    (b"https://xn--bcher-kva.example.com", True),
    (b"https://example.com", False),
    (b"https://.example.com", False),
    (b"https://a..example.com", False),
    (b"https://aexample.com", False),
    (b"https://a.example.com.evil.com", False),
    (b"https://evil.com/.example.com", False),
    (b"https://evil.com#.example.com", False),
    (b"https://user@a.example.com", False),
    (b"http://a.example.com", False),
    (b"https://a.example.com:443", False),
    (b"https://a.example.com:8443", False),
    (b"https://-a.example.com", False),
    (b"https://a\r\nx: y.example.com", False),
    (b"http://x.dev.test:8080", True),
    (b"http://x.dev.test", False),
    (b"http://x.dev.test:80800", False),
])
def test_wildcard_subdomain_origins(origin: bytes, ok: bool) -> None:
    assert WILD.origin_allowed(origin) is ok
    status, h = pf(WILD, origin=origin, method=b"GET")
    assert status == (204 if ok else 403)
    if ok:
        assert h[b"access-control-allow-origin"] == origin
        assert h[b"access-control-allow-credentials"] == b"true"


def test_scheme_wildcard_origins() -> None:
    policy = CorsPolicy(allow_origins=["https://*"])
    for origin in (b"https://a.com", b"https://a.b.c:9443", b"https://[2001:db8::1]:8443",
                   b"https://localhost"):
        assert policy.origin_allowed(origin), origin
    for origin in (b"http://a.com", b"https://", b"https://a.com/x", b"https://a b",
                   b"null"):
        assert not policy.origin_allowed(origin), origin


def test_star_origin_without_credentials() -> None:
    policy = CorsPolicy(allow_origins=["*"], allow_methods=["GET", "POST"])
    status, h = pf(policy, origin=b"https://anything.test", method=b"POST")
    assert status == 204
    assert h[b"access-control-allow-origin"] == b"*"
    assert h[b"vary"] == b"origin"
    assert pf(policy, origin=b"null", method=b"GET")[0] == 204
    assert pf(policy, method=b"DELETE")[0] == 403


def test_star_methods_and_headers_are_reflected_with_vary() -> None:
    policy = CorsPolicy(allow_origins=["https://app.example.com"], allow_methods=["*"],
                        allow_headers=["*"], allow_credentials=True, max_age=0)
    status, h = pf(policy, method=b"PURGE", req_headers=b"Authorization, X-Custom")
    assert status == 204
    assert h[b"access-control-allow-methods"] == b"PURGE"
    assert h[b"access-control-allow-headers"] == b"authorization, x-custom"
    assert h[b"access-control-allow-credentials"] == b"true"
    assert h[b"access-control-max-age"] == b"0"
    assert h[b"vary"] == b"origin, access-control-request-method, access-control-request-headers"
    # Nothing requested, nothing reflected.
    status, h = pf(policy, method=b"GET")
    assert status == 204 and b"access-control-allow-headers" not in h
    # Reflection never echoes an invalid token.
    assert pf(policy, method=b"PU\rT")[0] == 403
    assert pf(policy, req_headers=b"x-ok, x:bad")[0] == 403


def test_star_mixed_with_names_means_any() -> None:
    policy = CorsPolicy(allow_origins=["*"], allow_methods=["GET", "*"],
                        allow_headers=["x-a", "*"])
    status, h = pf(policy, method=b"MKCOL", req_headers=b"x-b")
    assert status == 204
    assert h[b"access-control-allow-methods"] == b"MKCOL"
    assert h[b"access-control-allow-headers"] == b"x-b"


def test_no_max_age_no_header() -> None:
    policy = CorsPolicy(allow_origins=["https://app.example.com"], allow_methods=["PUT"])
    status, h = pf(policy)
    assert status == 204 and b"access-control-max-age" not in h
    assert b"access-control-allow-headers" not in h
    assert pf(policy, req_headers=b"x-anything")[0] == 403


def test_preflight_block_names_only_cors_headers_and_vary() -> None:
    _, h = pf(EXACT, req_headers=b"authorization")
    assert set(h) - CORS_RESPONSE_HEADERS == {b"vary"}


# -- actual responses --------------------------------------------------------------------------


def test_actual_response_allowed_origin() -> None:
    h = parse_block(EXACT.response_headers(b"https://app.example.com"))
    assert h == {
        b"access-control-allow-origin": b"https://app.example.com",
        b"access-control-expose-headers": b"X-Request-Id, Date",
        b"vary": b"origin",
    }


def test_actual_response_with_credentials() -> None:
    h = parse_block(WILD.response_headers(b"https://x.example.com"))
    assert h == {
        b"access-control-allow-origin": b"https://x.example.com",
        b"access-control-allow-credentials": b"true",
        b"vary": b"origin",
    }


def test_actual_response_disallowed_or_missing_origin_only_varies() -> None:
    assert EXACT.response_headers(b"https://evil.com") == b"vary: origin\r\n"
    assert EXACT.response_headers(None) == b"vary: origin\r\n"
    assert WILD.response_headers(b"https://example.com") == b"vary: origin\r\n"


def test_actual_response_star_policy_is_constant() -> None:
    policy = CorsPolicy(allow_origins=["*", "https://ignored.example"],
                        expose_headers=["*", "x-total"])
    want = b"access-control-allow-origin: *\r\naccess-control-expose-headers: *, x-total\r\n"
    assert policy.response_headers(b"https://a.test") == want
    assert policy.response_headers(None) == want
    assert policy.response_headers(b"null") == want


def test_actual_response_is_same_object_for_constant_parts() -> None:
    policy = CorsPolicy(allow_origins=["*"])
    assert policy.response_headers(b"https://a") is policy.response_headers(b"https://b")


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"allow_origins": []}, "at least one origin"),
    ({"allow_origins": "*"}, "single string"),
    ({"allow_origins": ["*"], "allow_credentials": True}, "allow_credentials cannot be true"),
    ({"allow_origins": ["https://a.com", "*"], "allow_credentials": True}, "'\\*'"),
    ({"allow_origins": ["example.com"]}, r"allow_origins\[0\].*not an origin"),
    ({"allow_origins": ["https://a.com", "https://example.com/"]}, r"allow_origins\[1\]"),
    ({"allow_origins": ["https://example.com/path"]}, "no path"),
    ({"allow_origins": ["https://a.*.example.com"]}, "not an origin"),
    ({"allow_origins": ["https://*example.com"]}, "not an origin"),
    ({"allow_origins": ["https://*.*"]}, "use 'https://\\*'"),
    ({"allow_origins": ["https://*.[::1]"]}, "no wildcard on an IP"),
    ({"allow_origins": ["https://a.com:99999"]}, "port out of range"),
    ({"allow_origins": ["https://a.com:0"]}, "port out of range"),
    ({"allow_origins": ["null"]}, "not an origin"),
    ({"allow_origins": [""]}, "non-empty string"),
    ({"allow_origins": [3]}, "non-empty string"),
    ({"allow_origins": ["*"], "allow_methods": ["GET", "BAD METHOD"]}, r"allow_methods\[1\]"),
    ({"allow_origins": ["*"], "allow_headers": ["x-ok", "x:bad"]}, r"allow_headers\[1\]"),
    ({"allow_origins": ["*"], "expose_headers": ["a,b"]}, r"expose_headers\[0\]"),
    ({"allow_origins": ["*"], "max_age": -1}, "max_age"),
    ({"allow_origins": ["*"], "max_age": 86401}, "max_age"),
    ({"allow_origins": ["*"], "max_age": 1.5}, "max_age"),
    ({"allow_origins": ["*"], "max_age": True}, "max_age"),
    ({"allow_origins": ["*"], "allow_credentials": "yes"}, "allow_credentials"),
])
def test_validation_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CorsPolicy(**kwargs)


def test_origin_normalisation_at_build() -> None:
    policy = CorsPolicy(allow_origins=["HTTPS://App.Example.com:443", "http://a.test:80",
                                       "http://b.test:08080", " https://c.test "])
    assert policy.origin_allowed(b"https://app.example.com")
    assert policy.origin_allowed(b"http://a.test")
    assert policy.origin_allowed(b"http://b.test:8080")
    assert policy.origin_allowed(b"https://c.test")
    assert not policy.origin_allowed(b"https://app.example.com:443")  # browsers omit it


def test_max_age_bounds_accepted() -> None:
    assert pf(CorsPolicy(allow_origins=["*"], max_age=86400), method=b"GET")[1][
        b"access-control-max-age"] == b"86400"


def test_ipv6_exact_origin() -> None:
    policy = CorsPolicy(allow_origins=["http://[::1]:8080"])
    assert policy.origin_allowed(b"http://[::1]:8080")
    assert not policy.origin_allowed(b"http://[::2]:8080")


def test_from_config_and_method_aliases() -> None:
    from edgeplane.policies.cors.plugin import CorsConfig

    cfg = CorsConfig(allow_origins=("https://app.example.com",), allow_methods=("PUT",),
                     allow_headers=("x-a",), expose_headers=("x-e",), allow_credentials=True,
                     max_age=5)
    policy = CorsPolicy.from_config(cfg)
    assert policy.varies_by_origin
    assert not CorsPolicy(allow_origins=["*"]).varies_by_origin
    assert policy.is_preflight(b"OPTIONS", [(b"origin", b"o"),
                                            (b"access-control-request-method", b"PUT")])
    status, h = pf(policy, req_headers=b"x-a")
    assert status == 204 and h[b"access-control-max-age"] == b"5"
    with pytest.raises(ValueError, match="allow_credentials cannot be true"):
        CorsPolicy.from_config(CorsConfig(allow_origins=("*",), allow_credentials=True))
