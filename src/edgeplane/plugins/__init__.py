"""The public extension API: write a policy or an integration as a plugin.

- `api`: the stage contract a plugin author codes against: `Phase`, `RequestView`,
  `ResponseView`, `LocalReply`, `RouteStage`, `PluginError`.
- `base`: what a unit declares: `Policy`, `Integration`, and the contexts their steps
  receive (`CompileContext`, `RuntimeContext`).
- `registry`: discovery through entry points (`edgeplane.policies`,
  `edgeplane.integrations`), `plugins:` modules in a config, or objects an embedder passes.
- `hooks`: running public stages and hooks inside the server (adapters, error handling).

May import: `http.fields` (the header choke point), otherwise `http` and `config.model`
for types only. Imported by `config`, `routing`, the policy units and `runtime`.
"""

from edgeplane.plugins.api import (
                                   FastStage,
                                   LocalReply,
                                   LogHook,
                                   Phase,
                                   PluginError,
                                   RequestHook,
                                   RequestView,
                                   ResponseHook,
                                   ResponseView,
                                   RouteStage,
)
from edgeplane.plugins.base import CompileContext, Integration, Policy, RuntimeContext

__all__ = [
    "Phase", "Policy", "Integration", "LocalReply", "RequestView", "ResponseView", "RouteStage",
    "RequestHook", "ResponseHook", "LogHook", "PluginError", "CompileContext", "RuntimeContext",
    "FastStage",
]
