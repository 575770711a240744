"""edgeplane: an asyncio-native API gateway data plane.

Embedding API: `Gateway` (build from a file path, a dict or a `Config`; `await start()`,
`await stop()`), `load_config`, `ConfigError`.
"""

__version__ = "0.1.0"

from edgeplane.config.loader import ConfigError, load_config  # noqa: E402
from edgeplane.runtime.gateway import Gateway  # noqa: E402

__all__ = ["Gateway", "ConfigError", "load_config", "__version__"]
