"""OpenAPI 3.0/3.1 (with Amazon API Gateway's extensions) to an edgeplane config.

Owns `import_openapi(doc) -> (config, report)`. Paths and methods become route keys
(`x-amazon-apigateway-any-method`: ANY; the path `$default`: the `$default` route);
`x-amazon-apigateway-integration` becomes an integration (`http_proxy`: http, its URI's
origin an upstream; `aws_proxy`: function, with a handler placeholder named after the
Lambda; `mock`: mock); security schemes with `x-amazon-apigateway-authorizer` become
authorizers (jwt; request/token Lambda authorizers as custom HTTP authorizers with a URL
to fill in), API-key schemes an api_key authorizer; `x-amazon-apigateway-cors`,
`-request-validators` (with `components.schemas` as `models`), `-gateway-responses`,
integration `requestParameters`/`responseParameters` and `-api-key-source` map to their
edgeplane keys. The `x-edgeplane-*` keys the exporter writes are read back, so a round
trip is stable.

Invariant: nothing is dropped silently: every part not carried over, and every
placeholder to fill in, is a line of the report.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
ANY = "x-amazon-apigateway-any-method"
_KNOWN_TOP = {"x-amazon-apigateway-cors", "x-amazon-apigateway-request-validators",
              "x-amazon-apigateway-request-validator", "x-amazon-apigateway-gateway-responses",
              "x-amazon-apigateway-api-key-source", "x-amazon-apigateway-importexport-version"}
_KNOWN_OP = {"x-amazon-apigateway-integration", "x-amazon-apigateway-request-validator"}
_REST_SOURCE = re.compile(r"^method\.request\.(header|querystring|path)\.(.+)$")
_REST_TARGET = re.compile(r"^integration\.request\.(header|querystring|path)\.(.+)$")


class ImportError_(ValueError):
    """The document is not an OpenAPI 3 definition this importer can read."""


class _Importer:
    def __init__(self, doc: dict[str, Any], handler_module: str) -> None:
        self.doc = doc
        self.handler_module = handler_module
        self.report: list[str] = []
        self.upstreams: dict[str, dict[str, Any]] = {}
        self.authorizers: dict[str, dict[str, Any]] = {}
        found = doc.get("components")
        components: dict[str, Any] = found if isinstance(found, dict) else {}
        schemes = components.get("securitySchemes")
        schemas = components.get("schemas")
        self.schemes: dict[str, Any] = schemes if isinstance(schemes, dict) else {}
        self.schemas: dict[str, Any] = schemas if isinstance(schemas, dict) else {}
        self.models: dict[str, Any] = {}
        self.validators = doc.get("x-amazon-apigateway-request-validators") or {}
        self.default_validator = doc.get("x-amazon-apigateway-request-validator")

    def note(self, where: str, text: str) -> None:
        self.report.append(f"{where}: {text}")

    # -- upstreams --------------------------------------------------------------------
    def upstream_for(self, uri: str, where: str) -> tuple[str | None, str]:
        """(upstream name, the URI's path) of an http_proxy URI."""
        if "${stageVariables." in uri:
            self.note(where, f"the URI {uri!r} names a stage variable: set `stages` and write the upstream "
                             "as ${stageVariables.NAME} (not converted)")
        parts = urlsplit(uri)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            self.note(where, f"integration URI {uri!r} has an invalid port: the route answers 501")
            return None, ""
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.note(where, f"integration URI {uri!r} is not an http(s) URL (a VPC link or an ARN?): the route "
                             "answers 501 until you give it an upstream")
            return None, ""
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        origin = f"{parts.scheme}://{host}:{port}"
        for name, spec in self.upstreams.items():
            if spec["targets"] == [origin]:
                return name, parts.path
        host = parts.hostname.lower()
        label = host if re.fullmatch(r"[0-9.:]+", host) else host.split(".")[0]  # an address: all of it
        base = re.sub(r"[^a-z0-9]+", "_", label).strip("_") or "upstream"
        if not base[0].isalpha():
            base = "upstream_" + base
        name, n = base, 2
        while name in self.upstreams:
            name, n = f"{base}_{n}", n + 1
        self.upstreams[name] = {"targets": [origin]}
        return name, parts.path

    # -- authorizers --------------------------------------------------------------------
    def authorizer(self, scheme_name: str, where: str) -> str | None:
        if scheme_name in self.authorizers:
            return scheme_name
        scheme = self.schemes.get(scheme_name)
        if not isinstance(scheme, dict):
            self.note(where, f"security scheme {scheme_name!r} is not defined: the route has no authorizer")
            return None
        ext = scheme.get("x-amazon-apigateway-authorizer") or {}
        kind = str(ext.get("type", "")).lower()
        mine = scheme.get("x-edgeplane-authorizer")
        if isinstance(mine, dict):
            self.authorizers[scheme_name] = dict(mine)
        elif kind == "jwt":
            jwt = ext.get("jwtConfiguration") or {}
            issuer = jwt.get("issuer", "")
            self.authorizers[scheme_name] = {
                "type": "jwt", "issuer": issuer, "audience": list(jwt.get("audience") or []),
                "jwks": {"url": issuer.rstrip("/") + "/.well-known/jwks.json"}}
            self.note(f"securitySchemes.{scheme_name}", "JWKS URL taken as ISSUER/.well-known/jwks.json: check it "
                                                        "(AWS reads the issuer's OpenID discovery document)")
        elif kind in ("request", "token"):
            sources = ext.get("identitySource") or "$request.header.Authorization"
            if isinstance(sources, str):
                sources = [s.strip() for s in sources.split(",")]
            sources = [s.replace("method.request.header.", "$request.header.") for s in sources]
            spec: dict[str, Any] = {"type": "http", "url": "http://127.0.0.1:7000/authorize",
                                    "identity_source": sources}
            ttl = ext.get("authorizerResultTtlInSeconds")
            if isinstance(ttl, int):
                spec["result_ttl"] = f"{ttl}s"
            self.authorizers[scheme_name] = spec
            self.note(f"securitySchemes.{scheme_name}", f"a Lambda {kind} authorizer: edgeplane calls custom "
                                                        "authorizers over HTTP; set its `url` (a placeholder now)")
        elif scheme.get("type") == "apiKey" and scheme.get("in") == "header":
            self.authorizers[scheme_name] = {"type": "api_key", "keys_file": "api-keys.yaml",
                                             "identity_source": f"$request.header.{scheme.get('name', 'x-api-key')}"}
            self.note(f"securitySchemes.{scheme_name}", "API keys: create api-keys.yaml (`python -m "
                                                        "edgeplane.apikeys new ...`)")
        else:
            self.note(f"securitySchemes.{scheme_name}", f"scheme type {scheme.get('type')!r} without an "
                                                        "x-amazon-apigateway-authorizer is not supported: not "
                                                        "converted (the routes using it have no authorizer)")
            return None
        return scheme_name

    # -- models -------------------------------------------------------------------------
    def rewrite(self, schema: Any, found: set[str]) -> Any:
        """`schema` with `#/components/schemas/X` references as `#/$defs/X`, noting every
        X it names (recursive schemas stay references: nothing is expanded)."""
        if isinstance(schema, dict):
            out = {}
            for k, v in schema.items():
                if k == "$ref" and isinstance(v, str) and v.startswith("#/components/schemas/"):
                    name = v.rsplit("/", 1)[1]
                    found.add(name)
                    out[k] = f"#/$defs/{name}"
                else:
                    out[k] = self.rewrite(v, found)
            return out
        if isinstance(schema, list):
            return [self.rewrite(v, found) for v in schema]
        return schema

    def inline(self, schema: Any) -> Any:
        """A self-contained model: `schema` plus, under `$defs`, every component schema it
        reaches."""
        found: set[str] = set()
        out = self.rewrite(schema, found)
        defs: dict[str, Any] = {}
        todo = sorted(found)
        while todo:
            name = todo.pop()
            if name in defs:
                continue
            if name not in self.schemas:
                self.note(f"components.schemas.{name}", "referenced but not defined: an empty schema")
            more: set[str] = set()
            defs[name] = self.rewrite(self.schemas.get(name, {}), more)
            todo += sorted(more - set(defs))
        if defs and isinstance(out, dict):
            out = {**out, "$defs": {**out.get("$defs", {}), **defs}}
        return out

    def model_for(self, op: dict[str, Any], name_hint: str) -> str | None:
        content = (op.get("requestBody") or {}).get("content") or {}
        schema = (content.get("application/json") or {}).get("schema")
        if not isinstance(schema, dict):
            return None
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            self.models.setdefault(name, self.inline(self.schemas.get(name, {})))
        else:
            name = name_hint
            self.models.setdefault(name, self.inline(schema))
        return name

    # -- routes -------------------------------------------------------------------------
    def routes(self) -> list[dict[str, Any]]:
        out = []
        default_security = self.doc.get("security")
        for path, item in (self.doc.get("paths") or {}).items():
            if not isinstance(item, dict):
                continue
            for method, op in item.items():
                if method not in METHODS and method != ANY:
                    if method.startswith("x-amazon-apigateway"):
                        self.note(f"paths.{path}.{method}", "not supported (ignored)")
                    continue
                if not isinstance(op, dict):
                    continue
                out.append(self.route(path, method, op, default_security))
        return out

    def route(self, path: str, method: str, op: dict[str, Any], default_security: Any) -> dict[str, Any]:
        verb = "ANY" if method == ANY else method.upper()
        key = "$default" if path in ("$default", "/$default") else f"{verb} {path}"
        where = f"paths.{path}.{method}"
        route: dict[str, Any] = {"route": key, "integration": self.integration(op, key, where)}
        for unknown in sorted(k for k in op if k.startswith("x-amazon-apigateway") and k not in _KNOWN_OP):
            self.note(where, f"{unknown} is not supported (ignored)")
        security = op.get("security", default_security)
        if isinstance(security, list) and security:
            first = security[0] if isinstance(security[0], dict) else {}
            if len(security) > 1:
                self.note(where, "several alternative security requirements: only the first is used")
            if len(first) > 1:
                self.note(where, f"the security requirement needs {' and '.join(first)} at once: a route takes "
                                 f"one authorizer here; only {next(iter(first))} is used")
            for scheme_name, scopes in first.items():
                auth = self.authorizer(scheme_name, where)
                if auth is not None:
                    route["auth"] = auth
                    if scopes and self.authorizers[auth].get("type") == "jwt":
                        route["scopes"] = list(scopes)
                break
        validation = self.validation(op, key, where)
        if validation:
            route["request_validation"] = validation
        extra = op.get("x-edgeplane-route")
        if isinstance(extra, dict):  # what the exporter keeps of a route beyond AWS's words
            route.update(extra)
        return route

    def integration(self, op: dict[str, Any], key: str, where: str) -> dict[str, Any]:
        ext = op.get("x-amazon-apigateway-integration")
        if not isinstance(ext, dict):
            self.note(where, "no x-amazon-apigateway-integration: answered by a mock 501 until you give it one")
            return {"type": "mock", "status": 501, "body": {"message": "Not Implemented"}}
        kind = str(ext.get("type", "")).lower()
        out: dict[str, Any]
        if isinstance(ext.get("x-edgeplane-integration"), dict):
            out = dict(ext["x-edgeplane-integration"])
        elif kind == "http_proxy" and isinstance(ext.get("x-edgeplane-upstream"), str):
            out = {"type": "http", "upstream": ext["x-edgeplane-upstream"]}
            if isinstance(ext.get("x-edgeplane-path"), str):
                out["path"] = ext["x-edgeplane-path"]
        elif kind == "http_proxy":
            upstream, uri_path = self.upstream_for(str(ext.get("uri", "")), where)
            if upstream is None:
                return {"type": "mock", "status": 501, "body": {"message": "Not Implemented"}}
            out = {"type": "http", "upstream": upstream}
            route_path = key.split(" ", 1)[1] if " " in key else ""
            template = re.sub(r"\{([^{}+]+)\+\}", r"{\1}", route_path)
            if uri_path and uri_path not in (route_path, template):
                out["path"] = uri_path
        elif kind == "aws_proxy":
            name = str(ext.get("uri", "")).split(":function:")[-1].split("/")[0].split(":")[0] or "handler"
            func = re.sub(r"[^A-Za-z0-9_]", "_", name) or "handler"
            out = {"type": "function", "handler": f"{self.handler_module}:{func}"}
            if ext.get("payloadFormatVersion") in ("1.0", "2.0"):
                out["payload_format"] = ext["payloadFormatVersion"]
            self.note(where, f"Lambda {name!r}: a function integration calling {self.handler_module}:{func}; "
                             "write that handler (or point `handler` at your code)")
        elif kind == "mock":
            out = {"type": "mock"}
        else:
            self.note(where, f"integration type {ext.get('type')!r} is not supported: a mock 501 for now")
            return {"type": "mock", "status": 501, "body": {"message": "Not Implemented"}}
        timeout = ext.get("timeoutInMillis")
        if isinstance(timeout, int) and out["type"] in ("http", "function"):
            out["timeout"] = f"{timeout}ms"
        return out

    def validation(self, op: dict[str, Any], key: str, where: str) -> dict[str, Any]:
        name = op.get("x-amazon-apigateway-request-validator", self.default_validator)
        validator = self.validators.get(name) if isinstance(name, str) else None
        if validator is None:
            return {}
        out: dict[str, Any] = {}
        if validator.get("validateRequestBody"):
            hint = re.sub(r"[^A-Za-z0-9]+", "", key.title()) + "Body"
            model = self.model_for(op, hint)
            if model is not None:
                out["body"] = model
        if validator.get("validateRequestParameters"):
            required: dict[str, list[str]] = {}
            for param in op.get("parameters") or []:
                if isinstance(param, dict) and param.get("required") and param.get("in") in ("header", "query"):
                    required.setdefault("headers" if param["in"] == "header" else "querystring", []).append(
                        param["name"])
            if required:
                out["required"] = required
        return out


_REST_VALUE = re.compile(r"^(?:method\.request\.(header|querystring|path)\.(.+)|context\.(.+)|"
                         r"stageVariables\.(.+))$")


def _rest_value(value: str) -> str | None:
    """A REST mapping value in HTTP API syntax, or None when it has no equivalent."""
    if value.startswith("'") and value.endswith("'"):
        return value[1:-1]
    m = _REST_VALUE.match(value)
    if m is None:
        return None
    if m.group(1):
        return f"$request.{m.group(1)}.{m.group(2)}"
    if m.group(3):
        return f"$context.{m.group(3)}"
    return f"$stageVariables.{m.group(4)}"


def _mappings(params: Any, imp: _Importer, where: str, key: str) -> dict[str, str]:
    """Integration request parameters: HTTP API style as they are; REST style
    (`integration.request.header.X: method.request.header.Y`) translated."""
    out: dict[str, str] = {}
    for target, value in (params or {}).items() if isinstance(params, dict) else ():
        if not isinstance(value, str):
            continue
        rest = _REST_TARGET.match(target)
        if rest is None:
            out[target] = value
            continue
        kind, name = rest.group(1), rest.group(2)
        if kind == "path":  # a parameter of the integration URI: the route's own, by name
            if value != f"method.request.path.{name}":
                imp.note(where, f"{target} = {value}: a renamed path parameter; write the integration `path` "
                                "template with the route's parameter names (not converted)")
            continue
        mapped = _rest_value(value)
        if mapped is None:
            imp.note(where, f"{target} = {value}: no equivalent source (not converted)")
            continue
        out[f"overwrite:{kind}.{name}"] = mapped
    return out


def import_openapi(doc: Any, handler_module: str = "lambda_handlers") -> tuple[dict[str, Any], list[str]]:
    """The edgeplane config of an OpenAPI 3 definition, and the report of what was not
    carried over or needs filling in."""
    if not isinstance(doc, dict) or not str(doc.get("openapi", "")).startswith("3."):
        raise ImportError_("not an OpenAPI 3.x definition (its `openapi` field must be 3.0.x or 3.1.x)")
    imp = _Importer(doc, handler_module)
    routes = imp.routes()
    extra_routes = doc.get("x-edgeplane-routes")
    if isinstance(extra_routes, list):  # routes the exporter could not write as operations
        routes += [r for r in extra_routes if isinstance(r, dict)]
    upstreams = doc.get("x-edgeplane-upstreams")
    if isinstance(upstreams, dict):  # the exporter's upstreams, as they were
        imp.upstreams = {**upstreams, **{k: v for k, v in imp.upstreams.items() if k not in upstreams}}
    for (path, item) in (doc.get("paths") or {}).items():
        for method, op in (item or {}).items():
            ext = op.get("x-amazon-apigateway-integration") if isinstance(op, dict) else None
            if not isinstance(ext, dict):
                continue
            key = ("$default" if path in ("$default", "/$default")
                   else f"{'ANY' if method == ANY else method.upper()} {path}")
            route = next((r for r in routes if r["route"] == key and "host" not in r and "match" not in r), None)
            if route is None:
                continue
            mapped = _mappings(ext.get("requestParameters"), imp, f"paths.{path}.{method}", key)
            if mapped:
                route["request_parameters"] = mapped
                if "overwrite:path" in mapped and route["integration"].get("path"):
                    del route["integration"]["path"]  # the mapping decides the path (AWS: it wins)
            responses = ext.get("responseParameters")
            if isinstance(responses, dict) and responses:
                route["response_parameters"] = {str(k): dict(v) for k, v in responses.items() if isinstance(v, dict)}
    for unknown in sorted(k for k in doc if k.startswith("x-amazon-apigateway") and k not in _KNOWN_TOP):
        imp.note(unknown, "not supported (ignored)")
    config: dict[str, Any] = {"listen": ["127.0.0.1:8080"],
                              "admin": {"listen": "127.0.0.1:9901", "insecure": True},
                              "upstreams": imp.upstreams}
    if imp.authorizers:
        config["authorizers"] = imp.authorizers
    config["routes"] = routes
    cors = doc.get("x-amazon-apigateway-cors")
    if isinstance(cors, dict):
        names = {"allowOrigins": "allow_origins", "allowMethods": "allow_methods", "allowHeaders": "allow_headers",
                 "exposeHeaders": "expose_headers", "allowCredentials": "allow_credentials", "maxAge": "max_age"}
        config["cors"] = {mine: cors[theirs] for theirs, mine in names.items() if theirs in cors}
    if imp.models:
        config["models"] = imp.models
    gateway = doc.get("x-amazon-apigateway-gateway-responses")
    if isinstance(gateway, dict) and gateway:
        config["gateway_responses"] = _gateway_responses(gateway, imp)
    source = doc.get("x-amazon-apigateway-api-key-source")
    if source not in (None, "HEADER"):
        imp.note("x-amazon-apigateway-api-key-source", f"{source}: keys come from a header here "
                                                        "(a usage-plan authorizer source is not supported)")
    return config, imp.report


def _gateway_responses(spec: dict[str, Any], imp: _Importer) -> dict[str, Any]:
    from edgeplane.policies.gateway_responses.plugin import TYPES

    out: dict[str, Any] = {}
    for kind, entry in spec.items():
        if kind not in TYPES or not isinstance(entry, dict):
            imp.note(f"x-amazon-apigateway-gateway-responses.{kind}", "not a response type edgeplane answers with "
                                                                       "(ignored)")
            continue
        mine: dict[str, Any] = {}
        if str(entry.get("statusCode", "")).isdigit():
            mine["status"] = int(entry["statusCode"])
        headers = {}
        for target, value in (entry.get("responseParameters") or {}).items():
            if not (target.startswith("gatewayresponse.header.") and isinstance(value, str)):
                continue
            if not (value.startswith("'") and value.endswith("'")):
                imp.note(f"x-amazon-apigateway-gateway-responses.{kind}", f"{target} = {value}: only static "
                                                                           "values are carried over (not converted)")
                continue
            headers[target[len("gatewayresponse.header."):]] = value[1:-1]
        if headers:
            mine["headers"] = headers
        templates = entry.get("responseTemplates") or {}
        if templates:
            ctype, body = next(iter(templates.items()))
            mine["body"] = body
            if ctype != "application/json":
                mine["content_type"] = ctype
        out[kind] = mine
    return out
