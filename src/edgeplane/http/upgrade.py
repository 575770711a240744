"""WebSocket hand-over on a client connection: the upgrade half of `HttpProtocol`.

Owns what happens after the parser stops at a request with `Connection: upgrade`:
keeping the bytes that followed it (`_upgraded`), handing the transport to a WebSocket
after its 101 (`detach`), or going on as HTTP when the upgrade was refused with an
ordinary response (`resume_http`). `protocol.HttpProtocol` inherits this; the
attributes annotated below are its.

Invariants: at most `_UPGRADE_TAIL_MAX` bytes after an upgrade request are held (reading
pauses past it); after `detach` no callback of the HTTP protocol runs again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from edgeplane.http.codec import HttpParserUpgrade, new_request_parser
from edgeplane.http.replies import P_BUFFER

if TYPE_CHECKING:
    from edgeplane.http.context import ServerContext
    from edgeplane.http.request import Request

_UPGRADE_TAIL_MAX = 64 * 1024  # client bytes held while a WebSocket handshake completes


class Upgrades:
    """Mixin: the upgrade methods of `protocol.HttpProtocol`."""

    if not TYPE_CHECKING:  # slotted at run time; for mypy the attributes are HttpProtocol's
        __slots__ = ()
    ctx: ServerContext
    transport: asyncio.Transport
    parser: Any
    _active: Request | None
    _queue: deque[Request]
    _parsing: Request | None
    _closed: bool
    _parser_dead: bool
    _pause: int
    _timer: asyncio.TimerHandle | None
    _upgrade_tail: bytearray | None
    _last_parsed: Request | None

    if TYPE_CHECKING:  # HttpProtocol's (not defined here: they would shadow the real ones)
        def _stop_parsing(self) -> None: ...
        def _close_after_response(self, linger: bool = False) -> None: ...
        def resume_reading(self, reason: int) -> None: ...
        def data_received(self, data: bytes) -> None: ...

    def _upgraded(self, data: bytes, exc: HttpParserUpgrade) -> None:
        """The parser stopped after a request with `Connection: upgrade`. A WebSocket
        handshake keeps what follows for `detach` (or `resume_http` if the upgrade is
        refused); any other upgrade is answered as plain HTTP and the connection closes
        after it (no bytes after the head are trusted)."""
        req = self._last_parsed
        if req is not None and req.websocket:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            transport = self.transport
            if self._closed and transport is not None and transport.get_protocol() is not self:
                # `detach` ran during this very read (a handler accepted synchronously):
                # the rest of the read belongs to the new protocol.
                if offset < len(data) and not transport.is_closing():
                    transport.get_protocol().data_received(data[offset:])  # type: ignore[attr-defined]
                return
            self._upgrade_tail = bytearray(data[offset:])
            if req.responded:  # already answered as plain HTTP (a 404, a mock): go on as HTTP
                self.resume_http()
            return
        if req is not None:
            req.keep_alive = False
        self._stop_parsing()
        if self._active is None and not self._closed:
            self._close_after_response()  # it was answered already (synchronously)

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Hand the connection to a WebSocket: after the 101 was written, HTTP stops here
        and the caller gets the transport and the bytes the client sent after the
        upgrade request (it then sets its own protocol on the transport)."""
        transport = self.transport
        tail = bytes(self._upgrade_tail or b"")
        self._upgrade_tail = None
        self._parser_dead = True
        self._closed = True  # this protocol's callbacks are no longer called
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.ctx.release(self)
        req = self._active
        if req is not None:
            req.responded = True
            req.exchange = None
        self._active = None
        self._queue.clear()
        self._parsing = None
        self.parser = None
        if self._pause:
            self._pause = 0
            transport.resume_reading()
        return transport, tail

    def resume_http(self) -> None:
        """The upgrade was refused with an ordinary response: the connection stays HTTP.
        Called by `finish_response`: parse what followed the upgrade request as HTTP."""
        tail = self._upgrade_tail
        self._upgrade_tail = None
        self.resume_reading(P_BUFFER)
        if self._parser_dead or self._closed:
            return
        self.parser = new_request_parser(self.ctx.parser_kind, self, self.ctx.limits.max_head_bytes)
        if tail:
            self.data_received(bytes(tail))

