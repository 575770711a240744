"""CORS policy: preflight answers and response headers (sans-IO).

This module owns the CORS behaviour of a route (or of every route), modelled on the
Amazon API Gateway HTTP API CORS configuration. A `CorsPolicy` is built and validated
once from configuration; afterwards it is immutable and its per-request methods only
look at header bytes (lower-cased names, as the codec delivers them) and return bytes.

Configuration (`CorsPolicy.__init__`, all validated, `ValueError` naming the bad key):

- ``allow_origins`` (required, non-empty): ``*`` (any origin); ``https://*`` /
  ``http://*`` (any origin of that scheme, as AWS allows); ``https://*.example.com`` (any
  sub-domain at any depth, not ``example.com`` itself -- the same rule as wildcard hosts
  in the router); or an exact ``scheme://host[:port]``. Scheme and host compare
  case-insensitively, a default port (``:443`` for https, ``:80`` for http) is dropped,
  a path or trailing ``/`` is an error. ``null`` is not accepted.
- ``allow_methods``: method tokens, or ``*``. GET, HEAD and POST (the CORS-safelisted
  methods a browser accepts without them being listed) are always allowed.
- ``allow_headers``: header names (case-insensitive), or ``*``.
- ``expose_headers``: header names, or ``*`` (sent as given; note that browsers treat
  ``*`` literally on credentialed requests).
- ``allow_credentials``: with it, the request origin is echoed, never ``*``; as in AWS,
  ``allow_credentials`` together with a ``*`` origin is refused.
- ``max_age``: seconds (0..86400) a browser may cache a preflight, or None (not sent).

Invariants:

- **Preflight** (`is_preflight`: OPTIONS with ``Origin`` and
  ``Access-Control-Request-Method``) is answered by the gateway, never forwarded.
  `preflight` returns ``(204, headers)`` when origin, method and every requested header
  are allowed, else ``(403, b"")`` -- the caller renders its ``{"message":"Forbidden"}``
  and no CORS headers go out. An allowed answer carries allow-origin, allow-methods,
  allow-headers (when any), allow-credentials, max-age and a Vary line.
- ``*`` methods/headers are answered by **reflecting** the request's
  ``Access-Control-Request-Method`` / ``-Headers`` (validated tokens, lower-cased), which
  works with credentials and for ``Authorization`` where a literal ``*`` would not; the
  Vary line then also names the request header reflected.
- **Actual responses** (`response_headers`): an allowed origin gets allow-origin (echoed,
  or ``*`` for a ``*`` policy without credentials), allow-credentials, expose-headers and
  ``vary: origin``. A ``*`` policy without credentials answers the same constant block to
  every request (even without ``Origin``), so no Vary is needed. Any other policy varies
  by origin, so a request without ``Origin`` or with a disallowed one still gets
  ``vary: origin`` -- otherwise a shared cache could serve a response without CORS
  headers to an allowed origin (Fetch standard, "CORS protocol and HTTP caches").
- Nothing is echoed that was not matched: an echoed origin is an exact configured one or
  matched a wildcard pattern that only admits scheme, host-name characters and a port,
  so no request byte reaches a response header unchecked.
- As in AWS, CORS headers from the upstream must be dropped when a route has a policy:
  `CORS_RESPONSE_HEADERS` names them.

Everything constant is rendered at construction; a request costs dict/set lookups, at
most one regex match for wildcard origins, and one bytes join.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = [
    "CORS_RESPONSE_HEADERS",
    "CorsPolicy",
    "header",
    "is_preflight",
]

Headers = Sequence[tuple[bytes, bytes]]

CORS_RESPONSE_HEADERS = frozenset({
    b"access-control-allow-origin",
    b"access-control-allow-credentials",
    b"access-control-allow-methods",
    b"access-control-allow-headers",
    b"access-control-expose-headers",
    b"access-control-max-age",
})

_SAFELISTED_METHODS = frozenset({b"GET", b"HEAD", b"POST"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN_B = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SCHEME = r"[a-z][a-z0-9+.\-]*"
_LABEL = r"[a-z0-9_](?:[a-z0-9_\-]*[a-z0-9_])?"
_HOSTNAME = rf"{_LABEL}(?:\.{_LABEL})*"
_HOST = rf"(?:{_HOSTNAME}|\[[0-9a-f:.]+\])"
_PORT = r"(?::[0-9]{1,5})?"
_ORIGIN = re.compile(rf"({_SCHEME})://(\*\.)?(\*|{_HOST})(:[0-9]{{1,5}})?")
_DEFAULT_PORTS = {"http": ":80", "https": ":443", "ws": ":80", "wss": ":443"}
_MAX_AGE_LIMIT = 86400
_FORBIDDEN: tuple[int, bytes] = (403, b"")


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case) in ``headers``, or None."""
    for n, v in headers:
        if n == name:
            return v
    return None


def is_preflight(method: bytes, headers: Headers) -> bool:
    """True for a CORS preflight: OPTIONS with Origin and Access-Control-Request-Method."""
    if method != b"OPTIONS":
        return False
    origin = acrm = False
    for n, _ in headers:
        if n == b"origin":
            origin = True
        elif n == b"access-control-request-method":
            acrm = True
    return origin and acrm


def _str_list(value: Iterable[str], what: str) -> list[str]:
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{what} must be a list, not a single string")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{what}[{i}]: expected a non-empty string, got {item!r}")
        out.append(item.strip())
    return out


def _tokens(value: Iterable[str], what: str, *, star: bool) -> tuple[bool, list[str]]:
    """(has '*', tokens) for a list of methods or header names."""
    any_ = False
    out: list[str] = []
    for i, item in enumerate(_str_list(value, what)):
        if item == "*" and star:
            any_ = True
        elif _TOKEN.fullmatch(item) is None:
            raise ValueError(f"{what}[{i}]: {item!r} is not a valid token")
        elif item not in out:
            out.append(item)
    return any_, out


def _line(name: bytes, value: bytes) -> bytes:
    return name + b": " + value + b"\r\n"


class CorsPolicy:
    """One validated CORS configuration. See the module docstring for the rules."""

    __slots__ = (
        "allow_credentials", "max_age",
        "_any_origin", "_exact", "_pattern",
        "_any_method", "_methods", "_any_header", "_headers",
        "_preflight_tail", "_actual_tail", "_actual_const", "_no_match",
    )

    def __init__(
        self,
        allow_origins: Iterable[str] = (),
        allow_methods: Iterable[str] = (),
        allow_headers: Iterable[str] = (),
        expose_headers: Iterable[str] = (),
        allow_credentials: bool = False,
        max_age: int | None = None,
    ) -> None:
        if not isinstance(allow_credentials, bool):
            raise ValueError(f"allow_credentials: expected true or false, got {allow_credentials!r}")
        if max_age is not None and (isinstance(max_age, bool) or not isinstance(max_age, int)
                                    or not 0 <= max_age <= _MAX_AGE_LIMIT):
            raise ValueError(f"max_age: expected whole seconds 0..{_MAX_AGE_LIMIT}, got {max_age!r}")
        self.allow_credentials = allow_credentials
        self.max_age = max_age

        # -- origins ----------------------------------------------------------------
        origins = _str_list(allow_origins, "allow_origins")
        if not origins:
            raise ValueError("allow_origins: list at least one origin (or '*')")
        self._any_origin = False
        exact: set[bytes] = set()
        patterns: list[str] = []
        for i, text in enumerate(origins):
            if text == "*":
                self._any_origin = True
                continue
            m = _ORIGIN.fullmatch(text.lower())
            if m is None:
                raise ValueError(
                    f"allow_origins[{i}]: {text!r} is not an origin: expected '*' or "
                    "scheme://host[:port] (no path, no trailing '/'), with an optional "
                    "leading '*.' label or a host of '*'")
            scheme, sub, host, port = m.group(1), m.group(2), m.group(3), m.group(4) or ""
            if port:
                if not 0 < int(port[1:]) <= 65535:
                    raise ValueError(f"allow_origins[{i}]: {text!r}: port out of range")
                if _DEFAULT_PORTS.get(scheme) == port:
                    port = ""
                else:
                    port = ":" + str(int(port[1:]))
            if host == "*":
                if sub:
                    raise ValueError(f"allow_origins[{i}]: {text!r}: use '{scheme}://*'")
                patterns.append(rf"{re.escape(scheme)}://{_HOST}{_PORT}")
            elif sub:
                if host.startswith("["):
                    raise ValueError(f"allow_origins[{i}]: {text!r}: no wildcard on an IP")
                patterns.append(
                    rf"{re.escape(scheme)}://(?:{_LABEL}\.)+{re.escape(host)}{re.escape(port)}")
            else:
                exact.add(f"{scheme}://{host}{port}".encode("ascii"))
        if self._any_origin and allow_credentials:
            raise ValueError(
                "allow_credentials cannot be true when allow_origins contains '*' "
                "(list the origins, or a wildcard such as 'https://*.example.com')")
        self._exact = frozenset(exact)
        self._pattern = (re.compile(("(?:" + "|".join(patterns) + ")").encode("ascii"))
                         if patterns else None)

        # -- methods and headers ---------------------------------------------------
        self._any_method, methods = _tokens(allow_methods, "allow_methods", star=True)
        self._methods = frozenset(m.encode("ascii") for m in methods) | _SAFELISTED_METHODS
        self._any_header, headers = _tokens(allow_headers, "allow_headers", star=True)
        self._headers = frozenset(h.lower().encode("ascii") for h in headers)
        any_expose, expose = _tokens(expose_headers, "expose_headers", star=True)
        if any_expose:
            expose.insert(0, "*")

        # -- constant header blocks ------------------------------------------------
        creds = b"access-control-allow-credentials: true\r\n" if allow_credentials else b""
        tail = [creds]
        if not self._any_method and methods:
            tail.append(_line(b"access-control-allow-methods", ", ".join(methods).encode()))
        if not self._any_header and headers:
            tail.append(_line(b"access-control-allow-headers", ", ".join(headers).encode()))
        if max_age is not None:
            tail.append(_line(b"access-control-max-age", str(max_age).encode()))
        vary = [b"origin"]
        if self._any_method:
            vary.append(b"access-control-request-method")
        if self._any_header:
            vary.append(b"access-control-request-headers")
        tail.append(_line(b"vary", b", ".join(vary)))
        self._preflight_tail = b"".join(tail)

        expose_line = (_line(b"access-control-expose-headers", ", ".join(expose).encode())
                       if expose else b"")
        self._actual_tail = b"\r\n" + creds + expose_line + b"vary: origin\r\n"
        # A '*' policy without credentials answers every request the same way.
        constant = self._any_origin and not allow_credentials
        self._actual_const = (b"access-control-allow-origin: *\r\n" + expose_line
                              if constant else None)
        self._no_match = b"vary: origin\r\n"

    @classmethod
    def from_config(cls, cfg: object) -> CorsPolicy:
        """A policy from a `model.CorsConfig` (or anything with the same attributes)."""
        return cls(
            allow_origins=list(cfg.allow_origins),  # type: ignore[attr-defined]
            allow_methods=list(cfg.allow_methods),  # type: ignore[attr-defined]
            allow_headers=list(cfg.allow_headers),  # type: ignore[attr-defined]
            expose_headers=list(cfg.expose_headers),  # type: ignore[attr-defined]
            allow_credentials=cfg.allow_credentials,  # type: ignore[attr-defined]
            max_age=cfg.max_age,  # type: ignore[attr-defined]
        )

    # -- per request -----------------------------------------------------------------

    is_preflight = staticmethod(is_preflight)

    @property
    def varies_by_origin(self) -> bool:
        """True unless the policy is '*' without credentials (then responses are constant)."""
        return self._actual_const is None

    def origin_allowed(self, origin: bytes) -> bool:
        """True when ``origin`` (an Origin header value) matches allow_origins."""
        if self._any_origin or origin in self._exact:
            return True
        lower = origin.lower()
        if lower in self._exact:
            return True
        return self._pattern is not None and self._pattern.fullmatch(lower) is not None

    def response_headers(self, origin: bytes | None) -> bytes:
        """Header lines to add to an actual (non-preflight) response. See module doc."""
        if self._actual_const is not None:
            return self._actual_const
        if origin is not None and self.origin_allowed(origin):
            return b"access-control-allow-origin: " + origin + self._actual_tail
        return self._no_match

    def preflight(self, headers: Headers) -> tuple[int, bytes]:
        """(204, header lines) for an allowed preflight, (403, b"") otherwise."""
        origin = method = None
        requested: list[bytes] = []
        for n, v in headers:
            if n == b"origin":
                if origin is None:
                    origin = v
            elif n == b"access-control-request-method":
                if method is None:
                    method = v
            elif n == b"access-control-request-headers":
                requested.append(v)
        if origin is None or method is None or not self.origin_allowed(origin):
            return _FORBIDDEN
        method = method.strip(b" \t")
        if _TOKEN_B.fullmatch(method) is None:
            return _FORBIDDEN
        if not self._any_method and method not in self._methods:
            return _FORBIDDEN
        names: list[bytes] = []
        if requested:
            allowed = self._headers
            for value in requested:
                for item in value.split(b","):
                    name = item.strip(b" \t").lower()
                    if not name:
                        continue
                    if _TOKEN_B.fullmatch(name) is None:
                        return _FORBIDDEN
                    if not self._any_header and name not in allowed:
                        return _FORBIDDEN
                    names.append(name)
        out = [b"access-control-allow-origin: ",
               b"*" if self._actual_const is not None else origin, b"\r\n"]
        if self._any_method:
            out += (b"access-control-allow-methods: ", method, b"\r\n")
        if self._any_header and names:
            out += (b"access-control-allow-headers: ", b", ".join(names), b"\r\n")
        out.append(self._preflight_tail)
        return 204, b"".join(out)
