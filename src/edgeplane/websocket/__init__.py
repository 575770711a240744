"""WebSockets: frame-aware proxying and AWS-model WebSocket APIs.

- `handshake`: RFC 6455 opening-handshake checks shared by both modes.
- `relay`: the frame-by-frame relay between a client and an upstream WebSocket.
- `relay_leg`: one leg of a relay (its wsproto connection, frame pump, flow control).
- `proxy`: WebSocket handshakes on http routes (`WsUpgradeExchange`).
- `api`: WebSocket APIs (`websocket_apis`): $connect, route selection, events.
- `connections`: a terminated WebSocket connection and the per-worker registry.
- `bus`: Redis pub/sub carrier for @connections across hosts.

May import: `http`, `upstream`, `routing`, `config`, `policies` (buckets, IP rules).
"""
