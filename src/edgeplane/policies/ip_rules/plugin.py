"""The `ip_rules` policy unit: client IP behind trusted proxies, then allow/deny rules.

Owns the top-level `ip_rules` and `trusted_proxies` sections, the route-level `ip_rules`,
and `IpStage` (phase EARLY). Server-wide and route rules combine: a request must pass
both. A denied client gets 403 Forbidden. The sans-IO matching is `rules`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeplane.config.schema import STRINGS
from edgeplane.http.request import header_all
from edgeplane.plugins import FastStage, Phase, Policy
from edgeplane.policies.ip_rules.rules import IpRules, TrustedProxies, parse_entry

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.plugins import CompileContext


@dataclass(frozen=True, slots=True)
class IpRulesConfig:
    allow: tuple[str, ...] = ()  # CIDRs or addresses; empty = everyone not denied
    deny: tuple[str, ...] = ()  # CIDRs or addresses; deny wins



_IP_RULES = {
    "type": "object",
    "additionalProperties": False,
    "description": "Allow and deny lists of CIDRs or addresses (IPv4 and IPv6); deny wins; "
                   "with an allow list, only listed clients pass. Denied requests get 403.",
    "properties": {"allow": STRINGS, "deny": STRINGS},
}

class IpStage(FastStage):
    """Client IP (X-Forwarded-For believed only from trusted proxies), then the IP rules;
    denied is 403."""

    __slots__ = ("rules", "trusted")

    def __init__(self, rules: IpRules, trusted: TrustedProxies | None):
        self.rules = rules
        self.trusted = trusted

    def __call__(self, proto: HttpProtocol, req: Request) -> bool:
        ip = req.client_ip
        if ip is None:
            ip = proto.peer_ip
            if self.trusted is not None:
                ip = self.trusted.client_ip(ip, header_all(req, b"x-forwarded-for"))
            req.client_ip = ip
        if not self.rules.check(ip):
            proto.send_error(req, 403, f"client {ip} denied by IP rules")
            return False
        return True


def _cidrs(entries: tuple[str, ...], path: tuple[Any, ...], ctx: LoadContext) -> None:
    for j, entry in enumerate(entries):
        try:
            parse_entry(entry)
        except ValueError as exc:
            ctx.fail(path + (j,), str(exc))


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(x for x in value or () if isinstance(x, str)) if isinstance(value, list) else ()


class IpRulesPolicy(Policy):
    name = "ip_rules"
    phase = Phase.EARLY
    sections = {"ip_rules": {"$ref": "#/$defs/ipRules"}, "trusted_proxies": STRINGS}
    route_keys = {"ip_rules": {"$ref": "#/$defs/ipRules"}}
    defs = {"ipRules": _IP_RULES}

    def load_section(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        if key == "trusted_proxies":
            entries = _strings(value)
            _cidrs(entries, path, ctx)
            return entries
        return self.load_route(key, value, path, ctx)

    def load_route(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        if not isinstance(value, dict):
            return None
        allow, deny = _strings(value.get("allow")), _strings(value.get("deny"))
        _cidrs(allow, path + ("allow",), ctx)
        _cidrs(deny, path + ("deny",), ctx)
        return IpRulesConfig(allow=allow, deny=deny)

    def applies(self, route: RouteConfig, config: Config) -> bool:
        return "ip_rules" in route.policies or "ip_rules" in config.policies

    def compile(self, route: RouteConfig, ctx: CompileContext) -> IpStage | None:
        config = ctx.config
        rules = [IpRules(r.allow, r.deny)
                 for r in (config.policies.get("ip_rules"), route.policies.get("ip_rules")) if r]
        if not rules:
            return None
        combined = rules[0] if len(rules) == 1 else rules[0] & rules[1]
        trusted = TrustedProxies(config.trusted_proxies) if config.trusted_proxies else None
        return IpStage(combined, trusted)


plugin = IpRulesPolicy()
