"""The `function` integration unit: `routes[].integration` of `type: function`, and the
`functions` section (the thread pool and payload limit shared by every function route).

`handler: "pkg.module:name"` names a Python callable taking `(event, context)`, imported
when the config loads (an import error or a non-callable is a located error), called
with the Lambda proxy event of `payload_format` "2.0" (default) or "1.0" (`event`), in
process: `async def` handlers on the gateway's loop, others in the pool (`invoke`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeplane.integrations.function.invoke import FunctionIntegration, FunctionPool
from edgeplane.plugins import Integration, Phase, Policy

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.plugins import CompileContext, RuntimeContext

LAMBDA_PAYLOAD_MAX = 6 * 1024 * 1024  # AWS Lambda's synchronous invocation payload limit
DEFAULT_THREADS = 16

_FUNCTION_INTEGRATION = {
    "additionalProperties": False,
    "required": ["handler"],
    "properties": {
        "type": {"const": "function"},
        "handler": {"type": "string", "pattern": r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
                    "description": "The callable, `package.module:name` (importable by the gateway), "
                                   "taking (event, context) like a Lambda handler."},
        "payload_format": {"enum": ["2.0", "1.0", 2.0, 1.0], "default": "2.0",
                           "description": "The Lambda proxy payload version (AWS's payloadFormatVersion)."},
        "timeout": {"$ref": "#/$defs/duration", "default": "29s",
                    "description": "Past it the client gets 504 {\"message\":\"Endpoint request timed out\"}."},
    },
}

_FUNCTIONS_SECTION = {
    "type": "object", "additionalProperties": False,
    "description": "What every function integration shares.",
    "properties": {
        "threads": {"type": "integer", "minimum": 1, "maximum": 1024, "default": DEFAULT_THREADS,
                    "description": "Threads that run synchronous handlers (per worker)."},
        "max_payload": {"$ref": "#/$defs/size", "default": "6MiB",
                        "description": "Largest request and response body (AWS Lambda: 6 MB); a larger "
                                       "request is 413, a larger response 502."},
    },
}


@dataclass(frozen=True, slots=True)
class FunctionConfig:
    type: str
    handler: str
    payload_format: str = "2.0"
    timeout: float = 29.0
    # What the config core reads of every integration (stage references, deployments,
    # `/routes`): a function has no upstream, split or path template.
    upstream: str | None = None
    split: tuple[tuple[str, int], ...] = ()
    path: str | None = None


@dataclass(frozen=True, slots=True)
class FunctionsSection:
    threads: int = DEFAULT_THREADS
    max_payload: int = LAMBDA_PAYLOAD_MAX


def resolve(ref: str) -> Any:
    """The callable `package.module:name` names; ImportError/AttributeError/TypeError."""
    module_name, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{ref} is a {type(obj).__name__}, not a callable")
    return obj


def check_ref(ref: str, path: tuple[Any, ...], ctx: LoadContext) -> None:
    """A located error when `ref` (`package.module:name`) cannot be used."""
    if ":" not in ref:
        return  # (the schema's pattern reported it)
    try:
        resolve(ref)
    except Exception as exc:  # the import failed, the name is wrong, or it is not callable
        ctx.fail(path, f"cannot use {ref!r}: {type(exc).__name__}: {exc}")


class FunctionIntegrationPlugin(Integration):
    type = "function"
    schema = _FUNCTION_INTEGRATION

    def load(self, spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext, route_key: Any) -> Any:
        handler = spec.get("handler")
        if isinstance(handler, str):
            check_ref(handler, path + ("handler",), ctx)
        timeout = ctx.integration_timeout(spec, path)
        fmt = spec.get("payload_format", "2.0")
        fmt = f"{fmt:.1f}" if isinstance(fmt, float) else fmt  # `payload_format: 2.0` unquoted in YAML
        return FunctionConfig(type="function", handler=handler if isinstance(handler, str) else "",
                              payload_format=fmt if fmt in ("2.0", "1.0") else "2.0", timeout=timeout)

    def compile(self, route: RouteConfig, ctx: CompileContext, upstream_headers: frozenset[bytes],
                response_headers: frozenset[bytes]) -> FunctionIntegration:
        integ: Any = route.integration  # a FunctionConfig
        pool = ctx.runtime.get("functions")
        if not isinstance(pool, FunctionPool):  # compiled without a started gateway (a check)
            pool = FunctionPool(1)
        section = ctx.config.policies.get("functions") or FunctionsSection()
        variables = dict(ctx.config.stage_variables) or None  # a stage's config carries them
        return FunctionIntegration(resolve(integ.handler), integ.handler, integ.payload_format, integ.timeout,
                                   section.max_payload, pool, variables)

    def summary(self, model: Any) -> str:
        return f"function {model.handler} (payload {model.payload_format}, timeout={model.timeout:g}s)"


class FunctionsPolicy(Policy):
    """Owns the `functions` section and the per-gateway pool; acts on no route."""

    name = "functions"
    phase = Phase.TRANSFORM
    sections = {"functions": _FUNCTIONS_SECTION}

    def load_section(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        if not isinstance(value, dict):
            return FunctionsSection()
        return FunctionsSection(threads=ctx.integer(value, "threads", DEFAULT_THREADS),
                                max_payload=ctx.size(value, "max_payload", path, LAMBDA_PAYLOAD_MAX, low=1))

    def applies(self, route: RouteConfig, config: Config) -> bool:
        return False

    async def start(self, runtime: RuntimeContext) -> None:
        section = runtime.config.policies.get("functions") or FunctionsSection()
        runtime.state[self.name] = FunctionPool(section.threads)

    async def stop(self, runtime: RuntimeContext) -> None:
        pool = runtime.state.get(self.name)
        if isinstance(pool, FunctionPool):
            pool.close()

    def stats(self, runtime: RuntimeContext) -> dict[str, Any] | None:
        pool = runtime.state.get(self.name)
        if not isinstance(pool, FunctionPool) or not any(pool.calls.values()):
            return None
        return {"functions": {"threads": pool.threads, "busy": pool.busy, **pool.calls}}


plugin = FunctionIntegrationPlugin()
pool_plugin = FunctionsPolicy()
