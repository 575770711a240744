"""One leg of a WebSocket relay: the per-leg state machine `relay.Relay` drives.

Owns `Leg`, the asyncio protocol installed on one of the two upgraded transports (the
client's or the upstream's): its wsproto `Connection` (server role toward the client,
client role toward the upstream), the frame pump that relays this leg's data frames to
the other leg in write batches (the hot path), per-leg flow control (read/write pausing,
the newest unanswered ping), the control frames it sends (pong, ping, close) and the
counters of what was relayed from it. Everything that involves both legs or time --
timers, the close handshake between the legs, limits, stats, `on_closed` -- is the
relay's: a leg reports to its owner through `LegOwner`. The contract (invariants 2, 3,
5, 8, 10 and 11 for what happens here) is in `relay`'s docstring.

This module does not import `relay` (which imports it): `LegOwner` is what a leg
needs of its relay.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason

from edgeplane.policies.throttle.buckets import TokenBucket

__all__ = ["Leg", "LegOwner", "NO_STATUS"]

_OPEN = ConnectionState.OPEN
_REMOTE_CLOSING = ConnectionState.REMOTE_CLOSING
_CLOSED = ConnectionState.CLOSED

NO_STATUS = 1005
_PING_PAYLOAD = b"edgeplane"
_BATCH_BYTES = 32 * 1024  # frames for one destination are written in batches up to this


class _LegSettings(Protocol):
    @property
    def send_timeout(self) -> float: ...


class LegOwner(Protocol):
    """What a leg reads and calls of its relay (`relay.Relay`)."""

    loop: asyncio.AbstractEventLoop
    closing: bool  # a close has started: no more data is relayed (but see flush_from)
    last_data: float  # loop time of the last data frame relayed, either way
    max_message_bytes: int
    flush_from: Leg | None  # while closing: the leg whose data still goes to a failed peer
    flush_left: int  # payload bytes that flush may still relay

    def _end_flush(self) -> None: ...

    @property
    def settings(self) -> _LegSettings: ...

    def _arm(self, when: float) -> None: ...

    def _lost(self, leg: Leg, exc: Exception | None) -> None: ...

    def _rate_exceeded(self, leg: Leg) -> None: ...

    def _too_big(self, leg: Leg) -> None: ...

    def _close_frame(self, leg: Leg, ev: CloseConnection) -> None: ...


class Leg(asyncio.Protocol):
    """One side of the relay: the protocol installed on one transport."""

    __slots__ = (
        "relay", "name", "is_client", "conn", "transport", "other", "bucket",
        "write_paused", "paused_since", "read_paused", "last_rx", "ping_due", "pending_pong",
        "parts", "msg_bytes", "in_message", "messages", "bytes", "pumping",
        "lost", "failed", "close_code", "peer_close",
    )

    def __init__(self, relay: LegOwner, name: str, transport: asyncio.Transport, now: float) -> None:
        self.relay = relay
        self.name = name
        self.is_client = name == "client"
        self.conn = Connection(ConnectionType.SERVER if self.is_client else ConnectionType.CLIENT)
        self.transport = transport
        self.other: Leg = self  # set by the relay
        self.bucket: TokenBucket | None = None
        self.write_paused = False
        self.paused_since = 0.0
        self.read_paused = False
        self.last_rx = now
        self.ping_due = 0.0  # 0.0: no ping outstanding
        self.pending_pong: bytes | None = None
        self.parts: list[Any] = []  # chunks (str or bytes) of a data frame that arrived in several reads
        self.msg_bytes = 0
        self.in_message = False
        self.messages = 0  # messages / bytes relayed *from* this leg
        self.bytes = 0
        self.pumping = False
        self.lost = False
        self.failed = False
        self.close_code: int | None = None  # first close code on this leg's wire (or 1006)
        self.peer_close: tuple[int, str | None] | None = None  # the close this leg sent us

    # -- asyncio.Protocol -------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.failed or self.lost:
            return
        conn = self.conn
        if conn.state is _CLOSED:
            return  # bytes after a completed close handshake are ignored
        now = self.relay.loop.time()
        self.last_rx = now
        self.ping_due = 0.0
        conn.receive_data(data)
        if not self.pumping:
            self.pump(now)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost:
            self.relay._lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.paused_since = now = self.relay.loop.time()
        self.relay._arm(now + self.relay.settings.send_timeout)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.ping_due = 0.0
        if self.pending_pong is not None:
            payload, self.pending_pong = self.pending_pong, None
            self.send_pong(payload)
        src = self.other
        if src.read_paused and not src.lost and not src.failed:
            src.read_paused = False
            now = self.relay.loop.time()
            src.last_rx = now
            src.ping_due = 0.0
            if not src.pumping:
                src.pump(now)  # what was parsed-later while we were paused
            if not src.read_paused:
                src.transport.resume_reading()

    # -- the hot path -----------------------------------------------------------------
    def pump(self, now: float) -> None:
        """Process the events wsproto has for this leg, relaying data to the other leg.

        Frames for the destination are gathered and written in batches of up to
        ``_BATCH_BYTES`` (one write call per batch, not per frame). Anything that may
        write a close to the destination flushes the batch first, so wire order is kept.
        Stops early (and pauses reading this leg) when the destination pauses writing."""
        self.pumping = True
        try:
            relay = self.relay
            dst = self.other
            out: list[bytes] = []
            pending = 0
            # Dispatched on `type(ev)` (identity, the hot path): typed Any, not narrowed.
            ev: Any
            for ev in self.conn.events():
                t = type(ev)
                if t is TextMessage or t is BytesMessage:
                    data = ev.data
                    n = len(data) if t is BytesMessage or data.isascii() else len(data.encode())
                    if relay.closing:  # one check on the hot path, as before the flush
                        if relay.flush_from is not self:
                            continue
                        # The other leg failed: what this leg sent before its close reply
                        # still goes there first, up to a byte bound (relay invariant 10).
                        if n > relay.flush_left:
                            if out:
                                dst.transport.write(b"".join(out))
                                out = []
                            relay._end_flush()
                            continue
                        relay.flush_left -= n
                    if not self.in_message:
                        self.in_message = True
                        bucket = self.bucket
                        if bucket is not None and bucket.take(now):
                            if out:
                                dst.transport.write(b"".join(out))
                                out = []
                            relay._rate_exceeded(self)
                            continue
                    size = self.msg_bytes + n
                    if size > relay.max_message_bytes:
                        if out:
                            dst.transport.write(b"".join(out))
                            out = []
                        relay._too_big(self)
                        continue
                    relay.last_data = now
                    self.bytes += n
                    if not ev.frame_finished:
                        self.parts.append(data)
                        self.msg_bytes = size
                        continue
                    if self.parts:
                        self.parts.append(data)
                        data = ("" if t is TextMessage else b"").join(self.parts)
                        self.parts = []
                        ev = t(data=data, frame_finished=True, message_finished=ev.message_finished)
                    frame = dst.conn.send(ev)
                    out.append(frame)
                    if ev.message_finished:
                        self.in_message = False
                        self.msg_bytes = 0
                        self.messages += 1
                    else:
                        self.msg_bytes = size
                    pending += len(frame)
                    if pending >= _BATCH_BYTES:
                        dst.transport.write(b"".join(out))
                        out = []
                        pending = 0
                        if dst.write_paused:
                            self.read_paused = True
                            self.transport.pause_reading()
                            break
                elif t is Ping:
                    self.send_pong(ev.payload)
                elif t is Pong:
                    pass
                else:
                    if out:
                        dst.transport.write(b"".join(out))
                        out = []
                    relay._close_frame(self, ev)
            if out:
                dst.transport.write(b"".join(out))
                if dst.write_paused and not relay.closing:
                    self.read_paused = True
                    self.transport.pause_reading()
        finally:
            self.pumping = False

    # -- sending control frames --------------------------------------------------------
    def send_pong(self, payload: bytes) -> None:
        if self.conn.state is not _OPEN or self.lost or self.failed:
            return
        if self.write_paused:
            self.pending_pong = payload  # only the newest ping is answered
            return
        self.transport.write(self.conn.send(Pong(payload)))

    def send_ping(self) -> None:
        if self.conn.state is _OPEN and not self.lost:
            self.transport.write(self.conn.send(Ping(_PING_PAYLOAD)))

    def send_close(self, code: int, reason: str | None) -> bool:
        """Send a close frame if this leg may still get one; True when sent."""
        if self.lost or self.failed or self.conn.state not in (_OPEN, _REMOTE_CLOSING):
            return False
        if self.close_code is None:
            self.close_code = int(code)
        if code == NO_STATUS:
            ev = CloseConnection(code=CloseReason.NO_STATUS_RCVD, reason=None)
        else:
            ev = CloseConnection(code=code, reason=reason)
        self.transport.write(self.conn.send(ev))
        return True

    def fail(self, code: int, reason: str) -> None:
        """Fail this leg (RFC 6455 7.1.7): send it a close with ``code`` if it may still get
        one (even while its own frames are already ignored) and close TCP without waiting
        for a reply. Nothing it sends afterwards is processed."""
        self.failed = True
        self.parts = []
        if self.lost:
            return
        if self.conn.state in (_OPEN, _REMOTE_CLOSING):
            if self.close_code is None:
                self.close_code = code
            self.transport.write(self.conn.send(CloseConnection(code=code, reason=reason)))
        self.transport.close()

    def handshake_done(self) -> None:
        """Both close frames exchanged on this leg: the server side closes TCP."""
        if self.is_client and not self.lost:
            self.transport.close()
        # upstream leg: the gateway is the WebSocket client; the upstream closes TCP
        # (eof_received -> close), bounded by the relay's close deadline.
