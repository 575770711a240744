"""The parameter-mapping units, in Amazon API Gateway HTTP API syntax:

- `routes[].request_parameters: {"overwrite|append|remove:header.NAME" | ...querystring.NAME |
  "overwrite:path": VALUE}`: a TRANSFORM-phase stage changes the request the integration
  gets (headers, query string, path);
- `routes[].response_parameters: {"404" | "4XX" | ...: {"overwrite:statuscode" |
  "overwrite|append|remove:header.NAME": VALUE}}`: a response hook changes an
  integration's answer (never the gateway's own: see `gateway_responses`).

Values are compiled at load (`expressions.Value`); a bad one is a located error. Every
header value a mapping writes passes the gateway's choke point (`fields.check_field`): a
value with a control character refuses the request (500, logged), it is never sent. A
route whose request mappings read `$request.body.…` has its body buffered (at most
`BODY_MAX`; larger: 413) and parsed as JSON once; no other route buffers anything.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_plus

import orjson

from edgeplane.http.fields import check_field
from edgeplane.plugins import FastStage, Phase, Policy, RouteStage
from edgeplane.plugins.body import BodyWait, too_large
from edgeplane.policies.mapping.expressions import Value

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.plugins import CompileContext, ResponseView

BODY_MAX = 1024 * 1024
_OP = re.compile(r"^(overwrite|append|remove):(header|querystring)\.([A-Za-z0-9!#$%&'*+.^_`|~-]{1,128})$")
# Headers a mapping may not touch: framing, hop-by-hop, and what the gateway sets itself.
_RESERVED = frozenset(("host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
                       "trailer", "expect", "x-request-id", "x-forwarded-for", "x-forwarded-proto",
                       "x-forwarded-host", "proxy-authorization", "proxy-connection"))
_STATUS_KEY = re.compile(r"^([1-5])(XX|\d\d)$")


Op = tuple[str, str, str, "Value | None"]  # (action, kind, name, value)


class MappedPathRefused(ValueError):
    """`overwrite:path` rendered a path with an empty or dot segment: 400."""


def _ops(spec: Any, path: tuple[Any, ...], ctx: LoadContext, response: bool) -> tuple[Op, ...]:
    """(action, kind, name, value) of a mapping, in order; errors located."""
    out = []
    if not isinstance(spec, dict):
        return ()
    for key, text in spec.items():
        here = path + (key,)
        if not isinstance(text, str):
            ctx.fail(here, "a mapping value is a string")
            continue
        if key == "overwrite:path" and not response:
            action, kind, name = "overwrite", "path", ""
        elif key == "overwrite:statuscode" and response:
            action, kind, name = "overwrite", "statuscode", ""
        else:
            m = _OP.match(key)
            if m is None or (response and m.group(2) != "header"):
                allowed = ("overwrite:statuscode, overwrite|append|remove:header.NAME" if response else
                           "overwrite|append|remove:header.NAME, ...:querystring.NAME, overwrite:path")
                ctx.fail(here, f"unknown mapping {key!r} (allowed: {allowed})")
                continue
            action, kind, name = m.group(1), m.group(2), m.group(3)
            if kind == "header" and (name.lower() in _RESERVED or name.lower().startswith(("x-forwarded-", "proxy-"))):
                ctx.fail(here, f"header {name!r} is the gateway's; a mapping may not change it")
                continue
        value = None
        if action != "remove":
            try:
                value = Value(text, response)
            except ValueError as exc:
                ctx.fail(here, str(exc))
                continue
            if kind == "statuscode" and not value.parts:
                ctx.fail(here, "a status code is needed")
        out.append((action, kind, name.lower() if kind == "header" else name, value))
    return tuple(out)


def _apply_header(headers: list[tuple[bytes, bytes]], action: str, name: bytes, value: str | None) -> None:
    if action == "remove" or action == "overwrite":
        headers[:] = [(k, v) for k, v in headers if k != name]
        if action == "remove":
            return
    raw = (value or "").encode("utf-8")
    check_field(name, raw)  # the choke point: nothing with a control character is written
    if action == "append":
        for i, (k, v) in enumerate(headers):
            if k == name:
                headers[i] = (k, v + b"," + raw)
                return
    headers.append((name, raw))


def _apply_query(query: bytes, action: str, name: str, value: str | None) -> bytes:
    pairs = [part.partition("=") for part in query.decode("latin-1").split("&") if part]
    if action in ("remove", "overwrite"):
        pairs = [p for p in pairs if unquote_plus(p[0]) != name]
    if action != "remove":
        pairs.append((quote(name, safe=""), "=", quote(value or "", safe="")))
    return "&".join(k + eq + v for k, eq, v in pairs).encode("latin-1")


class RequestMappingStage(FastStage):
    __slots__ = ("ops", "reads_body", "stage_variables")

    def __init__(self, ops: tuple[Op, ...], stage_variables: dict[str, str]) -> None:
        self.ops = ops
        self.reads_body = any(v is not None and v.reads_body for _, _, _, v in ops)
        self.stage_variables = stage_variables

    def __call__(self, proto: HttpProtocol, req: Request) -> bool | None:
        if self.reads_body and not req.complete:
            why = "request parameter mapping reads the body"
            if too_large(proto, req, BODY_MAX, why):
                return False
            BodyWait(self, proto, req, BODY_MAX, why, self._then)
            return None
        return self._apply_or_refuse(proto, req)

    def _then(self, proto: HttpProtocol, req: Request) -> bool:
        return self._apply_or_refuse(proto, req)

    def _apply_or_refuse(self, proto: HttpProtocol, req: Request) -> bool:
        try:
            self.apply(proto, req)
        except MappedPathRefused as exc:
            proto.send_error(req, 400, f"request parameter mapping: {exc}")
            return False
        return True

    def _path(self, req: Request, proto: HttpProtocol, extra: dict[str, Any]) -> bytes | None:
        """`overwrite:path` rendered with every source's value percent-encoded but for
        `/` (a client's `%2e%2e`, `;` or `\\` arrive as literal text, never as syntax);
        None when a segment is empty, `.` or `..` (no escaping the template's prefix)."""
        value = next(v for a, k, _, v in self.ops if k == "path")
        assert value is not None
        parts = []
        for part in value.parts:
            if isinstance(part, str):
                parts.append(part)
            else:
                parts.append(quote(part(req, proto, extra) or "", safe="/"))
        path = "".join(parts)
        path = path if path.startswith("/") else "/" + path
        segments = path.split("/")[1:]
        if any(seg in ("", ".", "..") for seg in segments[:-1]) or segments[-1] in (".", ".."):
            return None
        return path.encode("latin-1")

    def apply(self, proto: HttpProtocol, req: Request) -> None:
        extra: dict[str, Any] = {"stage_variables": self.stage_variables}
        if self.reads_body:
            try:
                extra["body"] = orjson.loads(b"".join(req.body_buf or ()))
            except orjson.JSONDecodeError:
                extra["body"] = None  # not JSON: every $request.body source is absent
        rendered = [(a, k, n, v.render(req, proto, extra) if v is not None else None) for a, k, n, v in self.ops]
        for action, kind, name, value in rendered:  # every value is read from the request as it came
            if value is None and action != "remove":
                continue  # an absent source: the mapping is skipped (AWS)
            if kind == "header":
                _apply_header(req.headers, action, name.encode("latin-1"), value)
            elif kind == "querystring":
                req.query = _apply_query(req.query, action, name, value)
            else:
                path = self._path(req, proto, extra)
                if path is None:
                    raise MappedPathRefused(f"the mapped path {value!r} has an empty or dot segment")
                req.path = path


def _stage_variables(route: RouteConfig, config: Config) -> dict[str, str]:
    return dict(config.stage_variables)  # (a stage's own config carries them: `config.stages.for_stage`)


class RequestMappingPolicy(Policy):
    name = "request_parameters"
    phase = Phase.TRANSFORM
    order = 50
    route_keys = {"request_parameters": {"type": "object", "additionalProperties": {"type": "string"},
                                         "description": "AWS HTTP API request parameter mapping."}}

    def load_route(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        return _ops(value, path, ctx, response=False)

    def check(self, config: Config, ctx: LoadContext) -> None:
        for r in config.routes:
            ops = r.policies.get("request_parameters") or ()
            if any(kind == "path" for _, kind, _, _ in ops) and getattr(r.integration, "path", None):
                ctx.fail(("routes", r.index, "request_parameters", "overwrite:path"),
                         "the integration has a path template too: give one of them")

    def compile(self, route: RouteConfig, ctx: CompileContext) -> RequestMappingStage | None:
        ops = route.policies.get("request_parameters")
        return RequestMappingStage(ops, _stage_variables(route, ctx.config)) if ops else None


class ResponseMappings(tuple):
    """`response_parameters`: (status key, ops) pairs, and whether a value reads the
    response body (then the http integration holds the response to its end: see
    `upstream.proxy.HttpIntegration.hold_response`)."""

    @property
    def reads_body(self) -> bool:
        return any(v is not None and v.reads_body for _, ops in self for _, _, _, v in ops)


def _status_matches(key: str, status: int) -> bool:
    return key == str(status) or (key.endswith("XX") and key[0] == str(status)[0])


class ResponseMappingPolicy(Policy):
    name = "response_parameters"
    phase = Phase.TRANSFORM
    order = 60
    route_keys = {"response_parameters": {
        "type": "object", "additionalProperties": {"type": "object", "additionalProperties": {"type": "string"}},
        "description": "AWS HTTP API response parameter mapping, by status code (\"404\") or class (\"4XX\")."}}

    def load_route(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        out = []
        for status_key, spec in (value or {}).items():
            if not _STATUS_KEY.match(str(status_key)):
                ctx.fail(path + (status_key,), "a key is a status code (\"404\") or a class (\"4XX\")")
                continue
            out.append((str(status_key), _ops(spec, path + (status_key,), ctx, response=True)))
        out.sort(key=lambda item: item[0].endswith("XX"))  # an exact code before its class
        return ResponseMappings(out)

    def compile(self, route: RouteConfig, ctx: CompileContext) -> RouteStage | None:
        table = route.policies.get("response_parameters")
        if not table:
            return None
        variables = _stage_variables(route, ctx.config)

        def response(view: ResponseView) -> None:
            req = view.request._req
            if not req.integration_status:
                return  # the gateway's own answer: see gateway_responses
            ops = next((ops for key, ops in table if _status_matches(key, view.status)), None)
            if not ops:
                return
            extra: dict[str, Any] = {"stage_variables": variables, "status": view.status,
                                     "response_headers": view.headers}
            if table.reads_body:
                try:
                    extra["response_body"] = orjson.loads(req.response_body or b"")
                except orjson.JSONDecodeError:
                    extra["response_body"] = None  # not JSON: every $response.body source is absent
            rendered = [(a, k, n, v.render(req, view.request._proto, extra) if v is not None else None)
                        for a, k, n, v in ops]
            for action, kind, name, value in rendered:
                if kind == "statuscode":  # (AWS: 200..599; any other value leaves the status)
                    if value is not None and value.isascii() and value.isdigit() and 200 <= int(value) <= 599:
                        view.status = int(value)
                elif action == "remove":
                    view.remove_header(name)
                elif value is not None:
                    if action == "append" and view.get_header(name) is not None:
                        value = f"{view.get_header(name)},{value}"
                    view.set_header(name, value)

        return RouteStage(response=response)


request_plugin = RequestMappingPolicy()
response_plugin = ResponseMappingPolicy()
