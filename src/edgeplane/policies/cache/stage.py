"""The cache on the request path: `CacheStage` (lookup, invalidation, coalescing) and
`Fill` (the tap the proxy feeds a miss's response through).

A GET or HEAD request on a cached route is answered here from a fresh entry (`X-Cache:
Hit`); otherwise it goes on to the upstream (`X-Cache: Miss`, or `Refresh` when an
authorized client asked for one), and the first such request for a key carries a `Fill`
(`req.cache_fill`): `upstream.proxy` hands it the response head, each body chunk and the
end, and the fill stores the response if `directives.verdict` allows it. Requests for a
key being filled wait for that fill (request coalescing) and are answered from its entry,
or go on to the upstream themselves when it stored nothing.

Invariants:
- a fill ends exactly once (stored, refused, too large, failed or abandoned), and its
  waiters are then answered or sent on: none waits past the route's integration timeout;
- a HEAD request is answered from the GET entry and never fills one;
- a request with `Range`, a WebSocket handshake or another method passes through
  untouched (no `X-Cache`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from edgeplane.http.request import body_drainable, head_end
from edgeplane.http.responses import STATUS_LINES
from edgeplane.plugins import FastStage
from edgeplane.plugins.hooks import run_response_hooks
from edgeplane.policies.cache.directives import request_directives, verdict
from edgeplane.policies.cache.keys import variant
from edgeplane.policies.cache.store import Entry, VaryMarker

if TYPE_CHECKING:
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.policies.cache.keys import KeyMaker
    from edgeplane.policies.cache.model import CacheConfig

log = logging.getLogger("edgeplane.cache")

_WATCHED = frozenset((b"cache-control", b"pragma", b"range", b"authorization"))
_NOT_STORED = frozenset((b"x-cache", b"age", b"warning"))
_STALE_STATUSES = frozenset((500, 502, 503, 504))
_WARNING = b'warning: 199 - "Cache-Control: max-age=0 ignored: not authorized to invalidate the cache"\r\n'
HIT, MISS, REFRESH, STALE = b"Hit", b"Miss", b"Refresh", b"Stale"


def send_cached(proto: HttpProtocol, req: Request, entry: Entry, label: bytes) -> None:
    """Answer `req` from `entry`: its status, headers and body, with `Age`, `X-Cache`,
    the route's response hooks and the request's own headers (CORS, request id)."""
    keep = req.keep_alive and not proto.ctx.draining and not proto._peer_eof
    if keep and not req.complete and not body_drainable(req):
        keep = False
    status, head = entry.status, entry.head
    req.integration_status = status  # the integration's answer, as stored: response mappings apply
    req.response_body = entry.body
    if req.route.response_hooks and not req.hooks_failed:
        try:
            visible = [(k.decode("latin-1").lower(), v.decode("latin-1"))
                       for k, _, v in (line.partition(b": ") for line in head.split(b"\r\n") if line)]
            status = run_response_hooks(proto, req, status, visible)
            head = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in visible)
        except Exception as exc:  # a plugin's bug: 500, logged
            proto.internal_error(req, exc, f"a response hook of route {req.route_key!r}")
            return
    body = entry.body
    age = max(0, int(time.time() - entry.stored_at))
    parts = [STATUS_LINES[status], head, b"age: %d\r\nx-cache: %b\r\n" % (age, label)]
    if status != 204 and status != 304:
        parts.append(b"content-length: %d\r\n" % len(body))
    parts.append(head_end(req, keep))
    if req.method != b"HEAD" and status != 204 and status != 304:
        parts.append(body)
    req.status = status
    req.response_length = len(body)
    req.response_started = True
    proto.write(b"".join(parts))
    proto.finish_response(req, keep)


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The header names a response's `Connection` lines name (RFC 9110 7.6.1)."""
    return frozenset(token.strip().lower() for name, value in headers if name.lower() == b"connection"
                     for token in value.split(b","))


def _continue_after(proto: HttpProtocol, req: Request, stage: Any) -> None:
    """Resume `req`'s chain after `stage` (it waited), unless the client left."""
    proto.resume_chain(req, req.route.stages.index(stage) + 1)


def _answer_waiting(proto: HttpProtocol, req: Request, entry: Entry, label: bytes) -> None:
    req.pending = False
    if proto._closed or req.responded or req is not proto._active:
        return
    send_cached(proto, req, entry, label)


class CacheStage(FastStage):
    """Phase TRAFFIC, after throttles and quotas (a cached answer still counts, as in
    AWS): a fresh entry answers; a miss goes on with a `Fill` or waits for one."""

    __slots__ = ("store", "cfg", "keys", "skip", "authorized_route", "inflight", "lock_timeout", "cached_statuses")

    def __init__(self, store: Any, cfg: CacheConfig, keys: KeyMaker, skip: frozenset[bytes],
                 authorized_route: bool, lock_timeout: float) -> None:
        self.store = store
        self.cfg = cfg
        self.keys = keys
        self.skip = skip | _NOT_STORED  # upstream headers an entry never keeps
        self.authorized_route = authorized_route  # the route has an authorizer
        self.inflight: dict[bytes, Fill] = store.inflight
        self.lock_timeout = lock_timeout

    def __call__(self, proto: HttpProtocol, req: Request) -> bool | None:
        method = req.method
        if (method != b"GET" and method != b"HEAD") or req.websocket or req.chunked or req.content_length:
            return True  # (a GET with a body: what the body asks is not in any key)
        refresh = no_store = by_header = False
        for name, _ in req.headers:
            if name in _WATCHED:
                if name == b"range":
                    return True  # partial content is the upstream's business
                if name == b"authorization":
                    by_header = not self.authorized_route
                else:
                    refresh, no_store = request_directives(req.headers)
        if refresh and not self._may_refresh(req):
            refresh = False
            unauthorized = self.cfg.unauthorized
            if unauthorized == "fail_403":
                proto.send_error(req, 403, "Cache-Control: max-age=0 from a caller not authorized to "
                                           "invalidate the cache")
                return False
            if unauthorized == "ignore_with_header":
                req.extra_response += _WARNING
        key = self.keys.make(req)
        store = self.store
        if refresh:
            store.stats.refreshes += 1
            return self._go(proto, req, key, None, REFRESH, not no_store, by_header)
        if store.sync:
            return self.decide(proto, req, key, store.get(key), no_store, by_header)
        store.lookup(self, proto, req, key, no_store, by_header)
        return None

    def decide(self, proto: HttpProtocol, req: Request, key: bytes, item: Any, no_store: bool,
               by_header: bool, primary: bytes | None = None) -> bool | None:
        """What a lookup found decides: answer (False), go on (True) or wait (None). A
        `VaryMarker` (in-process stores) sends the lookup on to the request's variant;
        an asynchronous store passes the variant's key and entry, and the `primary` key."""
        primary = primary or key
        if type(item) is VaryMarker:
            key = variant(key, item.names, req)
            item = self.store.get(key)
        stale = None
        if item is not None:
            now = time.time()
            if now < item.fresh_until:
                self.store.stats.hits += 1
                send_cached(proto, req, item, HIT)
                return False
            if now < item.stale_until:
                stale = item
        return self._go(proto, req, key, stale, MISS, not no_store, by_header, primary)

    def _go(self, proto: HttpProtocol, req: Request, key: bytes, stale: Entry | None, label: bytes,
            fill: bool, by_header: bool, primary: bytes | None = None) -> bool | None:
        """Send `req` upstream (with a `Fill` when it may store), or make it wait for the
        fill in flight for `key` (the variant's key, when a `Vary` is known)."""
        stats = self.store.stats
        flight = self.inflight.get(key)
        if label is MISS:
            if flight is not None:
                stats.coalesced += 1
                flight.wait(proto, req)
                return None
            stats.misses += 1
        req.extra_response += b"x-cache: " + label + b"\r\n"
        if fill and req.method == b"GET" and flight is None:
            req.cache_fill = self.inflight[key] = Fill(self, req, key, primary or key, stale, by_header)
        elif stale is not None:
            req.cache_fill = Fill(self, req, key, primary or key, stale, by_header, store=False)
        return True

    def _may_refresh(self, req: Request) -> bool:
        cfg = self.cfg
        if not cfg.require_authorization:
            return True
        if not self.authorized_route:
            return False
        if cfg.scope is None:
            return True  # the route's authorizer let this caller in
        claims = req.claims
        if claims is None:
            return False
        from edgeplane.policies.jwt.verify import check_scopes

        return check_scopes(claims, (cfg.scope,))


class Fill:
    """One upstream response on its way to becoming an entry (or to rescuing a failure
    with a stale one). The proxy calls `head`, `body`, `complete`; any other end of the
    exchange calls `abandon` (or `serve_stale`)."""

    __slots__ = ("stage", "req", "key", "primary", "variant_key", "stale", "by_header", "storing", "waiters",
                 "timer", "chunks", "size", "status", "head_lines", "fresh_for", "vary", "entry", "ended")

    def __init__(self, stage: CacheStage, req: Request, key: bytes, primary: bytes, stale: Entry | None,
                 by_header: bool, store: bool = True) -> None:
        self.stage = stage
        self.req = req
        self.key = key  # what waiters wait on: the lookup key (a variant's, when its Vary was known)
        self.primary = primary  # where the entry (or its VaryMarker) is stored
        self.variant_key = key
        self.stale = stale
        self.by_header = by_header  # the request carried Authorization on a route without an authorizer
        self.storing = store
        self.waiters: list[tuple[Any, Request]] = []
        self.timer: Any = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.status = 0
        self.head_lines = b""
        self.fresh_for = 0.0
        self.vary: tuple[bytes, ...] = ()
        self.entry: Entry | None = None
        self.ended = False

    # -- coalescing -------------------------------------------------------------------
    def wait(self, proto: HttpProtocol, req: Request) -> None:
        self.waiters.append((proto, req))
        if self.timer is None:
            self.timer = proto.loop.call_later(self.stage.lock_timeout, self._release_waiters)

    def _release_waiters(self) -> None:
        """The fill took longer than the route's timeout: its waiters go on alone."""
        self.timer = None
        waiters, self.waiters = self.waiters, []
        for proto, req in waiters:
            self.stage.store.stats.misses += 1
            req.extra_response += b"x-cache: Miss\r\n"
            _continue_after(proto, req, self.stage)

    # -- the proxy's taps -------------------------------------------------------------
    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if not self.storing:
            self._end(None)
            return
        stage = self.stage
        cfg = stage.cfg
        v = verdict(status, headers, cfg.ttl, cfg.statuses, self.by_header, time.time())
        if not v.store:
            stage.store.stats.not_stored += 1
            log.debug("route %r: response not cached: %s", self.req.route_key, v.reason)
            self._end(None)
            return
        skip = stage.skip
        named = _connection_tokens(headers)  # hop-by-hop by the upstream's word: never replayed
        lines = []
        for name, value in headers:
            lname = name.lower()
            if lname in named:
                continue
            if lname == b"content-length":
                if value.isdigit() and int(value) > cfg.max_entry_bytes:
                    stage.store.stats.not_stored += 1
                    self._end(None)
                    return
            elif lname not in skip and not lname.startswith(b"proxy-"):
                lines.append(b"%b: %b\r\n" % (name, value))
        self.status = status
        self.head_lines = b"".join(lines)
        self.fresh_for = v.fresh_for
        self.vary = v.vary

    def body(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.stage.cfg.max_entry_bytes:
            self.stage.store.stats.not_stored += 1
            self._end(None)
            return
        self.chunks.append(chunk)

    def complete(self) -> None:
        if self.ended:
            return
        if not self.status:
            self._end(None)
            return
        stage = self.stage
        now = time.time()
        fresh_until = now + self.fresh_for
        entry = Entry(self.status, self.head_lines, b"".join(self.chunks), now, fresh_until,
                      fresh_until + stage.cfg.stale_if_error)
        stage.store.stats.stored += 1
        primary = self.primary
        if self.vary:
            self.variant_key = variant(primary, self.vary, self.req)
            stage.store.put_variant(primary, self.variant_key, self.vary, entry, self.req.path)
        else:
            stage.store.put_entry(primary, entry, self.req.path)
        self._end(entry)

    def abandon(self) -> None:
        self._end(None)

    def fail(self, status: int, reason: str) -> None:
        """The upstream exchange failed with a gateway error (`status`): the waiters get
        the same answer at once rather than each trying the failing upstream again."""
        if self.req.response_started:  # cut after the head: the waiters try for themselves
            self._end(None)
            return
        waiters, self.waiters = self.waiters, []
        for proto, req in waiters:
            req.pending = False
            if not (proto._closed or req.responded or req is not proto._active):
                req.integration_error = f"{reason} (the request it waited for)"
                proto.send_error(req, status, reason)
        self._end(None)

    def rescues(self, status: int) -> bool:
        """Whether an upstream answer of `status` is to be replaced by the stale entry."""
        return status in _STALE_STATUSES and self._stale_usable()

    def serve_stale(self, proto: HttpProtocol, req: Request) -> bool:
        """The upstream failed: answer with the stale entry if there is one."""
        if not self._stale_usable() or req.response_started or req.responded:
            return False
        stale: Entry = self.stale  # type: ignore[assignment]  # checked by _stale_usable
        self.stage.store.stats.stale += 1
        req.extra_response = req.extra_response.replace(b"x-cache: Miss\r\n", b"")
        self._end(stale, STALE)
        send_cached(proto, req, stale, STALE)
        return True

    def _stale_usable(self) -> bool:
        return self.stale is not None and time.time() < self.stale.stale_until

    def _end(self, entry: Entry | None, label: bytes = HIT) -> None:
        if self.ended:
            return
        self.ended = True
        self.entry = entry
        self.chunks = []
        if self.req.cache_fill is self:
            self.req.cache_fill = None
        inflight = self.stage.inflight
        if inflight.get(self.key) is self:
            del inflight[self.key]
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiters, self.waiters = self.waiters, []
        vary, primary = self.vary, self.primary
        for proto, req in waiters:
            # a waiter that selects another variant than the one stored goes upstream
            if entry is not None and (not vary or variant(primary, vary, req) == self.variant_key):
                self.stage.store.stats.hits += 1
                _answer_waiting(proto, req, entry, label)
            else:
                self.stage.store.stats.misses += 1
                req.extra_response += b"x-cache: Miss\r\n"
                _continue_after(proto, req, self.stage)
