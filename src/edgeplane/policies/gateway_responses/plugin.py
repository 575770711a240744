"""The `gateway_responses` unit: the answers the gateway gives itself, changed per
response type as Amazon API Gateway's gateway responses change them.

Owns the top-level `gateway_responses: {TYPE: {status, headers, body, content_type}}`
and `GatewayResponses`, which `http.replies.send_error` asks for every error the gateway
answers itself (not for an upstream's or a function's own answers): the type is found
from the status and what refused the request (`response_type`), then the entry of that
type, else `DEFAULT_4XX` / `DEFAULT_5XX`, gives the status, extra headers and body.

Templates (header values and the body) may use `$context.error.message` (the AWS
message of the answer, e.g. `Unauthorized` or `Invalid request body`: never the
gateway's internal reason), `$context.error.
messageString` (the same, JSON-quoted), `$context.error.responseType`,
`$context.requestId`, `$context.stage`, `$context.routeKey`, `$context.httpMethod`,
`$context.path`, `$context.domainName` and `$context.identity.sourceIp`, substituted as
they are, as AWS does. Header values are checked at load and again when sent (the
gateway's choke point).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from edgeplane.config.values import TOKEN_RE
from edgeplane.http.fields import check_field
from edgeplane.http.responses import GATEWAY_MESSAGES
from edgeplane.plugins import Phase, Policy

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import Config, RouteConfig

TYPES = ("DEFAULT_4XX", "DEFAULT_5XX", "UNAUTHORIZED", "ACCESS_DENIED", "MISSING_AUTHENTICATION_TOKEN",
         "INVALID_API_KEY", "AUTHORIZER_FAILURE", "THROTTLED", "QUOTA_EXCEEDED", "INTEGRATION_TIMEOUT",
         "INTEGRATION_FAILURE", "BAD_REQUEST_BODY", "BAD_REQUEST_PARAMETERS", "REQUEST_TOO_LARGE",
         "RESOURCE_NOT_FOUND", "WAF_FILTERED")
_BY_STATUS = {400: "BAD_REQUEST_BODY", 401: "UNAUTHORIZED", 403: "ACCESS_DENIED", 404: "RESOURCE_NOT_FOUND",
              413: "REQUEST_TOO_LARGE", 429: "THROTTLED", 502: "INTEGRATION_FAILURE", 503: "INTEGRATION_FAILURE",
              504: "INTEGRATION_TIMEOUT"}
_VAR = re.compile(r"\$context\.([A-Za-z]+(?:\.[A-Za-z]+)*)")
_VARIABLES = ("error.message", "error.messageString", "error.responseType", "requestId", "stage", "routeKey",
              "httpMethod", "path", "domainName", "identity.sourceIp")

_ENTRY = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "status": {"type": "integer", "minimum": 400, "maximum": 599,
                   "description": "The status to answer with (default: the gateway's own)."},
        "headers": {"type": "object", "additionalProperties": {"type": "string"},
                    "description": "Extra response headers; values may use $context variables."},
        "body": {"type": "string", "description": "The body template (default: the AWS-style "
                                                  "{\"message\": ...})."},
        "content_type": {"type": "string", "default": "application/json"},
    },
}
_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {t: {"$ref": "#/$defs/gatewayResponse"}
                                                                           for t in TYPES},
           "description": "AWS gateway responses: per response type, the status, headers and body of the "
                          "answers the gateway gives itself."}


def response_type(req: Any, status: int) -> str:
    """AWS's gateway response type of an error the gateway answers itself."""
    error = req.error or ""
    if req.auth_error is not None:
        if status >= 500:
            return "AUTHORIZER_FAILURE"
        if "missing" in req.auth_error and status in (401, 403):
            return "MISSING_AUTHENTICATION_TOKEN"
        if "API key" in req.auth_error:
            return "INVALID_API_KEY"
    if status == 403 and "denied by IP rules" in error:
        return "WAF_FILTERED"
    if status == 429 and error.startswith("quota "):
        return "QUOTA_EXCEEDED"
    if status == 400:  # (a malformed request, a bad path...: the default 4XX)
        if error.startswith("Missing required request parameters"):
            return "BAD_REQUEST_PARAMETERS"
        return "BAD_REQUEST_BODY" if error == "Invalid request body" else "DEFAULT_4XX"
    return _BY_STATUS.get(status) or ("DEFAULT_5XX" if status >= 500 else "DEFAULT_4XX")


def _values(proto: Any, req: Any, status: int, kind: str, message: str | None) -> dict[str, str]:
    message = message or GATEWAY_MESSAGES.get(status, "Error")
    return {"error.message": message, "error.messageString": orjson.dumps(message).decode(),
            "error.responseType": kind, "requestId": req.request_id.decode("latin-1"), "stage": req.stage,
            "routeKey": req.route_key, "httpMethod": req.method.decode("latin-1"),
            "path": (req.base_path or req.path).decode("latin-1"),
            "domainName": (req.host or b"").decode("latin-1").split(":")[0],
            "identity.sourceIp": req.client_ip or proto.peer_ip}


def _render(template: str, values: dict[str, str]) -> str:
    return _VAR.sub(lambda m: values.get(m.group(1), m.group(0)), template)


@dataclass(frozen=True, slots=True)
class Entry:
    status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: str | None = None
    content_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class GatewayResponses:
    entries: dict[str, Entry] = field(default_factory=dict)

    def answer(self, proto: Any, req: Any, status: int,
               message: str | None = None) -> tuple[int, bytes, bytes, bytes] | None:
        """(status, body, content type, header lines) for the error `req` is about to get,
        or None when no entry changes it."""
        kind = response_type(req, status)
        entry = self.entries.get(kind)
        if entry is None and kind in ("MISSING_AUTHENTICATION_TOKEN", "INVALID_API_KEY"):
            entry = self.entries.get("UNAUTHORIZED" if status == 401 else "ACCESS_DENIED")  # the broader type
        if entry is None:
            entry = self.entries.get("DEFAULT_5XX" if status >= 500 else "DEFAULT_4XX")
        if entry is None:
            return None
        values = _values(proto, req, status, kind, message)
        status = entry.status or status
        lines = []
        for name, template in entry.headers:
            raw_name, raw_value = name.lower().encode("latin-1"), _render(template, values).encode("utf-8")
            check_field(raw_name, raw_value)
            lines.append(raw_name + b": " + raw_value + b"\r\n")
        body = (_render(entry.body, values).encode("utf-8") if entry.body is not None
                else orjson.dumps({"message": values["error.message"]}))
        return status, body, entry.content_type.encode("latin-1"), b"".join(lines)


def _check_template(text: str, path: tuple[Any, ...], ctx: LoadContext) -> None:
    for m in _VAR.finditer(text):
        if m.group(1) not in _VARIABLES:
            ctx.fail(path, f"unknown variable $context.{m.group(1)} (known: "
                           + ", ".join("$context." + v for v in _VARIABLES) + ")")


class GatewayResponsesPolicy(Policy):
    name = "gateway_responses"
    phase = Phase.EARLY
    sections = {"gateway_responses": {"$ref": "#/$defs/gatewayResponses"}}
    defs = {"gatewayResponses": _SCHEMA, "gatewayResponse": _ENTRY}

    def load_section(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        if not isinstance(value, dict):
            return None
        entries = {}
        for kind, spec in value.items():
            if kind not in TYPES or not isinstance(spec, dict):
                continue  # reported by the schema
            here = path + (kind,)
            headers = []
            for name, template in (spec.get("headers") or {}).items():
                if not isinstance(name, str) or not TOKEN_RE.match(name) or not isinstance(template, str):
                    ctx.fail(here + ("headers",), f"invalid header {name!r}")
                    continue
                if name.lower() in ("content-length", "transfer-encoding", "connection", "content-type"):
                    ctx.fail(here + ("headers", name), "managed by the gateway (set the type with content_type)")
                    continue
                if any(ord(c) < 0x20 or ord(c) == 0x7F for c in template):
                    ctx.fail(here + ("headers", name), "a header value cannot hold control characters")
                    continue
                _check_template(template, here + ("headers", name), ctx)
                headers.append((name, template))
            body = spec.get("body")
            if isinstance(body, str):
                _check_template(body, here + ("body",), ctx)
            ctype = spec.get("content_type", "application/json")
            if not isinstance(ctype, str) or any(ord(c) < 0x20 for c in ctype):
                ctx.fail(here + ("content_type",), "a content type is a header value")
                ctype = "application/json"
            status = spec.get("status")
            entries[kind] = Entry(status=status if isinstance(status, int) else None, headers=tuple(headers),
                                  body=body if isinstance(body, str) else None, content_type=ctype)
        return GatewayResponses(entries)

    def applies(self, route: RouteConfig, config: Config) -> bool:
        return False


plugin = GatewayResponsesPolicy()
