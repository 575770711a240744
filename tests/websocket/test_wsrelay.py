"""The WebSocket relay (`edgeplane.wsrelay`) between real loopback peers, on uvloop and asyncio.

Harness (see `Harness.open`): the test client is a wsproto `WSPeer` (tests/wsutil.py)
that connects to a `HolderServer` standing in for the gateway's client listener; the
gateway side then connects to a real wsproto upstream (`WSServer`, echo unless told) and
hands both transports to `start_relay`. By default no HTTP is spoken: frames start right
after TCP connect, since the relay only starts after the handshakes. `handshake=True`
runs a minimal real upgrade on both legs (wsutil.accept_upgrade / request_upgrade) and
passes whatever arrived after each 101 as the tails.

Every test runs on both event loops (uvloop is production, asyncio the reference), has
a timeout, uses short relay timeouts, and checks at the end that no relay, transport or
peer is left open.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from dataclasses import replace

import pytest
import uvloop
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from edgeplane.websocket.relay import Relay, RelaySettings, RelayStats, start_relay
from wsutil import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    Holder,
    HolderServer,
    WSPeer,
    WSServer,
    accept_upgrade,
    build_frame,
    close_payload,
    request_upgrade,
)

pytestmark = pytest.mark.usefixtures("no_logged_exceptions")

FAST = RelaySettings(idle_timeout=5.0, max_lifetime=30.0, ping_interval=0.0, pong_timeout=1.0,
                     send_timeout=2.0, close_timeout=1.0)
LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
TEST_TIMEOUT = 15.0


def on_loops(*kinds: str):
    """Run an ``async def`` test on a fresh loop of each kind (a sync test for pytest, so
    the loop choice stays in this module)."""
    kinds = kinds or tuple(LOOPS)

    def deco(fn):
        sig = inspect.signature(fn)
        params = [inspect.Parameter("loop_kind", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += list(sig.parameters.values())

        def wrapper(loop_kind, *args, **kwargs):
            with asyncio.Runner(loop_factory=LOOPS[loop_kind]) as runner:
                runner.run(asyncio.wait_for(fn(*args, **kwargs), TEST_TIMEOUT))

        wrapper.__name__ = fn.__name__
        wrapper.__qualname__ = fn.__qualname__
        wrapper.__doc__ = fn.__doc__
        wrapper.__module__ = fn.__module__
        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.pytestmark = list(getattr(fn, "pytestmark", []))  # e.g. parametrize
        return pytest.mark.parametrize("loop_kind", kinds)(wrapper)

    return deco


# -- harness -------------------------------------------------------------------------------

class Link:
    """One relayed connection: the test's two peers and the relay between them."""

    def __init__(self, client: WSPeer, upstream: WSPeer, relay: Relay, gw_client, gw_upstream,
                 done: asyncio.Future, calls: list) -> None:
        self.client = client
        self.upstream = upstream
        self.relay = relay
        self.gw_client = gw_client  # the gateway-side transports the relay took over
        self.gw_upstream = gw_upstream
        self._done = done
        self.calls = calls  # every on_closed call

    async def done(self, timeout: float = 5.0) -> RelayStats:
        return await asyncio.wait_for(asyncio.shield(self._done), timeout)


class Harness:
    def __init__(self, **upstream_defaults) -> None:
        self.upstream_defaults = upstream_defaults
        self.up = WSServer(**upstream_defaults)
        self.gw = HolderServer()
        self.links: list[Link] = []
        self.client_peers: list[WSPeer] = []

    async def __aenter__(self) -> Harness:
        await self.up.__aenter__()
        await self.gw.__aenter__()
        return self

    async def open(self, settings: RelaySettings = FAST, *, handshake: bool = False,
                   client: dict | None = None, upstream: dict | None = None,
                   client_tail: bytes = b"", upstream_tail: bytes = b"") -> Link:
        """Connect a client through a new relay to the upstream. ``client``/``upstream``
        are WSPeer keyword arguments (concurrent opens must not differ in ``upstream``)."""
        loop = asyncio.get_running_loop()
        ct, cpeer = await loop.create_connection(
            lambda: WSPeer("client", handshake=handshake, **(client or {})),
            "127.0.0.1", self.gw.port)
        self.client_peers.append(cpeer)
        holder = await self.gw.accepted(ct.get_extra_info("sockname")[1])
        c_tail = await accept_upgrade(holder) if handshake else b""
        await asyncio.wait_for(cpeer.opened, 5)
        self.up.peer_kwargs = {"echo": True, **self.upstream_defaults, "handshake": handshake,
                               **(upstream or {})}
        ut, uholder = await loop.create_connection(Holder, "127.0.0.1", self.up.port)
        u_tail = await request_upgrade(uholder) if handshake else b""
        upeer = await self.up.accepted(ut.get_extra_info("sockname")[1])
        done = loop.create_future()
        calls: list[RelayStats] = []

        def on_closed(stats: RelayStats) -> None:
            calls.append(stats)
            if not done.done():
                done.set_result(stats)

        relay = start_relay(loop, holder.transport, ut, settings=settings,
                            client_tail=c_tail + holder.take_tail() + client_tail,
                            upstream_tail=u_tail + uholder.take_tail() + upstream_tail,
                            on_closed=on_closed)
        link = Link(cpeer, upeer, relay, holder.transport, ut, done, calls)
        self.links.append(link)
        return link

    def assert_no_leaks(self) -> None:
        for link in self.links:
            assert link.relay.closed
            assert len(link.calls) == 1
            assert link.gw_client.is_closing() and link.gw_upstream.is_closing()
            assert link.upstream.lost
        for peer in self.client_peers:
            assert peer.lost or peer.eof or peer.transport.is_closing()

    async def __aexit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                # every test ends its connections; wait for the peers to see it
                await asyncio.gather(*(link.done() for link in self.links))
                await asyncio.gather(*(p.wait_lost() for p in self.client_peers if not p.lost
                                       and not p.transport.is_closing()))
                self.assert_no_leaks()
        finally:
            for link in self.links:
                if not link.relay.closed:
                    link.relay.close()
            for peer in self.client_peers:
                if not peer.lost:
                    peer.transport.abort()
            await self.gw.__aexit__(None, None, None)
            await self.up.__aexit__(None, None, None)


async def until_close(peer: WSPeer) -> tuple[list, CloseConnection]:
    """The events a peer receives before its close, and the close."""
    seen = []
    while True:
        ev = await peer.recv()
        if isinstance(ev, CloseConnection):
            return seen, ev
        seen.append(ev)


async def close_normally(link: Link) -> RelayStats:
    link.client.close(1000, "bye")
    await link.client.wait_lost()
    return await link.done()


# -- data ------------------------------------------------------------------------------------

@on_loops()
@pytest.mark.parametrize("handshake", [False, True], ids=["frames-only", "with-upgrade"])
async def test_echo_text_and_binary(handshake):
    async with Harness() as h:
        link = await h.open(handshake=handshake)
        c = link.client
        for msg in ["hello", "wörld ✓", "", b"\x00\x01\xff", b"", b"z" * 70_000, "t" * 200]:
            (c.send_text if isinstance(msg, str) else c.send_bytes)(msg)
            got = await c.recv_message()
            assert got == msg and type(got) is type(msg)
        stats = await close_normally(link)
        assert stats.messages_in == stats.messages_out == 7


@on_loops()
async def test_tails_are_processed_first():
    """Bytes that came with each 101 (the tails) are relayed before anything else."""
    def welcome(peer: WSPeer) -> None:
        peer.send_text("welcome")  # written right behind the 101: arrives as the tail

    async with Harness() as h:
        early = build_frame(OP_TEXT, "early")
        link = await h.open(handshake=True, upstream={"on_open": welcome, "echo": False},
                            client_tail=early)
        assert await link.client.recv_message() == "welcome"
        assert await link.upstream.recv_message() == "early"
        await close_normally(link)


@on_loops()
async def test_fragmented_messages_keep_their_frames():
    async with Harness() as h:
        link = await h.open(client={"record_raw": True})
        c, u = link.client, link.upstream
        c.send_text("hel", fin=False)
        c.send_text("lo ", fin=False)
        c.send_text("wörld", fin=True)
        c.send_bytes(b"\x01\x02", fin=False)
        c.send_bytes(b"\x03", fin=True)
        frames = [await u.recv() for _ in range(5)]
        assert [(type(f), f.data, f.message_finished) for f in frames] == [
            (TextMessage, "hel", False), (TextMessage, "lo ", False), (TextMessage, "wörld", True),
            (BytesMessage, b"\x01\x02", False), (BytesMessage, b"\x03", True)]
        back = [await c.recv() for _ in range(5)]
        assert [(type(f), f.data, f.message_finished) for f in back] == \
            [(type(f), f.data, f.message_finished) for f in frames]
        wire = [(f.opcode, f.fin, f.masked) for f in c.raw_frames()]
        assert wire == [(OP_TEXT, False, False), (OP_CONT, False, False), (OP_CONT, True, False),
                        (OP_BINARY, False, False), (OP_CONT, True, False)]
        stats = await close_normally(link)
        assert stats.messages_in == 2 and stats.bytes_in == len("hello wörld".encode()) + 3


@on_loops()
async def test_text_fragment_boundary_inside_a_code_point():
    """Text is validated on the way in; a fragment boundary that splits a code point is
    moved to the code point (the message is unchanged, so are its fragment count and FINs)."""
    async with Harness() as h:
        link = await h.open(upstream={"echo": False})
        link.client.send_raw(build_frame(OP_TEXT, b"a\xe2\x82", fin=False)
                             + build_frame(OP_CONT, b"\xac!", fin=True))
        got = [await link.upstream.recv() for _ in range(2)]
        assert [(e.data, e.message_finished) for e in got] == [("a", False), ("\u20ac!", True)]
        stats = await close_normally(link)
        assert stats.bytes_in == len("a\u20ac!".encode())


@on_loops()
async def test_frame_split_across_reads_is_relayed_as_one_frame():
    async with Harness() as h:
        link = await h.open(upstream={"record_raw": True, "echo": False})
        payload = bytes(range(256)) * 400  # 100 KiB, one frame
        frame = build_frame(OP_BINARY, payload)
        link.client.send_raw(frame[:3000])
        await asyncio.sleep(0.05)  # pacing only: the two halves arrive in separate reads
        link.client.send_raw(frame[3000:])
        assert await link.upstream.recv_message() == payload
        wire = link.upstream.raw_frames()
        assert [(f.opcode, f.fin, f.masked, len(f.payload)) for f in wire] == \
            [(OP_BINARY, True, True, len(payload))]
        await close_normally(link)


@on_loops()
async def test_control_frames_interleaved_with_fragments():
    async with Harness() as h:
        link = await h.open(upstream={"echo": False})
        c, u = link.client, link.upstream
        c.send_text("one-", fin=False)
        c.ping(b"p1")
        c.send_text("two-", fin=False)
        c.send(Pong(b"unsolicited"))
        c.send_text("end", fin=True)
        got = [await u.recv() for _ in range(3)]
        assert [(f.data, f.message_finished) for f in got] == \
            [("one-", False), ("two-", False), ("end", True)]
        assert isinstance(await c.recv(), Pong)  # answered by the gateway
        # and the other way: the upstream pings between its fragments
        u.send_text("u1", fin=False)
        u.ping(b"up")
        u.send_text("u2", fin=True)
        assert await c.recv_message() == "u1u2"
        pong = await u.recv()
        assert isinstance(pong, Pong) and pong.payload == b"up"
        c.send_text("sync")
        assert await u.recv_message() == "sync"
        assert not any(isinstance(e, (Ping, Pong)) for e in list(u.events) + list(c.events))
        await close_normally(link)


@on_loops()
async def test_ping_answered_by_gateway_and_not_forwarded():
    async with Harness() as h:
        link = await h.open(upstream={"echo": False})
        c, u = link.client, link.upstream
        c.ping(b"abc")
        ev = await c.recv()
        assert isinstance(ev, Pong) and ev.payload == b"abc"
        u.ping(b"xyz")
        ev = await u.recv()
        assert isinstance(ev, Pong) and ev.payload == b"xyz"
        c.send_text("marker")
        assert await u.recv_message() == "marker"  # came after the ping: nothing before it
        u.send_text("marker2")
        assert await c.recv_message() == "marker2"
        assert not c.events and not u.events
        await close_normally(link)


# -- limits ------------------------------------------------------------------------------------

@on_loops()
@pytest.mark.parametrize("sender", ["client", "upstream"])
@pytest.mark.parametrize("fragmented", [False, True])
async def test_oversized_message(sender, fragmented):
    settings = replace(FAST, max_message_bytes=1000)
    async with Harness() as h:
        link = await h.open(settings, upstream={"echo": sender == "client"})
        src, dst = (link.client, link.upstream) if sender == "client" else (link.upstream, link.client)
        src.send_bytes(b"a" * 1000)  # exactly the limit is fine
        assert await dst.recv_message() == b"a" * 1000
        if fragmented:
            for _ in range(3):
                src.send_bytes(b"b" * 400, fin=False)
        else:
            src.send_bytes(b"b" * 1001)
        close = await src.recv_close()
        assert (close.code, close.reason) == (1009, "message too big")
        before, close = await until_close(dst)
        assert close.code == 1001
        # the fragments within the limit were relayed, nothing from the one past it
        assert [(e.data, e.message_finished) for e in before] == \
            ([(b"b" * 400, False)] * 2 if fragmented else [])
        stats = await link.done()
        assert stats.closed_by == "gateway:message_too_big"
        assert (stats.close_code_client, stats.close_code_upstream) == \
            ((1009, 1001) if sender == "client" else (1001, 1009))
        assert stats.error == f"{sender} message exceeded 1000 bytes"


@on_loops()
async def test_message_rate_limit():
    settings = replace(FAST, messages_per_second=0.5, message_burst=3)
    async with Harness() as h:
        link = await h.open(settings, upstream={"echo": False})
        c, u = link.client, link.upstream
        for i in range(3):
            c.send_text(f"m{i}", fin=False)  # a message counts once, at its first frame
            c.send_text("!", fin=True)
        for i in range(3):
            assert await u.recv_message() == f"m{i}!"
        c.send_text("one too many")
        close = await c.recv_close()
        assert (close.code, close.reason) == (1008, "message rate exceeded")
        before, close = await until_close(u)
        assert close.code == 1001 and before == []  # the refused message was not relayed
        stats = await link.done()
        assert stats.closed_by == "gateway:rate_limited" and stats.messages_in == 3


# -- liveness and timeouts --------------------------------------------------------------------

@on_loops()
async def test_keepalive_pings_a_silent_side_and_it_stays_up():
    settings = replace(FAST, ping_interval=0.1, pong_timeout=0.15)
    async with Harness() as h:
        link = await h.open(settings)
        c, u = link.client, link.upstream
        for _ in range(3):  # three keep-alive rounds answered by the client's auto-pong
            assert isinstance(await c.recv(), Ping)
        assert any(isinstance(e, Ping) for e in u.events) or isinstance(await u.recv(), Ping)
        c.send_text("still here")
        assert await c.recv_message() == "still here"
        assert not link.relay.closed and link.relay.stats.closed_by is None
        await close_normally(link)


@on_loops()
@pytest.mark.parametrize("dead", ["client", "upstream"])
async def test_dead_peer_detected(dead):
    settings = replace(FAST, ping_interval=0.1, pong_timeout=0.2)
    async with Harness() as h:
        link = await h.open(settings, client={"auto_pong": dead != "client"},
                            upstream={"auto_pong": dead != "upstream"})
        dead_peer, live = (link.client, link.upstream) if dead == "client" else \
            (link.upstream, link.client)
        close = await live.recv_close()
        assert close.code == 1001
        stats = await link.done()
        assert stats.closed_by == "gateway:ping_timeout"
        assert stats.error == f"{dead} did not answer a ping within 0.2s"
        assert getattr(stats, f"close_code_{dead}") == 1006
        await dead_peer.wait_lost()
        assert dead_peer.close_received is None  # it got a ping, then the connection dropped
        assert any(isinstance(e, Ping) for e in dead_peer.events)


@on_loops()
async def test_idle_timeout_ignores_pings():
    settings = replace(FAST, idle_timeout=0.3, ping_interval=0.05, pong_timeout=0.5)
    async with Harness() as h:
        link = await h.open(settings)
        link.client.send_text("one")
        assert await link.client.recv_message() == "one"
        for peer in (link.client, link.upstream):
            close = await peer.recv_close()
            assert (close.code, close.reason) == (1001, "idle timeout")
        stats = await link.done()
        assert stats.closed_by == "gateway:idle_timeout"
        assert stats.close_code_client == stats.close_code_upstream == 1001


@on_loops()
async def test_max_lifetime_despite_traffic():
    settings = replace(FAST, idle_timeout=0.2, max_lifetime=0.5)
    async with Harness() as h:
        link = await h.open(settings)
        c = link.client
        while c.close_received is None:
            c.send_text("tick")
            await asyncio.sleep(0.03)  # traffic pacing, well inside the idle timeout
        ev = await c.recv_close()
        assert (ev.code, ev.reason) == (1001, "connection lifetime exceeded")
        assert (await link.upstream.recv_close()).code == 1001
        stats = await link.done()
        assert stats.closed_by == "gateway:max_lifetime" and stats.messages_in > 3


# -- close handshakes ---------------------------------------------------------------------------

@on_loops()
async def test_client_initiated_close_relays_codes_and_reasons():
    async with Harness() as h:
        link = await h.open(upstream={"close_reply": (1000, "ok from upstream")})
        c, u = link.client, link.upstream
        c.close(4000, "client says bye")
        got = await u.recv_close()
        assert (got.code, got.reason) == (4000, "client says bye")
        reply = await c.recv_close()
        assert (reply.code, reply.reason) == (1000, "ok from upstream")
        await c.wait_lost()
        assert c.eof  # the gateway (server side) closed the client's TCP connection
        stats = await link.done()
        assert stats.closed_by == "client" and stats.error is None
        assert stats.close_code_client == 4000 and stats.close_code_upstream == 4000


@on_loops()
async def test_upstream_initiated_close_relays_codes_and_reasons():
    async with Harness() as h:
        link = await h.open(client={"close_reply": (1000, "client ok")})
        c, u = link.client, link.upstream
        u.close(4001, "upstream going")
        got = await c.recv_close()
        assert (got.code, got.reason) == (4001, "upstream going")
        reply = await u.recv_close()
        assert (reply.code, reply.reason) == (1000, "client ok")
        stats = await link.done()
        assert stats.closed_by == "upstream"
        assert stats.close_code_client == 4001 and stats.close_code_upstream == 4001
        await c.wait_lost()


@on_loops()
async def test_close_without_status_code_is_forwarded_empty():
    async with Harness() as h:
        link = await h.open(upstream={"record_raw": True})
        link.client.close(None)
        got = await link.upstream.recv_close()
        assert got.code == 1005
        assert link.upstream.raw_close().payload == b""
        assert (await link.client.recv_close()).code == 1005
        stats = await link.done()
        assert stats.close_code_client == 1005


@on_loops()
async def test_unanswered_close_is_echoed_after_close_timeout():
    settings = replace(FAST, close_timeout=0.3)
    async with Harness() as h:
        link = await h.open(settings, upstream={"auto_close": False})
        link.client.close(4002, "anyone?")
        assert (await link.upstream.recv_close()).code == 4002  # and never answers
        reply = await link.client.recv_close()
        assert (reply.code, reply.reason) == (4002, "anyone?")
        stats = await link.done()
        assert stats.closed_by == "client"
        await link.upstream.wait_lost()


@on_loops()
async def test_no_data_relayed_once_a_close_started():
    async with Harness() as h:
        link = await h.open(upstream={"auto_close": False, "echo": False})
        c, u = link.client, link.upstream
        c.close(1000, "done")
        assert (await u.recv_close()).code == 1000
        # (wsproto would refuse to send this now; a sloppy upstream might)
        u.send_raw(build_frame(OP_TEXT, "too late", mask=False))  # client already closed
        u.close(1000, "ok")
        before, reply = await until_close(c)
        assert before == [] and (reply.code, reply.reason) == (1000, "ok")
        stats = await link.done()
        assert stats.messages_out == 0 and stats.closed_by == "client"


@on_loops()
@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_abrupt_upstream_close(how):
    async with Harness() as h:
        link = await h.open(client={"record_raw": True})
        if how == "fin":
            link.upstream.transport.close()
        else:
            link.upstream.abort()
        close = await link.client.recv_close()
        assert (close.code, close.reason) == (1001, "going away")
        stats = await link.done()
        assert stats.closed_by == "upstream" and stats.error.startswith("upstream ")
        assert stats.close_code_upstream == 1006 and stats.close_code_client == 1001
        codes = [f.close_code for f in link.client.raw_frames() if f.opcode == OP_CLOSE]
        assert codes == [1001]  # 1006 never goes on the wire
        await link.client.wait_lost()


@on_loops()
@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_abrupt_client_close(how):
    async with Harness() as h:
        link = await h.open()
        link.client.send_text("x")
        assert await link.client.recv_message() == "x"
        if how == "fin":
            link.client.transport.close()
        else:
            link.client.abort()
        close = await link.upstream.recv_close()
        assert close.code == 1001
        stats = await link.done()
        assert stats.closed_by == "client" and stats.close_code_client == 1006
        assert stats.error == ("client closed the TCP connection without a close frame"
                               if how == "fin" else stats.error)


@on_loops()
@pytest.mark.parametrize("responsive", [True, False])
async def test_relay_close_for_gateway_drain(responsive):
    settings = replace(FAST, close_timeout=0.3)
    async with Harness() as h:
        link = await h.open(settings, client={"auto_close": responsive},
                            upstream={"auto_close": responsive})
        link.client.send_text("before")
        assert await link.client.recv_message() == "before"
        link.relay.close()
        for peer in (link.client, link.upstream):
            close = await peer.recv_close()
            assert (close.code, close.reason) == (1001, "going away")
        stats = await link.done(timeout=settings.close_timeout + 1.0)
        assert stats.closed_by == "gateway:shutdown" and link.relay.closed
        link.relay.close()  # idempotent
        await asyncio.gather(link.client.wait_lost(), link.upstream.wait_lost())
        if responsive:
            assert link.client.ws.state is ConnectionState.CLOSED


# -- protocol errors ---------------------------------------------------------------------------

BAD_CLIENT_INPUT = {
    "unmasked": (build_frame(OP_TEXT, "hi", mask=False), 1002),
    "rsv1": (build_frame(OP_TEXT, "hi", rsv=4), 1002),
    "rsv3": (build_frame(OP_BINARY, b"hi", rsv=1), 1002),
    "opcode-0x3": (build_frame(0x3, b"x"), 1002),
    "opcode-0xB": (build_frame(0xB, b"x"), 1002),
    "bad-utf8": (build_frame(OP_TEXT, b"ok\xff\xfe"), 1007),
    "bad-utf8-across-fragments": (build_frame(OP_TEXT, b"\xe2\x82", fin=False)
                                  + build_frame(OP_CONT, b"\x28"), 1007),
    "ping-126-bytes": (build_frame(OP_PING, b"p" * 126), 1002),
    "fragmented-ping": (build_frame(OP_PING, b"p", fin=False), 1002),
    "continuation-without-start": (build_frame(OP_CONT, b"x"), 1002),
    "new-message-inside-fragmented": (build_frame(OP_TEXT, "a", fin=False)
                                      + build_frame(OP_TEXT, "b"), 1002),
    # 2-byte extended length for a 2-byte payload, zero masking key
    "non-minimal-length": (b"\x81\xfe\x00\x02" + b"\x00\x00\x00\x00" + b"hi", 1002),
    "close-1-byte": (build_frame(OP_CLOSE, b"\x03"), 1002),
    "close-code-999": (build_frame(OP_CLOSE, close_payload(999)), 1002),
    "close-code-1004": (build_frame(OP_CLOSE, close_payload(1004)), 1002),
    "close-code-1005": (build_frame(OP_CLOSE, close_payload(1005)), 1002),
    "close-code-1006": (build_frame(OP_CLOSE, close_payload(1006)), 1002),
    "close-code-2999": (build_frame(OP_CLOSE, close_payload(2999)), 1002),
    "close-code-5000": (build_frame(OP_CLOSE, close_payload(5000)), 1002),
    "close-reason-bad-utf8": (build_frame(OP_CLOSE, close_payload(1000, b"\xc3\x28")), 1007),
}


@on_loops()
@pytest.mark.parametrize("case", list(BAD_CLIENT_INPUT))
async def test_bad_client_input(case):
    raw, code = BAD_CLIENT_INPUT[case]
    async with Harness() as h:
        link = await h.open(upstream={"echo": False})
        link.client.send_text("fine")
        assert await link.upstream.recv_message() == "fine"
        link.client.send_raw(raw)
        close = await link.client.recv_close()
        assert close.code == code
        assert close.reason in ("protocol error", "invalid frame payload data")
        before, up_close = await until_close(link.upstream)
        assert (up_close.code, up_close.reason) == (1001, "going away")
        # frames are relayed as they come: at most a valid first fragment got through,
        # never a complete message built from bad input
        assert all(not e.message_finished for e in before), before
        await link.client.wait_lost()  # the gateway dropped the offender's TCP connection
        stats = await link.done()
        assert stats.closed_by == "gateway:client_protocol_error"
        assert stats.close_code_client == code and stats.close_code_upstream == 1001
        assert stats.error.startswith("client protocol error: ")


BAD_UPSTREAM_INPUT = {
    "http-garbage": (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 1002),
    "masked-frame": (build_frame(OP_TEXT, "hi", mask=True), 1002),
    "rsv2": (build_frame(OP_TEXT, "hi", mask=False, rsv=2), 1002),
    "bad-utf8": (build_frame(OP_TEXT, b"\xff", mask=False), 1007),
    "close-code-999": (build_frame(OP_CLOSE, close_payload(999), mask=False), 1002),
}


@on_loops()
@pytest.mark.parametrize("via_tail", [False, True], ids=["live", "tail"])
@pytest.mark.parametrize("case", list(BAD_UPSTREAM_INPUT))
async def test_bad_upstream_input_closes_the_client_with_1011(case, via_tail):
    raw, code = BAD_UPSTREAM_INPUT[case]
    async with Harness() as h:
        link = await h.open(client={"record_raw": True}, upstream_tail=raw if via_tail else b"")
        if not via_tail:
            link.upstream.send_raw(raw)
        up_close = await link.upstream.recv_close()
        assert up_close.code == code
        await link.client.wait_lost()
        close = link.client.raw_close()   # as sent on the wire
        assert (close.close_code, close.close_reason) == (1011, "upstream error")
        stats = await link.done()
        assert stats.closed_by == "gateway:upstream_protocol_error"
        assert stats.close_code_client == 1011 and stats.close_code_upstream == code


# -- backpressure --------------------------------------------------------------------------------

class Peak:
    """Samples a transport's write buffer size every millisecond."""

    def __init__(self, transport) -> None:
        self.transport = transport
        self.max = 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    def sample(self) -> None:
        self.max = max(self.max, self.transport.get_write_buffer_size())

    async def _run(self) -> None:
        while not self.transport.is_closing():
            self.sample()
            await asyncio.sleep(0.001)

    def stop(self) -> int:
        self._task.cancel()
        return self.max


BUFFER_BOUND = 320 * 1024  # the destination's high-water mark + one frame, with room


async def flood(sender: WSPeer, size: int, *, stall: float = 0.3, limit: int = 5000,
                peak: Peak | None = None) -> int:
    """Send numbered binary messages until the sender's own writes stay paused for
    ``stall`` seconds (the whole path is full) or the connection closes."""
    for i in itertools.count():
        if sender.lost or sender.ws.state is not ConnectionState.OPEN or i >= limit:
            return i
        sender.send_bytes(i.to_bytes(8, "big") + bytes(size - 8))
        if peak is not None:
            peak.sample()
        if sender.write_paused:
            try:
                await asyncio.wait_for(sender.drain(), stall)
            except TimeoutError:
                return i + 1
    raise AssertionError("unreachable")


@on_loops()
async def test_client_that_stops_reading_is_bounded_then_cut_off():
    settings = replace(FAST, send_timeout=0.5)
    async with Harness() as h:
        link = await h.open(settings)
        link.client.pause_reading()
        peak = Peak(link.gw_client)
        sent = await flood(link.upstream, 16 * 1024, stall=5.0, peak=peak)
        # the flood ended because the gateway cut the client off and closed the upstream
        close = await link.upstream.recv_close()
        assert (close.code, close.reason) == (1001, "going away")
        assert peak.stop() <= BUFFER_BOUND, peak.max
        stats = await link.done()
        assert stats.closed_by == "gateway:send_timeout"
        assert stats.error == "client did not read for 0.5s"
        assert stats.close_code_client == 1006 and stats.close_code_upstream == 1001
        assert sent > 10 and stats.messages_out < sent
        link.client.resume_reading()  # it then sees the reset
        await link.client.wait_lost()


@on_loops()
@pytest.mark.parametrize("receiver", ["client", "upstream"])
async def test_slow_reader_gets_everything_in_order(receiver):
    settings = replace(FAST, send_timeout=5.0)
    async with Harness() as h:
        link = await h.open(settings, upstream={"echo": False})
        if receiver == "client":
            recv, send, gw_side = link.client, link.upstream, link.gw_client
        else:
            recv, send, gw_side = link.upstream, link.client, link.gw_upstream
        recv.pause_reading()
        peak = Peak(gw_side)
        sent = await flood(send, 32 * 1024, stall=0.3, peak=peak)
        assert sent > 4  # the path filled up: the sender is blocked, the gateway bounded
        assert gw_side.get_write_buffer_size() > 0
        recv.resume_reading()
        for i in range(sent):
            msg = await recv.recv_message()
            assert len(msg) == 32 * 1024 and int.from_bytes(msg[:8], "big") == i
        assert peak.stop() <= BUFFER_BOUND, peak.max
        send.send_text("after")
        assert await recv.recv_message() == "after"
        stats = await close_normally(link)
        assert stats.closed_by == "client"
        assert (stats.messages_in if receiver == "upstream" else stats.messages_out) == sent + 1


@on_loops()
async def test_relay_close_during_backpressure_is_bounded():
    """Drain while the client does not read: the upstream still gets its close handshake,
    the stuck client is dropped at close_timeout."""
    settings = replace(FAST, close_timeout=0.4, send_timeout=10.0)
    async with Harness() as h:
        link = await h.open(settings)
        link.client.pause_reading()
        await flood(link.upstream, 16 * 1024, stall=0.2)
        assert link.upstream.write_paused  # the gateway stopped reading it
        link.relay.close()
        close = await link.upstream.recv_close()
        assert (close.code, close.reason) == (1001, "going away")
        stats = await link.done(timeout=settings.close_timeout + 1.0)
        assert stats.closed_by == "gateway:shutdown" and stats.close_code_client == 1001
        link.client.resume_reading()
        await link.client.wait_lost()


@on_loops()
async def test_takeover_of_a_transport_that_is_already_closing():
    async with WSServer() as up, HolderServer() as gw:
        loop = asyncio.get_running_loop()
        ct, client = await loop.create_connection(lambda: WSPeer("client"), "127.0.0.1", gw.port)
        holder = await gw.accepted(ct.get_extra_info("sockname")[1])
        ut, _ = await loop.create_connection(Holder, "127.0.0.1", up.port)
        upeer = await up.accepted(ut.get_extra_info("sockname")[1])
        holder.transport.close()  # the client leg went away during the handshake plumbing
        done = loop.create_future()
        relay = start_relay(loop, holder.transport, ut, settings=FAST,
                            on_closed=done.set_result)
        assert not done.done()  # never called from inside start_relay
        assert (await upeer.recv_close()).code == 1001
        stats = await asyncio.wait_for(done, 5)
        assert stats.closed_by == "client" and stats.close_code_client == 1006 and relay.closed
        await client.wait_lost()


# -- stats, on_closed, scale -------------------------------------------------------------------

@on_loops()
async def test_stats_and_on_closed_exactly_once():
    async with Harness() as h:
        link = await h.open()
        c = link.client
        c.send_text("hello")                      # 5 bytes
        c.send_text("wörld")                      # 6 bytes
        c.send_bytes(bytes(10))                   # 10 bytes
        c.send_text("ab", fin=False)              # one message of 4 bytes
        c.send_text("cd", fin=True)
        for _ in range(4):
            await c.recv_message()
        live = link.relay.stats
        assert (live.messages_in, live.bytes_in, live.messages_out, live.bytes_out) == (4, 25, 4, 25)
        assert live.duration is None and live.closed_by is None
        link.upstream.send_bytes(bytes(7))  # unsolicited, upstream -> client only
        assert await c.recv_message() == bytes(7)
        stats = await close_normally(link)
        assert stats is link.relay.stats
        assert (stats.messages_in, stats.bytes_in, stats.messages_out, stats.bytes_out) == \
            (4, 25, 5, 32)
        assert stats.close_code_client == 1000 and stats.close_code_upstream == 1000
        assert type(stats.close_code_client) is int and type(stats.close_code_upstream) is int
        assert stats.closed_by == "client" and stats.error is None
        assert stats.duration > 0 and isinstance(stats.started, float)
        for _ in range(5):
            await asyncio.sleep(0)
        assert link.calls == [stats]
        assert set(stats.as_dict()) == set(RelayStats.__slots__)


def test_settings_are_validated():
    for bad in ({"max_message_bytes": 0}, {"idle_timeout": 0}, {"ping_interval": -1},
                {"messages_per_second": 0}, {"message_burst": 0}, {"close_timeout": float("nan")}):
        with pytest.raises(ValueError):
            RelaySettings(**bad)


@on_loops()
async def test_thousand_concurrent_relays():
    n = 1000
    async with Harness() as h:
        sem = asyncio.Semaphore(200)  # connection setup in waves; all stay open

        slow_ok = replace(FAST, idle_timeout=60.0, max_lifetime=120.0)  # e.g. under -X dev

        async def opened() -> Link:
            async with sem:
                return await h.open(slow_ok)

        links = await asyncio.gather(*(opened() for _ in range(n)))
        assert sum(not link.relay.closed for link in links) == n  # all live at once

        async def echo(i: int, link: Link) -> None:
            link.client.send_text(f"message {i}")
            assert await link.client.recv_message(timeout=10) == f"message {i}"

        await asyncio.gather(*(echo(i, link) for i, link in enumerate(links)))
        for link in links:
            link.client.close(1000)
        results = await asyncio.gather(*(link.done(timeout=10) for link in links))
        assert all(s.messages_in == 1 and s.messages_out == 1 and s.closed_by == "client"
                   for s in results)
        await asyncio.gather(*(link.client.wait_lost(timeout=10) for link in links))
        for link in links:
            assert link.relay.closed and len(link.calls) == 1
            assert link.gw_client.is_closing() and link.gw_upstream.is_closing()
            assert link.upstream.lost and link.client.lost


@on_loops()
async def test_on_closed_exception_is_logged_not_raised(caplog):
    """A failing on_closed callback is the caller's bug: logged, the relay still ends."""
    async with WSServer() as up, HolderServer() as gw:
        loop = asyncio.get_running_loop()
        ct, client = await loop.create_connection(lambda: WSPeer("client"), "127.0.0.1", gw.port)
        holder = await gw.accepted(ct.get_extra_info("sockname")[1])
        ut, _ = await loop.create_connection(Holder, "127.0.0.1", up.port)
        await up.accepted(ut.get_extra_info("sockname")[1])

        called = loop.create_future()

        def boom(stats):
            called.set_result(stats)
            raise RuntimeError("callback bug")

        relay = start_relay(loop, holder.transport, ut, settings=FAST, on_closed=boom)
        client.close(1000)
        await client.wait_lost()
        assert (await asyncio.wait_for(called, 5)).closed_by == "client" and relay.closed
    errors = [r for r in caplog.records if "on_closed" in r.getMessage()]
    assert errors
    caplog.clear()  # expected: keep no_logged_exceptions quiet for this one
