"""The WebSocket half of `runtime.gateway.Gateway`: AWS-style WebSocket APIs' registry,
their cross-worker and cross-host forwarding, and closing WebSockets at stop.

Owns building the WebSocket API handlers for a config (the @connections registry is
made once and kept across reloads, so management calls still find connections opened
before one), the per-worker Unix socket the supervisor's workers forward @connections
calls through, the Redis bus of cluster mode, and the 1001 close of every open WebSocket
when the gateway stops. `Gateway` inherits this; the attributes annotated below are its.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from edgeplane.config.stages import serves_websockets
from edgeplane.http.context import ServerContext
from edgeplane.http.protocol import HttpProtocol
from edgeplane.policies.throttle.slots import SlotMap, ws_identity
from edgeplane.websocket.api import build_websocket_apis
from edgeplane.websocket.connections import ConnectionRegistry, WsConnection

if TYPE_CHECKING:
    from edgeplane.config.model import Config
    from edgeplane.plugins.base import RuntimeContext
    from edgeplane.upstream.cluster import Upstream


class GatewayWebSockets:
    """Mixin: the WebSocket methods of `runtime.gateway.Gateway`."""

    _ws_worker: tuple[int, str, bytes] | None
    _ws_registry: ConnectionRegistry | None
    _ws_socket: str | None
    _ws_bus: Any
    _limiter: Any
    _shared_table: Any
    _slots: SlotMap | None
    _admin_context: ServerContext | None
    _context: ServerContext | None
    _loop: asyncio.AbstractEventLoop | None
    _servers: list[asyncio.AbstractServer]

    def _websockets_for(self, top: Config, loop: asyncio.AbstractEventLoop, upstreams: dict[str, Upstream],
                        runtime_ctx: RuntimeContext) -> Callable[[Config], dict[bytes, Any]]:
        """What `build_snapshot` calls for each config it serves (each stage's, with
        stages): its WebSocket APIs, in the one registry of this gateway."""
        index, tag = 0, None
        if self._ws_worker is not None and serves_websockets(top):
            index, _, tag = self._ws_worker
        if self._ws_registry is None:  # one registry for the gateway's life: reloads keep it
            self._ws_registry = ConnectionRegistry(loop, index, tag)
        return lambda cfg: self._build_websockets(cfg, top, upstreams, runtime_ctx)

    def _build_websockets(self, cfg: Config, top: Config, upstreams: dict[str, Upstream],
                          runtime_ctx: RuntimeContext) -> dict[bytes, Any]:
        if not cfg.websocket_apis:
            return {}
        buckets: dict[str, Any] = {}
        if self._limiter is not None:  # cluster: one Redis bucket per API for every host
            for name, api in cfg.websocket_apis.items():
                rate = api.limits.connections_per_second
                buckets[name] = self._limiter.limit(f"ws:{name}", rate, max(1, int(rate)), "websocket",
                                                   keyed=False).bucket()
        elif self._shared_table is not None:  # workers of one host: the supervisor's table
            slots = self._slots if self._slots is not None else SlotMap.initial(top)
            for name, api in cfg.websocket_apis.items():
                rate = api.limits.connections_per_second
                index = slots.index("plain", ws_identity(name, rate))
                buckets[name] = self._shared_table.bucket(index, rate, max(1, int(rate)))
        assert self._ws_registry is not None  # made by `_websockets_for`
        return build_websocket_apis(cfg, upstreams, runtime_ctx.state, self._ws_registry, buckets)

    async def _start_ws_forwarding(self, cfg: Config) -> None:
        """A worker's private Unix socket (the admin app, for what one worker asks of the
        others: @connections calls, cache flushes), and the Redis bus of WebSocket APIs."""
        registry = cast(ConnectionRegistry, self._ws_registry)  # set: built before the listeners
        if self._ws_worker is not None:
            from edgeplane.runtime.admin import WorkerForwarder

            directory = self._ws_worker[1]  # created private (0700) by the supervisor
            path = os.path.join(directory, f"worker-{self._ws_worker[0]}.sock")
            try:
                os.unlink(path)  # a predecessor's (this index is ours now)
            except FileNotFoundError:
                pass
            ctx = cast(ServerContext, self._admin_context)  # set: start() made it
            loop = cast(asyncio.AbstractEventLoop, self._loop)
            server = await loop.create_unix_server(lambda: HttpProtocol(ctx), path)
            os.chmod(path, 0o600)
            self._servers.append(server)
            self._ws_socket = path
            registry.forwarder = WorkerForwarder(
                lambda i: os.path.join(directory, f"worker-{i}.sock"))
        if cfg.cluster is not None and serves_websockets(cfg):
            from edgeplane.websocket.bus import RedisBus

            c = cfg.cluster
            bus = self._ws_bus = RedisBus(registry, c.redis, c.key_prefix,
                                          timeout=max(1.0, c.timeout * 10), retry_interval=c.retry_interval)
            await bus.start()
            registry.bus = bus

    async def _stop_ws_forwarding(self) -> None:
        if self._ws_socket is not None:
            try:
                os.unlink(self._ws_socket)
            except OSError:
                pass
            self._ws_socket = None
        if self._ws_bus is not None:
            bus, self._ws_bus = self._ws_bus, None
            await bus.close()

    async def _outlive_handover(self, ctx: ServerContext, timeout: float) -> None:
        """Handed over: the successor serves new connections. Proxied WebSockets and
        requests in flight stay here until they end on their own, for up to `timeout`
        (as nginx's old workers do). WebSocket API connections close now with 1001: their
        `@connections` calls reach the successor, which could not deliver to them here."""
        await self._close_websockets(min(timeout, 2.5), api_only=True)
        loop = cast(asyncio.AbstractEventLoop, self._loop)  # set: the context exists
        deadline = loop.time() + timeout
        while (ctx.websockets or ctx.connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def _close_websockets(self, timeout: float, *, api_only: bool = False) -> None:
        """Close every WebSocket (`api_only`: those of WebSocket APIs) with 1001 and
        give clients `timeout` to answer."""
        ctx = self._context
        if ctx is None or not ctx.websockets:
            return
        closing = [ws for ws in ctx.websockets if not api_only or isinstance(ws, WsConnection)]
        if not closing:
            return
        for ws in closing:
            ws.close(1001, "going away")
        loop = cast(asyncio.AbstractEventLoop, self._loop)  # set: the context exists
        deadline = loop.time() + timeout
        while any(ws in ctx.websockets for ws in closing) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for ws in [ws for ws in closing if ws in ctx.websockets]:
            abort = getattr(ws, "abort", None)  # a proxied relay: both legs
            if abort is not None:
                abort()
            elif getattr(ws, "transport", None) is not None:
                ws.transport.abort()
        await asyncio.sleep(0)
