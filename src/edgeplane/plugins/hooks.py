"""Running a plugin's public hooks inside the server, and failing safely when they break.

Owns `PublicStage` (a user's request function as a chain stage, sync or async),
`run_response_hooks` (response hooks over a response head, upstream or local) and
`run_log_hooks`, plus `check_hook`, which refuses at load a hook declared `async def`
where only a synchronous one can run.

Invariants:
- an exception raised by a hook is the gateway's: `HttpProtocol.internal_error` answers
  500 (or drops a started response), logs the traceback with the request id once, and
  counts it; the connection and the worker carry on;
- a synchronous hook that returns a coroutine is an error at its first call (the
  coroutine is closed, never left un-awaited), with a message naming the hook;
- nothing here runs for a route without public hooks.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any

from edgeplane.plugins.api import FastStage, LocalReply, PluginError, RequestView, ResponseView, check_header_value

if TYPE_CHECKING:
    from edgeplane.http.request import Request

log = logging.getLogger("edgeplane.plugins")

# The server's connection protocol (`http.protocol.HttpProtocol`, which imports this
# package): only its documented methods are used here.
HttpProtocol = Any

__all__ = ["PublicStage", "check_hook", "run_response_hooks", "run_log_hooks", "reply_extra"]


def _is_async(fn: Any) -> bool:
    """`async def` functions, and objects whose `__call__` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def check_hook(policy: str, kind: str, fn: Any) -> None:
    """Refuse, at load, an `async def` where a synchronous hook is required."""
    if _is_async(fn):
        raise PluginError(f"policy {policy!r}: the {kind} hook {getattr(fn, '__qualname__', fn)!r} is "
                          f"`async def`; {kind} hooks run synchronously: make it a plain function")


def _not_awaitable(policy: str, kind: str, fn: Any, result: Any) -> None:
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if close is not None:
            close()  # never leave a coroutine un-awaited
        raise PluginError(f"policy {policy!r}: the {kind} hook {getattr(fn, '__qualname__', fn)!r} is "
                          f"declared synchronous but returned {type(result).__name__}; declare it `async def`")


def reply_extra(headers: Any) -> bytes:
    """Header lines for a `LocalReply`'s headers, through the control-character check."""
    out = []
    for name, value in headers.items():
        check_header_value(name, value)
        out.append(f"{name.lower()}: {value}\r\n".encode("latin-1"))
    return b"".join(out)


def _send_reply(proto: HttpProtocol, req: Request, policy: str, reply: Any) -> None:
    if not isinstance(reply, LocalReply):
        raise PluginError(f"policy {policy!r}: a request hook returned {type(reply).__name__}; "
                          "expected None (continue) or a LocalReply")
    body, content_type = reply.encode()
    extra = reply_extra(reply.headers)
    if reply.status >= 400:
        req.error = f"{policy}: refused with {reply.status}"
        proto.ctx.count_error(str(reply.status))
    proto.send_local(req, reply.status, body, content_type, extra)


class PublicStage(FastStage):
    """A user's request function in the chain. `index` is its place in the route's
    stages, where an asynchronous one resumes."""

    __slots__ = ("policy", "fn", "index", "is_async", "tasks")

    def __init__(self, policy: str, fn: Any, index: int) -> None:
        self.policy = policy
        self.fn = fn
        self.index = index
        self.is_async = _is_async(fn)
        self.tasks: set[asyncio.Task[None]] = set()

    def __call__(self, proto: HttpProtocol, req: Request) -> bool | None:
        result = self.fn(RequestView(proto, req))
        if result is None:
            return True
        if self.is_async:
            task = proto.loop.create_task(self._finish(proto, req, result))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return None
        _not_awaitable(self.policy, "request", self.fn, result)
        _send_reply(proto, req, self.policy, result)
        return False

    async def _finish(self, proto: HttpProtocol, req: Request, pending: Any) -> None:
        try:
            result = await pending
            if req.responded or proto.transport is None or proto.transport.is_closing():
                return
            if result is None:
                proto.resume_chain(req, self.index + 1)
            else:
                req.pending = False
                _send_reply(proto, req, self.policy, result)
        except Exception as exc:  # the plugin's bug is the gateway's 500, never the client's 400
            req.pending = False
            proto.internal_error(req, exc, f"policy {self.policy!r}")


def run_response_hooks(proto: HttpProtocol, req: Request, status: int,
                       headers: list[tuple[str, str]]) -> int:
    """Run the route's response hooks over a response head; returns the new status and
    changes `headers` in place. Raises what a hook raises (the caller answers 500)."""
    view = ResponseView(status, headers, RequestView(proto, req))
    for policy, fn in req.route.response_hooks:
        _not_awaitable(policy, "response", fn, fn(view))
    status = view.status
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise PluginError(f"a response hook set the status to {status!r} (a final status is 200..599)")
    return status


_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))


def hooked_head(proto: HttpProtocol, req: Request, status: int,
                headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]]]:
    """An integration's raw response head after the route's response hooks. Framing
    headers are the gateway's: hooks neither see nor change them."""
    framing = [(n, v) for n, v in headers if n.lower() in _FRAMING]
    visible = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in headers
               if n.lower() not in _FRAMING]
    status = run_response_hooks(proto, req, status, visible)
    return status, framing + [(n.encode("latin-1"), v.encode("latin-1")) for n, v in visible]


def run_log_hooks(hooks: Any, record: dict[str, Any]) -> None:
    """After the response: a failing log hook is logged and counted, nothing else."""
    for policy, fn in hooks:
        try:
            _not_awaitable(policy, "log", fn, fn(record))
        except Exception:
            log.exception("log hook of policy %r failed (request %s)", policy, record.get("requestId"),
                          extra={"request_id": record.get("requestId")})
