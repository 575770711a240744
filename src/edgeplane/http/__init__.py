"""The downstream side: one client connection speaking HTTP/1.1.

- `protocol`: `HttpProtocol`, the asyncio.Protocol per client connection (input,
  limits, pipelining, dispatch to the route chain).
- `replies`: its output half: local replies, finishing a response, internal errors as
  500, lingering close and the connection timer.
- `request`: `Request`, per-request state, and the header lookups stages use.
- `codec`: httptools (fast) or h11 (pure Python) behind one parser interface.
- `responses`: status lines, local replies, AWS-style error bodies, the Date header.
- `context`: `ServerContext`, per-worker state every connection reads.
- `tls`: listener TLS (SNI, mTLS) and the certificate helpers.

May import: `config.model` (types only) and `plugins.hooks` (response and log hooks).
Never imports routing, policies, upstream, websocket or runtime: they build on this
package, not the other way round.
"""
