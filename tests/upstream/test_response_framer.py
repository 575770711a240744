"""The native response framer (`http.native.ResponseFramer`), sans-IO.

- Its twins, compiled (`_cframing`) and pure Python (`response_framing`), make the same
  calls with the same arguments and stop the same way, byte for byte, on a corpus split
  at every offset and one byte per read, and on a seeded mutation run.
- Against llhttp (httptools' response parser, what parsed upstream responses before):
  on every mutated input the native framer accepts, llhttp reports the same responses
  (status, header lines, body, completion, keep-alive); whatever llhttp refuses, the
  native framer refuses too. The native framer may refuse more (the strict rules in
  `response_framing`'s docstring); those cases are pinned in `STRICTER`.
Through a real gateway and real misbehaving upstreams the framer is exercised by the
rest of tests/upstream.
"""

from __future__ import annotations

import random

import httptools
import pytest

import framer_trace
from edgeplane.http import response_framing

try:
    from edgeplane.http import _cframing  # type: ignore[attr-defined]
except ImportError:
    _cframing = None

TWINS = [response_framing.ResponseFramer] + ([_cframing.ResponseFramer] if _cframing else [])
TWIN_IDS = ["pure"] + (["compiled"] if _cframing else [])
needs_compiled = pytest.mark.skipif(_cframing is None, reason="the compiled framer is not built here "
                                    "(tests/http/test_native_framer.py says whether it should be)")

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CORPUS = [
    OK,
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Ows:  v \t \r\nX-Empty:\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked \r\n\r\n2\r\nab\r\n0\r\nT: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil close",
    b"HTTP/1.1 204 No Content\r\n\r\n" + OK,
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n" + OK,
    b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK,
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi",
    OK + b"\r\n\r\n" + OK,
    OK + OK,
    b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n",
    # refused
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX : y\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    OK + b"GARBAGE",
    b"\x16\x03\x01\x00",
]
# llhttp accepts these; the native framer refuses them (its strict rules).
STRICTER = [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nab\r\n0\r\nT: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nuntil close",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 099 X\r\nContent-Length: 42\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL",  # a body
    b"HTTP/1.1 000 X\r\nContent-Length: 0\r\n\r\n",
    b"ICE/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;;a\r\nab\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * 17 + b"2\r\nab\r\n0\r\n\r\n",
]


def run(cls, data: bytes, cuts: tuple[int, ...] = (), max_head: int = 8192) -> tuple[list, object]:
    return framer_trace.run(cls, data, cuts, max_head, lambda f: ("open", f.get_status_code(), f.should_keep_alive()))


def responses(calls: list[tuple]) -> list[tuple]:
    """The responses of a trace, independent of how the reads split: (status, headers,
    keep-alive, body, complete)."""
    out: list[list] = []
    for call in calls:
        if call[0] == "head":
            out.append([call[1], call[2], call[3], b"", False])
        elif call[0] == "body":
            out[-1][3] += call[1]
        elif call[0] == "complete":
            out[-1][4] = True
    return [tuple(r) for r in out]


class Llhttp:
    """httptools' response parser, recorded the same way (trailer fields dropped)."""

    def __init__(self) -> None:
        self.out: list[list] = []
        self.parser = httptools.HttpResponseParser(self)
        self.in_head = False

    def on_message_begin(self) -> None:
        self.out.append([0, [], False, b"", False])
        self.in_head = True

    def on_header(self, name, value) -> None:
        if self.in_head:
            self.out[-1][1].append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        r = self.out[-1]
        r[0], r[1], r[2] = self.parser.get_status_code(), tuple(r[1]), self.parser.should_keep_alive()

    def on_body(self, body) -> None:
        self.out[-1][3] += body

    def on_message_complete(self) -> None:
        self.out[-1][4] = True


def llhttp(data: bytes) -> tuple[list, bool]:
    rec = Llhttp()
    refused = False
    try:
        rec.parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        refused = True
    return [tuple(r) for r in rec.out if not rec.in_head or r is not rec.out[-1]], refused


@needs_compiled
@pytest.mark.parametrize("raw", CORPUS + STRICTER, ids=range(len(CORPUS + STRICTER)))
def test_twins_agree_wherever_the_reads_split(raw):
    whole = run(response_framing.ResponseFramer, raw)
    assert run(_cframing.ResponseFramer, raw) == whole
    for cut in range(1, len(raw)):
        pure, compiled = run(response_framing.ResponseFramer, raw, (cut,)), run(_cframing.ResponseFramer, raw, (cut,))
        assert pure == compiled, cut
        assert responses(pure[0]) == responses(whole[0]) and pure[1][0] == whole[1][0], cut
    byte_reads = tuple(range(1, len(raw)))
    assert run(response_framing.ResponseFramer, raw, byte_reads) == run(_cframing.ResponseFramer, raw, byte_reads)


@pytest.mark.parametrize("cls", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("raw", CORPUS, ids=range(len(CORPUS)))
def test_same_responses_as_llhttp_on_the_corpus(cls, raw):
    calls, end = run(cls, raw)
    ours = responses(calls)
    theirs, refused = llhttp(raw)
    assert (end[0] in ("HttpParserError", "HeadTooLarge")) == refused
    if not refused:
        assert ours == theirs


@pytest.mark.parametrize("cls", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("raw", STRICTER, ids=range(len(STRICTER)))
def test_stricter_than_llhttp(cls, raw):
    assert not llhttp(raw)[1]
    assert run(cls, raw)[1][0] == "HttpParserError"


def test_mutated_responses():
    """Seeded mutations: the twins agree exactly; against llhttp, what the native framer
    accepts llhttp reads the same, and what llhttp refuses it refuses."""
    pieces = [b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b",", b";", b"0", b"1", b"9", b"a", b"\x00", b"\x7f",
              b"\x80", b"HTTP/1.1 ", b"HTTP/1.0 ", b"200", b"204", b"100", b"101", b"\r\n\r\n",
              b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n",
              b"Connection: close\r\n", b"Connection: keep-alive\r\n", b"0\r\n\r\n", b"5\r\nhello\r\n"]
    rng = random.Random(20261205)
    accepted = 0
    for i in range(12000):
        raw = framer_trace.mutate(rng, rng.choice(CORPUS[:20]), pieces, 3)
        cuts = () if i % 3 == 0 else tuple(sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, 3))))
        max_head = rng.choice((8192, 60, 30))
        pure = run(response_framing.ResponseFramer, raw, cuts, max_head)
        if _cframing is not None:
            assert run(_cframing.ResponseFramer, raw, cuts, max_head) == pure, (raw, cuts, max_head)
        if max_head != 8192:
            continue
        theirs, refused = llhttp(raw)
        if pure[0] and pure[0][-1] == ("begin",):
            continue  # a head still unfinished: llhttp may refuse a field before its end
        if refused and pure[1][0] == "open":  # waiting for a line's end: refused once it comes
            finished = run(response_framing.ResponseFramer, raw + b"\r\n\r\n", cuts)
            assert finished[1][0] in ("HttpParserError", "HeadTooLarge"), raw
        elif refused:
            # (llhttp also refuses a 101 without "Connection: upgrade"; the native framer
            # stops at any 101 and the WebSocket proxy judges its headers, as before.)
            assert pure[1][0] in ("HttpParserError", "HeadTooLarge") or pure[1][0] == "upgrade", raw
        elif pure[1][0] == "open":  # accepted by both: the same responses
            accepted += 1
            assert responses(pure[0]) == theirs, raw
    assert accepted > 600  # the mutations leave enough valid responses to compare


@pytest.mark.parametrize("cls", TWINS, ids=TWIN_IDS)
def test_interim_upgrade_until_close_and_the_head_limit(cls):
    calls, end = run(cls, b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert responses(calls) == [(100, (), True, b"", True), (200, ((b"Content-Length", b"2"),), True, b"ok", True)]
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi"
    calls, end = run(cls, raw, (20,))
    assert end == ("upgrade", (len(raw) - 20 - 4,)) and calls[-1] == ("complete",)
    calls, end = run(cls, b"HTTP/1.1 200 OK\r\n\r\nabc", (19, 20))
    assert responses(calls) == [(200, (), False, b"abc", False)] and end == ("open", 200, False)
    calls, end = run(cls, b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 200, (30, 100), max_head=128)
    assert end == ("HeadTooLarge", "response head too large") and calls == [("begin",)]
