"""Differential test of the two request parsers (httptools/llhttp and h11) through the
real gateway: the same bytes go to two gateways that differ only in `http.parser`, and
what a client observes -- the statuses of the responses and whether the gateway closed
the connection -- must be the same, and as expected. Where llhttp and h11 differ, the
codec holds both to the strict answer (its docstring lists the rules); the corpus has a
case on each side of every rule. Where the two parser paths still differ,
`KNOWN_DIFFERENCES` pins the exact outcome of each, so any change shows up.

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
    # ---- the strict rules of `codec` (its docstring): both parsers give the same answer
    # Bytes before a request line: one CRLF is ignored, anything else refused.
    "leading-empty-line": (b"\r\n" + GET + b"\r\n", ((200,), OPEN)),
    "leading-two-empty-lines": (b"\r\n\r\n" + GET + b"\r\n", ((400,), CLOSED)),
    "leading-bare-cr": (b"\r" + GET + b"\r\n", ((400,), CLOSED)),
    "leading-cr-crlf": (b"\r\r\n" + GET + b"\r\n", ((400,), CLOSED)),
    "leading-bare-lf": (b"\n" + GET + b"\r\n", ((400,), CLOSED)),
    "leading-crlf-lf": (b"\r\n\n" + GET + b"\r\n", ((400,), CLOSED)),
    "leading-lf-crlf": (b"\n\r\n" + GET + b"\r\n", ((400,), CLOSED)),
    "empty-line-between-pipelined": (GET + b"\r\n\r\n" + GET + b"\r\n", ((200, 200), OPEN)),
    "two-empty-lines-between": (GET + b"\r\n\r\n\r\n" + GET + b"\r\n", ((200, 400), CLOSED)),
    "bare-cr-between": (GET + b"\r\n\r" + GET + b"\r\n", ((200, 400), CLOSED)),
    "bare-lf-between": (GET + b"\r\n\n" + GET + b"\r\n", ((200, 400), CLOSED)),
    "empty-line-after-body": (ECHO + b"Content-Length: 5\r\n\r\nhello\r\n" + GET + b"\r\n",
                              ((200, 200), OPEN)),
    "bare-lf-after-body": (ECHO + b"Content-Length: 5\r\n\r\nhello\n" + GET + b"\r\n", ((200, 400), CLOSED)),
    "empty-line-after-chunked": (CHUNKED + b"\r\n5\r\nhello\r\n0\r\n\r\n\r\n" + GET + b"\r\n",
                                 ((200, 200), OPEN)),
    "trailing-empty-line": (GET + b"\r\n\r\n", ((200,), OPEN)),  # then the probe
    "trailing-bare-cr": (GET + b"\r\n\r", ((200, 400), CLOSED)),
    # The request line: single spaces, the HTTP/ protocol, llhttp's method table, and
    # the versions it knows.
    "double-space-request-line": (b"GET  /x HTTP/1.1\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "double-space-before-version": (b"GET /x  HTTP/1.1\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "rtsp-protocol": (b"GET /x RTSP/1.0\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "ice-protocol": (b"SOURCE /x ICE/1.0\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "http3": (b"GET /x HTTP/3.0\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "http19": (b"GET /x HTTP/1.9\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "lowercase-method": (b"get /x HTTP/1.1\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "extension-method": (b"FROB /x HTTP/1.1\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "http10-pri": (b"PRI /x HTTP/1.0\r\n\r\n", ((400,), CLOSED)),
    "http11-pri": (b"PRI /x HTTP/1.1\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "http10-rtsp-method": (b"DESCRIBE /x HTTP/1.0\r\n\r\n", ((400,), CLOSED)),
    "http11-rtsp-method": (b"SETUP /x HTTP/1.1\r\n" + H + b"\r\n", ((400,), CLOSED)),
    "http10-get-parameter": (b"GET_PARAMETER /x HTTP/1.0\r\n\r\n", ((400,), CLOSED)),
    "http10-table-method": (b"PURGE /x HTTP/1.0\r\n\r\n", ((200,), CLOSED)),
    "http11-table-method": (b"M-SEARCH /x HTTP/1.1\r\n" + H + b"\r\n", ((200,), OPEN)),
    "http11-query-method": (b"QUERY /x HTTP/1.1\r\n" + H + b"\r\n", ((200,), OPEN)),
    # Chunk-size lines: at most 16 hex digits, leading zeros included.
    "chunk-size-1-leading-zero": (CHUNKED + b"\r\n05\r\nhello\r\n0\r\n\r\n", ((200,), OPEN)),
    "chunk-size-8-leading-zeros": (CHUNKED + b"\r\n" + b"0" * 8 + b"5\r\nhello\r\n0\r\n\r\n", ((200,), OPEN)),
    "chunk-size-16-digits": (CHUNKED + b"\r\n" + b"0" * 15 + b"5\r\nhello\r\n0\r\n\r\n", ((200,), OPEN)),
    "chunk-size-16-leading-zeros": (CHUNKED + b"\r\n" + b"0" * 16 + b"5\r\nhello\r\n0\r\n\r\n",
                                    ((400,), CLOSED)),
    "chunk-size-17-leading-zeros": (CHUNKED + b"\r\n" + b"0" * 17 + b"5\r\nhello\r\n0\r\n\r\n",
                                    ((400,), CLOSED)),
    "chunk-size-100-leading-zeros": (CHUNKED + b"\r\n" + b"0" * 100 + b"5\r\nhello\r\n0\r\n\r\n",
                                     ((400,), CLOSED)),
    "last-chunk-16-zeros": (CHUNKED + b"\r\n5\r\nhello\r\n" + b"0" * 16 + b"\r\n\r\n", ((200,), OPEN)),
    "last-chunk-17-zeros": (CHUNKED + b"\r\n5\r\nhello\r\n" + b"0" * 17 + b"\r\n\r\n", ((400,), CLOSED)),
    "chunk-size-overflow": (CHUNKED + b"\r\nffffffffffffffffff\r\nhello\r\n0\r\n\r\n", ((400,), CLOSED)),
    "chunk-size-space": (CHUNKED + b"\r\n5 \r\nhello\r\n0\r\n\r\n", ((400,), CLOSED)),
    # Chunk extensions: `;name` or `;name=token|quoted-string`, nothing empty, no spaces.
    "chunk-ext-name": (CHUNKED + b"\r\n5;ext\r\nhello\r\n0\r\n\r\n", ((200,), OPEN)),
    "chunk-ext-value": (CHUNKED + b"\r\n5;ext=value\r\nhello\r\n0\r\n\r\n", ((200,), OPEN)),
    "chunk-ext-quoted": (CHUNKED + b'\r\n5;ext="a \\"b\\""\r\nhello\r\n0;x=y\r\n\r\n', ((200,), OPEN)),
    "chunk-ext-empty": (CHUNKED + b"\r\n5;\r\nhello\r\n0\r\n\r\n", ((400,), CLOSED)),
    "last-chunk-ext-empty": (CHUNKED + b"\r\n5\r\nhello\r\n0;\r\n\r\n", ((400,), CLOSED)),
    "chunk-ext-empty-between": (CHUNKED + b"\r\n5;a;;b\r\nhello\r\n0\r\n\r\n", ((400,), CLOSED)),
    "chunk-ext-no-name": (CHUNKED + b"\r\n5;=v\r\nhello\r\n0\r\n\r\n", ((400,), CLOSED)),
    "chunk-ext-empty-value": (CHUNKED + b"\r\n5;a=\r\nhello\r\n0\r\n\r\n", ((400,), CLOSED)),
    "chunk-ext-space": (CHUNKED + b"\r\n5; a\r\nhello\r\n0\r\n\r\n", ((400,), CLOSED)),
    "chunk-ext-ctl-in-quotes": (CHUNKED + b'\r\n5;a="\x01"\r\nhello\r\n0\r\n\r\n', ((400,), CLOSED)),
    # Trailers: CRLF lines, no controls or obs-fold, no framing or connection fields.
    "trailer-bare-lf": (CHUNKED + b"\r\n5\r\nhello\r\n0\r\nX-T: t\n\r\n", ((400,), CLOSED)),
    "trailer-obs-fold": (CHUNKED + b"\r\n5\r\nhello\r\n0\r\nX-T: t\r\n folded\r\n\r\n", ((400,), CLOSED)),
    "trailer-ctl": (CHUNKED + b"\r\n5\r\nhello\r\n0\r\nX-T: \x01\r\n\r\n", ((400,), CLOSED)),
    "trailer-content-length": (CHUNKED + b"\r\n5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n",
                               ((400,), CLOSED)),
    "trailer-connection": (CHUNKED + b"\r\n5\r\nhello\r\n0\r\nConnection: close\r\n\r\n", ((400,), CLOSED)),
    # "chunked" followed by HTAB is not "chunked" to llhttp (h11 strips the HTAB).
    "te-chunked-htab": (ECHO + b"Transfer-Encoding: chunked\t\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                        ((400,), CLOSED)),
    "te-chunked-space": (ECHO + b"Transfer-Encoding: chunked \r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                         ((200,), OPEN)),
    # An Upgrade header without "Connection: upgrade" is no upgrade (h11 alone closes).
    "upgrade-without-connection-token": (GET + b"Upgrade: websocket\r\n\r\n", ((200,), OPEN)),
    # Trailer fields are dropped by both paths (llhttp reports them through on_header;
    # the protocol ignores them there), so one that would be refused in a head is not.
    "trailer-expect": (CHUNKED + b"\r\n5\r\nhello\r\n0\r\nExpect: teapot\r\n\r\n", ((200,), OPEN)),
}

# name -> {parser: outcome}: differences between the two parser paths, kept exact (none
# now; a case here has None as its expected outcome in CORPUS).
KNOWN_DIFFERENCES: dict[str, dict[str, tuple[tuple[int, ...], bool]]] = {}


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
    for parser in ("native", "httptools", "h11"):
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
        assert got["httptools"] == got["h11"] == got["native"], f"parsers disagree on {name!r}: {got}"
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
