"""Route keys and the compiled route table (sans-IO: no sockets, no asyncio).

This module owns three things:

1. **Route key syntax** (`parse_route_key`), as Amazon API Gateway HTTP APIs write it:
   ``METHOD /path``, ``ANY /path`` or ``$default``. The method is an upper-case RFC 9110
   token. The path is ``/`` or ``/``-separated non-empty segments, each a literal, a
   whole-segment parameter ``{name}``, or -- last segment only -- a greedy ``{name+}``.
   Literals are printable ASCII without ``?``, ``#``, braces or white space (matching is
   on the raw, *not* percent-decoded request path, so write non-ASCII as ``%XX``).

2. **Matching** (`compile_routes` -> `Router.match`). Routes are compiled once into
   tries; nothing scans the route list or runs a regex per request:

   - host level: the trie of the exact host, then wildcard hosts (``*.example.com``
     matches any sub-domain, at any depth, but not ``example.com`` itself), longest
     suffix first, then the host-less trie. The first trie that yields a match wins.
   - path level: a node per segment with a dict of literal children (keyed by bytes),
     one parameter child and one greedy child. At every segment a literal beats a
     parameter beats a greedy parameter, with backtracking: with ``/a/b/c`` and
     ``/a/{x}/d`` configured, ``/a/b/d`` matches the second.
   - method level, at the node where the path ends: the exact method, then ``ANY``. A
     node whose path matches but which has neither keeps the search backtracking towards
     less specific routes.
   - ``$default``: a host may have its own ``$default``, tried after every path route of
     that host (so it shadows host-less routes for that host); the host-less ``$default``
     is the very last resort. No match at all -> ``None`` (the server answers 404).

   Request paths are raw bytes without the query. An empty segment (``//``, a trailing
   ``/``) matches neither a literal nor a parameter, so ``/users/`` does not match
   ``/users``. Parameters capture raw bytes; a greedy ``{proxy+}`` captures the rest of
   the path without its leading slash (``a/b/c``); the prefix with only a trailing
   slash (``/files/``) matches it with an empty capture, since no other route key can
   name that path (it must not fall through to ``$default``); ``/files`` does not.
   Methods compare case-sensitively (RFC 9110); ``HEAD`` does not match ``GET``.

3. **Static checks** (`check_routes`) that config loading reports as errors:

   - *duplicate*: two routes with the same host (case-insensitive), the same method
     (``ANY`` counts as a method of its own) and the same path shape -- literals equal,
     parameters in the same places, parameter names ignored (``/users/{id}`` and
     ``/users/{uid}``). Two ``$default`` for the same host are duplicates. The later
     route is reported, naming the earlier one; the later one could never be selected.
   - *unreachable*: a route that no request can ever select. Under the precedence above
     every non-duplicate route is reachable by some request, except routes whose method
     never carries a path: ``CONNECT`` (its target is ``host:port``). These are
     reported. Host-specific routes beside host-less ones, ``ANY`` beside exact methods
     and greedy beside parameter routes are all reachable and never reported.

Invariants: a compiled `Router` is immutable; `match` allocates only the split segment
list, the captured values and the returned dict; `Router.table()` lists routes in the
order `match` prefers them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from edgeplane.config.model import RouteConfig
from edgeplane.http.paths import PathPolicy, PathRejected, normalize_path

__all__ = [
    "RouteKeyError",
    "Segment",
    "ParsedKey",
    "parse_route_key",
    "Router",
    "compile_routes",
    "check_routes",
    "format_table",
]

T = TypeVar("T")

DEFAULT_KEY = "$default"

_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
# printable ASCII minus space, '?', '#', '{', '}' ('/' never reaches a segment)
_LITERAL_RE = re.compile(r"^[!-~]+$")
_LITERAL_FORBIDDEN = "?#{}"
# Methods whose request target is never an origin-form path.
# The canonical spelling of a route literal: what a request normalises to when the
# `keep` policies let %2F, %5C and ';' through (encoded).
_KEEP = PathPolicy(escaped_slashes="keep", backslashes="keep", path_parameters="keep")
_PATHLESS_METHODS = {"CONNECT": "CONNECT requests carry an authority ('host:port'), never a path"}


class RouteKeyError(ValueError):
    """A route key that does not follow the `METHOD /path` syntax."""


@dataclass(frozen=True, slots=True)
class Segment:
    kind: Literal["literal", "param", "greedy"]
    value: str  # literal text, or the parameter name (without braces / '+')

    def __str__(self) -> str:
        if self.kind == "literal":
            return self.value
        if self.kind == "param":
            return "{" + self.value + "}"
        return "{" + self.value + "+}"


@dataclass(frozen=True, slots=True)
class ParsedKey:
    key: str  # as written
    method: str | None  # upper-case method; None for ANY and for $default
    segments: tuple[Segment, ...] | None  # () for "/", None for $default
    greedy: bool  # last segment is {name+}

    @property
    def is_default(self) -> bool:
        return self.segments is None

    @property
    def is_any(self) -> bool:
        return self.method is None and self.segments is not None

    @property
    def path(self) -> str | None:
        if self.segments is None:
            return None
        return "/" + "/".join(str(s) for s in self.segments)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Parameter names in path order; a greedy `{proxy+}` contributes `proxy`."""
        if not self.segments:
            return ()
        return tuple(s.value for s in self.segments if s.kind != "literal")

    @property
    def shape(self) -> tuple[str, ...] | None:
        """The path with parameter names erased: what duplicate detection compares."""
        if self.segments is None:
            return None
        out = []
        for s in self.segments:
            if s.kind == "literal":
                out.append("=" + s.value)
            else:
                out.append("{}" if s.kind == "param" else "{+}")
        return tuple(out)


def parse_route_key(key: str) -> ParsedKey:
    """Parse an API Gateway route key; raise `RouteKeyError` saying what is wrong."""
    if not isinstance(key, str):
        raise RouteKeyError(f"route key must be a string, got {type(key).__name__}")
    if key == DEFAULT_KEY:
        return ParsedKey(key, None, None, False)
    if key.startswith("$"):
        raise RouteKeyError(
            f"unknown special route key {key!r} (HTTP APIs only know '$default')"
        )
    method, sep, path = key.partition(" ")
    if not sep or not method or not path:
        raise RouteKeyError(
            f"invalid route key {key!r}: expected 'METHOD /path', 'ANY /path' or '$default'"
        )
    if path.startswith(" ") or " " in path:
        raise RouteKeyError(
            f"invalid route key {key!r}: exactly one space between method and path, "
            "and no spaces in the path"
        )
    if not _TOKEN_RE.match(method):
        raise RouteKeyError(f"invalid method {method!r} in route key {key!r}")
    if method != method.upper():
        raise RouteKeyError(
            f"method must be upper-case in route key {key!r} ({method.upper()!r}, not {method!r})"
        )
    segments = _parse_path(path, key)
    greedy = bool(segments) and segments[-1].kind == "greedy"
    return ParsedKey(key, None if method == "ANY" else method, segments, greedy)


def _parse_path(path: str, key: str) -> tuple[Segment, ...]:
    if not path.startswith("/"):
        raise RouteKeyError(f"path must start with '/' in route key {key!r}")
    if path == "/":
        return ()
    raw = path[1:].split("/")
    segments: list[Segment] = []
    names: set[str] = set()
    for pos, text in enumerate(raw):
        seg = _parse_segment(text, key, last=pos == len(raw) - 1)
        if seg.kind != "literal":
            if seg.value in names:
                raise RouteKeyError(f"duplicate parameter {{{seg.value}}} in route key {key!r}")
            names.add(seg.value)
        segments.append(seg)
    return tuple(segments)


def _parse_segment(text: str, key: str, *, last: bool) -> Segment:
    if not text:
        if last:
            raise RouteKeyError(
                f"trailing '/' in route key {key!r} (write the path without it)"
            )
        raise RouteKeyError(f"empty path segment ('//') in route key {key!r}")
    if text.startswith("{") and text.endswith("}"):
        name = text[1:-1]
        kind: Literal["param", "greedy"] = "param"
        if name.endswith("+"):
            kind, name = "greedy", name[:-1]
            if not last:
                raise RouteKeyError(
                    f"greedy parameter {text} must be the last segment in route key {key!r}"
                )
        if not _PARAM_NAME_RE.match(name):
            raise RouteKeyError(
                f"invalid parameter name {name!r} in route key {key!r} "
                "(letters, digits, '_' and '-', not starting with a digit)"
            )
        return Segment(kind, name)
    if "{" in text or "}" in text:
        raise RouteKeyError(
            f"parameter must be a whole path segment in route key {key!r}: {text!r}"
        )
    for ch in text:
        if ch in "?#":
            raise RouteKeyError(
                f"character {ch!r} is not allowed in a route path ({key!r}): "
                "routes match the path without query or fragment"
            )
    if not _LITERAL_RE.match(text):
        raise RouteKeyError(
            f"path segment {text!r} in route key {key!r} has a character that is not "
            "printable ASCII (write non-ASCII characters percent-encoded)"
        )
    # Requests are matched after normalisation (http.paths): a literal that is not in
    # that form could never match, so say how to write it.
    try:
        canonical = normalize_path(b"/" + text.encode("ascii"), _KEEP)[1:].decode("ascii")
    except PathRejected as exc:
        raise RouteKeyError(f"path segment {text!r} in route key {key!r} can never match: "
                            f"requests with it are refused ({exc})") from None
    if canonical in ("", "."):  # "." or ".." (in any spelling): resolved away first
        raise RouteKeyError(f"path segment {text!r} in route key {key!r} is a dot segment: "
                            "request paths are normalised before matching, so it never matches")
    if canonical != text:
        raise RouteKeyError(f"path segment {text!r} in route key {key!r} can never match: "
                            f"requests are matched in normalised form; write {canonical!r}")
    return Segment("literal", text)


# ---------------------------------------------------------------------------
# compiled tries


class _Leaf(Generic[T]):
    __slots__ = ("payload", "names", "route", "variants")

    def __init__(self, payload: T, names: tuple[str, ...], route: RouteConfig | None) -> None:
        self.payload = payload
        self.names = names
        self.route = route  # None: only conditional routes have this key (`variants`)
        # Routes of the same key with `match` conditions, most specific first
        # (`routing.conditions`): the first whose conditions hold wins over this leaf.
        self.variants: list[tuple[Any, _Leaf[T]]] | None = None


def _pick(leaf: _Leaf[T] | None, req: Any) -> _Leaf[T] | None:
    """`leaf`, or the conditional route of its key the request satisfies; None when only
    conditional routes have the key and none holds (the search goes on)."""
    if leaf is None or leaf.variants is None:
        return leaf
    if req is not None:
        for conditions, variant in leaf.variants:
            if conditions.matches(req):
                return variant
    return leaf if leaf.route is not None else None


class _Node(Generic[T]):
    __slots__ = ("literals", "param", "greedy", "methods", "any")

    def __init__(self) -> None:
        self.literals: dict[bytes, _Node[T]] = {}
        self.param: _Node[T] | None = None
        self.greedy: _Node[T] | None = None  # terminal: only methods/any are used
        self.methods: dict[bytes, _Leaf[T]] = {}
        self.any: _Leaf[T] | None = None


class _Trie(Generic[T]):
    __slots__ = ("root", "default")

    def __init__(self) -> None:
        self.root: _Node[T] = _Node()
        self.default: _Leaf[T] | None = None


def _walk(node: _Node[T], segs: list[bytes], i: int, n: int, method: bytes,
          captured: list[bytes], req: Any) -> _Leaf[T] | None:
    """Depth-first, most specific first; `captured` holds the parameter values so far."""
    if i == n:
        leaf = _pick(node.methods.get(method), req)
        return leaf if leaf is not None else _pick(node.any, req)
    seg = segs[i]
    child = node.literals.get(seg)
    if child is not None:
        leaf = _walk(child, segs, i + 1, n, method, captured, req)
        if leaf is not None:
            return leaf
    child = node.param
    if child is not None and seg:
        captured.append(seg)
        leaf = _walk(child, segs, i + 1, n, method, captured, req)
        if leaf is not None:
            return leaf
        captured.pop()
    child = node.greedy
    if child is not None:
        leaf = _pick(child.methods.get(method), req)
        if leaf is None:
            leaf = _pick(child.any, req)
        if leaf is not None:
            rest = b"/".join(segs[i:])
            # The bare prefix with its trailing slash ("/admin/") is the greedy route's
            # too: no other route key can name it, so it must not fall to $default.
            if rest.strip(b"/") or (i == n - 1 and not rest):
                captured.append(rest)
                return leaf
    return None


def _match_trie(trie: _Trie[T], segs: list[bytes] | None, n: int, method: bytes,
                req: Any) -> tuple[T, dict[str, bytes]] | None:
    if segs is not None:
        captured: list[bytes] = []
        leaf = _walk(trie.root, segs, 1, n, method, captured, req)
        if leaf is not None:
            if leaf.names:
                # equal lengths by construction; strict= would cost a kwargs dict per match
                return leaf.payload, dict(zip(leaf.names, captured))  # noqa: B905
            return leaf.payload, {}
    leaf = trie.default
    if leaf is not None:
        return leaf.payload, {}
    return None


class Router(Generic[T]):
    """An immutable compiled route table. Build it with `compile_routes`."""

    __slots__ = ("_exact", "_wild", "_hostless", "_has_hosts", "_table")

    def __init__(
        self,
        exact: dict[bytes, _Trie[T]],
        wild: list[tuple[bytes, _Trie[T]]],
        hostless: _Trie[T],
        table: list[RouteConfig],
    ) -> None:
        self._exact = exact
        self._wild = wild
        self._hostless = hostless
        self._has_hosts = bool(exact or wild)
        self._table = table

    def match(self, method: bytes, path: bytes, host: bytes | None,
              req: Any = None) -> tuple[T, dict[str, bytes]] | None:
        """Select the route for a request.

        `path` is the raw path without the query; `host` the lower-cased Host header
        (a `:port` suffix is ignored) or None; `req` (its `headers` and `query`) for
        routes with `match` conditions (without it they never match). Returns
        (payload, params) or None.
        """
        if path == b"/":
            segs: list[bytes] | None = [b""]
            n = 1
        elif path[:1] == b"/":
            segs = path.split(b"/")
            n = len(segs)
        else:  # "*" or another non-path target: only a $default can take it
            segs, n = None, 0
        if host is not None and self._has_hosts:
            if b":" in host and host[:1] != b"[":
                host = host[: host.rindex(b":")]
            if host[-1:] == b".":
                host = host[:-1]
            trie = self._exact.get(host)
            if trie is not None:
                found = _match_trie(trie, segs, n, method, req)
                if found is not None:
                    return found
            for suffix, trie in self._wild:
                if host.endswith(suffix) and len(host) > len(suffix):
                    found = _match_trie(trie, segs, n, method, req)
                    if found is not None:
                        return found
        return _match_trie(self._hostless, segs, n, method, req)

    def table(self) -> list[RouteConfig]:
        """Routes in match-priority order (what `edgeplane routes` prints)."""
        return list(self._table)

    def __len__(self) -> int:
        return len(self._table)


def _host_order(host: str | None) -> tuple:
    if host is None:
        return (2, 0, "")
    if host.startswith("*."):
        return (1, -len(host), host)
    return (0, 0, host)


def _priority_key(route: RouteConfig, parsed: ParsedKey) -> tuple:
    if parsed.segments is None:
        return (_host_order(route.host), 1, (), 0, route.index)
    rank = {"literal": 0, "param": 1, "greedy": 2}
    segs = tuple((rank[s.kind], s.value if s.kind == "literal" else "") for s in parsed.segments)
    conditions = route.policies.get("match")
    specificity = conditions.specificity if conditions is not None else (1, 0)  # conditional routes first
    return (_host_order(route.host), 0, segs, 1 if parsed.method is None else 0, specificity, route.index)


def _sorted_routes(routes: Sequence[RouteConfig]) -> list[RouteConfig]:
    return sorted(routes, key=lambda r: _priority_key(r, parse_route_key(r.key)))


def compile_routes(entries: Sequence[tuple[RouteConfig, T]]) -> Router[T]:
    """Compile (route, payload) pairs into a `Router`.

    Raises `RouteKeyError` for a bad key and `ValueError` for a duplicate route; config
    loading has already reported both, so a loaded `Config` always compiles.
    """
    exact: dict[bytes, _Trie[T]] = {}
    wild: dict[bytes, _Trie[T]] = {}
    hostless: _Trie[T] = _Trie()
    for route, payload in entries:
        parsed = parse_route_key(route.key)
        host = route.host.lower() if route.host else None
        if host is None:
            trie = hostless
        elif host.startswith("*."):
            trie = wild.setdefault(host[1:].encode("ascii"), _Trie())
        else:
            trie = exact.setdefault(host.encode("ascii"), _Trie())
        _insert(trie, parsed, route, payload)
    wild_list = sorted(wild.items(), key=lambda kv: (-len(kv[0]), kv[0]))
    table = _sorted_routes([r for r, _ in entries])
    return Router(exact, wild_list, hostless, table)


def _place(slot: _Leaf[T] | None, leaf: _Leaf[T], route: RouteConfig) -> _Leaf[T]:
    """What a key's slot holds once `leaf` (of `route`) is added to it."""
    conditions = route.policies.get("match")
    if conditions is None:
        if slot is not None and slot.route is not None:
            raise ValueError(f"duplicate route {route.key!r} (routes[{route.index}])")
        if slot is not None:  # conditional routes came first: this one is their fallback
            leaf.variants = slot.variants
        return leaf
    if slot is None:
        slot = _Leaf(leaf.payload, leaf.names, None)
    variants = slot.variants or []
    if any(c.ident == conditions.ident for c, _ in variants):
        raise ValueError(f"duplicate route {route.key!r} (routes[{route.index}])")
    variants.append((conditions, leaf))
    variants.sort(key=lambda item: (item[0].specificity, item[1].route.index if item[1].route else 0))
    slot.variants = variants
    return slot


def _insert(trie: _Trie[T], parsed: ParsedKey, route: RouteConfig, payload: T) -> None:
    leaf = _Leaf(payload, parsed.param_names, route)
    if parsed.segments is None:
        if trie.default is not None:
            raise ValueError(f"duplicate $default route (routes[{route.index}])")
        trie.default = leaf
        return
    node = trie.root
    for seg in parsed.segments:
        if seg.kind == "literal":
            key = seg.value.encode("ascii")
            child = node.literals.get(key)
            if child is None:
                child = node.literals[key] = _Node()
        elif seg.kind == "param":
            child = node.param
            if child is None:
                child = node.param = _Node()
        else:
            child = node.greedy
            if child is None:
                child = node.greedy = _Node()
        node = child
    if parsed.method is None:
        node.any = _place(node.any, leaf, route)
    else:
        m = parsed.method.encode("ascii")
        node.methods[m] = _place(node.methods.get(m), leaf, route)


# ---------------------------------------------------------------------------
# static checks and the human table


def route_problems(routes: Sequence[RouteConfig]) -> list[tuple[int, str]]:
    """(route index, message) for every duplicate or unreachable route.

    Routes whose key does not parse are skipped (the caller reports the key error).
    """
    problems: list[tuple[int, str]] = []
    seen: dict[tuple, RouteConfig] = {}
    for route in routes:
        try:
            parsed = parse_route_key(route.key)
        except RouteKeyError:
            continue
        host = route.host.lower() if route.host else None
        conditions = route.policies.get("match")
        ident = (host, parsed.method if parsed.segments is not None else "$default", parsed.shape,
                 conditions.ident if conditions is not None else None)
        earlier = seen.get(ident)
        if earlier is not None:
            problems.append(
                (
                    route.index,
                    f"duplicate of routes[{earlier.index}] ({earlier.key!r}): "
                    "same host, method and path shape",
                )
            )
            continue
        seen[ident] = route
        reason = _PATHLESS_METHODS.get(parsed.method or "")
        if reason is not None:
            problems.append((route.index, f"unreachable route {route.key!r}: {reason}"))
    return problems


def check_routes(routes: Sequence[RouteConfig]) -> list[str]:
    """Duplicate / unreachable route errors, each "routes[i]: message"."""
    return [f"routes[{i}]: {msg}" for i, msg in route_problems(routes)]


def format_table(router_or_routes: Router[object] | Sequence[RouteConfig],
                 describe: Callable[[RouteConfig], tuple[str, str]] | None = None) -> str:
    """A plain-text table of routes in match-priority order, for `edgeplane routes`.
    `describe(route)` gives the INTEGRATION and POLICIES cells (`routing.chain.describer`
    asks the plugin registry); without it they name the integration type only."""
    if isinstance(router_or_routes, Router):
        routes = router_or_routes.table()
    else:
        routes = _sorted_routes(list(router_or_routes))
    header = ("#", "HOST", "METHOD", "PATH", "INTEGRATION", "POLICIES", "ROUTE")
    rows = [header]
    for prio, r in enumerate(routes, 1):
        parsed = parse_route_key(r.key)
        if parsed.is_default:
            method, path = "*", "$default"
        else:
            method, path = parsed.method or "ANY", parsed.path or "/"
        integration, policies = describe(r) if describe is not None else (str(r.integration.type), "-")
        rows.append((str(prio), r.host or "(any)", method, path, integration, policies or "-",
                     f"routes[{r.index}]"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if not routes:
        lines.append("(no routes: every request gets 404)")
    return "\n".join(lines) + "\n"
