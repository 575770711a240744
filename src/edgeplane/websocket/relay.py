"""Frame-aware WebSocket relay between a client and an upstream, after both handshakes.

This module owns one relayed WebSocket connection from the moment the gateway has
upgraded both legs (the client got its 101, the upstream answered a valid 101) until both
TCP connections are closed. It takes the two transports over (``set_protocol``), speaks
WebSocket on each leg with a wsproto ``Connection`` and keeps the counters the access log
needs. The HTTP upgrade itself (headers, subprotocols, refusing extensions), routing and
authorisation live in the handshake code that calls ``start_relay``.

Here: the settings, the stats, the pair of legs as one relay (``Relay``: its single timer,
the close handshake between the legs, limits, teardown, ``on_closed``) and
``start_relay``. Each leg's own state machine (its wsproto connection, the frame pump,
flow control, the control frames it sends) is ``relay_leg.Leg``.

API
---
- ``RelaySettings`` (frozen): limits and timeouts (``error_flush_*``: see 10), validated
  at construction.
- ``start_relay(loop, client_transport, upstream_transport, *, settings, client_tail=b"",
  upstream_tail=b"", on_closed=None) -> Relay``: take both transports over and start
  relaying. The tails are bytes that arrived right after each handshake; they are
  processed as if just received, before anything else.
- ``Relay``: ``.stats`` (``RelayStats``), ``.closed`` (True once both transports are
  closed), ``.close(code=1001, reason="going away")`` (gateway drain).
- ``RelayStats`` (``__slots__``): ``messages_in``/``bytes_in`` (client -> upstream),
  ``messages_out``/``bytes_out`` (upstream -> client), ``started`` (loop/monotonic
  clock), ``duration`` (None while open), ``close_code_client``/``close_code_upstream``,
  ``closed_by`` (``"client" | "upstream" | "gateway:<reason>"``), ``error``.

Invariants
----------
1. **Roles.** The client leg is ``Connection(SERVER)`` (client frames must be masked),
   the upstream leg ``Connection(CLIENT)`` (the gateway masks what it sends upstream).
   No extensions: reserved bits are a protocol error.
2. **Frames, not streams.** Each data frame is relayed as one frame with the same FIN
   bit (``Message(data, message_finished=...)``); text stays text, binary stays binary.
   A frame that arrives in several TCP reads is reassembled first (bounded by
   ``max_message_bytes``). Text is validated (UTF-8) by wsproto on the way in, so a text
   frame boundary that splits a code point is re-cut at the code point (the bytes of the
   message are unchanged). Bytes are counted as payload bytes (UTF-8 for text).
3. **Message size** is summed over the fragments of one message, per direction; the
   frame that takes it past ``max_message_bytes`` closes the sender with 1009 and the
   other leg with 1001. Nothing of an oversized message beyond that frame is relayed.
4. **Rate.** With ``messages_per_second`` set, each client message (counted at its first
   frame) takes a token from a bucket of ``message_burst``; an empty bucket closes the
   client with 1008 "message rate exceeded" and the upstream with 1001.
5. **Control frames are per leg.** Pings are answered locally with a pong carrying the
   same payload and are never forwarded; pongs are consumed. While a leg's writes are
   paused only the newest unanswered ping is answered (RFC 6455 5.5.3), when it resumes.
6. **Liveness.** A leg from which nothing has been received for ``ping_interval`` gets a
   ping; if still nothing arrives within ``pong_timeout`` it is dead: its transport is
   aborted and the other leg is closed with 1001. A leg the relay itself stopped reading
   (backpressure) or whose writes are paused is not pinged; ``send_timeout`` covers it.
   (Because the timer is armed lazily, the next ping after a prompt pong goes out
   ``max(ping_interval, pong_timeout)`` after the previous one.)
7. **Idle and lifetime.** No data frame in either direction for ``idle_timeout``, or the
   relay older than ``max_lifetime``: both legs are closed with 1001.
8. **Close handshake.** A close from one leg is forwarded with the same code and reason
   (1005, no code, is forwarded as an empty close) and the other leg's reply is forwarded
   back. Once any close has started, data frames are no longer relayed in either
   direction (a leg that sent or received a close may not be sent data), except for the
   flush after a client protocol error (10). The client leg's TCP connection is closed
   by the gateway once its handshake is complete; on the upstream leg the gateway is the
   WebSocket client and waits for the upstream to close TCP. A leg that started a close
   always gets a reply: the other leg's reply when it comes, else (other leg gone or
   broken, or ``close_timeout`` passed) its own close echoed.
9. **Bounded teardown.** ``close_timeout`` after the close started every transport still
   open is aborted, except a leg that is only now being sent its (echoed) reply, which is
   given at most ``min(1 s, close_timeout)`` more to flush it. A gateway-initiated close
   (``Relay.close``, timeouts, limits) therefore completes within ``close_timeout``.
10. **Failures, and what arrives before the close.** A protocol error (wsproto
   ParseFailed: unmasked client frame, reserved bits, unknown opcode, bad UTF-8, control
   frame > 125 bytes or fragmented, continuation without a start, data frame inside a
   fragmented message, invalid close code) fails that leg: nothing of the bad frame or of
   anything after it is processed (a valid earlier fragment of the same message may
   already be relayed), it is sent the close code wsproto chose (1002/1007) with a fixed
   reason and its TCP connection is closed without waiting for a reply.
   *Ordering invariant* (as on a direct connection): the healthy leg gets, before its
   close, every data frame the failed leg sent before the bad frame; the failed leg
   gets, before its close, every data frame the healthy leg sent before it could know
   of the failure (for a failed client: before the upstream's close reply, within the
   flush bounds below), in order.
   - **Client fails:** the upstream is sent 1001 at once, not 1002/1007: in RFC 6455
     7.4.1 those say the sender ends the connection over bad data *it received on that
     connection*, and the upstream's leg carried none (an upstream would blame its own
     frames); for it, its client is going away (1001). The upstream's
     data frames (already on the wire, or sent before its close reply) are still relayed
     to the client -- the *flush* -- until its close reply arrives, it fails or goes away,
     ``error_flush_timeout`` (at most ``close_timeout / 2``, so the client's close still
     gets time to flush) passes, or a frame would take the flushed payload past
     ``error_flush_bytes`` (not relayed); only then is the client sent its 1002/1007. A
     client that leaves during the flush ends it. ``error_flush_timeout=0``: no flush.
   - **Upstream fails:** every frame it sent before the bad one has already been written
     to the client (the pump writes its batch before acting on a close event), so the
     client gets 1011 "upstream error" right after them (1014 "bad gateway" would be more
     precise, but wsproto 1.3 and other clients refuse it as a reserved code); the
     client's frames in flight toward the broken upstream are dropped.
   A leg whose TCP connection ends without a close frame, or that is cut off, makes the
   relay close the other leg with 1001. 1006 is never sent; it is what the stats record
   for a leg whose connection ended with no close frame exchanged.
11. **Backpressure, both ways.** When a destination pauses writing, the relay stops
   processing the source's frames (bytes already read stay unparsed in wsproto) and
   pauses reading the source transport; ``resume_writing`` processes what is pending and
   resumes reading. So a destination's write buffer holds at most its high-water mark
   plus one write batch (32 KiB) plus one frame (<= ``max_message_bytes``), and the
   source's unparsed bytes at most one read. A destination paused for ``send_timeout``
   is cut off (aborted, other leg closed with 1001). The transports' own write-buffer
   limits are used as handed over.
12. **One timer, no tasks.** Every timeout of a relay is served by a single
   ``loop.call_at`` handle. It is armed lazily: activity only moves deadlines later, so
   the handle is replaced only when a deadline moves earlier (writes pausing, a close
   starting) or when it fires. No task, future or closure is created per message; the
   frames one read yields for a destination go out in one ``write`` per 32 KiB batch
   (about +12% messages/s over a write per frame on uvloop).
13. **Exactly once.** ``on_closed(stats)`` is called once, after both transports have
   reported ``connection_lost``; an exception it raises is logged, not propagated.
14. **No exception text reaches a peer.** Close reasons are fixed strings; wsproto's
   description of a protocol error goes to ``stats.error`` only.

Known limitation: wsproto 1.3 refuses a *received* 1014 (not in its close-code enum) as a
protocol error, so a leg sending 1014 to the relay is treated as broken; for the same reason
the relay never sends it (see 10).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from edgeplane.policies.throttle.buckets import TokenBucket
from edgeplane.websocket.relay_leg import NO_STATUS, Leg

__all__ = ["RelaySettings", "RelayStats", "Relay", "start_relay"]

log = logging.getLogger("edgeplane.wsrelay")

_REMOTE_CLOSING = ConnectionState.REMOTE_CLOSING
_CLOSED = ConnectionState.CLOSED

GOING_AWAY = 1001
ABNORMAL = 1006  # recorded in stats only, never sent
TOO_BIG = 1009
POLICY = 1008
UPSTREAM_ERROR = 1011  # "internal error": what the client gets when the upstream broke

_REASONS = {1002: "protocol error", 1007: "invalid frame payload data"}
_FINAL_GRACE = 1.0  # max seconds to flush an echoed close reply after close_timeout


@dataclass(frozen=True, slots=True)
class RelaySettings:
    max_message_bytes: int = 128 * 1024
    idle_timeout: float = 600.0
    max_lifetime: float = 7200.0
    messages_per_second: float | None = None
    message_burst: int = 100
    ping_interval: float = 30.0
    pong_timeout: float = 10.0
    send_timeout: float = 60.0
    close_timeout: float = 5.0
    error_flush_timeout: float = 1.0
    error_flush_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if not isinstance(self.max_message_bytes, int) or self.max_message_bytes < 1:
            raise ValueError("max_message_bytes must be an integer >= 1")
        for name in ("idle_timeout", "max_lifetime", "pong_timeout", "send_timeout", "close_timeout"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and not math.isnan(v)):
                raise ValueError(f"{name} must be a number > 0")
        if not (isinstance(self.ping_interval, (int, float)) and self.ping_interval >= 0
                and math.isfinite(self.ping_interval)):
            raise ValueError("ping_interval must be a finite number >= 0 (0 = never)")
        if self.messages_per_second is not None and not (
                isinstance(self.messages_per_second, (int, float))
                and 0 < self.messages_per_second < math.inf):
            raise ValueError("messages_per_second must be a finite number > 0 or None")
        if not isinstance(self.message_burst, int) or self.message_burst < 1:
            raise ValueError("message_burst must be an integer >= 1")
        if not (isinstance(self.error_flush_timeout, (int, float)) and self.error_flush_timeout >= 0
                and math.isfinite(self.error_flush_timeout)):
            raise ValueError("error_flush_timeout must be a finite number >= 0 (0 = no flush)")
        if not isinstance(self.error_flush_bytes, int) or self.error_flush_bytes < 0:
            raise ValueError("error_flush_bytes must be an integer >= 0")


class RelayStats:
    """What the access log line needs about one relayed connection.

    Counters are data messages/payload bytes actually relayed (a message counts when its
    last frame is relayed). ``close_code_<leg>`` is the first close code exchanged on
    that leg's wire, whichever side sent it (1005: a close without a code; 1006: the
    connection ended with no close frame exchanged). ``started`` is ``loop.time()``."""

    __slots__ = ("messages_in", "bytes_in", "messages_out", "bytes_out", "started", "duration",
                 "close_code_client", "close_code_upstream", "closed_by", "error")

    def __init__(self, started: float) -> None:
        self.messages_in = 0
        self.bytes_in = 0
        self.messages_out = 0
        self.bytes_out = 0
        self.started = started
        self.duration: float | None = None
        self.close_code_client: int | None = None
        self.close_code_upstream: int | None = None
        self.closed_by: str | None = None
        self.error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return "RelayStats(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"


class Relay:
    """One relayed WebSocket connection. See the module docstring for the contract."""

    ws_kind = "proxied"  # its `kind` label in the metrics

    __slots__ = ("_t0", "loop", "settings", "client", "upstream", "closing", "closed", "last_data",
                 "max_message_bytes", "_stats", "_on_closed", "_timer", "_timer_at",
                 "_close_deadline", "_final", "flush_from", "flush_left", "_flush_until",
                 "_violation")

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: RelaySettings,
                 on_closed: Callable[[RelayStats], None] | None) -> None:
        now = loop.time()
        self.loop = loop
        self.settings = settings
        self.max_message_bytes = settings.max_message_bytes
        self._stats = RelayStats(now)
        self._t0 = time.perf_counter()  # duration: loop.time() is coarse (ms) under uvloop
        self._on_closed = on_closed
        self.closing = False  # a close has started: no more data is relayed
        self.closed = False  # both transports closed, on_closed called
        self.last_data = now
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._close_deadline = math.inf
        self._final = False
        # The flush after a client protocol error (invariant 10): the upstream leg whose
        # data still goes to the client, what it may still relay, until when, and the
        # client's pending close code.
        self.flush_from: Leg | None = None
        self.flush_left = 0
        self._flush_until = math.inf
        self._violation = 0
        self.client: Leg
        self.upstream: Leg

    # -- public -------------------------------------------------------------------------
    @property
    def stats(self) -> RelayStats:
        s = self._stats
        if not self.closed:
            self._sync_stats()
        return s

    def close(self, code: int = GOING_AWAY, reason: str = "going away") -> None:
        """Gateway drain: close both legs with ``code``; done within close_timeout."""
        self._gateway_close("shutdown", None, code, reason, code, reason)

    def abort(self) -> None:
        """Drop both TCP connections now (a stopping gateway whose drain time is up)."""
        for leg in (self.client, self.upstream):
            if leg is not None and not leg.transport.is_closing():
                leg.transport.abort()

    # -- timer --------------------------------------------------------------------------
    def _arm(self, when: float) -> None:
        if when < self._timer_at and not self.closed:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = when
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self.closed:
            return
        now = self.loop.time()
        if self.closing:
            if now >= self._flush_until:
                self._end_flush()
            if now >= self._close_deadline:
                self._deadline_passed(now)
            else:
                self._arm(min(self._flush_until, self._close_deadline))
            return
        s = self.settings
        started = self._stats.started
        if now >= started + s.max_lifetime:
            self._gateway_close("max_lifetime", None, GOING_AWAY, "connection lifetime exceeded",
                                GOING_AWAY, "going away")
            return
        if now >= self.last_data + s.idle_timeout:
            self._gateway_close("idle_timeout", None, GOING_AWAY, "idle timeout",
                                GOING_AWAY, "idle timeout")
            return
        nxt = min(started + s.max_lifetime, self.last_data + s.idle_timeout)
        interval = s.ping_interval
        for leg in (self.client, self.upstream):
            if leg.write_paused:
                due = leg.paused_since + s.send_timeout
                if now >= due:
                    self._cut_off(leg, "send_timeout",
                                  f"{leg.name} did not read for {s.send_timeout:g}s")
                    return
            elif not interval or leg.read_paused:
                continue
            elif leg.ping_due:
                due = leg.ping_due
                if now >= due:
                    self._cut_off(leg, "ping_timeout",
                                  f"{leg.name} did not answer a ping within {s.pong_timeout:g}s")
                    return
            else:
                due = leg.last_rx + interval
                if now >= due:
                    leg.send_ping()
                    leg.ping_due = due = now + s.pong_timeout
            if due < nxt:
                nxt = due
        self._arm(nxt)

    # -- closing --------------------------------------------------------------------------
    def _begin_closing(self, closed_by: str, error: str | None) -> None:
        self.closing = True
        st = self._stats
        st.closed_by = closed_by
        st.error = error
        self._close_deadline = self.loop.time() + self.settings.close_timeout
        self._arm(self._close_deadline)
        # Frames held back by backpressure may contain the close reply: read on.
        if self.client.read_paused or self.upstream.read_paused:
            self.loop.call_soon(self._unpause_all)

    def _unpause_all(self) -> None:
        now = self.loop.time()
        for leg in (self.client, self.upstream):
            if leg.read_paused and not leg.lost and not leg.failed:
                leg.read_paused = False
                if not leg.pumping:
                    leg.pump(now)
                leg.transport.resume_reading()

    def _gateway_close(self, reason: str, error: str | None, client_code: int, client_reason: str,
                       upstream_code: int, upstream_reason: str) -> None:
        if self.closing:
            return
        self._begin_closing("gateway:" + reason, error)
        self.client.send_close(client_code, client_reason)
        self.upstream.send_close(upstream_code, upstream_reason)

    def _rate_exceeded(self, leg: Leg) -> None:
        s = self.settings
        self._gateway_close("rate_limited", f"client exceeded {s.messages_per_second:g} messages/s",
                            POLICY, "message rate exceeded", GOING_AWAY, "going away")

    def _too_big(self, leg: Leg) -> None:
        if self.flush_from is leg:  # the rest of that message must not follow: stop here
            self._end_flush()
            return
        error = f"{leg.name} message exceeded {self.max_message_bytes} bytes"
        if leg.is_client:
            self._gateway_close("message_too_big", error, TOO_BIG, "message too big",
                                GOING_AWAY, "going away")
        else:
            self._gateway_close("message_too_big", error, GOING_AWAY, "going away",
                                TOO_BIG, "message too big")

    def _cut_off(self, leg: Leg, reason: str, error: str) -> None:
        """A dead or stuck leg: abort its transport, close the other one with 1001."""
        if leg.close_code is None:
            leg.close_code = ABNORMAL
        if not self.closing:
            self._begin_closing("gateway:" + reason, error)
        leg.failed = True
        leg.transport.abort()
        self._other_gone(leg.other)

    def _other_gone(self, leg: Leg) -> None:
        """``leg``'s counterpart can no longer take part: close ``leg`` on its own."""
        if self.flush_from is leg.other:  # nothing more can come for the failed client
            self._end_flush()
        elif leg.conn.state is _REMOTE_CLOSING:
            self._echo_reply(leg)
        else:
            leg.send_close(GOING_AWAY, "going away")

    def _echo_reply(self, leg: Leg) -> None:
        code, reason = leg.peer_close or (NO_STATUS, None)
        if leg.send_close(code, reason):
            leg.handshake_done()

    def _close_frame(self, leg: Leg, ev: CloseConnection) -> None:
        state = leg.conn.state
        other = leg.other
        if state is _REMOTE_CLOSING:  # the peer starts a close handshake on this leg
            leg.peer_close = (int(ev.code), ev.reason)
            if leg.close_code is None:
                leg.close_code = int(ev.code)
            if not self.closing:
                self._begin_closing(leg.name, None)
            if not other.send_close(ev.code, ev.reason):
                self._echo_reply(leg)  # nobody left to ask: answer it ourselves
        elif state is _CLOSED:  # the reply to a close we sent on this leg
            leg.handshake_done()
            if self.flush_from is leg:  # everything it sent before its close is relayed
                self._end_flush()
            elif other.conn.state is _REMOTE_CLOSING and other.send_close(ev.code, ev.reason):
                other.handshake_done()
        else:  # wsproto ParseFailed: fail this leg
            self._protocol_error(leg, int(ev.code), ev.reason)

    def _protocol_error(self, leg: Leg, code: int, detail: str | None) -> None:
        if not self.closing:
            self._begin_closing(f"gateway:{leg.name}_protocol_error",
                                f"{leg.name} protocol error: {detail}")
            if not leg.is_client:
                leg.other.send_close(UPSTREAM_ERROR, "upstream error")
            elif leg.other.send_close(GOING_AWAY, "going away") and self.settings.error_flush_timeout:
                # Invariant 10: the client's frames stop here (it is failed: nothing it
                # sends is processed); the upstream's keep coming until its close reply
                # or a bound, and only then does the client get its close.
                s = self.settings
                leg.failed = True
                leg.parts = []
                self._violation = code
                self.flush_from = leg.other
                self.flush_left = s.error_flush_bytes
                self._flush_until = self.loop.time() + min(s.error_flush_timeout, s.close_timeout / 2)
                self._arm(self._flush_until)
                return
        else:
            self._other_gone(leg.other)  # (ends a flush toward it first)
        leg.fail(code, _REASONS.get(code, "protocol error"))

    def _end_flush(self) -> None:
        """The flush after a client protocol error is over: fail the client now."""
        src = self.flush_from
        if src is None:
            return
        self.flush_from = None
        self._flush_until = math.inf
        code = self._violation
        src.other.fail(code, _REASONS.get(code, "protocol error"))
        if src.read_paused:  # it waited on the client; its close reply may be pending
            self.loop.call_soon(self._unpause_all)

    def _lost(self, leg: Leg, exc: Exception | None) -> None:
        leg.lost = True
        if self.flush_from is leg.other:  # the failed client left during its flush
            self._end_flush()
        leg.write_paused = False
        leg.read_paused = False
        if leg.close_code is None:
            leg.close_code = ABNORMAL
        other = leg.other
        if not self.closing:
            what = "reset the connection" if exc else "closed the TCP connection"
            self._begin_closing(leg.name, f"{leg.name} {what} without a close frame")
            other.send_close(GOING_AWAY, "going away")
        elif leg.conn.state is not _CLOSED and not other.lost:
            self._other_gone(other)
        if other.read_paused and not other.lost and not other.failed:  # it waited on this leg
            other.read_paused = False
            if not other.pumping:
                other.pump(self.loop.time())
            other.transport.resume_reading()
        if other.lost:
            self._finish()

    def _deadline_passed(self, now: float) -> None:
        if self._final:
            for leg in (self.client, self.upstream):
                if not leg.lost:
                    leg.transport.abort()
            return
        self._final = True
        grace = False
        for leg in (self.client, self.upstream):
            if leg.lost:
                continue
            if leg.conn.state is _REMOTE_CLOSING and not leg.failed:
                self._echo_reply(leg)  # its counterpart never replied
                leg.transport.close()
                grace = True
            else:
                leg.transport.abort()
        if grace:
            self._arm(now + min(_FINAL_GRACE, self.settings.close_timeout))

    def _sync_stats(self) -> None:
        s = self._stats
        c, u = self.client, self.upstream
        s.messages_in, s.bytes_in = c.messages, c.bytes
        s.messages_out, s.bytes_out = u.messages, u.bytes
        s.close_code_client = c.close_code
        s.close_code_upstream = u.close_code

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._sync_stats()
        s = self._stats
        s.duration = time.perf_counter() - self._t0
        cb, self._on_closed = self._on_closed, None
        if cb is not None:
            try:
                cb(s)
            except Exception:
                log.exception("wsrelay on_closed callback failed")


def start_relay(loop: asyncio.AbstractEventLoop, client_transport: asyncio.Transport,
                upstream_transport: asyncio.Transport, *, settings: RelaySettings,
                client_tail: bytes = b"", upstream_tail: bytes = b"",
                on_closed: Callable[[RelayStats], None] | None = None,
                client_write_paused: bool = False) -> Relay:
    """Take over two upgraded transports and relay WebSocket frames between them.

    ``client_write_paused``: the client transport had paused its previous protocol's
    writes (a client that does not read what it asked for before upgrading); asyncio
    will not say so again, so the relay starts that leg paused (backpressure and
    ``send_timeout`` apply from the start). A transport already closing is treated as an
    abrupt close of that leg. ``on_closed`` is called
    once, from the event loop, after both transports are closed (never from inside this
    call)."""
    relay = Relay(loop, settings, on_closed)
    now = relay._stats.started
    client = Leg(relay, "client", client_transport, now)
    upstream = Leg(relay, "upstream", upstream_transport, now)
    client.other, upstream.other = upstream, client
    relay.client, relay.upstream = client, upstream
    if settings.messages_per_second is not None:
        client.bucket = TokenBucket(settings.messages_per_second, settings.message_burst)
    client_transport.set_protocol(client)
    upstream_transport.set_protocol(upstream)
    if client_write_paused:
        client.pause_writing()
    first = min(now + settings.idle_timeout, now + settings.max_lifetime)
    if settings.ping_interval:
        first = min(first, now + settings.ping_interval)
    relay._arm(first)
    for leg in (client, upstream):
        if leg.transport.is_closing():
            # its connection_lost may already have gone to the previous protocol
            leg.failed = True
            loop.call_soon(leg.connection_lost, None)
        else:
            leg.transport.resume_reading()
    if client_tail and not client.failed:
        client.data_received(client_tail)
    if upstream_tail and not upstream.failed:
        upstream.data_received(upstream_tail)
    return relay
