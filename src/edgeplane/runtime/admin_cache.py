"""`DELETE /cache` on the admin API: flush the response cache (`policies.cache`).

Query parameters, all optional and combined: `route` (a route key as written, e.g.
`GET /catalog/{proxy+}`, URL-encoded), `path` (one request path as clients send it, not
decoded, normalised as a request's is: every variant of it, whatever its query, caller
or `Vary` values), `stage`. Without any, every entry goes.

Answers 200 `{"flushed": N, "workers": W}`: the entries removed in every worker of this
host (in-memory stores are per worker; a Redis store is shared, flushed once per worker
that holds it). 404 when `route` (in `stage`) names no cached route; 502 when a worker
did not answer, naming it.

Invariant: a forwarded call (`x-edgeplane-forwarded`, honoured only on a worker's Unix
socket) flushes only that worker, so a call never loops.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

import orjson

if TYPE_CHECKING:
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request


class CacheFlushIntegration:
    __slots__ = ("gateway", "tasks", "forwarded")

    def __init__(self, gateway: Any, forwarded: Any) -> None:
        self.gateway = gateway
        # `admin`'s test of a call another worker forwarded (only served locally)
        self.forwarded: Any = forwarded
        self.tasks: set[asyncio.Task[None]] = set()

    def handle(self, proto: HttpProtocol, req: Request) -> None:
        task = proto.loop.create_task(self._later(proto, req))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _later(self, proto: HttpProtocol, req: Request) -> None:
        query = {k: v[-1] for k, v in parse_qs(req.query.decode("latin-1"), keep_blank_values=True).items()}
        route, stage = query.get("route"), query.get("stage")
        path, bad_path = _request_path(req.query, self.gateway)
        unknown = sorted(set(query) - {"route", "path", "stage"})
        body: dict[str, Any]
        if unknown:
            status, body = 400, {"message": f"unknown parameter {unknown[0]!r}: use route, path and stage"}
        elif bad_path is not None:
            status, body = 400, {"message": f"path: {bad_path}"}
        else:
            state = _cache_state(self.gateway)
            live = state.live() if state is not None else []
            if route is not None and not any(k == route and (stage is None or s == stage) for s, k, _ in live):
                status, body = 404, {"message": f"no cached route {route!r}"
                                                + (f" in stage {stage!r}" if stage is not None else "")}
            else:
                try:
                    flushed = await state.flush(route, path, stage) if state is not None else 0
                    status, body = 200, {"flushed": flushed, "workers": 1}
                except Exception as exc:  # Redis down: say so; nothing else changes
                    status, body = 502, {"message": f"cache flush failed: {type(exc).__name__}: {exc}"}
                if status == 200 and not self.forwarded(proto, req):
                    status, body = await self._others(body, query)
        if not req.responded and proto.transport is not None and not proto.transport.is_closing():
            if status >= 400:
                req.error = body["message"]
                proto.ctx.count_error(str(status))
            proto.send_local(req, status, orjson.dumps(body))

    async def _others(self, body: dict[str, Any], query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """The same flush in every other worker of this host."""
        forwarder, own, n = _workers(self.gateway)
        if forwarder is None:
            return 200, body
        target = "/cache" + ("?" + urlencode(query) if query else "")
        others = [i for i in range(n) if i != own]
        answers = await asyncio.gather(*(forwarder.request(i, "DELETE", target) for i in others))
        failed = []
        for i, (status, raw) in zip(others, answers, strict=True):
            if status == 200:
                body["flushed"] += orjson.loads(raw).get("flushed", 0)
                body["workers"] += 1
            elif status != 410:  # 410: no such worker now (restarting): nothing of it to flush
                failed.append(i)
        if failed:
            return 502, {"message": f"workers {failed} did not flush", **body}
        return 200, body


def _request_path(query: bytes, gateway: Any) -> tuple[str | None, str | None]:
    """`path=` as a client would send it (not percent-decoded: `/a%20b` flushes what
    requests for `/a%20b` stored), normalised like a request's: (path, None), (None,
    None) when absent, or (None, why it cannot be a path)."""
    from edgeplane.http.paths import PathRejected, normalize_path

    raw = next((part[5:] for part in query.split(b"&") if part.startswith(b"path=")), None)
    if raw is None:
        return None, None
    if not raw.startswith(b"/"):
        return None, "must start with '/' (a request path, without its query)"
    try:
        return normalize_path(raw, gateway.config.path_policy).decode("latin-1"), None
    except PathRejected as exc:
        return None, str(exc)


def _cache_state(gateway: Any) -> Any:
    runtime = getattr(gateway, "_runtime", None)
    return runtime.state.get("cache") if runtime is not None else None


def _workers(gateway: Any) -> tuple[Any, int, int]:
    """(forwarder, this worker's index, worker count), or (None, 0, 1) alone."""
    files = gateway._metrics.files
    registry = getattr(gateway, "_ws_registry", None)
    forwarder = getattr(registry, "forwarder", None)
    if files is None or forwarder is None:
        return None, 0, 1
    _, index, n = files
    return forwarder, index, n
