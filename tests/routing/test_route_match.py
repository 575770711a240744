"""Header and query conditions on routes (`routes[].match`) through a real gateway: one
route key leading to several routes, the precedence among them, backtracking when no
conditional route holds, and the checks at load (duplicates, regexes, ambiguity)."""

from __future__ import annotations

import pytest

from conftest import RawClient, base_config
from edgeplane.config.loader import ConfigError, load_config

pytestmark = pytest.mark.timeout(30)


def mock(key: str, body: str, **extra) -> dict:
    return {"route": key, "integration": {"type": "mock", "body": body}, **extra}


async def test_conditions_select_among_routes_of_one_key(gateway):
    routes = [
        mock("GET /users", "v1"),
        mock("GET /users", "v2", match={"headers": {"X-Api-Version": "2"}}),
        mock("GET /users", "v2-beta", match={"headers": {"x-api-version": "2"}, "query": {"beta": "true"}}),
        mock("GET /users", "canary", match={"headers": {"x-group": {"regex": "canary-[0-9]+"}}}),
        mock("GET /items/{id}", "beta item", match={"query": {"beta": "true"}}),
        mock("GET /items/{proxy+}", "any item"),
    ]
    gw = await gateway(base_config(routes=routes))
    addr = gw.addresses[0]

    async def body(path: str, headers: dict | None = None) -> bytes:
        return (await RawClient.once(addr, "GET", path, headers)).body

    assert await body("/users") == b"v1"
    assert await body("/users", {"x-api-version": "2"}) == b"v2"
    assert await body("/users?beta=true", {"x-api-version": "2"}) == b"v2-beta"  # more conditions win
    assert await body("/users?beta=true") == b"v1"
    assert await body("/users", {"x-api-version": "3"}) == b"v1"
    assert await body("/users", {"x-group": "canary-17"}) == b"canary"
    assert await body("/users", {"x-group": "canary-17x"}) == b"v1"  # a regex must match the whole value
    assert await body("/items/5?beta=%74rue") == b"beta item"  # query values are percent-decoded
    assert await body("/items/5") == b"any item"  # no conditional route holds: the search goes on


def test_checks_at_load():
    def errors(routes: list) -> list[str]:
        with pytest.raises(ConfigError) as exc:
            load_config(base_config(routes=routes))
        return exc.value.errors

    same = {"headers": {"x-v": "2"}}
    assert errors([mock("GET /a", "1", match=same), mock("GET /a", "2", match=same)])[0].startswith(
        "routes[1]: duplicate of routes[0]")
    assert errors([mock("GET /a", "1", match={"headers": {"x": {"regex": "("}}})])[0].startswith(
        "routes[0].match.headers.x.regex: not a regular expression")
    assert errors([mock("$default", "1", match=same)])[0].startswith("routes[0].match: $default takes no conditions")
    warned = load_config(base_config(routes=[mock("GET /a", "1", match={"headers": {"x": "1"}}),
                                             mock("GET /a", "2", match={"query": {"q": "1"}}),
                                             mock("GET /a", "3", match={"headers": {"x": "2"}})])).warnings
    assert len(warned) == 2 and all("a request can satisfy both" in w for w in warned)


def test_a_conditional_route_without_the_keys_authorizer_is_warned_about(tmp_path):
    from hs256 import authorizer

    cfg = base_config(routes=[mock("GET /a", "guarded", auth="users"),
                              mock("GET /a", "open", match={"headers": {"x-debug": "1"}})])
    cfg["authorizers"] = authorizer(tmp_path)
    warned = load_config(cfg).warnings
    assert any("routes[1].match: this route's authorizer (none) differs from routes[0]'s (users)" in w
               for w in warned)
