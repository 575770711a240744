"""Config of both WebSocket modes: the top-level `websocket` limits, a route's override, and
`websocket_apis`; every refusal located."""

from __future__ import annotations

import pytest

from edgeplane.config import model
from edgeplane.config.loader import ConfigError, load_config, load_config_text

ISSUE_YAML = """
listen: "127.0.0.1:8080"
upstreams:
  chat: {targets: ["http://127.0.0.1:9001"]}
authorizers:
  users_jwt:
    type: jwt
    issuer: "https://auth.example.com/"
    audience: chat
    algorithms: [HS256]
    hs_secret: {env: WS_TEST_SECRET}
websocket_apis:
  chat:
    path: /chat
    route_selection: "$request.body.action"
    routes:
      $connect:    {integration: {type: http, upstream: chat, path: /connect}, auth: users_jwt}
      $disconnect: {integration: {type: http, upstream: chat, path: /disconnect}}
      sendMessage: {integration: {type: http, upstream: chat, path: /message}, return_response: true}
      $default:    {integration: {type: http, upstream: chat, path: /default}}
"""


@pytest.fixture(autouse=True)
def _secret(monkeypatch):
    monkeypatch.setenv("WS_TEST_SECRET", "s" * 32)


def base(**extra) -> dict:
    cfg = {"listen": "127.0.0.1:8080", "upstreams": {"chat": {"targets": ["http://127.0.0.1:9001"]}}}
    cfg.update(extra)
    return cfg


def api(**extra) -> dict:
    spec = {"path": "/chat", "routes": {"$default": {"integration": {"type": "http", "upstream": "chat"}}}}
    spec.update(extra)
    return spec


def errors_of(cfg) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        if isinstance(cfg, str):
            load_config_text(cfg)
        else:
            load_config(cfg)
    return exc.value.errors


def test_the_issue_example_loads():
    cfg = load_config_text(ISSUE_YAML)
    chat = cfg.websocket_apis["chat"]
    assert chat.path == "/chat" and chat.host is None and chat.route_selection == "$request.body.action"
    assert set(chat.routes) == {"$connect", "$disconnect", "sendMessage", "$default"}
    assert chat.routes["$connect"].auth == "users_jwt"
    assert chat.routes["sendMessage"].return_response is True
    assert chat.routes["sendMessage"].integration == model.WebSocketIntegration("chat", "/message", 29.0)
    assert chat.limits == model.WebSocketLimits() == cfg.websocket


def test_limits_defaults_inherit_and_override():
    cfg = load_config(base(
        websocket={"max_message_bytes": "64KiB", "idle_timeout": "5m", "messages_per_second": 10},
        routes=[{"route": "GET /ws", "integration": {"type": "http", "upstream": "chat"},
                 "websocket": {"ping_interval": 0, "message_burst": 5}},
                {"route": "GET /plain", "integration": {"type": "http", "upstream": "chat"}}],
        websocket_apis={"chat": api(limits={"connections_per_second": 2, "max_lifetime": "1h",
                                            "messages_per_second": None})}))
    top = cfg.websocket
    assert (top.max_message_bytes, top.idle_timeout, top.messages_per_second) == (65536, 300.0, 10.0)
    route = cfg.routes[0].websocket
    assert route.ping_interval == 0 and route.message_burst == 5
    assert route.max_message_bytes == 65536 and route.idle_timeout == 300.0  # inherited
    assert cfg.routes[1].websocket is None  # no override: Config.websocket applies
    limits = cfg.websocket_apis["chat"].limits
    assert limits.connections_per_second == 2 and limits.max_lifetime == 3600
    assert limits.messages_per_second is None and limits.max_message_bytes == 65536
    # the integration path defaults to the API's path
    assert cfg.websocket_apis["chat"].routes["$default"].integration.path == "/chat"


def test_limits_out_of_range_are_located():
    errs = errors_of(base(websocket={"max_message_bytes": 0, "max_frame_bytes": 0, "idle_timeout": 0,
                                     "max_lifetime": "30d",
                                     "messages_per_second": -1, "message_burst": 0, "ping_interval": "2h",
                                     "pong_timeout": "0s", "connections_per_second": 0, "bogus": 1}))
    text = "\n".join(errs)
    for where in ("websocket.max_message_bytes", "websocket.max_frame_bytes", "websocket.idle_timeout",
                  "websocket.max_lifetime",
                  "websocket.messages_per_second", "websocket.message_burst", "websocket.ping_interval",
                  "websocket.pong_timeout", "websocket.connections_per_second"):
        assert where + ":" in text, (where, errs)
    assert "websocket: unknown key 'bogus'" in text
    errs = errors_of(base(websocket={"max_message_bytes": "1GiB"}))
    assert errs == ["websocket.max_message_bytes: must be at most 16MiB (16777216 bytes), got '1GiB'"]
    errs = errors_of(base(routes=[{"route": "GET /m", "integration": {"type": "mock"},
                                   "websocket": {"idle_timeout": "-1s"}}]))
    assert any(e.startswith("routes[0].websocket: only used with an http integration") for e in errs)
    assert any(e.startswith("routes[0].websocket.idle_timeout") for e in errs)


def test_api_errors_are_located():
    errs = errors_of(base(
        websocket_apis={
            "a": api(path="/a/{id}"),
            "b": api(path="chat", route_selection="$request.header.x"),
            "c": api(path="/c", route_selection="${request.body.a}/${request.body.b"),
            "d": api(path="/d", host="bad host!", routes={
                "$default": {"integration": {"type": "http", "upstream": "chta", "path": "/x?y",
                                             "timeout": "1m"}},
                "$disconnect": {"integration": {"type": "http", "upstream": "chat"}, "auth": "nope",
                                "return_response": True},
                "$connect": {"auth": "missing"},
                "$other": {"integration": {"type": "http", "upstream": "chat"}},
                "send": {"return_response": True},
                "": {"integration": {"type": "http", "upstream": "chat"}},
            }),
            "e": api(path="/e", routes={}),
            "bad name!": api(path="/f"),
        }))
    text = "\n".join(errs)
    expected = [
        "websocket_apis.a.path: '/a/{id}' must be a literal path",
        "websocket_apis.b.path: ",
        "websocket_apis.b.route_selection: invalid route selection expression '$request.header.x'",
        "websocket_apis.c.route_selection: invalid route selection expression",
        "websocket_apis.d.host: invalid host 'bad host!'",
        "websocket_apis.d.routes.$default.integration.upstream: unknown upstream 'chta' (known: chat); "
        "did you mean 'chat'?",
        "websocket_apis.d.routes.$default.integration.path: path '/x?y' contains '?'",
        "websocket_apis.d.routes.$default.integration.timeout: must be <= 30s",
        "websocket_apis.d.routes.$disconnect.auth: authorizers run only on $connect",
        "websocket_apis.d.routes.$disconnect.return_response: $disconnect cannot answer",
        "websocket_apis.d.routes.$connect.auth: unknown authorizer 'missing'",
        "websocket_apis.d.routes.$other: unknown special route key '$other'",
        "websocket_apis.d.routes.send: missing required key 'integration'",
        "websocket_apis.d.routes.: a route key has 1..128 characters",
        "websocket_apis.e.routes: must not be empty",
        "websocket_apis: invalid name 'bad name!'",
    ]
    for line in expected:
        assert any(e.startswith(line) for e in errs), (line, text)


def test_path_clashes():
    errs = errors_of(base(
        routes=[{"route": "POST /chat", "integration": {"type": "http", "upstream": "chat"}},
                {"route": "GET /x", "host": "a.example.com", "integration": {"type": "mock"}},
                {"route": "GET /y", "host": "*.example.com", "integration": {"type": "mock"}}],
        websocket_apis={"one": api(path="/chat"), "two": api(path="/other"), "three": api(path="/other"),
                        "four": api(path="/x", host="b.example.com"),
                        "five": api(path="/y", host="c.example.com")}))
    assert "websocket_apis.one.path: '/chat' clashes with routes[0] ('POST /chat'): the WebSocket API " \
           "would take every request for that path" in errs
    assert "websocket_apis.three.path: '/other' is also the path of websocket_apis.two" in errs
    assert any(e.startswith("websocket_apis.five.path: '/y' clashes with routes[2]") for e in errs)
    assert not any(e.startswith("websocket_apis.four") for e in errs)  # other host: no clash
    # different hosts on one path are fine; a greedy or $default route is not a clash
    cfg = load_config(base(
        routes=[{"route": "ANY /{proxy+}", "integration": {"type": "http", "upstream": "chat"}},
                {"route": "$default", "integration": {"type": "mock"}}],
        websocket_apis={"a": api(path="/chat", host="a.example.com"), "b": api(path="/chat")}))
    assert cfg.websocket_apis["a"].host == "a.example.com"


def test_auth_only_on_connect_and_scopes_need_jwt():
    errs = errors_of(base(websocket_apis={"a": api(routes={"$connect": {"scopes": ["x"]},
                                                           "m": {"integration": {"type": "http", "upstream": "chat"},
                                                                 "scopes": ["y"]}})}))
    assert errs == ["websocket_apis.a.routes.$connect.scopes: scopes need a JWT authorizer ('auth')",
                    "websocket_apis.a.routes.m.scopes: scopes belong to the $connect route (with a JWT "
                    "authorizer)"]
    cfg = load_config_text(ISSUE_YAML)
    assert cfg.websocket_apis["chat"].routes["$default"].auth is None
    bad = ISSUE_YAML.replace("$default:    {integration: {type: http, upstream: chat, path: /default}}",
                             "$default:    {integration: {type: http, upstream: chat, path: /default}, "
                             "auth: users_jwt}")
    assert errors_of(bad) == ["websocket_apis.chat.routes.$default.auth: authorizers run only on "
                              "$connect (once, on the upgrade request); move 'auth' to the $connect route"]
