"""Sans-IO: the Lambda proxy event a handler receives, and its answer read back, as
Amazon API Gateway HTTP APIs build and read them (payload format 2.0 and 1.0).

Owns `build_event` (from a `Request` and its body), `LambdaContext` (the handler's
second argument) and `read_response` (a handler's return value to status, header lines
and body, or `Malformed`).

Invariants:
- 2.0: repeated headers and query parameters are comma-joined; the Cookie header goes to
  `cookies` (one item per cookie) and not to `headers`; absent parts (`cookies`,
  `queryStringParameters`, `pathParameters`, `stageVariables`, `body`) are left out.
- 1.0: single-value maps hold the last value, `multiValue*` maps every value; absent
  maps are null.
- A body is text when it is UTF-8 and its content type is textual, else base64 with
  `isBase64Encoded: true`.
- Every header a handler returns passes the gateway's choke point (`fields.check_field`):
  a control character makes the answer `Malformed` (502), never a second header.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import orjson

from edgeplane.http.fields import UnsafeField, check_field

if TYPE_CHECKING:
    from edgeplane.http.request import Request

ACCOUNT_ID = "000000000000"  # no AWS account here; AWS's placeholder shape
API_ID = "edgeplane"
_TEXT_TYPES = (b"text/", b"application/json", b"application/javascript", b"application/xml",
               b"application/x-www-form-urlencoded", b"application/graphql")


class Malformed(Exception):
    """The handler's answer is not a response API Gateway would accept (502)."""


class LambdaContext:
    """The second argument of a handler: what a Lambda's context offers that has a
    meaning here."""

    def __init__(self, function_name: str, request_id: str, deadline: float) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:local:{ACCOUNT_ID}:function:{function_name}"
        self.memory_limit_in_mb = "128"
        self.aws_request_id = request_id
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "edgeplane"
        self._deadline = deadline  # time.monotonic() when the integration times out

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def _textual(req: Request) -> bool:
    for name, value in req.headers:
        if name == b"content-type":
            ctype = value.lower().split(b";")[0].strip()
            return ctype.startswith(_TEXT_TYPES) or ctype.endswith((b"+json", b"+xml"))
    return True


def _body(req: Request, body: bytes) -> tuple[str | None, bool]:
    if not body:
        return None, False
    if _textual(req):
        try:
            return body.decode("utf-8"), False
        except UnicodeDecodeError:
            pass
    return base64.b64encode(body).decode("ascii"), True


def _query(raw: bytes) -> list[tuple[str, str]]:
    out = []
    for part in raw.decode("latin-1").split("&"):
        if part:
            k, _, v = part.partition("=")
            out.append((unquote_plus(k), unquote_plus(v)))
    return out


def _authorizer(req: Request, v2: bool) -> dict[str, Any] | None:
    if req.claims is not None:
        claims = dict(getattr(req.claims, "claims", req.claims))
        scopes = list(getattr(req.claims, "scopes", ()) or ())
        if v2:
            return {"jwt": {"claims": claims, "scopes": scopes or None}}
        return {"claims": claims, "scopes": scopes or None}
    if req.auth_context is not None:
        return {"lambda": dict(req.auth_context)} if v2 else dict(req.auth_context)
    if req.api_key is not None:
        return {"apiKey": {"id": req.api_key.id, "plan": req.api_key.plan}}
    return None


def _domain(host: bytes | None) -> str:
    """The Host header without its port (an IPv6 literal keeps its brackets' content)."""
    text = (host or b"").decode("latin-1")
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text[1:]
    return text.split(":")[0]


def build_event(req: Request, body: bytes, *, version: str, source_ip: str,
                stage_variables: dict[str, str] | None) -> dict[str, Any]:
    """The event of payload format `version` ("2.0" or "1.0") for `req`."""
    headers: dict[str, list[str]] = {}
    cookies: list[str] = []
    for name, value in req.headers:
        text = value.decode("latin-1")
        if name == b"cookie" and version == "2.0":
            cookies += [c.strip() for c in text.split(";") if c.strip()]
            continue
        headers.setdefault(name.decode("latin-1"), []).append(text)
    query = _query(req.query)
    params = {k: v.decode("utf-8", "replace") for k, v in (req.params or {}).items()} or None
    body_text, is_b64 = _body(req, body)
    # as sent (AWS's rawPath is not normalised); an absolute-form target: the routed path
    sent = req.target.split(b"?", 1)[0]
    raw_path = (sent if sent.startswith(b"/") else (req.base_path or req.path)).decode("latin-1")
    method = req.method.decode("latin-1")
    user_agent = ", ".join(headers.get("user-agent", [])) or ""
    now = time.time()
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))
    domain = _domain(req.host)
    request_id = req.request_id.decode("latin-1")
    authorizer = _authorizer(req, version == "2.0")
    protocol = f"HTTP/{req.version}"
    if version == "2.0":
        joined: dict[str, list[str]] = {}
        for k, v in query:
            joined.setdefault(k, []).append(v)
        event: dict[str, Any] = {
            "version": "2.0", "routeKey": req.route_key, "rawPath": raw_path,
            "rawQueryString": req.query.decode("latin-1"),
            "headers": {k: ",".join(v) for k, v in headers.items()},
        }
        if cookies:
            event["cookies"] = cookies
        if joined:
            event["queryStringParameters"] = {k: ",".join(v) for k, v in joined.items()}
        context: dict[str, Any] = {
            "accountId": ACCOUNT_ID, "apiId": API_ID, "domainName": domain,
            "domainPrefix": domain.split(".")[0],
            "http": {"method": method, "path": raw_path, "protocol": protocol, "sourceIp": source_ip,
                     "userAgent": user_agent},
            "requestId": request_id, "routeKey": req.route_key, "stage": req.stage,
            "time": stamp, "timeEpoch": int(now * 1000),
        }
        if authorizer is not None:
            context["authorizer"] = authorizer
        event["requestContext"] = context
        if params:
            event["pathParameters"] = params
        if stage_variables:
            event["stageVariables"] = stage_variables
        if body_text is not None:
            event["body"] = body_text
        event["isBase64Encoded"] = is_b64
        return event
    multi_query: dict[str, list[str]] = {}
    for k, v in query:
        multi_query.setdefault(k, []).append(v)
    resource = req.route_key.split(" ", 1)[1] if " " in req.route_key else req.route_key
    return {
        "version": "1.0", "resource": resource, "path": raw_path, "httpMethod": method,
        "headers": {k: v[-1] for k, v in headers.items()}, "multiValueHeaders": headers,
        "queryStringParameters": {k: v[-1] for k, v in multi_query.items()} or None,
        "multiValueQueryStringParameters": multi_query or None,
        "requestContext": {
            "accountId": ACCOUNT_ID, "apiId": API_ID, "authorizer": authorizer, "domainName": domain,
            "domainPrefix": domain.split(".")[0], "extendedRequestId": request_id, "httpMethod": method,
            "identity": {"sourceIp": source_ip, "userAgent": user_agent}, "path": raw_path,
            "protocol": protocol, "requestId": request_id, "requestTime": stamp,
            "requestTimeEpoch": int(now * 1000), "resourceId": req.route_key, "resourcePath": resource,
            "stage": req.stage,
        },
        "pathParameters": params, "stageVariables": stage_variables or None,
        "body": body_text, "isBase64Encoded": is_b64,
    }


def _header_line(name: Any, value: Any) -> bytes:
    if not isinstance(name, str) or isinstance(value, (dict, list)) or value is None:
        raise Malformed(f"header {name!r}: names are strings and values strings or numbers")
    raw_name = name.lower().encode("latin-1", "replace")
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    raw_value = text.encode("utf-8")
    try:
        check_field(raw_name, raw_value)
    except UnsafeField as exc:
        raise Malformed(f"header {name!r}: {exc}") from None
    return raw_name + b": " + raw_value + b"\r\n"


_MANAGED = frozenset((b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"upgrade",
                      b"x-request-id", b"te", b"trailer", b"date", b"server"))


def read_response(result: Any, version: str) -> tuple[int, bytes, bytes, bytes]:
    """(status, content type, other header lines, body) of a handler's return value;
    raises `Malformed`."""
    if version == "2.0" and not (isinstance(result, dict) and "statusCode" in result):
        try:  # any other JSON value: a 200 JSON response of it (AWS's inference)
            return 200, b"application/json", b"", orjson.dumps(result)
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise Malformed(f"the return value is not JSON: {exc}") from None
    if not isinstance(result, dict):
        raise Malformed(f"payload 1.0 needs a dict with statusCode, got {type(result).__name__}")
    status = result.get("statusCode")
    if isinstance(status, str) and status.isascii() and status.isdigit():
        status = int(status)
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise Malformed(f"statusCode {status!r} is not a final HTTP status (200..599)")
    body = result.get("body")
    if body is None:
        raw = b""
    elif not isinstance(body, str):
        raise Malformed(f"body must be a string, got {type(body).__name__}")
    elif result.get("isBase64Encoded") is True:
        try:
            raw = base64.b64decode(body, validate=True)
        except ValueError:
            raise Malformed("isBase64Encoded, but the body is not base64") from None
    else:
        raw = body.encode("utf-8")
    lines: list[bytes] = []
    headers = result.get("headers") or {}
    if not isinstance(headers, dict):
        raise Malformed("headers must be a mapping")
    pairs = list(headers.items())
    multi = result.get("multiValueHeaders") if version == "1.0" else None
    if isinstance(multi, dict):
        pairs += [(k, v) for k, values in multi.items() for v in (values if isinstance(values, list) else [values])]
    cookies = result.get("cookies") if version == "2.0" else None
    if isinstance(cookies, list):
        pairs += [("set-cookie", c) for c in cookies]
    content_type = b"application/json"
    for name, value in pairs:
        line = _header_line(name, value)
        key = line.split(b":", 1)[0]
        if key == b"content-type":
            content_type = line[len(b"content-type: "):-2]
        elif key not in _MANAGED:
            lines.append(line)
    return status, content_type, b"".join(lines), raw
