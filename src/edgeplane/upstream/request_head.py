"""The request head an `http` integration sends upstream (RFC 9110 7.6).

Owns its construction: the path from the integration's template (`compile_path_template`)
and the query, Host rewritten unless `preserve_host`, hop-by-hop headers removed
(Connection and every header it names, Keep-Alive, TE, Trailer, Transfer-Encoding,
Upgrade, Proxy-*), the authorizer's claim headers in place of any client-sent ones (each
checked at the choke point, `http.fields.check_field`), X-Forwarded-For/-Proto/-Host
appended, the request id and the trace context, and the framing of the body; and, the
other way, the client's response head lines from an upstream's (`response_lines`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeplane.http.codec import header_tokens
from edgeplane.http.fields import check_field

if TYPE_CHECKING:
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.upstream.pool import TargetPool

# Hop-by-hop headers (RFC 9110 7.6.1) plus what the proxy sets itself.
_REQUEST_SKIP = frozenset((
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
    b"host", b"content-length", b"expect", b"x-request-id",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
))
# With tracing on, the gateway writes the `traceparent` (its own span as the parent).
# `tracestate` goes on only with a continued trace (W3C: not with a new one).
_REQUEST_SKIP_TRACED = _REQUEST_SKIP | {b"traceparent", b"tracestate"}


def compile_path_template(template: str | None) -> tuple[tuple[bool, Any], ...] | None:
    """"/v2/{proxy}" -> ((False, b"/v2/"), (True, "proxy")): literal bytes or a param."""
    if template is None:
        return None
    parts: list[tuple[bool, Any]] = []
    rest = template
    while rest:
        start = rest.find("{")
        if start < 0:
            parts.append((False, rest.encode()))
            break
        end = rest.index("}", start)
        if start:
            parts.append((False, rest[:start].encode()))
        parts.append((True, rest[start + 1 : end].rstrip("+")))
        rest = rest[end + 1 :]
    return tuple(parts)


def build_head(template: tuple[tuple[bool, Any], ...] | None, preserve_host: bool, claim_headers: frozenset[bytes],
               proto: HttpProtocol, req: Request, pool: TargetPool, trace: list[bytes] | None = None) -> bytes:
    """The upstream head: end-to-end headers, forwarding ones, request id, traceparent."""
    if template is None:
        path = req.path
    else:
        params: dict[str, bytes] = req.params  # type: ignore[assignment]  # set: the route has the template's params
        path = b"".join([params[v] if is_param else v for is_param, v in template])
    if req.query:
        path = path + b"?" + req.query
    lines = [req.method, b" ", path, b" HTTP/1.1\r\nhost: "]
    host = req.host if preserve_host and req.host else pool.authority
    lines.append(host)
    lines.append(b"\r\n")
    first_header = len(lines)
    xff = xfp = xfh = None
    skip = _REQUEST_SKIP if trace is None else _REQUEST_SKIP_TRACED
    connection_named = False
    for name, value in req.headers:
        if name in skip:
            if name == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
            elif name == b"x-forwarded-proto":
                xfp = value if xfp is None else xfp + b", " + value
            elif name == b"x-forwarded-host":
                xfh = value if xfh is None else xfh + b", " + value
            elif name == b"connection":
                connection_named = True
            continue
        if name[0] == 112 and name.startswith(b"proxy-"):  # 112 = "p"
            continue
        lines += (name, b": ", value, b"\r\n")
    if connection_named:
        lines = drop_named(lines, first_header, frozenset(header_tokens(req.headers, b"connection")))
    if claim_headers:
        # Claims forwarded by the authorizer replace any client-sent header of that name.
        lines = drop_named(lines, first_header, claim_headers)
        for name, value in req.extra_upstream or ():
            check_field(name, value)  # the choke point (also checked when they were set)
            lines += (name, b": ", value, b"\r\n")
    peer = proto.peer_ip.encode()
    lines += (b"x-forwarded-for: ", peer if xff is None else xff + b", " + peer, b"\r\n")
    scheme = proto.scheme
    lines += (b"x-forwarded-proto: ", scheme if xfp is None else xfp + b", " + scheme, b"\r\n")
    if req.host:
        lines += (b"x-forwarded-host: ", req.host if xfh is None else xfh + b", " + req.host, b"\r\n")
    lines += (b"x-request-id: ", req.request_id, b"\r\n")
    if trace is not None:
        lines += trace
    if req.chunked:
        lines.append(b"transfer-encoding: chunked\r\n\r\n")
    elif req.content_length is not None:
        lines += (b"content-length: ", b"%d" % req.content_length, b"\r\n\r\n")
    else:
        lines.append(b"\r\n")
    return b"".join(lines)


def drop_named(lines: list[bytes], start: int, names: frozenset[bytes]) -> list[bytes]:
    """Remove the header lines (name, ": ", value, CRLF quadruples from `start`) whose
    lower-cased name is in `names` (headers named by Connection, or set by the gateway)."""
    out = lines[:start]
    for i in range(start, len(lines), 4):
        if lines[i].lower() not in names:
            out += lines[i : i + 4]
    return out


def response_lines(line: bytes, headers: list[tuple[bytes, bytes]],
                   skip: frozenset[bytes]) -> tuple[list[bytes], bytes | None, bool]:
    """The client's response head from an upstream's headers, its framing left out: (the
    status line and end-to-end header lines, the upstream's Content-Length, whether it
    was chunked). Hop-by-hop headers, those the Connection header names, `Proxy-*` and
    the names in `skip` (the gateway's own on the route) are dropped."""
    parts = [line]
    content_length = None
    upstream_chunked = connection_named = False
    for name, value in headers:
        lname = name.lower()
        if lname in skip:
            if lname == b"content-length":
                content_length = value
            elif lname == b"transfer-encoding":
                upstream_chunked = True
            elif lname == b"connection":
                connection_named = True
            continue
        if lname[0] == 112 and lname.startswith(b"proxy-"):  # 112 = "p"
            continue
        parts += (name, b": ", value, b"\r\n")
    if connection_named:
        parts = drop_named(parts, 1, frozenset(header_tokens([(n.lower(), v) for n, v in headers], b"connection")))
    return parts, content_length, upstream_chunked
