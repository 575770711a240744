"""The admin listener's API, served by the same HTTP server as the data plane.

Owns the admin routes, compiled into an ordinary snapshot whose integrations are
`FunctionIntegration`s:
- `GET /`: the dashboard (`observability.dashboard`); without the token its 401 is a
  sign-in page rather than JSON;
- `GET /healthz`: 200 `{"status": "ok"}`, or 503 `{"status": "draining"}` during shutdown;
- `GET /ready`: 200 `{"status": "ready"}` once the config is loaded and every listener
  bound, 503 `{"status": "not ready"}` before that and from the moment the stop begins
  (through `drain_delay` and the drain: the admin listener is the last one closed);
- `GET /upstreams`: per-upstream, per-target health, pool and per-connection telemetry
  (of the worker that answers);
- `GET /stats`: connection, request and error counters of the data listeners, merged
  over every worker (`?per_worker=1` adds each worker's own);
- `GET /metrics`: Prometheus metrics of every worker, merged (`observability`): the text
  format, or OpenMetrics when `Accept` asks for it;
- `GET /routes`: the compiled route table in match-priority order (with `stages`, each
  stage's, every route naming its `stage`), with each route's
  upstream and policies (authorizer, throttle levels, CORS);
- `DELETE /cache[?route=KEY&path=P&stage=S]`: flush the response cache in every worker
  (`admin_cache`);
- `POST|GET|DELETE /@connections/{id}`: the WebSocket API management API (AWS's
  @connections): send a message to a client, describe it, disconnect it. An id of a
  connection this worker does not hold is forwarded to its owner (`ws_connections`):
  another worker of this host through `WorkerForwarder` (each worker also serves this
  app on its own Unix socket), another host through Redis. Unknown or closed: 410;
  malformed id: 400; other methods: 405.

Who may call (`AdminAuth`, a stage on every route but the `admin.public_paths`): all
the configured credentials, a verified client certificate (`admin.auth.mtls`) and a
bearer token equal to the one read at load (`hmac.compare_digest`). Anything else is
401 with `WWW-Authenticate: Bearer realm="edgeplane-admin"` and `{"message": ...}` (on
`GET /`, a missing or wrong token gets the dashboard's sign-in page as the body instead).
Without credentials the app is anonymous only when the config says so
(`admin.insecure`); `build_admin_snapshot` refuses a listener that is neither.

Invariants: a forwarded call (`x-edgeplane-forwarded`) is only served locally, so a call
never loops; the header means something only on a worker's Unix socket, whose file mode
(0600 in a 0700 directory) is the credential of the workers that forward there, so on
TCP it grants nothing and is ignored; a POST body larger than the connection's
`max_message_bytes` is 413.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import os
import socket
from typing import TYPE_CHECKING, Any, Protocol

import httptools
import orjson

from edgeplane.config.model import AdminConfig, Config, Integration, RouteConfig
from edgeplane.deploy.served import summary
from edgeplane.http.request import header_all
from edgeplane.http.tls import ListenerTls
from edgeplane.observability.dashboard import HTML_TYPE, DashboardIntegration, pages
from edgeplane.routing.router import compile_routes
from edgeplane.routing.snapshot import CompiledRoute, FunctionIntegration, Snapshot
from edgeplane.runtime.admin_cache import CacheFlushIntegration

if TYPE_CHECKING:
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request

_JSON = b"application/json"
_PLACEHOLDER = Integration(type="mock")


def _json(status: int, obj: object) -> tuple[int, bytes, bytes]:
    return status, orjson.dumps(obj, option=orjson.OPT_INDENT_2), _JSON


class AdminSource(Protocol):
    """What the admin API reads of a running worker (`runtime.gateway.Gateway`)."""

    @property
    def draining(self) -> bool: ...

    @property
    def ready(self) -> bool: ...

    _snapshot: Snapshot | None
    _ws_registry: Any
    _metrics: Any

    def stats(self) -> dict[str, Any]: ...
    def upstream_telemetry(self) -> list[dict[str, Any]]: ...


def build_admin_snapshot(gateway: AdminSource, admin: AdminConfig) -> Snapshot:
    """The admin app; every route but `admin.public_paths` behind `admin_auth(admin)`."""
    auth = admin_auth(admin)
    guarded: tuple[AdminAuth, ...] = (auth,) if auth is not None else ()

    def healthz(req):
        if gateway.draining:
            return _json(503, {"status": "draining"})
        return _json(200, {"status": "ok", "pid": os.getpid()})

    def ready(req):
        if gateway.ready and not gateway.draining:
            return _json(200, {"status": "ready", "pid": os.getpid()})
        return _json(503, {"status": "not ready"})

    def upstreams(req):
        return _json(200, {"pid": os.getpid(), "upstreams": gateway.upstream_telemetry()})

    def stats(req):
        per_worker = b"per_worker=1" in req.query.split(b"&") or b"per_worker=true" in req.query.split(b"&")
        return _json(200, gateway._metrics.stats(gateway, per_worker))

    def routes(req):
        top = gateway._snapshot
        # with stages: every stage's table (and its canary side's), each route naming its stage
        staged = [(None, False, top)]
        if top.stages is not None:
            staged = [(stage, False, snap) for stage, snap in top.stages.snapshots.items()]
            staged += [(stage, True, c.snapshot) for stage, c in top.stages.canaries.items()]
        return _json(200, {**({"stages": summary(gateway.config)} if top.stages is not None else {}), "routes": [
            {"priority": i + 1, "route": rc.key, "host": rc.host, "integration": rc.integration.type,
             **({"stage": stage} if stage is not None else {}), **({"canary": True} if canary else {}),
             **route_view(snapshot.config, rc)}
            for stage, canary, snapshot in staged for i, rc in enumerate(snapshot.router.table())
        ]})

    def metrics(req):
        accept = b", ".join(header_all(req, b"accept")).decode("latin-1")
        body, content_type = gateway._metrics.scrape(gateway, accept)
        return 200, body, content_type

    handlers = {"/healthz": healthz, "/ready": ready, "/upstreams": upstreams, "/stats": stats, "/routes": routes,
                "/metrics": metrics}
    compiled: list[CompiledRoute] = []
    pairs: list[tuple[RouteConfig, CompiledRoute]] = []
    for i, (path, fn) in enumerate(handlers.items()):
        rc = RouteConfig(key=f"GET {path}", method="GET", path=path, host=None,
                         integration=_PLACEHOLDER, index=i)
        stages = () if path in admin.public_paths else guarded
        compiled.append(CompiledRoute(rc, rc.key, stages, FunctionIntegration(fn)))
        pairs.append((rc, compiled[-1]))
    rc = RouteConfig(key="GET /", method="GET", path="/", host=None, integration=_PLACEHOLDER, index=len(compiled))
    compiled.append(CompiledRoute(rc, rc.key, (auth.for_dashboard(),) if auth is not None else (),
                                  DashboardIntegration()))
    pairs.append((rc, compiled[-1]))
    registry = getattr(gateway, "_ws_registry", None)
    if registry is not None:
        for method in ("POST", "GET", "DELETE", "ANY"):
            rc = RouteConfig(key=f"{method} /@connections/{{id}}", method=None if method == "ANY" else method,
                             path="/@connections/{id}", host=None, integration=_PLACEHOLDER,
                             index=len(compiled))
            compiled.append(CompiledRoute(rc, rc.key, guarded, ConnectionsIntegration(registry, method)))
            pairs.append((rc, compiled[-1]))
    rc = RouteConfig(key="DELETE /cache", method="DELETE", path="/cache", host=None, integration=_PLACEHOLDER,
                     index=len(compiled))
    compiled.append(CompiledRoute(rc, rc.key, guarded, CacheFlushIntegration(gateway, forwarded_call)))
    pairs.append((rc, compiled[-1]))
    reload_from_source = getattr(gateway, "reload_from_source", None)
    if reload_from_source is not None:
        rc = RouteConfig(key="POST /config/reload", method="POST", path="/config/reload", host=None,
                         integration=_PLACEHOLDER, index=len(compiled))
        compiled.append(CompiledRoute(rc, rc.key, guarded, ReloadIntegration(reload_from_source)))
        pairs.append((rc, compiled[-1]))
    router = compile_routes(pairs)
    return Snapshot(None, router, compiled)


class ReloadIntegration:
    """`POST /config/reload`: reload the config from its file (as SIGHUP does). 200 with
    what the reload did; 422 with every error by location when the new config is refused
    (the old one keeps serving); 409 when there is no file to reload from."""

    __slots__ = ("reload", "tasks")

    def __init__(self, reload: Any) -> None:
        self.reload = reload  # `Gateway.reload_from_source`, a coroutine function
        self.tasks: set[asyncio.Task[None]] = set()

    def handle(self, proto: HttpProtocol, req: Request) -> None:
        task = proto.loop.create_task(self._later(proto, req))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _later(self, proto: HttpProtocol, req: Request) -> None:
        from edgeplane.config.loader import ConfigError
        from edgeplane.runtime.reload import ReloadRefused

        try:
            status, body = 200, await self.reload()
        except ConfigError as exc:
            status, body = 422, {"message": "config refused; the running config keeps serving",
                                 "errors": exc.located()}
        except ReloadRefused as exc:
            status, body = 422, {"message": "config cannot be applied live; the running config "
                                            "keeps serving", "errors": exc.problems}
        except LookupError as exc:  # no file behind the running config
            status, body = 409, {"message": str(exc)}
        except OSError as exc:  # a listener that cannot be bound, a file that cannot be read
            status, body = 422, {"message": "config cannot be applied; the running config keeps "
                                            "serving", "errors": [str(exc)]}
        except Exception:  # logged with its traceback by the reload; nothing was swapped in
            status, body = 500, {"message": "reload failed inside the gateway; the running config "
                                            "keeps serving (see the log)"}
        if not req.responded and proto.transport is not None and not proto.transport.is_closing():
            _answer(proto, req, status, orjson.dumps(body))


def route_view(config: Config | None, rc: RouteConfig) -> dict[str, Any]:
    """What `/routes` tells of a route beyond its key: its upstream, the policies that act
    on it in chain order (as `edgeplane routes` lists them), its authorizer, the throttle
    levels it passes (its own, then the server's) and the CORS settings that apply."""
    if config is None:
        return {}
    auth = config.authorizers.get(rc.auth) if rc.auth else None
    registry = config.registry
    levels = (("route", rc.policies.get("throttle")), ("server", config.policies.get("throttle")))
    own_cors = rc.policies.get("cors")
    cors = None if own_cors is False else own_cors or config.policies.get("cors")
    return {
        "upstream": rc.integration.upstream,  # None with a split:
        **({"split": [{"upstream": n, "weight": w} for n, w in rc.integration.split]}
           if getattr(rc.integration, "split", ()) else {}),
        "policies": [p.name for p in registry.policies() if p.applies(rc, config)] if registry is not None else [],
        "auth": {"name": rc.auth, "type": getattr(auth, "type", None), "scopes": list(rc.scopes)} if rc.auth else None,
        "throttle": [{"level": level, **_plain(t)} for level, t in levels if t is not None],
        "cors": {"source": "route" if own_cors else "server", **_plain(cors)} if cors is not None else None,
    }


def _plain(settings: Any) -> dict[str, Any]:
    """A policy's settings (a dataclass) as JSON-ready values."""
    return dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) and not isinstance(settings, type) else {}


def admin_listener_tls(admin: AdminConfig) -> ListenerTls | None:
    """The admin listener's TLS context (None: plain HTTP), built like the data plane's."""
    return ListenerTls.from_config(admin.tls) if admin.tls is not None else None


# ---------------------------------------------------------------------------- credentials

# The 401 body is the gateway's usual {"message":"Unauthorized"} (`send_error`).
_CHALLENGE = b'www-authenticate: Bearer realm="edgeplane-admin"\r\n'
# RFC 6750 section 3.1: a token was presented and is not the right one.
_CHALLENGE_INVALID = b'www-authenticate: Bearer realm="edgeplane-admin", error="invalid_token"\r\n'


def admin_auth(admin: AdminConfig) -> AdminAuth | None:
    """The credential stage `admin` asks for; None when anonymous access was asked for
    (`insecure`) or there is no TCP listener (only a worker's Unix socket serves the app).
    A listener with neither credentials nor `insecure` (a hand-built config: the loader
    refuses it) raises ValueError: the admin API fails closed."""
    if admin.token is not None or admin.mtls:
        return AdminAuth(admin.token, admin.mtls)
    if admin.listen is not None and not admin.insecure:
        raise ValueError("admin listener without credentials: set admin.auth "
                         "(token and/or mtls) or admin.insecure")
    return None


class AdminAuth:
    """Stage: the caller presents every configured credential, or gets 401."""

    __slots__ = ("token", "mtls", "signin")

    def __init__(self, token: bytes | None, mtls: bool, signin: bool = False) -> None:
        self.token = token
        self.mtls = mtls
        # `GET /`: a browser that sent no token, or a wrong one, gets the dashboard's
        # sign-in page (HTML) as the 401's body rather than JSON.
        self.signin = signin

    def for_dashboard(self) -> AdminAuth:
        return AdminAuth(self.token, self.mtls, signin=True)

    def __call__(self, proto: HttpProtocol, req: Request) -> bool:
        if on_worker_socket(proto):
            return True
        # Set only for a certificate that verified against admin.tls.client_ca (one that
        # does not fails the handshake), and only on a TLS listener.
        if self.mtls and proto.client_cert_subject is None:
            return _refuse(proto, req, "admin: no client certificate", _CHALLENGE)
        if self.token is not None:
            presented = _bearer(req)
            if presented is None:
                return self._refuse_token(proto, req, "admin: no bearer token", _CHALLENGE)
            if not hmac.compare_digest(presented, self.token):
                return self._refuse_token(proto, req, "admin: wrong bearer token", _CHALLENGE_INVALID)
        return True

    def _refuse_token(self, proto: HttpProtocol, req: Request, reason: str, challenge: bytes) -> bool:
        if not self.signin:
            return _refuse(proto, req, reason, challenge)
        found = pages()
        req.error = reason
        proto.ctx.count_error("401")
        proto.send_local(req, 401, found.signin, HTML_TYPE, extra=challenge + found.headers)
        return False


def on_worker_socket(proto: HttpProtocol) -> bool:
    """The connection came in on a worker's private Unix socket (`runtime.gateway`)."""
    sock = proto.transport.get_extra_info("socket")
    return sock is not None and sock.family == socket.AF_UNIX


def forwarded_call(proto: HttpProtocol, req: Request) -> bool:
    """A call another worker forwarded here (served locally only, so it never loops)."""
    return on_worker_socket(proto) and any(k == FORWARDED for k, _ in req.headers)


def _bearer(req: Request) -> bytes | None:
    """The token of the one `Authorization: Bearer TOKEN` header (several: None)."""
    values = header_all(req, b"authorization")
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


def _refuse(proto: HttpProtocol, req: Request, reason: str, challenge: bytes) -> bool:
    proto.send_error(req, 401, reason, extra=challenge)
    return False


# ---------------------------------------------------------------------------- @connections

FORWARDED = b"x-edgeplane-forwarded"
_T_UPSTREAM = 4  # server.T_UPSTREAM: the body-collection deadline


class ConnectionsIntegration:
    """`/@connections/{id}` for one method (ANY: 405)."""

    __slots__ = ("registry", "method")

    def __init__(self, registry: Any, method: str) -> None:
        self.registry = registry
        self.method = method

    def handle(self, proto: HttpProtocol, req: Request) -> None:
        if self.method == "ANY":
            proto.send_local(req, 405, b'{"message":"Method Not Allowed"}',
                             extra=b"allow: GET, POST, DELETE\r\n")
            return
        conn_id = (req.params or {}).get("id", b"").decode("latin-1")
        from edgeplane.websocket.connections import BAD_ID, parse_id

        if parse_id(conn_id) is None:
            req.error = "malformed connection id"
            proto.ctx.count_error("400")
            proto.send_local(req, 400, orjson.dumps({"message": BAD_ID}))
            return
        if self.method != "POST":
            self._run(proto, req, conn_id, b"")
            return
        limit = self.registry.max_message_bytes()
        if req.content_length is not None and req.content_length > limit:
            proto.send_error(req, 413, f"@connections message larger than {limit} bytes")
            return
        if req.complete:
            self._run(proto, req, conn_id, b"".join(req.body_buf or ()))
            return
        req.exchange = _BodyCollector(self, proto, req, conn_id, limit)
        proto.set_deadline(_T_UPSTREAM, proto.ctx.limits.body_timeout)

    def _run(self, proto: HttpProtocol, req: Request, conn_id: str, body: bytes) -> None:
        registry = self.registry
        now = registry.answer_now(self.method, conn_id, body, forwarded_call(proto, req))
        if now is not None:
            _answer(proto, req, *now)
            return
        registry.track(proto.loop.create_task(self._later(proto, req, conn_id, body)))

    async def _later(self, proto: HttpProtocol, req: Request, conn_id: str, body: bytes) -> None:
        status, answer = await self.registry.call(self.method, conn_id, body)
        if not req.responded and proto.transport is not None and not proto.transport.is_closing():
            _answer(proto, req, status, answer)


def _answer(proto: HttpProtocol, req: Request, status: int, body: bytes) -> None:
    if status >= 400:
        req.error = f"@connections: {status}"
        proto.ctx.count_error(str(status))
    proto.send_local(req, status, body)


class _BodyCollector:
    """Reads a POST body that arrives after dispatch (the server's exchange interface)."""

    __slots__ = ("integ", "proto", "req", "conn_id", "limit", "chunks", "size", "timeout", "done")

    def __init__(self, integ: ConnectionsIntegration, proto: HttpProtocol, req: Request,
                 conn_id: str, limit: int) -> None:
        self.integ = integ
        self.proto = proto
        self.req = req
        self.conn_id = conn_id
        self.limit = limit
        self.chunks: list[bytes] = list(req.body_buf or ())
        self.size = sum(map(len, self.chunks))
        self.timeout = proto.ctx.limits.body_timeout
        self.done = False

    def on_request_body(self, chunk: bytes) -> None:
        if self.done:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.done = True
            self.req.keep_alive = False
            self.proto.send_error(self.req, 413, f"@connections message larger than {self.limit} bytes")
            return
        self.chunks.append(chunk)

    def on_request_complete(self) -> None:
        if self.done:
            return
        self.done = True
        self.integ._run(self.proto, self.req, self.conn_id, b"".join(self.chunks))

    def abort(self, reason: str) -> None:
        self.done = True

    def request_stalled(self) -> bool:
        return not self.done

    def on_timeout(self) -> None:
        if not self.done:
            self.done = True
            self.proto.send_error(self.req, 408, "@connections body not received in time")

    def pause_upstream(self) -> None:
        pass

    def resume_upstream(self) -> None:
        pass


class WorkerForwarder:
    """Calls the admin app of another worker of this host over its Unix socket."""

    def __init__(self, socket_path: Any, timeout: float = 2.0) -> None:
        self.socket_path = socket_path  # worker index -> path
        self.timeout = timeout

    async def call(self, index: int, method: str, conn_id: str, body: bytes) -> tuple[int, bytes]:
        return await self.request(index, method, f"/@connections/{conn_id}", body)

    async def request(self, index: int, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        """One forwarded admin call to worker `index`: (status, body); 410 when no such
        worker listens, 502 when it fails to answer."""
        head = (f"{method} {target} HTTP/1.1\r\nhost: localhost\r\n"
                f"x-edgeplane-forwarded: 1\r\nconnection: close\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode()
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path(index)), self.timeout)
            writer.write(head + body)
            data = await asyncio.wait_for(reader.read(), self.timeout)
            return _parse_response(data)
        except (FileNotFoundError, ConnectionRefusedError):
            return 410, b'{"message":"Gone"}'  # no such worker: its connections are gone
        except (TimeoutError, OSError, ValueError):
            return 502, b'{"message":"Bad Gateway"}'
        finally:
            if writer is not None:
                writer.close()


def _parse_response(data: bytes) -> tuple[int, bytes]:
    class _Reader:
        def __init__(self) -> None:
            self.body = bytearray()
            self.complete = False

        def on_body(self, chunk: bytes) -> None:
            self.body += chunk

        def on_message_complete(self) -> None:
            self.complete = True

    r = _Reader()
    parser = httptools.HttpResponseParser(r)
    try:
        parser.feed_data(data)
    except httptools.HttpParserError as exc:
        raise ValueError(str(exc)) from None
    if not r.complete:
        raise ValueError("incomplete response")
    return parser.get_status_code(), bytes(r.body)
