"""Differential test of the two request parsers (httptools/llhttp and h11) through the
real gateway: the same bytes go to two gateways that differ only in `http.parser`, and
what a client observes -- the statuses of the responses and whether the gateway closed
the connection -- must be the same, and as expected. Where the libraries legitimately
differ, `KNOWN_DIFFERENCES` pins the exact outcome of each, so any change shows up.

How an outcome is observed: the corpus bytes are sent, then a probe request
(`GET /__probe`). If the probe is answered the connection was left open (keep-alive);
if the gateway closes first it was not. Routes: `GET /__probe` and `$default` are mocks;
`POST /echo` goes to the demo upstream, so body framing is parsed to the end before
anything is answered.
"""

from __future__ import annotations

import asyncio

import pytest

from conftest import RawClient, base_config

pytestmark = [pytest.mark.timeout(20), pytest.mark.usefixtures("no_logged_exceptions")]


PROBE = b"GET /__probe HTTP/1.1\r\nHost: probe\r\n\r\n"
H = b"Host: gw.test\r\n"
GET = b"GET /x HTTP/1.1\r\n" + H
ECHO = b"POST /echo HTTP/1.1\r\n" + H
CHUNKED = ECHO + b"Transfer-Encoding: chunked\r\n"

OPEN, CLOSED = False, True

# name -> (raw bytes, expected outcome with both parsers: (statuses, closed)).
CORPUS: dict[str, tuple[bytes, tuple[tuple[int, ...], bool]]] = {
    # ---- valid
    "simple-get": (GET + b"\r\n", ((200,), OPEN)),
    "lowercase-headers": (b"GET /x HTTP/1.1\r\nhost: gw.test\r\nx-a: b\r\n\r\n", ((200,), OPEN)),
    "mixed-case-headers": (b"GET /x HTTP/1.1\r\nhOsT: gw.test\r\nX-a: b\r\n\r\n", ((200,), OPEN)),
    "empty-header-value": (GET + b"X-Empty:\r\n\r\n", ((200,), OPEN)),
    "tab-in-value": (GET + b"X-Tab: a\tb\r\n\r\n", ((200,), OPEN)),
    "trailing-ows": (GET + b"X-Ows: v \t \r\n\r\n", ((200,), OPEN)),
    "obs-text-in-value": (GET + b"X-Utf8: caf\xc3\xa9\r\n\r\n", ((200,), OPEN)),
    "absolute-form": (b"GET http://gw.test/x?y=1 HTTP/1.1\r\n" + H + b"\r\n", ((200,), OPEN)),
    "options-star": (b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", ((200,), OPEN)),
    "long-valid-url": (b"GET /" + b"a" * 6000 + b"?q=" + b"b" * 2000 + b" HTTP/1.1\r\n" + H + b"\r\n",
                       ((200,), OPEN)),
    "pipelined-three": ((GET + b"\r\n") * 3, ((200, 200, 200), OPEN)),
    "pipelined-with-bodies": (
        ECHO + b"Content-Length: 5\r\n\r\nhello" + GET + b"\r\n"
        + CHUNKED + b"\r\n3\r\nabc\r\n0\r\n\r\n", ((200, 200, 200), OPEN)),
    "post-content-length": (ECHO + b"Content-Length: 5\r\n\r\nhello", ((200,), OPEN)),
    "post-empty-body": (ECHO + b"Content-Length: 0\r\n\r\n", ((200,), OPEN)),
    "chunked": (CHUNKED + b"\r\n5\r\nhello\r\n0\r\n\r\n", ((200,), OPEN)),
    "chunk-extensions": (CHUNKED + b"\r\n5;name=value;flag\r\nhello\r\n0;last\r\n\r\n", ((200,), OPEN)),
    "chunk-trailer": (CHUNKED + b"\r\n5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n", ((200,), OPEN)),
    "chunked-uppercase-hex": (CHUNKED + b"\r\nA\r\n0123456789\r\n0\r\n\r\n", ((200,), OPEN)),
    "te-mixed-case": (ECHO + b"Transfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", ((200,), OPEN)),
    "expect-100-continue": (ECHO + b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
                            ((200,), OPEN)),
    "http10-no-host": (b"GET /x HTTP/1.0\r\n\r\n", ((200,), CLOSED)),
    "http10-keep-alive": (b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", ((200,), OPEN)),
    "connection-close": (GET + b"Connection: close\r\n\r\n", ((200,), CLOSED)),
    "http10-chunked": (b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                       ((200,), CLOSED)),  # RFC 9112 6.1: framing is suspect, close after
    # A WebSocket handshake to a route that does not upgrade gets its ordinary answer and
    # the connection stays HTTP; any other upgrade (h2c) is answered and closed.
    "websocket-to-plain-route": (GET + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n", ((200,), OPEN)),
    "h2c-upgrade-not-supported": (GET + b"Connection: Upgrade\r\nUpgrade: h2c\r\n\r\n", ((200,), CLOSED)),
    # ---- invalid
    "bad-request-line": (b"GET/x HTTP/1.1\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "garbage": (b"NOT HTTP\r\n\r\n", ((400,), CLOSED)),
    "tls-client-hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", ((400,), CLOSED)),
    "invalid-header-name": (GET + b"Bad Name: x\r\n\r\n", ((400,), CLOSED)),
    "header-name-with-paren": (GET + b"Bad(Name: x\r\n\r\n", ((400,), CLOSED)),
    "space-before-colon": (GET + b"X-A : x\r\n\r\n", ((400,), CLOSED)),
    "leading-space-first-header": (b"GET /x HTTP/1.1\r\n Host: gw.test\r\n\r\n", ((400,), CLOSED)),
    "obs-fold": (GET + b"X-A: x\r\n  folded\r\n\r\n", ((400,), CLOSED)),
    "bare-lf": (b"GET /x HTTP/1.1\nHost: gw.test\n\n", ((400,), CLOSED)),
    "bare-lf-in-one-line": (b"GET /x HTTP/1.1\r\nHost: gw.test\nX: y\r\n\r\n", ((400,), CLOSED)),
    "bare-cr": (b"GET /x HTTP/1.1\r\nHost: gw.test\rX: y\r\n\r\n", ((400,), CLOSED)),
    "nul-in-value": (GET + b"X: a\x00b\r\n\r\n", ((400,), CLOSED)),
    "del-in-value": (GET + b"X: a\x7fb\r\n\r\n", ((400,), CLOSED)),
    "ctl-in-value": (GET + b"X: a\x01b\r\n\r\n", ((400,), CLOSED)),
    "cl-and-te": (ECHO + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                  ((400,), CLOSED)),
    "te-and-cl": (ECHO + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
                  ((400,), CLOSED)),
    "duplicate-differing-cl": (ECHO + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                               ((400,), CLOSED)),
    "duplicate-equal-cl": (ECHO + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", ((400,), CLOSED)),
    "cl-list": (ECHO + b"Content-Length: 5, 5\r\n\r\nhello", ((400,), CLOSED)),
    "negative-cl": (ECHO + b"Content-Length: -5\r\n\r\nhello", ((400,), CLOSED)),
    "plus-cl": (ECHO + b"Content-Length: +5\r\n\r\nhello", ((400,), CLOSED)),
    "hex-cl": (ECHO + b"Content-Length: 0x5\r\n\r\nhello", ((400,), CLOSED)),
    "cl-overflow": (ECHO + b"Content-Length: 99999999999999999999999\r\n\r\n", ((400,), CLOSED)),
    "invalid-chunk-size": (CHUNKED + b"\r\nzz\r\nhello\r\n0\r\n\r\n", ((400,), CLOSED)),
    "chunk-data-too-long": (CHUNKED + b"\r\n5\r\nhelloXX0\r\n\r\n", ((400,), CLOSED)),
    "chunk-lines-bare-lf": (CHUNKED + b"\r\n5\nhello\n0\n\n", ((400,), CLOSED)),
    "te-gzip": (ECHO + b"Transfer-Encoding: gzip\r\n\r\nhello", ((400,), CLOSED)),
    "te-gzip-chunked": (ECHO + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                        ((400,), CLOSED)),
    "te-chunked-gzip": (ECHO + b"Transfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                        ((400,), CLOSED)),
    "te-twice": (CHUNKED + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", ((400,), CLOSED)),
    "missing-host": (b"GET /x HTTP/1.1\r\n\r\n", ((400,), CLOSED)),
    "two-hosts": (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", ((400,), CLOSED)),
    "http09": (b"GET /x\r\n\r\n", ((400,), CLOSED)),
    "http12": (b"GET /x HTTP/1.2\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "http2": (b"GET /x HTTP/2.0\r\n" + H + b"\r\n", ((505,), CLOSED)),
    "no-leading-slash": (b"GET x HTTP/1.1\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "fragment": (b"GET /x#frag HTTP/1.1\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "space-in-target": (b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "ctl-in-target": (b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "connect": (b"CONNECT gw.test:443 HTTP/1.1\r\nHost: gw.test:443\r\n\r\n", ((405,), CLOSED)),
    "expect-unknown": (GET + b"Expect: teapot\r\n\r\n", ((417,), CLOSED)),
    "pipelined-then-garbage": (GET + b"\r\n" + GET + b"\r\nGARBAGE\r\n\r\n" + GET + b"\r\n",
                               ((200, 200, 400), CLOSED)),
    # ---- where the libraries differ (see KNOWN_DIFFERENCES)
    "http3": (b"GET /x HTTP/3.0\r\n" + H + b"\r\n", None),
    "lowercase-method": (b"get /x HTTP/1.1\r\n" + H + b"\r\n", None),
    "extension-method": (b"FROB /x HTTP/1.1\r\n" + H + b"\r\n", None),
    "double-space-request-line": (b"GET  /x HTTP/1.1\r\n" + H + b"\r\n", None),
    "leading-empty-line": (b"\r\n" + GET + b"\r\n", None),
    "chunk-size-overflow": (CHUNKED + b"\r\nffffffffffffffffff\r\nhello\r\n0\r\n\r\n", None),
}

# name -> {parser: outcome}: legitimate differences between llhttp and h11, kept exact.
KNOWN_DIFFERENCES = {
    # llhttp knows HTTP/0.9-2.0 only and fails the request line ("Invalid HTTP version");
    # h11 parses any d.d version and the gateway answers 505 for a major version > 1.
    "http3": {"httptools": ((400,), CLOSED), "h11": ((505,), CLOSED)},
    # llhttp accepts only the methods in its table (upper-case, case-sensitive); h11
    # accepts any token as RFC 9110 9.1 allows. The mock on $default then answers it.
    "lowercase-method": {"httptools": ((400,), CLOSED), "h11": ((200,), OPEN)},
    "extension-method": {"httptools": ((400,), CLOSED), "h11": ((200,), OPEN)},
    # RFC 9112 3 lets a server split the request line on any whitespace (llhttp does);
    # h11 requires single spaces.
    "double-space-request-line": {"httptools": ((200,), OPEN), "h11": ((400,), CLOSED)},
    # RFC 9112 2.2: a server SHOULD ignore an empty line before the request line (llhttp
    # does); h11 refuses it.
    "leading-empty-line": {"httptools": ((200,), OPEN), "h11": ((400,), CLOSED)},
    # llhttp refuses a chunk size beyond 64 bits; h11 takes up to 20 hex digits and waits
    # for that much data, so the request times out as a stalled body (408).
    "chunk-size-overflow": {"httptools": ((400,), CLOSED), "h11": ((408,), CLOSED)},
}


def gateway_config(parser: str) -> dict:
    cfg = base_config(None, routes=[
        {"route": "GET /__probe", "integration": {"type": "mock", "status": 200, "body": "probe"}},
        {"route": "POST /echo", "integration": {"type": "http", "upstream": "demo", "timeout": "300ms"}},
        {"route": "$default", "integration": {"type": "mock", "status": 200, "body": {"ok": True}}},
    ], http={"parser": parser}, limits={"head_timeout": "1s", "keepalive_timeout": "5s"})
    return cfg


async def outcome(addr: tuple[str, int], raw: bytes) -> tuple[tuple[int, ...], bool]:
    c = await RawClient.connect(addr)
    statuses: list[int] = []
    try:
        await c.send(raw)
        await c.send(PROBE)
        while True:
            try:
                r = await c.read_response(timeout=3)
            except ConnectionError:
                return tuple(statuses), CLOSED
            if r.body == b"probe":
                return tuple(statuses), OPEN
            statuses.append(r.status)
    finally:
        await c.close()


@pytest.fixture
async def gateways(upstream, gateway):
    out = {}
    for parser in ("httptools", "h11"):
        cfg = gateway_config(parser)
        cfg["upstreams"]["demo"] = {"targets": [f"http://127.0.0.1:{upstream.port}"]}
        out[parser] = await gateway(cfg)
    return out


@pytest.mark.parametrize("name", list(CORPUS))
async def test_parsers_agree(gateways, name):
    raw, expected = CORPUS[name]
    got = {}
    for parser, gw in gateways.items():
        got[parser] = await outcome(gw.addresses[0], raw)
    if name in KNOWN_DIFFERENCES:
        assert got == KNOWN_DIFFERENCES[name]
    else:
        assert got["httptools"] == got["h11"], f"parsers disagree on {name!r}: {got}"
        assert got["httptools"] == expected


def test_corpus_is_consistent():
    assert len(CORPUS) >= 40
    for name, (_, expected) in CORPUS.items():
        assert (expected is None) == (name in KNOWN_DIFFERENCES), name
    assert set(KNOWN_DIFFERENCES) <= set(CORPUS)


async def test_bytes_split_anywhere_parse_the_same(gateways):
    """Feeding a pipelined pair one byte per read gives the same answers as one read."""
    raw = CORPUS["pipelined-with-bodies"][0]
    for parser, gw in gateways.items():
        c = await RawClient.connect(gw.addresses[0])
        for i in range(len(raw)):
            c.writer.write(raw[i : i + 1])
            await c.writer.drain()
            await asyncio.sleep(0)  # let the gateway take each byte as its own read
        statuses = [(await c.read_response()).status for _ in range(3)]
        assert statuses == [200, 200, 200], parser
        await c.close()
