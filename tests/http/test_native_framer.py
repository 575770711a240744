"""The native request framer's two twins: compiled (`_cframing`) and pure Python
(`framing`) give the same answers, byte for byte.

Sans-IO: each twin is fed the same bytes, split the same way, and every call it makes
(callback name and arguments: the head's method, target, version, header list, keep-alive
and upgrade flags, each body chunk) and how it stops (the error's type, message and, for
an upgrade, offset) are recorded; the two records must be equal. The inputs are the
gateway differential corpus, split at every offset and one byte per read, then a seeded
mutation run. That both twins agree with llhttp and h11 is `test_parser_agreement`'s and
`test_parser_differential`'s part (they run "native" and "native-py" too).

Also: where a C compiler is, the compiled twin was built and is the one that runs; a
wheel builds with and without a compiler (without one: no extension, install goes on).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_parser_differential import CORPUS, PROBE

import framer_trace
from edgeplane.http import framing, native
from edgeplane.http.chunked import HttpParserError

try:
    from edgeplane.http import _cframing  # type: ignore[attr-defined]
except ImportError:  # no compiler at install, or the tests run the twin alone
    _cframing = None

ROOT = Path(__file__).resolve().parents[2]
NO_EXTENSIONS = os.environ.get("EDGEPLANE_NO_EXTENSIONS", "") not in ("", "0")
needs_compiled = pytest.mark.skipif(_cframing is None, reason="the compiled framer is not built here "
                                    f"({native.WHY}); test_compiled_framer_is_built says whether it should be")


def run(cls, data: bytes, cuts: tuple[int, ...] = (), max_head: int = 8192) -> tuple[list, object]:
    return framer_trace.run(cls, data, cuts, max_head, lambda f: ("getters", f.get_method(), f.get_http_version(),
                                                                   f.should_keep_alive(), f.should_upgrade()))


# One more: a head before an upgrade request in the same bytes, so a cut inside the first
# leaves it carried when the upgrade's offset is taken (a review found it off by the
# carried length: the bytes after the upgrade were read from the wrong place).
CARRIED_THEN_UPGRADE = (b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
                        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nTAIL")
CASES = [raw + PROBE for raw, _ in CORPUS.values()] + [CARRIED_THEN_UPGRADE]
IDS = [*CORPUS, "carried-then-upgrade"]


@needs_compiled
@pytest.mark.parametrize("raw", CASES, ids=IDS)
def test_twins_agree_on_the_corpus_wherever_the_reads_split(raw):
    whole = run(framing.RequestFramer, raw)
    assert run(_cframing.RequestFramer, raw) == whole
    step = max(1, len(raw) // 60)  # long cases: every 1/60th
    for cut in range(1, len(raw), step):
        for cls in (framing.RequestFramer, _cframing.RequestFramer):
            # Where the reads split may change an error's wording (an unfinished head is
            # judged by what can still follow) and an upgrade's offset; not the outcome.
            got = run(cls, raw, (cut,))
            assert got[1][0] == whole[1][0], (cls, cut)
            assert _joined(got[0]) == _joined(whole[0]), (cls, cut)
            if whole[1][0] == "upgrade":  # the offset is in the read that ended the head
                (end,) = whole[1][1]
                assert got[1][1] == ((end,) if end <= cut else (end - cut,)), (cls, cut)
        assert run(framing.RequestFramer, raw, (cut,)) == run(_cframing.RequestFramer, raw, (cut,)), cut
    byte_reads = tuple(range(1, len(raw)))
    assert run(framing.RequestFramer, raw, byte_reads) == run(_cframing.RequestFramer, raw, byte_reads)


def _joined(calls: list[tuple]) -> list[tuple]:
    """A trace with each message's body chunks joined and `begin` dropped (both depend on
    where reads split; nothing else may)."""
    out: list[tuple] = []
    for call in calls:
        if call[0] == "begin":
            continue
        if call[0] == "body" and out and out[-1][0] == "body":
            out[-1] = ("body", out[-1][1] + call[1])
        else:
            out.append(call)
    return out


@needs_compiled
def test_twins_agree_on_mutated_requests():
    seeds = [raw for raw, _ in CORPUS.values()]
    pieces = [b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b",", b";", b"0", b"9", b"a", b"Z", b"\x00", b"\x7f", b"\x80",
              b"\xff", b"/", b"*", b"http://", b"HTTP/1.0", b"HTTP/1.1", b"\r\n\r\n", b"Content-Length: 3\r\n",
              b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n", b"Connection: keep-alive, upgrade\r\n",
              b"Upgrade: websocket\r\n", b"Host: h\r\n", b"0\r\n\r\n", b"5\r\nhello\r\n"]
    rng = random.Random(20261205)
    for i in range(6000):
        raw = framer_trace.mutate(rng, rng.choice(seeds), pieces, 4) + PROBE
        cuts = () if i % 3 == 0 else tuple(sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, 4))))
        max_head = rng.choice((8192, 64, 40))  # small limits reach HeadTooLarge on both paths
        assert run(_cframing.RequestFramer, raw, cuts, max_head) == run(framing.RequestFramer, raw, cuts, max_head), \
            (raw, cuts, max_head)


@pytest.mark.parametrize("cls", [framing.RequestFramer] + ([_cframing.RequestFramer] if _cframing else []),
                         ids=["pure"] + (["compiled"] if _cframing else []))
def test_one_call_per_head_with_lower_cased_names_and_llhttp_values(cls):
    raw = (b"POST /a?b=1 HTTP/1.1\r\nHost: h\r\nX-Ows:  v \t \r\nX-Empty:\r\nCONTENT-length: 5\r\n"
           b"Connection: x, Keep-Alive\r\n\r\nhello")
    calls, end = run(cls, raw)
    assert calls == [
        ("head", b"POST", b"/a?b=1", "1.1",
         ((b"host", b"h"), (b"x-ows", b"v \t "), (b"x-empty", b""), (b"content-length", b"5"),
          (b"connection", b"x, Keep-Alive")), True, False),
        ("body", b"hello"), ("complete",)]
    assert end == ("getters", b"POST", "1.1", True, False)
    # An unfinished head: `begin` at its first read, then the head once complete.
    calls, _ = run(cls, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", (5, 20))
    assert calls == [("begin",), ("head", b"GET", b"/", "1.1", ((b"host", b"h"),), True, False), ("complete",)]


@pytest.mark.parametrize("cls", [framing.RequestFramer] + ([_cframing.RequestFramer] if _cframing else []),
                         ids=["pure"] + (["compiled"] if _cframing else []))
def test_refusals_come_at_the_read_that_makes_the_head_impossible(cls):
    # A TLS ClientHello, a bare LF, a control byte: refused before any head end arrives.
    for raw in (b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.1\nHo", b"GET / HTTP/1.1\r\nX: a\x01", b"get / HT",
                b"GET / HTTP/1.1\r\n folded"):
        calls, end = run(cls, raw)
        assert end[0] == "HttpParserError", raw
    # The head limit: raw bytes, checked while the head is unfinished too.
    calls, end = run(cls, b"GET /" + b"a" * 100, max_head=64)
    assert end == ("HeadTooLarge", "request head too large")
    # An upgrade: the head, the message's end, then the offset of what follows it.
    raw = b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nrest"
    calls, end = run(cls, raw, (10,))
    assert calls[-1] == ("complete",) and calls[-2][-1] is True
    assert end == ("upgrade", (len(raw) - 10 - 4,))  # offset in the read that ended the head


def test_compiled_framer_is_built_where_a_compiler_is():
    """The install builds the compiled twin when a C compiler is there (CI has gcc)."""
    if NO_EXTENSIONS:
        assert not native.COMPILED and "EDGEPLANE_NO_EXTENSIONS" in native.WHY
        return
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the pure-Python twin is what runs")
    assert native.COMPILED, native.WHY
    assert native.RequestFramer is _cframing.RequestFramer


def test_version_and_start_line_name_the_path():
    out = subprocess.run([sys.executable, "-m", "edgeplane", "--version"], capture_output=True, text=True, check=True)
    assert native.describe() in out.stdout
    expected = "pure Python" if NO_EXTENSIONS or _cframing is None else "compiled"
    assert f"parser native ({expected}" in out.stdout


@pytest.mark.timeout(240)
@pytest.mark.parametrize("compiler", ["with", "without"])
def test_wheel_builds_with_and_without_a_compiler(tmp_path, compiler):
    """`pip wheel` of a copy of the source: with gcc the wheel holds the extension;
    with CC pointing at a compiler that fails, the build says so and still succeeds."""
    if NO_EXTENSIONS:
        pytest.skip("EDGEPLANE_NO_EXTENSIONS is set: this run is about the twin, not the build")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__", "*.egg-info"))
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    if compiler == "without":
        env["CC"] = "/bin/false"
        env["LDSHARED"] = "/bin/false"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("edgeplane-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    built = [n for n in names if n.startswith("edgeplane/http/_cframing") and n.endswith(".so")]
    assert "edgeplane/http/framing.py" in names
    if compiler == "with":
        assert built, names
    else:
        assert not built
        assert "the compiled framer was not built" in out.stdout + out.stderr


def _scan_trace(cls, data: bytes, cuts: tuple[int, ...]) -> tuple[list, object]:
    got: list[bytes] = []
    scanner = cls(got.append)
    bounds = [0, *cuts, len(data)]
    try:
        for a, b in zip(bounds, bounds[1:], strict=False):
            end = scanner.feed(data[a:b])
            if end >= 0:
                return got, a + end
    except HttpParserError as exc:
        return got, str(exc)
    return got, -1


@needs_compiled
def test_chunked_scanner_twins_agree_on_mutated_bodies():
    """`chunked.ChunkedScanner` and its compiled twin: the same chunk data handed over,
    the same end offset or the same error, on seeded mutations split at random."""
    from edgeplane.http.chunked import ChunkedScanner

    seeds = [b"5\r\nhello\r\n0\r\n\r\n", b'a;x=y;q="a \\"b"\r\n0123456789\r\n3\r\nabc\r\n0\r\nT: v\r\nU: w\r\n\r\n',
             b"1\r\nx\r\n" * 20 + b"0\r\n\r\n", b"000F\r\n" + b"y" * 15 + b"\r\n0;e\r\n\r\n"]
    pieces = [b"\r", b"\n", b"\r\n", b";", b"=", b'"', b"\\", b" ", b"\t", b"0", b"f", b"F", b"g", b":", b"\x00",
              b"\x7f", b"\x80", b"0" * 17, b"Content-Length: 1\r\n", b"x" * 1100]
    rng = random.Random(5)
    for _ in range(5000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(0, 3)):
            at = rng.randrange(len(data) + 1)
            if rng.random() < 0.5:
                data[at:at] = rng.choice(pieces)
            elif at < len(data):
                data[at : at + rng.randint(1, 3)] = rng.choice(pieces) if rng.random() < 0.5 else b""
        raw = bytes(data) + b"TAIL"
        cuts = tuple(sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randint(0, 5)))))
        assert _scan_trace(_cframing.ChunkedScanner, raw, cuts) == _scan_trace(ChunkedScanner, raw, cuts), (raw, cuts)
