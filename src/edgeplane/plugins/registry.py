"""The plugin registry: which policies and integrations exist, found in one place.

Discovery, the same for built-ins and third parties:

1. entry points: group `edgeplane.policies` (each entry a `Policy` instance or class)
   and group `edgeplane.integrations` (an `Integration`); edgeplane's own units are
   declared in its pyproject.toml exactly like a user package's;
2. `plugins: ["my_pkg.my_policy"]` in a config: each module is imported and must define
   `plugin` (one unit) or `plugins` (a list);
3. `Gateway(config, plugins=[...])` / `load_config(..., plugins=[...])`: objects given
   by an embedder.

Invariants:
- names are unique: two units claiming the same policy name, config key, route key,
  authorizer type or integration type are refused with a `PluginError` naming both;
- `policies()` is ordered by (phase, order, name): the order of every route's chain;
- a registry is immutable once built; `extended(...)` returns a new one (cached by the
  tuple of module names for config-file plugins).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

from edgeplane.plugins.api import Phase, PluginError
from edgeplane.plugins.base import Integration, Policy

__all__ = ["Registry", "default_registry", "registry_for"]

POLICY_GROUP = "edgeplane.policies"
INTEGRATION_GROUP = "edgeplane.integrations"

# Used only when edgeplane's own distribution metadata is missing (a source tree on
# sys.path without `pip install`): the same objects its entry points name.
_BUILTIN_POLICIES = (
    "edgeplane.policies.ip_rules.plugin:plugin",
    "edgeplane.policies.cors.plugin:plugin",
    "edgeplane.policies.jwt.plugin:plugin",
    "edgeplane.policies.api_keys.plugin:plugin",
    "edgeplane.policies.http_authorizer.plugin:plugin",
    "edgeplane.policies.throttle.plugin:plugin",
    "edgeplane.policies.quota.plugin:plugin",
    "edgeplane.policies.cache.plugin:plugin",
    "edgeplane.integrations.function.plugin:pool_plugin",
    "edgeplane.integrations.asgi.plugin:lifespans_plugin",
    "edgeplane.policies.gateway_responses.plugin:plugin",
    "edgeplane.policies.mapping.plugin:request_plugin",
    "edgeplane.policies.mapping.plugin:response_plugin",
    "edgeplane.policies.validation.plugin:plugin",
    "edgeplane.policies.route_match.plugin:plugin",
    "edgeplane.policies.function_authorizer.plugin:plugin",
)
_BUILTIN_INTEGRATIONS = (
    "edgeplane.integrations.http:plugin",
    "edgeplane.integrations.mock:plugin",
    "edgeplane.integrations.function.plugin:plugin",
    "edgeplane.integrations.asgi.plugin:plugin",
)


def _instance(obj: Any, where: str) -> Any:
    if inspect.isclass(obj):
        obj = obj()
    if not isinstance(obj, (Policy, Integration)):
        raise PluginError(f"{where}: expected an edgeplane.plugins.Policy or Integration, "
                          f"got {type(obj).__name__}")
    return obj


def _load_ref(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return _instance(obj, ref)


class Registry:
    """An immutable set of policy and integration units."""

    __slots__ = ("_policies", "_integrations", "_sections", "_route_keys", "_authorizers", "modules", "cache")

    def __init__(self, units: Iterable[Any], modules: tuple[str, ...] = ()) -> None:
        self.modules = modules  # config-file plugin modules this registry includes
        self.cache: dict[str, Any] = {}  # what is derived from the units (the schema validator)
        policies: dict[str, Policy] = {}
        integrations: dict[str, Integration] = {}
        self._sections: dict[str, Policy] = {}
        self._route_keys: dict[str, Policy] = {}
        self._authorizers: dict[str, Policy] = {}
        for unit in units:
            if isinstance(unit, Integration):
                self._claim(integrations, unit.type, unit, "integration type")
                continue
            if not unit.name:
                raise PluginError(f"{type(unit).__name__}: a policy needs a `name`")
            if not isinstance(unit.phase, Phase):
                raise PluginError(f"policy {unit.name!r}: `phase` must be an edgeplane.plugins.Phase")
            self._claim(policies, unit.name, unit, "policy name")
            for key in unit.sections:
                self._claim(self._sections, key, unit, "config key")
            for key in unit.route_keys:
                self._claim(self._route_keys, key, unit, "route key")
            if unit.authorizer_type:
                self._claim(self._authorizers, unit.authorizer_type, unit, "authorizer type")
        self._policies = tuple(sorted(policies.values(), key=lambda p: (p.phase, p.order, p.name)))
        self._integrations = integrations

    @staticmethod
    def _claim(table: dict[str, Any], key: str, unit: Any, what: str) -> None:
        other = table.get(key)
        if other is not None and other is not unit:
            raise PluginError(f"{what} {key!r} is claimed by both {_describe(other)} and {_describe(unit)}")
        table[key] = unit

    # -- lookups -------------------------------------------------------------------
    def policies(self) -> tuple[Policy, ...]:
        return self._policies

    def policy(self, name: str) -> Policy | None:
        return next((p for p in self._policies if p.name == name), None)

    def integrations(self) -> Mapping[str, Integration]:
        return MappingProxyType(self._integrations)

    def section_owners(self) -> Mapping[str, Policy]:
        return MappingProxyType(self._sections)

    def route_key_owners(self) -> Mapping[str, Policy]:
        return MappingProxyType(self._route_keys)

    def authorizer_types(self) -> Mapping[str, Policy]:
        return MappingProxyType(self._authorizers)

    def extended(self, units: Sequence[Any], modules: tuple[str, ...] = ()) -> Registry:
        return Registry([*self._policies, *self._integrations.values(), *units], self.modules + modules)


def _describe(unit: Any) -> str:
    return f"{type(unit).__module__}.{type(unit).__name__}"


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    """Every unit installed through entry points (edgeplane's own included)."""
    units: list[Any] = []
    found_own = False
    for group in (POLICY_GROUP, INTEGRATION_GROUP):
        for ep in entry_points(group=group):
            units.append(_instance(ep.load(), f"entry point {ep.name} = {ep.value}"))
            found_own |= ep.value.startswith("edgeplane.")
    if not found_own:
        units += [_load_ref(ref) for ref in (*_BUILTIN_POLICIES, *_BUILTIN_INTEGRATIONS)]
    return Registry(units)


def load_module_plugins(module_name: str) -> list[Any]:
    """The units a `plugins:` module defines (`plugin` or `plugins`). Raises PluginError
    (or ImportError) with the reason."""
    module = importlib.import_module(module_name)
    if hasattr(module, "plugins"):
        found = list(module.plugins)
    elif hasattr(module, "plugin"):
        found = [module.plugin]
    else:
        raise PluginError(f"module {module_name!r} defines neither `plugin` nor `plugins`")
    return [_instance(obj, module_name) for obj in found]


@lru_cache(maxsize=64)
def _with_modules(modules: tuple[str, ...]) -> Registry:
    units: list[Any] = []
    for name in modules:
        units += load_module_plugins(name)
    return default_registry().extended(units, modules)


def registry_for(modules: Sequence[str] = (), extra: Sequence[Any] = ()) -> Registry:
    """The default registry plus config-file plugin modules and embedder objects."""
    base = _with_modules(tuple(modules)) if modules else default_registry()
    return base.extended(list(extra)) if extra else base
