"""Integration units: what answers a route once its policies let the request through.

- `http`: proxy to an upstream (the engine is `upstream.proxy`).
- `mock`: a fixed response from the gateway.

Each registers through the `edgeplane.integrations` entry-point group, as a user's does.
"""
