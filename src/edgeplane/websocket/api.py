"""WebSocket APIs (Amazon API Gateway's model): the gateway terminates the WebSocket.

Owns, per configured `websocket_apis` entry:

- **Route selection** (sans-IO, `parse_selection` / `Selector`): ``$request.body.PATH``
  or a template of ``${request.body.PATH}`` parts. A message that is not a JSON object,
  lacks a field, or names a field that is an object, list or null selects nothing and
  goes to ``$default``; binary messages always go to ``$default``. A selected key that
  starts with ``$`` is ignored (a client cannot pick ``$connect``).
- **The upgrade** (`WebSocketApiHandler.handle`, called by the server before routing;
  a Host no API of the path serves is routed as HTTP): a request that is not a
  WebSocket handshake is 426 (`Upgrade: websocket`); a version
  other than 13 is 426 with `Sec-WebSocket-Version: 13`; a key that is not 16 bytes of
  base64 is 400; past `connections_per_second` it is 429. Then the ``$connect`` route
  runs as an ordinary compiled route (IP rules, the authorizer exactly as on an HTTP
  route, then `ConnectIntegration`): its backend's 2xx accepts, any other status
  refuses with that status and body; a backend that is down is 502, a slow one 504.
- **The connection** (`ws_connections.WsConnection`, an asyncio protocol over wsproto's
  frame layer, and the @connections operations in `ws_connections`):
  each message picks a route and is POSTed to the route's backend with the context
  headers (`X-Connection-Id`, `X-Route-Key`, `X-Event-Type`, `X-Message-Id`,
  `X-Source-Ip`, `X-Connected-At`, `X-Api-Id`, `X-Request-Id`, `X-Authorizer-Claims`,
  `X-Api-Key-Id`, and the custom authorizer's forwarded context); with
  `return_response` a 2xx body goes back as a message. No route, a failed backend or a
  refused message is an AWS-style error message to the client, and the connection stays.
  ``$disconnect`` is called (best effort) on every kind of close, with
  `X-Disconnect-Status-Code` and `X-Disconnect-Reason`.

Invariants:
- A protocol error is answered with the close code wsproto reports (1002, 1007, ...);
  a message over `max_message_bytes` closes with 1009; idle, lifetime and drain close
  with 1001; an unanswered ping drops the connection (1006 for ``$disconnect``).
- A connection is in the registry and in `ServerContext.websockets` from the 101 until
  `connection_lost`; then exactly one access-log line (status 101) is written.
- At most `ws_connections.MAX_IN_FLIGHT` (16) messages of one connection are at their
  backend at once; past that, reading from the client pauses.
- One timer per connection (idle, lifetime, ping), moved lazily.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson

from edgeplane.config.model import Integration, RouteConfig
from edgeplane.http.codec import header_value
from edgeplane.http.responses import STATUS_LINES
from edgeplane.policies.ip_rules.rules import TrustedProxies
from edgeplane.policies.throttle.buckets import UNAVAILABLE, TokenBucket
from edgeplane.routing.chain import compile_chain
from edgeplane.routing.snapshot import CompiledRoute, compile_context
from edgeplane.upstream.client import FetchError
from edgeplane.websocket.connections import WsConnection, connect_headers, context_headers
from edgeplane.websocket.handshake import accept_key, client_handshake_error
from edgeplane.websocket.route import WsRoute
from edgeplane.websocket.selection import parse_selection

if TYPE_CHECKING:
    from edgeplane.config.model import Config, WebSocketApiConfig, WebSocketLimits
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.plugins.base import CompileContext
    from edgeplane.upstream.cluster import Upstream
    from edgeplane.websocket.connections import ConnectionRegistry

__all__ = ["WebSocketApiHandler", "build_websocket_apis"]

_PLACEHOLDER = Integration(type="mock")


# ---------------------------------------------------------------------------- compiled API

class WsApi:
    """One WebSocket API, compiled once per snapshot."""

    def __init__(self, config: Config, cfg: WebSocketApiConfig, upstreams: dict[str, Upstream],
                 compile_ctx: CompileContext, registry: ConnectionRegistry, conn_bucket: Any) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.limits: WebSocketLimits = cfg.limits
        self.registry = registry
        self.selector = parse_selection(cfg.route_selection)
        self.routes: dict[str, WsRoute] = {}
        for key, rc in cfg.routes.items():
            integ = rc.integration
            function = None
            if integ is not None and integ.type == "function" and integ.handler is not None:
                from edgeplane.integrations.function.websocket import WsFunction

                function = WsFunction(integ.handler, lambda: compile_ctx.runtime.get("functions"))
            self.routes[key] = WsRoute(key, upstreams[integ.upstream] if integ and integ.upstream else None,
                                       integ.path if integ else "/", integ.timeout if integ else 29.0,
                                       rc.return_response, function)
        self.connect = self.routes.get("$connect")
        self.disconnect = self.routes.get("$disconnect")
        self.default = self.routes.get("$default")
        connect = cfg.routes.get("$connect")
        # $connect as an ordinary route: the same IP-rule and authorizer stages as HTTP.
        connect_rc = RouteConfig(key="$connect", method="GET", path=cfg.path, host=cfg.host,
                                integration=_PLACEHOLDER, index=-1,
                                auth=connect.auth if connect else None,
                                scopes=connect.scopes if connect else (), policies={"cors": False})
        # Compiled without throttle/quota resources: the API's own new-connection bucket
        # limits $connect (AWS), not the HTTP throttles.
        chain = compile_chain(connect_rc, compile_ctx, config.registry)
        self.connect_route = CompiledRoute(connect_rc, "$connect", tuple(chain.stages),
                                           ConnectIntegration(self))
        self.conn_bucket = conn_bucket  # new connections: `wait(now)`/`spend(now)`
        self.trusted = TrustedProxies(config.trusted_proxies) if config.trusted_proxies else None
        # Headers the $connect authorizer sets for the backend: a client may not send them.
        auth = config.authorizers.get(connect.auth) if connect and connect.auth else None
        self.auth_headers = frozenset(h.encode() for h, _ in getattr(auth, "forward_context", ()))

    def source_ip(self, proto: HttpProtocol, req: Request) -> str:
        """The client address, believing X-Forwarded-For only from `trusted_proxies`."""
        if req.client_ip is None:
            ip = proto.peer_ip
            if self.trusted is not None:
                ip = self.trusted.client_ip(ip, [v for k, v in req.headers if k == b"x-forwarded-for"])
            req.client_ip = ip
        return req.client_ip


class WebSocketApiHandler:
    """What the server calls for a request whose path is a WebSocket API's path: picks
    the API by Host (exact, then wildcard by longest suffix, then host-less); with none,
    the request is routed as HTTP as if no API had this path."""

    __slots__ = ("apis",)

    def __init__(self, apis: list[WsApi]) -> None:
        self.apis = sorted(apis, key=lambda a: (a.cfg.host is None, (a.cfg.host or "").startswith("*."),
                                                -len(a.cfg.host or "")))

    def _pick(self, host: bytes | None) -> WsApi | None:
        name = None
        if host is not None:
            name = host.decode("latin-1").lower()
            if name.startswith("["):
                name = name[: name.find("]") + 1]
            else:
                name = name.rpartition(":")[0] or name if ":" in name else name
            name = name.rstrip(".")
        for api in self.apis:
            want = api.cfg.host
            if want is None:
                return api
            if name is None:
                continue
            if want.startswith("*.") and name.endswith(want[1:]) or want == name:
                return api
        return None

    def handle(self, proto: HttpProtocol, req: Request) -> None:
        api = self._pick(req.host)
        if api is None:
            proto.route(req)  # no API for this Host: the route table decides
            return
        req.route_key = "$connect"
        if not req.websocket:
            proto.send_local(req, 426, _json({"message": "Upgrade Required"}),
                             extra=b"upgrade: websocket\r\n")
            return
        problem = client_handshake_error(req.headers)
        if problem is not None:
            status, reason = problem
            if status == 426:
                req.error = reason
                proto.ctx.count_error("426")
                proto.send_local(req, 426, _json({"message": "Upgrade Required"}),
                                 extra=b"sec-websocket-version: 13\r\n")
            else:
                proto.send_error(req, status, reason)
            return
        if proto.ctx.draining:  # stopping: it would be closed with 1001 at once
            proto.send_error(req, 503, "gateway is stopping", extra=b"retry-after: 1\r\n")
            return
        now = time.monotonic()
        bucket = api.conn_bucket
        wait = bucket.wait(now)
        if wait == UNAVAILABLE:  # cluster mode, Redis down, failing closed
            proto.send_error(req, 503, f"websocket api {api.name}: limit store unavailable",
                             extra=b"retry-after: 1\r\n")
            return
        if wait > 0.0:
            proto.ctx.count_refusal("throttle", "websocket")
            proto.send_error(req, 429, f"websocket api {api.name}: new connections throttled",
                             extra=b"retry-after: %d\r\n" % max(1, int(wait + 0.999)))
            return
        bucket.spend(now)
        req.route = api.connect_route
        req.params = {}
        proto.run_chain(req, 0)




def _json(obj: Any) -> bytes:
    return orjson.dumps(obj)


class ConnectIntegration:
    """The $connect route's integration: ask the backend (if any), then accept or refuse."""

    __slots__ = ("api",)

    def __init__(self, api: WsApi) -> None:
        self.api = api

    def handle(self, proto: HttpProtocol, req: Request) -> None:
        api = self.api
        conn_id = api.registry.new_id()
        route = api.connect
        if route is None or not route.has_backend:
            # Nothing to ask: accept now (`detach` is safe inside dispatch: the bytes that
            # followed the head in this read go to the connection).
            _accept(api, proto, req, conn_id, None)
            return
        proto.set_deadline(0, 0)  # the backend call is bounded by its own timeout
        task = proto.loop.create_task(self._ask(proto, req, conn_id, route))
        api.registry.track(task)

    async def _ask(self, proto: HttpProtocol, req: Request, conn_id: str, route: WsRoute) -> None:
        api = self.api
        client_headers = connect_headers(req, proto, api.auth_headers)
        headers = {**client_headers, **context_headers(api.name, conn_id, "$connect", "CONNECT", None,
                                                       api.source_ip(proto, req), time.time(), req)}
        query = req.query.decode("latin-1")
        connect = {"raw_query": query, "headers": client_headers, "host": (req.host or b"").decode("latin-1"),
                   "query": dict(parse_qsl(query, keep_blank_values=True))}
        started = time.perf_counter()
        try:
            status, rheaders, body = await route.call(headers, b"", 64 * 1024, connect)
        except FetchError as exc:
            req.integration_latency = time.perf_counter() - started
            if _gone(proto, req):
                return
            timeout = str(exc).startswith("no complete response")
            req.integration_error = str(exc)
            proto.send_error(req, 504 if timeout else 502, f"$connect integration failed: {exc}")
            return
        req.integration_latency = time.perf_counter() - started
        req.upstream = route.upstream.name if route.upstream is not None else None
        if _gone(proto, req):
            return
        if not 200 <= status < 300:
            ctype = next((v for k, v in rheaders if k.lower() == b"content-type"), b"application/json")
            req.error = f"$connect refused by the integration ({status})"
            proto.ctx.count_error(str(status))
            status = status if status in STATUS_LINES and status >= 200 else 502
            proto.send_local(req, status, body, content_type=ctype)
            return
        protocol = next((v.strip() for k, v in rheaders if k.lower() == b"sec-websocket-protocol"), None)
        _accept(self.api, proto, req, conn_id, protocol)


def _gone(proto: HttpProtocol, req: Request) -> bool:
    transport = proto.transport
    return req.responded or transport is None or transport.is_closing()


def _accept(api: WsApi, proto: HttpProtocol, req: Request, conn_id: str, protocol: bytes | None) -> None:
    """Write the 101 and take the connection over from HTTP."""
    if _gone(proto, req):
        return
    key = header_value(req.headers, b"sec-websocket-key") or b""
    offered = {t.strip() for v in (val for k, val in req.headers if k == b"sec-websocket-protocol")
               for t in v.split(b",")}
    head = [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n",
            b"sec-websocket-accept: ", accept_key(key), b"\r\n",
            b"x-request-id: ", req.request_id, b"\r\n"]
    if protocol and protocol in offered:
        head += (b"sec-websocket-protocol: ", protocol, b"\r\n")
    head.append(b"\r\n")
    proto.transport.write(b"".join(head))
    api.source_ip(proto, req)
    paused = proto.write_paused
    transport, tail = proto.detach()
    conn = WsConnection(api, proto, req, conn_id, transport)
    transport.set_protocol(conn)
    conn.start(tail, paused)


def build_websocket_apis(config: Config, upstreams: dict[str, Upstream], runtime: dict[str, Any],
                         registry: ConnectionRegistry,
                         conn_buckets: dict[str, Any] | None = None) -> dict[bytes, WebSocketApiHandler]:
    """Request path -> handler, for `Snapshot.websocket_apis`. `conn_buckets` (API name ->
    a bucket with `wait`/`spend`) shares the new-connection limits across workers or
    hosts; by default each API gets an in-process token bucket."""
    by_path: dict[bytes, list[WsApi]] = {}
    compile_ctx = compile_context(config, upstreams, runtime)
    for name, cfg in config.websocket_apis.items():
        bucket = (conn_buckets or {}).get(name)
        if bucket is None:
            rate = cfg.limits.connections_per_second
            bucket = TokenBucket(rate, max(1, int(rate)), policy="websocket")
        api = WsApi(config, cfg, upstreams, compile_ctx, registry, bucket)
        registry.apis[name] = api
        by_path.setdefault(cfg.path.encode(), []).append(api)
    return {path: WebSocketApiHandler(apis) for path, apis in by_path.items()}
