"""An edgeplane config to OpenAPI 3.0 with Amazon API Gateway's extensions.

Owns `export_openapi(raw, title)`: routes as paths and operations (`ANY` as
`x-amazon-apigateway-any-method`, `$default` as the path `$default`, as AWS exports an
HTTP API), each with its `x-amazon-apigateway-integration` (http: `http_proxy` to the
upstream's first target; function: `aws_proxy`; mock: `mock`), its parameters and
security; authorizers as security schemes with `x-amazon-apigateway-authorizer`; `cors`,
`models` (as `components.schemas` with request validators) and `gateway_responses` as
their extensions. What AWS has no words for (a function's handler, a mock's answer, a
JWKS URL, a cache, conditions) travels in `x-edgeplane-*` keys, which `importer` reads
back: import, export, import gives the same config.
"""

from __future__ import annotations

import re
from typing import Any

ANY = "x-amazon-apigateway-any-method"
_PARAM = re.compile(r"\{([^{}+]+)(\+?)\}")


def _integration(route: dict[str, Any], upstreams: dict[str, Any]) -> dict[str, Any]:
    integ = route.get("integration") or {}
    kind = integ.get("type")
    timeout = integ.get("timeout")
    if kind == "http" and isinstance(integ.get("upstream"), str):
        targets = (upstreams.get(integ["upstream"]) or {}).get("targets") or ["http://unknown"]
        first = targets[0] if isinstance(targets[0], str) else targets[0].get("url", "http://unknown")
        path = integ.get("path") or _PARAM.sub(lambda m: "{" + m.group(1) + "}",
                                               route["route"].split(" ", 1)[1] if " " in route["route"] else "/")
        out: dict[str, Any] = {"type": "http_proxy", "httpMethod": "ANY", "uri": first.rstrip("/") + path,
                               "payloadFormatVersion": "1.0", "connectionType": "INTERNET",
                               "x-edgeplane-upstream": integ["upstream"]}  # (its name and spec travel)
        if integ.get("path") is not None:
            out["x-edgeplane-path"] = integ["path"]
        if integ.get("path") is None and route["route"] == "$default":
            out["uri"] = first.rstrip("/") + "/"
    elif kind == "function":
        name = str(integ.get("handler", "handler")).replace(":", ".")
        out = {"type": "aws_proxy", "httpMethod": "POST",
               "payloadFormatVersion": str(integ.get("payload_format", "2.0")),
               "uri": f"arn:aws:lambda:local:000000000000:function:{name}", "x-edgeplane-integration": integ}
    elif kind == "mock":
        out = {"type": "mock", "x-edgeplane-integration": integ}
    else:
        out = {"type": "http_proxy", "x-edgeplane-integration": integ}
    if isinstance(timeout, str) and timeout.endswith("ms") and timeout[:-2].isdigit():
        out["timeoutInMillis"] = int(timeout[:-2])
    elif timeout is not None and kind in ("http", "function"):
        out["x-edgeplane-integration"] = integ
    if isinstance(integ.get("upstream"), str) and integ.get("split"):
        out["x-edgeplane-integration"] = integ
    if route.get("request_parameters"):
        out["requestParameters"] = dict(route["request_parameters"])
    if route.get("response_parameters"):
        out["responseParameters"] = {k: dict(v) for k, v in route["response_parameters"].items()}
    return out


def _scheme(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    kind = spec.get("type")
    if kind == "jwt":
        audience = spec.get("audience")
        return {"type": "oauth2", "flows": {},
                "x-amazon-apigateway-authorizer": {
                    "type": "jwt", "identitySource": "$request.header.Authorization",
                    "jwtConfiguration": {"issuer": spec.get("issuer"),
                                         "audience": audience if isinstance(audience, list) else [audience]}},
                "x-edgeplane-authorizer": spec}
    if kind == "http":
        sources = spec.get("identity_source") or ["$request.header.Authorization"]
        return {"type": "apiKey", "name": "Authorization", "in": "header",
                "x-amazon-apigateway-authorizer": {
                    "type": "request", "authorizerPayloadFormatVersion": "2.0",
                    "identitySource": sources if isinstance(sources, list) else [sources],
                    "authorizerUri": spec.get("url")},
                "x-edgeplane-authorizer": spec}
    header = str(spec.get("identity_source", "$request.header.X-API-Key")).rsplit(".", 1)[-1]
    return {"type": "apiKey", "name": header, "in": "header", "x-edgeplane-authorizer": spec}


# Route keys the operation itself says; the others travel in `x-edgeplane-route`.
_SPOKEN = frozenset(("route", "integration", "auth", "scopes", "request_validation", "request_parameters",
                     "response_parameters"))
# Top-level keys that are part of the API definition (the others are the host's: listeners...).
EXPORTED_TOP = frozenset(("routes", "upstreams", "authorizers", "cors", "models", "gateway_responses"))


def export_openapi(raw: dict[str, Any], title: str = "edgeplane API", version: str = "1.0") -> dict[str, Any]:
    upstreams = raw.get("upstreams") or {}
    paths: dict[str, dict[str, Any]] = {}
    validators: dict[str, dict[str, bool]] = {}
    apart: list[dict[str, Any]] = []  # routes with a host or conditions: not one operation each
    for route in raw.get("routes") or []:
        key = route["route"]
        if route.get("host") is not None or route.get("match") is not None:
            apart.append(route)
            continue
        method, _, path = key.partition(" ") if key != "$default" else ("ANY", "", "/$default")
        op: dict[str, Any] = {"x-amazon-apigateway-integration": _integration(route, upstreams)}
        params = [{"name": m.group(1) + m.group(2), "in": "path", "required": True, "schema": {"type": "string"}}
                  for m in _PARAM.finditer(path)]
        validation = route.get("request_validation") or {}
        for where, names in (("header", (validation.get("required") or {}).get("headers") or []),
                             ("query", (validation.get("required") or {}).get("querystring") or [])):
            params += [{"name": n, "in": where, "required": True, "schema": {"type": "string"}} for n in names]
        if params:
            op["parameters"] = params
        if validation:
            body, required = bool(validation.get("body")), bool(validation.get("required"))
            name = {(True, True): "all", (True, False): "body-only", (False, True): "params-only"}.get((body, required))
            if name is not None:
                validators[name] = {"validateRequestBody": body, "validateRequestParameters": required}
                op["x-amazon-apigateway-request-validator"] = name
            if body:
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{validation['body']}"}}}}
        if route.get("auth"):
            op["security"] = [{route["auth"]: list(route.get("scopes") or [])}]
        extra = {k: v for k, v in route.items() if k not in _SPOKEN}
        if extra:
            op["x-edgeplane-route"] = extra
        op["responses"] = {"default": {"description": "The integration's response"}}
        paths.setdefault(path, {})[ANY if method == "ANY" else method.lower()] = op
    doc: dict[str, Any] = {"openapi": "3.0.1", "info": {"title": title, "version": version}, "paths": paths}
    if apart:
        doc["x-edgeplane-routes"] = apart
    if upstreams:
        doc["x-edgeplane-upstreams"] = upstreams
    components: dict[str, Any] = {}
    if raw.get("authorizers"):
        components["securitySchemes"] = {n: _scheme(n, s) for n, s in raw["authorizers"].items()}
    if raw.get("models"):
        components["schemas"] = dict(raw["models"])
    if components:
        doc["components"] = components
    if validators:
        doc["x-amazon-apigateway-request-validators"] = validators
    cors = raw.get("cors")
    if isinstance(cors, dict):
        names = {"allow_origins": "allowOrigins", "allow_methods": "allowMethods", "allow_headers": "allowHeaders",
                 "expose_headers": "exposeHeaders", "allow_credentials": "allowCredentials", "max_age": "maxAge"}
        doc["x-amazon-apigateway-cors"] = {names[k]: v for k, v in cors.items() if k in names}
    responses = raw.get("gateway_responses")
    if isinstance(responses, dict):
        out = {}
        for kind, entry in responses.items():
            mine: dict[str, Any] = {}
            if "status" in entry:
                mine["statusCode"] = str(entry["status"])
            if entry.get("headers"):
                mine["responseParameters"] = {f"gatewayresponse.header.{k}": f"'{v}'"
                                              for k, v in entry["headers"].items()}
            if "body" in entry:
                mine["responseTemplates"] = {entry.get("content_type", "application/json"): entry["body"]}
            out[kind] = mine
        doc["x-amazon-apigateway-gateway-responses"] = out
    if any(a.get("type") == "api_key" for a in (raw.get("authorizers") or {}).values()):
        doc["x-amazon-apigateway-api-key-source"] = "HEADER"
    return doc
