"""Access-log formats: `$context.*` variables compiled, at load, into one render function.

Owns the variable table (`VARIABLES`: AWS's `$context` names, each an expression over
the request `r`, the connection `p` and the access log `a`) and `compile_format`,
which turns an `access_log.format` into a function `render(r, p, a, now) -> bytes`:

- a **mapping** (`{requestId: $context.requestId, status: $context.status}`): a JSON
  object whose values are typed (numbers as numbers, absent values as `null`);
- a **string starting with `{`**: AWS's JSON template. A variable inside a JSON string
  is substituted escaped (`-` when absent, as AWS writes it); outside one, it becomes
  a JSON value. The result must be valid JSON, checked at load;
- any other **string**: one line (CLF and the like); absent values are `-`.

Invariants:
- The template is split once into literal bytes and variables; the render function is
  generated Python: one check for escaping over the text values, one `%` format, and
  values with few distinct values (route key, upstream, error messages) looked up
  already escaped (`_Memo`), so the default line costs about 1.3 µs.
- No value can break the line: JSON strings are JSON-escaped; in a plain line, control
  characters, `"`, `\\` and non-ASCII bytes are written as `\\xHH` (as nginx does).
- An unknown variable is a `FormatError` naming it and its place in the format, which
  the loader turns into a located config error.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import orjson

from edgeplane.http.request import header

Render = Callable[[Any, Any, Any, float], bytes]


class FormatError(ValueError):
    """An access-log format that cannot be compiled; `where` is the key or offset."""

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.where = where


@dataclass(frozen=True, slots=True)
class Variable:
    expr: str  # Python over r (Request), p (HttpProtocol), a (AccessLog), now (perf_counter)
    # What `expr` gives: "b" bytes, "s" str, "bn"/"sn" the same or None, "any" any value or
    # None (JSON-encoded unless a str), "i" int (or a float, written truncated as int() does),
    # "in" int or None, "f" float (ms), "fn" float (ms) or None, "raw" bytes written as they
    # are, "safe" bytes that never need escaping (a text value all the same), "proto" an
    # HTTP version (str) written as `HTTP/<version>`.
    kind: str
    doc: str
    # "few": `expr` takes few distinct values (from the config or the gateway's own
    # messages), each escaped and quoted once and then looked up (`_Memo`) instead of on
    # every line; "rare": the same, and absent (None) from most lines, which is tested first.
    memo: str = ""


def _v(expr: str, kind: str, doc: str, memo: str = "") -> Variable:
    return Variable(expr, kind, doc, memo)


VARIABLES: dict[str, Variable] = {
    "requestId": _v("r.request_id", "b", "The request id: the client's `x-request-id`, or a new one."),
    "extendedRequestId": _v("r.request_id", "b", "The same id: edgeplane has one id per request."),
    "identity.sourceIp": _v("p.peer_ip", "s", "The address of the TCP peer."),
    "identity.clientIp": _v("(r.client_ip or p.peer_ip)", "s",
                            "The client behind `trusted_proxies` (else the TCP peer)."),
    "identity.userAgent": _v("_header(r, b'user-agent')", "bn", "The `User-Agent` header."),
    "identity.clientCert.subjectDN": _v("p.client_cert_subject", "sn",
                                        "mTLS: the client certificate's subject (RFC 4514).", memo="rare"),
    "httpMethod": _v("r.method", "b", "GET, POST, ..."),
    "path": _v("(r.base_path or r.path)", "b",
                "The request path as the client sent it (normalised), the stage's base path included."),
    "resourcePath": _v("r.path", "b", "The path the routes saw: without the stage's base path."),
    "routeKey": _v("r.route_key", "s", "The matched route key (`-` when none).", memo="few"),
    "protocol": _v("r.version", "proto", "HTTP/1.1 or HTTP/1.0.", memo="few"),
    "status": _v("r.status", "i", "The response status sent to the client."),
    "responseLength": _v("r.response_length", "i", "Response body bytes sent."),
    "requestTime": _v("(a.clf_bytes if a.clf_from <= (_w := r.t_wall) < a.clf_until else a.clf_at(_w))", "safe",
                      "CLF time: `04/Dec/2026:20:25:22 +0000`."),
    "requestTimeEpoch": _v("r.t_wall * 1000", "i", "Epoch milliseconds of the request's arrival."),
    "responseLatency": _v("(now - r.t_start) * 1000", "f", "Milliseconds from the request head to the end."),
    "integrationLatency": _v("(_x * 1000 if (_x := r.integration_latency) is not None else None)", "fn",
                             "Milliseconds the integration took to answer its head (absent: none)."),
    "integrationStatus": _v("r.integration_status or None", "in", "The status the upstream answered."),
    "integrationErrorMessage": _v("r.integration_error", "sn", "Why the integration failed.", memo="rare"),
    "integration.attempts": _v("r.integration_attempts or None", "in",
                               "Tries of the integration: 1, or more after retries (absent: none)."),
    "authorizer.error": _v("r.auth_error", "sn", "Why an authorizer refused or failed.", memo="rare"),
    "authorizer.principalId": _v("_principal(r)", "sn",
                                 "Who the authorizer let in: JWT `sub`, API key id, or a custom "
                                 "authorizer's `principalId` context value."),
    "error.message": _v("r.error", "sn", "The gateway's reason for an answer it gave itself.", memo="rare"),
    "error.responseType": _v("_response_type(r)", "sn",
                             "AWS gateway response type: UNAUTHORIZED, ACCESS_DENIED, THROTTLED, ...", memo="rare"),
    "domainName": _v("r.host", "bn", "The `Host` the client asked for."),
    "stage": _v("r.stage", "s", "The stage that served the request (`$default` without `stages`).", memo="few"),
    "isCanaryRequest": _v("(b'true' if r.canary else b'false')", "raw",
                          "Whether the stage's canary served the request: true or false."),
    "traceId": _v("r.trace_id", "sn", "The W3C trace id (32 hex digits) when tracing is on."),
    "connectionId": _v("_ws(r, 1)", "sn", "WebSocket API: the connection id."),
    "eventType": _v("_event_type(r)", "sn", "WebSocket: CONNECT, MESSAGE or DISCONNECT."),
    "messageId": _v("_ws(r, 2)", "sn", "WebSocket API: the message id (MESSAGE lines)."),
    "upstream": _v("r.upstream", "sn", "The upstream target that served the request.", memo="few"),
}

# Families: `$context.authorizer.claims.NAME` (a JWT claim), `$context.authorizer.NAME` (a
# custom authorizer's context value) and `$context.NAME` declared by a plugin.
_CLAIM = "authorizer.claims."
_AUTH = "authorizer."
_VAR = re.compile(r"\$context\.([A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*)")
_PROTO = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
# AWS gateway response types by status, for answers the gateway gave itself.
AWS_ERROR_TYPES = {400: "BAD_REQUEST_BODY", 401: "UNAUTHORIZED", 403: "ACCESS_DENIED", 404: "RESOURCE_NOT_FOUND",
                   413: "REQUEST_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE", 429: "THROTTLED",
                   502: "INTEGRATION_FAILURE", 504: "INTEGRATION_TIMEOUT"}
# Printable ASCII without `"` and `\`: a value made only of these needs no escaping.
_SAFE = bytes(c for c in range(0x20, 0x7F) if c not in (0x22, 0x5C))
# `translate` by this table keeps the safe bytes and turns the others into NUL, so `0 in`
# finds any of them: cheaper than `translate(None, _SAFE)`, which makes a table each call.
_FLAG_UNSAFE = bytes(c if c in _SAFE else 0 for c in range(256))


def variable(name: str, plugin_names: Mapping[str, str]) -> Variable | None:
    """The variable `$context.<name>`, or None when it is unknown."""
    found = VARIABLES.get(name)
    if found is not None:
        return found
    if name.startswith(_CLAIM) and len(name) > len(_CLAIM):
        return _v(f"_claim(r, {name[len(_CLAIM):]!r})", "any", "")
    if name.startswith(_AUTH) and "." not in name[len(_AUTH):] and name[len(_AUTH):] != "claims":
        return _v(f"_auth(r, {name[len(_AUTH):]!r})", "any", "")
    if name in plugin_names:
        return _v(f"_plugin(r, {name!r})", "any", "")
    return None


# -- what the generated code calls ---------------------------------------------------------

def _proto(version: str) -> bytes:
    """`HTTP/<version>` of a version the gateway refused (0.9, 2.0: logged all the same)."""
    return b"HTTP/" + version.encode("ascii", "replace")


def _dumps(value: Any) -> bytes:
    """`value` as JSON; what orjson cannot write (nested deeper than 254 levels, an
    integer past 64 bits) becomes a JSON string of its `repr`, cut at 1,000 characters."""
    try:
        return orjson.dumps(value, default=repr)
    except (TypeError, orjson.JSONEncodeError):
        return orjson.dumps(repr(value)[:1000])


def _any(value: Any) -> bytes | None:
    """A claim, authorizer-context or plugin value as bytes (str as UTF-8, others as JSON)."""
    if value is None or value.__class__ is bytes:
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "replace")
    return _dumps(value)


def json_escape(raw: bytes | None) -> bytes | None:
    """`raw` for inside a JSON string: escaped, without the quotes."""
    if raw is None or not raw.translate(None, _SAFE):
        return raw
    return orjson.dumps(raw.decode("utf-8", "replace"))[1:-1]


def line_escape(raw: bytes | None) -> bytes | None:
    """`raw` for a plain line: anything but safe ASCII as `\\xHH`."""
    if raw is None or not raw.translate(None, _SAFE):
        return raw
    return b"".join(bytes((c,)) if c in _SAFE_SET else b"\\x%02X" % c for c in raw)


def json_value(value: Any) -> bytes:
    """`value` as a JSON value: `null` when absent; bytes as a string."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return _dumps(value)


_SAFE_SET = frozenset(_SAFE)


def _claim(r: Any, name: str) -> Any:
    return r.claims.get(name) if r.claims is not None else None


def _auth(r: Any, name: str) -> Any:
    return r.auth_context.get(name) if r.auth_context is not None else None


def _plugin(r: Any, name: str) -> Any:
    return r.context.get(name) if r.context is not None else None


def principal(r: Any) -> str | None:
    """Who the authorizer let in: the JWT's `sub`, the API key's id, or a custom
    authorizer's `principalId` context value."""
    if r.claims is not None:
        sub = r.claims.get("sub")
        return sub if isinstance(sub, str) else None
    if r.api_key is not None:
        return str(r.api_key.id)
    if r.auth_context is not None:
        found = r.auth_context.get("principalId")
        return None if found is None else str(found)
    return None


def _ws(r: Any, index: int) -> str | None:
    event = r.ws_event
    return None if event is None else event[index]


def _event_type(r: Any) -> str | None:
    if r.ws_event is not None:
        return str(r.ws_event[0])
    if r.websocket:
        return "CONNECT"  # a handshake answered without a connection (refused)
    return None


def _response_type(r: Any) -> str | None:
    """AWS's gateway response type of an answer the gateway gave itself, else None."""
    if r.error is None or r.status < 400:
        return None
    if r.auth_error is not None:
        return "AUTHORIZER_FAILURE" if r.status >= 500 else AWS_ERROR_TYPES.get(r.status, "DEFAULT_4XX")
    if r.status == 429 and r.error.startswith("quota "):
        return "QUOTA_EXCEEDED"
    found = AWS_ERROR_TYPES.get(r.status)
    if found is not None:
        return found
    return "DEFAULT_5XX" if r.status >= 500 else "DEFAULT_4XX"


_MEMO_MAX = 1024


class _Memo(dict[Any, bytes]):
    """The rendering of a `memo` variable (escaped, quoted, `null`...) by its value, made
    on first use. Emptied when it holds `_MEMO_MAX` values, so a variable whose values
    turn out not to be few (error messages with addresses in them) costs bounded memory
    and, at worst (each value new), the escaping a line without the memo does, plus an insert."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[Any], bytes]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key: Any) -> bytes:
        value = self.make(key)
        if len(self) >= _MEMO_MAX:
            self.clear()
        self[key] = value
        return value


_NAMESPACE = {
    "_header": header, "_claim": _claim, "_auth": _auth, "_plugin": _plugin, "_principal": principal,
    "_ws": _ws, "_event_type": _event_type, "_response_type": _response_type,
    "_PROTO": _PROTO, "_proto": _proto, "_any": _any, "_ej": json_escape, "_el": line_escape, "_jv": json_value,
    "_FLAG_UNSAFE": _FLAG_UNSAFE, "_Memo": _Memo,
}


# -- the compiler --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Slot:
    var: Variable
    context: str  # "jstr" (inside a JSON string), "jval" (a JSON value), "line"


_TEXT = {"b", "s", "bn", "sn", "any", "safe", "proto"}
_OPTIONAL = {"bn", "sn", "any"}
_RAW = {"b": "{e}", "s": "{e}.encode()", "bn": "{e}", "sn": "(_x.encode() if (_x := {e}) is not None else None)",
        "any": "_any({e})", "safe": "{e}", "proto": "(_PROTO.get({e}) or _proto({e}))"}


def _memo_source(run: list[bytes | _Slot], keyed: list[_Slot]) -> str:
    """Python rendering `run` (literal bytes and `memo` slots) from `_k`, the values of the
    slots in `keyed` (a tuple when more than one): escaped, quoted in a JSON value, `null`
    or `-` when absent, as the other slots are."""
    pieces = []
    for p in run:
        if isinstance(p, bytes):
            pieces.append(repr(p))
            continue
        at = [n for n, q in enumerate(keyed) if q is p]
        raw = _RAW[p.var.kind].format(e="None" if not at else "_k" if len(keyed) == 1 else f"_k[{at[0]}]")
        escaped = ("b'\"' + {} + b'\"'" if p.context == "jval" else "{}").format(
            f"{'_el' if p.context == 'line' else '_ej'}(_y)")
        pieces.append(f"({escaped} if (_y := {raw}) is not None else {b'null' if p.context == 'jval' else b'-'!r})")
    return pieces[0] if len(pieces) == 1 else f"b''.join(({', '.join(pieces)}))"


def _memo(defs: list[str], name: str, run: list[bytes | _Slot], keyed: list[_Slot]) -> str:
    """Defines (in `defs`) `name`, the memo of `run` by the values of `keyed` (a constant
    when none); the Python that looks it up."""
    if not keyed:
        defs.append(f"{name} = {_memo_source(run, [])}")
        return name
    defs.append(f"{name} = _Memo(lambda _k: {_memo_source(run, keyed)})")
    key = keyed[0].var.expr if len(keyed) == 1 else "(" + ", ".join(p.var.expr for p in keyed) + ",)"
    return f"{name}[{key}]"


def _memo_runs(parts: list[bytes | _Slot]) -> list[bytes | _Slot | list[bytes | _Slot]]:
    """`parts` with each run of `memo` slots (literal bytes between them at most) as one
    list: one look-up, keyed by their values together, renders the whole run."""
    out: list[bytes | _Slot | list[bytes | _Slot]] = []
    for part in parts:
        if not (isinstance(part, _Slot) and part.var.memo and part.var.kind in _TEXT):
            out.append(part)
            continue
        k = len(out)
        while k and isinstance(out[k - 1], bytes):
            k -= 1
        last = out[k - 1] if k else None
        if isinstance(last, list):  # the run goes on, with the literals since
            last += [*cast(list[bytes], out[k:]), part]
            del out[k:]
        else:
            out.append([part])
    return out


def _generate(parts: list[bytes | _Slot]) -> Render:
    """The render function of `parts` (literal bytes and variable slots).

    Text values are read once into locals, as bytes. The common case is one check over
    all of them together (`0 in b"".join(...).translate(_FLAG_UNSAFE)`) and one `%`
    format of the whole template, with numbers and the values that need no check
    computed inline in its argument tuple; only a line with a value that needs escaping
    escapes them one by one. Runs of `memo` variables are looked up already rendered
    (`_Memo`); a "safe" value (the CLF time) is never checked; the first `_SPECIALISE`
    optional numbers get a template each way (`%.3f` or `null`), not a `%` of their own."""
    defs: list[str] = []  # the memos
    body: list[str] = []
    items: list[tuple[bytes, str | None]] = []  # the template's pieces and their arguments
    optional_numbers: dict[int, tuple[str, bytes]] = {}  # item: its local, its text when absent
    checked: list[tuple[str, bool]] = []  # the text values' locals, and whether they may be None
    escapes: list[str] = []
    for part in _memo_runs(parts):
        if isinstance(part, bytes):
            items.append((part.replace(b"%", b"%%"), None))
            continue
        i = len(items)
        v = f"v{i}"
        if isinstance(part, list):  # a run of memos, looked up at once
            slots = [p for p in part if isinstance(p, _Slot)]
            rare = [p.var.expr + " is None" for p in slots if p.var.memo == "rare"]
            whole = _memo(defs, f"_m{i}", part, slots)
            if rare:  # absent most often: tested first, and the rest looked up without them
                few = [p for p in slots if p.var.memo != "rare"]
                whole = f"({_memo(defs, f'_m{i}r', part, few)} if {' and '.join(rare)} else {whole})"
            items.append((b"%b", whole))
            continue
        var, ctx = part.var, part.context
        absent = b"null" if ctx == "jval" else b"-"
        optional = var.kind in _OPTIONAL
        quoted = ctx == "jval" and var.kind in _TEXT and not optional
        if var.kind == "raw":  # bytes made by orjson (the default shape's optional tail)
            items.append((b"%b", var.expr))
        elif var.kind == "any" and ctx == "jval":  # typed: orjson's output needs no check
            items.append((b"%b", f"_jv({var.expr})"))
        elif var.kind == "safe":  # no check, no escape: read where it is written
            items.append((b'"%b"' if quoted else b"%b", var.expr))
        elif var.kind in _TEXT:
            body.append(f"{v} = {_RAW[var.kind].format(e=var.expr)}")
            checked.append((v, optional))
            escapes.append(f"{v} = {'_el' if ctx == 'line' else '_ej'}({v})")
            if ctx == "jval" and optional:
                items.append((b"%b", f"(b'\"' + {v} + b'\"' if {v} is not None else b'null')"))
            else:
                arg = v if not optional else f"({v} if {v} is not None else {absent!r})"
                items.append((b'"%b"' if quoted else b"%b", arg))
        elif var.kind in ("i", "f"):
            items.append((b"%d" if var.kind == "i" else b"%.3f", var.expr))
        else:  # "in", "fn": a number or absent
            fmt = b"%d" if var.kind == "in" else b"%.3f"
            if len(optional_numbers) < _SPECIALISE:
                body.append(f"{v} = {var.expr}")
                optional_numbers[i] = (v, absent)
                items.append((fmt, v))
            else:
                items.append((b"%b", f"({fmt!r} % {v} if ({v} := {var.expr}) is not None else {absent!r})"))
    lines = ["def render(r, p, a, now):", *(f"    {line}" for line in body)]
    if checked:
        every = [f"({v} or b'')" if optional else v for v, optional in checked]
        joined = every[0] if len(every) == 1 else f"b''.join(({', '.join(every)},))"
        always = [v for v, optional in checked if not optional]
        if 1 < len(always) < len(checked):  # the optional values all absent (most often): not listed
            none = " and ".join(f"{v} is None" for v, optional in checked if optional)
            joined = f"(b''.join(({', '.join(always)},)) if {none} else {joined})"
        lines.append(f"    if 0 in {joined}.translate(_FLAG_UNSAFE):")
        lines += [f"        {line}" for line in escapes]
    lines += _returns(items, optional_numbers, {}, "    ")
    namespace = dict(_NAMESPACE)
    exec(compile("\n".join([*defs, *lines]) + "\n", "<access_log.format>", "exec"), namespace)  # noqa: S102
    return cast(Render, namespace["render"])


_SPECIALISE = 2  # optional numbers with a template for each case: 2 ** 2 returns at most


def _returns(items: list[tuple[bytes, str | None]], optional: dict[int, tuple[str, bytes]],
             present: dict[int, bool], indent: str) -> list[str]:
    """The `return template % (...)` of each case of the optional numbers (`present`
    says which are decided so far: present, or absent written in the template)."""
    undecided = [i for i in optional if i not in present]
    if undecided:
        i = undecided[0]
        return [f"{indent}if {optional[i][0]} is not None:",
                *_returns(items, optional, {**present, i: True}, indent + "    "),
                *_returns(items, optional, {**present, i: False}, indent)]
    template = b"".join(optional[i][1] if present.get(i) is False else fmt for i, (fmt, _) in enumerate(items))
    args = "".join(arg + ", " for i, (_, arg) in enumerate(items) if arg is not None and present.get(i) is not False)
    return [f"{indent}return {template!r} % ({args})"]


def _split(template: str, plugin_names: Mapping[str, str], where: str | None) -> list[tuple[str, Variable | None]]:
    """`template` as (text, None) and (name, variable) pieces."""
    out: list[tuple[str, Variable | None]] = []
    unknown: list[str] = []
    pos = 0
    for m in _VAR.finditer(template):
        out.append((template[pos:m.start()], None))
        var = variable(m.group(1), plugin_names)
        if var is None:
            close = difflib.get_close_matches(m.group(1), [*VARIABLES, *plugin_names], n=1, cutoff=0.6)
            unknown.append(f"$context.{m.group(1)} (" + (f"at offset {m.start()}" if where is None else "")
                           + (", " if where is None and close else "")
                           + (f"did you mean $context.{close[0]}?" if close else "") + ")")
        out.append((m.group(1), var))
        pos = m.end()
    if unknown:
        raise FormatError(("unknown variable " if len(unknown) == 1 else "unknown variables ")
                          + ", ".join(u.replace(" ()", "") for u in unknown)
                          + "; the variables are listed in the README (Access log), with "
                          "$context.authorizer.claims.NAME, $context.authorizer.NAME and those of loaded plugins",
                          where)
    out.append((template[pos:], None))
    return out


# The default line: the JSON shape edgeplane has always written (see `runtime.accesslog`).
DEFAULT_FORMAT = {
    "requestId": "$context.requestId", "sourceIp": "$context.identity.sourceIp",
    "requestTime": "$context.requestTime", "requestTimeEpoch": "$context.requestTimeEpoch",
    "httpMethod": "$context.httpMethod", "routeKey": "$context.routeKey", "path": "$context.path",
    "protocol": "$context.protocol", "status": "$context.status", "responseLength": "$context.responseLength",
    "responseLatency": "$context.responseLatency", "integrationLatency": "$context.integrationLatency",
    "integrationError": "$context.integrationErrorMessage", "upstream": "$context.upstream",
    "error": "$context.error.message", "clientCertSubject": "$context.identity.clientCert.subjectDN",
}
_DEFAULT_TAIL = {  # after the mapping: null when absent, then the optional objects
    "clientIp": Variable("r.client_ip", "sn", ""),
    "authorizerPrincipal": Variable("(_principal(r) if r.claims is not None or r.api_key is not None "
                                    "or r.auth_context is not None else None)", "sn", ""),
}


def websocket_record(r: Any) -> dict[str, Any] | None:
    """The default line's `websocket` member: a WebSocket's counters at close, and a
    WebSocket API's event (eventType, connectionId, messageId); a new dict, or None."""
    ws = r.ws_log
    if r.ws_event is not None:
        event, conn, message = r.ws_event
        ws = {**(ws or {}), "eventType": event, "connectionId": conn, **({"messageId": message} if message else {})}
    return ws


def _extras(r: Any) -> bytes:
    """The default line's optional members: traceId, websocket, context."""
    out = b""
    if r.trace_id is not None:
        out += b',"traceId":"' + r.trace_id.encode() + b'"'
    ws = websocket_record(r)
    if ws is not None:
        out += b',"websocket":' + _dumps(ws)
    if r.context:
        out += b',"context":' + _dumps(r.context)
    return out


_NAMESPACE["_extras"] = _extras


def default_render() -> Render:
    """The render function of the default line (compiled like a mapping format)."""
    parts = _mapping_parts(DEFAULT_FORMAT, {})
    parts.pop()  # the closing brace
    for key, var in _DEFAULT_TAIL.items():
        parts += [b',"' + key.encode() + b'":', _Slot(var, "jval")]
    extras = ("(_extras(r) if r.trace_id is not None or r.ws_log is not None or r.ws_event is not None "
              "or r.context else b'')")
    parts += [_Slot(Variable(extras, "raw", ""), "jval"), b"}\n"]
    return _generate(parts)


def compile_format(fmt: str | Mapping[str, Any], plugin_names: Mapping[str, str] | None = None) -> Render:
    """The render function of an `access_log.format` (see the module docstring)."""
    names = plugin_names or {}
    if isinstance(fmt, Mapping):
        return _compile_mapping(fmt, names)
    if fmt.lstrip().startswith("{"):
        return _compile_json_template(fmt, names)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in fmt):
        raise FormatError("a format cannot contain control characters (a line break, a tab...)")
    parts: list[bytes | _Slot] = []
    for text, var in _split(fmt, names, None):
        parts.append(text.encode() if var is None else _Slot(var, "line"))
    parts.append(b"\n")
    return _generate(parts)


def _compile_mapping(fmt: Mapping[str, Any], names: Mapping[str, str]) -> Render:
    parts = _mapping_parts(fmt, names)
    parts.append(b"\n")
    return _generate(parts)


def _mapping_parts(fmt: Mapping[str, Any], names: Mapping[str, str]) -> list[bytes | _Slot]:
    parts: list[bytes | _Slot] = [b"{"]
    for i, (key, value) in enumerate(fmt.items()):
        parts.append((b"," if i else b"") + orjson.dumps(str(key)) + b":")
        if isinstance(value, (dict, list)):
            raise FormatError("a value must be a string (with $context variables) or a constant", str(key))
        if not isinstance(value, str):
            try:
                parts.append(orjson.dumps(value))  # a constant
            except (TypeError, orjson.JSONEncodeError) as exc:
                raise FormatError(f"a constant JSON cannot hold: {exc}", str(key)) from None
            continue
        pieces = _split(value, names, str(key))
        if len(pieces) == 3 and pieces[0][0] == "" and pieces[2][0] == "" and pieces[1][1] is not None:
            parts.append(_Slot(pieces[1][1], "jval"))  # exactly one variable: typed
            continue
        parts.append(b'"')  # text around variables: a string
        for text, var in pieces:
            parts.append(orjson.dumps(text)[1:-1] if var is None else _Slot(var, "jstr"))
        parts.append(b'"')
    parts.append(b"}")
    return parts


def _compile_json_template(fmt: str, names: Mapping[str, str]) -> Render:
    parts: list[bytes | _Slot] = []
    in_string = False
    # a template written over several YAML lines makes one line: its line breaks and tabs
    # are JSON whitespace (inside a JSON string they would not be valid JSON anyway)
    fmt = re.sub(r"[\r\n\t]+", " ", fmt.strip())
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in fmt):
        raise FormatError("a format cannot contain control characters")
    for text, var in _split(fmt, names, None):
        if var is None:
            parts.append(text.encode())
            in_string = _string_state(text, in_string)
        else:
            parts.append(_Slot(var, "jstr" if in_string else "jval"))
    parts.append(b"\n")
    render = _generate(parts)
    try:  # a template that is not JSON with every variable present and absent is refused
        sample = orjson.loads(render(_Probe(), _Probe(), _Probe(), 0.0))
    except orjson.JSONDecodeError as exc:
        raise FormatError(f"the format starts with '{{' but is not a JSON template: {exc}") from None
    if not isinstance(sample, dict):
        raise FormatError("a JSON format must be an object")
    return render


def _string_state(text: str, in_string: bool) -> bool:
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and in_string:
            escaped = True
        elif ch == '"':
            in_string = not in_string
    return in_string


class _Probe:
    """Stands for the request, connection and log when a template is tried at load:
    what is never absent has a plain value, everything else is absent (None)."""

    request_id = method = path = b"x"
    base_path = b""
    peer_ip = route_key = "x"
    stage = "$default"
    version = "1.1"
    headers: list[Any] = []
    status = response_length = integration_status = 0
    t_wall = t_start = 0.0
    websocket = False

    def __getattr__(self, name: str) -> Any:
        return None

    clf_bytes = b"01/Jan/1970:00:00:00 +0000"
    clf_from, clf_until = 0.0, 1.0
