"""Sans-IO: the value expressions of parameter mappings, in Amazon API Gateway HTTP API
syntax, compiled once at load and rendered per request.

A value is static text mixed with sources, written `$source` or `${source}`:
`$request.header.NAME`, `$request.querystring.NAME`, `$request.path.NAME`,
`$request.body.PATH` (a JSON path: `a.b`, `items[0].id`), `$context.VAR` (`requestId`,
`stage`, `routeKey`, `httpMethod`, `path`, `domainName`, `identity.sourceIp`,
`authorizer.claims.NAME`, `authorizer.NAME`), `$stageVariables.NAME`, and, in response
mappings, `$response.header.NAME`, `$response.body.PATH` and `$response.statuscode`.

Invariants: a source that is absent renders as nothing; a value that is only one source,
absent, is `None` (the mapping is skipped, as AWS skips it); an unknown source is a
`ValueError` with the reason (the loader locates it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

_SOURCE = re.compile(r"\$\{([^}]*)\}|\$((?:request|context|stageVariables|response)\.[A-Za-z0-9_.\-\[\]]+)")
_JSON_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
_CONTEXT = ("requestId", "stage", "routeKey", "httpMethod", "path", "domainName", "identity.sourceIp")

Getter = Callable[[Any, Any, Any], str | None]  # (req, proto, extra) -> text or None


def _query_value(query: bytes, name: str) -> str | None:
    from urllib.parse import unquote_plus

    for part in query.decode("latin-1").split("&"):
        k, _, v = part.partition("=")
        if unquote_plus(k) == name:
            return unquote_plus(v)
    return None


def _json_path(path: str) -> list[str | int]:
    steps: list[str | int] = []
    for m in _JSON_STEP.finditer(path):
        steps.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
    if not steps:
        raise ValueError(f"empty JSON path in $request.body.{path}")
    return steps


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def source(expr: str, response: bool) -> tuple[Getter, bool]:
    """A getter for one source (without its `$`), and whether it reads the request body."""
    if expr.startswith("request.header."):
        name = expr[len("request.header."):].lower().encode("latin-1")

        def header(req: Any, proto: Any, extra: Any) -> str | None:
            values = [v for k, v in req.headers if k == name]
            return b",".join(values).decode("latin-1") if values else None
        return header, False
    if expr.startswith("request.querystring."):
        qname = expr[len("request.querystring."):]
        return (lambda req, proto, extra: _query_value(req.query, qname)), False
    if expr.startswith("request.path."):
        pname = expr[len("request.path."):]

        def path_param(req: Any, proto: Any, extra: Any) -> str | None:
            value = (req.params or {}).get(pname)
            return value.decode("utf-8", "replace") if value is not None else None
        return path_param, False
    if expr.startswith("request.body.") or (response and expr.startswith("response.body.")):
        which = "body" if expr.startswith("request.") else "response_body"
        steps = _json_path(expr.split(".body.", 1)[1])

        def body(req: Any, proto: Any, extra: Any) -> str | None:
            doc = extra.get(which) if isinstance(extra, dict) else None
            for step in steps:
                if isinstance(step, int) and isinstance(doc, list) and step < len(doc):
                    doc = doc[step]
                elif isinstance(step, str) and isinstance(doc, dict):
                    doc = doc.get(step)
                else:
                    return None
            return _text(doc)
        return body, True
    if expr.startswith("stageVariables."):
        vname = expr[len("stageVariables."):]
        return (lambda req, proto, extra: (extra.get("stage_variables") or {}).get(vname)), False
    if expr.startswith("context."):
        return _context(expr[len("context."):]), False
    if response and expr.startswith("response.header."):
        rname = expr[len("response.header."):].lower()
        return (lambda req, proto, extra: next((v for k, v in extra.get("response_headers", ())
                                                if k == rname), None)), False
    if response and expr == "response.statuscode":
        return (lambda req, proto, extra: str(extra.get("status"))), False
    raise ValueError(f"unknown source ${expr}")


def _context(var: str) -> Getter:
    if var.startswith("authorizer.claims."):
        claim = var[len("authorizer.claims."):]
        return lambda req, proto, extra: _text(req.claims.get(claim)) if req.claims is not None else None
    if var.startswith("authorizer."):
        key = var[len("authorizer."):]
        return lambda req, proto, extra: _text(req.auth_context.get(key)) if req.auth_context is not None else None
    getters: dict[str, Getter] = {
        "requestId": lambda req, proto, extra: req.request_id.decode("latin-1"),
        "stage": lambda req, proto, extra: req.stage,
        "routeKey": lambda req, proto, extra: req.route_key,
        "httpMethod": lambda req, proto, extra: req.method.decode("latin-1"),
        "path": lambda req, proto, extra: (req.base_path or req.path).decode("latin-1"),
        "domainName": lambda req, proto, extra: (req.host or b"").decode("latin-1").split(":")[0],
        "identity.sourceIp": lambda req, proto, extra: req.client_ip or proto.peer_ip,
    }
    found = getters.get(var)
    if found is None:
        raise ValueError(f"unknown variable $context.{var} (known: "
                         + ", ".join(f"$context.{v}" for v in _CONTEXT)
                         + ", $context.authorizer.claims.NAME, $context.authorizer.NAME)")
    return found


class Value:
    """A compiled value: static parts and getters, in order."""

    __slots__ = ("parts", "single", "reads_body")

    def __init__(self, text: str, response: bool = False) -> None:
        parts: list[str | Getter] = []
        pos = 0
        reads_body = False
        for m in _SOURCE.finditer(text):
            if m.start() > pos:
                parts.append(text[pos:m.start()])
            getter, body = source(m.group(1) if m.group(1) is not None else m.group(2), response)
            reads_body = reads_body or body
            parts.append(getter)
            pos = m.end()
        if pos < len(text):
            parts.append(text[pos:])
        self.parts = parts
        self.single = len(parts) == 1 and not isinstance(parts[0], str)
        self.reads_body = reads_body

    def render(self, req: Any, proto: Any, extra: Any) -> str | None:
        if self.single:
            return self.parts[0](req, proto, extra)  # type: ignore[operator]
        return "".join(p if isinstance(p, str) else (p(req, proto, extra) or "") for p in self.parts)
