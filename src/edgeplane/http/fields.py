"""The one choke point for header fields the gateway writes toward an upstream.

Owns `check_field` and `field_line`. Every header name and value the gateway itself
puts into a request it sends (forwarded JWT claims, a custom authorizer's context,
WebSocket API context headers, a plugin's headers, and later mapped parameters and
stage variables) passes here. Headers relayed from the client are not re-checked:
the request parser already refused control characters in them, and X-Forwarded-*,
the request id and the path are built from parsed, validated or normalised parts.

The rule is refusal, not repair: a value with CR, LF, NUL or another control character
(anything below 0x20 except HTAB, and DEL) cannot be written, so no value can end a
header line, add a header or start a second request upstream. Encoding it instead
(percent-encoding, say) would hand the upstream a value it never expects and
silently change what an identity claims; refusing makes the fault visible. The
caller answers: a value taken from the client's own credentials (a JWT claim) is the
client's 400; one from the gateway's side (an authorizer's context, a plugin) is a 500.

Invariants:
- a name is an RFC 9110 token; a value has no control character but HTAB, and at most
  `MAX_VALUE_BYTES` bytes (8 KiB, like the common upstream limit on one header line);
- obs-text (bytes 0x80-0xFF, UTF-8 of a non-ASCII display name) is allowed.
"""

from __future__ import annotations

import re

MAX_VALUE_BYTES = 8 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class UnsafeField(ValueError):
    """A header name or value that must not be written upstream; says which and why."""


def check_field(name: bytes, value: bytes) -> None:
    """Raise UnsafeField unless `name: value` is safe to write as one header line."""
    if _TOKEN.fullmatch(name) is None:
        raise UnsafeField(f"invalid header name {name.decode('latin-1')!r}")
    if _CONTROL.search(value) is not None:
        raise UnsafeField(f"header {name.decode('latin-1')!r}: value contains control characters")
    if len(value) > MAX_VALUE_BYTES:
        raise UnsafeField(f"header {name.decode('latin-1')!r}: value longer than {MAX_VALUE_BYTES} bytes")


def field_line(name: bytes, value: bytes) -> bytes:
    """`name: value` CRLF, after `check_field`."""
    check_field(name, value)
    return b"%b: %b\r\n" % (name, value)
