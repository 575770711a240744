"""The `mock` integration unit: the gateway answers with a fixed response (AWS MOCK).

Owns `routes[].integration` of `type: mock` (status, body as JSON or text, content type,
extra headers; headers the gateway manages are refused at load) and `MockIntegration`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from edgeplane.config import model
from edgeplane.config.errors import short as _short
from edgeplane.config.values import BODYLESS_STATUSES, MANAGED_HEADERS, TOKEN_RE, is_header_value
from edgeplane.plugins import Integration

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import RouteConfig
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.plugins import CompileContext





_MOCK_INTEGRATION = {
    "additionalProperties": False,
    "properties": {
        "type": {"const": "mock"},
        "status": {"type": "integer", "minimum": 200, "maximum": 599, "default": 200},
        "body": {
            "type": ["object", "array", "string", "null"],
            "description": "Object/array: sent as JSON. String: sent as UTF-8 text. Absent: empty.",
        },
        "content_type": {"type": "string"},
        "headers": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Extra response headers, name -> value.",
        },
    },
}


class MockIntegration:
    """Answers from the gateway itself with a fixed status, headers and body."""

    __slots__ = ("status", "body", "content_type", "extra")

    def __init__(self, status: int, body: bytes, content_type: str, headers: tuple[tuple[str, str], ...]):
        self.status = status
        self.body = body
        self.content_type = content_type.encode()
        self.extra = b"".join(f"{k.lower()}: {v}\r\n".encode() for k, v in headers)

    def handle(self, proto: HttpProtocol, req: Request) -> None:
        proto.send_local(req, self.status, self.body, self.content_type, self.extra)


def _load(spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext) -> model.Integration:
    status = ctx.integer(spec, "status", 200)
    body_value = spec.get("body")
    body = b""
    default_type = "application/json"
    if isinstance(body_value, (dict, list)):
        try:
            body = orjson.dumps(body_value)
        except (TypeError, orjson.JSONEncodeError) as exc:
            ctx.fail(path + ("body",), f"cannot be serialised as JSON: {exc}")
    elif isinstance(body_value, str):
        try:
            body = body_value.encode("utf-8")
        except UnicodeEncodeError as exc:
            ctx.fail(path + ("body",), f"cannot be encoded as UTF-8: {exc}")
        default_type = "text/plain; charset=utf-8"
    if body and status in BODYLESS_STATUSES:
        ctx.fail(path + ("body",), f"a {status} response has no body")
    content_type = spec.get("content_type", default_type)
    if not isinstance(content_type, str):
        content_type = default_type
    elif not content_type.strip() or not is_header_value(content_type):
        ctx.fail(path + ("content_type",), f"invalid content type {content_type!r}")
    headers = _headers(spec.get("headers"), path + ("headers",), ctx)
    return model.Integration(type="mock", status=status, body=body,
                             content_type=content_type, headers=headers)

def _headers(section: Any, path: tuple[Any, ...], ctx: LoadContext) -> tuple[tuple[str, str], ...]:
    if not isinstance(section, dict):
        return ()
    out: list[tuple[str, str]] = []
    for name, value in section.items():
        if not isinstance(name, str) or not TOKEN_RE.match(name):
            ctx.fail(path, f"invalid header name {_short(name)}")
            continue
        lower = name.lower()
        if lower == "content-type":
            ctx.fail(path + (name,), "set the content type with integration.content_type")
            continue
        if lower in MANAGED_HEADERS:
            ctx.fail(path + (name,), f"header {name!r} is managed by the gateway")
            continue
        if not isinstance(value, str):
            continue
        if not is_header_value(value):
            ctx.fail(path + (name,), f"invalid header value {_short(value)} "
                                      "(no control characters or line breaks)")
            continue
        out.append((name, value))
    return tuple(out)



class MockIntegrationPlugin(Integration):
    type = "mock"
    schema = _MOCK_INTEGRATION

    def load(self, spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext, route_key: Any) -> Any:
        return _load(spec, path, ctx)

    def compile(self, route: RouteConfig, ctx: CompileContext, upstream_headers: frozenset[bytes],
                response_headers: frozenset[bytes]) -> MockIntegration:
        integ = route.integration
        return MockIntegration(integ.status, integ.body, integ.content_type, integ.headers)

    def summary(self, model: Any) -> str:
        return f"mock {model.status} ({len(model.body)} bytes {model.content_type})"


plugin = MockIntegrationPlugin()
