"""Policy units: each subpackage is one policy, as a plugin.

A unit holds its config model, its schema fragment, its semantic checks, its compile
step and its runtime stage (`plugin.py`), beside the sans-IO core it wraps.

- `ip_rules`: client IP (trusted proxies) and allow/deny rules.
- `cors`: preflights and CORS response headers.
- `jwt`: JWT authorizer, JWKS parsing and JWKS URL sources.
- `api_keys`: API-key authorizer and the key file (`edgeplane keys`).
- `http_authorizer`: custom (Lambda-style REQUEST) authorizers.
- `throttle`: token buckets and their stores (in process, shared memory, Redis).
- `quota`: usage plans' quotas and their counters (SQLite or Redis).

May import: `http`, `config`, `plugins`, `upstream` (for outbound calls). A policy
never imports `routing` or `runtime`.
"""
