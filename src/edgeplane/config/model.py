"""The validated configuration model: frozen dataclasses, nothing else.

`edgeplane.config` turns YAML (or a dict) into these objects and refuses bad input
whole; everything downstream (router, server, pool, CLI) reads only these types, never
the raw dict. All durations are float seconds, all sizes are int bytes.

Invariants:
- every `RouteConfig.integration.upstream` names a key of `Config.upstreams`;
- `Config.routes` keeps the order of the file (`index` is the position in `routes:`);
- nothing here is mutated after load: a reload builds a new `Config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from edgeplane.config.resilience import Resilience
from edgeplane.http.paths import STRICT, PathPolicy


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str  # "127.0.0.1", "::1", "0.0.0.0"
    port: int  # 0 = pick a free port (tests)


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream endpoint, from "http://host:port", "https://host:port" or
    "unix:/path/to.sock" (HTTP over a Unix socket: `host` is the path, `port` 0)."""

    scheme: str  # "http" | "https" | "unix"
    host: str
    port: int

    @property
    def authority(self) -> str:
        """Value for the Host header toward this target."""
        if self.scheme == "unix":
            return "localhost"
        default = 80 if self.scheme == "http" else 443
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"unix:{self.host}" if self.scheme == "unix" else f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PoolConfig:
    max_connections: int = 1024  # per target, in use + idle + connecting
    max_idle: int = 128  # per target
    idle_timeout: float = 60.0  # idle pooled connection is closed after this
    connect_timeout: float = 5.0
    # Requests queued when max_connections is reached: by default one per client
    # connection a worker may hold, so a burst the listener admitted is queued, never
    # refused; each waits at most wait_timeout.
    max_waiters: int = 65_536
    wait_timeout: float = 5.0  # a queued request gets 503 after this


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """How https:// targets of an upstream are reached."""

    ca_file: str | None = None  # None = the system trust store
    verify: bool = True  # verify the chain and the name
    server_name: str | None = None  # SNI and name to verify; None = the target host
    cert_file: str | None = None  # the gateway's client certificate (mTLS to the backend) ...
    key_file: str | None = None  # ... and its key


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    targets: tuple[Target, ...]
    pool: PoolConfig = PoolConfig()
    tls: UpstreamTls = UpstreamTls()
    # One weight per target (`targets: [{url, weight}]`); () = all equal (round robin).
    weights: tuple[int, ...] = ()
    # Targets naming stage variables, as written (url, weight): the upstream is then a
    # template, served as one resolved copy per stage (`config.stages.expand`).
    templates: tuple[tuple[str, int], ...] = ()
    # `lb`, `outlier_detection`, `panic_threshold`, `retries` (`config.resilience`)
    resilience: Resilience = Resilience()

    def pools_key(self) -> UpstreamConfig:
        """What decides the upstream's pools: everything but the weights and the
        resilience settings (a reload that changes only those keeps the pools and their
        connections, and applies them at the swap)."""
        return UpstreamConfig(self.name, self.targets, self.pool, self.tls, (), self.templates)


@dataclass(frozen=True, slots=True)
class TlsCertificate:
    cert: str  # PEM certificate (chain) file
    key: str  # PEM private key file (unencrypted)
    hosts: tuple[str, ...] = ()  # SNI names, exact or "*.example.com"; default: SAN DNS names


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS termination: listeners and the certificates they present, chosen by SNI."""

    listen: tuple[ListenAddress, ...]
    certificates: tuple[TlsCertificate, ...]  # the first one is the default
    min_version: Literal["1.2", "1.3"] = "1.2"
    client_ca: str | None = None  # mTLS: CA file that client certificates must chain to
    client_cert: Literal["none", "optional", "required"] = "none"


@dataclass(frozen=True, slots=True)
class Integration:
    type: Literal["http", "mock"]
    # http: one upstream, or a weighted split between upstreams ((name, weight), ...)
    upstream: str | None = None
    split: tuple[tuple[str, int], ...] = ()
    path: str | None = None  # template such as "/v2/{proxy}"; None = request path
    timeout: float = 29.0  # integration timeout -> 504 (until the response head, once the request is sent)
    idle_timeout: float | None = None  # no byte either way this long while a body moves (None: `timeout`)
    retries: Any = None  # the route's `config.resilience.RetryConfig`, over its upstream's
    preserve_host: bool = False
    # mock
    status: int = 200
    body: bytes = b""  # already serialised (dict/list -> JSON, str -> UTF-8)
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Cluster mode: throttles and quotas shared by several hosts through one Redis."""

    redis: str  # redis://[user:pass@]host:port/db, rediss://..., unix:///path.sock
    key_prefix: str = "edgeplane:"
    failure_mode: str = "open"  # Redis down or slow: "open" admits, "closed" answers 503
    timeout: float = 0.1  # seconds per Redis round trip before Redis counts as down
    lease: float = 0.1  # share of a bucket's burst one worker leases at a time
    retry_interval: float = 1.0  # seconds between probes while Redis is down


@dataclass(frozen=True, slots=True)
class WebSocketLimits:
    """Limits of one WebSocket connection (proxied routes and WebSocket APIs alike);
    the defaults are Amazon API Gateway's."""

    max_message_bytes: int = 128 * 1024  # a larger message closes the connection with 1009
    max_frame_bytes: int = 32 * 1024  # WebSocket APIs: a larger frame closes with 1009 (AWS)
    idle_timeout: float = 600.0  # no message either way (nor a client ping) -> close 1001
    max_lifetime: float = 7200.0  # connection age -> close 1001
    messages_per_second: float | None = None  # per connection, client -> gateway
    message_burst: int = 100
    ping_interval: float = 30.0  # the gateway pings the client this often; 0 = never
    pong_timeout: float = 10.0  # a ping unanswered this long drops the connection
    connections_per_second: float = 500.0  # new connections per WebSocket API


@dataclass(frozen=True, slots=True)
class WebSocketIntegration:
    """A WebSocket API route's backend: an HTTP POST to `upstream` at `path`, or (`type:
    function`) a Python handler called with AWS's WebSocket event."""

    upstream: str | None
    path: str  # literal upstream path, e.g. "/message"
    timeout: float = 29.0
    type: str = "http"
    handler: str | None = None  # function: `package.module:name`


@dataclass(frozen=True, slots=True)
class WebSocketRouteConfig:
    key: str  # "$connect", "$disconnect", "$default" or a selected key ("sendMessage")
    integration: WebSocketIntegration | None  # None: $connect/$disconnect that only authorize
    auth: str | None = None  # $connect only: name of an authorizer
    scopes: tuple[str, ...] = ()  # $connect only, JWT: at least one must be granted
    return_response: bool = False  # message routes: a 2xx body goes back to the client


@dataclass(frozen=True, slots=True)
class WebSocketApiConfig:
    """An API whose clients speak WebSocket to the gateway (AWS's WebSocket APIs)."""

    name: str
    path: str  # literal request path of the upgrade ("/chat")
    host: str | None  # "chat.example.com" or "*.example.com" (lower-case); None = any
    route_selection: str  # "$request.body.action", "${request.body.a}/${request.body.b}"
    routes: dict[str, WebSocketRouteConfig]
    limits: WebSocketLimits = WebSocketLimits()  # top-level `websocket:` + the API's `limits:`


@dataclass(frozen=True, slots=True)
class RouteConfig:
    key: str  # as written: "GET /users/{id}", "ANY /files/{proxy+}", "$default"
    method: str | None  # upper-case method, None for ANY and for $default
    path: str | None  # "/users/{id}"; None for $default
    host: str | None  # "api.example.com" or "*.example.com" (lower-case); None = any
    integration: Integration
    index: int  # position in the routes list
    auth: str | None = None  # name of an authorizer
    scopes: tuple[str, ...] = ()  # JWT: at least one must be granted
    forward_claims: tuple[tuple[str, str], ...] = ()  # (header name, claim name)
    websocket: WebSocketLimits | None = None  # proxied WebSockets: top-level values + overrides
    # Route-level policy keys (`cors`, `ip_rules`, `throttle`, a plugin's): key -> the
    # model its policy loaded (`Policy.load_route`).
    policies: dict[str, Any] = field(default_factory=dict)
    # The stage this copy of the route serves (`config.stages.for_stage`): its limits are
    # its own, as each stage's are in AWS.
    stage: str = "$default"

    @property
    def limit_key(self) -> str:
        """The route's name in the identity of its limits: `host key`, with the stage
        when it is not `$default`."""
        base = f"{self.host or ''} {self.key}"
        return base if self.stage == "$default" else f"{base} @{self.stage}"

    @property
    def is_default(self) -> bool:
        return self.path is None


@dataclass(frozen=True, slots=True)
class Limits:
    max_head_bytes: int = 10 * 1024  # request line + headers -> 431
    max_headers: int = 100  # header count -> 431
    max_body_bytes: int = 10 * 1024 * 1024  # -> 413
    head_timeout: float = 10.0  # whole head must arrive in this -> 408
    body_timeout: float = 30.0  # max gap between request body reads -> 408
    keepalive_timeout: float = 60.0  # idle client connection closed after this
    send_timeout: float = 60.0  # client not reading our response -> abort
    max_pipelined: int = 16  # parsed requests queued behind the active one
    # A request body is read up to this many bytes before an upstream connection is
    # taken (the whole body when it is smaller): a trickling client pins nothing.
    request_buffering: int = 64 * 1024
    # While a body is read for an integration it must grow by `min_body_bytes` in
    # every `min_body_window` seconds, else 408 (`min_body_rate: {bytes, per}`).
    min_body_bytes: int = 1024
    min_body_window: float = 10.0
    max_connections: int = 0  # open client connections per worker (0 = auto, see http.context)
    max_connections_per_ip: int = 0  # per client address and worker; 0 = no cap


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    destination: Literal["stdout", "stderr", "file", "logging", "off"] = "stdout"
    path: str | None = None  # for destination "file"
    flush_interval: float = 0.5
    buffer_bytes: int = 64 * 1024  # flush early past this
    queue_bytes: int = 8 * 1024 * 1024  # lines waiting for the writer thread; past it, dropped
    # `format` as written (a string, or a mapping as key/value pairs); None: the default shape
    format: str | tuple[tuple[str, Any], ...] | None = None
    # The compiled `format` (`observability.access_format.compile_format`); not compared, so
    # a reload with the same format keeps the log.
    render: Any = field(default=None, compare=False)
    # `stages.NAME.access_log.format`, by stage: as written, and compiled (not compared)
    stage_formats: tuple[tuple[str, Any], ...] = ()
    stage_renders: dict[str, Any] = field(default_factory=dict, compare=False)
    # stages that log to a destination of their own: (stage, its whole access-log config)
    stage_logs: tuple[tuple[str, AccessLogConfig], ...] = ()


@dataclass(frozen=True, slots=True)
class StageConfig:
    """One of `stages`: its variables (`${stageVariables.NAME}`), description and default
    route throttle."""

    name: str
    variables: tuple[tuple[str, str], ...] = ()
    description: str = ""
    throttle: Any = None  # the throttle policy's route-level model, for routes without their own
    canary: CanaryConfig | None = None


@dataclass(frozen=True, slots=True)
class CanaryConfig:
    """`stages.NAME.canary`: the share of the stage's requests its canary serves."""

    percent: float
    variable_overrides: tuple[tuple[str, str], ...] = ()
    sticky_header: str | None = None
    sticky_cookie: str | None = None
    force_header: str | None = None  # `always` / `never` in it forces a side (off when None)
    # The API the canary serves: a recorded deployment's id or a config file (as
    # written); None: the stage's own deployment, with `variable_overrides`.
    deployment: str | None = None

    def fingerprint(self) -> str:
        """Names this canary as configured: `edgeplane canary abort` switches off this
        one; a changed canary (another deployment or percent) runs again."""
        return f"{self.deployment or '-'} {self.percent!r} {sorted(self.variable_overrides)!r}"


@dataclass(frozen=True, slots=True)
class StageApi:
    """What one stage serves when its API is not the config file's own routes
    (`deploy.served`): the recorded deployment it points at, and its canary side."""

    deployment: str | None  # None: the config file's API (with promoted variables)
    config: Config  # the stage's API: the deployment's routes and authorizers on this host
    canary_deployment: str | None = None  # the canary side's deployment ("" = the stage's own)
    canary: Config | None = None  # the canary side, None when there is none (or it was aborted)


@dataclass(frozen=True, slots=True)
class DomainMapping:
    """`domains.HOST`: requests for `host` go to `stage`, under `base_path` ("" = root)."""

    host: str
    stage: str
    base_path: str = ""


@dataclass(frozen=True, slots=True)
class StagesConfig:
    stages: dict[str, StageConfig]
    routing: str = "base_path"  # `stage_routing`: base_path (/{stage}/...) | none
    domains: tuple[DomainMapping, ...] = ()


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """`tracing`: W3C Trace Context propagation and OTLP/HTTP export (`observability.tracing`)."""

    endpoint: str  # the collector's OTLP/HTTP traces URL
    sample_ratio: float = 1.0  # of new traces (a parent's sampled flag decides for continued ones)
    service_name: str = "edgeplane"
    headers: tuple[tuple[str, str], ...] = ()  # sent with each export (an API key...)
    timeout: float = 10.0  # per export request
    max_queue: int = 2048  # spans waiting for export; more are dropped and counted
    max_batch: int = 512  # spans per export request
    flush_interval: float = 1.0  # how often queued spans are exported


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin listener and who may call it (enforced by `runtime.admin`).

    With a listener, either `token` and/or `mtls` is set (every non-public path needs
    all the configured credentials) or `insecure` says anonymous access is wanted."""

    # The GET endpoints `public_paths` may open (the @connections API never is public).
    # (Not annotated: a class constant, not a field.)
    PUBLIC_PATH_CHOICES = ("/healthz", "/ready", "/routes", "/stats", "/upstreams")

    listen: ListenAddress | None = None  # None = no admin listener
    # Bearer token read at load from `auth.token_file` / `auth.token_env`; never written
    # in the config itself, never shown (repr) nor copied into `Config.raw`.
    token: bytes | None = field(default=None, repr=False)
    mtls: bool = False  # require a client certificate chaining to `tls.client_ca`
    tls: TlsConfig | None = None  # the listener speaks TLS: one certificate, no `listen`
    insecure: bool = False  # anonymous access, asked for explicitly
    public_paths: tuple[str, ...] = ("/healthz", "/ready")  # served without credentials


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[ListenAddress, ...]
    workers: int | Literal["auto"] = 1
    parser: Literal["native", "httptools", "h11"] = "native"
    path_policy: PathPolicy = STRICT  # `http.path_normalization`
    admin: AdminConfig = AdminConfig()
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    limits: Limits = Limits()
    access_log: AccessLogConfig = AccessLogConfig()
    drain_timeout: float = 30.0
    drain_delay: float = 0.0  # on stop: not-ready but still serving this long, then the drain
    log_level: str = "info"
    log_format: str = "text"  # `log.format`: text | json (the gateway's own log)
    tracing: TracingConfig | None = None
    stages: StagesConfig | None = None  # None: one `$default` stage at the root
    # In a stage's own config (`config.stages.for_stage`): its variables (with the canary
    # side's overrides), for integrations that hand them on (a function's `stageVariables`).
    stage_variables: tuple[tuple[str, str], ...] = ()
    # Stage -> the deployment it serves (`deploy.served.attach`); a stage not here serves
    # this config's own routes. `deployed` is the store state it was built from (JSON).
    apis: dict[str, StageApi] = field(default_factory=dict, compare=False)
    deployed: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    # name -> the model its type's policy loaded (`Policy.load_authorizer`); each has
    # `name` and `type`
    authorizers: dict[str, Any] = field(default_factory=dict)
    data_dir: str = "data"  # quota counters: DATA_DIR/edgeplane.db
    cluster: ClusterConfig | None = None  # None = limits and quotas local to this host
    tls: TlsConfig | None = None  # None = no TLS listeners
    websocket: WebSocketLimits = WebSocketLimits()  # defaults for both WebSocket modes
    websocket_apis: dict[str, WebSocketApiConfig] = field(default_factory=dict)
    # Top-level policy sections (`cors`, `throttle`, `usage_plans`, a plugin's): key ->
    # the model its policy loaded (`Policy.load_section`).
    policies: dict[str, Any] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()  # the `plugins:` modules
    registry: Any = field(default=None, compare=False, repr=False)  # plugins.registry.Registry
    source: str = "<dict>"  # file path the config came from, for messages
    warnings: tuple[str, ...] = ()  # "location: message" of valid but risky settings
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def authorizers_of(self, kind: str) -> dict[str, Any]:
        """The authorizers whose type is `kind`, by name."""
        return {name: a for name, a in self.authorizers.items() if a.type == kind}

    @property
    def trusted_proxies(self) -> tuple[str, ...]:
        """Peers whose X-Forwarded-For is believed (the `trusted_proxies` section)."""
        value: tuple[str, ...] = self.policies.get("trusted_proxies", ())
        return value
