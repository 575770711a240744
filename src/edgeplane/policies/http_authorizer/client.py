"""The custom HTTP authorizer stage, modelled on AWS Lambda REQUEST authorizers.

Owns the stage that asks an external service whether a request may pass: it POSTs the
AWS payload (version 2.0) to the configured URL over the gateway's own pooled client
(`client.fetch`), reads the simple response `{"isAuthorized": bool, "context": {...}}`,
and caches the result keyed by the values of all identity sources (TTL `result_ttl`,
0 = off; `$context.routeKey` among the sources makes the cache per route).

Answers, as AWS: a missing identity source is 401 without a call; `isAuthorized: false`
is 403; a timeout, a non-200 answer or a body that is not the expected JSON is 500
`{"message":"Internal Server Error"}`, counted and logged once. The authorizer's
context is forwarded upstream as the configured headers.

Invariants:
- A cache hit is synchronous (the stage returns True or answers at once); only a miss
  suspends the chain (returns None) and resumes it with `proto.resume_chain`.
- The cache is bounded (`cache_max_entries`, oldest first out) and entries expire.
- A request whose client left while the call was in flight is not answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson

from edgeplane.config.model import PoolConfig, UpstreamConfig
from edgeplane.http.fields import UnsafeField
from edgeplane.http.request import forwarded, header, log_extra
from edgeplane.observability.metrics import ALLOWED, CACHE_HIT, DENIED, ERROR
from edgeplane.plugins.api import FastStage
from edgeplane.policies.jwt.jwks_source import split_url
from edgeplane.upstream.client import FetchError, fetch
from edgeplane.upstream.cluster import Upstream

if TYPE_CHECKING:
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request

log = logging.getLogger("edgeplane.authorizer")


class DecisionCache:
    """A custom authorizer's decisions by identity (`cfg.result_ttl`, at most
    `cfg.cache_max_entries`, oldest out first), and its call counters; shared by the HTTP
    and the function (`policies.function_authorizer`) authorizers."""

    cfg: Any
    cache: OrderedDict[tuple, tuple[float, bool, dict]]

    def cached(self, key: tuple, now: float) -> tuple[bool, dict] | None:
        entry = self.cache.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self.cache[key]
            return None
        return entry[1], entry[2]

    def remember(self, key: tuple, now: float, allowed: bool, context: dict) -> None:
        ttl = self.cfg.result_ttl
        if ttl <= 0:
            return
        cache = self.cache
        cache[key] = (now + ttl, allowed, context)
        if len(cache) > self.cfg.cache_max_entries:
            cache.popitem(last=False)


class HttpAuthorizerClient(DecisionCache):
    """Per authorizer: the pooled connection to its URL and the result cache."""

    __slots__ = ("cfg", "upstream", "path", "cache", "calls", "failures")

    def __init__(self, cfg: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        target, self.path = split_url(cfg.url)
        self.upstream = Upstream(UpstreamConfig(name=f"authorizer:{cfg.name}", targets=(target,),
                                                pool=PoolConfig(connect_timeout=cfg.timeout)), loop)
        self.cache = OrderedDict()
        self.calls = 0
        self.failures = 0

    async def ask(self, payload: dict, traceparent: bytes | None = None) -> tuple[bool, dict]:
        """POST the payload; (isAuthorized, context), or raise FetchError/ValueError."""
        self.calls += 1
        headers = {"content-type": "application/json"}
        if traceparent is not None:  # tracing: the call's span is the authorizer's parent
            headers["traceparent"] = traceparent.decode()
        status, _, body = await fetch(
            self.upstream.pick(), "POST", self.path, headers=headers, body=orjson.dumps(payload),
            timeout=self.cfg.timeout, max_bytes=64 * 1024)
        if status != 200:
            raise ValueError(f"authorizer answered status {status}")
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ValueError("authorizer answered something that is not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("isAuthorized"), bool):
            raise ValueError("authorizer answer lacks a boolean 'isAuthorized'")
        context = answer.get("context") or {}
        if not isinstance(context, dict):
            raise ValueError("authorizer 'context' is not an object")
        return answer["isAuthorized"], context

    async def close(self) -> None:
        await self.upstream.close()

    def telemetry(self) -> dict[str, Any]:
        return {"url": self.cfg.url, "calls": self.calls, "failures": self.failures,
                "cached": len(self.cache)}


class HttpAuthorizerStage(FastStage):
    __slots__ = ("client", "sources", "forward", "name", "tasks", "outcomes")

    def __init__(self, client: HttpAuthorizerClient, outcomes: list[int] | None = None) -> None:
        self.client = client
        self.name = client.cfg.name
        # [allowed, denied, error, cache hits] (observability.metrics.AuthorizerOutcomes)
        self.outcomes = outcomes if outcomes is not None else [0, 0, 0, 0]
        # Each source compiled to (kind, detail): ("h", b"authorization"), ("q", "token"),
        # ("route", None), ("ip", None).
        self.sources: list[tuple[str, Any]] = []
        for source in client.cfg.identity_source:
            if source.startswith("$request.header."):
                self.sources.append(("h", source[16:].lower().encode()))
            elif source.startswith("$request.querystring."):
                self.sources.append(("q", source[21:]))
            elif source == "$context.routeKey":
                self.sources.append(("route", None))
            else:
                self.sources.append(("ip", None))
        self.forward = [(h.encode(), k) for h, k in client.cfg.forward_context]
        self.tasks: set[asyncio.Task] = set()

    def _identity(self, proto: HttpProtocol, req: Request) -> tuple[str, ...] | None:
        values: list[str] = []
        query: dict[str, str] | None = None
        value: str | None
        for kind, detail in self.sources:
            if kind == "h":
                raw = header(req, detail)
                value = None if raw is None else raw.decode("latin-1")
            elif kind == "q":
                if query is None:
                    query = dict(parse_qsl(req.query.decode("latin-1")))
                value = query.get(detail)
            elif kind == "route":
                value = req.route_key
            else:
                value = req.client_ip or proto.peer_ip
            if not value:
                return None
            values.append(value)
        return tuple(values)

    def __call__(self, proto: HttpProtocol, req: Request) -> bool | None:
        identity = self._identity(proto, req)
        if identity is None:
            self.outcomes[DENIED] += 1
            req.auth_error = "missing identity source"
            proto.send_error(req, 401, f"{self.name}: missing identity source")
            return False
        # a decision is the stage's: the same identity may be allowed in one, not another
        hit = self.client.cached((req.stage, *identity), time.monotonic())
        if hit is not None:
            self.outcomes[CACHE_HIT] += 1
            return self._decide(proto, req, *hit)
        index = req.route.stages.index(self) + 1
        task = proto.loop.create_task(self._ask(proto, req, identity, index))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return None

    async def _ask(self, proto: HttpProtocol, req: Request, identity: tuple[str, ...], index: int) -> None:
        client = self.client
        transport = proto.transport
        tracer, span, traceparent = proto.ctx.tracer, None, None
        if tracer is not None:
            upstream = getattr(client, "upstream", None)  # (a function authorizer has none)
            where: dict[str, Any] = {"edgeplane.authorizer": self.name}
            if upstream is not None:
                target = upstream.pools[0].target
                where.update({"http.request.method": "POST", "server.address": target.host,
                              "server.port": target.port})
            span, traceparent = tracer.child(req, f"authorizer {self.name}", where)
        try:
            allowed, context = await client.ask(payload(proto, req, identity), traceparent)
        except (FetchError, ValueError) as exc:
            if span is not None:
                tracer.end_child(span, None, str(exc))
            client.failures += 1
            self.outcomes[ERROR] += 1
            req.pending = False
            if not req.responded and not transport.is_closing():
                req.integration_error = f"authorizer {self.name}: {exc}"
                req.auth_error = str(exc)
                proto.send_error(req, 500, f"authorizer {self.name} failed: {exc}")
            return
        if span is not None:
            tracer.end_child(span, 200)
            span.attributes["edgeplane.authorized"] = allowed
        client.remember((req.stage, *identity), time.monotonic(), allowed, context)
        req.pending = False
        if req.responded or transport.is_closing():
            return
        if self._decide(proto, req, allowed, context):
            proto.resume_chain(req, index)

    def _decide(self, proto: HttpProtocol, req: Request, allowed: bool, context: dict) -> bool:
        if not allowed:
            self.outcomes[DENIED] += 1
            req.auth_error = "not authorized"
            proto.send_error(req, 403, f"{self.name}: not authorized")
            return False
        req.auth_context = context
        if self.forward:
            try:
                req.extra_upstream = [*(req.extra_upstream or ()), *forwarded(self.forward, context)]
            except UnsafeField as exc:
                # The authorizer (the operator's service) answered a value that could
                # split the upstream request: never forwarded; the gateway side's 500.
                log.warning("route %r: %s: refused request %s: forwarded context %s",
                            req.route_key, self.name, req.request_id.decode("latin-1"), exc,
                            extra=log_extra(req))
                self.outcomes[ERROR] += 1
                req.auth_error = f"forwarded context: {exc}"
                proto.send_error(req, 500, "Internal Server Error")
                return False
        self.outcomes[ALLOWED] += 1
        return True


def payload(proto: HttpProtocol, req: Request, identity: tuple) -> dict[str, Any]:
    """The AWS HTTP API authorizer payload, version 2.0."""
    headers: dict[str, str] = {}
    for name, value in req.headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = headers[key] + "," + text if key in headers else text
    query = req.query.decode("latin-1")
    path = (req.base_path or req.path).decode("latin-1")  # as sent: a named stage's prefix included
    return {
        "version": "2.0",
        "type": "REQUEST",
        "routeArn": req.route_key,
        "identitySource": list(identity),
        "routeKey": req.route_key,
        "rawPath": path,
        "rawQueryString": query,
        "headers": headers,
        "queryStringParameters": dict(parse_qsl(query)) if query else {},
        "pathParameters": {k: v.decode("latin-1") for k, v in (req.params or {}).items()},
        "requestContext": {
            "http": {"method": req.method.decode(), "path": path, "protocol": "HTTP/" + req.version,
                     "sourceIp": req.client_ip or proto.peer_ip,
                     "userAgent": headers.get("user-agent", "")},
            "requestId": req.request_id.decode("latin-1"),
            "routeKey": req.route_key,
            "stage": req.stage,
            "timeEpoch": int(req.t_wall * 1000),
        },
    }
