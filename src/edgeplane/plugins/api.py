"""The public plugin contract: phases, the request and response views, local replies.

This module is what a plugin author reads. A policy's `compile` step returns, per
route, either a plain function (a request stage) or a `RouteStage` bundling up to three
hooks:

- `request(view) -> None | LocalReply` (or an `async def` returning the same): runs in
  the policy's phase, before the integration. `None` continues the chain; a
  `LocalReply` answers the client and ends it.
- `response(view) -> None`: sees the response head (status and headers, upstream or
  local) and may change both; response hooks run in reverse chain order. Synchronous.
- `log(record) -> None`: receives the access-log record (a dict) after the response.
  Synchronous, off the client's critical path.

Invariants:
- Views are created per request only for routes that carry a public hook; built-in
  stages use the internal fast protocol (`FastStage`) and cost nothing here.
- `RequestView.context` is one dict per request, shared by every stage, the response
  and log hooks, and written to the access log under `context` when non-empty.
- Header values a hook sets are checked for control characters (CR, LF, NUL...) before
  they reach the wire; a bad value is the gateway's bug, answered 500.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson

from edgeplane.http.fields import UnsafeField, check_field

if TYPE_CHECKING:
    from edgeplane.http.request import Request

# The server's connection protocol (`http.protocol.HttpProtocol`, which imports this
# package): only its documented methods are used here.
HttpProtocol = Any

__all__ = [
    "Phase", "LocalReply", "RequestView", "ResponseView", "RouteStage", "FastStage",
    "RequestHook", "ResponseHook", "LogHook", "PluginError", "check_header_value",
]


class Phase(enum.IntEnum):
    """Request phases, in the order a route's chain runs them (Kong's phases, Envoy's
    decoder filters). A plugin declares one phase and an `order` within it."""

    EARLY = 100  # IP rules, WAF-like filters: before anything is parsed or looked up
    CORS = 200  # preflights answered by the gateway
    AUTHENTICATION = 300  # authorizers: who is calling
    AUTHORIZATION = 400  # what the caller may do (tenancy, entitlements)
    TRAFFIC = 500  # throttles, quotas, cache lookups
    TRANSFORM = 600  # request rewriting before the integration


class PluginError(Exception):
    """A plugin was refused: bad declaration, or a hook of the wrong kind."""


@dataclass(frozen=True, slots=True)
class LocalReply:
    """The gateway answers the request itself. `body`: a dict/list (sent as JSON), str
    (UTF-8 text) or bytes; `headers`: extra response headers."""

    status: int
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None

    def encode(self) -> tuple[bytes, bytes]:
        """(body bytes, content type) for the wire."""
        body, ctype = self.body, self.content_type
        if body is None:
            return b"", (ctype or "application/json").encode()
        if isinstance(body, bytes):
            return body, (ctype or "application/octet-stream").encode()
        if isinstance(body, str):
            return body.encode(), (ctype or "text/plain; charset=utf-8").encode()
        return orjson.dumps(body), (ctype or "application/json").encode()


def check_header_value(name: str, value: str) -> None:
    """The header names and values a plugin writes go through the gateway's one choke
    point (`http.fields.check_field`): a token name, no control characters (CR, LF,
    NUL, ...), at most 8 KiB. Raises ValueError (`UnsafeField`)."""
    try:
        raw_name, raw_value = name.encode("ascii"), value.encode("latin-1")
    except UnicodeEncodeError:
        raise UnsafeField(f"header {name!r}: only Latin-1 text can be written") from None
    check_field(raw_name, raw_value)


class RequestView:
    """What a plugin sees of a request. Cheap to create: everything is read lazily."""

    __slots__ = ("_proto", "_req", "_query")

    def __init__(self, proto: HttpProtocol, req: Request) -> None:
        self._proto = proto
        self._req = req
        self._query: dict[str, str] | None = None

    @property
    def method(self) -> str:
        return self._req.method.decode("latin-1")

    @property
    def path(self) -> str:
        """The request path as routed (normalised)."""
        return self._req.path.decode("latin-1")

    @property
    def path_params(self) -> dict[str, str]:
        params = self._req.params or {}
        return {k: v.decode("utf-8", "replace") for k, v in params.items()}

    @property
    def raw_query(self) -> str:
        return self._req.query.decode("latin-1")

    @property
    def query(self) -> dict[str, str]:
        """Query parameters (the last value of a repeated name)."""
        if self._query is None:
            self._query = dict(parse_qsl(self.raw_query, keep_blank_values=True))
        return self._query

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header `name` (any case), or `default`."""
        key = name.lower().encode("latin-1")
        for k, v in self._req.headers:
            if k == key:
                return v.decode("latin-1")
        return default

    def headers(self) -> Iterator[tuple[str, str]]:
        """Every header line as (lower-case name, value), in order."""
        for k, v in self._req.headers:
            yield k.decode("latin-1"), v.decode("latin-1")

    @property
    def source_ip(self) -> str:
        """The client address (X-Forwarded-For believed only from trusted proxies)."""
        return self._req.client_ip or self._proto.peer_ip

    @property
    def route_key(self) -> str:
        return self._req.route_key

    @property
    def request_id(self) -> str:
        return self._req.request_id.decode("latin-1")

    @property
    def identity(self) -> Mapping[str, Any] | None:
        """The authorizer's verdict: JWT claims, or {"apiKeyId": ..., "plan": ...}."""
        req = self._req
        if req.claims is not None:
            claims: Mapping[str, Any] = req.claims
            return claims
        if req.api_key is not None:
            return {"apiKeyId": req.api_key.id, "plan": req.api_key.plan}
        return None

    @property
    def authorizer_context(self) -> Mapping[str, Any] | None:
        """A custom (http) authorizer's `context`, when the route has one."""
        return self._req.auth_context

    @property
    def context(self) -> dict[str, Any]:
        """Per-request scratch space shared by stages, hooks and the access log."""
        ctx = self._req.context
        if ctx is None:
            ctx = self._req.context = {}
        return ctx


class ResponseView:
    """The response head a response hook may change: `status` and `headers` (a list of
    (lower-case name, value) pairs with dict-like helpers)."""

    __slots__ = ("status", "_headers", "request")

    def __init__(self, status: int, headers: list[tuple[str, str]], request: RequestView) -> None:
        self.status = status
        self._headers = headers
        self.request = request

    def get_header(self, name: str) -> str | None:
        key = name.lower()
        return next((v for k, v in self._headers if k == key), None)

    def set_header(self, name: str, value: str) -> None:
        """Replace every line of `name` with one line."""
        check_header_value(name, value)
        key = name.lower()
        self._headers[:] = [(k, v) for k, v in self._headers if k != key]
        self._headers.append((key, value))

    def add_header(self, name: str, value: str) -> None:
        check_header_value(name, value)
        self._headers.append((name.lower(), value))

    def remove_header(self, name: str) -> None:
        key = name.lower()
        self._headers[:] = [(k, v) for k, v in self._headers if k != key]

    @property
    def headers(self) -> list[tuple[str, str]]:
        return list(self._headers)


RequestHook = Callable[[RequestView], LocalReply | None | Awaitable[LocalReply | None]]
ResponseHook = Callable[[ResponseView], None]
LogHook = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class RouteStage:
    """A policy's hooks on one route; any of the three may be None."""

    request: RequestHook | None = None
    response: ResponseHook | None = None
    log: LogHook | None = None


class FastStage:
    """Base of the built-in stages: `stage(proto, req)` returns True (continue), False
    (it answered) or None (it continues asynchronously and calls `proto.resume_chain`).
    Internal: its signature follows the server, not a stability promise."""

    __slots__ = ()

    def __call__(self, proto: HttpProtocol, req: Request) -> bool | None:
        raise NotImplementedError
