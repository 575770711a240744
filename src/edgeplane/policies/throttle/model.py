"""The throttle unit's config model: a token bucket's settings, loaded with located errors.

Shared by the throttle policy (top-level and route `throttle`) and usage plans (a plan's
per-key `throttle` and per-route `routes`), so both read one shape the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeplane.config.errors import short as _short
from edgeplane.config.values import MAX_THROTTLE
from edgeplane.policies.throttle.buckets import TokenBucket

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext


@dataclass(frozen=True, slots=True)
class ThrottleConfig:
    """A token bucket: `rate` tokens per second, `burst` tokens at most."""

    rate: float = 10_000.0  # AWS account-level defaults
    burst: int = 5_000
    headers: bool = True  # server-wide only: RateLimit headers on responses
    key: str | None = None  # route only: per-client identity expression; None = one bucket
    unresolved: str = "shared"  # route only: a client key that cannot be resolved -> "shared" | "refuse"


_THROTTLE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "rate": {"type": "number", "exclusiveMinimum": 0, "description": "Tokens per second."},
        "burst": {"type": "integer", "minimum": 1, "description": "Bucket size."},
        "headers": {"type": "boolean", "default": True},
        "key": {"type": "string",
                "pattern": "^\\$(request\\.header\\.[!#$%&'*+.^_`|~0-9A-Za-z-]+|context\\.identity\\.sourceIp"
                           "|context\\.identity\\.apiKeyId|context\\.authorizer\\.claims\\.[A-Za-z0-9_:.-]+)$",
                "description": "Per-client key: $context.identity.sourceIp, $context.identity.apiKeyId, "
                               "$context.authorizer.claims.NAME or $request.header.NAME."},
        "unresolved": {"enum": ["shared", "refuse"], "default": "shared"},
    },
}


def load_throttle(section: Any, path: tuple[Any, ...], ctx: LoadContext, route_level: bool) -> ThrottleConfig | None:
    """A `throttle:`-shaped mapping (top level, route, or a usage plan's)."""
    if not isinstance(section, dict):
        return None
    d = ThrottleConfig()
    rate = section.get("rate", d.rate)
    burst = section.get("burst", d.burst)
    try:
        TokenBucket(rate, burst)
    except (ValueError, TypeError) as exc:
        ctx.fail(path, str(exc))
        return None
    for name, value in (("rate", rate), ("burst", burst)):
        if value > MAX_THROTTLE:  # a typo, not a limit: floats lose whole tokens up there
            ctx.fail(path + (name,), f"must be <= {MAX_THROTTLE:,} (got {_short(value)})")
    if route_level and "headers" in section:
        ctx.fail(path + ("headers",), "set RateLimit headers with the top-level 'throttle.headers'")
    if not route_level and ("key" in section or "unresolved" in section):
        ctx.fail(path, "'key' and 'unresolved' belong to a route's throttle")
    key = section.get("key")
    return ThrottleConfig(rate=float(rate), burst=burst, headers=section.get("headers", True) is True,
                          key=key if isinstance(key, str) else None,
                          unresolved=section.get("unresolved", "shared"))
