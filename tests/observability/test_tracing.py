"""Tracing through a real gateway: W3C Trace Context in and out, and the span tree at a
real OTLP/HTTP receiver (a small server decoding with `opentelemetry-proto`).

A request passes a custom (HTTP) authorizer, then reaches the demo upstream, which
echoes the headers it saw; the receiver must get the gateway's SERVER span and two
CLIENT children (the authorizer call, the integration) whose ids are the parents named
in the `traceparent` headers the authorizer and the upstream received.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from test_metrics import scrape, value

from authorizer_peer import AuthorizerPeer
from conftest import RawClient, base_config
from edgeplane import Gateway
from edgeplane.observability.tracing import parse_traceparent

pytestmark = pytest.mark.timeout(60)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class OtlpReceiver:
    """POST /v1/traces: decodes each ExportTraceServiceRequest and keeps its spans."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> OtlpReceiver:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/traces"

    def spans(self) -> list:
        return [s for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
                fields = {k.lower(): v for k, v in fields.items()}
                body = await reader.readexactly(int(fields[b"content-length"]))
                self.content_types.append(fields.get(b"content-type", b""))
                self.requests.append(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/x-protobuf\r\n"
                             b"content-length: %d\r\n\r\n%s" % (self.status, len(answer), answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def until(self, n: int) -> list:
        for _ in range(200):
            if len(self.spans()) >= n:
                return self.spans()
            await asyncio.sleep(0.02)
        raise AssertionError(f"{n} spans not received: {self.spans()}")


def traced_config(upstream_port: int, endpoint: str, auth_url: str, ratio: float = 1.0, **tracing) -> dict:
    cfg = base_config(upstream_port, routes=[
        {"route": "GET /users/{id}", "auth": "custom", "integration": {"type": "http", "upstream": "demo"}},
        {"route": "GET /open", "integration": {"type": "http", "upstream": "demo"}},
    ])
    cfg["authorizers"] = {"custom": {"type": "http", "url": auth_url, "result_ttl": 0}}
    cfg["tracing"] = {"sample_ratio": ratio, "service_name": "edge-test", "flush_interval": "100ms",
                      "otlp": {"endpoint": endpoint}, **tracing}
    cfg["access_log"] = {"destination": "off"}
    return cfg


async def get(addr, path: str, headers: dict | None = None):
    return await RawClient.once(addr, "GET", path, headers)


async def test_a_continued_trace_arrives_as_a_span_tree_matching_the_headers_sent(upstream, gateway):
    receiver = await OtlpReceiver().start()
    auth = await AuthorizerPeer(lambda event: {"isAuthorized": True}).start()
    try:
        gw = await gateway(traced_config(upstream.port, receiver.endpoint, auth.url))
        r = await get(gw.addresses[0], "/users/7", {"traceparent": f"00-{TRACE}-{PARENT}-01",
                                                     "tracestate": "vendor=abc", "user-agent": "tracing-test",
                                                     "authorization": "Bearer t"})
        assert r.status == 200
        upstream_saw = json.loads(r.body)["headers"]
        spans = await receiver.until(3)
        assert receiver.content_types == [b"application/x-protobuf"]
        resource = {kv.key: kv.value.string_value for kv in receiver.requests[0].resource_spans[0].resource.attributes}
        assert resource["service.name"] == "edge-test"
        by_kind = {s.kind: s for s in spans if s.kind == 2}
        (server,) = by_kind.values()
        clients = [s for s in spans if s.kind == 3]
        assert len(clients) == 2
        # one trace: the client's; the gateway's span is a child of the client's span
        assert {s.trace_id.hex() for s in spans} == {TRACE}
        assert server.parent_span_id.hex() == PARENT
        assert all(c.parent_span_id == server.span_id for c in clients)
        attrs = {kv.key: kv.value for kv in server.attributes}
        assert server.name == "GET /users/{id}" and attrs["http.route"].string_value == "GET /users/{id}"
        assert attrs["http.response.status_code"].int_value == 200
        assert attrs["http.request.method"].string_value == "GET"
        assert attrs["url.path"].string_value == "/users/7"
        assert attrs["user_agent.original"].string_value == "tracing-test"
        # the upstream saw the integration span as its parent, and the client's tracestate
        (integration,) = [c for c in clients if not c.name.startswith("authorizer")]
        trace_id, parent_id, sampled = parse_traceparent(upstream_saw["traceparent"].encode())
        assert (trace_id, parent_id, sampled) == (TRACE, integration.span_id.hex(), True)
        assert upstream_saw["tracestate"] == "vendor=abc"
        assert {kv.key: kv.value.int_value for kv in integration.attributes}["http.response.status_code"] == 200
        # the authorizer saw its own call's span as parent
        (authorizer,) = [c for c in clients if c.name == "authorizer custom"]
        assert parse_traceparent(auth.seen[0][0][b"traceparent"]) == (TRACE, authorizer.span_id.hex(), True)
        # the spans nest in time
        assert server.start_time_unix_nano <= authorizer.start_time_unix_nano < authorizer.end_time_unix_nano
        assert authorizer.end_time_unix_nano <= integration.start_time_unix_nano
        assert integration.end_time_unix_nano <= server.end_time_unix_nano
        _, fam = await scrape(gw.admin_address)
        assert value(fam, "edgeplane_trace_spans_total", result="exported") == 3
    finally:
        receiver.server.close()
        auth.close()


async def test_sampling_is_parent_based_and_every_request_gets_a_trace_id(upstream, gateway, tmp_path):
    receiver = await OtlpReceiver().start()
    auth = await AuthorizerPeer(lambda event: {"isAuthorized": True}).start()
    try:
        cfg = traced_config(upstream.port, receiver.endpoint, auth.url, ratio=0.0)
        cfg["access_log"] = {"destination": "file", "path": str(tmp_path / "access.log"),
                             "format": "$context.traceId $context.status"}
        gw = await gateway(cfg)
        # ratio 0: a new trace is not sampled, but still propagated with flags 00
        r = await get(gw.addresses[0], "/open")
        new_tp = parse_traceparent(json.loads(r.body)["headers"]["traceparent"].encode())
        assert new_tp is not None and new_tp[2] is False
        # a parent that did not sample: not sampled either, same trace
        r = await get(gw.addresses[0], "/open", {"traceparent": f"00-{TRACE}-{PARENT}-00"})
        assert parse_traceparent(json.loads(r.body)["headers"]["traceparent"].encode())[:1] == (TRACE,)
        # a sampled parent is sampled, whatever the ratio
        await get(gw.addresses[0], "/open", {"traceparent": f"00-{TRACE}-{PARENT}-01"})
        spans = await receiver.until(2)
        assert {s.trace_id.hex() for s in spans} == {TRACE} and len(spans) == 2
        # an invalid traceparent (upper-case hex) starts a new trace, not continued, and its
        # tracestate is not forwarded (W3C: it belongs to the trace that was not continued)
        r = await get(gw.addresses[0], "/open", {"traceparent": f"00-{TRACE.upper()}-{PARENT}-01",
                                                  "tracestate": "vendor=abc"})
        seen = json.loads(r.body)["headers"]
        assert parse_traceparent(seen["traceparent"].encode())[0] != TRACE.lower() and "tracestate" not in seen
        gw._access_log.flush(wait=2.0)
        for _ in range(100):
            lines = (tmp_path / "access.log").read_text().splitlines() if (tmp_path / "access.log").exists() else []
            if len(lines) == 4:
                break
            await asyncio.sleep(0.02)
        ids = [line.split()[0] for line in lines]
        assert ids[0] == new_tp[0] and ids[1] == ids[2] == TRACE and len(ids[3]) == 32
    finally:
        receiver.server.close()
        auth.close()


async def test_a_collector_that_is_down_costs_requests_nothing_and_drops_are_counted(upstream, caplog):
    down = await OtlpReceiver(status=503).start()
    auth = await AuthorizerPeer(lambda event: {"isAuthorized": True}).start()
    try:
        cfg = traced_config(upstream.port, down.endpoint, auth.url, max_queue=4)
        gw = Gateway(cfg)
        await gw.start()
        c = await RawClient.connect(gw.addresses[0])
        try:
            for _ in range(200):  # each request: 1 span (no authorizer on /open) + 1 integration span
                assert (await c.request("GET", "/open")).status == 200
        finally:
            await c.close()
        await asyncio.sleep(0.3)  # an export round
        _, fam = await scrape(gw.admin_address)
        failed = value(fam, "edgeplane_trace_spans_total", result="failed")
        dropped = value(fam, "edgeplane_trace_spans_total", result="dropped")
        queued = gw.stats()["tracing"]["queued"]
        assert failed > 0 and dropped > 0 and failed + dropped + queued == 400
        assert gw.stats()["tracing"]["failed"] == failed
        # the exporter backs off: a handful of attempts, not one per request
        assert 1 <= len(down.requests) <= 8
        await gw.stop(drain_timeout=1.0)
        # at stop what was still queued is tried once more, then counted: nothing vanishes
        stats = gw.stats()["tracing"]
        assert stats["queued"] == 0 and stats["failed"] + stats["dropped"] == 400
        warnings = [r for r in caplog.records if r.name == "edgeplane.tracing"]
        assert len(warnings) == 1  # at most once a minute
    finally:
        down.server.close()
        auth.close()


@pytest.mark.parametrize(("value", "expected"), [
    (f"00-{TRACE}-{PARENT}-01", (TRACE, PARENT, True)),
    (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, False)),
    (f"00-{TRACE}-{PARENT}-09", (TRACE, PARENT, True)),  # other flag bits: still sampled
    (f"01-{TRACE}-{PARENT}-01-future", (TRACE, PARENT, True)),  # a later version's extra field
    (f"00-{TRACE}-{PARENT}-01-extra", None),  # version 00 is exactly 55 characters
    (f"ff-{TRACE}-{PARENT}-01", None),  # version ff is invalid
    (f"00-{'0' * 32}-{PARENT}-01", None),  # all-zero ids are invalid
    (f"00-{TRACE}-{'0' * 16}-01", None),
    (f"00-{TRACE.upper()}-{PARENT}-01", None),  # upper-case hex is invalid
    (f"00-{TRACE}-{PARENT}", None),
    ("", None),  # a repeated traceparent header is kept as b"" by the parser: invalid
])
def test_traceparent_parsing_follows_w3c(value, expected):
    assert parse_traceparent(value.encode()) == expected
