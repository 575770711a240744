"""The RFC 6455 opening handshake, as both WebSocket modes check it (section 4).

Owns: the client-side checks every handshake must pass before anything else happens
(`client_handshake_error`: `Sec-WebSocket-Version` 13, else 426 with
`Sec-WebSocket-Version: 13`; a `Sec-WebSocket-Key` of 16 base64-encoded bytes, else 400),
and the `Sec-WebSocket-Accept` value (`accept_key`). Header lookups are `codec`'s
(lower-case names, as the server stores request headers). Proxy mode (`ws_proxy`) and WebSocket
APIs (`ws_api`) decide what to do with the answers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from edgeplane.http.codec import header_value

__all__ = ["GUID", "accept_key", "client_handshake_error"]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def client_handshake_error(headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | None:
    """(status, reason) when the client's opening handshake is unacceptable, else None."""
    if header_value(headers, b"sec-websocket-version") != b"13":
        return 426, "unsupported Sec-WebSocket-Version (13 is required)"
    key = header_value(headers, b"sec-websocket-key")
    try:
        ok = key is not None and len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        return 400, "invalid Sec-WebSocket-Key"
    return None
