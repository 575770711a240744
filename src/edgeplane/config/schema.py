"""The JSON Schema (draft 2020-12) of the edgeplane config file.

This module owns the *shape* of the config file: which keys exist, their types,
enumerations and numeric ranges. It is data, not code: `edgeplane.config` validates the
raw YAML against `build_schema(registry)` first (pass 1), then runs the semantic checks a schema
cannot express (pass 2: upstream references, route key syntax, duplicate routes, URLs,
listen addresses, duration ranges, ...). `edgeplane schema` prints `schema_json()` so that
editors (YAML language server, VS Code) can validate and complete config files.

Invariants:
- every key the loader reads is declared here or by the unit that reads it (a policy's
  `sections`/`route_keys`/`authorizer_schema`, an integration's `schema`), and every
  object is closed
  (`additionalProperties: false`), so a typo is always an error, never ignored;
- `$defs` entries that the loader reports with a hand-written message carry a `title`
  (see `config.values.EXPECTED`);
- `DURATION_RE` and `SIZE_RE` are the single definitions of those string formats: the
  loader parses with the same expressions.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from jsonschema import Draft202012Validator

from edgeplane.config.resilience import SCHEMA as RESILIENCE_SCHEMA
from edgeplane.config.stages import SCHEMA as STAGES_SCHEMA
from edgeplane.config.values import DURATION_RE, SIZE_RE
from edgeplane.plugins.registry import Registry, default_registry

__all__ = ["DURATION_RE", "SIZE_RE", "STRINGS", "build_schema", "validator_for", "schema_json"]

_DURATION = {
    "title": "duration",
    "description": "Seconds as a number, or a string with a unit: '500ms', '30s', '5m', '2h'.",
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": DURATION_RE},
    ],
}

_SIZE = {
    "title": "size",
    "description": "Bytes as an integer, or a string: '10240', '10KiB', '10MiB', '1MB'.",
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": SIZE_RE},
    ],
}

_LISTEN_ADDRESS = {
    "title": "listen address",
    "description": "'host:port'; IPv6 in brackets: '[::1]:8080'. Port 0 picks a free port.",
    "type": "string",
}

_POOL = {
    "type": "object",
    "description": "Connection pool toward each target of the upstream.",
    "additionalProperties": False,
    "properties": {
        "max_connections": {
            "type": "integer",
            "minimum": 1,
            "default": 1024,
            "description": "Connections per target: in use + idle + connecting.",
        },
        "max_idle": {
            "type": "integer",
            "minimum": 0,
            "default": 128,
            "description": "Idle keep-alive connections kept per target.",
        },
        "idle_timeout": {"$ref": "#/$defs/duration", "default": "60s"},
        "connect_timeout": {"$ref": "#/$defs/duration", "default": "5s"},
        "max_waiters": {
            "type": "integer",
            "minimum": 0,
            "default": 65536,
            "description": "Requests queued when max_connections is reached; each waits "
                           "at most wait_timeout (then 503).",
        },
        "wait_timeout": {"$ref": "#/$defs/duration", "default": "5s"},
    },
}

_UPSTREAM = {
    "type": "object",
    "additionalProperties": False,
    "required": ["targets"],
    "properties": {
        "targets": {
            "type": "array",
            "minItems": 1,
            "items": {"anyOf": [
                {"type": "string", "description": "'http://host:port' or 'https://host:port'."},
                {"type": "object", "additionalProperties": False, "required": ["url"],
                 "properties": {
                     "url": {"type": "string", "description": "'http://host:port' or 'https://host:port'."},
                     "weight": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 1,
                                "description": "Share of the requests (smooth weighted round robin); "
                                               "0 drains the target."}}},
            ]},
        },
        "pool": {"$ref": "#/$defs/pool"},
        "tls": {"$ref": "#/$defs/upstreamTls"},
        **RESILIENCE_SCHEMA,
    },
}

_UPSTREAM_TLS = {
    "type": "object",
    "additionalProperties": False,
    "description": "How https:// targets are reached (verification is on by default).",
    "properties": {
        "ca_file": {"type": "string", "description": "PEM CA bundle; default: the system store."},
        "verify": {"type": "boolean", "default": True,
                   "description": "Verify the certificate chain and name; false only for tests."},
        "server_name": {"type": "string",
                        "description": "SNI and name to verify; default: the target host."},
        "cert_file": {"type": "string", "description": "PEM client certificate shown to the backend (mTLS)."},
        "key_file": {"type": "string", "description": "Its PEM private key."},
    },
}

_TLS = {
    "type": "object",
    "additionalProperties": False,
    "required": ["listen", "certificates"],
    "description": "TLS termination: HTTPS listeners and their certificates, chosen by SNI.",
    "properties": {
        "listen": {
            "description": "TLS (data-plane) listen address(es).",
            "anyOf": [
                {"$ref": "#/$defs/listenAddress"},
                {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/listenAddress"}},
            ],
        },
        "certificates": {
            "type": "array",
            "minItems": 1,
            "description": "The first certificate is the default (unknown or no SNI).",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["cert", "key"],
                "properties": {
                    "cert": {"type": "string", "description": "PEM certificate (chain) file."},
                    "key": {"type": "string", "description": "PEM private key file (unencrypted)."},
                    "hosts": {"type": "array", "items": {"type": "string"},
                              "description": "SNI names ('api.example.com', '*.example.com'); "
                                             "default: the certificate's SAN DNS names."},
                },
            },
        },
        "min_version": {"type": ["string", "number"], "default": "1.2",
                        "description": "Lowest TLS version: '1.2' or '1.3'."},
        "client_ca": {"type": "string",
                      "description": "mTLS: PEM CA file that client certificates must chain to."},
        "client_cert": {"enum": ["optional", "required"],
                        "description": "mTLS: whether a client certificate is required "
                                       "(needs client_ca; default 'required' with client_ca)."},
    },
}

_ROUTE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["route", "integration"],
    "properties": {
        "route": {
            "type": "string",
            "description": "Route key: 'GET /users/{id}', 'ANY /files/{proxy+}' or '$default'.",
        },
        "host": {
            "type": "string",
            "description": "Only for this Host: 'api.example.com' or '*.example.com'.",
        },
        "integration": {"$ref": "#/$defs/integration"},
        "auth": {"type": "string", "description": "Name of an authorizer in 'authorizers'."},
        "scopes": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
        "forward_claims": {"type": "object", "additionalProperties": {"type": "string"},
                           "description": "Upstream header name -> JWT claim name."},
        "websocket": {"$ref": "#/$defs/websocketLimits",
                      "description": "Limits of WebSocket connections proxied by this route; "
                                     "unset keys inherit the top-level 'websocket' values."},
    },
}

STRINGS = {"type": "array", "items": {"type": "string"}}

_WEBSOCKET_LIMITS = {
    "type": "object",
    "additionalProperties": False,
    "description": "Limits of one WebSocket connection (defaults: Amazon API Gateway's).",
    "properties": {
        "max_message_bytes": {"$ref": "#/$defs/size", "default": "128KiB",
                              "description": "A larger message closes the connection with 1009."},
        "max_frame_bytes": {"$ref": "#/$defs/size", "default": "32KiB",
                            "description": "WebSocket APIs: a larger frame closes the connection with 1009 "
                                           "(AWS's frame-size limit; proxied WebSockets are not limited "
                                           "per frame)."},
        "idle_timeout": {"$ref": "#/$defs/duration", "default": "10m"},
        "max_lifetime": {"$ref": "#/$defs/duration", "default": "2h"},
        "messages_per_second": {"type": ["number", "null"], "exclusiveMinimum": 0,
                                "description": "Per connection, client to gateway; null = no limit."},
        "message_burst": {"type": "integer", "minimum": 1, "default": 100},
        "ping_interval": {"$ref": "#/$defs/duration", "default": "30s",
                          "description": "The gateway pings each client this often; 0 = never."},
        "pong_timeout": {"$ref": "#/$defs/duration", "default": "10s"},
        "connections_per_second": {"type": "number", "exclusiveMinimum": 0, "default": 500,
                                   "description": "New connections per WebSocket API (then 429)."},
    },
}

_WEBSOCKET_INTEGRATION = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type"],
    "properties": {
        "type": {"enum": ["http", "function"]},
        "upstream": {"type": "string", "description": "http: name of an entry of `upstreams`."},
        "handler": {"type": "string", "pattern": r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
                    "description": "function: the Python handler, `package.module:name`, called with "
                                   "AWS's WebSocket event."},
        "path": {"type": "string", "description": "Upstream path the event is POSTed to; "
                                                  "default: the API's path."},
        "timeout": {"$ref": "#/$defs/duration", "default": "29s",
                    "description": "Integration timeout, 50ms..30s."},
    },
}

_WEBSOCKET_ROUTE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "integration": {"$ref": "#/$defs/websocketIntegration"},
        "auth": {"type": "string", "description": "$connect only: name of an authorizer."},
        "scopes": {"type": "array", "items": {"type": "string"}, "maxItems": 10,
                   "description": "$connect only: JWT scopes, at least one must be granted."},
        "return_response": {"type": "boolean", "default": False,
                            "description": "Send a 2xx integration body back to the client."},
    },
}

_WEBSOCKET_API = {
    "type": "object",
    "additionalProperties": False,
    "required": ["path", "routes"],
    "properties": {
        "path": {"type": "string", "description": "Request path of the upgrade, e.g. '/chat'."},
        "host": {"type": "string", "description": "Only for this Host: 'chat.example.com' or '*.example.com'."},
        "route_selection": {"type": "string", "default": "$request.body.action",
                            "description": "'$request.body.NAME' or a template such as "
                                           "'${request.body.service}/${request.body.action}'."},
        "routes": {"type": "object", "minProperties": 1,
                   "additionalProperties": {"$ref": "#/$defs/websocketRoute"}},
        "limits": {"$ref": "#/$defs/websocketLimits"},
    },
}


_LIMITS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "max_head_bytes": {"$ref": "#/$defs/size", "default": 10240},
        "max_headers": {"type": "integer", "minimum": 1, "default": 100},
        "max_body_bytes": {"$ref": "#/$defs/size", "default": "10MiB"},
        "head_timeout": {"$ref": "#/$defs/duration", "default": "10s"},
        "body_timeout": {"$ref": "#/$defs/duration", "default": "30s"},
        "keepalive_timeout": {"$ref": "#/$defs/duration", "default": "60s"},
        "send_timeout": {"$ref": "#/$defs/duration", "default": "60s"},
        "max_pipelined": {"type": "integer", "minimum": 0, "default": 16},
        "request_buffering": {
            "$ref": "#/$defs/size", "default": "64KiB",
            "description": "Request body read before an upstream connection is taken; "
                           "larger bodies stream after this much arrived. 0 = stream at once.",
        },
        "min_body_rate": {
            "type": "object",
            "additionalProperties": False,
            "description": "A body read for an integration must grow by `bytes` every `per`, "
                           "else 408. bytes: 0 = only a body that stops for body_timeout is cut.",
            "properties": {
                "bytes": {"$ref": "#/$defs/size", "default": "1KiB"},
                "per": {"$ref": "#/$defs/duration", "default": "10s"},
            },
        },
        "max_connections": {
            "anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}], "default": "auto",
            "description": "Open client connections per worker; past it, new ones are closed "
                           "at accept (logged at most once a second). auto: the descriptor "
                           "limit less one per possible upstream connection and 64.",
        },
        "max_connections_per_ip": {
            "type": "integer", "minimum": 0, "default": 0,
            "description": "Open client connections per source address and worker; 0 = no cap.",
        },
    },
}

_ACCESS_LOG = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "destination": {
            "enum": ["stdout", "stderr", "file", "logging", "off", False],
            "default": "stdout",
            "description": "stdout | stderr | file | logging (the Python logger 'edgeplane.access') | off "
                           "(false = off: YAML 1.1 reads a bare off as false).",
        },
        "path": {"type": "string", "description": "Log file, required iff destination is 'file'."},
        "flush_interval": {"$ref": "#/$defs/duration", "default": "500ms"},
        "buffer_bytes": {"$ref": "#/$defs/size", "default": "64KiB"},
        "queue_bytes": {"$ref": "#/$defs/size", "default": "8MiB",
                        "description": "Lines waiting for the writer thread; past it, lines are dropped "
                                       "and counted."},
        "format": {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 10000},
                             {"type": "object", "minProperties": 1, "maxProperties": 200}],
                   "description": "AWS-style format with $context variables: a JSON template, one line, "
                                  "or a mapping of field names to variables."},
    },
}

_CORE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://edgeplane.dev/schemas/config.json",
    "title": "edgeplane configuration",
    "type": "object",
    "additionalProperties": False,
    "required": ["listen"],
    "properties": {
        "listen": {
            "title": "listen",
            "description": "Data-plane listen address(es).",
            "anyOf": [
                {"$ref": "#/$defs/listenAddress"},
                {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/listenAddress"}},
            ],
        },
        "workers": {
            "title": "workers",
            "description": "Worker processes: an integer >= 1, or 'auto' (one per CPU).",
            "default": 1,
            "anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}],
        },
        "http": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "parser": {"enum": ["native", "httptools", "h11"], "default": "native"},
                "path_normalization": {
                    "type": "object",
                    "additionalProperties": False,
                    "description": "How request paths are normalised before routing "
                                   "(README: Security model). Every step is on by default.",
                    "properties": {
                        "merge_slashes": {"type": "boolean", "default": True},
                        "remove_dot_segments": {"type": "boolean", "default": True},
                        "decode_unreserved": {"type": "boolean", "default": True},
                        "escaped_slashes": {"enum": ["reject", "keep"], "default": "reject",
                                            "description": "%2F and %5C: 400, or kept encoded."},
                        "backslashes": {"enum": ["reject", "keep"], "default": "reject",
                                        "description": "A raw backslash: 400, or sent as %5C."},
                        "path_parameters": {"enum": ["reject", "keep"], "default": "reject",
                                            "description": "';': 400, or sent as %3B."},
                    },
                },
            },
        },
        "admin": {
            "type": "object",
            "additionalProperties": False,
            "description": "The admin API listener. With `listen`, set `auth` or `insecure: true`.",
            "properties": {
                "listen": {
                    "anyOf": [{"$ref": "#/$defs/listenAddress"}, {"type": "null"}],
                    "description": "Admin listener; absent or null = no admin listener.",
                },
                "auth": {
                    "type": "object",
                    "additionalProperties": False,
                    "description": "Credentials every non-public admin path needs (all of those set).",
                    "properties": {
                        "token_file": {"type": "string", "description":
                                       "File holding the bearer token (read at start)."},
                        "token_env": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
                                      "description": "Environment variable holding the bearer token."},
                        "mtls": {"type": "boolean", "default": False, "description":
                                 "Require a client certificate signed by admin.tls.client_ca."},
                        "token": {"description": "Refused: a token is never written in the config; "
                                                 "use token_file or token_env."},
                    },
                },
                "tls": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["cert", "key"],
                    "description": "Serve the admin listener over TLS.",
                    "properties": {
                        "cert": {"type": "string", "description": "PEM certificate (chain) file."},
                        "key": {"type": "string", "description": "PEM private key file (unencrypted)."},
                        "client_ca": {"type": "string", "description":
                                      "CA file client certificates must chain to (with auth.mtls)."},
                        "min_version": {"type": ["string", "number"], "default": "1.2",
                                        "description": "Lowest TLS version: '1.2' or '1.3'."},
                    },
                },
                "insecure": {"type": "boolean", "default": False, "description":
                             "Serve the admin API without credentials (only without auth)."},
                "public_paths": {
                    "type": "array",
                    "items": {"type": "string"},
                    "default": ["/healthz", "/ready"],
                    "description": "Admin GET paths served without credentials ([] = none).",
                },
            },
        },
        "upstreams": {
            "type": "object",
            "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_-]*$"},
            "additionalProperties": {"$ref": "#/$defs/upstream"},
        },
        "routes": {"type": "array", "items": {"$ref": "#/$defs/route"}},
        "limits": {"$ref": "#/$defs/limits"},
        "access_log": {"$ref": "#/$defs/accessLog"},
        "drain_timeout": {"$ref": "#/$defs/duration", "default": "30s"},
        "drain_delay": {"$ref": "#/$defs/duration", "default": "0s", "description":
                        "On stop: report not-ready (/ready, /healthz 503) but keep serving this "
                        "long before the drain starts (a load balancer's time to notice)."},
        "log_level": {"enum": ["debug", "info", "warning", "error"], "default": "info"},
        "tracing": {
            "type": "object", "additionalProperties": False, "required": ["otlp"],
            "description": "W3C Trace Context propagation and OTLP/HTTP span export; off when absent.",
            "properties": {
                "sample_ratio": {"type": "number", "minimum": 0, "maximum": 1, "default": 1.0},
                "service_name": {"type": "string", "minLength": 1, "default": "edgeplane"},
                "otlp": {"type": "object", "additionalProperties": False, "required": ["endpoint"],
                         "properties": {
                             "endpoint": {"type": "string", "description": "OTLP/HTTP traces URL, "
                                                                           "e.g. http://127.0.0.1:4318/v1/traces"},
                             "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                             "timeout": {"$ref": "#/$defs/duration", "default": "10s"}}},
                "max_queue": {"type": "integer", "minimum": 1, "maximum": 1000000, "default": 2048},
                "max_batch": {"type": "integer", "minimum": 1, "maximum": 100000, "default": 512},
                "flush_interval": {"$ref": "#/$defs/duration", "default": "1s"},
            },
        },
        **STAGES_SCHEMA,
        "log": {"type": "object", "additionalProperties": False,
                "properties": {"format": {"enum": ["text", "json"], "default": "text",
                                          "description": "The gateway's own log: text lines or one JSON "
                                                         "object per line."}}},
        "authorizers": {
            "type": "object",
            "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_-]*$"},
            "additionalProperties": {"$ref": "#/$defs/authorizer"},
        },
        "plugins": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Python modules to load policy or integration plugins from "
                           "('my_pkg.my_policy'); each defines `plugin` or `plugins`.",
        },
        "tls": {"$ref": "#/$defs/tls"},
        "websocket": {"$ref": "#/$defs/websocketLimits"},
        "websocket_apis": {
            "type": "object",
            "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_-]*$"},
            "additionalProperties": {"$ref": "#/$defs/websocketApi"},
        },
        "data_dir": {"type": "string", "default": "data",
                     "description": "Where quota counters persist (SQLite: DATA_DIR/edgeplane.db)."},
        "cluster": {
            "type": "object",
            "additionalProperties": False,
            "required": ["redis"],
            "description": "Share every throttle and quota with other hosts through one Redis.",
            "properties": {
                "redis": {"type": "string", "pattern": "^(redis|rediss|unix)://",
                          "description": "redis://[user:password@]host:port/db, rediss://... (TLS) "
                                         "or unix:///path/to/redis.sock."},
                "key_prefix": {"type": "string", "minLength": 1, "maxLength": 64, "default": "edgeplane:"},
                "failure_mode": {"enum": ["open", "closed"], "default": "open",
                                 "description": "While Redis is down: admit (open) or answer 503 (closed)."},
                "timeout": {"$ref": "#/$defs/duration", "default": "100ms"},
                "lease": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.1,
                          "description": "Share of a bucket's burst one worker leases at a time."},
                "retry_interval": {"$ref": "#/$defs/duration", "default": "1s"},
            },
        },
    },
    "$defs": {
        "duration": _DURATION,
        "size": _SIZE,
        "listenAddress": _LISTEN_ADDRESS,
        "pool": _POOL,
        "upstream": _UPSTREAM,
        "route": _ROUTE,
        "limits": _LIMITS,
        "accessLog": _ACCESS_LOG,
        "upstreamTls": _UPSTREAM_TLS,
        "tls": _TLS,
        "websocketLimits": _WEBSOCKET_LIMITS,
        "websocketIntegration": _WEBSOCKET_INTEGRATION,
        "websocketRoute": _WEBSOCKET_ROUTE,
        "websocketApi": _WEBSOCKET_API,
    },
}


def _typed_union(types: dict[str, Any]) -> dict[str, Any]:
    """An object whose `type` picks one of `types` (type name -> schema of the object)."""
    return {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"enum": sorted(types)}},
        "allOf": [{"if": {"required": ["type"], "properties": {"type": {"const": name}}},
                   "then": {**schema, "properties": {"type": {"const": name}, **schema.get("properties", {})}}}
                  for name, schema in sorted(types.items())],
    }


def build_schema(registry: Registry) -> dict[str, Any]:
    """The whole file's schema: the core sections plus every registered unit's keys."""
    schema = copy.deepcopy(_CORE_SCHEMA)
    defs = schema["$defs"]
    route = defs["route"]["properties"]
    for policy in registry.policies():
        defs.update(copy.deepcopy(dict(policy.defs)))
        for key, fragment in policy.sections.items():
            schema["properties"][key] = copy.deepcopy(fragment)
        for key, fragment in policy.route_keys.items():
            route[key] = copy.deepcopy(fragment)
    authorizers = {t: p.authorizer_schema or {"type": "object"} for t, p in registry.authorizer_types().items()}
    defs["authorizer"] = _typed_union(authorizers)
    integrations = registry.integrations()
    for plugin in integrations.values():
        defs.update(copy.deepcopy(dict(plugin.defs)))
    defs["integration"] = _typed_union({t: p.schema for t, p in integrations.items()})
    return schema


def validator_for(registry: Registry) -> Draft202012Validator:
    """A validator of `build_schema(registry)`, built once per registry."""
    validator = registry.cache.get("validator")
    if validator is None:
        validator = registry.cache["validator"] = Draft202012Validator(build_schema(registry))
    return validator


def schema_json(registry: Registry | None = None) -> str:
    """The schema as pretty JSON (what `edgeplane schema` prints)."""
    return json.dumps(build_schema(registry or default_registry()), indent=2) + "\n"
