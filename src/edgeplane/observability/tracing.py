"""Tracing: W3C Trace Context in and out, sampling, and the spans of one request.

Owns `Tracer` (one per gateway while `tracing` is configured) and `Span`. The request
path calls three things, each a no-op when tracing is off (`ctx.tracer` is None):

- `begin(req)`, lazily (by the first of the integration, a custom authorizer or the
  request's end): reads `traceparent`; continues its trace (same trace id, the
  parent's sampled flag: parent-based sampling) or starts one (sampled with
  `sample_ratio`). Sets `req.trace_id` (every request: `$context.traceId`) and, when
  sampled, `req.span`, the gateway's SERVER span.
- `outgoing(req)` and `child(req, ...)`: the `traceparent` header for a call the gateway
  makes for the request (the integration, an authorizer), naming the CLIENT child span
  of that call as parent; unsampled, a fresh span id and flags `00`. With a continued
  trace, `tracestate` is forwarded as the client sent it.
- `finish(req, proto)`, where the request ends (`ServerContext.request_done`): closes
  the sampled spans with the HTTP semantic-convention attributes and hands them to the
  exporter (`otlp.OtlpExporter`), which batches them off the request path.

Invariants: an invalid `traceparent` (wrong length or version `ff`, upper-case or
non-hex digits, an all-zero id) is ignored, as W3C says, and a new trace starts; the
request path never waits for the exporter; an unsampled request costs an id or two and
no allocation of spans.
"""

from __future__ import annotations

import os
import random
import re
import time
from typing import Any

from edgeplane.http.request import header

SERVER, CLIENT = 2, 3  # OTLP Span.SpanKind
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_SAMPLED = frozenset("13579bdf")  # the last hex digit of the flags: bit 0 is `sampled`


class Span:
    """A finished or open span: ids as lower-case hex text, times in epoch ns."""

    __slots__ = ("trace_id", "span_id", "parent_id", "name", "kind", "start", "end", "attributes", "error",
                 "children", "t0")

    def __init__(self, trace_id: str, span_id: str, parent_id: str | None, name: str, kind: int,
                 start: int) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.name = name
        self.kind = kind
        self.start = start
        self.end = 0
        self.attributes: dict[str, Any] = {}
        self.error: str | None = None  # the span's status is ERROR with this message
        self.children: list[Span] = []
        self.t0 = 0.0  # perf_counter at start (children of a request)


# version 00: exactly these 55 characters; a later version may append "-..." fields.
_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(?:-[\x21-\x7e]*)?")


def parse_traceparent(value: bytes) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid `traceparent`, else None. Leading
    and trailing spaces and tabs are not part of a field value (RFC 9110)."""
    value = value.strip(b" \t")
    if _TRACEPARENT.fullmatch(value) is None:
        return None
    if value[:2] == b"ff" or (value[:2] == b"00" and len(value) != 55):
        return None
    text = value[:55].decode("ascii")
    trace_id, parent_id = text[3:35], text[36:52]
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, text[54] in _SAMPLED


_random = random.random
# New trace ids: a random half per process, then 16 random hex digits per trace (the
# half that trace-id ratio samplers downstream read). Ids are cut from a pool of random
# hex refilled from os.urandom: formatting a random int as hex costs more than that.
_TRACE_PREFIX = os.urandom(8).hex()
_pool = ""
_pos = 0


def _span_id() -> str:
    """16 random hex digits (never all zeros: W3C forbids it)."""
    global _pool, _pos
    pos = _pos
    if pos >= len(_pool):
        _pool, pos = os.urandom(2048).hex(), 0
    _pos = pos + 16
    found = _pool[pos:pos + 16]
    return found if found != "0000000000000000" else "0000000000000001"


class Tracer:
    __slots__ = ("ratio", "exporter", "service_name")

    def __init__(self, ratio: float, exporter: Any, service_name: str) -> None:
        self.ratio = ratio
        self.exporter = exporter  # otlp.OtlpExporter (or anything with `submit(spans)`)
        self.service_name = service_name

    def begin(self, req: Any) -> None:
        """Decide the request's trace (see the module docstring); idempotent."""
        if req.trace_id is not None:
            return
        raw = req.traceparent  # captured by the parser (`http.protocol`)
        parent = parse_traceparent(raw) if raw is not None else None
        if parent is not None:
            trace_id, parent_id, sampled = parent
        else:  # a new trace: an invalid header is forgotten (its tracestate is not forwarded)
            req.traceparent = None
            trace_id, parent_id = _TRACE_PREFIX + _span_id(), None
            sampled = _random() < self.ratio
        req.trace_id = trace_id
        if sampled:
            span = req.span = Span(trace_id, _span_id(), parent_id, "", SERVER, int(req.t_wall * 1e9))
            span.t0 = req.t_start

    def child(self, req: Any, name: str, attributes: dict[str, Any],
              started: float | None = None) -> tuple[Span | None, bytes]:
        """A CLIENT span for a call made for `req` (None when unsampled), begun at
        `started` (perf_counter; default now), and the `traceparent` value that call
        carries."""
        if req.trace_id is None:
            self.begin(req)
        parent = req.span
        if parent is None:  # unsampled: a span id no one records, flags 00
            return None, ("00-" + req.trace_id + "-" + _span_id() + "-00").encode()
        now = time.perf_counter() if started is None else started
        span = Span(parent.trace_id, _span_id(), parent.span_id, name, CLIENT,
                    parent.start + int((now - parent.t0) * 1e9))
        span.t0 = now
        span.attributes = attributes
        parent.children.append(span)
        return span, b"00-%s-%s-01" % (span.trace_id.encode(), span.span_id.encode())

    def outgoing(self, req: Any, exchange: Any) -> list[bytes]:
        """The integration's trace header lines: `traceparent` (its span is made once: a
        retry reuses it) and, with a continued trace, the client's `tracestate`."""
        span = exchange.span
        if span is not None:
            value = b"00-%s-%s-01" % (span.trace_id.encode(), span.span_id.encode())
        else:
            value = self._integration(req, exchange)
        lines = [b"traceparent: ", value, b"\r\n"]
        if req.traceparent is not None:  # valid (`begin`): the trace goes on, with its state
            for key, state in req.headers:
                if key == b"tracestate":
                    lines += (b"tracestate: ", state, b"\r\n")
        return lines

    def _integration(self, req: Any, exchange: Any) -> bytes:
        if req.trace_id is None:
            self.begin(req)
        if req.span is None:  # unsampled: no span, so no attributes to gather
            return self.child(req, "", {})[1]
        pool = exchange.pool
        attributes = {"http.request.method": req.method.decode("latin-1"),
                      "edgeplane.upstream": getattr(exchange.integ, "name", "")}
        if pool is not None:
            attributes["server.address"], attributes["server.port"] = pool.target.host, pool.target.port
        # from the dispatch, as the integration latency is measured
        span, value = self.child(req, req.method.decode("latin-1"), attributes, exchange.t_dispatch or None)
        if span is not None:
            exchange.span = span
        return value

    @staticmethod
    def end_child(span: Span, status: int | None, error: str | None = None) -> None:
        span.end = span.start + int((time.perf_counter() - span.t0) * 1e9)
        if status:
            span.attributes["http.response.status_code"] = status
        if error is not None or (status or 0) >= 400:
            span.error = error or f"status {status}"

    def finish(self, req: Any, proto: Any) -> None:
        """The request ended: its spans, when sampled, go to the exporter."""
        if req.trace_id is None:
            self.begin(req)
        span = req.span
        if span is None:
            return
        req.span = None  # exported once
        span.end = span.start + int((time.perf_counter() - span.t0) * 1e9)
        method = req.method.decode("latin-1")
        route = req.route_key if req.route is not None else None
        span.name = route if route is not None else method
        a = span.attributes
        a["http.request.method"] = method
        a["url.path"] = (req.base_path or req.path).decode("latin-1")
        a["edgeplane.stage"] = req.stage
        a["url.scheme"] = proto.scheme.decode() if isinstance(proto.scheme, bytes) else str(proto.scheme)
        if route is not None:
            a["http.route"] = route
        a["http.response.status_code"] = req.status
        a["network.protocol.version"] = req.version
        a["client.address"] = req.client_ip or proto.peer_ip
        a["network.peer.address"] = proto.peer_ip
        if req.host:
            a["server.address"] = req.host.decode("latin-1")
        agent = header(req, b"user-agent")
        if agent is not None:
            a["user_agent.original"] = agent.decode("latin-1")
        a["edgeplane.request_id"] = req.request_id.decode("latin-1")
        if req.status >= 500:
            span.error = req.error or req.integration_error or f"status {req.status}"
        for child in span.children:
            if not child.end:  # the integration: until its response head (as IntegrationLatency)
                taken = req.integration_latency
                child.end = child.start + int((taken if taken is not None else time.perf_counter() - child.t0) * 1e9)
                if req.integration_status:
                    child.attributes["http.response.status_code"] = req.integration_status
                    if req.integration_status >= 400:
                        child.error = f"status {req.integration_status}"
                elif req.integration_error:
                    child.error = req.integration_error
        self.exporter.submit([span, *span.children])
