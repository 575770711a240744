"""The strict rules of `edgeplane.http.codec`, held by both parsers (httptools and h11).

Black-box first: through a real gateway for each `http.parser`, a refused request gets
400 and nothing of it reaches the upstream (a recording raw upstream sees only the
control request sent afterwards); an accepted one is forwarded as sent.

Then the sans-IO parts: `ChunkedScanner` on its own, both parsers fed the same bytes
split at every offset (the carries between reads), and a seeded mutation run comparing
what the two parsers hand to the protocol. That last one models the checks
`protocol.HttpProtocol` makes on a parsed head (Host, target form, version,
Transfer-Encoding value, upgrades), which turn different parser answers into the same
reply; everything else must already agree at the parser.
"""

from __future__ import annotations

import asyncio
import random

import httptools
import pytest

from conftest import PARSERS, RawClient, RawUpstream, base_config
from edgeplane.http import framing

try:
    from edgeplane.http import _cframing  # type: ignore[attr-defined]
except ImportError:  # not built here: the twin's cases run on the pure scanner only
    _cframing = None
from edgeplane.http.codec import ChunkedScanner, HttpParserError, new_request_parser

pytestmark = [pytest.mark.timeout(20), pytest.mark.usefixtures("no_logged_exceptions")]

H = b"Host: gw.test\r\n"
GET = b"GET /x HTTP/1.1\r\n" + H + b"\r\n"
CHUNKED = b"POST /up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"


def chunked(first_line: bytes, last: bytes = b"0\r\n\r\n") -> bytes:
    return CHUNKED + first_line + b"\r\nhello\r\n" + last


# (id, raw bytes) refused with 400 by both parsers.
REFUSED = [
    ("bare-cr-before", b"\r" + GET),
    ("cr-crlf-before", b"\r\r\n" + GET),
    ("bare-lf-before", b"\n" + GET),
    ("two-empty-lines-before", b"\r\n\r\n" + GET),
    ("crlf-lf-before", b"\r\n\n" + GET),
    ("double-space", b"GET  /x HTTP/1.1\r\n" + H + b"\r\n"),
    ("rtsp-protocol", b"GET /x RTSP/1.0\r\n" + H + b"\r\n"),
    ("http10-pri", b"PRI /x HTTP/1.0\r\n\r\n"),
    ("http10-rtsp-method", b"DESCRIBE /x HTTP/1.0\r\n\r\n"),
    ("http11-lowercase-method", b"post /x HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n"),
    ("http11-extension-method", b"FROB /x HTTP/1.1\r\n" + H + b"\r\n"),
    ("chunk-17-digits", chunked(b"0" * 16 + b"5")),
    ("chunk-100-zeros", chunked(b"0" * 100 + b"5")),
    ("chunk-overflow", chunked(b"f" * 17)),
    ("chunk-ext-empty", chunked(b"5;")),
    ("last-chunk-ext-empty", chunked(b"5", b"0;\r\n\r\n")),
    ("chunk-ext-no-name", chunked(b"5;=v")),
    ("chunk-ext-double-semicolon", chunked(b"5;a;;b")),
    ("chunk-ext-empty-value", chunked(b"5;a=")),
    ("chunk-ext-space", chunked(b"5; a")),
    ("trailer-bare-lf", chunked(b"5", b"0\r\nX-T: t\n\r\n")),
    ("trailer-connection", chunked(b"5", b"0\r\nConnection: close\r\n\r\n")),
    ("trailer-too-large", chunked(b"5", b"0\r\n" + b"X-T: " + b"t" * 9000 + b"\r\n\r\n")),
    ("te-chunked-htab", CHUNKED.replace(b"chunked", b"chunked\t") + b"5\r\nhello\r\n0\r\n\r\n"),
]

# (id, raw bytes, (method, path, body) the upstream must receive).
ACCEPTED = [
    ("one-empty-line-before", b"\r\n" + GET, (b"GET", b"/x", b"")),
    ("chunk-16-digits", chunked(b"0" * 15 + b"5"), (b"POST", b"/up", b"hello")),
    ("chunk-ext-token-and-quoted", chunked(b'5;a=b;c="d e";f'), (b"POST", b"/up", b"hello")),
    ("last-chunk-16-zeros", chunked(b"5", b"0" * 16 + b"\r\n\r\n"), (b"POST", b"/up", b"hello")),
    ("trailer-field", chunked(b"5", b"0\r\nX-T: t\r\n\r\n"), (b"POST", b"/up", b"hello")),
    ("table-method", b"PROPFIND /x HTTP/1.1\r\n" + H + b"\r\n", (b"PROPFIND", b"/x", b"")),
]


@pytest.fixture(params=PARSERS)
def parser(request):
    return request.param


class Recorder:
    """A raw upstream that records each request it receives (method, path, headers,
    body) and answers 200; bodies framed by Content-Length or chunked."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, bytes, bytes]] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            method, path, _ = head.split(b" ", 2)
            lower = head.lower()
            body = b""
            if b"\r\ntransfer-encoding: chunked\r\n" in lower:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    body += (await reader.readexactly(size + 2))[:size]  # the last: no trailers
                    if not size:
                        break
            elif b"\r\ncontent-length: " in lower:
                length = int(lower.split(b"\r\ncontent-length: ")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
            self.requests.append((method, path, lower, body))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()


def config(upstream_port: int, parser: str) -> dict:
    routes = [{"route": "$default", "integration": {"type": "http", "upstream": "demo", "timeout": "2s"}}]
    return base_config(upstream_port, routes=routes, http={"parser": parser},
                       limits={"head_timeout": "2s", "keepalive_timeout": "5s"})


async def control_request(gw, rec: Recorder) -> None:
    """A valid request on a new connection: answered, and the upstream's last request."""
    c = await RawClient.connect(gw.addresses[0])
    try:
        r = await c.request("GET", "/control")
        assert r.status == 200 and r.body == b"ok"
    finally:
        await c.close()
    assert rec.requests[-1][:2] == (b"GET", b"/control")


@pytest.mark.parametrize("raw", [c[1] for c in REFUSED], ids=[c[0] for c in REFUSED])
async def test_refused_with_400_and_nothing_forwarded(gateway, parser, raw):
    rec = Recorder()
    async with RawUpstream(rec) as up:
        gw = await gateway(config(up.port, parser))
        c = await RawClient.connect(gw.addresses[0])
        try:
            await c.send(raw)
            r = await c.read_response(timeout=5)
            assert r.status == 400 and r.json() == {"message": "Bad Request"}
            assert r.header("connection") == "close"
            assert await c.closed(timeout=2)
        finally:
            await c.close()
        await control_request(gw, rec)
        assert [req[:2] for req in rec.requests] == [(b"GET", b"/control")]
        assert up.connections == 1


@pytest.mark.parametrize("raw,expected", [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
async def test_accepted_and_forwarded_as_sent(gateway, parser, raw, expected):
    rec = Recorder()
    async with RawUpstream(rec) as up:
        gw = await gateway(config(up.port, parser))
        c = await RawClient.connect(gw.addresses[0])
        try:
            await c.send(raw)
            r = await c.read_response(timeout=5)
            assert r.status == 200 and r.body == b"ok"
        finally:
            await c.close()
        assert [(m, p, b) for m, p, _, b in rec.requests] == [expected]


async def test_pipelined_request_after_two_empty_lines_is_not_forwarded(gateway, parser):
    rec = Recorder()
    async with RawUpstream(rec) as up:
        gw = await gateway(config(up.port, parser))
        c = await RawClient.connect(gw.addresses[0])
        try:
            await c.send(b"GET /first HTTP/1.1\r\n" + H + b"\r\n\r\n" + b"GET /one-crlf HTTP/1.1\r\n" + H
                         + b"\r\n\r\n\r\n" + b"GET /second HTTP/1.1\r\n" + H + b"\r\n")
            statuses = [(await c.read_response(timeout=5)).status for _ in range(3)]
            assert statuses == [200, 200, 400]
            assert await c.closed(timeout=2)
        finally:
            await c.close()
        await control_request(gw, rec)
        assert [req[1] for req in rec.requests] == [b"/first", b"/one-crlf", b"/control"]


async def test_trailer_fields_are_not_forwarded_as_header_fields(gateway, parser):
    """llhttp reports trailer fields like header fields; they must not join the head."""
    rec = Recorder()
    async with RawUpstream(rec) as up:
        gw = await gateway(config(up.port, parser))
        c = await RawClient.connect(gw.addresses[0])
        try:
            await c.send(chunked(b"5", b"0\r\nX-Smuggled: yes\r\nHost: evil.test\r\n\r\n"))
            assert (await c.read_response(timeout=5)).status == 200
        finally:
            await c.close()
        (_, _, head, body), = rec.requests
        assert body == b"hello"
        assert b"x-smuggled" not in head and b"evil.test" not in head


# ------------------------------------------------------------------------- sans-IO


SCANNERS = [ChunkedScanner] + ([_cframing.ChunkedScanner] if _cframing is not None else [])


def scan(data: bytes, step: int = 0, cls=ChunkedScanner) -> int | str:
    """Feed `data` to a fresh `ChunkedScanner` (in `step`-byte reads): where the body
    ends in `data`, -1 when it goes on, or "refused". `cls`: the scanner or its
    compiled twin."""
    s = cls()
    try:
        if not step:
            return s.feed(data)
        for i in range(0, len(data), step):
            end = s.feed(data[i : i + step])
            if end >= 0:
                return i + end
        return -1
    except HttpParserError:
        return "refused"


END = "end"  # the body ends exactly at the end of the bytes


@pytest.mark.parametrize("body,expected", [
    (b"5\r\nhello\r\n0\r\n\r\nNEXT", 15),
    (b"0" * 15 + b"5\r\nhello\r\n" + b"0" * 16 + b"\r\n\r\n", END),
    (b"0" * 16 + b"5\r\nhello\r\n0\r\n\r\n", "refused"),
    (b"F" * 16 + b"\r\n", -1),  # a valid, very large chunk: its data is still to come
    (b"5;a=b;c;d=\"x\\\"y\"\r\nhello\r\n0;e\r\nT: 1\r\nU:\r\n\r\n", END),
    (b"5;\r\nhello\r\n0\r\n\r\n", "refused"),
    (b"5;;a\r\nhello\r\n0\r\n\r\n", "refused"),
    (b"5 \r\nhello\r\n0\r\n\r\n", "refused"),
    (b"5\r\nhelloX\r\n0\r\n\r\n", "refused"),
    (b"5\r\nhello\r\n0\r\nT: 1\n\r\n", "refused"),
    (b"5\r\nhello\r\n0\r\nT: 1\r\n folded\r\n\r\n", "refused"),
    (b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n", "refused"),
    (b"5\r\nhello\r\n0\r\n", -1),
    (b"1;" + b"a" * 1100 + b"\r\nx\r\n0\r\n\r\n", "refused"),  # size line over 1 KiB
    (b"0;" + b"a" * 1100 + b"\r\n\r\n", "refused"),  # the last one too
])
@pytest.mark.parametrize("cls", SCANNERS, ids=["pure", "compiled"][: len(SCANNERS)])
def test_chunked_scanner(body, expected, cls):
    if expected == END:
        expected = len(body)
    assert scan(body, 0, cls) == expected
    for step in (1, 2, 3, 7):  # lines split across reads are carried, same answer
        assert scan(body, step, cls) == expected, step


class Events:
    """Records what a parser hands to the protocol, with the checks `HttpProtocol` makes
    on a parsed head (see the module docstring): a head it would refuse ends the run."""

    def __init__(self) -> None:
        self.parser = None
        self.messages: list[dict] = []

    def on_message_begin(self) -> None:
        self.messages.append({"url": b"", "headers": [], "body": b"", "head": False, "done": False})

    def on_url(self, url: bytes) -> None:
        self.messages[-1]["url"] += url

    def on_header(self, name: bytes, value: bytes) -> None:
        m = self.messages[-1]
        if m["head"]:
            return  # a trailer field (llhttp reports them; the protocol ignores them)
        m["headers"].append((name.lower(), value))
        if name.lower() == b"transfer-encoding" and value.rstrip(b" ").lower() != b"chunked":
            raise Refused

    def on_headers_complete(self) -> None:
        p = self.parser
        self._complete(p.get_method(), p.get_http_version(), p.should_keep_alive(), p.should_upgrade())

    def on_head(self, method, target, version, headers, keep_alive, upgrade) -> None:
        """The native framer's one call per head: the same record as the four above."""
        if not self.messages or self.messages[-1]["head"]:  # the head came whole: no begin
            self.on_message_begin()
        self.messages[-1]["url"] = target
        for name, value in headers:
            self.on_header(name, value)
        self._complete(method, version, keep_alive, upgrade)

    def _complete(self, method, version, keep_alive, upgrade) -> None:
        m = self.messages[-1]
        m.update(head=True, method=method, version=version, keep=keep_alive)
        hosts = [v for n, v in m["headers"] if n == b"host"]
        if (upgrade or m["version"] not in ("1.0", "1.1") or len(hosts) > 1
                or (m["version"] == "1.1" and not hosts) or m["url"][:1] != b"/"):
            m["refused"] = True
            raise Refused

    def on_body(self, body: bytes) -> None:
        self.messages[-1]["body"] += body

    def on_message_complete(self) -> None:
        self.messages[-1]["done"] = True


class Refused(Exception):
    """A head the protocol would refuse (400 for the cases modelled)."""


def parse(kind: str, data: bytes, cuts: tuple[int, ...] = (), with_headers: bool = False) -> tuple[list, bool | None]:
    """What the protocol acts on: each head it dispatches (method, target, version, the
    body once complete, and its headers when asked), then whether the bytes ended in a
    refusal (None: closed after a non-keep-alive message, whatever followed). Kinds:
    `http.parser`'s, and "native-py", the native framer's pure-Python twin whatever runs."""
    ev = Events()
    p = framing.RequestFramer(ev, 64 * 1024) if kind == "native-py" else new_request_parser(kind, ev, 64 * 1024)
    ev.parser = p
    refused = False
    bounds = [0, *cuts, len(data)]
    try:
        for a, b in zip(bounds, bounds[1:], strict=False):
            p.feed_data(data[a:b])
    except (Refused, httptools.HttpParserUpgrade):
        refused = True
    except HttpParserError:
        refused = True
    out = []
    for m in ev.messages:
        if not m["head"] or m.get("refused"):
            break
        out.append((m["method"], m["url"], m["version"], m["body"] if m["done"] else None)
                   + ((tuple(m["headers"]),) if with_headers else ()))
        if m["done"] and not m["keep"]:
            return out, None
    return out, refused


KINDS = ("httptools", "h11", "native", "native-py")

SPLIT_CASES = [
    b"\r\n" + GET + b"\r\n" + GET,
    b"\r\n\r\n" + GET,
    GET + b"\r" + GET,
    GET + b"\r\n\n",
    b"GET /" + b"a" * 40 + b"  HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /x HTTP/1.1\r\n" + H + b"X-Long: " + b"v" * 50 + b"\r\n\r\n" + GET,
    b"POST /x HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello\r\n" + GET,
    chunked(b"05;a=\"b c\"", b"0\r\nT: 1\r\n\r\n\r\n") + GET,
    chunked(b"5", b"0\r\nT: 1\r\n\r\n\r\n\r\n") + GET,
    chunked(b"0" * 16 + b"5"),
    chunked(b"5;a;;b"),
    chunked(b"5", b"0\r\nT: \x01\r\n\r\n"),
    b"SOURCE /x ICE/1.0\r\n" + H + b"\r\n",
]


@pytest.mark.parametrize("data", SPLIT_CASES, ids=range(len(SPLIT_CASES)))
def test_parsers_agree_wherever_the_reads_split(data):
    whole = parse("httptools", data)
    for kind in KINDS:
        assert parse(kind, data) == whole, kind
    for cut in range(1, len(data)):
        for kind in KINDS:
            assert parse(kind, data, (cut,)) == whole, (kind, cut)
    for kind in KINDS:  # one byte per read
        assert parse(kind, data, tuple(range(1, len(data)))) == whole, kind


SEEDS = [
    GET,
    b"\r\n" + GET,
    b"POST /e HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
    chunked(b"5;a=b", b"0\r\nX: y\r\n\r\n"),
    chunked(b"00a;x=\"q\\\"\"", b"0\r\n\r\n").replace(b"hello", b"0123456789"),
    b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"OPTIONS /o HTTP/1.1\r\n" + H + b"Accept: */*\r\n\r\n",
]
PIECES = [b"\r", b"\n", b"\r\n", b" ", b"\t", b";", b"=", b'"', b"0", b"f", b"a", b"\x00", b"\x7f", b"\\",
          b":", b"G", b"\x80", b"\r\n\r\n", b"HTTP/1.1", b"Content-Length: 3\r\n",
          b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n", b"Host: b\r\n", b"0\r\n\r\n"]


def test_parsers_agree_on_mutated_requests():
    rng = random.Random(20240611)
    disagreements = []
    for _ in range(4000):
        data = bytearray(rng.choice(SEEDS) * rng.choice((1, 1, 2)))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data) + 1)
            op = rng.random()
            if op < 0.4:
                data[at:at] = rng.choice(PIECES)
            elif at < len(data):
                data[at : at + 1] = rng.choice(PIECES) if op < 0.7 else b""
        raw = bytes(data) + b"GET /probe HTTP/1.1\r\nHost: p\r\n\r\n"
        cuts = () if rng.random() < 0.5 else tuple(sorted(rng.sample(range(1, len(raw)), 3)))
        ll, h11 = parse("httptools", raw, cuts), parse("h11", raw, cuts)
        native, twin = parse("native", raw, cuts, True), parse("native-py", raw, cuts, True)
        if not ll == h11 == _without_headers(native) or native != twin:
            disagreements.append((raw, cuts, ll, h11, native, twin))
        elif parse("httptools", raw, cuts, True) != native:  # llhttp's header values too
            disagreements.append((raw, cuts, "headers", parse("httptools", raw, cuts, True), native))
    assert not disagreements, disagreements[:3]


def _without_headers(result: tuple[list, bool | None]) -> tuple[list, bool | None]:
    return [m[:4] for m in result[0]], result[1]
