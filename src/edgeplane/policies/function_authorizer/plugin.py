"""The `function` authorizer unit: a Python callable decides, as a Lambda REQUEST
authorizer of an HTTP API does, in process.

Owns `authorizers.NAME` of `type: function` (handler, identity sources, result TTL,
timeout, `simple_responses`, forwarded context) and `FunctionAuthorizerClient`, which
the custom authorizer's stage (`http_authorizer.client.HttpAuthorizerStage`) drives as
it drives an HTTP one: the same AWS payload (version 2.0), the same result cache keyed
by the identity sources, the same answers (missing identity source: 401 without a call;
denied: 403; a failure: 500, logged). Only the call differs: the handler runs on the
loop (`async def`) or in the functions' thread pool, with a Lambda context.

The answer, as AWS reads it: with `simple_responses: true` (the default)
`{"isAuthorized": bool, "context": {...}}`; with `false`, an IAM policy
`{"principalId", "policyDocument": {"Statement": [{"Action": "execute-api:Invoke",
"Effect": "Allow"|"Deny", "Resource": ...}]}, "context"}`: allowed when a statement
allows `execute-api:Invoke` (or `*`) and none denies it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeplane.integrations.function.event import LambdaContext
from edgeplane.integrations.function.invoke import FunctionPool, _guarded
from edgeplane.integrations.function.plugin import check_ref, resolve
from edgeplane.plugins import Phase
from edgeplane.policies.http_authorizer.client import DecisionCache
from edgeplane.policies.http_authorizer.plugin import _IDENTITY, HttpAuthorizerPolicy

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.plugins import RuntimeContext

log = logging.getLogger("edgeplane.authorizer")

_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["type", "handler"],
    "properties": {
        "type": {"const": "function"},
        "handler": {"type": "string", "pattern": r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
                    "description": "The callable, `package.module:name`, taking (event, context)."},
        "identity_source": {"anyOf": [_IDENTITY, {"type": "array", "items": _IDENTITY, "minItems": 1}],
                            "default": ["$request.header.Authorization"]},
        "result_ttl": {"$ref": "#/$defs/duration", "default": "300s"},
        "timeout": {"$ref": "#/$defs/duration", "default": "10s"},
        "simple_responses": {"type": "boolean", "default": True,
                             "description": "true: {isAuthorized, context}; false: an IAM policy."},
        "forward_context": {"type": "object", "additionalProperties": {"type": "string"},
                            "description": "Upstream header name -> key of the authorizer's context."},
        "cache_max_entries": {"type": "integer", "minimum": 1, "default": 10000},
    },
}


@dataclass(frozen=True, slots=True)
class FunctionAuthorizerConfig:
    name: str
    handler: str
    identity_source: tuple[str, ...] = ("$request.header.Authorization",)
    result_ttl: float = 300.0
    timeout: float = 10.0
    simple_responses: bool = True
    forward_context: tuple[tuple[str, str], ...] = ()
    cache_max_entries: int = 10_000
    type: str = "function"


def read_answer(answer: Any, simple: bool) -> tuple[bool, dict[str, Any]]:
    """(allowed, context) of an authorizer's answer; ValueError when it is malformed."""
    if not isinstance(answer, dict):
        raise ValueError(f"the authorizer answered a {type(answer).__name__}, not an object")
    context = answer.get("context") or {}
    if not isinstance(context, dict):
        raise ValueError("the authorizer's 'context' is not an object")
    if simple:
        if not isinstance(answer.get("isAuthorized"), bool):
            raise ValueError("the answer lacks a boolean 'isAuthorized' (simple responses)")
        return answer["isAuthorized"], context
    statements = (answer.get("policyDocument") or {}).get("Statement")
    if not isinstance(statements, list):
        raise ValueError("the answer lacks policyDocument.Statement (an IAM policy)")
    allowed = denied = False
    for statement in statements:
        if not isinstance(statement, dict):
            continue
        actions = statement.get("Action")
        actions = actions if isinstance(actions, list) else [actions]
        if not any(a in ("execute-api:Invoke", "execute-api:*", "*") for a in actions):
            continue
        effect = str(statement.get("Effect", ""))
        allowed = allowed or effect == "Allow"
        denied = denied or effect == "Deny"
    if "principalId" in answer:
        context = {"principalId": answer["principalId"], **context}
    return allowed and not denied, context


class FunctionAuthorizerClient(DecisionCache):
    """Per authorizer: the handler and the result cache (the interface of
    `http_authorizer.client.HttpAuthorizerClient` the stage uses)."""

    def __init__(self, cfg: FunctionAuthorizerConfig, pool: Any) -> None:
        self.cfg = cfg
        self.handler = resolve(cfg.handler)
        self.is_async = asyncio.iscoroutinefunction(self.handler)
        self.pool = pool  # () -> the gateway's FunctionPool
        self.cache = OrderedDict()
        self.calls = 0
        self.failures = 0

    async def ask(self, payload: dict[str, Any], traceparent: bytes | None = None) -> tuple[bool, dict]:
        self.calls += 1
        cfg = self.cfg
        context = LambdaContext(cfg.handler, payload["requestContext"]["requestId"], time.monotonic() + cfg.timeout)
        try:
            if self.is_async:
                answer = await asyncio.wait_for(_guarded(self.handler(payload, context)), cfg.timeout)
            else:
                pool = self.pool()
                if not isinstance(pool, FunctionPool):
                    raise ValueError("no function pool (the gateway is not started)")
                loop = asyncio.get_running_loop()
                answer = await asyncio.wait_for(pool.submit(loop, self.handler, payload, context), cfg.timeout)
        except TimeoutError:
            raise ValueError(f"no answer within {cfg.timeout:g}s") from None
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the handler's failure (SystemExit too): a 500, logged
            log.error("function authorizer %s raised", cfg.name, exc_info=(type(exc), exc, exc.__traceback__))
            raise ValueError(f"the handler raised {type(exc).__name__}") from None
        return read_answer(answer, cfg.simple_responses)

    async def close(self) -> None:
        pass

    def telemetry(self) -> dict[str, Any]:
        return {"handler": self.cfg.handler, "calls": self.calls, "failures": self.failures, "cached": len(self.cache)}


class FunctionAuthorizerPolicy(HttpAuthorizerPolicy):
    """As the HTTP custom authorizer (its stage, compile step and forwarded headers), with
    a function instead of a URL."""

    name = "function_authorizer"
    phase = Phase.AUTHENTICATION
    authorizer_type = "function"
    authorizer_schema = _SCHEMA

    def load_authorizer(self, name: str, spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext) -> Any:
        handler = spec.get("handler")
        if not isinstance(handler, str):
            return None
        check_ref(handler, path + ("handler",), ctx)
        sources = spec.get("identity_source", ["$request.header.Authorization"])
        sources = (sources,) if isinstance(sources, str) else tuple(s for s in sources if isinstance(s, str))
        ttl = ctx.duration(spec, "result_ttl", path, 300.0, low_inclusive=True)
        if ttl > 3600:
            ctx.fail(path + ("result_ttl",), "at most 3600s (AWS's maximum)")
        forward = spec.get("forward_context") or {}
        return FunctionAuthorizerConfig(
            name=name, handler=handler, identity_source=sources, result_ttl=ttl,
            timeout=ctx.duration(spec, "timeout", path, 10.0),
            simple_responses=spec.get("simple_responses") is not False,
            forward_context=tuple((k.lower(), v) for k, v in forward.items()
                                  if isinstance(k, str) and isinstance(v, str)),
            cache_max_entries=ctx.integer(spec, "cache_max_entries", 10_000))

    async def start(self, runtime: RuntimeContext) -> None:
        kept = runtime.carried(self.name, "function")
        pool = lambda: runtime.state.get("functions")  # noqa: E731 (started by the functions unit)
        runtime.state[self.name] = {name: kept.get(name) or FunctionAuthorizerClient(a, pool)
                                    for name, a in runtime.config.authorizers_of("function").items()}

    def stats(self, runtime: RuntimeContext) -> dict[str, Any] | None:
        clients = runtime.state.get(self.name) or {}
        return {"authorizers": {name: c.telemetry() for name, c in clients.items()}} if clients else None


plugin = FunctionAuthorizerPolicy()
