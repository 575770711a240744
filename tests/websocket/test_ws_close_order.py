"""Close ordering after a protocol error (issue 11, item 7; `relay` invariant 10).

A client sends N valid text messages and then violates RFC 6455 in the same write. The
upstream answers each message after a small delay, so every reply is still in flight
when the gateway sees the violation. The client must get all N replies, in order, and
only then its close frame with the violation's code (1002, or 1007 for bad UTF-8); the
upstream must get the N messages, then a 1001 close, and nothing of the bad frame. In
the other direction, an upstream that breaks the protocol after N replies: the client
gets the N replies, then 1011.

Every test runs on uvloop and asyncio. The first tests run through the real gateway (a
raw-socket client with hand-built frames, a real WebSocket upstream behind an `http`
route); the last ones drive `start_relay` directly to reach the flush's bounds (time,
bytes, peers leaving), which the gateway config does not expose. The upstream is `OrderedEcho`: a sequential server
that handles its input strictly in order (echo each message after `delay`, answer a
close only after the echoes before it), like a single-threaded application loop.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import replace

import pytest
import uvloop
from wsproto.events import CloseConnection, Message, TextMessage

from conftest import base_config
from edgeplane import Gateway
from edgeplane.websocket.relay import RelaySettings, RelayStats, start_relay
from ws_peers import WsClient
from wsutil import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    Holder,
    HolderServer,
    PeerClosed,
    RawFrame,
    WSPeer,
    WSServer,
    build_frame,
    close_payload,
    parse_frames,
)

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("no_logged_exceptions")]

N = 5
DELAY = 0.02  # per reply: N * DELAY stays far below the 1 s flush bound
WAIT = 5.0  # bound on any single wait in these tests
TEST_TIMEOUT = 20.0
MESSAGES = [f"m{i}-é" for i in range(N)]  # non-ASCII: payload counted and relayed as UTF-8
LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def on_loops(fn):
    """Run an ``async def`` test on a fresh loop of each kind (uvloop is production,
    asyncio the reference: their transports differ in when a close after a write reaches
    the wire). A sync test for pytest, so the loop choice stays in this module."""
    sig = inspect.signature(fn)

    def wrapper(loop_kind, *args, **kwargs):
        with asyncio.Runner(loop_factory=LOOPS[loop_kind]) as runner:
            runner.run(asyncio.wait_for(fn(*args, **kwargs), TEST_TIMEOUT))

    wrapper.__name__ = wrapper.__qualname__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    wrapper.__signature__ = sig.replace(parameters=[
        inspect.Parameter("loop_kind", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *sig.parameters.values()])
    wrapper.pytestmark = list(getattr(fn, "pytestmark", []))
    return pytest.mark.parametrize("loop_kind", list(LOOPS))(wrapper)



class OrderedEcho:
    """A `WSServer` handler: echoes each data frame after ``delay`` seconds and answers a
    close only once every echo before it is sent (``reply_close=False``: never). Echoes
    are written as raw frames: wsproto has parsed a close that came in the same read (and
    would refuse data), but this server has not "read" it yet. After ``after`` complete
    messages it sends ``violation`` (raw bytes) and echoes nothing more. ``on_close``
    (raw frames) is sent right after receiving a close, before the reply. ``seen``
    records what arrived, in order: ``(kind, data, message_finished)`` for data frames,
    ``("close", code, reason)`` for a close, ``("error", code, None)`` for bytes its
    wsproto could not parse, ``("lost", None, None)`` for TCP ending first."""

    def __init__(self, delay: float = DELAY, *, violation: bytes = b"", after: int = N,
                 reply_close: bool = True, on_close: bytes = b"") -> None:
        self.delay = delay
        self.violation = violation
        self.after = after
        self.reply_close = reply_close
        self.on_close = on_close
        self.seen: list[tuple] = []
        self.peer: WSPeer | None = None
        self.done = asyncio.get_running_loop().create_future()

    async def __call__(self, peer: WSPeer) -> None:
        self.peer = peer
        try:
            await self._serve(peer)
        except PeerClosed:
            self.seen.append(("lost", None, None))
        finally:
            if not self.done.done():
                self.done.set_result(None)

    async def _serve(self, peer: WSPeer) -> None:
        finished = 0
        in_message = False  # echoing a fragmented message: its next frames are OP_CONT
        while True:
            ev = await peer.recv(WAIT)
            if isinstance(ev, Message):
                kind = "text" if isinstance(ev, TextMessage) else "bytes"
                self.seen.append((kind, ev.data, ev.message_finished))
                await asyncio.sleep(self.delay)
                if finished >= self.after or peer.lost:
                    continue
                op = OP_CONT if in_message else OP_TEXT if kind == "text" else OP_BINARY
                peer.send_raw(build_frame(op, ev.data, fin=ev.message_finished, mask=False))
                in_message = not ev.message_finished
                if ev.message_finished:
                    finished += 1
                    if finished == self.after and self.violation:
                        peer.send_raw(self.violation)
            elif isinstance(ev, CloseConnection):
                if peer.protocol_error is ev:
                    self.seen.append(("error", ev.code, None))
                    return
                self.seen.append(("close", ev.code, ev.reason))
                if self.on_close:
                    peer.send_raw(self.on_close)
                if self.reply_close:
                    peer.close(ev.code, ev.reason)
                return


def echoed(messages: list[str] = MESSAGES) -> list[tuple]:
    return [("text", m, True) for m in messages]


# -- a raw client ----------------------------------------------------------------------------

async def read_frames(reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None = None,
                      *, reply: bool = False) -> tuple[list[RawFrame], RawFrame, list[RawFrame]]:
    """Frames up to the first close frame, the close, and any frames after it until the
    gateway closes TCP. ``reply``: answer the close (the client's half of the handshake)."""
    buf = b""
    rest: list[RawFrame] = []
    before: list[RawFrame] = []
    close: RawFrame | None = None
    async with asyncio.timeout(WAIT):
        while close is None:
            data = await reader.read(65536)
            assert data, f"TCP closed before a close frame; frames so far: {before}"
            frames, buf = parse_frames(buf + data)
            for i, f in enumerate(frames):
                if f.opcode == OP_CLOSE:
                    close = f
                    frames, rest = frames[:i], frames[i + 1:]
                    before += frames
                    break
            else:
                before += frames
        if reply and writer is not None:
            writer.write(build_frame(OP_CLOSE, close_payload(close.close_code)))
        tail = buf + await reader.read()  # to EOF: the gateway closes the connection
    after, _ = parse_frames(tail)
    return before, close, rest + after


def texts(frames: list[RawFrame]) -> list[str]:
    assert all(f.fin and not f.masked and f.rsv == 0 and f.opcode == OP_TEXT for f in frames), frames
    return [f.payload.decode() for f in frames]


def valid_messages() -> bytes:
    return b"".join(build_frame(OP_TEXT, m) for m in MESSAGES)


# -- through the gateway -----------------------------------------------------------------

def ws_config(port: int) -> dict:
    cfg = base_config(routes=[{"route": "GET /ws", "integration": {"type": "http", "upstream": "chat"}}])
    cfg["upstreams"] = {"chat": {"targets": [f"http://127.0.0.1:{port}"]}}
    return cfg


class Proxied:
    """A raw `WsClient` -> a real `Gateway` (an `http` route) -> an `OrderedEcho` upstream."""

    def __init__(self, upstream: OrderedEcho) -> None:
        self.upstream = upstream
        self.server = WSServer(upstream, handshake=True, echo=False, auto_close=False)
        self.gw: Gateway | None = None
        self.client: WsClient | None = None

    async def __aenter__(self) -> WsClient:
        await self.server.__aenter__()
        try:
            self.gw = Gateway(ws_config(self.server.port))
            await self.gw.start()
            self.client = await WsClient.connect(self.gw.addresses[0])
            assert self.client.status == 101
        except BaseException:
            await self.__aexit__(None)
            raise
        return self.client

    async def __aexit__(self, *exc) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.gw is not None:
            await self.gw.stop(drain_timeout=1.0)
        await self.server.__aexit__(None, None, None)


# (bytes after the N valid messages, close code, the valid prefix the upstream may get)
CLIENT_VIOLATIONS = {
    "rsv1": (build_frame(OP_TEXT, "x", rsv=4), 1002, []),
    "rsv2": (build_frame(OP_TEXT, "x", rsv=2), 1002, []),
    "rsv3": (build_frame(OP_BINARY, b"x", rsv=1), 1002, []),
    **{f"opcode-{op:#x}": (build_frame(op, b"x"), 1002, []) for op in (*range(0x3, 0x8), *range(0xB, 0x10))},
    "bad-utf8": (build_frame(OP_TEXT, b"ok \xff\xfe"), 1007, []),
    "bad-utf8-in-continuation": (build_frame(OP_TEXT, "abc", fin=False) + build_frame(OP_CONT, b"\xc3\x28"),
                                 1007, [("text", "abc", False)]),
    "continuation-without-start": (build_frame(OP_CONT, b"x"), 1002, []),
    "new-message-inside-fragmented": (build_frame(OP_TEXT, "a", fin=False) + build_frame(OP_TEXT, "b"),
                                      1002, [("text", "a", False)]),
    "ping-126-bytes": (build_frame(OP_PING, b"p" * 126), 1002, []),
    "fragmented-ping": (build_frame(OP_PING, b"p", fin=False), 1002, []),
    "unmasked": (build_frame(OP_TEXT, "x", mask=False), 1002, []),
    "close-code-1005": (build_frame(OP_CLOSE, close_payload(1005)), 1002, []),
}
REASONS = {1002: "protocol error", 1007: "invalid frame payload data"}


@on_loops
@pytest.mark.parametrize("case", list(CLIENT_VIOLATIONS))
async def test_client_violation_closes_the_client_after_the_replies_in_flight(case):
    violation, code, prefix = CLIENT_VIOLATIONS[case]
    upstream = OrderedEcho()
    async with Proxied(upstream) as client:
        # one write: the gateway sees the violation before any reply can exist
        client.send_raw(valid_messages() + violation + build_frame(OP_TEXT, "after the violation"))
        before, close, after = await read_frames(client.reader)
        assert texts(before) == MESSAGES  # every reply, in order, before the close
        assert (close.close_code, close.close_reason) == (code, REASONS[code])
        assert after == []
        await asyncio.wait_for(upstream.done, WAIT)
        # the messages, a valid first fragment at most, then 1001: nothing of the bad frame
        assert upstream.seen == echoed() + prefix + [("close", 1001, "going away")]


UPSTREAM_VIOLATIONS = {
    "rsv1": (build_frame(OP_TEXT, "x", mask=False, rsv=4), 1002),
    "opcode-0x3": (build_frame(0x3, b"x", mask=False), 1002),
    "opcode-0xb": (build_frame(0xB, b"x", mask=False), 1002),
    "bad-utf8": (build_frame(OP_TEXT, b"\xff", mask=False), 1007),
    "masked": (build_frame(OP_TEXT, "x", mask=True), 1002),
    "ping-126-bytes": (build_frame(OP_PING, b"p" * 126, mask=False), 1002),
}


@on_loops
@pytest.mark.parametrize("case", list(UPSTREAM_VIOLATIONS))
async def test_upstream_violation_closes_the_client_after_what_it_relayed(case):
    violation, code = UPSTREAM_VIOLATIONS[case]
    upstream = OrderedEcho(violation=violation, after=N - 2)
    async with Proxied(upstream) as client:
        client.send_raw(valid_messages())
        before, close, after = await read_frames(client.reader, client.writer, reply=True)
        assert texts(before) == MESSAGES[:N - 2]  # what it sent before the bad frame
        assert (close.close_code, close.close_reason) == (1011, "upstream error")
        assert after == []
        await asyncio.wait_for(upstream.done, WAIT)
        closes = [s for s in upstream.seen if s[0] == "close"]
        assert closes == [("close", code, REASONS[code])]


# -- the relay itself: the flush's bounds ---------------------------------------------------

SETTINGS = RelaySettings(idle_timeout=10.0, max_lifetime=30.0, ping_interval=0.0, send_timeout=5.0,
                         close_timeout=4.0)
RSV1 = build_frame(OP_TEXT, "x", rsv=4)


class Relayed:
    """A client `WSPeer` -> `start_relay` -> an `OrderedEcho` upstream, frames only."""

    def __init__(self, upstream: OrderedEcho, settings: RelaySettings = SETTINGS) -> None:
        self.upstream = upstream
        self.settings = settings
        self.server = WSServer(upstream, echo=False, auto_close=False)
        self.gw = HolderServer()
        self.closed: asyncio.Future[RelayStats]  # set on entry

    async def __aenter__(self) -> Relayed:
        loop = asyncio.get_running_loop()
        await self.server.__aenter__()
        await self.gw.__aenter__()
        ct, self.client = await loop.create_connection(
            lambda: WSPeer("client", record_raw=True, auto_close=False), "127.0.0.1", self.gw.port)
        holder = await self.gw.accepted(ct.get_extra_info("sockname")[1])
        ut, _ = await loop.create_connection(Holder, "127.0.0.1", self.server.port)
        await self.server.accepted(ut.get_extra_info("sockname")[1])
        self.closed = loop.create_future()
        self.relay = start_relay(loop, holder.transport, ut, settings=self.settings,
                                 on_closed=self.closed.set_result)
        return self

    async def client_frames(self) -> tuple[list[RawFrame], RawFrame | None]:
        """Once the gateway closed the client: the frames it got before its close frame,
        and that close (None: none came). Nothing may follow the close."""
        await self.client.wait_lost(WAIT)
        frames = self.client.raw_frames()
        at = [i for i, f in enumerate(frames) if f.opcode == OP_CLOSE]
        if not at:
            return frames, None
        assert at == [len(frames) - 1], frames
        return frames[:-1], frames[-1]

    async def __aexit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                await asyncio.wait_for(asyncio.shield(self.closed), WAIT)
        finally:
            if not self.relay.closed:
                self.relay.abort()
            if not self.client.lost:
                self.client.abort()
            await self.gw.__aexit__(None, None, None)
            await self.server.__aexit__(None, None, None)


@on_loops
async def test_flush_ends_at_its_timeout_when_the_upstream_never_replies():
    # close_timeout far past WAIT: only the flush's own bound can close the client in time
    settings = replace(SETTINGS, close_timeout=60.0, error_flush_timeout=0.2)
    async with Relayed(OrderedEcho(delay=0, reply_close=False), settings) as r:
        r.client.send_raw(valid_messages() + RSV1)
        before, close = await r.client_frames()
        assert texts(before) == MESSAGES
        assert close is not None and close.close_code == 1002
        r.upstream.peer.transport.close()  # it never replies: let the relay end now
        stats = await asyncio.wait_for(asyncio.shield(r.closed), WAIT)
        assert stats.closed_by == "gateway:client_protocol_error"
        assert (stats.close_code_client, stats.close_code_upstream) == (1002, 1001)
        assert stats.messages_in == N and stats.messages_out == N
    assert r.upstream.seen == echoed() + [("close", 1001, "going away")]


@on_loops
async def test_frames_sent_after_the_gateways_close_are_flushed_up_to_the_byte_bound():
    # The upstream, on receiving the 1001, still sends three 6-byte messages (RFC 6455
    # allows data until it sends its own close) then replies. With 10 bytes allowed,
    # only the first fits: the flush ends there, the rest is dropped.
    late = b"".join(build_frame(OP_TEXT, c * 6, mask=False) for c in "abc")
    settings = replace(SETTINGS, error_flush_bytes=10)
    async with Relayed(OrderedEcho(delay=0, after=0, on_close=late), settings) as r:
        r.client.send_raw(build_frame(OP_TEXT, "hello") + RSV1)
        before, close = await r.client_frames()
        assert texts(before) == ["aaaaaa"]
        assert close is not None and close.close_code == 1002
    assert r.upstream.seen == [("text", "hello", True), ("close", 1001, "going away")]


# For the flush to end on an event, not at its timeout, the timeout is far past WAIT.
PATIENT = replace(SETTINGS, close_timeout=60.0, error_flush_timeout=25.0)


@on_loops
async def test_flush_ends_with_the_upstreams_close_reply():
    async with Relayed(OrderedEcho(), PATIENT) as r:
        r.client.send_raw(valid_messages() + RSV1)
        before, close = await r.client_frames()
        assert texts(before) == MESSAGES
        assert close is not None and close.close_code == 1002
    assert r.upstream.seen == echoed() + [("close", 1001, "going away")]


@on_loops
async def test_flush_never_outlives_half_the_close_timeout():
    # a flush bound longer than close_timeout: the client must still get its close
    # frame before the relay's teardown aborts what is left
    settings = replace(SETTINGS, close_timeout=0.4, error_flush_timeout=60.0)
    async with Relayed(OrderedEcho(reply_close=False), settings) as r:
        r.client.send_raw(build_frame(OP_TEXT, "x") + RSV1)
        before, close = await r.client_frames()
        assert texts(before) == ["x"]
        assert close is not None and close.close_code == 1002


@on_loops
async def test_an_oversized_message_ends_the_flush_and_nothing_of_it_follows():
    late = b"".join(build_frame(OP_TEXT, m, mask=False) for m in ("ok", "x" * 20, "late"))
    settings = replace(PATIENT, max_message_bytes=8)
    async with Relayed(OrderedEcho(after=0, on_close=late), settings) as r:
        r.client.send_raw(build_frame(OP_TEXT, "hi") + RSV1)
        before, close = await r.client_frames()
        assert texts(before) == ["ok"]
        assert close is not None and close.close_code == 1002


@on_loops
async def test_upstream_violation_during_the_flush():
    # the client keeps its own violation's code; the upstream is failed in turn
    late = build_frame(OP_TEXT, "ok", mask=False) + build_frame(OP_TEXT, b"\xff", mask=False)
    async with Relayed(OrderedEcho(after=0, on_close=late, reply_close=False), PATIENT) as r:
        r.client.send_raw(build_frame(OP_TEXT, "hi") + build_frame(OP_TEXT, b"\xff"))
        before, close = await r.client_frames()
        assert texts(before) == ["ok"]
        assert close is not None and close.close_code == 1007
        stats = await asyncio.wait_for(asyncio.shield(r.closed), WAIT)
        assert (stats.close_code_client, stats.close_code_upstream) == (1007, 1001)
        assert stats.closed_by == "gateway:client_protocol_error"


@on_loops
async def test_flush_ends_when_the_upstream_goes_away_without_a_close():
    upstream = OrderedEcho(reply_close=False)
    async with Relayed(upstream, PATIENT) as r:
        r.client.send_raw(valid_messages() + RSV1)
        await asyncio.wait_for(upstream.done, WAIT)  # all echoes sent, then the 1001 seen
        upstream.peer.transport.close()
        before, close = await r.client_frames()
        assert texts(before) == MESSAGES
        assert close is not None and close.close_code == 1002


@on_loops
async def test_client_leaving_during_the_flush_ends_it():
    async with Relayed(OrderedEcho(reply_close=False), PATIENT) as r:
        r.client.send_raw(build_frame(OP_TEXT, "x") + RSV1)
        await asyncio.wait_for(r.upstream.done, WAIT)  # the upstream has its 1001
        r.client.abort()
        await r.client.wait_lost()
        # frames the upstream still sends go nowhere; its own close ends the relay
        r.upstream.peer.send_raw(build_frame(OP_TEXT, "late", mask=False))
        r.upstream.peer.close(1001, "going away")
        stats = await asyncio.wait_for(asyncio.shield(r.closed), WAIT)
        assert stats.close_code_client == 1006 and stats.close_code_upstream == 1001
        assert stats.closed_by == "gateway:client_protocol_error"
        assert stats.messages_out == 1  # the echo of "x"; "late" had nowhere to go


@on_loops
async def test_no_flush_when_disabled():
    settings = replace(SETTINGS, error_flush_timeout=0)
    async with Relayed(OrderedEcho(delay=0.05), settings) as r:
        r.client.send_raw(valid_messages() + RSV1)
        before, close = await r.client_frames()
        assert before == [] and close is not None and close.close_code == 1002


def test_flush_settings_are_validated():
    for bad in ({"error_flush_timeout": -1}, {"error_flush_timeout": float("inf")},
                {"error_flush_bytes": -1}, {"error_flush_bytes": 1.5}):
        with pytest.raises(ValueError):
            RelaySettings(**bad)
