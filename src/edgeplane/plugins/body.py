"""Holding a route's chain until the request body is in, for stages that read it
(parameter mapping from `$request.body`, request validation).

Owns `BodyWait`, which takes the server's exchange interface while the body arrives:
chunks are kept (past `limit`: 413, and the connection closes after it), and at the end
the body is put back in `req.body_buf`, the stage's `then(proto, req)` runs, and the
chain resumes after the stage (unless `then` answered). The integration then finds a
complete request with its body, as if it had arrived at once.

Invariants: only routes whose stages ask for it buffer a body; the chain resumes at most
once; a client that leaves or stalls never resumes it (the server's body deadline ends
the exchange with 408).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgeplane.http.responses import CONTINUE_100

if TYPE_CHECKING:
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request

T_UPSTREAM = 4  # http.replies.T_UPSTREAM: the server's deadline while this waits


def too_large(proto: HttpProtocol, req: Request, limit: int, why: str) -> bool:
    """Answer 413 when the declared length is past `limit`; True when it did."""
    if req.content_length is not None and req.content_length > limit:
        req.keep_alive = False
        proto.send_error(req, 413, f"{why}: at most {limit} bytes")
        return True
    return False


class BodyWait:
    __slots__ = ("stage", "proto", "req", "limit", "why", "then", "chunks", "size", "done")

    timeout = 29.0  # (read by the server when the client's socket drains; nothing is sent meanwhile)

    def __init__(self, stage: Any, proto: HttpProtocol, req: Request, limit: int, why: str,
                 then: Callable[[HttpProtocol, Request], bool]) -> None:
        self.stage, self.proto, self.req, self.limit, self.why, self.then = stage, proto, req, limit, why, then
        self.chunks: list[bytes] = list(req.body_buf or ())
        req.body_buf = None
        self.size = sum(map(len, self.chunks))
        self.done = False
        req.exchange = self
        if req.expect_continue and not req.complete:
            proto.write(CONTINUE_100)  # the client waits for it before sending the body
        proto.set_deadline(T_UPSTREAM, proto.ctx.limits.body_timeout)

    def on_request_body(self, chunk: bytes) -> None:
        if self.done:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.done = True
            self.req.keep_alive = False
            self.req.pending = False
            self.proto.send_error(self.req, 413, f"{self.why}: at most {self.limit} bytes")
            return
        self.chunks.append(chunk)

    def on_request_complete(self) -> None:
        if self.done:
            return
        self.done = True
        req, proto = self.req, self.proto
        req.body_buf = self.chunks
        req.exchange = None
        try:
            go_on = self.then(proto, req)
        except Exception as exc:
            req.pending = False
            proto.internal_error(req, exc, f"route {req.route_key!r}")
            return
        if go_on:
            proto.resume_chain(req, req.route.stages.index(self.stage) + 1)
        else:
            req.pending = False

    def abort(self, reason: str) -> None:
        self.done = True

    def request_stalled(self) -> bool:
        return not self.done

    def on_timeout(self) -> None:
        pass

    def pause_upstream(self) -> None:
        pass

    def resume_upstream(self) -> None:
        pass
