"""The `request_validation` unit, in the spirit of API Gateway REST APIs' models and
request validators.

Owns the top-level `models: {NAME: JSON Schema}` and the route-level
`request_validation: {body: MODEL, required: {headers: [...], querystring: [...]},
detail: false}`, and `ValidationStage` (phase TRANSFORM, order 10: after authorizers and
throttles, before parameter mapping and the integration).

- Missing required parameters: 400 `{"message": "Missing required request parameters:
  [NAME, ...]"}` (AWS's words), before any body is read.
- A body that is not JSON or does not match its model: 400 `{"message": "Invalid request
  body"}`; with `detail: true`, also `"errors"`: up to 10 messages with their JSON paths.
- Schemas are compiled once per config with `jsonschema-rs` (a Rust validator: measured
  at ~0.8 us per realistic body against ~7 us for fastjsonschema and ~130 us for
  jsonschema; `benches/validation_bench.py`); a schema that is not valid JSON Schema is
  a located error at `models.NAME`.
- Only routes with a `body` model buffer the body, within `limits.max_body_bytes`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jsonschema_rs
import orjson

from edgeplane.plugins import FastStage, Phase, Policy
from edgeplane.plugins.body import BodyWait, too_large

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.plugins import CompileContext

_ROUTE_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "body": {"type": "string", "description": "The name of a `models` entry the JSON body must match."},
        "required": {"type": "object", "additionalProperties": False, "properties": {
            "headers": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "querystring": {"type": "array", "items": {"type": "string", "minLength": 1}}}},
        "detail": {"type": "boolean", "default": False,
                   "description": "Add the validation errors to the 400 body."},
    },
}


@dataclass(frozen=True, slots=True)
class ValidationConfig:
    body: str | None = None
    headers: tuple[str, ...] = ()
    querystring: tuple[str, ...] = ()
    detail: bool = False


@functools.lru_cache(maxsize=256)
def compiled(schema_json: bytes) -> Any:
    """The jsonschema-rs validator of a schema (kept per schema text)."""
    return jsonschema_rs.validator_for(orjson.loads(schema_json))


class ValidationStage(FastStage):
    __slots__ = ("cfg", "validator", "headers", "query", "limit")

    def __init__(self, cfg: ValidationConfig, validator: Any, limit: int) -> None:
        self.cfg = cfg
        self.validator = validator
        self.headers = tuple(h.lower().encode("latin-1") for h in cfg.headers)
        self.query = cfg.querystring
        self.limit = limit

    def __call__(self, proto: HttpProtocol, req: Request) -> bool | None:
        missing = self._missing(req)
        if missing:
            message = f"Missing required request parameters: [{', '.join(missing)}]"
            proto.send_error(req, 400, message, message=message)
            return False
        if self.validator is None:
            return True
        if not req.complete:
            if too_large(proto, req, self.limit, "request validation reads the body"):
                return False
            BodyWait(self, proto, req, self.limit, "request validation reads the body", self._check_body)
            return None
        return self._check_body(proto, req)

    def _missing(self, req: Request) -> list[str]:
        out = []
        if self.headers:
            present = {k for k, _ in req.headers}
            out += [name for name, raw in zip(self.cfg.headers, self.headers, strict=True) if raw not in present]
        if self.query:
            from urllib.parse import parse_qsl

            names = {k for k, _ in parse_qsl(req.query.decode("latin-1"), keep_blank_values=True)}
            out += [name for name in self.query if name not in names]
        return out

    def _check_body(self, proto: HttpProtocol, req: Request) -> bool:
        raw = b"".join(req.body_buf or ())
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return self._refuse(proto, req, [f"not JSON: {exc}"])
        if self.validator.is_valid(doc):
            return True
        errors = [f"{'/'.join(map(str, e.instance_path)) or '$'}: {e.message}"
                  for _, e in zip(range(10), self.validator.iter_errors(doc), strict=False)] if self.cfg.detail else []
        return self._refuse(proto, req, errors)

    def _refuse(self, proto: HttpProtocol, req: Request, errors: list[str]) -> bool:
        if not self.cfg.detail:  # (a gateway response for BAD_REQUEST_BODY may change it)
            proto.send_error(req, 400, "Invalid request body", message="Invalid request body")
            return False
        req.error = "Invalid request body"
        proto.ctx.count_error("400")
        proto.send_local(req, 400, orjson.dumps({"message": "Invalid request body", "errors": errors}))
        return False


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


class RequestValidationPolicy(Policy):
    name = "request_validation"
    phase = Phase.TRANSFORM
    order = 10
    sections = {"models": {"type": "object", "additionalProperties": {"type": "object"},
                           "description": "Named JSON Schemas (draft 2020-12 and earlier) for request bodies."}}
    route_keys = {"request_validation": _ROUTE_SCHEMA}

    def load_section(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        models: dict[str, bytes] = {}
        for name, schema in (value or {}).items():
            if not isinstance(schema, dict):
                continue
            text = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
            try:
                compiled(text)
            except (ValueError, jsonschema_rs.ValidationError) as exc:
                ctx.fail(path + (name,), f"not a valid JSON Schema: {str(exc).splitlines()[0]}")
                continue
            models[name] = text
        return models

    def load_route(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        if not isinstance(value, dict):
            return None
        found = value.get("required")
        required: dict[str, Any] = found if isinstance(found, dict) else {}
        body = value.get("body")
        return ValidationConfig(body=body if isinstance(body, str) else None,
                                headers=_strings(required.get("headers")),
                                querystring=_strings(required.get("querystring")),
                                detail=value.get("detail") is True)

    def check(self, config: Config, ctx: LoadContext) -> None:
        models = config.policies.get("models") or {}
        for r in config.routes:
            cfg = r.policies.get("request_validation")
            if cfg is not None and cfg.body is not None and cfg.body not in models:
                known = ", ".join(sorted(models)) or "none"
                ctx.fail(("routes", r.index, "request_validation", "body"),
                         f"unknown model {cfg.body!r} (models: {known})")

    def applies(self, route: RouteConfig, config: Config) -> bool:
        return "request_validation" in route.policies

    def compile(self, route: RouteConfig, ctx: CompileContext) -> ValidationStage | None:
        cfg = route.policies.get("request_validation")
        if cfg is None:
            return None
        models = ctx.config.policies.get("models") or {}
        validator = compiled(models[cfg.body]) if cfg.body is not None else None
        return ValidationStage(cfg, validator, ctx.config.limits.max_body_bytes)


plugin = RequestValidationPolicy()
