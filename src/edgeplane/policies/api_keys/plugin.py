"""The `api_key` authorizer unit: API keys from a key file, as AWS API keys.

Owns `authorizers.NAME` of `type: api_key` (the key file, checked at load: every key's
usage plan must exist) and `ApiKeyStage` (phase AUTHENTICATION): the key from its header
(X-API-Key by default) must be an enabled key of the file; missing or invalid is 403
Forbidden, as AWS answers. The key file format and `edgeplane keys` live in `store`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeplane.http.request import header, identity_header
from edgeplane.plugins import FastStage, Phase, Policy
from edgeplane.policies.api_keys.store import ApiKeyFileError, KeyStore, load_key_file

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import RouteConfig
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.plugins import CompileContext


@dataclass(frozen=True, slots=True)
class ApiKeyAuthorizerConfig:
    name: str
    keys_file: str  # YAML key file: ids, sha256 hashes, optional usage plan
    identity_source: str = "$request.header.X-API-Key"
    type: str = "api_key"

    @property
    def header(self) -> bytes:
        return identity_header(self.identity_source)


_API_KEY_AUTHORIZER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "keys_file"],
    "properties": {
        "type": {"const": "api_key"},
        "keys_file": {"type": "string", "description": "YAML key file (ids, sha256 hashes, plans)."},
        "identity_source": {"type": "string", "pattern": "^\\$request\\.header\\.[!#$%&'*+.^_`|~0-9A-Za-z-]+$",
                            "default": "$request.header.X-API-Key"},
    },
}

class ApiKeyStage(FastStage):
    """API key authorizer: missing or invalid is 403 Forbidden, as AWS answers."""

    __slots__ = ("store", "header", "name")

    def __init__(self, store: KeyStore, cfg: ApiKeyAuthorizerConfig):
        self.store = store
        self.header = cfg.header
        self.name = cfg.name

    def __call__(self, proto: HttpProtocol, req: Request) -> bool:
        presented = header(req, self.header)
        key = self.store.lookup(presented) if presented is not None else None
        if key is None:
            why = "missing API key" if presented is None else "invalid API key"
            proto.ctx.count_refusal("authorizer", self.name)
            proto.send_error(req, 403, f"{self.name}: {why}")
            return False
        req.api_key = key
        return True


def _load(name: str, spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext) -> ApiKeyAuthorizerConfig | None:
    ctx.resolve_paths(spec, "keys_file")  # against the config file's folder
    keys_file = spec.get("keys_file")
    if not isinstance(keys_file, str):
        return None
    try:
        store = load_key_file(keys_file)
    except ApiKeyFileError as exc:
        for err in exc.errors:
            ctx.fail(path + ("keys_file",), err)
    else:
        plans = ctx.raw.get("usage_plans")
        plan_names = set(plans) if isinstance(plans, dict) else set()
        for plan in sorted(store.plans() - plan_names):
            known = ", ".join(sorted(plan_names)) or "none defined"
            ctx.fail(path + ("keys_file",), f"keys refer to usage plan {plan!r}, which "
                                             f"'usage_plans' does not define (known: {known})")
    return ApiKeyAuthorizerConfig(
        name=name, keys_file=keys_file,
        identity_source=spec.get("identity_source", "$request.header.X-API-Key"))


class ApiKeyPolicy(Policy):
    name = "api_key"
    phase = Phase.AUTHENTICATION
    authorizer_type = "api_key"
    authorizer_schema = _API_KEY_AUTHORIZER

    def load_authorizer(self, name: str, spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext) -> Any:
        return _load(name, spec, path, ctx)

    def prepare(self, ctx: CompileContext) -> dict[str, KeyStore]:
        """The key file of each API-key authorizer, read once per snapshot."""
        return {name: load_key_file(cfg.keys_file) for name, cfg in ctx.config.authorizers_of("api_key").items()}

    def compile(self, route: RouteConfig, ctx: CompileContext) -> ApiKeyStage | None:
        cfg = ctx.authorizer(route, "api_key")
        if cfg is None:
            return None
        return ApiKeyStage(ctx.state[self.name][route.auth], cfg)


plugin = ApiKeyPolicy()
