"""The upstream side: pooled keep-alive connections and the http integration.

- `pool`: per-target connection pools (caps, idle, wait queue, telemetry).
- `client`: a small one-shot HTTP client over the pool (authorizers, JWKS, events).
- `proxy`: `HttpIntegration`/`ProxyExchange`, streaming a request to a target and back.

May import: `http` and `config.model`. Never imports policies, websocket or runtime.
"""
