"""Config loading: the model it builds, and every refusal with its location."""

from __future__ import annotations

import json

import pytest
import yaml
from jsonschema import Draft202012Validator

from conftest import REPO
from edgeplane.config import model
from edgeplane.config.loader import (
    ConfigError,
    load_config,
    load_config_text,
    parse_duration,
    parse_size,
)
from edgeplane.config.schema import build_schema, schema_json
from edgeplane.plugins.registry import default_registry
from edgeplane.routing.router import compile_routes

CONFIG_SCHEMA = build_schema(default_registry())

ROOT = REPO
DEFAULT_CONF = ROOT / "conf" / "edgeplane.yaml"
EXAMPLES = sorted((ROOT / "conf" / "examples").glob("*.yaml"))

ISSUE_YAML = """
listen: ["127.0.0.1:8080"]
workers: 1                      # or auto
http: {parser: httptools}       # or h11
admin: {listen: "127.0.0.1:9901", insecure: true}
upstreams:
  users: {targets: ["http://127.0.0.1:9001"]}
routes:
  - route: "GET /users/{id}"
    integration: {type: http, upstream: users}
  - route: "ANY /files/{proxy+}"
    integration: {type: http, upstream: users, path: "/v2/{proxy}"}
  - route: "GET /ping"
    integration: {type: mock, status: 200, body: {"ok": true}}
  - route: "$default"
    integration: {type: http, upstream: users}
"""


def base(**extra) -> dict:
    cfg = {"listen": "127.0.0.1:8080", "upstreams": {"users": {"targets": ["http://127.0.0.1:9001"]},
                                                      "static": {"targets": ["http://127.0.0.1:9002"]}}}
    cfg.update(extra)
    return cfg


def errors_of(source, **kw) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        if isinstance(source, str):
            load_config_text(source, **kw)
        else:
            load_config(source, **kw)
    assert exc.value.errors, "ConfigError without errors"
    return exc.value.errors


def route(key: str, **integration) -> dict:
    integration.setdefault("type", "http")
    if integration["type"] == "http":
        integration.setdefault("upstream", "users")
    return {"route": key, "integration": integration}


# -- what loads ------------------------------------------------------------------


def test_issue_config_builds_the_model():
    cfg = load_config_text(ISSUE_YAML, "issue.yaml")
    assert cfg.source == "issue.yaml"
    assert cfg.listen == (model.ListenAddress("127.0.0.1", 8080),)
    assert cfg.workers == 1 and cfg.parser == "httptools"
    assert cfg.admin.listen == model.ListenAddress("127.0.0.1", 9901)
    assert cfg.upstreams["users"].targets == (model.Target("http", "127.0.0.1", 9001),)
    assert cfg.upstreams["users"].pool == model.PoolConfig()
    r0, r1, r2, r3 = cfg.routes
    assert (r0.key, r0.method, r0.path, r0.host, r0.index) == ("GET /users/{id}", "GET", "/users/{id}", None, 0)
    assert r0.integration == model.Integration(type="http", upstream="users")
    assert (r1.method, r1.path) == (None, "/files/{proxy+}")
    assert r1.integration.path == "/v2/{proxy}"
    assert r2.integration == model.Integration(type="mock", status=200, body=b'{"ok":true}',
                                               content_type="application/json")
    assert r3.is_default and r3.method is None and r3.index == 3
    assert cfg.limits == model.Limits() and cfg.access_log == model.AccessLogConfig()
    assert cfg.raw["routes"][0]["route"] == "GET /users/{id}"
    compile_routes([(r, r) for r in cfg.routes])  # a loaded config always compiles


def test_dict_source_and_defaults():
    cfg = load_config({"listen": "0.0.0.0:0"})
    assert cfg.source == "<dict>"
    assert cfg.listen == (model.ListenAddress("0.0.0.0", 0),)
    assert cfg.routes == () and cfg.upstreams == {}
    assert cfg.admin.listen is None and cfg.drain_timeout == 30.0 and cfg.log_level == "info"


def test_load_from_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(ISSUE_YAML)
    cfg = load_config(f)
    assert cfg.source == str(f) and len(cfg.routes) == 4


def test_every_optional_key_is_converted():
    cfg = load_config(base(
        listen=["127.0.0.1:8080", "[::1]:8080"],
        workers="auto",
        http={"parser": "h11"},
        upstreams={"users": {"targets": ["http://localhost", "http://[::1]:9001/"],
                             "pool": {"max_connections": 10, "max_idle": 0, "idle_timeout": "2m",
                                      "connect_timeout": "250ms", "max_waiters": 5,
                                      "wait_timeout": 1.5}}},
        routes=[
            {"route": "GET /x", "host": "API.Example.com",
             "integration": {"type": "http", "upstream": "users", "timeout": "50ms",
                             "preserve_host": True}},
            {"route": "GET /t", "host": "*.example.com",
             "integration": {"type": "mock", "status": 201, "body": "hi",
                             "headers": {"X-A": "1", "Cache-Control": "no-store"}}},
            {"route": "GET /l", "integration": {"type": "mock", "body": [1, 2],
                                                "content_type": "application/x-list"}},
            {"route": "GET /e", "integration": {"type": "mock", "status": 204}},
        ],
        limits={"max_head_bytes": "16KiB", "max_headers": 50, "max_body_bytes": "1MB",
                "head_timeout": "5s", "body_timeout": 10, "keepalive_timeout": "1h",
                "send_timeout": "30s", "max_pipelined": 0},
        access_log={"destination": "file", "path": "/tmp/a.log", "flush_interval": "1s",
                    "buffer_bytes": "1MiB"},
        drain_timeout=0,
        log_level="debug",
    ))
    assert cfg.listen[1] == model.ListenAddress("::1", 8080)
    assert cfg.workers == "auto" and cfg.parser == "h11"
    up = cfg.upstreams["users"]
    assert up.targets == (model.Target("http", "localhost", 80), model.Target("http", "::1", 9001))
    assert up.pool == model.PoolConfig(10, 0, 120.0, 0.25, 5, 1.5)
    x, t, lst, e = cfg.routes
    assert x.host == "api.example.com" and x.integration.timeout == 0.05 and x.integration.preserve_host
    assert t.host == "*.example.com"
    assert t.integration.body == b"hi" and t.integration.status == 201
    assert t.integration.content_type == "text/plain; charset=utf-8"
    assert t.integration.headers == (("X-A", "1"), ("Cache-Control", "no-store"))
    assert lst.integration.body == b"[1,2]" and lst.integration.content_type == "application/x-list"
    assert e.integration.body == b"" and e.integration.status == 204
    assert cfg.limits == model.Limits(16384, 50, 1_000_000, 5.0, 10.0, 3600.0, 30.0, 0)
    assert cfg.access_log == model.AccessLogConfig("file", "/tmp/a.log", 1.0, 1024 * 1024)
    assert cfg.drain_timeout == 0.0 and cfg.log_level == "debug"


def test_overrides_apply_before_validation_without_mutating_input():
    raw = base(workers=1)
    cfg = load_config(raw, overrides={"workers": 4, "log_level": "debug", "admin.listen": "127.0.0.1:9901",
                                      "admin.insecure": True,
                                      "drain_timeout": None})
    assert cfg.workers == 4 and cfg.log_level == "debug"
    assert cfg.admin.listen == model.ListenAddress("127.0.0.1", 9901)
    assert cfg.raw["workers"] == 4 and raw["workers"] == 1 and "admin" not in raw
    assert errors_of(base(), overrides={"workers": 0}) == ["workers: must be >= 1, got 0"]


def test_mock_on_default_and_empty_routes_are_allowed():
    cfg = load_config(base(routes=[route("$default", type="mock", status=404, body={"message": "nope"})]))
    assert cfg.routes[0].integration.body == b'{"message":"nope"}'
    assert load_config(base(routes=[])).routes == ()


@pytest.mark.parametrize(("text", "seconds"), [
    (1, 1.0), (0.5, 0.5), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0),
    ("1.5s", 1.5), ("30", 30.0), (0, 0.0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [
    (10240, 10240), ("10240", 10240), ("10KiB", 10240), ("10MiB", 10 * 1024 * 1024),
    ("1MB", 1_000_000), ("10kB", 10_000), ("1GiB", 1024**3), ("512B", 512),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


# -- what is refused ---------------------------------------------------------------


def test_every_error_reported_at_once_with_locations():
    errors = errors_of(base(
        workers=0,
        routes=[route("GET /a", upstream="userz"), route("get /b"), route("GET /c", timeout="25h")],
        drain_timeout="soon",
    ))
    assert errors == [
        "drain_timeout: invalid duration 'soon': use seconds as a number, or a string like "
        "'500ms', '30s', '5m', '2h'",
        "routes[0].integration.upstream: unknown upstream 'userz' (known: static, users); did you mean 'users'?",
        "routes[1].route: method must be upper-case in route key 'get /b' ('GET', not 'get')",
        "routes[2].integration.timeout: must be <= 86400s, got '25h'",
        "workers: must be >= 1, got 0",
    ]


def test_unknown_key_with_suggestion():
    errors = errors_of(base(routes=[{"route": "GET /a", "integration": {"type": "http", "upstreamz": "users"}}]))
    assert errors == ["routes[0].integration: unknown key 'upstreamz', did you mean 'upstream'?"]
    errors = errors_of(base(listn="x", limits={"max_body": 1}))
    assert "(root): unknown key 'listn', did you mean 'listen'?" in errors
    assert any(e.startswith("limits: unknown key 'max_body', did you mean 'max_body_bytes'") for e in errors)


def test_unknown_key_without_close_match_lists_allowed_keys():
    errors = errors_of(base(http={"zzz": 1}))
    assert errors == ["http: unknown key 'zzz' (allowed: parser, path_normalization)"]


def test_unknown_upstream_lists_known_sorted():
    errors = errors_of(base(routes=[route("GET /a", upstream="nothing")]))
    assert errors == ["routes[0].integration.upstream: unknown upstream 'nothing' (known: static, users)"]
    errors = errors_of({"listen": "127.0.0.1:1", "routes": [route("GET /a", upstream="x")]})
    assert errors == ["routes[0].integration.upstream: unknown upstream 'x' (known: none are defined)"]


def test_missing_listen_and_bad_types():
    assert errors_of({}) == ["(root): missing required key 'listen'"]
    errors = errors_of(base(workers="many", log_level="loud", http={"parser": "h2"}, routes={}))
    assert errors == [
        "http.parser: 'h2' is not one of 'native', 'httptools', 'h11'",
        "log_level: 'loud' is not one of 'debug', 'info', 'warning', 'error'",
        "routes: expected list, got a mapping",
        "workers: expected an integer >= 1 or 'auto', got string 'many'",
    ]


def test_not_a_mapping():
    assert errors_of("") == ["(root): expected a mapping of config keys, got an empty document"]
    assert errors_of("- a\n") == ["(root): expected a mapping of config keys, got a list"]


@pytest.mark.parametrize(("value", "fragment"), [
    ("soon", "invalid duration 'soon'"),
    ("10 parsecs", "invalid duration"),
    (-1, "finite number >= 0"),
    (0, "must be > 0"),
])
def test_bad_duration(value, fragment):
    errors = errors_of(base(limits={"head_timeout": value}))
    assert len(errors) == 1 and errors[0].startswith("limits.head_timeout: ") and fragment in errors[0]


def test_bad_duration_type():
    assert errors_of(base(drain_timeout=True)) == [
        "drain_timeout: expected a duration: seconds as a number, or a string like "
        "'500ms', '30s', '5m', '2h', got boolean true"]


def test_integration_timeout_bounds():
    errors = errors_of(base(routes=[route("GET /a", timeout="10ms"), route("GET /b", timeout=90_000)]))
    assert errors == ["routes[0].integration.timeout: must be >= 50ms, got '10ms'",
                      "routes[1].integration.timeout: must be <= 86400s, got 90000"]
    # past AWS's 30 s: allowed for long polls and streams, and `validate` says so
    config = load_config(base(routes=[route("GET /b", timeout=31)]))
    assert [str(w) for w in config.warnings] == [
        "routes[0].integration.timeout: 31s is past Amazon API Gateway's 30 s integration limit: fine for "
        "long polls and streams, but a client waits that long for a stuck upstream"]


def test_bad_size():
    errors = errors_of(base(limits={"max_body_bytes": "10 parsecs", "max_head_bytes": 100}))
    assert errors == [
        "limits.max_body_bytes: invalid size '10 parsecs': use bytes as an integer, or a string "
        "like '10240', '10KiB', '10MiB', '1MB'",
        "limits.max_head_bytes: must be at least 256 bytes, got 100",
    ]


@pytest.mark.parametrize(("listen", "fragment"), [
    ("8080", "missing ':port'"),
    (":8080", "missing host"),
    ("127.0.0.1:http", "port must be a number"),
    ("127.0.0.1:70000", "port must be 0..65535"),
    ("::1:8080", "write IPv6 addresses in brackets"),
    ("[::1]8080", "expected '[host]:port'"),
    ("[nope]:80", "not an IPv6 address"),
    ("300.1.1.1:80", "not an IPv4 address"),
    ("bad host:80", "not a valid host name"),
])
def test_bad_listen(listen, fragment):
    errors = errors_of(base(listen=[listen]))
    assert len(errors) == 1 and errors[0].startswith("listen[0]: ") and fragment in errors[0], errors


def test_listen_collisions():
    errors = errors_of(base(listen=["127.0.0.1:8080", "0.0.0.0:8080", "127.0.0.1:0", "127.0.0.1:0"],
                            admin={"listen": "127.0.0.1:8080", "insecure": True}))
    assert errors == [
        "admin.listen: admin listener '127.0.0.1:8080' collides with data listener '127.0.0.1:8080'",
        "listen[1]: '0.0.0.0:8080' collides with listen[0] ('127.0.0.1:8080')",
    ]
    assert errors_of(base(listen="[::]:80", admin={"listen": "127.0.0.1:80", "insecure": True})) == [
        "admin.listen: admin listener '127.0.0.1:80' collides with data listener '[::]:80'"]
    assert errors_of(base(listen=[])) == ["listen: must not be empty"]


@pytest.mark.parametrize(("target", "fragment"), [
    ("wss://127.0.0.1:9443", "unsupported scheme 'wss'"),
    ("ftp://x:1", "unsupported scheme 'ftp'"),
    ("127.0.0.1:9001", "expected 'http://host:port'"),
    ("http://x:1/api", "a target has no path"),
    ("http://x:1?q", "no query"),
    ("http://u:p@x:1", "credentials"),
    ("http://x:0", "port must be 1..65535"),
    ("http://x:99999", "port must be 1..65535"),
    ("http://:80", "missing host"),
])
def test_bad_target(target, fragment):
    errors = errors_of(base(upstreams={"users": {"targets": ["http://127.0.0.1:1", target]}}))
    assert len(errors) == 1 and errors[0].startswith("upstreams.users.targets[1]: ") and fragment in errors[0], errors


def test_duplicate_target_and_empty_targets():
    errors = errors_of(base(upstreams={"a": {"targets": ["http://h:1", "http://h:1"]}, "b": {"targets": []},
                                       "c d": {"targets": ["http://h:2"]}}))
    assert errors == [
        "upstreams: invalid name 'c d': use letters, digits, '_' and '-', starting with a letter or '_'",
        "upstreams.a.targets[1]: duplicate target 'http://h:1'",
        "upstreams.b.targets: must not be empty",
    ]


def test_template_param_must_exist_in_route():
    errors = errors_of(base(routes=[
        route("GET /users/{id}", path="/v2/{uid}"),
        route("ANY /files/{proxy+}", path="/v2/{proxy+}"),
        route("GET /static", path="/x/{id}"),
        route("$default", path="/{proxy}"),
        route("GET /a/{x}", path="v2/{x}"),
        route("GET /b/{x}", path="/v2/{x}?q=1"),
        route("GET /c/{x}", path="/v2/{x"),
    ]))
    assert errors == [
        "routes[0].integration.path: unknown parameter {uid}: route 'GET /users/{id}' defines {id}",
        "routes[1].integration.path: write {proxy} in a path template, not {proxy+}",
        "routes[2].integration.path: unknown parameter {id}: route 'GET /static' defines no parameters",
        "routes[3].integration.path: unknown parameter {proxy}: route '$default' defines no parameters",
        "routes[4].integration.path: path template 'v2/{x}' must start with '/'",
        "routes[5].integration.path: path template '/v2/{x}?q=1' contains '?': only a path is allowed "
        "(printable ASCII, no query, fragment or spaces)",
        "routes[6].integration.path: path template '/v2/{x' has an unbalanced '{' or '}'",
    ]


def test_route_key_and_host_errors():
    errors = errors_of(base(routes=[
        route("GET /a/{p+}/b"),
        {"route": "GET /x", "host": "api.example.com:443", "integration": {"type": "http", "upstream": "users"}},
        {"route": "GET /y", "host": "a.*.com", "integration": {"type": "http", "upstream": "users"}},
        {"route": "GET /z", "integration": {"type": "lambda"}},
        {"integration": {"type": "http", "upstream": "users"}},
    ]))
    assert errors == [
        "routes[0].route: greedy parameter {p+} must be the last segment in route key 'GET /a/{p+}/b'",
        "routes[1].host: invalid host 'api.example.com:443': route hosts have no port "
        "(the Host header's port is ignored)",
        "routes[2].host: invalid host 'a.*.com': a wildcard is only allowed as a leading '*.' ('*.example.com')",
        "routes[3].integration.type: 'lambda' is not one of 'asgi', 'function', 'http', 'mock'",
        "routes[4]: missing required key 'route'",
    ]


def test_duplicate_routes_reported_on_later_one():
    errors = errors_of(base(routes=[
        route("GET /users/{id}"), route("ANY /users/{id}"),
        {"route": "GET /users/{id}", "host": "a.com", "integration": {"type": "http", "upstream": "users"}},
        route("GET /users/{uid}"), route("$default"), route("$default"),
    ]))
    assert errors == [
        "routes[3]: duplicate of routes[0] ('GET /users/{id}'): same host, method and path shape",
        "routes[5]: duplicate of routes[4] ('$default'): same host, method and path shape",
    ]


def test_mock_errors():
    errors = errors_of(base(routes=[
        route("GET /a", type="mock", status=204, body="x"),
        route("GET /b", type="mock", status=99),
        route("GET /c", type="mock", body=12),
        route("GET /d", type="mock", headers={"Content-Length": "3", "Bad Name": "x", "X-A": "a\r\nb",
                                               "Content-Type": "x", "X-N": 5}),
        route("GET /e", type="mock", body={1: "int key"}),
        route("GET /f", type="mock", upstream="users"),
    ]))
    assert errors == [
        "routes[0].integration.body: a 204 response has no body",
        "routes[1].integration.status: must be >= 200, got 99",
        "routes[2].integration.body: expected mapping, list, string or null, got integer 12",
        "routes[3].integration.headers: invalid header name 'Bad Name'",
        "routes[3].integration.headers.Content-Length: header 'Content-Length' is managed by the gateway",
        "routes[3].integration.headers.Content-Type: set the content type with integration.content_type",
        "routes[3].integration.headers.X-A: invalid header value 'a\\r\\nb' (no control characters or line breaks)",
        "routes[3].integration.headers.X-N: expected string, got integer 5",
        "routes[4].integration.body: cannot be serialised as JSON: Dict key must be str",
        "routes[5].integration: unknown key 'upstream' (allowed: body, content_type, headers, status, type)",
    ]


def test_access_log_path_iff_file():
    assert errors_of(base(access_log={"destination": "file"})) == [
        "access_log: missing required key 'path' (destination is 'file')"]
    assert errors_of(base(access_log={"destination": "stdout", "path": "/tmp/x"})) == [
        "access_log.path: only used with destination 'file' (destination is 'stdout')"]
    assert errors_of(base(access_log={"path": "/tmp/x"})) == [
        "access_log.path: only used with destination 'file' (destination is 'stdout')"]


def test_yaml_syntax_error_has_line_and_column():
    errors = errors_of('listen: "127.0.0.1:8080"\nroutes:\n  - route: [GET /a\n')
    assert len(errors) == 1
    assert errors[0].startswith("line 4, column 1: YAML syntax error:"), errors
    errors = errors_of("listen: x\n  bad: indentation\n")
    assert errors[0].startswith("line 2, column 6: YAML syntax error: mapping values are not allowed here")


def test_yaml_duplicate_key_is_an_error():
    errors = errors_of('listen: "127.0.0.1:1"\nworkers: 1\nworkers: 2\n')
    assert errors == ["line 3, column 1: YAML syntax error: duplicate key 'workers' (first defined on line 2)"]


def test_yaml_merge_keys_are_not_duplicates():
    cfg = load_config_text(
        'listen: "127.0.0.1:1"\n'
        "access_log: {<<: {flush_interval: 2s, destination: stdout}, destination: stderr}\n"
    )
    assert cfg.access_log.destination == "stderr" and cfg.access_log.flush_interval == 2.0


def test_bare_off_is_accepted_as_destination():
    cfg = load_config_text('listen: "127.0.0.1:1"\naccess_log: {destination: off}\n')
    assert cfg.access_log.destination == "off"


def test_missing_file(tmp_path):
    errors = errors_of(tmp_path / "nope.yaml")
    assert errors == [f"(file): config file not found: {tmp_path / 'nope.yaml'}"]


def test_config_error_str_lists_everything():
    with pytest.raises(ConfigError) as exc:
        load_config_text("listen: 1\nworkers: 0\n", "my.yaml")
    text = str(exc.value)
    assert text.splitlines()[0] == "invalid config my.yaml: 2 errors"
    assert "  - workers: must be >= 1, got 0" in text


# -- shipped files and the schema ----------------------------------------------------------


def test_default_conf_loads():
    cfg = load_config(DEFAULT_CONF)
    assert cfg.listen == (model.ListenAddress("127.0.0.1", 8080),)
    assert cfg.admin.listen == model.ListenAddress("127.0.0.1", 9901)
    assert cfg.upstreams["demo"].targets == (model.Target("http", "127.0.0.1", 9001),)
    assert [r.key for r in cfg.routes] == ["GET /ping", "ANY /echo/{proxy+}", "GET /users/{id}", "$default"]
    router = compile_routes([(r, r.key) for r in cfg.routes])
    assert router.match(b"GET", b"/ping", None) == ("GET /ping", {})
    assert router.match(b"POST", b"/echo/a/b", None) == ("ANY /echo/{proxy+}", {"proxy": b"a/b"})
    assert router.match(b"GET", b"/status/418", None) == ("$default", {})


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path):
    cfg = load_config(path)
    compile_routes([(r, r) for r in cfg.routes])


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"full.yaml", "hosts.yaml"}


def test_schema_json_is_valid_and_accepts_shipped_configs():
    schema = json.loads(schema_json())
    assert schema == CONFIG_SCHEMA
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    for path in [DEFAULT_CONF, *EXAMPLES]:
        raw = yaml.safe_load(path.read_text())
        assert list(validator.iter_errors(raw)) == [], path
    assert list(validator.iter_errors(yaml.safe_load(ISSUE_YAML))) == []
