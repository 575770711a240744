"""Calling a handler for one request: `FunctionIntegration` (the compiled route's
integration object) and the pool sync handlers run in.

Owns reading the request body (up to the payload limit, 413 past it), the call (an
`async def` handler as a task on the gateway's loop; any other in the bounded thread
pool, so it never blocks the loop), the integration timeout (504 `{"message":"Endpoint
request timed out"}`), and writing the answer (`event.read_response`) with the route's
response hooks.

Invariants:
- the client gets exactly one answer; a handler that finishes after the client left, or
  after the timeout answered, is ignored (its result is dropped, as API Gateway drops a
  late Lambda's);
- a handler's exception is its own: 500 `{"message":"Internal Server Error"}` with the
  traceback logged under the request id (not counted as a gateway bug); a malformed
  answer is 502, logged;
- an async handler is cancelled at the timeout; a sync one cannot be and keeps its
  thread until it returns (the pool's size bounds how many can be stuck).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from edgeplane.http.request import log_extra
from edgeplane.http.responses import CONTINUE_100
from edgeplane.integrations.function.event import LambdaContext, Malformed, build_event, read_response

if TYPE_CHECKING:
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request

log = logging.getLogger("edgeplane.function")

T_UPSTREAM = 4  # http.replies.T_UPSTREAM: the backstop deadline while a handler runs


class FunctionPool:
    """The threads sync handlers run in (one pool per gateway), with its counters.

    Daemon threads, unlike `concurrent.futures`' (joined at interpreter exit): a handler
    stuck forever must not keep a stopping gateway alive. Calls queued when the pool is
    closed (a reload retired it) still run; then its threads end."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.started = 0
        self.busy = 0  # calls running in a thread now (a stuck one stays counted)
        self.calls = {"ok": 0, "error": 0, "timeout": 0, "malformed": 0}
        self.closed = False

    def submit(self, loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = loop.create_future()
        if self.started < self.threads:
            self.started += 1
            threading.Thread(target=self._work, name=f"edgeplane-fn-{self.started}", daemon=True).start()
        self.queue.put((loop, future, contextvars.copy_context(), fn, args))
        return future

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            loop, future, context, fn, args = item
            self.busy += 1
            try:
                result, error = context.run(fn, *args), None
            except BaseException as exc:  # SystemExit too: the handler's, never the thread's end
                result, error = None, exc
            finally:
                self.busy -= 1
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def metric_samples(self) -> list[tuple[str, tuple[str, ...], Any, float]]:
        out: list[tuple[str, tuple[str, ...], Any, float]] = [
            ("edgeplane_function_pool_threads", (), None, self.threads),
            ("edgeplane_function_pool_busy", (), None, self.busy)]
        out += [("edgeplane_function_invocations", (result,), self, n) for result, n in self.calls.items()]
        return out

    def close(self) -> None:
        self.closed = True
        for _ in range(self.started):
            self.queue.put(None)  # after the queued calls: they still run


class HandlerExit(Exception):
    """A handler raised SystemExit or KeyboardInterrupt: its failure, as an Exception."""


async def _guarded(call: Any) -> Any:
    """Await an async handler so that SystemExit/KeyboardInterrupt stay in this call:
    asyncio re-raises those out of the event loop when they escape a task (and
    `wait_for` runs its awaitable as a task of its own)."""
    try:
        return await call
    except (SystemExit, KeyboardInterrupt) as exc:
        raise HandlerExit(f"{type(exc).__name__}: {exc}") from exc


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return  # timed out: nobody waits for it
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class FunctionIntegration:
    __slots__ = ("handler", "name", "is_async", "version", "timeout", "max_payload", "pool",
                 "stage_variables", "tasks")

    def __init__(self, handler: Any, name: str, version: str, timeout: float, max_payload: int,
                 pool: FunctionPool, stage_variables: dict[str, str] | None) -> None:
        self.handler = handler
        self.name = name
        self.is_async = asyncio.iscoroutinefunction(handler)
        self.version = version
        self.timeout = timeout
        self.max_payload = max_payload
        self.pool = pool
        self.stage_variables = stage_variables
        self.tasks: set[asyncio.Task[None]] = set()

    def handle(self, proto: HttpProtocol, req: Request) -> None:
        if req.content_length is not None and req.content_length > self.max_payload:
            req.keep_alive = False
            proto.send_error(req, 413, f"request payload larger than the function's {self.max_payload} bytes")
            return
        call = _Call(self, proto, req)
        req.exchange = call
        if req.complete:
            call.on_request_complete()
        else:
            if req.expect_continue:
                proto.write(CONTINUE_100)
            proto.set_deadline(T_UPSTREAM, proto.ctx.limits.body_timeout)


class _Call:
    """One request's call: collects the body (the server's exchange interface), then runs
    the handler and answers."""

    __slots__ = ("integ", "proto", "req", "chunks", "size", "done", "task")

    def __init__(self, integ: FunctionIntegration, proto: HttpProtocol, req: Request) -> None:
        self.integ = integ
        self.proto = proto
        self.req = req
        self.chunks: list[bytes] = list(req.body_buf or ())
        req.body_buf = None
        self.size = sum(map(len, self.chunks))
        self.done = False  # answered (or the client left)
        self.task: asyncio.Task[None] | None = None

    # -- the body ---------------------------------------------------------------------
    def on_request_body(self, chunk: bytes) -> None:
        if self.done or self.task is not None:
            return
        self.size += len(chunk)
        if self.size > self.integ.max_payload:
            self.done = True
            self.req.keep_alive = False
            self.proto.send_error(self.req, 413, f"request payload larger than the function's "
                                                 f"{self.integ.max_payload} bytes")
            return
        self.chunks.append(chunk)

    def on_request_complete(self) -> None:
        if self.done or self.task is not None:
            return
        integ = self.integ
        self.proto.set_deadline(T_UPSTREAM, integ.timeout + 1.0)  # backstop: the task's own timeout comes first
        self.task = self.proto.loop.create_task(self._run(b"".join(self.chunks)))
        self.chunks = []
        integ.tasks.add(self.task)
        self.task.add_done_callback(integ.tasks.discard)

    # -- the call ---------------------------------------------------------------------
    async def _run(self, body: bytes) -> None:
        integ, proto, req = self.integ, self.proto, self.req
        t0 = time.perf_counter()
        deadline = time.monotonic() + integ.timeout
        try:
            event = build_event(req, body, version=integ.version, source_ip=req.client_ip or proto.peer_ip,
                                stage_variables=integ.stage_variables)
        except Exception as exc:  # the gateway's own bug
            self._answered()
            proto.internal_error(req, exc, f"the event of route {req.route_key!r}")
            return
        context = LambdaContext(integ.name, req.request_id.decode("latin-1"), deadline)
        pool = integ.pool
        try:
            if integ.is_async:
                result = await asyncio.wait_for(_guarded(integ.handler(event, context)), integ.timeout)
            else:
                result = await asyncio.wait_for(pool.submit(proto.loop, integ.handler, event, context),
                                                integ.timeout)
        except TimeoutError:
            pool.calls["timeout"] += 1
            self._fail(504, f"function {integ.name} did not return within {integ.timeout:g}s")
            return
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the gateway cancelled this call (it is stopping)
            self._raised(exc)  # the handler raised CancelledError itself: its error
            return
        except BaseException as exc:  # SystemExit, KeyboardInterrupt too: one call fails, not the gateway
            self._raised(exc)
            return
        finally:
            req.integration_latency = time.perf_counter() - t0
        try:
            status, content_type, headers, payload = read_response(result, integ.version)
            if len(payload) > integ.max_payload:
                raise Malformed(f"response payload of {len(payload)} bytes is over {integ.max_payload}")
        except Malformed as exc:
            pool.calls["malformed"] += 1
            log.error("function %s answered a malformed response (request %s): %s", integ.name,
                      req.request_id.decode("latin-1"), exc, extra=log_extra(req))
            self._fail(502, f"function {integ.name}: malformed response: {exc}")
            return
        pool.calls["ok"] += 1
        if self._answered():
            req.integration_status = status
            proto.send_local(req, status, payload, content_type, headers)

    def _raised(self, exc: BaseException) -> None:
        integ, req = self.integ, self.req
        integ.pool.calls["error"] += 1
        log.error("function %s raised (request %s)", integ.name, req.request_id.decode("latin-1"),
                  exc_info=(type(exc), exc, exc.__traceback__), extra=log_extra(req))
        self._fail(500, f"function {integ.name} raised {type(exc).__name__}")

    def _answered(self) -> bool:
        """Claim the one answer: False when it was given (timeout) or the client left."""
        if self.done:
            return False
        self.done = True
        proto = self.proto
        return not (proto._closed or self.req.responded)

    def _fail(self, status: int, reason: str) -> None:
        if self._answered():
            self.req.integration_error = reason
            self.proto.send_error(self.req, status, reason)

    # -- the server's exchange interface ------------------------------------------------
    @property
    def timeout(self) -> float:  # the send deadline the server sets again when the client reads
        return self.integ.timeout

    def abort(self, reason: str) -> None:
        self.done = True  # the client left: a late result is dropped

    def request_stalled(self) -> bool:
        return self.task is None and not self.done

    def on_timeout(self) -> None:
        if self.task is None:  # the body stopped coming
            if not self.done:
                self.done = True
                self.proto.send_error(self.req, 408, "request body not received in time")
            return
        self._fail(504, f"function {self.integ.name} did not return in time")

    def pause_upstream(self) -> None:
        pass

    def resume_upstream(self) -> None:
        pass
