"""Bench scenarios: owns what each scenario sends and the gateway config it runs with.

| scenario        | request                         | gateway                                          | peers      |
| --------------- | ------------------------------- | ------------------------------------------------ | ---------- |
| `plain`         | GET /2b (2-byte answer)         | `$default` -> demo upstream, access log off      | proxy      |
| `full`          | GET /2b + a signed JWT          | as plain + RS256 JWT authorizer on `GET /{proxy+}`| (vs plain) |
|                 |                                 | + per-client throttle + the default access log   |            |
|                 |                                 | (stdout) + tracing at 1 % + request id, telemetry|            |
|                 |                                 | scraped from the admin API every second          |            |
| `mock`          | GET /2b                         | `$default` mock integration answering "ok"       | fixed "ok" |
| `post-1k`       | POST /echo, 1 KiB body          | as plain (the upstream echoes the body as JSON)  | proxy      |
| `resp-64k`      | GET /bytes/65536                | as plain                                         | proxy      |
| `keepalive-off` | GET /2b, `Connection: close`    | as plain; a new client connection per request    | proxy      |
| `full-off`      | GET /2b + a signed JWT          | as full, every observability output off: access  | (vs plain) |
|                 |                                 | log off, no tracing, no scrape (metrics count:   |            |
|                 |                                 | they cannot be turned off)                       |            |
| `full-obs`      | GET /2b + a signed JWT          | as full-off + the default access log to stdout   | (vs plain) |
|                 |                                 | (the server's log file) + tracing at 1 % to an   |            |
|                 |                                 | OTLP sink + /metrics scraped every second        |            |
| `cache-hit`     | GET /2b                         | as plain + `cache: {ttl: 300s}` on the route:    | cache      |
|                 |                                 | after the first request every answer is a hit    |            |
| `function`      | GET /2b                         | `$default` function integration: the async       | (vs mock)  |
|                 |                                 | handler `bench_apps.hello`, in process           |            |

`full` also has a per-client throttle keyed by the JWT `sub`, with limits too high to
reject, on one worker (per-client throttling is per process until the shared buckets
are wired). The JWT key and token come from `jwt_material` (one key per run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FULL_NOTE = ("full: JWT authorizer (RS256, cached verification) + per-client throttle keyed by the "
             "JWT sub (limits too high to reject) + the default access log (stdout, the server's log file) + "
             "tracing at 1 % to an OTLP sink + request id + metrics and telemetry scraped every second")


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    path: str = "/2b"
    method: str = "GET"
    body_size: int = 0
    keepalive: bool = True
    mock: bool = False
    access_log: str = "off"  # "off", "file" (workdir/access.log) or "stdout"
    jwt: bool = False  # a JWT authorizer on the route; the load sends a signed token
    scrape_telemetry: bool = False
    tracing: float = 0.0  # > 0: tracing at this sample ratio, exported to benches/otlp_sink.py
    peer_mode: str | None = "proxy"  # "proxy", "fixed", "cache", or None: compared with the peers' plain
    cache: bool = False  # the route has the response cache (`routes[].cache`)
    note: str | None = None
    headers: tuple[str, ...] = ()  # extra request headers ("Name: value"), e.g. from `run.py -H`
    function: bool = False  # the route is a function integration (`bench_apps.hello`, in process)
    peer_scenario: str | None = None  # the peers' scenario a ratio compares with (default: this one's)
    config_file: str | None = None  # a user's own config (`run.py --config`): served as it is


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("plain", "proxy route, no policy, access log off"),
        Scenario("full", "proxy route + JWT authorizer + per-client throttle + the default access log (stdout) "
                 "+ tracing at 1 % + metrics and telemetry scrape",
                 access_log="stdout", jwt=True, scrape_telemetry=True, tracing=0.01, peer_mode=None, note=FULL_NOTE),
        Scenario("mock", "mock integration (the gateway alone)", mock=True, peer_mode="fixed"),
        Scenario("post-1k", "1 KiB POST echoed by the upstream", path="/echo", method="POST", body_size=1024),
        Scenario("resp-64k", "64 KiB response", path="/bytes/65536"),
        Scenario("keepalive-off", "a new client connection per request", keepalive=False),
        Scenario("full-off", "as full with access log, tracing and scrape off (the observability baseline)",
                 jwt=True, peer_mode=None),
        Scenario("full-obs", "as full-off + default access log to stdout + tracing 1 % + /metrics scrape",
                 access_log="stdout", jwt=True, scrape_telemetry=True, tracing=0.01, peer_mode=None),
        Scenario("cache-hit", "proxy route with the response cache; every request after the first a hit",
                 cache=True, peer_mode="cache"),
        Scenario("function", "an in-process async function (Lambda-style) answering {\"ok\":true}",
                 function=True, peer_mode=None, peer_scenario="mock"),
    )
}


def parse_list(text: str) -> list[Scenario]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(SCENARIOS.values())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)} (known: {', '.join(SCENARIOS)}, all)")
    return [SCENARIOS[n] for n in names]


def gateway_config(s: Scenario, *, port: int, admin_port: int, upstream_port: int,
                   workers: int, workdir: Path, otlp_port: int | None = None) -> dict:
    """The gateway config for scenario `s` (written as YAML-compatible JSON)."""
    if s.mock:
        route = {"route": "$default", "integration": {"type": "mock", "status": 200, "body": "ok",
                                                       "content_type": "text/plain"}}
    elif s.function:  # benches/ is on the gateway's PYTHONPATH (run.py)
        route = {"route": "$default", "integration": {"type": "function", "handler": "bench_apps:hello"}}
    else:
        route = {"route": "$default", "integration": {"type": "http", "upstream": "demo"}}
    if s.cache:
        route["cache"] = {"ttl": "300s"}
    access_log: dict = {"destination": "off"}
    if s.access_log == "file":
        access_log = {"destination": "file", "path": str(workdir / "access.log")}
    elif s.access_log == "stdout":
        access_log = {"destination": "stdout"}
    authorizers = {}
    if s.jwt:
        jwks_path, _ = jwt_material(workdir)
        authorizers = {"bench_jwt": {"type": "jwt", "issuer": JWT_ISSUER, "audience": ["bench"],
                                     "algorithms": ["RS256"], "jwks": {"file": str(jwks_path)}}}
        route["auth"] = "bench_jwt"
        if workers == 1:  # per-client throttling is per process until shared buckets are wired
            route["throttle"] = {"rate": 1e9, "burst": 1_000_000, "key": "$context.authorizer.claims.sub"}
        route["route"] = "GET /{proxy+}"  # $default routes take no authorizer in AWS; a greedy one does
    extra: dict = {}
    if s.tracing:
        extra["tracing"] = {"sample_ratio": s.tracing, "otlp": {"endpoint": f"http://127.0.0.1:{otlp_port}/v1/traces"}}
    return {
        **extra,
        "authorizers": authorizers,
        "listen": [f"127.0.0.1:{port}"],
        "workers": workers,
        "log_level": "warning",
        "admin": {"listen": f"127.0.0.1:{admin_port}", "insecure": True},
        "access_log": access_log,
        "upstreams": {"demo": {"targets": [f"http://127.0.0.1:{upstream_port}"]}},
        "routes": [route],
    }


JWT_ISSUER = "https://bench.edgeplane.invalid/"
_JWT: dict[str, str] = {}  # one signing key and token per run: {"jwks": ..., "token": ...}


def jwt_material(workdir: Path) -> tuple[Path, str]:
    """(JWKS file written into `workdir`, a signed RS256 token valid for a day) for the
    `full` scenario. The key is made once per run with `cryptography`, so the gateway's
    JWKS and the load generator's token always match."""
    if not _JWT:
        import base64
        import json
        import time

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        def uint(n: int) -> str:
            return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pub = key.public_key().public_numbers()
        jwk = {"kty": "RSA", "kid": "bench", "alg": "RS256", "use": "sig", "n": uint(pub.n), "e": uint(pub.e)}
        now = int(time.time())
        head = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "bench"}).encode())
        body = b64(json.dumps({"iss": JWT_ISSUER, "aud": "bench", "sub": "bench-user",
                               "iat": now, "exp": now + 86400}).encode())
        sig = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
        _JWT["jwks"] = json.dumps({"keys": [jwk]})
        _JWT["token"] = f"{head}.{body}.{b64(sig)}"
    jwks_path = workdir / "jwks.json"
    jwks_path.write_text(_JWT["jwks"])
    return jwks_path, _JWT["token"]


def request_headers(s: Scenario, workdir: Path) -> list[str]:
    """Extra request headers the load generator sends for scenario `s`."""
    if s.jwt:
        return [f"Authorization: Bearer {jwt_material(workdir)[1]}", *s.headers]
    return list(s.headers)


def own(config_file: str, request: str, headers: list[str]) -> Scenario:
    """The scenario of `run.py --config FILE --request "METHOD /path" [-H ...]`: the user's
    own config, served as it is (its upstreams must be running), and one request."""
    method, _, path = request.strip().partition(" ")
    if not method.isalpha() or not path.startswith("/"):
        raise ValueError(f"--request {request!r}: write it as \"METHOD /path?query\"")
    return Scenario("own", f"{method.upper()} {path} against {config_file}", path=path, method=method.upper(),
                    peer_mode=None, headers=tuple(headers), config_file=config_file)
