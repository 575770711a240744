"""OTLP protobuf encoding of spans: `encode` (spans to one serialised
`ExportTraceServiceRequest`, with the `opentelemetry-proto` message classes; no SDK).

Kept apart from the exporter (`otlp`) so a gateway without tracing never imports the
protobuf runtime.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan


def _value(v: Any) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    return AnyValue(string_value=str(v))


def _attributes(attrs: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_value(v)) for k, v in attrs.items()]


def encode(spans: list[Any], resource: dict[str, Any], scope_version: str) -> bytes:
    """`spans` (`tracing.Span`) as one serialised ExportTraceServiceRequest."""
    out = []
    for s in spans:
        span = PbSpan(trace_id=bytes.fromhex(s.trace_id), span_id=bytes.fromhex(s.span_id),
                      name=s.name, kind=s.kind, start_time_unix_nano=s.start, end_time_unix_nano=s.end,
                      attributes=_attributes(s.attributes))
        if s.parent_id:
            span.parent_span_id = bytes.fromhex(s.parent_id)
        span.flags = 0x101 if s.parent_id else 0x100  # sampled; the parent's remoteness is known
        if s.error is not None:
            span.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR, message=s.error))
        out.append(span)
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=_attributes(resource)),
        scope_spans=[ScopeSpans(scope=InstrumentationScope(name="edgeplane", version=scope_version), spans=out)],
    )])
    return request.SerializeToString()
